"""compact_kv_cache: C++ (CPU) / CUDA / Triton vs the PyTorch reference.

pytest bench/bench_compact_kv_cache.py --benchmark-only --benchmark-group-by=param

extra_info: GB/s and the HBM roofline fraction of the moved rows (read + write) for the eager time
(pytest-benchmark's, one synchronize per call) and, on CUDA, for the kernel-only time (``kernel_us``:
CUDA-graph replays, L2 flushed, ``bench/utils.py``).
"""

from __future__ import annotations

import pytest
import torch

import eagle_kernels
from bench.utils import check_against_reference, record_bandwidth, record_kernel_time, synchronized
from eagle_kernels._backend import available_backends

# (layers, B, Hkv, D, tree slots n, accepted steps)
SHAPES = {
    "tiny-code-B1": (12, 1, 4, 64, 60, 7),
    "tiny-code-B16": (12, 16, 4, 64, 60, 7),
    "llama7b-B8": (32, 8, 32, 128, 64, 7),
}


def make_inputs(shape, device, dtype):
    L, B, H, D, n, steps = shape
    S = 256 + n
    kv = torch.randn(L, 2, B, H, S, D, device=device, dtype=dtype)
    seqlens = torch.full((B,), 200, dtype=torch.int32, device=device)
    slots = torch.stack([torch.randperm(n - 1)[: steps - 1].sort().values + 1 for _ in range(B)])
    accept_index = torch.cat([torch.zeros(B, 1, dtype=torch.long), slots], 1) + torch.arange(B)[:, None] * n
    accept_num = torch.full((B,), steps - 1, dtype=torch.int32)
    return kv, seqlens, accept_index.to(device), accept_num.to(device)


def backends(device):
    names = [
        b
        for b in available_backends("compact_kv_cache", device)
        if not (b == "triton" and device.type == "cpu")
    ]
    return names


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda", "triton"])
def test_compact_kv_cache(benchmark, bench_device, shape, backend):
    if backend not in backends(bench_device):
        pytest.skip(f"{backend} not available on {bench_device.type}")
    if SHAPES[shape][0] == 32 and bench_device.type == "cpu" and backend == "torch":
        pytest.skip("llama7b shape with the reference on CPU is too slow to be useful")
    dtype = torch.float16 if bench_device.type == "cuda" else torch.float32
    kv, seqlens, idx, num = make_inputs(SHAPES[shape], bench_device, dtype)
    n = SHAPES[shape][4]
    call = lambda: eagle_kernels.compact_kv_cache(kv, seqlens, idx, num, num_draft_tokens=n)  # noqa: E731
    L, B, H, D, _, steps = SHAPES[shape]
    moved = 2 * L * 2 * B * H * (steps - 1) * D * kv.element_size()  # read + write of each moved row
    if not (SHAPES[shape][0] == 32 and bench_device.type == "cpu"):  # (4 copies of a 2.7 GB cache)
        original = kv.clone()

        def compacted():  # (the cache is compacted in place: a copy of it, then the new lengths)
            lens = call()
            return kv.clone(), lens

        check_against_reference(compacted, backend, reset=lambda: kv.copy_(original))
    with eagle_kernels.use_backend(backend):
        benchmark(synchronized(call, bench_device))
        record_bandwidth(benchmark, moved, bench_device)
        record_kernel_time(benchmark, call, moved, bench_device)
