"""The bfloat16 panel linear for CPUs with AVX512-BF16 but no AMX (``eagle_C::panel_linear_bf16``,
csrc/cpu/panel_linear.cpp, and the packing in eagle/models/cpu_packed.py): the float32 sum of the
exact bf16 products rounded once to bf16 over every row-tile and panel-step shape, every row
independent of the rows beside it (a verified tree row equals the plain decoding step bit for bit),
the layout as documented, bad input refused, bfloat16 models packed at load where AMX is absent, the
Python modules and the C++ layers bit-identical, and greedy decoding unchanged against oneDNN's
layout up to bf16 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eagle.models import cpu_packed, load_draft, load_target
from eagle.models.cpu_packed import bf16_panels, is_bf16_panels, linear, pack_linear_weights, packed_weight
from tests.eagle.helpers import bf16_logits_with_and_without_packing, fast_path_and_module_logits

pytestmark = pytest.mark.skipif(
    not cpu_packed.bf16_panel_linear_available(), reason="needs the extension on an AVX512-BF16 CPU"
)
no_amx = pytest.mark.skipif(
    cpu_packed.amx_linear_available(), reason="AMX tiles take bfloat16 weights on this CPU"
)


def op(x, w, b=None):
    return torch.ops.eagle_C.panel_linear_bf16(x, w, b)


def bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The exact sum of the bf16 products (float64), plus the bias."""
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


# Rows: every row-tile width (1-2 rows x 8 panels, 3-6 x 4, 7-12 x 2) and several tiles (13, 25, 64).
# Panels: 1, 3 and 9 (steps smaller than the tile's panel count), 17 (two chunks of 8 and a tail).
@pytest.mark.parametrize("M", [1, 2, 3, 6, 7, 12, 13, 25, 64])
@pytest.mark.parametrize("N, K", [(16, 2), (48, 100), (144, 258), (272, 64)])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_the_float32_sum_rounded_once_to_bf16(M, N, K, bias):
    x, w = bf16(M, K, seed=M), bf16(N, K, seed=N + K)
    b = bf16(N, seed=3) if bias else None
    got = op(x, bf16_panels(w), b)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    want = exact(x, w, b)
    # one bf16 rounding (half an ulp: 2^-8 relative) after a float32 sum (K terms of |x w| ~ 1)
    err = (got.double() - want).abs()
    assert (err <= want.abs() * 2**-8 + 1e-5 * K).all(), err.max()


def test_rows_are_independent_of_their_neighbours():
    x, w, b = bf16(40, 96, seed=4), bf16(160, 96, seed=5), bf16(160, seed=6)
    p = bf16_panels(w)
    together = op(x, p, b)
    for m in range(x.shape[0]):
        assert torch.equal(op(x[m : m + 1], p, b), together[m : m + 1])
    for start, stop in ((1, 4), (3, 16), (5, 6), (0, 25)):  # other row tilings of the same rows
        assert torch.equal(op(x[start:stop], p, b), together[start:stop])


def test_batched_strided_and_empty_inputs():
    w = bf16_panels(bf16(32, 48, seed=8))
    x = bf16(2, 3, 48, seed=9)
    assert torch.equal(op(x, w), op(x.reshape(6, 48), w).view(2, 3, 32))
    wide = bf16(4, 96, seed=10)
    assert torch.equal(op(wide[:, ::2], w), op(wide[:, ::2].contiguous(), w))
    assert op(x[:, :0], w).shape == (2, 0, 32)


def test_panels_hold_the_documented_layout():
    w = torch.arange(48 * 6, dtype=torch.float32).view(48, 6).bfloat16()
    p = bf16_panels(w)
    assert p.shape == (3, 3, 32) and p.is_contiguous()
    for panel, i, c, j in [(0, 0, 0, 0), (1, 2, 3, 1), (2, 1, 15, 0), (2, 2, 15, 1)]:
        assert p[panel, i, 2 * c + j] == w[16 * panel + c, 2 * i + j]


def test_bad_input_is_refused():
    w = bf16_panels(bf16(32, 64, seed=11))
    with pytest.raises(ValueError, match=r"x must be a CPU bfloat16 tensor \[\.\.\., 64\]"):
        op(bf16(2, 32, seed=12), w)
    with pytest.raises(ValueError, match="x must be a CPU bfloat16 tensor"):
        op(bf16(2, 64, seed=12).float(), w)
    with pytest.raises(ValueError, match=r"bias must be a CPU bfloat16 tensor \[32\]"):
        op(bf16(2, 64, seed=13), w, bf16(16, seed=14))
    with pytest.raises(
        ValueError, match=r"weight must be a contiguous CPU bfloat16 tensor \[N/16, K/2, 32\]"
    ):
        op(bf16(2, 64, seed=13), bf16(32, 64, seed=15))
    with pytest.raises(ValueError, match="weight must be"):
        op(bf16(2, 64, seed=13), w.transpose(0, 1))


@no_amx
def test_cpu_packed_linear_takes_the_panels_for_any_row_count():
    w, b = bf16(48, 64, seed=16), bf16(48, seed=17)
    assert pack_linear_weights([w]) == 1 and is_bf16_panels(packed_weight(w))
    for rows in (1, 16, 17, 100):
        x = bf16(rows, 64, seed=rows)
        assert torch.equal(linear(x, w, b), op(x, bf16_panels(w), b))
    grad_w = w.float().requires_grad_(True).bfloat16()
    assert linear(bf16(2, 64, seed=18), grad_w).grad_fn is not None  # autograd: F.linear


@no_amx
def test_odd_k_or_n_not_a_multiple_of_16_keeps_onednn_or_nothing():
    for w in (bf16(48, 63, seed=19), bf16(40, 64, seed=20)):
        pack_linear_weights([w])
        assert not is_bf16_panels(packed_weight(w))
        x = bf16(3, w.shape[1], seed=21)
        assert torch.equal(linear(x, w), F.linear(x, w))


@no_amx
def test_the_environment_switch_keeps_onednn(monkeypatch):
    monkeypatch.setenv("EAGLE_CPU_BF16_PANEL_LINEAR", "0")
    assert not cpu_packed.bf16_panel_linear_available()
    w = bf16(48, 64, seed=22)
    pack_linear_weights([w])
    assert not is_bf16_panels(packed_weight(w))


@no_amx
def test_loading_in_bf16_packs_panels_where_they_fit(tiny_checkpoints):
    target = load_target(tiny_checkpoints.target, dtype=torch.bfloat16)
    linears = [m.weight for m in target.modules() if isinstance(m, torch.nn.Linear)]
    fit = [w for w in linears if w.shape[0] % 16 == 0 and w.shape[1] % 2 == 0]
    assert len(fit) == 4 * 4 and all(is_bf16_panels(packed_weight(w)) for w in fit)  # qkv, o, gate_up, down
    head = load_draft(tiny_checkpoints.eagle2, target)
    assert is_bf16_panels(packed_weight(head.fc.weight))


@no_amx
def test_python_modules_and_cpp_layers_agree_with_panels(tiny_checkpoints):
    target = load_target(tiny_checkpoints.target, dtype=torch.bfloat16)
    assert any(is_bf16_panels(packed_weight(p)) for p in target.parameters())
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(21))
    logits = fast_path_and_module_logits(target, ids)
    assert torch.equal(logits[True], logits[False])


@no_amx
def test_panels_and_onednn_models_agree_to_bf16_rounding(tiny_checkpoints, monkeypatch):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(12))
    outs = bf16_logits_with_and_without_packing(
        tiny_checkpoints.target, ids, monkeypatch, "EAGLE_CPU_BF16_PANEL_LINEAR", is_bf16_panels
    )
    torch.testing.assert_close(*outs, rtol=0.05, atol=0.05)


@no_amx
def test_repacking_a_loaded_model_switches_its_layout(tiny_checkpoints, monkeypatch):
    from eagle.models.cpu_packed import repack_module_linears

    target = load_target(tiny_checkpoints.target, dtype=torch.bfloat16)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(13))

    def logits():
        with torch.inference_mode():
            return target(ids, target.new_cache(1, 16)).logits

    def layouts_the_cpp_layers_get():
        _, for_op, _, _ = target.cpu_forward_weights(ids[:, 0])
        return {
            "panels" if is_bf16_panels(w) else "mkldnn" if w.is_mkldnn else "dense"
            for w in for_op
            if w is not None
        }

    panels_logits = logits()
    assert "panels" in layouts_the_cpp_layers_get()
    monkeypatch.setenv("EAGLE_CPU_BF16_PANEL_LINEAR", "0")
    repack_module_linears(target, [target.lm_head_weight])
    assert not any(is_bf16_panels(packed_weight(p)) for p in target.parameters())
    assert "panels" not in layouts_the_cpp_layers_get()  # the C++ layers' cached list follows
    fresh = load_target(tiny_checkpoints.target, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(logits(), fresh(ids, fresh.new_cache(1, 16)).logits)
    monkeypatch.setenv("EAGLE_CPU_BF16_PANEL_LINEAR", "1")
    repack_module_linears(target, [target.lm_head_weight])
    assert is_bf16_panels(packed_weight(target.layers[0].mlp.down_proj.weight))
    assert "panels" in layouts_the_cpp_layers_get()
    assert torch.equal(logits(), panels_logits)
