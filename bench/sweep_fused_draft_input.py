"""Sweep of fused_draft_input's CUDA plans: which path and tiles are fastest per shape, vs unfused.

For every shape (H in {4096, 8192}, N in {1, 16, 64, 512, 4096} rows, bf16; ``--eagle3`` adds the
``[N, 3H] -> H`` variant at H=4096) it times the unfused ``F.linear(cat([embed[ids], hidden]))``, the
default plan, the ``gather_mm`` path and a list of fused-GEMM tile configurations (split-K, skinny
and square tiles), each checked against an fp32 reference first (error within 2x the unfused bf16
error). Every candidate gets a kernel-only time (CUDA-graph replays, L2 flushed between calls:
``bench/utils.py``) and an eager per-call time (public function + synchronize, as the
microbenchmarks), with TFLOP/s, GB/s and the roofline fraction. Configurations that fail to compile
or to launch (e.g. too much shared memory) are recorded as errors and skipped.

    python bench/sweep_fused_draft_input.py                  # H100/H200: < 60 s (--budget-s 50)
    python bench/sweep_fused_draft_input.py --eagle3 --budget-s 90
    python bench/sweep_fused_draft_input.py --dry-run        # tiny shapes; no GPU: the Triton interpreter
    python bench/sweep_fused_draft_input.py --aot-check      # compile every candidate for sm_90, no GPU needed

Output: a table, and ``bench/results/sweep_fused_draft_input_<GPU>.json`` whose ``best`` list (the
fastest correct plan per shape by kernel time) is what ``EAGLE_KERNELS_FDI_TUNING=<file>`` feeds to
the op's plan choice (``eagle_kernels.fused_draft_input.default_plan``). The run stops starting new
candidates after ``--budget-s`` seconds: baselines (unfused, default, gather_mm) are measured for every
shape first, the other configurations after, round-robin over the shapes. Before that, the fused
kernels are compiled in ``--jobs`` worker processes (Triton's on-disk cache is then hit in this one).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `eagle_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VOCAB = {4096: 32000, 8192: 128256}
DEFAULT_HIDDEN = (4096, 8192)
DEFAULT_ROWS = (1, 16, 64, 512, 4096)
EAGLE3_HIDDEN = 4096
DRY_RUN_HIDDEN = (64,)
DRY_RUN_ROWS = (1, 40, 300)
SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90

# Fused-GEMM candidates by row class, beyond the default plan (GemmConfig names).
DECODE_CONFIGS = (  # rows <= 16: one 16-row block; stream W with many programs / deep pipelines
    "bm16_bn16_bk256_gm8_sk1_w4_st4",
    "bm16_bn32_bk256_gm8_sk1_w4_st4",
    "bm16_bn32_bk256_gm8_sk2_w4_st3",
    "bm16_bn64_bk128_gm8_sk2_w4_st4",
    "bm16_bn64_bk128_gm8_sk4_w4_st4",
    "bm16_bn16_bk512_gm8_sk1_w4_st3",
    "bm16_bn32_bk128_gm8_sk1_w4_st6",
    "bm16_bn16_bk256_gm8_sk1_w2_st4",
    "bm16_bn64_bk256_gm8_sk1_w4_st3",
    # after the first H200 sweep (best: bn64 bk128 split-K 4 at 53% of HBM): more bytes per program
    # and deeper split-K, towards a GEMV's weight stream
    "bm16_bn64_bk128_gm8_sk8_w4_st4",
    "bm16_bn128_bk128_gm8_sk4_w4_st4",
    "bm16_bn128_bk64_gm8_sk8_w4_st4",
    "bm16_bn64_bk256_gm8_sk4_w4_st3",
    "bm16_bn128_bk128_gm8_sk8_w8_st3",
)
GEMV_CONFIGS = (  # rows <= 16: the no-tensor-core GEMV path (GemvConfig names); W streamed by plain
    # vector loads, so the column block sets the grid (H 4096: bn16 -> 256 programs) and block_k the bytes
    # each thread has in flight (bn16 bk512 at 4 warps: 16 x 16-byte loads per thread per iteration)
    "bm1_bn16_bk512_w4_st3",
    "bm1_bn8_bk512_w4_st3",
    "bm1_bn8_bk1024_w8_st3",
    "bm1_bn4_bk1024_w4_st3",
    "bm1_bn32_bk256_w4_st3",
    "bm1_bn16_bk256_w2_st3",
    "bm2_bn8_bk512_w4_st3",
    "bm4_bn8_bk256_w4_st3",
    "bm8_bn8_bk128_w4_st3",
    "bm8_bn4_bk256_w4_st3",
)
MID_CONFIGS = (  # 17..64 rows: one 64-row block; wider columns keep A's L2 re-reads low
    "bm64_bn64_bk128_gm8_sk2_w4_st3",
    "bm64_bn64_bk128_gm8_sk1_w4_st3",
    "bm64_bn32_bk128_gm8_sk1_w4_st4",
    "bm64_bn64_bk64_gm8_sk2_w4_st4",
    "bm64_bn128_bk64_gm8_sk2_w4_st3",
    "bm64_bn64_bk128_gm8_sk4_w4_st3",
    "bm32_bn64_bk128_gm8_sk2_w4_st4",
    "bm64_bn16_bk256_gm8_sk1_w4_st4",
)
LARGE_CONFIGS = (  # prefill-sized: square tiles, wgmma
    "bm128_bn128_bk64_gm8_sk1_w8_st3",
    "bm128_bn256_bk64_gm8_sk1_w8_st3",
    "bm64_bn256_bk64_gm8_sk1_w4_st4",
    "bm128_bn128_bk64_gm8_sk1_w4_st4",
    "bm128_bn64_bk64_gm8_sk1_w4_st4",
    "bm64_bn128_bk64_gm8_sk1_w4_st4",
)


def _fdi():
    """The op module (imported late: TRITON_INTERPRET must be set first; the package attribute of the
    same name is the function)."""
    import importlib

    return importlib.import_module("eagle_kernels.fused_draft_input")


@dataclass(frozen=True)
class Shape:
    hidden: int
    rows: int
    segments: int  # 2: fused_draft_input (with bias), 3: fused_eagle3_input (no bias)
    dtype: str
    vocab: int

    @property
    def label(self) -> str:
        return f"H{self.hidden}-N{self.rows}-{'draft' if self.segments == 2 else 'eagle3'}-{self.dtype}"

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.segments * self.hidden * self.hidden

    @property
    def bytes_moved(self) -> int:
        """Compulsory traffic: W once, the A rows once, the output once."""
        K = self.segments * self.hidden
        return (self.hidden * K + self.rows * K + self.rows * self.hidden) * DTYPES[self.dtype].itemsize


def sweep_shapes(args) -> list[Shape]:
    hidden = args.hidden or (DRY_RUN_HIDDEN if args.dry_run else DEFAULT_HIDDEN)
    rows = args.rows or (DRY_RUN_ROWS if args.dry_run else DEFAULT_ROWS)
    shapes = [
        Shape(h, n, 2, args.dtype, 50 if args.dry_run else VOCAB.get(h, 32000)) for h in hidden for n in rows
    ]
    if args.eagle3:
        h3 = hidden[0] if args.dry_run else EAGLE3_HIDDEN
        shapes += [Shape(h3, n, 3, args.dtype, 0) for n in rows]
    return shapes


def candidate_plans(shape: Shape, device: torch.device) -> list:
    """Default plan (on a GPU with built-in measured plans, those), the shape heuristic's fused tiles,
    gather_mm, up to 16 rows the GEMV configurations, then the fused configurations of the shape's row
    class (no repeats)."""
    fdi = _fdi()
    pool = DECODE_CONFIGS if shape.rows <= 16 else MID_CONFIGS if shape.rows <= 64 else LARGE_CONFIGS
    dtype = DTYPES[shape.dtype]
    plans = [fdi.default_plan(shape.rows, shape.hidden, shape.segments, dtype, device)]
    sms = fdi._sms_of(device)
    plans.append(
        fdi.Plan("fused", fdi.heuristic_config(shape.rows, shape.hidden, shape.segments, dtype.itemsize, sms))
    )
    plans.append(fdi.Plan("gather_mm"))
    if shape.rows <= 16:
        plans += [fdi.Plan("gemv", fdi.GemvConfig.from_name(name)) for name in GEMV_CONFIGS]
    plans += [fdi.Plan("fused", fdi.GemmConfig.from_name(name)) for name in pool]
    unique: dict[str, object] = {}
    for plan in plans:
        unique.setdefault(plan.name, plan)
    return list(unique.values())


# --------------------------------------------------------------------------------------------------
# Inputs, reference, timing
# --------------------------------------------------------------------------------------------------
_WEIGHTS: dict[tuple, tuple] = {}


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> tuple:
    """The op's arguments; the weights (and the embedding table) are made once per H and shared by
    the row counts."""
    dtype, H, N = DTYPES[shape.dtype], shape.hidden, shape.rows
    gen = torch.Generator(device=device).manual_seed(seed + N)

    def randn(*size, scale=1.0, generator=gen):
        return (torch.randn(*size, generator=generator, device=device) * scale).to(dtype)

    key = (H, shape.segments, shape.dtype, shape.vocab, str(device))
    if key not in _WEIGHTS:
        wgen = torch.Generator(device=device).manual_seed(seed)
        w = randn(H, shape.segments * H, scale=(shape.segments * H) ** -0.5, generator=wgen)
        embed = randn(shape.vocab, H, generator=wgen) if shape.segments == 2 else None
        _WEIGHTS[key] = (w, embed, randn(H, generator=wgen) if shape.segments == 2 else None)
    w, embed, b = _WEIGHTS[key]
    if shape.segments == 3:
        return (randn(N, H), randn(N, H, scale=2.0), randn(N, H, scale=4.0), w, None)
    ids = torch.randint(0, shape.vocab, (N,), generator=gen, device=device)
    return (randn(N, H), ids, embed, w, b)


def unfused(shape: Shape, inputs: tuple) -> torch.Tensor:
    if shape.segments == 3:
        h_low, h_mid, h_high, w, b = inputs
        return F.linear(torch.cat([h_low, h_mid, h_high], dim=-1), w, b)
    hidden, ids, embed, w, b = inputs
    return F.linear(torch.cat([embed[ids], hidden], dim=-1), w, b)


def reference(shape: Shape, inputs: tuple) -> torch.Tensor:
    """fp32 on CUDA (TF32 off), fp64 on CPU; only the gathered embedding rows are widened."""
    wide = torch.float32 if inputs[0].is_cuda else torch.float64
    if shape.segments == 2:
        hidden, ids, embed, w, b = inputs
        inputs = (hidden, torch.arange(len(ids), device=ids.device), embed[ids], w, b)
    return unfused(shape, tuple(t.to(wide) if t is not None and t.is_floating_point() else t for t in inputs))


def plan_call(shape: Shape, inputs: tuple, plan):
    """The public function under ``use_plan(plan)``; on CPU (dry run) with the Triton backend forced
    (the interpreter), since the C++ op is the default there."""
    import eagle_kernels

    fdi = _fdi()
    op = fdi.fused_draft_input if shape.segments == 2 else fdi.fused_eagle3_input
    if inputs[0].is_cuda:

        def call():
            with fdi.use_plan(plan):
                return op(*inputs)

    else:

        def call():
            with eagle_kernels.use_backend("triton"), fdi.use_plan(plan):
                return op(*inputs)

    return call


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager_us(call, device: torch.device, *, budget_s: float = 0.05, max_calls: int = 200) -> float:
    """Median wall time of ``call(); synchronize`` (what pytest-benchmark's eager numbers measure)."""
    samples: list[float] = []
    stop = time.perf_counter() + budget_s
    while len(samples) < max_calls and (len(samples) < 3 or time.perf_counter() < stop):
        start = time.perf_counter()
        call()
        sync(device)
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def throughput(shape: Shape, seconds: float, device: torch.device, prefix: str) -> dict:
    from bench.utils import throughput_info

    info = throughput_info(
        prefix, seconds, device, bytes_moved=shape.bytes_moved, flops=shape.flops, dtype=DTYPES[shape.dtype]
    )
    return {k: round(v, 4) for k, v in info.items()}


def measure(
    shape: Shape, call, device: torch.device, ref: torch.Tensor, allowed_err: float, flush_l2: bool
) -> dict:
    """Run, check, then time one candidate; any failure is returned as a status, never raised."""
    try:
        out = call()
        sync(device)
    except Exception as err:  # compile errors, out of resources, launch failures
        return {"status": "error", "error": f"{type(err).__name__}: {err}"[:500]}
    max_err = (out.to(ref.dtype) - ref).abs().max().item()
    result = {"max_abs_err": max_err, "allowed_err": allowed_err}
    if not max_err <= allowed_err:
        return {"status": "wrong", **result}
    result["status"] = "ok"
    if device.type == "cuda":
        from bench.utils import measure_cuda_kernel_time

        timing = measure_cuda_kernel_time(call, flush_l2=flush_l2, target_ms=1.0, replays=10)
        result.update(kernel_us=round(timing.us, 3), kernel_timer=timing.method)
        if timing.note:
            result["kernel_timer_note"] = timing.note
        result.update(throughput(shape, timing.us * 1e-6, device, "kernel"))
        result["eager_us"] = round(eager_us(call, device), 3)
    else:
        result["eager_us"] = round(
            eager_us(call, device, budget_s=0.0, max_calls=2), 1
        )  # interpreter wall time
    result.update(throughput(shape, result["eager_us"] * 1e-6, device, "eager"))
    return result


# --------------------------------------------------------------------------------------------------
# Parallel pre-compilation (CUDA)
# --------------------------------------------------------------------------------------------------
def _compile_worker(plan_name: str, hidden: int, segments: int, dtype: str) -> str:
    """Launch the plan once at 1 row (same kernel specialisation as every row count): compiles into
    Triton's on-disk cache. Returns "" or the error."""
    try:
        fdi = _fdi()
        shape = Shape(hidden, 1, segments, dtype, 1)
        plan_call(shape, make_inputs(shape, torch.device("cuda")), fdi.Plan.from_name(plan_name))()
        torch.cuda.synchronize()
        return ""
    except Exception as err:
        return f"{type(err).__name__}: {err}"[:300]


def precompile(shapes: list[Shape], device: torch.device, jobs: int, timeout_s: float) -> dict:
    keys = sorted(
        {(p.name, s.hidden, s.segments, s.dtype) for s in shapes for p in candidate_plans(s, device)}
    )
    started = time.perf_counter()
    errors: dict[str, str] = {}
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context)
    futures = {pool.submit(_compile_worker, *key): key for key in keys}
    try:
        for future in concurrent.futures.as_completed(futures, timeout=timeout_s):
            try:
                message = future.result()
            except Exception as err:  # a worker that died (e.g. a CUDA fault) breaks the pool
                message = f"{type(err).__name__}: {err}"[:300]
            if message:
                errors["/".join(map(str, futures[future]))] = message
    except concurrent.futures.TimeoutError:
        errors["timeout"] = f"pre-compilation stopped after {timeout_s:.0f} s; the rest compiles in-process"
        for process in list(getattr(pool, "_processes", {}).values()):  # workers still compiling
            process.terminate()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return {
        "kernels": len(keys),
        "jobs": jobs,
        "seconds": round(time.perf_counter() - started, 1),
        "errors": errors,
    }


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------
@dataclass
class ShapeState:
    shape: Shape
    inputs: tuple
    ref: torch.Tensor
    allowed_err: float
    plans: list
    results: dict  # plan name (or "unfused") -> measurement


def prepare(shape: Shape, device: torch.device) -> ShapeState:
    inputs = make_inputs(shape, device)
    ref = reference(shape, inputs)
    lowp_err = (unfused(shape, inputs).to(ref.dtype) - ref).abs().max().item()
    allowed = 2 * lowp_err + 1e-6 * max(1.0, ref.abs().max().item())
    return ShapeState(shape, inputs, ref, allowed, candidate_plans(shape, device), {})


def best_of(state: ShapeState, device: torch.device) -> tuple[str, dict] | None:
    key = "kernel_us" if device.type == "cuda" else "eager_us"
    ok = [(name, r) for name, r in state.results.items() if name != "unfused" and r.get("status") == "ok"]
    return min(ok, key=lambda item: item[1][key]) if ok else None


def summary(states: list[ShapeState], device: torch.device) -> list[dict]:
    rows = []
    for st in states:
        best = best_of(st, device)
        if best is None:
            continue
        name, r = best
        base = st.results.get("unfused", {})
        entry = {
            **asdict(st.shape),
            "plan": name,
            "kernel_us": r.get("kernel_us"),
            "eager_us": r.get("eager_us"),
        }
        entry["default_plan"] = st.plans[0].name
        entry["default_kernel_us"] = st.results.get(st.plans[0].name, {}).get("kernel_us")
        entry["unfused_kernel_us"], entry["unfused_eager_us"] = base.get("kernel_us"), base.get("eager_us")
        for kind in ("kernel", "eager"):
            mine, theirs = r.get(f"{kind}_us"), base.get(f"{kind}_us")
            if mine and theirs:
                entry[f"speedup_{kind}"] = round(theirs / mine, 3)
        rows.append(entry)
    return rows


def print_table(states: list[ShapeState]) -> None:
    head = f"{'shape':26s} {'candidate':36s} {'status':6s} {'kernel us':>10s} {'TFLOP/s':>8s} {'roof%':>6s} {'eager us':>9s} {'x unf(k)':>8s} {'x unf(e)':>8s}"
    print(head)
    print("-" * len(head))
    for st in states:
        base = st.results.get("unfused", {})
        for name, r in st.results.items():
            k, e = r.get("kernel_us"), r.get("eager_us")
            roof = r.get("kernel_fraction_of_roofline")
            xk = f"{base['kernel_us'] / k:8.2f}" if k and base.get("kernel_us") else f"{'':8s}"
            xe = f"{base['eager_us'] / e:8.2f}" if e and base.get("eager_us") else f"{'':8s}"
            print(
                f"{st.shape.label:26s} {name[:36]:36s} {r.get('status', '?'):6s} "
                f"{k if k is not None else '':>10} {r.get('kernel_TFLOP/s', ''):>8} "
                f"{'' if roof is None else f'{100 * roof:.0f}':>6} {e if e is not None else '':>9} {xk} {xe}"
            )


def write_json(path: Path, states: list[ShapeState], device: torch.device, settings: dict) -> None:
    from bench.utils import machine_info

    payload = {
        "machine": machine_info(),
        "settings": settings,
        "shapes": [
            {
                **asdict(st.shape),
                "label": st.shape.label,
                "allowed_err": st.allowed_err,
                "results": st.results,
            }
            for st in states
        ],
        "best": summary(states, device),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def run_sweep(args) -> Path:
    from bench.utils import RESULTS_DIR, device_file_tag

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit(
            "sweep_fused_draft_input: needs a CUDA GPU (use --dry-run to check the plumbing on CPU)"
        )
    t0 = time.perf_counter()
    shapes = sweep_shapes(args)
    tag = device_file_tag(device)
    if args.out:
        out = Path(args.out)
    elif args.dry_run:
        out = Path(tempfile.gettempdir()) / f"sweep_fused_draft_input_dryrun_{tag}.json"
    else:
        out = RESULTS_DIR / f"sweep_fused_draft_input_{tag}.json"
    settings = {
        k: v for k, v in vars(args).items() if k not in ("out", "hidden", "rows", "aot_check", "all", "arch")
    }
    settings["hidden"] = sorted({s.hidden for s in shapes})
    settings["rows"] = sorted({s.rows for s in shapes})
    settings["timing"] = (
        "kernel_us: CUDA-graph replays of the call, median per call"
        + (", L2 flushed before each call" if not args.no_flush_l2 else ", warm L2")
        + "; eager_us: median wall time of call + synchronize"
        if device.type == "cuda"
        else "dry run on CPU: eager_us is the Triton interpreter's wall time, not a benchmark"
    )
    if device.type == "cuda" and args.jobs > 0:
        settings["precompile"] = precompile(shapes, device, args.jobs, timeout_s=min(30.0, args.budget_s / 2))
        print(f"pre-compiled in {settings['precompile']['seconds']} s: {settings['precompile']}")
    states = [prepare(s, device) for s in shapes]
    flush = not args.no_flush_l2

    def over_budget() -> bool:
        return time.perf_counter() - t0 > args.budget_s

    # Pass 1: baselines for every shape. Pass 2: the other candidates, round-robin over the shapes.
    for st in states:
        st.results["unfused"] = measure(
            st.shape, lambda st=st: unfused(st.shape, st.inputs), device, st.ref, st.allowed_err, flush
        )
        for plan in st.plans[:2]:
            st.results[plan.name] = measure(
                st.shape, plan_call(st.shape, st.inputs, plan), device, st.ref, st.allowed_err, flush
            )
    write_json(out, states, device, settings)
    for i in range(2, max(len(st.plans) for st in states)):
        for st in states:
            if i >= len(st.plans):
                continue
            plan = st.plans[i]
            if over_budget():
                st.results[plan.name] = {
                    "status": "skipped",
                    "error": f"time budget of {args.budget_s} s spent",
                }
                continue
            st.results[plan.name] = measure(
                st.shape, plan_call(st.shape, st.inputs, plan), device, st.ref, st.allowed_err, flush
            )
        write_json(out, states, device, settings)
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out, states, device, settings)
    print_table(states)
    for entry in summary(states, device):
        print(
            f"best {Shape(entry['hidden'], entry['rows'], entry['segments'], entry['dtype'], entry['vocab']).label}: "
            f"{entry['plan']}  kernel x{entry.get('speedup_kernel', '?')} eager x{entry.get('speedup_eager', '?')} vs unfused"
        )
    print(f"{settings['seconds']} s; wrote {out}")
    return out


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90 (no GPU needed)
# --------------------------------------------------------------------------------------------------
def _aot_segments_kernel(kernel, launch_meta: dict, dtype: str, out_dtype: str, arch: int, **constexprs):
    """Compile one of the two segment kernels (fused GEMM, GEMV) for ``cuda:<arch>`` with what the JIT
    specialises at launch (unit inner strides, 16-divisible pointers, strides and sizes; M
    unspecialised)."""
    meta = dict(launch_meta)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    unit = dict(stride_s0k=1, stride_s1k=1, stride_s2k=1, stride_wk=1, stride_on=1)
    types = {n: "i32" for n in kernel.arg_names}
    types.update({n: f"*{dtype}" for n in ("bias_ptr", "w_ptr", "seg0_ptr", "seg1_ptr", "seg2_ptr")})
    types.update(ids_ptr="*i64", out_ptr=f"*{out_dtype}")
    return _aot_compile(kernel, types, dict(meta, **constexprs, **unit), options, arch)


def aot_compile_fused(launch_meta: dict, dtype: str, arch: int = 90):
    """Compile the fused GEMM for ``cuda:<arch>`` (split-K writes an fp32 workspace)."""
    out_dtype = "fp32" if launch_meta["SPLIT_K"] > 1 else dtype
    kernel = _fdi()._fused_segments_linear_kernel
    return _aot_segments_kernel(kernel, launch_meta, dtype, out_dtype, arch, FP32_DOT=dtype == "fp32")


def aot_report(plan, shape: Shape, arch: int) -> dict:
    """Compile one fused plan for ``shape`` and report shared memory and software pipelining: every
    A and W load of the K loop must have become an async copy (the only plain loads left are the
    token ids and the bias, outside the loop)."""
    import re

    fdi = _fdi()
    dtype = DTYPES[shape.dtype]
    launch = fdi._make_launch(
        plan,
        shape.rows,
        shape.hidden,
        shape.segments,
        dtype,
        fdi.DEFAULT_NUM_SMS,
        shape.segments == 2,
        shape.segments == 2,
    )
    report = {"plan": plan.name, "shape": shape.label}
    try:
        compiled = aot_compile_fused(launch.meta, shape.dtype, arch)
    except Exception as err:
        return {**report, "ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
    ttgir = compiled.asm["ttgir"]
    plain_loads = len(re.findall(r"= tt\.load ", ttgir))
    allowed_plain = int(shape.segments == 2) * 2  # token ids + bias
    shared = compiled.metadata.shared
    report.update(
        shared_bytes=shared,
        async_copies=ttgir.count("ttg.async_copy_global_to_local"),
        plain_loads=plain_loads,
        pipelined=plain_loads <= allowed_plain and "ttg.async_copy_global_to_local" in ttgir,
        fits=shared <= SM90_MAX_SHARED,
    )
    report["ok"] = report["pipelined"] and report["fits"]
    return report


def aot_gemv_report(plan, shape: Shape, arch: int) -> dict:
    """Compile one GEMV plan for ``shape`` (1 row, the decode case) and check that it fits in shared
    memory; its loads are plain vector loads by design (no async copies to check)."""
    fdi = _fdi()
    launch = fdi._make_launch(
        plan, 1, shape.hidden, shape.segments, DTYPES[shape.dtype], fdi.DEFAULT_NUM_SMS, True, True
    )
    report = {"gemv_plan": plan.name, "shape": shape.label}
    try:
        compiled = _aot_segments_kernel(
            fdi._segments_gemv_kernel, launch.meta, shape.dtype, shape.dtype, arch
        )
    except Exception as err:
        return {**report, "ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
    shared = compiled.metadata.shared
    return {**report, "shared_bytes": shared, "ok": shared <= SM90_MAX_SHARED}


def _aot_compile(kernel, types: dict, constexprs: dict, options: dict, arch: int):
    """Compile ``kernel`` for ``cuda:<arch>``: ``types`` maps the runtime arguments to Triton types
    (pointers and every int but M get the 16-divisibility the JIT would see)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in constexprs and n != "M"}
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constexprs.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def aot_helper_kernels(arch: int, dtype: str = "bf16") -> dict:
    """Compile the split-K reduction and the gather_mm packing kernel; ``{name: {"ok": ..}}``."""
    fdi = _fdi()
    jobs = {
        "splitk_reduce": (
            fdi._splitk_reduce_kernel,
            dict(
                part_ptr="*fp32", out_ptr=f"*{dtype}", bias_ptr=f"*{dtype}", M="i32", N="i32", stride_om="i32"
            ),
            dict(stride_on=1, HAS_BIAS=True, SPLIT_K=4, BLOCK=fdi.REDUCE_BLOCK),
        ),
        "pack_segments": (
            fdi._pack_segments_kernel,
            {"dst_ptr": f"*{dtype}", "ids_ptr": "*i64", "M": "i32", "K": "i32", "seg0_len": "i32"}
            | {f"seg{i}_ptr": f"*{dtype}" for i in range(3)}
            | {f"stride_s{i}m": "i32" for i in range(3)},
            dict(
                stride_s0k=1,
                stride_s1k=1,
                stride_s2k=1,
                GATHER_SEG0=True,
                NUM_SEGMENTS=2,
                BLOCK=fdi.PACK_BLOCK,
            ),
        ),
    }
    reports = {}
    for name, (kernel, types, constexprs) in jobs.items():
        try:
            _aot_compile(kernel, types, constexprs, {"num_warps": 4, "num_stages": 1}, arch)
            reports[name] = {"ok": True}
        except Exception as err:
            reports[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
    return reports


def run_aot_check(args) -> int:
    """Compile the default plans of every sweep shape (the shape heuristic's and the ones built in for
    ``--arch``; with ``--all`` every candidate) for sm_90; exit status 1 when a default plan does not
    compile, fit in shared memory, or pipeline."""
    fdi = _fdi()
    shapes = sweep_shapes(args)
    seen: set[tuple] = set()
    failures = 0
    for shape in shapes:
        plans = candidate_plans(shape, torch.device("cpu"))  # no GPU: the heuristic's plan first
        capability = (args.arch // 10, args.arch % 10)
        builtin = fdi._default_plan(
            shape.rows, shape.hidden, shape.segments, DTYPES[shape.dtype], fdi.DEFAULT_NUM_SMS, capability
        )
        for rank, plan in [(0, builtin), *enumerate(plans if args.all else plans[:1])]:
            if plan.path == "gemv":
                key = (plan.name, shape.hidden, shape.segments, shape.dtype)
                if key not in seen:
                    seen.add(key)
                    report = aot_gemv_report(plan, shape, args.arch)
                    failures += int(rank == 0 and not report["ok"])
                    print(json.dumps(report))
                continue
            if plan.path != "fused":
                continue
            config = plan.config or fdi.heuristic_config(
                shape.rows, shape.hidden, shape.segments, DTYPES[shape.dtype].itemsize, fdi.DEFAULT_NUM_SMS
            )
            key = (config.name, shape.hidden % config.block_k == 0, shape.segments, shape.dtype)
            if key in seen:
                continue
            seen.add(key)
            report = aot_report(fdi.Plan("fused", config), shape, args.arch)
            failures += int(rank == 0 and not report["ok"])
            print(json.dumps(report))
    for name, report in aot_helper_kernels(args.arch).items():
        failures += int(not report["ok"])
        print(json.dumps({"kernel": name, **report}))
    print(
        f"aot-check sm_{args.arch}: {len(seen)} GEMM/GEMV kernels, {failures} default plan(s) or helper kernels failing"
    )
    return 1 if failures else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--hidden", type=int, nargs="+", help=f"default {DEFAULT_HIDDEN} (dry run: {DRY_RUN_HIDDEN})"
    )
    p.add_argument("--rows", type=int, nargs="+", help=f"default {DEFAULT_ROWS} (dry run: {DRY_RUN_ROWS})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--eagle3", action="store_true", help=f"add the [N, 3H] -> H variant at H={EAGLE3_HIDDEN}")
    p.add_argument(
        "--budget-s", type=float, default=50.0, help="start no new candidate after this many seconds"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=min(8, max(1, (os.cpu_count() or 2) // 2)),
        help="compile workers (0: none)",
    )
    p.add_argument("--no-flush-l2", action="store_true", help="kernel times with a warm L2")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes (plumbing check); without a GPU through the Triton interpreter",
    )
    p.add_argument(
        "--aot-check", action="store_true", help="compile the default plans for --arch, no GPU needed"
    )
    p.add_argument(
        "--all", action="store_true", help="with --aot-check: every candidate, not only the defaults"
    )
    p.add_argument("--arch", type=int, default=90)
    p.add_argument(
        "--out", default=None, help="result file (default: bench/results/...; dry run: the temp dir)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.aot_check:
        os.environ["TRITON_INTERPRET"] = "0"
        return run_aot_check(args)
    if args.dry_run and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before eagle_kernels imports triton
        args.jobs = 0
    run_sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
