"""Packed bf16 weights on CPU (eagle/models/cpu_packed.py): oneDNN's copy bit-identical to ``F.linear``,
AMX tiles correctly rounded and row-count invariant, both never stale and never on the autograd
path; loading packs targets and heads. (float32 panels: tests/eagle/test_panel_linear.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eagle.models import cpu_packed, load_draft, load_target
from eagle.models.cpu_packed import (
    amx_linear_available,
    amx_tiles,
    is_amx_tiled,
    linear,
    pack_linear_weights,
    packed_weight,
    packing_supported,
)
from tests.eagle.helpers import bf16_logits_with_and_without_packing

pytestmark = pytest.mark.skipif(
    not packing_supported(torch.bfloat16), reason="this CPU/torch build packs no bf16 weights"
)
needs_amx = pytest.mark.skipif(not amx_linear_available(), reason="needs AMX-BF16 tiles")
needs_onednn = pytest.mark.skipif(
    not cpu_packed._onednn_supports(torch.bfloat16), reason="this CPU/torch build has no oneDNN bf16 linear"
)


@pytest.fixture
def onednn_layout(monkeypatch):
    """Pack into oneDNN's layout even where AMX tiles or bf16 panels are available."""
    monkeypatch.setenv("EAGLE_CPU_AMX_LINEAR", "0")
    monkeypatch.setenv("EAGLE_CPU_BF16_PANEL_LINEAR", "0")


def is_packed(w: torch.Tensor) -> bool:
    return packed_weight(w) is not w


def bf16(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def test_what_is_packable(monkeypatch):
    assert packing_supported(torch.float32) == cpu_packed.panel_linear_available()
    assert not packing_supported(torch.float64)
    assert not packing_supported(torch.bfloat16, "meta")
    monkeypatch.setenv("EAGLE_CPU_PACKED_WEIGHTS", "0")
    assert not packing_supported(torch.bfloat16)
    assert pack_linear_weights([bf16(8, 4)]) == 0


@needs_onednn
def test_onednn_packed_linear_is_bit_identical_to_f_linear(onednn_layout):
    w, b = bf16(48, 32, seed=1), bf16(48, seed=2)
    assert pack_linear_weights([w]) == 1
    assert packed_weight(w).is_mkldnn
    for shape in [(1, 32), (3, 7, 32), (2, 64, 32)]:
        x = bf16(*shape, seed=3)
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))
        assert torch.equal(linear(x, w), F.linear(x, w))


def float_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The exact product of the bf16 values (float64), plus the bias."""
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


@needs_amx
@pytest.mark.parametrize(
    "rows, k, n",
    [(1, 32, 16), (3, 64, 48), (16, 256, 80), (17, 96, 64), (40, 128, 272), (5, 768, 256)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_amx_linear_is_the_float32_sum_rounded_once(rows, k, n, with_bias):
    # Column blocks in groups of 4 and a remainder, row blocks of 16 and a remainder, several K blocks.
    w, x = bf16(n, k, seed=1), bf16(rows, k, seed=2)
    b = bf16(n, seed=3) if with_bias else None
    assert pack_linear_weights([w]) == 1 and is_amx_tiled(packed_weight(w))
    y = linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    ref = float_reference(x, w, b)
    # Rounding to bf16 is within half an ulp (2^-9 relative); float32 accumulation adds ~k * 2^-24.
    bound = ref.abs() * 2.0**-8 + k * 2.0**-22 * (x.double().abs() @ w.double().abs().T)
    assert bool(((y.double() - ref).abs() <= bound + 1e-30).all())


@needs_amx
def test_amx_linear_rows_do_not_depend_on_the_block():
    # A tree row verified among 60 others must get exactly what it gets decoded alone.
    w, b, x = bf16(96, 64, seed=4), bf16(96, seed=5), bf16(2, 37, 64, seed=6)
    tiles = amx_tiles(w)
    block = torch.ops.eagle_C.amx_linear_bf16(x, tiles, b)
    assert block.shape == (2, 37, 96)
    alone = torch.stack(
        [
            torch.cat([torch.ops.eagle_C.amx_linear_bf16(x[i, j : j + 1], tiles, b) for j in range(37)])
            for i in range(2)
        ]
    )
    assert torch.equal(block, alone)
    assert torch.equal(torch.ops.eagle_C.amx_linear_bf16(x[:, :0], tiles, b), x.new_empty(2, 0, 96))


@needs_amx
def test_amx_tiles_hold_the_pair_interleaved_layout():
    w = (torch.arange(32 * 64) % 251).view(32, 64).to(torch.bfloat16)  # distinct small integers, exact
    t = amx_tiles(w)
    assert t.shape == (2, 2, 16, 32)
    for nb, kb, r, c, j in [(0, 0, 0, 0, 0), (1, 0, 3, 5, 1), (0, 1, 15, 15, 1), (1, 1, 7, 2, 0)]:
        assert t[nb, kb, r, 2 * c + j] == w[nb * 16 + c, kb * 32 + 2 * r + j]


@needs_amx
def test_amx_linear_rejects_bad_input():
    tiles, x = amx_tiles(bf16(32, 64, seed=7)), bf16(2, 64, seed=8)
    op = torch.ops.eagle_C.amx_linear_bf16
    with pytest.raises(ValueError, match="x must be a CPU bf16 tensor"):
        op(x.float(), tiles, None)
    with pytest.raises(ValueError, match=r"x must be a CPU bf16 tensor \[\.\.\., 64\]"):
        op(bf16(2, 32, seed=9), tiles, None)
    with pytest.raises(ValueError, match="bias must be a CPU bf16 tensor \\[32\\]"):
        op(x, tiles, bf16(16, seed=10))
    with pytest.raises(ValueError, match="weight must be a contiguous CPU bf16 tensor"):
        op(x, bf16(32, 64, seed=11), None)


@needs_amx
def test_weights_the_tiles_do_not_fit_use_onednn_or_nothing():
    w = bf16(40, 32, seed=12)  # 40 rows: not a multiple of 16
    x = bf16(3, 32, seed=13)
    packed = pack_linear_weights([w]) == 1
    assert packed == cpu_packed._onednn_supports(torch.bfloat16)
    assert not is_amx_tiled(packed_weight(w))
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_float32_weights_the_panels_do_not_fit_are_left_alone():
    w = torch.randn(8, 4)  # 8 output features: not a multiple of 16
    assert pack_linear_weights([w]) == 0
    assert packed_weight(w) is w


def _freshly_packed_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    fresh = w.detach().clone()
    pack_linear_weights([fresh])
    return linear(x, fresh)


def test_a_weight_changed_in_place_is_packed_again_not_used_stale():
    """An in-place update (an optimizer step, a load_state_dict copy, a rollback to the same values)
    moves the version counter: the next use packs the weight again, once, instead of using the stale
    copy or leaving the packed kernels for the dense path."""
    w = bf16(16, 8, seed=4)
    pack_linear_weights([w])
    old = packed_weight(w)
    x = bf16(2, 8, seed=5)
    w.mul_(2)
    generation = cpu_packed.packing_generation()
    assert is_packed(w) and packed_weight(w) is not old
    assert cpu_packed.packing_generation() > generation  # (cached weight lists look again)
    assert torch.equal(linear(x, w), _freshly_packed_linear(x, w))
    generation = cpu_packed.packing_generation()
    assert packed_weight(w) is packed_weight(w) and cpu_packed.packing_generation() == generation


def test_a_weight_whose_storage_was_replaced_is_packed_again():
    p = torch.nn.Parameter(bf16(16, 8, seed=6), requires_grad=False)
    pack_linear_weights([p])
    p.data = bf16(16, 8, seed=7)  # what Module.to() does
    assert is_packed(p)
    x = bf16(2, 8, seed=8)
    assert torch.equal(linear(x, p), _freshly_packed_linear(x, p))


def test_autograd_takes_the_dense_path_and_repacks_nothing():
    p = torch.nn.Parameter(bf16(16, 8, seed=9))
    pack_linear_weights([p])
    x = bf16(2, 8, seed=10)
    linear(x, p).float().sum().backward()
    assert p.grad is not None and p.grad.shape == p.shape
    with torch.no_grad():
        p.sub_(p.grad)  # a training step
    generation = cpu_packed.packing_generation()
    for _ in range(3):  # forwards of training steps: the packed copy is of no use there
        assert torch.equal(linear(x, p), F.linear(x, p))
    assert cpu_packed.packing_generation() == generation


def test_a_view_of_a_packed_weight_shares_its_copy():
    w = bf16(16, 8, seed=11)
    pack_linear_weights([w])
    view = w.detach()
    assert pack_linear_weights([view]) == 1
    assert packed_weight(view) is packed_weight(w)
    w.add_(1)  # (a view shares the version counter: both copies are out of date, and packed again as one)
    assert packed_weight(w) is packed_weight(view)
    assert torch.equal(linear(bf16(2, 8), view), _freshly_packed_linear(bf16(2, 8), w))


def test_loading_in_bf16_packs_target_and_head(tiny_checkpoints):
    target = load_target(tiny_checkpoints.target, dtype=torch.bfloat16)
    linears = [m.weight for m in target.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(is_packed(w) for w in linears)
    assert is_packed(target.lm_head_weight)
    head = load_draft(tiny_checkpoints.eagle2, target)
    assert is_packed(head.fc.weight)
    assert packed_weight(head.lm_head_weight) is packed_weight(target.lm_head_weight)  # shared, not copied


def test_loading_in_fp32_packs_nothing_without_the_panel_kernel(tiny_checkpoints, monkeypatch):
    monkeypatch.setenv("EAGLE_CPU_PANEL_LINEAR", "0")
    target = load_target(tiny_checkpoints.target, dtype=torch.float32)
    assert all(packed_weight(p) is p for p in target.parameters())


@needs_onednn
def test_onednn_packed_and_dense_models_give_the_same_logits(tiny_checkpoints, monkeypatch, onednn_layout):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(12))
    outs = []
    for env in ("1", "0"):
        monkeypatch.setenv("EAGLE_CPU_PACKED_WEIGHTS", env)
        target = load_target(tiny_checkpoints.target, dtype=torch.bfloat16)
        assert any(packed_weight(p).is_mkldnn for p in target.parameters()) == (env == "1")
        with torch.inference_mode():
            outs.append(target(ids, target.new_cache(2, 16)).logits)
    assert torch.equal(*outs)


@needs_amx
def test_amx_and_dense_models_agree_to_bf16_rounding(tiny_checkpoints, monkeypatch):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(12))
    outs = bf16_logits_with_and_without_packing(
        tiny_checkpoints.target, ids, monkeypatch, "EAGLE_CPU_PACKED_WEIGHTS", is_amx_tiled
    )
    torch.testing.assert_close(*outs, rtol=0.05, atol=0.05)


def test_packing_is_skipped_with_a_warning_when_memory_is_short(monkeypatch):
    """The copies may take at most half of the available memory. Skipping is said: a float32 model
    left unpacked is slower to verify and no longer bit-exact against plain decoding (a 1B-parameter
    float32 model on a 24 GiB machine was skipped silently, at a quarter of the free pages)."""
    w = bf16(64, 64, seed=13)  # 8 KiB
    monkeypatch.setattr(cpu_packed, "_available_memory_bytes", lambda: 16 * 1024 - 1)
    with pytest.warns(UserWarning, match=r"not packing 1 linear weights \(0.00 GiB\).*half of it"):
        assert pack_linear_weights([w]) == 0
    assert packed_weight(w) is w
    monkeypatch.setattr(cpu_packed, "_available_memory_bytes", lambda: 16 * 1024)  # (a quarter: skipped)
    assert pack_linear_weights([w]) == 1


def test_available_memory_is_memavailable_capped_by_a_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"
    )
    none = tmp_path / "no-cgroup"
    assert cpu_packed._available_memory_bytes(str(meminfo), str(none)) == 20000000 * 1024
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("8589934592\n")  # 8 GiB, 6 GiB of it used
    (v2 / "memory.current").write_text(str(6 * 2**30))
    assert cpu_packed._available_memory_bytes(str(meminfo), str(v2)) == 2 * 2**30
    (v2 / "memory.max").write_text("max\n")
    assert cpu_packed._available_memory_bytes(str(meminfo), str(v2)) == 20000000 * 1024
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(4 * 2**30))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(5 * 2**30))  # over the limit: nothing left
    assert cpu_packed._available_memory_bytes(str(meminfo), str(v1)) == 0
    assert cpu_packed._available_memory_bytes(str(tmp_path / "no-meminfo"), str(none)) is not None  # sysconf
