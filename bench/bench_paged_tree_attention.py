"""paged_tree_attention against tree_attention on the same keys and values, per backend.

    pytest bench/bench_paged_tree_attention.py --benchmark-only --benchmark-group-by=param:shape,param:backend

tree_attention's shapes (``bench_tree_attention.py``: on CPU a small model's decode-loop shapes, on
CUDA Llama-8B-like heads, prefix 2048, a 64-token tree at B 1 / 8 / 32), with the cache scattered
into a shuffled block pool of 16-position pages (vLLM's default on GPUs), 128-position pages (the C++
kernel's block of keys: read in place) or 1-position pages (SGLang's token pool), each
stored token-major (``nhd``: ``[num_blocks, page, Hkv, D]``, a head's rows between the other heads') or
head-major (``hnd``: ``[num_blocks, Hkv, page, D]`` seen transposed, a head's rows adjacent). The ``contiguous`` case is the baseline in the same run: the paged call's time over it is
the cost of the block table (on CPU, of gathering the pages into a contiguous copy; on CUDA, of the
Triton kernel's per-tile block lookups). extra_info holds GB/s and, on CUDA, ``kernel_us`` and its
roofline fraction, for the bytes the attention must read (as bench_tree_attention.py counts them).
"""

from __future__ import annotations

import pytest
import torch

import eagle_kernels
from bench.bench_tree_attention import CPU_SHAPES, CUDA_SHAPES, bytes_moved, make_inputs, shapes_for
from bench.utils import check_against_reference, record_bandwidth, record_kernel_time, synchronized
from eagle_kernels._backend import available_backends

PAGES = {"page16": 16, "page128": 128, "page1": 1}


def paged_inputs(k: torch.Tensor, v: torch.Tensor, page: int, seed: int = 0, layout: str = "nhd"):
    """``k``, ``v`` ``[B, Hkv, S, D]`` scattered into shuffled pools ``[num_blocks, page, Hkv, D]``
    (stored so for ``nhd``, vLLM's layout; for ``hnd`` stored ``[num_blocks, Hkv, page, D]`` and
    returned as transposed views), with the block table ``[B, ceil(S / page)]``."""
    B, Hkv, S, D = k.shape
    per_seq = -(-S // page)
    gen = torch.Generator().manual_seed(seed)
    table = torch.randperm(B * per_seq, generator=gen).view(B, per_seq).to(torch.int32).to(k.device)
    pools = []
    for cache in (k, v):
        padded = torch.zeros(B, Hkv, per_seq * page, D, dtype=cache.dtype, device=cache.device)
        padded[:, :, :S] = cache
        pool = torch.empty(B * per_seq, page, Hkv, D, dtype=cache.dtype, device=cache.device)
        pool[table.long().flatten()] = (
            padded.view(B, Hkv, per_seq, page, D).permute(0, 2, 3, 1, 4).flatten(0, 1)
        )
        pools.append(pool.transpose(1, 2).contiguous().transpose(1, 2) if layout == "hnd" else pool)
    return pools[0], pools[1], table


@pytest.mark.parametrize("shape", list(CPU_SHAPES) + list(CUDA_SHAPES))
@pytest.mark.parametrize("page", list(PAGES))
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "nhd", "hnd"])
def test_paged_tree_attention(benchmark, bench_device, shape, page, backend, layout):
    shapes = shapes_for(bench_device)
    if shape not in shapes:
        pytest.skip(f"{shape} is benchmarked on {'CPU' if bench_device.type == 'cuda' else 'CUDA'} only")
    if backend not in available_backends("paged_tree_attention", bench_device):
        pytest.skip(f"{backend} not available on {bench_device.type}")
    if backend == "triton" and bench_device.type == "cpu":
        pytest.skip("the Triton interpreter on CPU is not a benchmark")
    if backend == "torch" and bench_device.type == "cuda":
        pytest.skip("the reference on CUDA is not a path anyone runs")
    if layout == "contiguous" and page != "page16":
        pytest.skip("the contiguous baseline has no page size (measured once, under page16)")
    dtype = torch.bfloat16 if bench_device.type == "cuda" else torch.float32
    q, k, v, seqlens, mask = make_inputs(shapes[shape], bench_device, dtype)
    if layout == "contiguous":
        call = lambda: eagle_kernels.tree_attention(q, k, v, seqlens, mask)  # noqa: E731
    else:
        k_pool, v_pool, table = paged_inputs(k, v, PAGES[page], layout=layout)
        call = lambda: eagle_kernels.paged_tree_attention(q, k_pool, v_pool, table, seqlens, mask)  # noqa: E731
        want = eagle_kernels.tree_attention(q, k, v, seqlens, mask)
        got = check_against_reference(call, backend)[0]
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    moved = bytes_moved(shapes[shape], dtype)
    with eagle_kernels.use_backend(backend):
        benchmark(synchronized(call, bench_device))
        record_bandwidth(benchmark, moved, bench_device)
        record_kernel_time(benchmark, call, moved, bench_device)
