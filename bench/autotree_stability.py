"""How often ``tree="dynamic"`` picks the same tree from one process to the next.

``eagle.autotree`` times the target's verify forward at several widths and a draft level at several
expansion widths once per process, and picks the tree from those times. On a noisy machine a busy
moment during that probe moves the choice. This script starts ``--processes`` fresh processes per
probe method, alternating the methods, each loading the pair and probing once, and reports per method
the trees chosen, the spread of each width's time across processes and the probe's wall time:

* ``sequential``: the probe before session 20, rebuilt here as the baseline: each width timed in turn,
  best of 3 after one warm-up call, no envelope;
* ``interleaved``: :func:`eagle.autotree.time_verify` / :func:`~eagle.autotree.time_draft_levels`
  (every width once per round, alternating the order, best of ``ROUNDS`` rounds; the tree is chosen
  after the lower envelope, as on CPU).

Each record keeps the raw times and those after the envelope; the spreads are computed after it for
both methods.

    python bench/autotree_stability.py --processes 12 --threads 2 --load 1 --name autotree_stability_cpu

``--load N`` runs N pure-Python busy loops beside the probes, as another tenant of a shared machine
would. Writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.utils import save_json  # noqa: E402
from eagle import autotree  # noqa: E402

METHODS = ("sequential", "interleaved")


@torch.inference_mode()
def _sequential_best(calls: dict, device: torch.device, repeats: int = 3) -> dict:
    """The probe before session 20: each call warmed up once, then the best of ``repeats``, in turn."""
    best = {}
    for key, fn in calls.items():
        fn()
        times = []
        for _ in range(repeats):
            autotree._sync(device)
            t0 = time.perf_counter()
            fn()
            autotree._sync(device)
            times.append(time.perf_counter() - t0)
        best[key] = min(times)
    return best


def probe(method: str, target, head, batch_size: int) -> tuple[dict[int, float], dict[int, float]]:
    """Raw (verify seconds per width, draft-level seconds per expansion width) by ``method``, before
    any envelope."""
    widths = autotree.WIDTHS.get(target.device.type, autotree.WIDTHS["cuda"])
    rows = sorted(autotree.level_rows(widths))
    if method == "interleaved":
        return (
            autotree.time_verify(target, batch_size, widths, raw=True),
            autotree.time_draft_levels(head, batch_size, rows, raw=True),
        )
    with torch.inference_mode():
        verify = {}
        for w in widths:  # each width with its own cache, as the old probe did
            cache = autotree._prefixed_cache(target, batch_size, w)
            verify |= _sequential_best(
                {w: autotree._verify_call(target, cache, batch_size, w)}, target.device
            )
        level = {}
        for k in rows:
            cache = autotree._prefixed_cache(head, batch_size, k)
            level |= _sequential_best(
                {k: autotree._draft_level_call(head, cache, batch_size, k)}, head.device
            )
    return verify, level


def worker(args: argparse.Namespace) -> None:
    """One probe in this process: prints a JSON record of the tree chosen and the times (ms), raw and
    after the lower envelope (which the interleaved probe, like eagle.autotree on CPU, chooses from)."""
    import eagle

    torch.set_num_threads(args.threads)
    model = eagle.load(args.target, device=args.device, dtype=args.dtype)
    if model.head is None:
        raise SystemExit("autotree_stability: the target needs a draft head")
    prior = model.prior_acceptance(None)
    t0 = time.perf_counter()
    verify, level = probe(args.worker, model.target, model.head, args.batch)
    seconds = time.perf_counter() - t0
    env_verify, env_level = autotree.lower_envelope(verify), autotree.lower_envelope(level)
    chosen = (env_verify, env_level) if args.worker == "interleaved" else (verify, level)
    tree = autotree.choose_from_timings(*chosen, prior.accept_rate, prior.gain)
    ms = lambda times: {n: t * 1e3 for n, t in times.items()}  # noqa: E731
    record = {
        "tree": f"{tree.depth}/{tree.topk}/{tree.total_tokens}",
        "probe_s": seconds,
        "verify_ms": ms(env_verify),
        "level_ms": ms(env_level),
        "verify_ms_raw": ms(verify),
        "level_ms_raw": ms(level),
    }
    print(json.dumps(record))


def _busy_loops(n: int) -> list[subprocess.Popen]:
    """``n`` processes spinning in pure Python (killed by the caller)."""
    spin = "import time\nend = time.time() + 3600\nwhile time.time() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(n)]


def _spread(values: list[float]) -> float:
    """max / min across processes."""
    return max(values) / min(values) if values and min(values) > 0 else math.nan


def summarize(runs: list[dict]) -> dict:
    """The trees one method chose over its processes, and each width's spread across them (times
    after the lower envelope for both methods, so that the spreads compare the timing order alone)."""
    trees = Counter(r["tree"] for r in runs)
    widths = runs[0]["verify_ms"].keys()
    rows = runs[0]["level_ms"].keys()
    return {
        "trees": dict(trees.most_common()),
        "modal_share": trees.most_common(1)[0][1] / len(runs),
        "distinct": len(trees),
        "verify_spread": {w: _spread([r["verify_ms"][w] for r in runs]) for w in widths},
        "level_spread": {k: _spread([r["level_ms"][k] for r in runs]) for k in rows},
        "probe_s_median": statistics.median(r["probe_s"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the worker processes (or, with ``--worker``, be one) and print / write the summary."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="tiny-code")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=10, help="fresh processes per method")
    parser.add_argument("--load", type=int, default=0, help="busy loops running beside the probes")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--name", default=None, help="write bench/results/<name>.json")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    common = ["--target", args.target, "--device", args.device, "--dtype", args.dtype]
    common += ["--batch", str(args.batch), "--threads", str(args.threads)]
    loops = _busy_loops(args.load)
    try:
        for i in range(args.processes):
            for method in args.methods if i % 2 == 0 else args.methods[::-1]:  # alternate who goes first
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, *common]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
                if done.returncode != 0:
                    raise SystemExit(f"autotree_stability: worker failed:\n{done.stderr[-2000:]}")
                record = json.loads(done.stdout.strip().splitlines()[-1])
                runs[method].append(record)
                print(
                    f"{method:>12} {i + 1:>3}: {record['tree']:>8}  probe {record['probe_s']:.2f} s",
                    flush=True,
                )
    finally:
        for p in loops:
            p.kill()
            p.wait()
    summary = {m: summarize(r) for m, r in runs.items()}
    print(f"\n{'method':>12} | modal share | distinct | trees | verify spread (max/min) | probe s")
    for m, s in summary.items():
        spread = " ".join(f"{w}:{v:.2f}" for w, v in s["verify_spread"].items())
        choice = f"{s['modal_share']:.2f} | {s['distinct']} | {s['trees']}"
        print(f"{m:>12} | {choice} | {spread} | {s['probe_s_median']:.2f}")
    if args.name:
        settings = {k: v for k, v in vars(args).items() if k not in ("worker", "name")}
        path = save_json(f"{args.name}.json", {"settings": settings, "summary": summary, "runs": runs})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
