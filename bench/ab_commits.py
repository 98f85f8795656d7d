"""Two checkouts of the package timed end to end against each other: did a range of commits change
EAGLE's speed? (``bench/ab_builds.py`` compares two builds of the extension only.)

Each side is a directory holding a checkout with its extension built in place, e.g. an old commit in
a worktree:

    git worktree add /tmp/old 16ca902 && (cd /tmp/old && python setup.py build_ext --inplace)
    python bench/ab_commits.py /tmp/old . --rounds 3 -- --methods vanilla eagle_chain eagle_dynamic \\
        --batch 1 --temperature 0 --new-tokens 128 --num-prompts 4 --repeats 3 --threads 1 --dtype bfloat16

Each round runs ``bench/e2e.py`` (the arguments after ``--``) once from each side, in a fresh process
importing that side's code (``PYTHONPATH``), old first on odd rounds and new first on even ones. The
machine's speed drifts between processes, so what is compared is each run's own ratios to vanilla
decoding (its speedup and paired speedup per method), never tokens/s across runs. Prints the median
over rounds of each side's ratios, and new / old; ``--out FILE`` writes every run's figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_side(checkout: Path, e2e_args: list[str], out_dir: Path, name: str) -> dict:
    """One ``bench/e2e.py`` run of ``checkout``'s code; its result JSON."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, "bench/e2e.py", *e2e_args, "--out", str(out_dir), "--name", name]
    command += ["--no-plot", "--no-progress"]
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{checkout}: bench/e2e.py failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads((out_dir / f"{name}.json").read_text())


def ratios(result: dict) -> dict[str, dict]:
    """Per (method, batch, temperature): speedup, paired speedup and tau of one run."""
    out = {}
    for row in result["results"]:
        if row.get("tokens_per_s") is None or row["method"] == "vanilla":
            continue
        key = f"{row['method']} B{row['batch']} T{row['temperature']:g}"
        out[key] = {
            "speedup": row.get("speedup_vs_vanilla"),
            "speedup_paired": row.get("speedup_paired"),
            "tau": row.get("tau"),
        }
    return out


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Median over rounds of each side's speedups, and new / old."""
    table = {}
    for key in ratios(runs["old"][0]):
        row = {}
        for side in ("old", "new"):
            for stat in ("speedup", "speedup_paired", "tau"):
                values = [ratios(r)[key][stat] for r in runs[side] if ratios(r)[key][stat] is not None]
                row[f"{side}_{stat}"] = statistics.median(values) if values else None
        for stat in ("speedup", "speedup_paired"):
            old, new = row[f"old_{stat}"], row[f"new_{stat}"]
            row[f"new_over_old_{stat}"] = new / old if old and new else None
        table[key] = row
    return table


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    e2e_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="checkout of the baseline, its extension built")
    parser.add_argument("new", type=Path, help="checkout to compare, its extension built")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side (default 3)")
    parser.add_argument("--out", type=Path, help="write every run's figures and the summary as JSON")
    args = parser.parse_args(own)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    for side in (args.old, args.new):
        if not (side / "bench" / "e2e.py").is_file():
            parser.error(f"{side} holds no bench/e2e.py: not a checkout of this package")
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, args.rounds + 1):
            order = ("old", "new") if r % 2 else ("new", "old")
            for side in order:
                runs[side].append(run_side(sides[side], e2e_args, Path(tmp), f"{side}_r{r}"))
                print(f"round {r}: {side} done", flush=True)
    table = summarise(runs)
    print(f"{'method':28s} {'old speedup':>12s} {'new speedup':>12s} {'new/old':>8s} {'paired new/old':>15s}")
    for key, row in table.items():
        paired = row["new_over_old_speedup_paired"]
        print(
            f"{key:28s} {row['old_speedup']:12.3f} {row['new_speedup']:12.3f} "
            f"{row['new_over_old_speedup']:8.3f} {paired if paired is None else round(paired, 3)!s:>15s}"
        )
    print(f"medians over {args.rounds} rounds of each run's own ratios to vanilla")
    if args.out:
        machine = {side: [r["machine"] for r in runs[side]] for side in runs}
        args.out.write_text(
            json.dumps(
                {"sides": {k: str(v) for k, v in sides.items()}, "e2e_args": e2e_args, "rounds": args.rounds,
                 "summary": table, "runs": runs, "machine": machine},
                indent=1,
            )
            + "\n"
        )  # fmt: skip
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
