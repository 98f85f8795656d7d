"""The CPU ops' block cache (csrc/cpu/tensor_pool.cpp): results do not depend on it, what it keeps is
bounded and dropped when it is switched off, and requests past its largest block still work."""

from __future__ import annotations

import pytest
import torch

import eagle_kernels  # noqa: F401  (loads the extension's ops)

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.eagle_C, "tensor_pool_set_enabled"), reason="the compiled extension is not loaded"
)


@pytest.fixture
def pool_on():
    before = torch.ops.eagle_C.tensor_pool_set_enabled(True)
    yield
    torch.ops.eagle_C.tensor_pool_set_enabled(before)


def _attention_case(T=12, prefix=700, D=64, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, prefix + T, D, generator=gen).to(dtype)
    v = torch.randn(1, 2, prefix + T, D, generator=gen).to(dtype)
    q = torch.randn(1, T, 4, D, generator=gen).to(dtype)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None]
    mask[0, 5, 1:5] = False  # a branch: row 5 sees the root and itself
    return q, k, v, torch.tensor([prefix], dtype=torch.int32), mask


def test_results_do_not_depend_on_the_pool(pool_on):
    args = _attention_case()
    x = torch.randn(9, 256, dtype=torch.float32)
    w = torch.rand(256) + 0.5
    outs = {}
    for on in (True, False, True):
        torch.ops.eagle_C.tensor_pool_set_enabled(on)
        got = (torch.ops.eagle_C.tree_attention(*args, 0.125), torch.ops.eagle_C.rms_norm(x, w, 1e-5))
        for name, t in zip(("attention", "rms_norm"), got):
            if name in outs:
                assert torch.equal(t, outs[name]), f"{name} changed with the pool {'on' if on else 'off'}"
            outs[name] = t.clone()


def test_pooled_tensors_are_reused_and_dropped_when_switched_off(pool_on):
    x = torch.randn(64, 512)
    w = torch.ones(512)
    for _ in range(3):
        out = torch.ops.eagle_C.rms_norm(x, w, 1e-5)
        ptr = out.data_ptr()
        del out  # back to the cache ...
        again = torch.ops.eagle_C.rms_norm(x, w, 1e-5)
        assert again.data_ptr() == ptr, "the freed block should be handed out again"
        del again
    assert torch.ops.eagle_C.tensor_pool_cached_bytes() > 0
    assert torch.ops.eagle_C.tensor_pool_cached_bytes() <= 64 << 20
    torch.ops.eagle_C.tensor_pool_set_enabled(False)
    assert torch.ops.eagle_C.tensor_pool_cached_bytes() == 0


def test_a_tensor_freed_after_the_pool_is_switched_off_is_freed(pool_on):
    out = torch.ops.eagle_C.rms_norm(torch.randn(8, 64), torch.ones(64), 1e-5)
    torch.ops.eagle_C.tensor_pool_set_enabled(False)
    del out  # must go to the heap, not into a cache that is off
    assert torch.ops.eagle_C.tensor_pool_cached_bytes() == 0


def test_requests_past_the_largest_block(pool_on):
    x = torch.randn(5000, 1024)  # a 20 MB result: ATen's allocator
    out = torch.ops.eagle_C.rms_norm(x, torch.ones(1024), 1e-5)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.resize_(10)  # ATen's own tensors stay resizable
