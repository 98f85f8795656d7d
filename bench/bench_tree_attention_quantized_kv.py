"""tree_attention over an 8-bit KV cache (fp8 e4m3 / e5m2, int8, per-kv-head scales) against the same
call over a cache in q's dtype, per backend, in one run.

    pytest bench/bench_tree_attention_quantized_kv.py --benchmark-only --benchmark-group-by=param:shape,param:backend

tree_attention's shapes (``bench_tree_attention.py``: on CPU a small model's decode-loop shapes with
float32 queries, on CUDA Llama-8B-like heads, prefix 2048, a 64-token tree at B 1 / 8 / 32 with
bfloat16 queries). The ``same`` cache (q's dtype) is the baseline: an 8-bit call's time over it is what
the smaller cache saves (on CUDA the Triton kernel reads half the bytes of bfloat16 and converts each
tile) or costs (on CPU the C++ kernel converts each block of keys into q's dtype as it reads it).
extra_info holds GB/s for the bytes the call must read (8-bit keys and values), the CPU threads and,
on CUDA, ``kernel_us`` and its roofline fraction.
"""

from __future__ import annotations

import pytest
import torch

import eagle_kernels
from bench.bench_tree_attention import CPU_SHAPES, CUDA_SHAPES, make_inputs, shapes_for
from bench.utils import check_against_reference, record_bandwidth, record_kernel_time, synchronized
from eagle_kernels._backend import available_backends

KV_FORMATS = {
    "same": None,
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}


def quantized(cache: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cache`` ``[B, Hkv, S, D]`` stored in ``dtype`` with one scale per kv head (its largest
    magnitude over the format's), and the scales (float32 ``[Hkv]``)."""
    top = 127.0 if dtype == torch.int8 else torch.finfo(dtype).max
    amax = cache.float().abs().amax(dim=(0, 2, 3)).clamp_min(1e-6)
    scale = amax / top
    stored = cache.float() / scale.view(1, -1, 1, 1)
    if dtype == torch.int8:
        stored = stored.round().clamp(-127, 127)
    return stored.to(dtype), scale


def bytes_read(shape, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> int:
    """The queries, the keys and values of the prefix and the new tokens, and the output."""
    B, T, Hq, Hkv, D, prefix, _ = shape
    return 2 * B * Hkv * (prefix + T) * D * kv_dtype.itemsize + 2 * B * T * Hq * D * q_dtype.itemsize


@pytest.mark.parametrize("shape", list(CPU_SHAPES) + list(CUDA_SHAPES))
@pytest.mark.parametrize("kv", list(KV_FORMATS))
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_tree_attention_quantized_kv(benchmark, bench_device, shape, kv, backend):
    shapes = shapes_for(bench_device)
    if shape not in shapes:
        pytest.skip(f"{shape} is benchmarked on {'CPU' if bench_device.type == 'cuda' else 'CUDA'} only")
    if backend not in available_backends("tree_attention", bench_device):
        pytest.skip(f"{backend} not available on {bench_device.type}")
    if backend == "triton" and bench_device.type == "cpu":
        pytest.skip("the Triton interpreter on CPU is not a benchmark")
    if backend == "torch" and bench_device.type == "cuda":
        pytest.skip("the reference on CUDA is not a path anyone runs")
    dtype = torch.bfloat16 if bench_device.type == "cuda" else torch.float32
    q, k, v, seqlens, mask = make_inputs(shapes[shape], bench_device, dtype)
    scales = {}
    if KV_FORMATS[kv] is not None:
        (k, k_scale), (v, v_scale) = quantized(k, KV_FORMATS[kv]), quantized(v, KV_FORMATS[kv])
        scales = dict(k_scale=k_scale, v_scale=v_scale)
    call = lambda: eagle_kernels.tree_attention(q, k, v, seqlens, mask, **scales)  # noqa: E731
    check_against_reference(call, backend)
    moved = bytes_read(shapes[shape], dtype, k.dtype)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    with eagle_kernels.use_backend(backend):
        benchmark(synchronized(call, bench_device))
        record_bandwidth(benchmark, moved, bench_device)
        record_kernel_time(benchmark, call, moved, bench_device)
