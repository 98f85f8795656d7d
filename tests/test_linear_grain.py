"""The CPU linears' parallel split (csrc/cpu/linear_grain.h): tasks hold at least 64 KB of the weight or
~1M multiply-adds, whichever splits more; ``eagle_C::linear_grain_set_bytes`` sets the byte bound (0: the
multiply-adds bound alone). The split never changes a result: every output column is computed alike."""

from __future__ import annotations

import pytest
import torch

import eagle_kernels  # noqa: F401  (loads the extension's ops)
from eagle.models import cpu_packed

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.eagle_C, "linear_grain_set_bytes"), reason="the extension is not built"
)


def randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    before = torch.ops.eagle_C.linear_grain_set_bytes(64 << 10)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
    torch.ops.eagle_C.linear_grain_set_bytes(before)


def _results_under_every_split(linear, x) -> list[torch.Tensor]:
    outs = []
    for grain_bytes in (0, 1, 64 << 10, 1 << 30):  # multiply-adds only, a task per block, default, one task
        torch.ops.eagle_C.linear_grain_set_bytes(grain_bytes)
        outs.append(linear(x))
    torch.set_num_threads(1)
    outs.append(linear(x))
    return outs


@pytest.mark.skipif(not cpu_packed.panel_linear_available(), reason="needs the float32 panel kernel")
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_float32_panels_give_the_same_bits_under_every_split(two_threads, rows):
    w = cpu_packed.panels(randn(1536, 256, seed=1))
    x, b = randn(rows, 256, seed=2), randn(1536, seed=3)
    outs = _results_under_every_split(lambda x: torch.ops.eagle_C.panel_linear_f32(x, w, b), x)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.skipif(
    not (hasattr(torch.ops.eagle_C, "amx_bf16_available") and torch.ops.eagle_C.amx_bf16_available()),
    reason="needs AMX tiles",
)
@pytest.mark.parametrize("rows", [1, 4, 16, 40])
def test_bfloat16_amx_tiles_give_the_same_bits_under_every_split(two_threads, rows):
    w = cpu_packed.amx_tiles(randn(2048, 256, seed=4, dtype=torch.bfloat16))
    x, b = randn(rows, 256, seed=5, dtype=torch.bfloat16), randn(2048, seed=6, dtype=torch.bfloat16)
    outs = _results_under_every_split(lambda x: torch.ops.eagle_C.amx_linear_bf16(x, w, b), x)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_the_setter_returns_the_previous_bound_and_refuses_a_negative_one():
    before = torch.ops.eagle_C.linear_grain_set_bytes(12345)
    try:
        assert torch.ops.eagle_C.linear_grain_set_bytes(0) == 12345
        with pytest.raises(ValueError, match="bytes must be >= 0"):
            torch.ops.eagle_C.linear_grain_set_bytes(-1)
    finally:
        torch.ops.eagle_C.linear_grain_set_bytes(before)


@pytest.mark.skipif(not cpu_packed.bf16_panel_linear_available(), reason="needs AVX512-BF16 (bf16 panels)")
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_bfloat16_panels_give_the_same_bits_under_every_split(two_threads, rows):
    w = cpu_packed.bf16_panels(randn(1536, 256, seed=7, dtype=torch.bfloat16))
    x, b = randn(rows, 256, seed=8, dtype=torch.bfloat16), randn(1536, seed=9, dtype=torch.bfloat16)
    outs = _results_under_every_split(lambda x: torch.ops.eagle_C.panel_linear_bf16(x, w, b), x)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
