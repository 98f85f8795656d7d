"""``eagle_C::argmax_checked`` (csrc/cpu/argmax_checked.cpp) and its Python entry
``eagle.models.generate_plain.argmax_checked``: torch.argmax's index (first maximum; first NaN of a row
holding NaN) and a NaN/inf flag, for every float dtype and row length (vector body and tail)."""

from __future__ import annotations

import pytest
import torch

from eagle.models.generate_plain import argmax_checked, nonfinite_flag
from eagle_kernels import _ext

pytestmark = pytest.mark.skipif(not _ext.has_op("argmax_checked"), reason="C++ extension not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1, 1), (3, 7), (16, 2048), (2, 5, 33), (4, 16), (50,)]


def _op(x: torch.Tensor):
    return torch.ops.eagle_C.argmax_checked(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_index_is_torch_argmax_on_finite_rows(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen).to(dtype)
    index, bad = _op(x)
    assert index.dtype == torch.int64 and index.shape == x.shape[:-1]
    assert torch.equal(index, x.argmax(-1))
    assert bad.dtype == torch.bool and bad.shape == () and not bool(bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_give_the_first_maximum(dtype):
    x = torch.randint(0, 3, (9, 37), generator=torch.Generator().manual_seed(1)).to(dtype)
    x[4] = 2  # a row of equal values: index 0
    index, bad = _op(x)
    assert torch.equal(index, x.argmax(-1)) and index[4] == 0 and not bool(bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("column", [0, 5, 20, 36], ids=lambda c: f"col{c}")
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_nonfinite_values_are_flagged_and_indexed_like_torch(dtype, column, value):
    x = torch.randn(3, 37, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[1, column] = value
    if value != value:
        x[1, column + 1 :] = value  # several NaNs: torch (and the op) take the first
    index, bad = _op(x)
    assert bool(bad)
    assert torch.equal(index, x.argmax(-1))


def test_a_row_of_minus_inf_gives_index_zero():
    x = torch.full((2, 40), float("-inf"))
    index, bad = _op(x)
    assert bool(bad) and index.tolist() == [0, 0]


def test_python_entry_matches_torch_and_flags():
    x = torch.randn(4, 100)
    index, bad = argmax_checked(x)
    assert torch.equal(index, x.argmax(-1)) and not bool(bad) and not bool(nonfinite_flag(x))
    x[2, 3] = float("nan")
    assert bool(argmax_checked(x)[1]) and bool(nonfinite_flag(x))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[\.\.\., V\] with V > 0"):
        _op(torch.zeros(3, 0))
    with pytest.raises(ValueError, match=r"\[\.\.\., V\] with V > 0"):
        _op(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="argmax_checked"):
        _op(torch.zeros(3, 4, dtype=torch.int64))
