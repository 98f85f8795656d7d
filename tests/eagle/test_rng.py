from __future__ import annotations

import pytest
import torch
from scipy import stats

from eagle import rng
from eagle.rng import row_seeds, splitmix64, uniforms
from eagle_kernels import _ext


def test_splitmix64_matches_python_reference():
    def ref(x):
        m = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        z = z ^ (z >> 31)
        return z - (1 << 64) if z >= 1 << 63 else z

    xs = [0, 1, 2, 12345, -1, -(1 << 63), (1 << 63) - 1]
    got = splitmix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [ref(x & ((1 << 64) - 1)) for x in xs]


def test_uniform_range_and_distribution():
    seeds = row_seeds(7, 4)
    u = uniforms(seeds, torch.zeros(4, dtype=torch.int64), 5000)
    assert u.shape == (4, 5000) and u.min() >= 0 and u.max() < 1
    for row in u:
        assert stats.kstest(row.numpy(), "uniform").pvalue > 1e-3
    u64 = uniforms(seeds, torch.ones(4, dtype=torch.int64), 1000, dtype=torch.float64)
    assert u64.dtype == torch.float64 and u64.max() < 1


def test_rows_and_draws_are_distinct_and_reproducible():
    seeds = row_seeds(3, 3)
    a = uniforms(seeds, torch.tensor([0, 0, 0]), 8)
    b = uniforms(seeds, torch.tensor([0, 0, 0]), 8)
    c = uniforms(seeds, torch.tensor([1, 1, 1]), 8)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    assert not torch.equal(a, c)
    # A row's stream does not depend on the others: row 1 alone with its own seed gives the same.
    alone = uniforms(seeds[1:2], torch.tensor([0]), 8)
    assert torch.equal(alone[0], a[1])


def test_rows_uncorrelated():
    seeds = row_seeds(11, 2)
    u = uniforms(seeds, torch.zeros(2, dtype=torch.int64), 20000).double()
    corr = torch.corrcoef(u)[0, 1].abs().item()
    assert corr < 0.03


# --------------------------------------------------------------------------------------------------
# The C++ versions (csrc/cpu/rng.cpp) that eagle.rng uses on CPU: the same bits as the tensor ops
# --------------------------------------------------------------------------------------------------
needs_cpp = pytest.mark.skipif(
    not (_ext.has_op("uniforms") and _ext.has_op("inverse_cdf")), reason="C++ extension not built"
)


def _torch_only(monkeypatch):
    monkeypatch.setattr(rng, "_in_cpp", lambda *tensors: False)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counter_dtype", [torch.int64, torch.int32])
def test_cpp_uniforms_equal_the_tensor_ops(monkeypatch, dtype, counter_dtype):
    gen = torch.Generator().manual_seed(1)
    seeds = torch.cat((row_seeds(5, 3), torch.tensor([0, -1, -(1 << 63), (1 << 63) - 1])))
    counter = torch.randint(-(1 << 31), (1 << 31) - 1, (7,), generator=gen).to(counter_dtype)
    counter[0] = 0
    cpp = torch.ops.eagle_C.uniforms(seeds, counter, 37, dtype)
    assert rng._in_cpp("uniforms", seeds, counter)  # eagle.rng.uniforms calls the op on CPU
    assert torch.equal(uniforms(seeds, counter, 37, dtype=dtype), cpp)
    _torch_only(monkeypatch)
    ref = uniforms(seeds, counter, 37, dtype=dtype)
    assert cpp.dtype == ref.dtype == dtype and torch.equal(cpp, ref)
    assert torch.equal(uniforms(seeds[:0], counter[:0], 4), torch.empty(0, 4))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpp_inverse_cdf_equals_the_tensor_ops(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(64, 33, generator=gen) * 3, -1)
    probs[::3, ::2] = 0  # zero runs: ties in the running sum
    probs[5] = 0
    probs[6] = torch.nan
    probs[7, 4] = torch.inf
    probs = probs.to(dtype)
    u = torch.rand(64, generator=gen)
    u[:4] = torch.tensor([0.0, 1 - 2**-24, 0.5, 0.25])
    columns = probs.t().contiguous().t()  # a strided view
    cpp = [torch.ops.eagle_C.inverse_cdf(probs, u), torch.ops.eagle_C.inverse_cdf(columns, u.double())]
    assert rng._in_cpp("inverse_cdf", probs, u)
    _torch_only(monkeypatch)
    ref = [rng.inverse_cdf(probs, u), rng.inverse_cdf(columns, u.double())]
    for a, b in zip(cpp, ref):
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)


@needs_cpp
def test_cpp_rng_ops_refuse_bad_arguments():
    seeds, counter = row_seeds(1, 2), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(TypeError, match="seeds must be int64"):
        torch.ops.eagle_C.uniforms(seeds.int(), counter, 3, torch.float32)
    with pytest.raises(TypeError, match="counter must be int32 or int64"):
        torch.ops.eagle_C.uniforms(seeds, counter.float(), 3, torch.float32)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        torch.ops.eagle_C.uniforms(seeds, counter, 3, torch.float16)
    with pytest.raises(ValueError, match=r"counter must be \[B\] = \[2\]"):
        torch.ops.eagle_C.uniforms(seeds, counter[:1], 3, torch.float32)
    with pytest.raises(ValueError, match="n must be >= 0"):
        torch.ops.eagle_C.uniforms(seeds, counter, -1, torch.float32)
    with pytest.raises(ValueError, match=r"u must be \[R\] = \[2\]"):
        torch.ops.eagle_C.inverse_cdf(torch.ones(2, 4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"probs must be \[R, V >= 1\]"):
        torch.ops.eagle_C.inverse_cdf(torch.ones(2, 0), torch.zeros(2))
    with pytest.raises(TypeError, match="must be floating point"):
        torch.ops.eagle_C.inverse_cdf(torch.ones(2, 4, dtype=torch.int64), torch.zeros(2))


def test_uniforms_refuse_a_negative_count_and_odd_inputs_take_the_tensor_ops():
    seeds, counter = row_seeds(1, 2), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="n must be >= 0"):
        uniforms(seeds, counter, -1)
    probs = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    u = torch.tensor([0.5, 0.5])
    want = rng.inverse_cdf(probs, u)
    if hasattr(torch, "float8_e4m3fn"):  # no C++ kernel for float8: the tensor ops take it
        assert torch.equal(rng.inverse_cdf(probs.to(torch.float8_e4m3fn), u), want)
