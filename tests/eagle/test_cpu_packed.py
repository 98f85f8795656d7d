"""oneDNN-packed bf16 weights on CPU (eagle/models/cpu_packed.py): used when valid, bit-identical to
``F.linear``, never stale, never on the autograd path; loading packs targets and heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eagle.models import cpu_packed, load_draft, load_target
from eagle.models.cpu_packed import linear, pack_linear_weights, packed_weight, packing_supported

pytestmark = pytest.mark.skipif(
    not packing_supported(torch.bfloat16), reason="this CPU/torch build has no oneDNN bf16 linear"
)


def bf16(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def test_only_half_types_on_cpu_are_packable(monkeypatch):
    assert not packing_supported(torch.float32)
    assert not packing_supported(torch.float64)
    assert not packing_supported(torch.bfloat16, "meta")
    monkeypatch.setenv("EAGLE_CPU_PACKED_WEIGHTS", "0")
    assert not packing_supported(torch.bfloat16)
    assert pack_linear_weights([bf16(8, 4)]) == 0


def test_packed_linear_is_bit_identical_to_f_linear():
    w, b = bf16(48, 32, seed=1), bf16(48, seed=2)
    assert pack_linear_weights([w]) == 1
    assert packed_weight(w).is_mkldnn
    for shape in [(1, 32), (3, 7, 32), (2, 64, 32)]:
        x = bf16(*shape, seed=3)
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))
        assert torch.equal(linear(x, w), F.linear(x, w))


def test_float32_weights_are_left_alone():
    w = torch.randn(8, 4)
    assert pack_linear_weights([w]) == 0
    assert packed_weight(w) is w


def test_a_weight_changed_in_place_is_not_used_stale():
    w = bf16(16, 8, seed=4)
    pack_linear_weights([w])
    x = bf16(2, 8, seed=5)
    w.mul_(2)  # an optimizer step, a load_state_dict copy: the version counter moves
    assert packed_weight(w) is w
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_a_weight_whose_storage_was_replaced_is_not_used_stale():
    p = torch.nn.Parameter(bf16(16, 8, seed=6), requires_grad=False)
    pack_linear_weights([p])
    p.data = bf16(16, 8, seed=7)  # what Module.to() does
    assert packed_weight(p) is p
    x = bf16(2, 8, seed=8)
    assert torch.equal(linear(x, p), F.linear(x, p))


def test_autograd_takes_the_dense_path():
    p = torch.nn.Parameter(bf16(16, 8, seed=9))
    pack_linear_weights([p])
    x = bf16(2, 8, seed=10)
    linear(x, p).float().sum().backward()
    assert p.grad is not None and p.grad.shape == p.shape


def test_a_view_of_a_packed_weight_shares_its_copy():
    w = bf16(16, 8, seed=11)
    pack_linear_weights([w])
    view = w.detach()
    assert pack_linear_weights([view]) == 1
    assert packed_weight(view) is packed_weight(w)


def test_loading_in_bf16_packs_target_and_head(tiny_checkpoints):
    target = load_target(tiny_checkpoints.target, dtype=torch.bfloat16)
    linears = [m.weight for m in target.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(packed_weight(w).is_mkldnn for w in linears)
    assert packed_weight(target.lm_head_weight).is_mkldnn
    head = load_draft(tiny_checkpoints.eagle2, target)
    assert packed_weight(head.fc.weight).is_mkldnn
    assert packed_weight(head.lm_head_weight) is packed_weight(target.lm_head_weight)  # shared, not copied


def test_loading_in_fp32_packs_nothing(tiny_checkpoints):
    target = load_target(tiny_checkpoints.target, dtype=torch.float32)
    assert all(packed_weight(p) is p for p in target.parameters())


def test_packed_and_dense_models_give_the_same_logits(tiny_checkpoints, monkeypatch):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(12))
    outs = []
    for env in ("1", "0"):
        monkeypatch.setenv("EAGLE_CPU_PACKED_WEIGHTS", env)
        target = load_target(tiny_checkpoints.target, dtype=torch.bfloat16)
        assert any(packed_weight(p).is_mkldnn for p in target.parameters()) == (env == "1")
        with torch.inference_mode():
            outs.append(target(ids, target.new_cache(2, 16)).logits)
    assert torch.equal(*outs)


def test_packing_is_skipped_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(cpu_packed, "_available_memory_bytes", lambda: 1000)
    w = bf16(64, 64, seed=13)  # 8 KB > a quarter of 1000 bytes
    assert pack_linear_weights([w]) == 0
    assert packed_weight(w) is w
