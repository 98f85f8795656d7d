"""fused_draft_input / fused_eagle3_input against the unfused gather + cat + linear.

CPU (the C++ op is the default there):
    OMP_NUM_THREADS=1 pytest bench/bench_fused_draft_input.py --benchmark-only \
        --benchmark-group-by=param:shape,param:dtype --benchmark-columns=min,median,rounds
CUDA (Triton is the default there):
    pytest bench/bench_fused_draft_input.py --benchmark-only --benchmark-json=bench/results/fused_draft_input_gpu.json
    EAGLE_KERNELS_FDI_TUNING=bench/results/sweep_fused_draft_input_<GPU>.json pytest ...   # with tuned plans

The pytest-benchmark time is the eager per-call cost (one synchronize per call). On CUDA every
benchmark's extra_info also holds ``kernel_us`` (GPU time alone: CUDA-graph replays, L2 flushed,
see ``bench/utils.py``), ``plan`` (the path and tiles the Triton backend chose), and TFLOP/s, GB/s
and the roofline fraction for both the eager and the kernel-only time.

Implementations timed per shape:
* ``unfused``     - ``F.linear(torch.cat([embed[ids], hidden], -1), W, b)``: what the op replaces (baseline);
* ``split_addmm`` - (CPU) the torch alternative without the concat: ``addmm(b, embed.index_select(ids),
  W[:, :H].T)`` then ``addmm_(hidden, W[:, H:].T)``, measured to choose the CPU default;
* ``ext_op``      - (CPU) the C++ op called directly (kernel cost, no Python validation or dispatch);
* ``default``     - ``eagle_kernels.fused_draft_input`` as users call it (validation + dispatch + kernel);
* ``fused`` / ``gather_mm`` - (CUDA, bf16) the public function with that Triton-backend path forced
  (``fused`` with the shape heuristic's tiles), to see both paths at every size.

``test_host_overhead`` (CPU) times the public function's own Python work on the CUDA dispatch path:
the Triton kernel objects are replaced by stubs, so neither the kernel nor Triton's launcher counts.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import eagle_kernels
from bench.utils import record_kernel_time, synchronized
from eagle_kernels import fused_draft_input, fused_eagle3_input
from eagle_kernels._backend import available_backends

fdi = importlib.import_module("eagle_kernels.fused_draft_input")

CPU_SHAPES = {  # name: (H, V)
    "H256-V4096": (256, 4096),
    "H1024-V32000": (1024, 32000),
}
GPU_SHAPES = {
    "H1024-V32000": (1024, 32000),
    "H4096-V32000": (4096, 32000),  # Llama-2-7B / Vicuna-7B heads
    "H8192-V128256": (8192, 128256),  # Llama-3-70B heads
}
GPU_PATH_SHAPES = ("H4096-V32000", "H8192-V128256")  # where the forced paths are timed too
ROWS_CPU = (1, 16, 64, 512)
ROWS_GPU = (1, 16, 64, 512, 4096)
CPU_ONLY_IMPLS = ("split_addmm", "ext_op")
GPU_ONLY_IMPLS = ("fused", "gather_mm")


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


def with_path(fn, path: str):
    """``fn`` with the Triton-backend path forced (``fused`` keeps the heuristic's tiles)."""

    def call(*args):
        with fdi.use_plan(fdi.Plan(path)):
            return fn(*args)

    return call


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


def record_throughput(benchmark, call, device, N: int, K: int, H: int, dtype: torch.dtype) -> None:
    """FLOPs of the projection and its compulsory traffic (W, A rows, out) in extra_info, with
    TFLOP/s and GB/s of the best eager time; on CUDA also the kernel-only time and both roofline
    fractions (bench/utils.py), and the plan the Triton backend chose."""
    element_size = torch.empty((), dtype=dtype).element_size()
    flops = 2 * N * K * H
    moved = (H * K + N * K + N * H) * element_size
    benchmark.extra_info.update(flops=flops, bytes_moved=moved)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        t = stats.stats.min
        benchmark.extra_info.update({"TFLOP/s": flops / t / 1e12, "GB/s": moved / t / 1e9})
    if device.type == "cuda":
        benchmark.extra_info["default_plan"] = fdi.default_plan(N, H, K // H, dtype, device).name
    record_kernel_time(benchmark, call, moved, device, flops=flops, dtype=dtype)


def _impl(name: str, device: torch.device):
    if device.type == "cuda" and name in CPU_ONLY_IMPLS:
        pytest.skip(f"{name} is a CPU-only candidate")
    if device.type != "cuda" and name in GPU_ONLY_IMPLS:
        pytest.skip(f"{name} forces a Triton-backend path (CUDA only)")
    if name == "ext_op" and "cpp" not in available_backends("fused_draft_input", device):
        pytest.skip("the C++ extension does not provide fused_draft_input")
    fns = {"unfused": unfused, "split_addmm": split_addmm, "ext_op": ext_op, "default": fused_draft_input}
    return fns[name] if name in fns else with_path(fused_draft_input, name)


def _shapes(device):
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


@pytest.mark.parametrize("impl", ["unfused", "split_addmm", "ext_op", "default", "fused", "gather_mm"])
@pytest.mark.parametrize("N", sorted(set(ROWS_CPU) | set(ROWS_GPU)))
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("shape", sorted(set(CPU_SHAPES) | set(GPU_SHAPES)))
def test_fused_draft_input(benchmark, bench_device, shape, dtype, N, impl):
    if shape not in _shapes(bench_device) or N not in (ROWS_GPU if bench_device.type == "cuda" else ROWS_CPU):
        pytest.skip(f"{shape}, N={N} is not benchmarked on {bench_device.type}")
    if bench_device.type == "cuda" and dtype != torch.bfloat16:
        pytest.skip("CUDA: bf16 only (fp32 is exact-ieee Triton vs cuBLAS fp32; fp16 timed like bf16 before)")
    if impl in GPU_ONLY_IMPLS and shape not in GPU_PATH_SHAPES:
        pytest.skip(f"forced paths are timed at {GPU_PATH_SHAPES} only")
    fn = _impl(impl, bench_device)
    H, V = _shapes(bench_device)[shape]
    args = make_inputs(N, H, V, dtype, bench_device)
    call = lambda: fn(*args)  # noqa: E731
    run = synchronized(call, bench_device)
    run()  # compile (Triton) / warm caches outside the timing
    benchmark(run)
    record_throughput(benchmark, call, bench_device, N, 2 * H, H, dtype)


@pytest.mark.parametrize("impl", ["unfused", "default", "fused", "gather_mm"])
@pytest.mark.parametrize("N", [1, 64, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_eagle3_input(benchmark, bench_device, dtype, N, impl):
    H = 4096 if bench_device.type == "cuda" else 1024
    if bench_device.type == "cuda" and dtype == torch.float32:
        pytest.skip("bf16 only on CUDA")
    if bench_device.type != "cuda" and impl in GPU_ONLY_IMPLS:
        pytest.skip(f"{impl} forces a Triton-backend path (CUDA only)")
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(N, H, generator=gen).to(bench_device, dtype) for _ in range(3)]
    w = (torch.randn(H, 3 * H, generator=gen) / (3 * H) ** 0.5).to(bench_device, dtype)
    fn = {"unfused": unfused_eagle3, "default": fused_eagle3_input}.get(impl) or with_path(
        fused_eagle3_input, impl
    )
    call = lambda: fn(*feats, w, None)  # noqa: E731
    run = synchronized(call, bench_device)
    run()
    benchmark(run)
    record_throughput(benchmark, call, bench_device, N, 3 * H, H, dtype)


def test_default_backend_is_reported(bench_device):
    """The benchmarked ``default`` is what backend_info/select_backend report for this device."""
    chosen = eagle_kernels.select_backend("fused_draft_input", bench_device)
    cpu_default = "cpp" if "cpp" in available_backends("fused_draft_input", bench_device) else "torch"
    assert chosen == ("triton" if bench_device.type == "cuda" else cpu_default), chosen
    assert eagle_kernels.backend_info()["cpu_backend"]["fused_draft_input"] == cpu_default


# --------------------------------------------------------------------------------------------------
# Host overhead of the public function on the CUDA dispatch path, measured without a GPU
# --------------------------------------------------------------------------------------------------
class _StubKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` only counts calls."""

    def __init__(self):
        self.calls = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.calls += 1


def stub_cuda_dispatch(monkeypatch) -> _StubKernel:
    """Send the public functions down their CUDA code path on CPU tensors: ``select_backend`` sees a
    CUDA device, the CPU-only id range check is off, and the Triton kernels are stubs (the stub of
    the fused GEMM is returned, to check that it ran)."""
    real_select = fdi.select_backend
    stubs = {
        name: _StubKernel()
        for name in ("_fused_segments_linear_kernel", "_splitk_reduce_kernel", "_pack_segments_kernel")
    }
    for name, stub in stubs.items():
        monkeypatch.setattr(fdi, name, stub)
    monkeypatch.setattr(
        fdi, "select_backend", lambda op, device, **kw: real_select(op, torch.device("cuda"), **kw)
    )
    monkeypatch.setattr(fdi, "_check_token_ids_in_range", lambda *a: None)
    return stubs["_fused_segments_linear_kernel"]


@pytest.mark.parametrize("op", ["draft", "eagle3"])
@pytest.mark.parametrize("N", [1, 64])
def test_host_overhead(benchmark, monkeypatch, op, N):
    """The public function's own Python cost per call on the CUDA code path (argument checks,
    dispatch, plan lookup, output allocation, the launch call on a stub): what it adds to Triton's
    launcher and the kernel. fp16, so no interpreter-only workaround runs.

    OMP_NUM_THREADS=1 pytest bench/bench_fused_draft_input.py -k host_overhead --benchmark-only"""
    H, V = 64, 100
    if op == "draft":
        fn, args = fused_draft_input, make_inputs(N, H, V, torch.float16, torch.device("cpu"))
    else:
        feats = [torch.randn(N, H, dtype=torch.float16) for _ in range(3)]
        fn, args = fused_eagle3_input, (*feats, torch.randn(H, 3 * H, dtype=torch.float16), None)
    stub = stub_cuda_dispatch(monkeypatch)
    with torch.no_grad():
        out = benchmark(fn, *args)
    assert stub.calls > 0 and out.shape == (N, H), "the call did not reach the (stubbed) fused kernel"
