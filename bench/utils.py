"""Shared helpers for benchmarks: synchronised timing targets, kernel-only CUDA timing, roofline
figures, result metadata.

Two times are recorded for every CUDA benchmark:

* **eager** (pytest-benchmark's own timing of :func:`synchronized` calls): what a caller pays per
  call from Python -- argument checks, dispatch, allocation, launches, and one synchronize;
* **kernel** (:func:`cuda_kernel_time_us`): the GPU time alone. The call is captured ``k`` times
  into a CUDA graph and the graph's replays are timed with CUDA events, so neither Python nor
  launch latency is counted. The L2 cache is flushed before every captured call and the time of an
  identical graph of flushes alone is subtracted, so operands that would fit in L2 are still read
  from HBM. By default the flush reads a ``2 x L2`` buffer (a max-reduction, ``EAGLE_BENCH_L2_FLUSH=read``):
  the timed call starts with clean L2 lines, as in a decoding step whose L2 holds mostly weights it
  read. ``EAGLE_BENCH_L2_FLUSH=write`` flushes with a memset instead (the timer of the GPU figures
  before 2026-11-27): the timed call then writes the memset's dirty lines back to HBM while it runs,
  which cost every kernel 6-8 us on an H100 (bench/results/gpu_2026-11-26e_NVIDIA-H100.md).
  Calls that cannot be captured (a host sync, an allocation pattern the graph pool refuses) fall back to
  ``triton.testing.do_bench`` on the plain call, which includes launch overhead; the method used is
  recorded next to the time.

:func:`record_kernel_time` puts both into the benchmark's ``extra_info`` with GB/s, TFLOP/s (when
given FLOPs) and the fraction of the roofline time ``max(bytes / HBM bandwidth, FLOPs / peak)``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from eagle_kernels import _ext

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class GpuPeaks:
    """Data-sheet peaks of one card: HBM bytes/s and dense TFLOP/s per dtype ("fp32" is the CUDA-core
    FMA peak, what an fp32 matmul without TF32 can reach)."""

    hbm_bytes_per_s: float
    tflops: dict


# First match on torch.cuda.get_device_name() wins, so the specific variants come first.
GPU_PEAKS: tuple[tuple[str, GpuPeaks], ...] = (
    ("H100 PCIe", GpuPeaks(2.0e12, {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0})),
    ("H100 NVL", GpuPeaks(3.9e12, {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0})),
    ("H100", GpuPeaks(3.35e12, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0})),
    ("H200 NVL", GpuPeaks(4.8e12, {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0})),
    ("H200", GpuPeaks(4.8e12, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0})),
    ("A100", GpuPeaks(2.0e12, {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5})),
)
# Peak HBM bandwidth (bytes/s) by card family (kept for callers of the original table).
HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def synchronized(fn: Callable, device: torch.device) -> Callable:
    """Wrap ``fn`` so that a pytest-benchmark timing includes the GPU work it launched."""
    if device.type != "cuda":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return out

    return run


def _as_tuple(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def check_against_reference(
    call: Callable[[], object], backend: str, *, reset: Callable[[], None] | None = None
):
    """Run ``call`` once with ``backend`` and once with the PyTorch reference (``torch``) and assert
    the results agree: integer outputs exactly, floating ones within 1e-5 relative (float32) or the
    low-precision tolerance of a rounding of the output (2 ulp of bfloat16 / float16). A benchmark
    times only a backend that computes the op; under ``--benchmark-disable`` (CI's smoke run) this
    is the check that it does. ``reset`` restores in-place inputs before each call. Returns the
    backend's result."""
    import eagle_kernels

    results = []
    for name in ("torch", backend):
        if reset is not None:
            reset()
        with eagle_kernels.use_backend(name):
            results.append(_as_tuple(call()))
    want, got = results
    assert len(got) == len(want), (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = g.detach().cpu(), w.detach().cpu()
        assert g.shape == w.shape and g.dtype == w.dtype, (i, g.shape, w.shape, g.dtype, w.dtype)
        if g.is_floating_point():
            tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(g.dtype, 2 * torch.finfo(g.dtype).eps)
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol, msg=f"{backend} output {i}")
        else:
            assert torch.equal(g, w), f"{backend} output {i} differs from the reference"
    return got


def gpu_peaks(device: torch.device) -> GpuPeaks | None:
    """The data-sheet peaks of ``device``'s card (None for CPU or a card not in :data:`GPU_PEAKS`)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks for key, peaks in GPU_PEAKS if key in name), None)


def roofline_seconds(
    bytes_moved: float, device: torch.device, *, flops: float | None = None, dtype: torch.dtype | None = None
) -> float | None:
    """Lower bound on the time of an op: ``bytes_moved`` at the card's peak HBM bandwidth, or
    ``flops`` at its dense peak for ``dtype`` when that takes longer (None when unknown / CPU)."""
    peaks = gpu_peaks(device)
    if peaks is None:
        return None
    seconds = bytes_moved / peaks.hbm_bytes_per_s
    tflops = peaks.tflops.get(_DTYPE_KEYS.get(dtype, ""), None)
    if flops and tflops:
        seconds = max(seconds, flops / (tflops * 1e12))
    return seconds


def tensor_bytes(*objects) -> int:
    """Bytes of every tensor in ``objects`` (nested tuples / lists / dicts allowed; others ignored)."""
    total = 0
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, (tuple, list)):
            total += tensor_bytes(*obj)
        elif isinstance(obj, dict):
            total += tensor_bytes(*obj.values())
    return total


def record_bandwidth(benchmark, bytes_moved: float, device: torch.device) -> None:
    """Put achieved GB/s and the roofline time into the benchmark's extra_info (printed in JSON)."""
    benchmark.extra_info["bytes_moved"] = bytes_moved
    roof = roofline_seconds(bytes_moved, device)
    if roof is not None:
        benchmark.extra_info["roofline_us"] = roof * 1e6
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        mean = stats.stats.mean
        benchmark.extra_info["GB/s"] = bytes_moved / mean / 1e9
        if roof is not None:
            benchmark.extra_info["fraction_of_roofline"] = roof / mean


# --------------------------------------------------------------------------------------------------
# Kernel-only CUDA timing
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelTime:
    """GPU time per call of a function, and how it was measured."""

    us: float  # median time per call, microseconds
    method: str  # "cuda_graph" (captured calls, event-timed replays) or "do_bench" (fallback)
    calls_per_replay: int  # calls captured in one graph (1 for do_bench)
    replays: int  # timed replays (do_bench: its own repetition count, not reported: -1)
    l2_flushed: bool
    note: str = ""  # why the fallback was used


L2_FLUSH_ENV = "EAGLE_BENCH_L2_FLUSH"
L2_FLUSH_KINDS = ("write", "read")


def l2_flush_kind() -> str:
    """How kernel timings flush L2 between calls: ``read`` (a reduction, the default) or ``write``
    (a memset)."""
    kind = os.environ.get(L2_FLUSH_ENV, "read") or "read"
    if kind not in L2_FLUSH_KINDS:
        raise ValueError(f"{L2_FLUSH_ENV}={kind!r}: expected one of {L2_FLUSH_KINDS}")
    return kind


def _l2_flush_bytes(device: torch.device) -> int:
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    return max(2 * l2, 64 * 2**20)


def _capture(body: Callable[[], None]) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def best_host_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Microseconds per call of ``fn`` on the host: ``repeats`` timings of ``calls`` back-to-back
    calls, the quickest (no warm-up, no device synchronisation: CPU ops and Python overhead)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def _estimate_call_us(fn: Callable[[], object], calls: int = 3) -> float:
    """Eager GPU-side time of a few back-to-back calls (includes launch gaps: an upper bound)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def _graph_kernel_time(
    fn: Callable[[], object], *, flush_l2: bool, target_ms: float, replays: int, max_calls: int
) -> KernelTime:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs recommends
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    calls = int(min(max_calls, max(1, target_ms * 1e3 // max(_estimate_call_us(fn), 1.0))))
    flush = None
    if flush_l2:
        device = torch.device("cuda", torch.cuda.current_device())
        buffer = torch.zeros(_l2_flush_bytes(device) // 4, dtype=torch.int32, device=device)
        if l2_flush_kind() == "read":
            peak = torch.empty((), dtype=torch.int32, device=device)
            flush = lambda: torch.amax(buffer, dim=0, out=peak)  # noqa: E731
        else:
            flush = buffer.zero_

    def body() -> None:
        for _ in range(calls):
            if flush is not None:
                flush()
            fn()

    graph = _capture(body)
    base = _capture(lambda: [flush() for _ in range(calls)]) if flush is not None else None
    graph.replay()  # first replay uploads the graph
    if base is not None:
        base.replay()
    torch.cuda.synchronize()
    per_replay = []
    for _ in range(replays):  # interleaved, so drifts in clock or load hit both graphs alike
        ms = _replay_ms(graph)
        per_replay.append(ms - (_replay_ms(base) if base is not None else 0.0))
    us = max(statistics.median(per_replay), 0.0) * 1e3 / calls
    note = f"L2 flush: {l2_flush_kind()}" if flush_l2 else ""
    return KernelTime(us, "cuda_graph", calls, replays, flush_l2, note)


def measure_cuda_kernel_time(
    fn: Callable[[], object],
    *,
    flush_l2: bool = True,
    target_ms: float = 2.0,
    replays: int = 15,
    max_calls: int = 200,
) -> KernelTime:
    """GPU time per call of ``fn`` (which launches CUDA work on the current stream and must not
    synchronise): ``k`` calls captured in one CUDA graph (``k`` sized so that a replay takes about
    ``target_ms``, at most ``max_calls``), ``replays`` replays timed with CUDA events, median / k.
    With ``flush_l2`` every call is preceded by an L2 flush (:func:`l2_flush_kind`) and the flushes'
    own time is subtracted (a graph of flushes alone, replayed alternately). If capturing fails, falls back
    to ``triton.testing.do_bench(fn)`` (median; includes launch overhead) and says why in ``note``."""
    try:
        return _graph_kernel_time(
            fn, flush_l2=flush_l2, target_ms=target_ms, replays=replays, max_calls=max_calls
        )
    except Exception as err:  # any capture failure means: time it without a graph
        note = f"graph capture failed: {type(err).__name__}: {err}"[:300]
    torch.cuda.synchronize()
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=5, rep=max(10, int(10 * target_ms)), return_mode="median")
    return KernelTime(float(ms) * 1e3, "do_bench", 1, -1, True, note)


def cuda_kernel_time_us(fn: Callable[[], object], **kwargs) -> float:
    """Median GPU time per call of ``fn`` in microseconds; see :func:`measure_cuda_kernel_time`."""
    return measure_cuda_kernel_time(fn, **kwargs).us


def throughput_info(
    prefix: str,
    seconds: float,
    device: torch.device,
    *,
    bytes_moved: float | None = None,
    flops: float | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """``{prefix}_GB/s``, ``{prefix}_TFLOP/s`` and ``{prefix}_fraction_of_roofline`` of one time."""
    info: dict = {}
    if seconds <= 0:
        return info
    if bytes_moved:
        info[f"{prefix}_GB/s"] = bytes_moved / seconds / 1e9
    if flops:
        info[f"{prefix}_TFLOP/s"] = flops / seconds / 1e12
    roof = roofline_seconds(bytes_moved or 0.0, device, flops=flops, dtype=dtype)
    if roof is not None and roof > 0:
        info[f"{prefix}_fraction_of_roofline"] = roof / seconds
    return info


def _eager_median_seconds(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(stats, "stats", None) is None:
        return None
    return stats.stats.median


def record_kernel_time(
    benchmark,
    call: Callable[[], object],
    bytes_moved: float | None,
    device: torch.device,
    *,
    flops: float | None = None,
    dtype: torch.dtype | None = None,
    flush_l2: bool = True,
) -> KernelTime | None:
    """Record, after ``benchmark(...)`` ran, the eager median per-call time (``eager_us``) and on CUDA
    the kernel-only time of ``call`` (``kernel_us``, ``kernel_timer``...), each with GB/s (when
    ``bytes_moved``), TFLOP/s (when ``flops``) and its fraction of the roofline (``roofline_us``).
    ``call`` is the bare call (no synchronize). Nothing is measured under ``--benchmark-disable``;
    a kernel timing that fails is reported as ``kernel_us_error`` instead of failing the benchmark."""
    info = benchmark.extra_info
    if bytes_moved:
        info["bytes_moved"] = bytes_moved
    if flops:
        info["flops"] = flops
    roof = roofline_seconds(bytes_moved or 0.0, device, flops=flops, dtype=dtype)
    if roof:
        info["roofline_us"] = roof * 1e6
    measured = dict(bytes_moved=bytes_moved, flops=flops, dtype=dtype)
    eager = _eager_median_seconds(benchmark)
    if eager is not None:
        info["eager_us"] = eager * 1e6
        info.update(throughput_info("eager", eager, device, **measured))
    if device.type != "cuda" or getattr(benchmark, "disabled", False):
        return None
    try:
        timing = measure_cuda_kernel_time(call, flush_l2=flush_l2)
    except Exception as err:  # a failed timing must not hide the eager result
        info["kernel_us_error"] = f"{type(err).__name__}: {err}"[:300]
        return None
    info.update(
        kernel_us=timing.us,
        kernel_timer=timing.method,
        kernel_calls_per_replay=timing.calls_per_replay,
        kernel_l2_flushed=timing.l2_flushed,
    )
    if timing.note:
        info["kernel_timer_note"] = timing.note
    info.update(throughput_info("kernel", timing.us * 1e-6, device, **measured))
    return timing


# --------------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------------
def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``; None where that is not readable): CPU timings differ
    by far more between CPU models than between runs, so every result file says which one."""
    return _cpuinfo_field("model name")


def cpu_features() -> list[str] | None:
    """The CPU flags this package's CPU kernels choose by (AMX, AVX-512 and its bf16 dot product,
    AVX2, FMA), from ``/proc/cpuinfo``."""
    flags = _cpuinfo_field("flags")
    if flags is None:
        return None
    wanted = ("amx_bf16", "amx_tile", "avx512f", "avx512_bf16", "avx512_vnni", "avx2", "fma")
    have = set(flags.split())
    return [f for f in wanted if f in have]


def _git(*args: str) -> str | None:
    """``git args`` in this repository (not the caller's directory: a script run from elsewhere
    recorded another repository's commit, or none); None without git."""
    try:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout
    except OSError:
        return None


def machine_info() -> dict:
    """Machine, versions, commit (with the tracked files that differ from it: the code as it ran) and
    torch's thread count, stored with every result file."""
    commit = _git("rev-parse", "--short", "HEAD")
    commit = None if commit is None else commit.strip()
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_count": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "uncommitted_tracked_files": None if status is None else [line[3:] for line in status.splitlines()],
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "kernels": _ext.runtime_info(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def device_file_tag(device: torch.device) -> str:
    """``NVIDIA-H200`` for a CUDA device (file-name safe), ``cpu`` otherwise."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.strip()).strip("-")


def save_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return write_json_atomically(RESULTS_DIR / name, {"machine": machine_info(), **payload})


def write_json_atomically(path: Path, payload: dict, default=None) -> Path:
    """Write to a temporary file beside ``path``, then rename it: a process killed mid-write (a time
    box) leaves the previous complete file, never a truncated one. ``default``: as ``json.dumps``'s."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=default))
    os.replace(tmp, path)
    return path
