"""The float32 few-rows linear on CPU (``eagle_C::skinny_linear_f32``, csrc/cpu/skinny_linear.cpp): close
to ``F.linear``, every row independent of the rows beside it and of the thread count (a verified tree
row equals the plain decoding step bit for bit), used by ``cpu_packed.linear`` up to its row limit
only, and bad input refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from eagle.models.cpu_packed import linear, skinny_max_rows

pytestmark = pytest.mark.skipif(skinny_max_rows() == 0, reason="needs the extension on an AVX-512 CPU")


def op(x, w, b=None):
    return torch.ops.eagle_C.skinny_linear_f32(x, w, b)


@pytest.mark.parametrize("K", [16, 64, 100, 257])  # multiples of the 16-lane vector and tails
@pytest.mark.parametrize("N", [1, 3, 4, 37])  # whole and partial 4-column blocks
@pytest.mark.parametrize("bias", [False, True])
def test_close_to_float64_reference(K, N, bias):
    gen = torch.Generator().manual_seed(K * 100 + N)
    for M in (1, 2, 3, 5, skinny_max_rows()):
        x = torch.randn(M, K, generator=gen)
        w = torch.randn(N, K, generator=gen)
        b = torch.randn(N, generator=gen) if bias else None
        want = F.linear(x.double(), w.double(), None if b is None else b.double())
        got = op(x, w, b)
        assert got.dtype == torch.float32 and got.shape == (M, N)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * K**0.5)


def test_rows_are_independent_of_their_neighbours_and_threads():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(skinny_max_rows(), 200, generator=gen)
    w = torch.randn(70, 200, generator=gen)
    b = torch.randn(70, generator=gen)
    together = op(x, w, b)
    for m in range(x.shape[0]):
        assert torch.equal(op(x[m : m + 1], w, b), together[m : m + 1])
    for start, stop in ((1, 4), (3, 10), (5, 6)):  # other row blocks around the same rows
        assert torch.equal(op(x[start:stop], w, b), together[start:stop])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        big = torch.randn(4096, 200, generator=gen)  # enough columns to split across threads
        two = op(x, big)
        torch.set_num_threads(1)
        assert torch.equal(op(x, big), two)
    finally:
        torch.set_num_threads(threads)


def test_batched_and_strided_inputs():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 48, generator=gen)
    x = torch.randn(2, 3, 48, generator=gen)
    assert torch.equal(op(x, w), op(x.reshape(6, 48), w).view(2, 3, 24))
    wide = torch.randn(4, 96, generator=gen)
    assert torch.equal(op(wide[:, ::2], w), op(wide[:, ::2].contiguous(), w))


def test_cpu_packed_linear_uses_it_up_to_the_row_limit_only():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 64, generator=gen)
    limit = skinny_max_rows()
    x = torch.randn(limit + 1, 64, generator=gen)
    assert torch.equal(linear(x[:limit], w), op(x[:limit], w))
    assert torch.equal(linear(x, w), F.linear(x, w))  # past the limit: at::linear (MKL)
    assert torch.equal(linear(x[:2].double(), w.double()), F.linear(x[:2].double(), w.double()))
    grad_w = w.clone().requires_grad_(True)
    out = linear(x[:2], grad_w)  # autograd needs F.linear's backward
    assert out.grad_fn is not None


def test_bad_input_is_refused():
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="at most"):
        op(torch.randn(skinny_max_rows() + 1, 32), w)
    with pytest.raises(TypeError, match="float32"):
        op(torch.randn(2, 32, dtype=torch.float64), w.double())
    with pytest.raises(ValueError, match=r"\[\.\.\., K\]"):
        op(torch.randn(2, 31), w)
    with pytest.raises(ValueError, match="bias"):
        op(torch.randn(2, 32), w, torch.randn(7))


def test_environment_switch_turns_it_off():
    code = "from eagle.models.cpu_packed import skinny_max_rows; print(skinny_max_rows())"
    env = dict(os.environ, EAGLE_CPU_SKINNY_LINEAR="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
