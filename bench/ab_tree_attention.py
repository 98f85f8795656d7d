"""Two versions of the Triton ``tree_attention`` kernel timed against each other, in one process.

A kernel change is judged against its predecessor in the same run (the GPUs are shared and noisy):
the working tree's ``eagle_kernels.tree_attention`` (``new``) and a copy of the module from an older
commit (``old``), loaded under another op namespace, run the same inputs with the same launch plans,
alternating call for call over ``--rounds`` rounds (the order flips each round). Each is checked
against ``tree_attention_ref`` before it is timed.

    git show HEAD~1:eagle_kernels/tree_attention.py > /tmp/old_tree_attention.py
    python bench/ab_tree_attention.py /tmp/old_tree_attention.py                 # goal shapes, CUDA
    python bench/ab_tree_attention.py OLD --shapes tree64-B32 --configs default tma m128_n64_w8_s4_tma
    python bench/ab_tree_attention.py OLD --interpret                            # tiny shapes on CPU
    python bench/ab_tree_attention.py OLD --new VARIANT.py                        # two files, neither the tree

``--new`` times another file in place of the working tree's module (a variant kept beside the tree:
several variants can be compared in one GPU session, each against the same baseline).

Shapes are ``bench/sweep_tree_attention.py``'s (default: issue 3's goal shapes and the T = 1 decode at
batch 32). A configuration is ``default`` (each version's own :func:`plan_launch`), ``tma`` (the
default plan with ``kv_tma``) or tokens ``m<block_m> n<block_n> w<warps> s<stages> k<splits> [tma]``
joined by spaces, ``_`` or ``,``.
Times are kernel times (``bench.utils.measure_cuda_kernel_time``: calls captured in a CUDA graph, L2
flushed before each); the median over rounds is reported, and ``old / new`` (> 1: the new kernel is
faster). ``--out`` (default ``bench/results/ab_tree_attention_<GPU>.json``) gets every round's time.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if "--interpret" in sys.argv:  # before the first triton import
    os.environ["TRITON_INTERPRET"] = "1"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import sweep_tree_attention as sweep  # noqa: E402

# the module, not the function the package re-exports under the same name
new_module = importlib.import_module("eagle_kernels.tree_attention")

BASELINE_NAMESPACE = "eagle_ab_baseline"
NEW_NAMESPACE = "eagle_ab_new"  # --new FILE
DEFAULT_SHAPES = ("tree64-B1", "tree64-B8", "tree64-B32", "decode-B32")
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


def load_baseline(path: Path, namespace: str = BASELINE_NAMESPACE):
    """The module at ``path`` (an ``eagle_kernels/tree_attention.py`` of another commit), imported as
    ``eagle_kernels._ab_<namespace>_tree_attention`` with its ops registered under ``namespace``
    (the working tree's module holds ``eagle::``). Triton reads a kernel's source back from its file,
    so the renamed source is written to a temporary file first."""
    source = path.read_text()
    if '"eagle::tree_attention"' not in source or "def _tree_attention_triton(" not in source:
        raise SystemExit(f"{path}: not an eagle_kernels/tree_attention.py (no eagle::tree_attention op)")
    if "class LaunchConfig" not in source:
        raise SystemExit(f"{path}: a tree_attention.py from before LaunchConfig, which this comparison needs")
    renamed = source.replace('"eagle::', f'"{namespace}::')
    folder = Path(tempfile.mkdtemp(prefix="ab_tree_attention_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # Triton reads the file until then
    copy = folder / "baseline_tree_attention.py"
    copy.write_text(renamed)
    name = f"eagle_kernels._ab_{namespace}_tree_attention"
    spec = importlib.util.spec_from_file_location(name, copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parse_config(text: str, module):
    """``module.LaunchConfig`` for ``text`` (see the module docstring); None for ``default``. Words
    are separated by spaces, ``_`` or ``,`` (``m128_n64_w8_s4_tma`` stays one shell word)."""
    words = text.replace("_", " ").replace(",", " ").split()
    if words == ["default"]:
        return None
    fields = {"m": "block_m", "n": "block_n", "w": "num_warps", "s": "num_stages", "k": "num_splits"}
    kwargs: dict = {}
    for word in words:
        if word == "tma":
            kwargs["kv_tma"] = True
        elif word[:1] in fields and word[1:].isdigit():
            kwargs[fields[word[0]]] = int(word[1:])
        else:
            raise SystemExit(
                f"bad configuration word {word!r} in {text!r}: use m/n/w/s/k<int>, tma or default"
            )
    return module.LaunchConfig(**kwargs)


def compare_shape(shape, configs: list[str], modules: dict, rounds: int, device, timer) -> list[dict]:
    """One row per configuration: each version's checked error and per-round kernel times
    (``timer``: the sweep's CudaTimer, or its WallTimer in the interpreter)."""
    dtype = sweep.shape_dtype(shape, torch.bfloat16 if device.type == "cuda" else torch.float32)
    inputs = sweep.make_shape_inputs(shape, device, dtype)
    scale = shape.D**-0.5
    want = sweep.reference(inputs, scale)
    rows = []
    for text in configs:
        calls, row = {}, {"config": text, "versions": {}}
        for name, module in modules.items():
            config = parse_config(text, module)

            def call(module=module, config=config):
                return module._tree_attention_triton(*inputs, scale, config)

            entry = row["versions"].setdefault(name, {"times_us": []})
            entry["plan"] = plan_of(module, shape, config, device, dtype)
            try:
                err = (call().float() - want).abs().max().item()
            except Exception as exc:  # a plan that does not compile or launch: reported, not fatal
                entry["status"] = failure(exc)
                continue
            entry["max_abs_err"] = err if math.isfinite(err) else str(err)  # JSON has no NaN
            if not err <= TOLERANCE[dtype]:  # NaN fails too
                entry["status"] = f"wrong (max abs err {err:.3g})"
                continue
            calls[name] = call
        order = list(calls)
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                if name not in calls:  # its timing failed in an earlier round
                    continue
                try:
                    row["versions"][name]["times_us"].append(timer.kernel_s(calls[name]) * 1e6)
                except Exception as exc:  # e.g. no CUDA graph capture: this version is not timed
                    row["versions"][name]["status"] = f"timing {failure(exc)}"
                    del calls[name]
        for name in calls:
            entry = row["versions"][name]
            entry["status"] = "ok"
            entry["median_us"] = statistics.median(entry["times_us"])
        if len(calls) == 2:
            row["old_over_new"] = row["versions"]["old"]["median_us"] / row["versions"]["new"]["median_us"]
        rows.append(row)
        print_row(shape.name, row)
    return rows


def failure(exc: Exception) -> str:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"error: {type(exc).__name__}: {first}"


def plan_of(module, shape, config, device, dtype) -> str:
    """The version's own resolved launch plan for this shape and configuration ("n/a" where its
    ``plan_launch`` takes other arguments)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    G = shape.Hq // shape.Hkv
    try:
        plan = module.plan_launch(
            shape.B, shape.Hkv, shape.T, G, shape.s_max, shape.D, sms, config, dtype.itemsize
        )
    except TypeError as exc:
        return f"n/a ({exc})"
    return str(plan)


def print_row(shape_name: str, row: dict) -> None:
    cells = []
    for name in ("new", "old"):
        entry = row["versions"].get(name, {})
        ok = entry.get("status") == "ok"
        cells.append(f"{name} " + (f"{entry['median_us']:9.1f} us" if ok else str(entry.get("status", "-"))))
    ratio = f"old/new {row['old_over_new']:.3f}" if "old_over_new" in row else ""
    print(f"  {shape_name:12s} {row['config']:22s} {cells[0]:16s} {cells[1]:16s} {ratio}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    # no abbreviations: --interpret is looked for in sys.argv before triton is imported
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("baseline", type=Path, help="an eagle_kernels/tree_attention.py of another commit")
    p.add_argument(
        "--new", type=Path, default=None, help="a module file to time instead of the working tree's"
    )
    p.add_argument("--shapes", nargs="*", default=None, help="sweep_tree_attention shape names")
    p.add_argument("--configs", nargs="*", default=["default", "tma"], help="launch configurations")
    p.add_argument("--rounds", type=int, default=5, help="alternating timings per version")
    p.add_argument(
        "--interpret", action="store_true", help="tiny shapes on CPU through the Triton interpreter"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/...)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--interpret needs TRITON_INTERPRET=1 before triton is first imported")
    if not args.interpret and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --interpret")
    device = torch.device("cpu" if args.interpret else "cuda")
    # kernel times from CUDA-graph replays (L2 flushed); the interpreter's wall clock is plumbing only
    timer = sweep.WallTimer() if args.interpret else sweep.CudaTimer(eager_calls=0, rep_ms=40)
    known = {s.name: s for s in (sweep.INTERPRET_SHAPES if args.interpret else sweep.GPU_SHAPES)}
    names = args.shapes or (
        [s.name for s in sweep.INTERPRET_SHAPES] if args.interpret else list(DEFAULT_SHAPES)
    )
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {sorted(known)}")
    new = new_module if args.new is None else load_baseline(args.new, NEW_NAMESPACE)
    modules = {"new": new, "old": load_baseline(args.baseline)}
    torch.set_num_threads(1)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    print(
        f"# tree_attention A/B on {gpu or 'CPU (Triton interpreter)'}: new = {args.new or 'working tree'}, "
        f"old = {args.baseline}"
    )
    report = {
        "gpu": gpu,
        "baseline": str(args.baseline),
        "new": str(args.new) if args.new else "working tree",
        "rounds": args.rounds,
        "shapes": {},
    }
    out = args.out
    if out is None and gpu is not None:
        out = ROOT / "bench" / "results" / f"ab_tree_attention_{gpu.replace(' ', '-')}.json"
    for name in names:
        report["shapes"][name] = compare_shape(known[name], args.configs, modules, args.rounds, device, timer)
        if out is not None:  # after every shape: a run cut by an outer time box keeps what it finished
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1))
    if out is not None:
        print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
