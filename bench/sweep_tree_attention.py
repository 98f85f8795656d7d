"""Sweep the Triton launch configurations of ``tree_attention`` on one CUDA GPU.

    PYTHONPATH=. python bench/sweep_tree_attention.py            # ~60-90 s on an H100/H200
    python bench/sweep_tree_attention.py --dry-run               # list shapes and configurations only
    python bench/sweep_tree_attention.py --interpret             # tiny shapes on CPU (Triton interpreter)
    python bench/sweep_tree_attention.py --host-overhead         # Python cost per call, launches mocked (CPU)

Shapes: issue 3's goal (Llama-8B-like heads: 32 query / 8 kv heads of 128, bf16, prefix 2048, a
64-token tree, B in {1, 8, 32}) and decode shapes (T = 1 causal at B 1 and 32, a 16-token tree at
B 8). For each shape the default plan (:func:`eagle_kernels.tree_attention.plan_launch`) and a
modest grid of :class:`~eagle_kernels.tree_attention.LaunchConfig` overrides run; each is

* checked against ``tree_attention_ref`` (max abs error; a wrong or failing config is reported and
  skipped, never fatal);
* timed as a kernel: calls captured back to back in a CUDA graph with the L2 flushed before each,
  replays timed with CUDA events, the flushes' time subtracted (``bench.utils.measure_cuda_kernel_time``:
  GPU time without Python or graph-launch overhead; ``EAGLE_BENCH_L2_FLUSH`` picks the flush);
* timed eagerly: ``--eager-calls`` back-to-back launcher calls, one synchronize (per call: what a
  user pays when the GPU is not the bottleneck), and the host time to issue them.

The public ``tree_attention`` (argument checks + default plan) is timed eagerly once per shape, with
and without a synchronize per call, and PyTorch SDPA with an explicit mask as the peer of the goal
shapes. Output: a table per shape, then ``bench/results/sweep_tree_attention_<GPU>.json`` with every
result and, per shape, the best configuration with its fraction of the HBM roofline (bytes / peak
bandwidth) and of the roofline proper (max of the bytes and the bf16 tensor-core FLOP bound).

Compiles dominate a cold run, so ``--jobs`` worker processes compile every distinct kernel variant
first (each launches it once; Triton's on-disk cache then serves the measuring process). A
``--budget-s`` deadline skips (and reports) whatever would start after it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

if "--interpret" in sys.argv or "--host-overhead" in sys.argv:  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.utils import best_host_us, l2_flush_kind  # noqa: E402
from eagle_kernels.tree_attention import (  # noqa: E402
    LaunchConfig,
    LaunchPlan,
    _tree_attention_triton,
    plan_launch,
    tree_attention,
    tree_attention_ref,
)

# Dense bf16 tensor-core peaks (FLOP/s, SXM parts) for the compute side of the roofline.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
DEFAULT_SMS = 132  # an H100/H200, for --dry-run without a GPU


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: q [B, T, Hq, D], cache prefix ``prefix`` (+ T new tokens + 16 spare)."""

    name: str
    B: int
    T: int
    Hq: int
    Hkv: int
    D: int
    prefix: int
    mask: str  # "tree" (int32 bit-packed random tree) or "causal"
    goal: bool = False
    fp32: bool = False  # float32 tensors (exact FMA dots, no tensor cores) instead of bf16 on CUDA

    @property
    def s_max(self) -> int:
        return self.prefix + self.T + 16

    @property
    def rows(self) -> int:
        return self.T * (self.Hq // self.Hkv)

    def bench_tuple(self) -> tuple:
        return (self.B, self.T, self.Hq, self.Hkv, self.D, self.prefix, self.mask)


GPU_SHAPES = [
    *(Shape(f"tree64-B{B}", B, 64, 32, 8, 128, 2048, "tree", goal=True) for B in (1, 8, 32)),
    Shape("decode-B1", 1, 1, 32, 8, 128, 2048, "causal"),
    Shape("decode-B32", 32, 1, 32, 8, 128, 2048, "causal"),
    Shape("tree16-B8", 8, 16, 32, 8, 128, 2048, "tree"),
    # The bundled tiny-code target's heads (4 query / 2 kv of 64) in float32, as its GPU decoding loop
    # runs them: a 64-token verify tree at B 1 and 4 (13 and 88 us per call in a profiled round on an
    # H100, bench/results/gpu_2026-11-26e_NVIDIA-H100.md) and a one-token step.
    *(Shape(f"tiny-fp32-tree64-B{B}", B, 64, 4, 2, 64, 192, "tree", fp32=True) for B in (1, 4)),
    Shape("tiny-fp32-decode-B1", 1, 1, 4, 2, 64, 192, "causal", fp32=True),
]
INTERPRET_SHAPES = [
    Shape("tiny-tree5-B2", 2, 5, 4, 2, 16, 40, "tree", goal=True),
    Shape("tiny-decode-B1", 1, 1, 4, 2, 16, 40, "causal"),
]

# (block_m, block_n, num_warps, num_stages) tiles tried per row count (T * G). Spill-free on sm_90 by
# an ahead-of-time compile with Triton 3.9 (ptxas -v): 64x32/4w, 64x64/8w, 128x32/8w, 128x32/16w;
# 128x64/8w spills 40 bytes (none with a split), 128x128/8w 16, 64x64/4w 64-180, 256-row blocks
# 144+ (one kept to measure it). Every variant fits the 227 KB of shared memory.
TILES_MANY_ROWS = [
    (128, 64, 8, 3),
    (128, 64, 8, 2),
    (128, 32, 8, 3),
    (128, 32, 8, 4),
    (128, 128, 8, 2),
    (128, 32, 16, 3),
    (64, 64, 8, 3),
    (64, 32, 4, 3),
    (256, 32, 16, 3),
]
# Tried first, with and without tensor-descriptor (TMA) loads of the prefix tiles (LaunchConfig.kv_tma):
# the default tile, a 128-key tile with 3 stages (224 KB of shared memory: it just fits), one 256-row
# block per kv head (K/V read once) and a deeper pipeline. On CUDA only where the GPU has TMA (sm_90+).
TILES_TMA = [(128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 16, 2), (128, 64, 8, 4)]
TILES_64_ROWS = [(64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 8, 4), (64, 128, 8, 2), (32, 64, 4, 3)]
TILES_FEW_ROWS = [(16, 64, 4, 3), (16, 128, 4, 3), (16, 64, 4, 4), (16, 64, 2, 3), (16, 32, 4, 4)]
TILES_INTERPRET = [(16, 16, 4, 2), (32, 16, 4, 1)]
# float32: the dots are FMA loops, so smaller row blocks (more programs) share the work across SMs.
TILES_FP32 = [(16, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 2, 2), (128, 32, 8, 2)]
FP32_SPLITS = (1, 2, 4)


def tiles_for(shape: Shape, interpret: bool) -> list[tuple[int, int, int, int]]:
    if interpret:
        return TILES_INTERPRET
    if shape.fp32:
        return TILES_FP32
    if shape.rows > 64:
        return TILES_MANY_ROWS
    return TILES_64_ROWS if shape.rows > 16 else TILES_FEW_ROWS


def used_splits(s_max: int, splits: int, block_n: int) -> int:
    """The number of splits that actually hold cache positions when ``splits`` are asked for (chunks
    are rounded up to block_n)."""
    chunk = _cdiv(_cdiv(s_max, splits), block_n) * block_n
    return _cdiv(s_max, chunk)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def configs_for(
    shape: Shape, num_sms: int, interpret: bool = False, tma: bool = False
) -> list[LaunchConfig | None]:
    """None (the default plan) first; with ``tma`` (a GPU with tensor-descriptor loads) then the
    ``TILES_TMA`` tiles at the heuristic's split count, with and without ``kv_tma``, for shapes of
    many rows; then each tile with: no split, the split count the heuristic would give that tile,
    and twice that (only where the heuristic splits). Configurations whose plan repeats an earlier
    one are dropped."""
    configs: list[LaunchConfig | None] = [None]
    seen = {resolve(shape, None, num_sms)}

    def add(config: LaunchConfig) -> None:
        plan = resolve(shape, config, num_sms)
        if plan not in seen:
            seen.add(plan)
            configs.append(config)

    if tma and (interpret or (shape.rows > 64 and not shape.fp32)):
        for bm, bn, warps, stages in TILES_INTERPRET[:1] if interpret else TILES_TMA:
            tile = LaunchConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
            auto = resolve(shape, tile, num_sms).num_splits
            for kv_tma in (True, False):
                add(LaunchConfig(bm, bn, warps, stages, auto, kv_tma=kv_tma))
    for bm, bn, warps, stages in tiles_for(shape, interpret):
        tile = LaunchConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
        auto = resolve(shape, tile, num_sms).num_splits
        splits = {1, auto}
        if auto > 1:
            splits.add(used_splits(shape.s_max, min(2 * auto, 64), bn))
        if interpret:
            splits.add(3)
        if shape.fp32 and not interpret:
            splits.update(used_splits(shape.s_max, n, bn) for n in FP32_SPLITS)
        for n in sorted(splits):
            add(LaunchConfig(bm, bn, warps, stages, n))
    return configs


def resolve(shape: Shape, config: LaunchConfig | None, num_sms: int) -> LaunchPlan:
    G = shape.Hq // shape.Hkv
    elem_size = 4 if shape.fp32 else 2
    return plan_launch(shape.B, shape.Hkv, shape.T, G, shape.s_max, shape.D, num_sms, config, elem_size)


def shape_dtype(shape: Shape, default: torch.dtype) -> torch.dtype:
    """float32 for the fp32 shapes, else the run's dtype (bf16 on CUDA, fp32 in the interpreter)."""
    return torch.float32 if shape.fp32 else default


def compile_key(shape: Shape, plan: LaunchPlan) -> tuple:
    """What selects a compiled kernel variant (runtime ints like B, T, chunk do not)."""
    return (
        shape.fp32,
        shape.mask,
        shape.D,
        plan.block_m,
        plan.block_n,
        plan.num_warps,
        plan.num_stages,
        plan.num_splits > 1,
        plan.kv_tma,
    )


def describe(config: LaunchConfig | None, plan: LaunchPlan) -> str:
    tag = "default " if config is None else ""
    return (
        f"{tag}m{plan.block_m} n{plan.block_n} w{plan.num_warps} st{plan.num_stages} splits{plan.num_splits}"
        + (" tma" if plan.kv_tma else "")
    )


# --------------------------------------------------------------------------------------------------
# Inputs, references and timers
# --------------------------------------------------------------------------------------------------
def make_shape_inputs(shape: Shape, device: torch.device, dtype: torch.dtype):
    """(q, k_cache, v_cache, cache_seqlens, tree_mask) as ``bench_tree_attention.make_inputs`` lays
    them out (layer views of a [layers, 2, B, Hkv, S, D] cache), drawn on the device: the batch-32 cache
    buffer is 279 M values, seconds of CPU time to draw."""
    from bench.bench_tree_attention import chain_tree_masks
    from eagle_kernels import pack_tree_mask

    gen = torch.Generator(device=device).manual_seed(0)
    kv = torch.randn(
        2, 2, shape.B, shape.Hkv, shape.s_max, shape.D, generator=gen, device=device, dtype=dtype
    )
    q = torch.randn(shape.B, shape.T, shape.Hq, shape.D, generator=gen, device=device, dtype=dtype)
    seqlens = torch.full((shape.B,), shape.prefix, dtype=torch.int32, device=device)
    mask = None
    if shape.mask == "tree":
        tree = chain_tree_masks(shape.B, shape.T, torch.Generator().manual_seed(0))
        mask = pack_tree_mask(tree, "i32").to(device)
    return q, kv[1, 0], kv[1, 1], seqlens, mask


def reference(inputs, scale: float) -> torch.Tensor:
    q, k, v, seqlens, mask = inputs
    return tree_attention_ref(q, k, v, seqlens, mask, scale).float()


class CudaTimer:
    """Kernel time from CUDA-graph replays (L2 flushed), eager time from back-to-back calls."""

    kind = "cuda"

    def __init__(self, eager_calls: int, rep_ms: int):
        self.eager_calls, self.rep_ms = eager_calls, rep_ms

    def kernel_s(self, fn) -> float:
        from bench.bench_tree_attention import cuda_kernel_seconds

        return cuda_kernel_seconds(fn, rep_ms=self.rep_ms)

    def eager_s(self, fn, *, sync_each: bool = False) -> tuple[float, float]:
        """(seconds per call including the GPU work, host seconds to issue one call)."""
        fn()
        torch.cuda.synchronize()
        n = self.eager_calls
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
            if sync_each:
                torch.cuda.synchronize()
        issued = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        return (done - t0) / n, (issued - t0) / n


class WallTimer:
    """--interpret: wall-clock of single calls (exercises the plumbing; the numbers mean nothing)."""

    kind = "interpreter-wall-clock"

    def kernel_s(self, fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def eager_s(self, fn, *, sync_each: bool = False) -> tuple[float, float]:
        s = self.kernel_s(fn)
        return s, s


def roofline(shape: Shape, dtype: torch.dtype, gpu: str | None) -> dict:
    from bench.bench_tree_attention import bytes_moved
    from bench.utils import HBM_BANDWIDTH

    moved = bytes_moved(shape.bench_tuple(), dtype)
    flops = 4 * shape.B * shape.Hq * shape.T * (shape.prefix + shape.T) * shape.D  # QK^T and PV, dense
    info = {"bytes": moved, "flops": flops, "flop_per_byte": flops / moved}
    for key, bw in HBM_BANDWIDTH.items():
        if gpu and key in gpu:
            info["hbm_bandwidth"] = bw
            info["hbm_roofline_us"] = moved / bw * 1e6
    for key, peak in PEAK_BF16_FLOPS.items():
        if gpu and key in gpu:
            info["peak_bf16_flops"] = peak
            info["compute_floor_us"] = flops / peak * 1e6
    return info


def fractions(kernel_us: float, roof: dict) -> dict:
    out = {}
    if "hbm_roofline_us" in roof:
        out["fraction_of_hbm_roofline"] = roof["hbm_roofline_us"] / kernel_us
        out["GB/s"] = roof["bytes"] / kernel_us / 1e3
    if "compute_floor_us" in roof:
        floor = max(roof["compute_floor_us"], roof.get("hbm_roofline_us", 0.0))
        out["fraction_of_roofline_max"] = floor / kernel_us
        out["TFLOP/s"] = roof["flops"] / kernel_us / 1e6
    return out


# --------------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------------
def run_config(inputs, want, scale, config, timer, tol) -> dict:
    """Run, check and time one configuration; every failure is caught and reported."""
    q, k, v, seqlens, mask = inputs

    def call():
        return _tree_attention_triton(q, k, v, seqlens, mask, scale, config)

    result: dict = {}
    try:
        t0 = time.perf_counter()
        out = call()
        if q.is_cuda:
            torch.cuda.synchronize()
        result["first_call_s"] = time.perf_counter() - t0  # includes the compile when cold
        err = (out.float() - want).abs().max().item()
        result["max_abs_err"] = err
        if not err <= tol:  # NaN fails too
            result["status"] = f"wrong (max abs err {err:.3g} > {tol})"
            return result
        result["kernel_us"] = timer.kernel_s(call) * 1e6
        eager, host = timer.eager_s(call)
        result["eager_us"], result["host_us"] = eager * 1e6, host * 1e6
        result["status"] = "ok"
    except Exception as err:  # a config that does not compile or launch (e.g. out of shared memory)
        result["status"] = (
            f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        )
        if os.environ.get("SWEEP_TRACEBACK"):
            traceback.print_exc()
    return result


def run_public(inputs, timer) -> dict:
    """The public function (argument checks, default plan) as a user calls it."""
    q, k, v, seqlens, mask = inputs

    def call():
        return tree_attention(q, k, v, seqlens, mask)

    try:
        eager, host = timer.eager_s(call)
        synced, _ = timer.eager_s(call, sync_each=q.is_cuda)
        return {"eager_us": eager * 1e6, "host_us": host * 1e6, "eager_sync_each_us": synced * 1e6}
    except Exception as err:
        return {"status": f"error: {type(err).__name__}: {str(err)[:200]}"}


def run_stream_floor(roof: dict, device: torch.device, dtype: torch.dtype, timer) -> dict:
    """The same timer on ``torch.amax`` over a contiguous buffer of the shape's roofline bytes: what a
    library streaming kernel takes to read that many bytes once on this GPU with this timing method
    (ramp-up and tail included; with ``EAGLE_BENCH_L2_FLUSH=write`` the memset's write-backs too). A
    reference, not a bound: on an H100 the T = 1 decode at B 32 ran faster than it (106 vs 117 us)."""
    try:
        buf = torch.zeros(roof["bytes"] // dtype.itemsize, dtype=dtype, device=device)
        fn = lambda: torch.amax(buf)  # noqa: E731
        fn()
        us = timer.kernel_s(fn) * 1e6
        out = {"kernel_us": us, "GB/s": buf.numel() * buf.element_size() / us / 1e3}
        if "hbm_roofline_us" in roof:
            out["fraction_of_hbm_roofline"] = roof["hbm_roofline_us"] / us
        return out
    except Exception as err:
        return {"status": f"error: {type(err).__name__}: {str(err)[:200]}"}


def run_sdpa(inputs, timer) -> dict:
    from bench.bench_tree_attention import sdpa_peer

    try:
        fn = sdpa_peer(*inputs)
        fn()
        kernel = timer.kernel_s(fn)
        eager, _ = timer.eager_s(fn)
        return {"kernel_us": kernel * 1e6, "eager_us": eager * 1e6}
    except Exception as err:
        return {"status": f"error: {type(err).__name__}: {str(err)[:200]}"}


# --------------------------------------------------------------------------------------------------
# Parallel compile warm-up (CUDA)
# --------------------------------------------------------------------------------------------------
_WORKER_INPUTS: dict = {}


def _compile_in_worker(shape: Shape, config: LaunchConfig | None, device: str, dtype: torch.dtype) -> str:
    """Launch one configuration once in a worker process, which compiles it into Triton's cache."""
    torch.set_num_threads(1)
    if shape.name not in _WORKER_INPUTS:
        _WORKER_INPUTS[shape.name] = make_shape_inputs(shape, torch.device(device), shape_dtype(shape, dtype))
    q, k, v, seqlens, mask = _WORKER_INPUTS[shape.name]
    try:
        _tree_attention_triton(q, k, v, seqlens, mask, shape.D**-0.5, config)
        if device == "cuda":
            torch.cuda.synchronize()
        return "ok"
    except Exception as err:
        return f"{type(err).__name__}: {str(err)[:120]}"


def warm_compile_cache(
    work: list[tuple[Shape, LaunchConfig | None]], jobs: int, deadline: float, device: str, dtype: torch.dtype
) -> dict:
    """Compile each distinct variant once in ``jobs`` spawned processes; stop waiting at ``deadline``."""
    import concurrent.futures as cf
    import multiprocessing as mp

    summary = {"variants": len(work), "jobs": jobs, "ok": 0, "failed": 0, "unfinished": 0}
    t0 = time.perf_counter()
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))
    try:
        futures = [pool.submit(_compile_in_worker, shape, cfg, device, dtype) for shape, cfg in work]
        done, pending = cf.wait(futures, timeout=max(1.0, deadline - time.perf_counter()))
        for f in done:
            ok = f.exception() is None and f.result() == "ok"
            summary["ok" if ok else "failed"] += 1
        summary["unfinished"] = len(pending)
        if pending:  # workers still compiling would load the CPU and GPU during the timings: stop them
            for process in list((pool._processes or {}).values()):
                process.terminate()
    except Exception as err:  # a broken pool only costs the warm-up; the sweep compiles as it goes
        summary["error"] = f"{type(err).__name__}: {err}"
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    summary["seconds"] = time.perf_counter() - t0
    return summary


# --------------------------------------------------------------------------------------------------
# Host overhead (CPU, launches mocked)
# --------------------------------------------------------------------------------------------------
def measure_host_overhead(shapes: list[Shape], calls: int = 2000, repeats: int = 5) -> dict:
    """Python time per call of the CUDA eager path up to the kernel launches, measured on CPU tensors:
    the Triton backend forced, ``_launch`` replaced by a no-op (it still receives every argument) and
    the value check that only CPU tensors get (it reads cache_seqlens) switched off. What remains is
    what a CUDA call pays before Triton's own launcher: argument checks, dispatch, plan, allocation."""
    import eagle_kernels

    ta = sys.modules["eagle_kernels.tree_attention"]
    saved = ta._launch, ta._check_values, ta._num_sms
    ta._launch = lambda kernel, grid, *args, **kw: None
    ta._check_values = lambda *args: None
    ta._num_sms = lambda device: DEFAULT_SMS  # the plans (splits, combine launch) of an H100/H200
    ta._launch_spec.cache_clear()
    results = {}
    try:
        with eagle_kernels.use_backend("triton"):
            for shape in shapes:
                kv = torch.empty(2, 2, shape.B, shape.Hkv, shape.s_max, shape.D, dtype=torch.bfloat16)
                q = torch.empty(shape.B, shape.T, shape.Hq, shape.D, dtype=torch.bfloat16)
                seqlens = torch.full((shape.B,), shape.prefix, dtype=torch.int32)
                mask = None
                if shape.mask == "tree":
                    mask = torch.zeros(shape.B, shape.T, _cdiv(shape.T, 32), dtype=torch.int32)
                args = (q, kv[1, 0], kv[1, 1], seqlens, mask)
                plan = resolve(shape, None, DEFAULT_SMS)
                results[shape.name] = {
                    "public_us": _best_us(lambda a=args: tree_attention(*a), calls, repeats),
                    "launcher_us": _best_us(lambda a=args: _tree_attention_triton(*a, 0.1), calls, repeats),
                    "checks_us": _best_us(lambda a=args: ta._check_args(*a), calls, repeats),
                    "launches": 2 if plan.num_splits > 1 else 1,
                }
    finally:
        ta._launch, ta._check_values, ta._num_sms = saved
        ta._launch_spec.cache_clear()
    return results


def _best_us(fn, calls: int, repeats: int) -> float:
    for _ in range(100):
        fn()
    return best_host_us(fn, calls, repeats)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list shapes and configurations, run nothing")
    p.add_argument(
        "--interpret", action="store_true", help="tiny shapes on CPU through the Triton interpreter"
    )
    p.add_argument(
        "--host-overhead", action="store_true", help="Python cost per call on CPU, kernel launches mocked"
    )
    p.add_argument("--shapes", nargs="*", help="only these shape names")
    p.add_argument(
        "--no-tma", action="store_true", help="no tensor-descriptor (LaunchConfig.kv_tma) configurations"
    )
    p.add_argument("--budget-s", type=float, default=85.0, help="skip configurations after this many seconds")
    p.add_argument(
        "--warmup-share", type=float, default=0.45, help="share of the budget for parallel compiles"
    )
    p.add_argument("--jobs", type=int, default=None, help="compile worker processes (0: none)")
    p.add_argument("--eager-calls", type=int, default=100, help="back-to-back calls per eager timing")
    p.add_argument(
        "--rep-ms", type=int, default=25, help="replay time per kernel timing, all replays together"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/...)")
    return p.parse_args(argv)


def selected_shapes(args) -> list[Shape]:
    shapes = INTERPRET_SHAPES if args.interpret else GPU_SHAPES
    if args.shapes:
        unknown = set(args.shapes) - {s.name for s in shapes}
        if unknown:
            raise SystemExit(f"unknown shapes {sorted(unknown)}; choose from {[s.name for s in shapes]}")
        shapes = [s for s in shapes if s.name in args.shapes]
    return shapes


def plan_work(shapes: list[Shape], num_sms: int, interpret: bool, tma: bool = False):
    """[(shape, [(config, plan)])] and one representative (shape, config) per compile variant."""
    work, variants = [], {}
    for shape in shapes:
        items = []
        for config in configs_for(shape, num_sms, interpret, tma):
            plan = resolve(shape, config, num_sms)
            items.append((config, plan))
            variants.setdefault(compile_key(shape, plan), (shape, config))
        work.append((shape, items))
    return work, list(variants.values())


def print_dry_run(work, variants, num_sms: int) -> None:
    print(f"# plans for {num_sms} SMs; {len(variants)} distinct compiled variants")
    for shape, items in work:
        print(
            f"{shape.name}: B={shape.B} T={shape.T} Hq={shape.Hq} Hkv={shape.Hkv} D={shape.D} "
            f"prefix={shape.prefix} mask={shape.mask} rows/kv-head={shape.rows}"
        )
        for config, plan in items:
            grid = (_cdiv(shape.rows, plan.block_m), shape.B * shape.Hkv, plan.num_splits)
            print(f"    {describe(config, plan):42s} chunk={plan.chunk:5d} grid={grid}")
    total = sum(len(items) for _, items in work)
    print(f"# {total} configurations over {len(work)} shapes")


def best_of(results: list[dict]) -> dict | None:
    ok = [r for r in results if r.get("status") == "ok"]
    return min(ok, key=lambda r: r["kernel_us"]) if ok else None


def print_row(shape: Shape, r: dict) -> None:
    if r.get("status") != "ok":
        print(f"  {r['config_desc']:42s} {r.get('status')}", flush=True)
        return
    frac = r.get("fraction_of_hbm_roofline")
    frac_s = f"{100 * frac:5.1f}%" if frac is not None else "   n/a"
    print(
        f"  {r['config_desc']:42s} kernel {r['kernel_us']:8.1f} us  eager {r['eager_us']:8.1f} us  "
        f"host {r['host_us']:6.1f} us  HBM roofline {frac_s}  err {r['max_abs_err']:.2e}",
        flush=True,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    shapes = selected_shapes(args)
    cuda = torch.cuda.is_available() and not (args.interpret or args.dry_run or args.host_overhead)
    if not (cuda or args.interpret or args.dry_run or args.host_overhead):
        raise SystemExit("no CUDA device: use --dry-run or --interpret")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else DEFAULT_SMS
    tma = not args.no_tma and (torch.cuda.get_device_capability(0) >= (9, 0) if cuda else True)
    work, variants = plan_work(shapes, num_sms if not args.interpret else 1, args.interpret, tma)
    if args.dry_run:
        print_dry_run(work, variants, num_sms)
        return 0
    if args.host_overhead:
        torch.set_num_threads(1)
        shapes = [s for s in GPU_SHAPES if not args.shapes or s.name in args.shapes]
        print("# Python time per call before Triton's launcher (CPU tensors, launches mocked, best of 5)")
        for name, r in measure_host_overhead(shapes).items():
            print(
                f"  {name:12s} public tree_attention {r['public_us']:6.2f} us | launcher "
                f"{r['launcher_us']:6.2f} us | argument checks {r['checks_us']:5.2f} us | "
                f"{r['launches']} launch(es) then follow",
                flush=True,
            )
        return 0

    torch.set_num_threads(1)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    gpu = torch.cuda.get_device_name(0) if cuda else None
    timer = CudaTimer(args.eager_calls, args.rep_ms) if cuda else WallTimer()
    print(
        f"# tree_attention sweep on {gpu or 'CPU (Triton interpreter)'}: {len(shapes)} shapes, "
        f"{sum(len(i) for _, i in work)} configurations, {len(variants)} compiled variants",
        flush=True,
    )

    warmup = None
    jobs = args.jobs if args.jobs is not None else (min(12, max(1, (os.cpu_count() or 2) - 2)) if cuda else 0)
    if jobs > 0:
        share = args.warmup_share * args.budget_s
        print(f"# compiling {len(variants)} variants in {jobs} processes (until +{share:.0f} s)", flush=True)
        warmup = warm_compile_cache(variants, jobs, t_start + share, device.type, dtype)
        print(f"# warm-up: {warmup}", flush=True)

    report = {
        "gpu": gpu,
        "num_sms": num_sms,
        "dtype": str(dtype),
        "timer": timer.kind,
        "l2_flush": l2_flush_kind() if cuda else None,
        "tolerance": {"bf16": 2e-2, "fp32": 1e-4},
        "budget_s": args.budget_s,
        "warmup": warmup,
        "shapes": {},
        "skipped": [],
    }
    for shape, items in work:
        sdtype = shape_dtype(shape, dtype)
        tol = 2e-2 if sdtype == torch.bfloat16 else 1e-4
        inputs = make_shape_inputs(shape, device, sdtype)
        scale = shape.D**-0.5
        want = reference(inputs, scale)
        roof = roofline(shape, sdtype, gpu)
        entry = {"shape": asdict(shape), "dtype": str(sdtype), "roofline": roof, "results": []}
        print(
            f"\n{shape.name} (B={shape.B} T={shape.T} prefix={shape.prefix} {shape.mask} {sdtype}; "
            f"{roof['bytes'] / 1e6:.1f} MB, {roof['flop_per_byte']:.0f} FLOP/B"
            + (f", HBM roofline {roof['hbm_roofline_us']:.1f} us" if "hbm_roofline_us" in roof else "")
            + (f", bf16 FLOP floor {roof['compute_floor_us']:.1f} us" if "compute_floor_us" in roof else "")
            + ")",
            flush=True,
        )
        for config, plan in items:
            desc = describe(config, plan)
            if time.perf_counter() > deadline:
                report["skipped"].append(f"{shape.name}: {desc}")
                continue
            r = run_config(inputs, want, scale, config, timer, tol)
            r.update(config_desc=desc, config=None if config is None else asdict(config), plan=asdict(plan))
            if r.get("status") == "ok":
                r.update(fractions(r["kernel_us"], roof))
            entry["results"].append(r)
            print_row(shape, r)
        entry["public_tree_attention"] = run_public(inputs, timer)
        print(f"  public tree_attention (default plan): {entry['public_tree_attention']}", flush=True)
        if cuda and shape.goal:
            entry["sdpa"] = run_sdpa(inputs, timer)
            print(f"  SDPA with an explicit mask: {entry['sdpa']}", flush=True)
        if cuda:
            entry["stream_floor"] = run_stream_floor(roof, device, sdtype, timer)
            print(f"  torch.amax reading the roofline's bytes once: {entry['stream_floor']}", flush=True)
        best = best_of(entry["results"])
        default = next((r for r in entry["results"] if r.get("config") is None), None)
        if best is not None:
            entry["best"] = best
            speedup = (
                default["kernel_us"] / best["kernel_us"]
                if default and default.get("status") == "ok"
                else None
            )
            entry["best_speedup_over_default"] = speedup
            print(
                f"  best: {best['config_desc']} {best['kernel_us']:.1f} us"
                + (f" ({speedup:.2f}x the default)" if speedup else ""),
                flush=True,
            )
        report["shapes"][shape.name] = entry
        del inputs, want
        if gpu is not None:  # a run cut by an outer time box keeps the shapes it finished
            report["elapsed_s"] = time.perf_counter() - t_start
            write_report(report | {"complete": False}, args, gpu)
    report["elapsed_s"] = time.perf_counter() - t_start
    if report["skipped"]:
        print(f"\n# budget reached: skipped {len(report['skipped'])} configurations", flush=True)
    print_summary(report)
    path = write_report(report | {"complete": True}, args, gpu)
    print(f"# wrote {path} in {report['elapsed_s']:.0f} s", flush=True)
    return 0


def print_summary(report: dict) -> None:
    print("\n# best per shape: kernel time, fraction of the HBM roofline / of max(HBM, bf16 FLOP) roofline")
    for name, entry in report["shapes"].items():
        best = entry.get("best")
        if best is None:
            print(f"  {name:12s} no configuration passed")
            continue
        hbm = best.get("fraction_of_hbm_roofline")
        both = best.get("fraction_of_roofline_max")
        pub = entry.get("public_tree_attention", {}).get("eager_us")
        floor = entry.get("stream_floor", {}).get("kernel_us")
        print(
            f"  {name:12s} {best['kernel_us']:8.1f} us  "
            + (f"HBM {100 * hbm:5.1f}%  " if hbm is not None else "")
            + (f"roofline {100 * both:5.1f}%  " if both is not None else "")
            + (f"amax read {floor:6.1f} us  " if floor is not None else "")
            + (f"public eager {pub:7.1f} us  " if pub is not None else "")
            + best["config_desc"]
        )


def write_report(report: dict, args, gpu: str | None) -> Path:
    """The report as JSON (``complete``: false while shapes remain), written atomically."""
    from bench.utils import RESULTS_DIR, machine_info, write_json_atomically

    if args.out is not None:
        path = args.out
    elif gpu is None:  # interpreter numbers are not results: keep them out of bench/results
        path = Path(os.environ.get("TMPDIR", "/tmp")) / "sweep_tree_attention_interpret.json"
    else:
        path = RESULTS_DIR / f"sweep_tree_attention_{gpu.replace(' ', '-')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomically(path, {"machine": machine_info(), **report}, default=str)


if __name__ == "__main__":
    sys.exit(main())
