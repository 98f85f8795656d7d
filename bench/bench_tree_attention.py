"""tree_attention: the CPU path (C++) and Triton vs the PyTorch reference and PyTorch SDPA.

    pytest bench/bench_tree_attention.py --benchmark-only --benchmark-group-by=param:shape

On CPU: decode-loop shapes of a small model (B 1..16, 8 query / 4 kv heads of 64, prefix up to 1k;
T = 1 decode, a 60-token EAGLE-2 tree, a 128-token prefill), backends torch (the reference), cpp and
sdpa. On CUDA: Llama-8B-like heads (32 query / 8 kv heads of 128), prefix 2048, a 64-token tree,
B in {1, 8, 32}, backends triton, sdpa and torch; extra_info holds GB/s and the HBM roofline time
(goal: triton >= 70% of roofline). The pytest-benchmark time is the eager per-call cost a user pays
(Python dispatch, launches and a synchronize); on CUDA extra_info also holds ``kernel_us``, the GPU
time alone (the call captured in a CUDA graph, replays timed by ``triton.testing.do_bench`` with the L2
cache flushed in between), and ``kernel_fraction_of_roofline`` from it. The SDPA peer gets its explicit boolean mask [B, 1, T, L] built
outside the timed call (as a model would build it once per step for all layers), and the keys
sliced to the longest sequence: a comparison that favours it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import eagle_kernels
from bench.utils import check_against_reference, record_bandwidth, roofline_seconds, synchronized
from eagle_kernels import pack_tree_mask
from eagle_kernels._backend import available_backends
from eagle_kernels.tree_attention import _visible_keys

# name: (B, T, Hq, Hkv, D, prefix, mask) with mask in {"causal", "tree"}
CPU_SHAPES = {
    "decode-B1": (1, 1, 8, 4, 64, 1000, "causal"),
    "decode-B16": (16, 1, 8, 4, 64, 1000, "causal"),
    "tree60-B1": (1, 60, 8, 4, 64, 1000, "tree"),
    "tree16-B16": (16, 16, 8, 4, 64, 500, "tree"),
    "prefill128-B1": (1, 128, 8, 4, 64, 0, "causal"),
    # the bundled tiny-code target's heads (4 query / 2 kv of 64): the trees its CPU rounds verify
    "tiny-tree6-B1": (1, 6, 4, 2, 64, 200, "tree"),
    "tiny-tree12-B1": (1, 12, 4, 2, 64, 200, "tree"),
}
CUDA_SHAPES = {f"tree64-B{B}-P2048": (B, 64, 32, 8, 128, 2048, "tree") for B in (1, 8, 32)}


def chain_tree_masks(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Random trees (parent < child), as EAGLE-2 produces: token i sees itself and its ancestors."""
    parents = [[-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, T)] for _ in range(B)]
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b, plist in enumerate(parents):
        for i, p in enumerate(plist):
            mask[b, i, i] = True
            if p >= 0:
                mask[b, i] |= mask[b, p]
    return mask


def make_inputs(shape, device, dtype):
    B, T, Hq, Hkv, D, prefix, kind = shape
    gen = torch.Generator().manual_seed(0)
    S = prefix + T + 16
    kv = torch.randn(2, 2, B, Hkv, S, D, generator=gen).to(device=device, dtype=dtype)
    q = torch.randn(B, T, Hq, D, generator=gen).to(device=device, dtype=dtype)
    seqlens = torch.full((B,), prefix, dtype=torch.int32, device=device)
    mask = None if kind == "causal" else pack_tree_mask(chain_tree_masks(B, T, gen), "i32").to(device)
    return q, kv[1, 0], kv[1, 1], seqlens, mask


def bytes_moved(shape, dtype) -> int:
    B, T, Hq, Hkv, D, prefix, _ = shape
    elem = torch.empty(0, dtype=dtype).element_size()
    return (2 * B * Hkv * (prefix + T) * D + 2 * B * T * Hq * D) * elem


def sdpa_peer(q, k, v, seqlens, mask):
    """PyTorch SDPA with an explicit boolean mask over keys 0..L-1 (L = longest sequence + T)."""
    T = q.shape[1]
    L = k.shape[2] if q.device.type == "cuda" else int(seqlens.max()) + T
    visible = _visible_keys(seqlens, mask, T, L)[:, None]
    k, v = k[:, :, :L], v[:, :, :L]
    qt = q.transpose(1, 2)
    return lambda: F.scaled_dot_product_attention(qt, k, v, attn_mask=visible, enable_gqa=True)


def shapes_for(device: torch.device):
    return CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES


@pytest.mark.parametrize("shape", list(CPU_SHAPES) + list(CUDA_SHAPES))
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "sdpa"])
def test_tree_attention(benchmark, bench_device, shape, backend):
    shapes = shapes_for(bench_device)
    if shape not in shapes:
        pytest.skip(f"{shape} is benchmarked on {'CPU' if bench_device.type == 'cuda' else 'CUDA'} only")
    if backend not in ("sdpa", *available_backends("tree_attention", bench_device)):
        pytest.skip(f"{backend} not available on {bench_device.type}")
    if backend == "triton" and bench_device.type == "cpu":
        pytest.skip("the Triton interpreter on CPU is not a benchmark")
    dtype = torch.bfloat16 if bench_device.type == "cuda" else torch.float32
    q, k, v, seqlens, mask = make_inputs(shapes[shape], bench_device, dtype)
    if backend == "sdpa":
        call, selected = sdpa_peer(q, k, v, seqlens, mask), contextlib.nullcontext()
    else:
        call = lambda: eagle_kernels.tree_attention(q, k, v, seqlens, mask)
        selected = eagle_kernels.use_backend(backend)
        check_against_reference(call, backend)
    moved = bytes_moved(shapes[shape], dtype)
    with selected:
        benchmark(synchronized(call, bench_device))
        record_bandwidth(benchmark, moved, bench_device)
        if bench_device.type == "cuda" and not getattr(benchmark, "disabled", False):
            record_kernel_time(benchmark, call, moved, bench_device)


def _cpu_variant_runs(variant: str) -> bool:
    """Whether the C++ kernel runs as ``variant`` under the current EAGLE_KERNELS_CPU_ISA."""
    from eagle_kernels import _ext

    if not _ext.has_op("tree_attention"):
        return False
    try:
        return torch.ops.eagle_C.tree_attention_cpu_variant() == variant
    except RuntimeError:  # a variant this CPU cannot run
        return False


CPU_VARIANT_SHAPES = ["decode-B1", "tiny-tree12-B1", "tree60-B1"]


@pytest.mark.parametrize("shape", CPU_VARIANT_SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["amx", "amx_fma_pv", "avx512bf16", "avx512", "avx2", "generic"])
def test_tree_attention_cpu_variants(benchmark, bench_device, monkeypatch, shape, dtype, variant):
    """The C++ kernel's instruction-set variants side by side in one process (same build, same
    inputs): ``amx`` is ``avx512`` with the scores and P @ V of bfloat16 caches on AMX tiles,
    ``amx_fma_pv`` the same with P @ V in float32 FMAs (``EAGLE_CPU_AMX_PV=0``), ``avx512bf16``
    ``avx512`` with the scores of bfloat16 caches by VDPBF16PS (CPUs with AVX512-BF16, no AMX).

        pytest bench/bench_tree_attention.py -k cpu_variants --benchmark-only --benchmark-group-by=param:shape,param:dtype
    """
    if bench_device.type != "cpu":
        pytest.skip("the C++ variants are CPU kernels")
    isa = "amx" if variant.startswith("amx") else variant
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", isa)
    monkeypatch.setenv("EAGLE_CPU_AMX_PV", "0" if variant == "amx_fma_pv" else "1")
    if not _cpu_variant_runs(isa):
        pytest.skip(f"variant {variant} cannot run on this CPU (or no extension)")
    q, k, v, seqlens, mask = make_inputs(CPU_SHAPES[shape], bench_device, getattr(torch, dtype))
    call = lambda: torch.ops.eagle_C.tree_attention(q, k, v, seqlens, mask, q.shape[-1] ** -0.5)
    benchmark(call)
    record_bandwidth(benchmark, bytes_moved(CPU_SHAPES[shape], getattr(torch, dtype)), bench_device)


def record_kernel_time(benchmark, call: Callable[[], object], moved: float, device: torch.device) -> None:
    """Put the GPU-only time (``kernel_us``) and its fraction of the HBM roofline into extra_info; a
    call that cannot be captured in a CUDA graph is reported there instead of failing the benchmark."""
    try:
        kernel_s = cuda_kernel_seconds(call)
    except RuntimeError as err:
        benchmark.extra_info["kernel_us_error"] = str(err)[:300]
        return
    benchmark.extra_info["kernel_us"] = kernel_s * 1e6
    roof = roofline_seconds(moved, device)
    if roof is not None:
        benchmark.extra_info["kernel_fraction_of_roofline"] = roof / kernel_s


def cuda_kernel_seconds(fn: Callable[[], object], *, rep_ms: int = 40) -> float:
    """Median GPU time of the kernels ``fn`` launches, without Python or graph-launch overhead:
    :func:`bench.utils.measure_cuda_kernel_time` (calls captured back to back in one CUDA graph, the
    L2 cache flushed before each call and the flushes' own time subtracted, so a batch-1 cache that
    fits in L2 is still read from HBM; replays sized to about ``rep_ms`` in all). ``fn`` must already
    have run once (compiled) and must not synchronise. Raises RuntimeError when the call cannot be
    captured."""
    from bench.utils import measure_cuda_kernel_time

    replays = 15
    timing = measure_cuda_kernel_time(fn, target_ms=max(0.5, rep_ms / replays), replays=replays)
    if timing.method != "cuda_graph":  # the fallback counts launch overhead: not a kernel time
        raise RuntimeError(f"no kernel-only time: {timing.note}")
    return timing.us * 1e-6
