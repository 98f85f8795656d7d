"""The float32 panel linear on CPU (``eagle_C::panel_linear_f32``, csrc/cpu/panel_linear.cpp, and the
packing in eagle/models/cpu_packed.py): close to a float64 reference over every row-tile and
panel-step shape, every row independent of the rows beside it and of the thread count (a verified
tree row equals the plain decoding step bit for bit), the layout as documented, bad input refused,
and float32 models packed at load with the same greedy tokens from the Python modules and the C++
layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eagle.models import cpu_packed, load_draft, load_target
from eagle.models.cpu_packed import is_panels, linear, pack_linear_weights, packed_weight, panels
from tests.eagle.helpers import fast_path_and_module_logits

pytestmark = pytest.mark.skipif(
    not cpu_packed.panel_linear_available(), reason="needs the extension on an AVX-512 CPU"
)


def op(x, w, b=None):
    return torch.ops.eagle_C.panel_linear_f32(x, w, b)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# Rows: every row-tile width (1-2 rows x 8 panels, 3-6 x 4, 7-12 x 2) and several tiles (13, 25, 64).
# Panels: 1, 3 and 9 (steps smaller than the tile's panel count), 17 (two chunks of 8 and a tail).
@pytest.mark.parametrize("M", [1, 2, 3, 6, 7, 12, 13, 25, 64])
@pytest.mark.parametrize("N, K", [(16, 16), (48, 100), (144, 257), (272, 64)])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_close_to_float64_reference(M, N, K, bias):
    x, w = randn(M, K, seed=M), randn(N, K, seed=N + K)
    b = randn(N, seed=3) if bias else None
    got = op(x, panels(w), b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (M, N)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * K**0.5)


def test_each_output_is_one_fma_chain_over_k_in_order():
    # The documented numerics exactly: acc = fma(x[k], w[k], acc) for k = 0.. from 0, then + bias.
    x, w, b = randn(3, 37, seed=1), randn(32, 37, seed=2), randn(32, seed=3)
    acc = torch.zeros(3, 32, dtype=torch.float64)
    for k in range(37):  # float64 product + float32 rounding of the sum == a float32 FMA (24+24 < 53 bits)
        acc = (acc + x[:, k, None].double() * w[None, :, k].double()).float().double()
    want = (acc.float() + b).float()
    assert torch.equal(op(x, panels(w), b), want)


def test_rows_are_independent_of_their_neighbours_and_threads():
    x, w, b = randn(40, 96, seed=4), randn(160, 96, seed=5), randn(160, seed=6)
    p = panels(w)
    together = op(x, p, b)
    for m in range(x.shape[0]):
        assert torch.equal(op(x[m : m + 1], p, b), together[m : m + 1])
    for start, stop in ((1, 4), (3, 16), (5, 6), (0, 25)):  # other row tilings of the same rows
        assert torch.equal(op(x[start:stop], p, b), together[start:stop])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        big = panels(randn(4096, 96, seed=7))  # enough chunks to split across threads
        two = op(x[:5], big)
        torch.set_num_threads(1)
        assert torch.equal(op(x[:5], big), two)
    finally:
        torch.set_num_threads(threads)


def test_batched_strided_and_empty_inputs():
    w = panels(randn(32, 48, seed=8))
    x = randn(2, 3, 48, seed=9)
    assert torch.equal(op(x, w), op(x.reshape(6, 48), w).view(2, 3, 32))
    wide = randn(4, 96, seed=10)
    assert torch.equal(op(wide[:, ::2], w), op(wide[:, ::2].contiguous(), w))
    assert op(x[:, :0], w).shape == (2, 0, 32)
    no_k, b = torch.empty(16, 0, dtype=torch.float32).view(1, 0, 16), randn(16, seed=20)
    assert torch.equal(op(torch.empty(3, 0), no_k, b), F.linear(torch.empty(3, 0), torch.empty(16, 0), b))
    assert torch.equal(op(torch.empty(3, 0), no_k), torch.zeros(3, 16))


def test_panels_hold_the_documented_layout():
    w = torch.arange(48 * 5, dtype=torch.float32).view(48, 5)
    p = panels(w)
    assert p.shape == (3, 5, 16) and p.is_contiguous()
    for panel, k, c in [(0, 0, 0), (1, 4, 3), (2, 2, 15)]:
        assert p[panel, k, c] == w[16 * panel + c, k]


def test_bad_input_is_refused():
    w = panels(randn(32, 64, seed=11))
    with pytest.raises(ValueError, match=r"x must be a CPU float32 tensor \[\.\.\., 64\]"):
        op(randn(2, 32, seed=12), w)
    with pytest.raises(ValueError, match="x must be a CPU float32 tensor"):
        op(randn(2, 64, seed=12).double(), w)
    with pytest.raises(ValueError, match=r"bias must be a CPU float32 tensor \[32\]"):
        op(randn(2, 64, seed=13), w, randn(16, seed=14))
    with pytest.raises(ValueError, match=r"weight must be a contiguous CPU float32 tensor \[N/16, K, 16\]"):
        op(randn(2, 64, seed=13), randn(32, 64, seed=15))
    with pytest.raises(ValueError, match="weight must be"):
        op(randn(2, 64, seed=13), w.transpose(0, 1))


def test_cpu_packed_linear_takes_the_panels_for_any_row_count():
    w, b = randn(48, 64, seed=16), randn(48, seed=17)
    assert pack_linear_weights([w]) == 1 and is_panels(packed_weight(w))
    for rows in (1, 16, 17, 100):
        x = randn(rows, 64, seed=rows)
        assert torch.equal(linear(x, w, b), op(x, panels(w), b))
    grad_w = w.clone().requires_grad_(True)
    assert linear(randn(2, 64, seed=18), grad_w).grad_fn is not None  # autograd: F.linear


def test_the_environment_switch_leaves_float32_unpacked(monkeypatch):
    monkeypatch.setenv("EAGLE_CPU_PANEL_LINEAR", "0")
    assert not cpu_packed.panel_linear_available()
    w = randn(48, 64, seed=19)
    assert pack_linear_weights([w]) == 0 and packed_weight(w) is w


def test_loading_in_fp32_packs_panels_where_they_fit(tiny_checkpoints):
    target = load_target(tiny_checkpoints.target, dtype=torch.float32)
    linears = [m.weight for m in target.modules() if isinstance(m, torch.nn.Linear)]
    fit = [w for w in linears if w.shape[0] % 16 == 0]
    assert len(fit) == 4 * 4 and all(is_panels(packed_weight(w)) for w in fit)  # qkv, o, gate_up, down
    assert packed_weight(target.lm_head_weight) is target.lm_head_weight  # vocab 101: no panels
    head = load_draft(tiny_checkpoints.eagle2, target)
    assert is_panels(packed_weight(head.fc.weight))


def _greedy_tokens(target, steps: int = 12) -> list[int]:
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(20))
    cache = target.new_cache(1, 32)
    out, tokens = target(ids, cache), []
    cache.advance(ids.shape[1])
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        out = target(nxt, cache)
        cache.advance(1)
    return tokens


def test_python_modules_and_cpp_layers_agree_with_panels(tiny_checkpoints):
    target = load_target(tiny_checkpoints.target, dtype=torch.float32)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(21))
    logits = fast_path_and_module_logits(target, ids)
    assert torch.equal(logits[True], logits[False])


def test_packed_and_dense_models_agree(tiny_checkpoints, monkeypatch):
    runs = {}
    for env in ("1", "0"):
        monkeypatch.setenv("EAGLE_CPU_PANEL_LINEAR", env)
        target = load_target(tiny_checkpoints.target, dtype=torch.float32)
        with torch.inference_mode():
            runs[env] = (
                target(torch.arange(9)[None] % 101, target.new_cache(1, 16)).logits,
                _greedy_tokens(target),
            )
    torch.testing.assert_close(runs["1"][0], runs["0"][0], rtol=1e-5, atol=1e-5)
    assert runs["1"][1] == runs["0"][1]
