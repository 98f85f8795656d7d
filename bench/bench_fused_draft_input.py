"""fused_draft_input / fused_eagle3_input against the unfused gather + cat + linear.

CPU (the C++ op is the default there):
    OMP_NUM_THREADS=1 pytest bench/bench_fused_draft_input.py --benchmark-only \
        --benchmark-group-by=param:shape,param:dtype --benchmark-columns=min,median,rounds
CUDA (Triton is the default there; TFLOP/s and GB/s land in each benchmark's extra_info):
    pytest bench/bench_fused_draft_input.py --benchmark-only --benchmark-json=bench/results/fused_draft_input_gpu.json

Implementations timed per shape:
* ``unfused``     - ``F.linear(torch.cat([embed[ids], hidden], -1), W, b)``: what the op replaces (baseline);
* ``split_addmm`` - (CPU) the torch alternative without the concat: ``addmm(b, embed.index_select(ids),
  W[:, :H].T)`` then ``addmm_(hidden, W[:, H:].T)``, measured to choose the CPU default;
* ``ext_op``      - (CPU) the C++ op called directly (kernel cost, no Python validation or dispatch);
* ``default``     - ``eagle_kernels.fused_draft_input`` as users call it (validation + dispatch + kernel).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import eagle_kernels
from bench.utils import synchronized
from eagle_kernels import fused_draft_input, fused_eagle3_input
from eagle_kernels._backend import available_backends

CPU_SHAPES = {  # name: (H, V)
    "H256-V4096": (256, 4096),
    "H1024-V32000": (1024, 32000),
}
GPU_SHAPES = {
    "H1024-V32000": (1024, 32000),
    "H4096-V32000": (4096, 32000),  # Llama-2-7B / Vicuna-7B heads
    "H8192-V128256": (8192, 128256),  # Llama-3-70B heads
}
ROWS_CPU = (1, 16, 64, 512)
ROWS_GPU = (1, 16, 64, 512, 4096)


def unfused(hidden, ids, embed, w, b):
    return F.linear(torch.cat([embed[ids], hidden], dim=-1), w, b)


def split_addmm(hidden, ids, embed, w, b):
    H = hidden.shape[-1]
    out = torch.addmm(b, embed.index_select(0, ids), w[:, :H].T)
    return out.addmm_(hidden, w[:, H:].T)


def ext_op(hidden, ids, embed, w, b):
    out = hidden.new_empty(hidden.shape[0], w.shape[0])
    torch.ops.eagle_C.fused_draft_input(hidden, ids, embed, w, b, out)
    return out


def unfused_eagle3(h_low, h_mid, h_high, w, b):
    return F.linear(torch.cat([h_low, h_mid, h_high], dim=-1), w, b)


def make_inputs(N, H, V, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(device, dtype)
    ids = torch.randint(0, V, (N,), generator=gen).to(device)
    embed = torch.randn(V, H, generator=gen).to(device, dtype)
    w = (torch.randn(H, 2 * H, generator=gen) / (2 * H) ** 0.5).to(device, dtype)
    b = torch.randn(H, generator=gen).to(device, dtype)
    return hidden, ids, embed, w, b


def record_throughput(benchmark, N: int, K: int, H: int, element_size: int) -> None:
    """TFLOP/s of the projection and GB/s of its compulsory traffic (W, A rows, out), in extra_info."""
    flops = 2 * N * K * H
    moved = (H * K + N * K + N * H) * element_size
    benchmark.extra_info.update(flops=flops, bytes_moved=moved)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        t = stats.stats.min
        benchmark.extra_info.update({"TFLOP/s": flops / t / 1e12, "GB/s": moved / t / 1e9})


def _impl(name: str, device: torch.device):
    if device.type == "cuda" and name in ("split_addmm", "ext_op"):
        pytest.skip(f"{name} is a CPU-only candidate")
    if name == "ext_op" and "cpp" not in available_backends("fused_draft_input", device):
        pytest.skip("the C++ extension does not provide fused_draft_input")
    return {"unfused": unfused, "split_addmm": split_addmm, "ext_op": ext_op, "default": fused_draft_input}[
        name
    ]


def _shapes(device):
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


@pytest.mark.parametrize("impl", ["unfused", "split_addmm", "ext_op", "default"])
@pytest.mark.parametrize("N", sorted(set(ROWS_CPU) | set(ROWS_GPU)))
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("shape", sorted(set(CPU_SHAPES) | set(GPU_SHAPES)))
def test_fused_draft_input(benchmark, bench_device, shape, dtype, N, impl):
    if shape not in _shapes(bench_device) or N not in (ROWS_GPU if bench_device.type == "cuda" else ROWS_CPU):
        pytest.skip(f"{shape}, N={N} is not benchmarked on {bench_device.type}")
    if bench_device.type == "cuda" and dtype == torch.float32:
        pytest.skip("fp32 on CUDA is exact-ieee Triton vs cuBLAS fp32; the decode case is bf16/fp16")
    fn = _impl(impl, bench_device)
    H, V = _shapes(bench_device)[shape]
    args = make_inputs(N, H, V, dtype, bench_device)
    run = synchronized(lambda: fn(*args), bench_device)
    run()  # compile (Triton) / warm caches outside the timing
    benchmark(run)
    record_throughput(benchmark, N, 2 * H, H, args[0].element_size())


@pytest.mark.parametrize("impl", ["unfused", "default"])
@pytest.mark.parametrize("N", [1, 64, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_eagle3_input(benchmark, bench_device, dtype, N, impl):
    H = 4096 if bench_device.type == "cuda" else 1024
    if bench_device.type == "cuda" and dtype == torch.float32:
        pytest.skip("bf16 only on CUDA")
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(N, H, generator=gen).to(bench_device, dtype) for _ in range(3)]
    w = (torch.randn(H, 3 * H, generator=gen) / (3 * H) ** 0.5).to(bench_device, dtype)
    fn = unfused_eagle3 if impl == "unfused" else fused_eagle3_input
    run = synchronized(lambda: fn(*feats, w, None), bench_device)
    run()
    benchmark(run)
    record_throughput(benchmark, N, 3 * H, H, feats[0].element_size())


def test_default_backend_is_reported(bench_device):
    """The benchmarked ``default`` is what backend_info/select_backend report for this device."""
    chosen = eagle_kernels.select_backend("fused_draft_input", bench_device)
    cpu_default = "cpp" if "cpp" in available_backends("fused_draft_input", bench_device) else "torch"
    assert chosen == ("triton" if bench_device.type == "cuda" else cpu_default), chosen
    assert eagle_kernels.backend_info()["cpu_backend"]["fused_draft_input"] == cpu_default
