"""paged_compact_kv_cache against compact_kv_cache on the same accepted paths, per backend.

    pytest bench/bench_paged_compact_kv_cache.py --benchmark-only --benchmark-group-by=param:shape

compact_kv_cache's shapes (``bench_compact_kv_cache.py``) with the cache scattered into a shuffled
pool of 16-position blocks. The ``contiguous`` case (compact_kv_cache on its fastest backend: C++ on
CPU, CUDA or Triton on a GPU) is the baseline in the same run. extra_info: GB/s of the moved rows
(read + write) and, on CUDA, ``kernel_us`` with its roofline fraction.
"""

from __future__ import annotations

import pytest
import torch

import eagle_kernels
from bench.bench_compact_kv_cache import SHAPES, make_inputs
from bench.utils import check_against_reference, record_bandwidth, record_kernel_time, synchronized
from eagle_kernels._backend import available_backends

PAGE = 16


def paged_pool(kv: torch.Tensor, seed: int = 0):
    """``kv`` ``[L, 2, B, H, S, D]`` scattered into a shuffled pool ``[L, 2, num_blocks, PAGE, H, D]``
    with its block table ``[B, ceil(S / PAGE)]``."""
    L, _, B, H, S, D = kv.shape
    per_seq = -(-S // PAGE)
    gen = torch.Generator().manual_seed(seed)
    table = torch.randperm(B * per_seq, generator=gen).view(B, per_seq)
    padded = torch.zeros(L, 2, B, H, per_seq * PAGE, D, dtype=kv.dtype, device=kv.device)
    padded[..., :S, :] = kv
    pool = torch.empty(L, 2, B * per_seq, PAGE, H, D, dtype=kv.dtype, device=kv.device)
    pages = padded.view(L, 2, B, H, per_seq, PAGE, D).permute(0, 1, 2, 4, 5, 3, 6).flatten(2, 3)
    pool[:, :, table.flatten().to(kv.device)] = pages
    return pool, table.to(torch.int32).to(kv.device)


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_paged_compact_kv_cache(benchmark, bench_device, shape, layout):
    L, B, H, D, n, steps = SHAPES[shape]
    if L == 32 and bench_device.type == "cpu":
        pytest.skip("the llama7b shape's pool on CPU is too slow to set up to be useful")
    dtype = torch.float16 if bench_device.type == "cuda" else torch.float32
    kv, seqlens, idx, num = make_inputs(SHAPES[shape], bench_device, dtype)
    if layout == "contiguous":
        call = lambda: eagle_kernels.compact_kv_cache(kv, seqlens, idx, num, num_draft_tokens=n)  # noqa: E731
        backend = eagle_kernels.select_backend("compact_kv_cache", bench_device)
        target = kv
    else:
        pool, table = paged_pool(kv)
        call = lambda: eagle_kernels.paged_compact_kv_cache(  # noqa: E731
            pool, table, seqlens, idx, num, num_draft_tokens=n
        )
        backend = eagle_kernels.select_backend("paged_compact_kv_cache", bench_device)
        assert backend in available_backends("paged_compact_kv_cache", bench_device)
        target = pool
    original = target.clone()

    def compacted():  # (in place: a copy of the cache, then the new lengths)
        lens = call()
        return target.clone(), lens

    check_against_reference(compacted, backend, reset=lambda: target.copy_(original))
    moved = 2 * L * 2 * B * H * (steps - 1) * D * kv.element_size()  # read + write of each moved row
    with eagle_kernels.use_backend(backend):
        benchmark(synchronized(call, bench_device))
        record_bandwidth(benchmark, moved, bench_device)
        record_kernel_time(benchmark, call, moved, bench_device)
