"""speculative="auto"'s plain steps against plain decoding: what the loop around a plain step costs.

    python bench/bench_adaptive.py                                # tiny-code, bfloat16, T = 1, B 1
    python bench/bench_adaptive.py --dtype float32 --temperature 0 1 --batch 1 4 --repeats 9

Where speculation does not pay (sampling at T = 1 from a small pair, large batches on a CPU),
``speculative="auto"`` decodes plainly almost all the time (:mod:`eagle.adaptive`), and is then only as
fast as its plain steps. Each plain step runs inside the speculative loop: the emission, the policy's
record, the retirement of finished rows, the draft's backlog. This script times that loop forced to
plain steps (a policy that never speculates) against plain decoding (``generate_plain``) on the same
prompts, in one process, in alternating order (reversed every other repeat):

* ``vanilla``: ``generate_plain``;
* ``auto_step``: the loop with an emission per plain step (``plain_chunk=1``: ``generate()`` and
  ``stream()`` before session 32);
* ``auto_stream``: chunks that also end after ~50 ms (``plain_chunk_seconds=STREAM_CHUNK_SECONDS``:
  ``stream()``'s since session 32);
* ``auto_chunk``: the loop with a plain phase's steps back to back (``plain_chunk=new tokens``:
  ``generate()``'s since session 32).

Each cell's figure is the median over repeats of its tokens/s, and its ratio that median over
vanilla's in the same run. Every cell must give vanilla's tokens (greedy, or sampled with the same
seed: the loop draws a plain step as plain decoding does); the script exits non-zero otherwise.
Writes ``bench/results/adaptive_plain_<target>_<dtype>[_<name>].json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_loop import prompts_for  # noqa: E402
from bench.utils import machine_info, save_json  # noqa: E402
from eagle.adaptive import PLAIN, AutoSpeculation  # noqa: E402
from eagle.api import STREAM_CHUNK_SECONDS, load  # noqa: E402
from eagle.models.generate_plain import generate_plain  # noqa: E402
from eagle.models.weights import resolve_dtype  # noqa: E402
from eagle.speculate import SamplingParams  # noqa: E402

CELLS = ("vanilla", "auto_step", "auto_stream", "auto_chunk")


class AlwaysPlain(AutoSpeculation):
    """A policy that decodes plainly throughout (one endless plain phase)."""

    def next_mode(self) -> str:
        return PLAIN

    def plain_forwards_ahead(self) -> int:
        return 1 << 30

    def record(self, tokens: int, seconds: float, rows: int = 1, forwards: int = 1) -> None:
        self.plain_steps += forwards


def run_cell(model, cell: str, batches, new_tokens: int, temperature: float) -> tuple[list, float]:
    """Every row's tokens over ``batches`` (each run as one batch, seed 0) and the seconds taken."""
    sampling = SamplingParams(temperature=temperature)
    rows = []
    started = time.perf_counter()
    for batch in batches:
        if cell == "vanilla":
            rows += generate_plain(model.target, batch, new_tokens, temperature=temperature, seed=0)
            continue
        decoder = model._decoder("chain", len(batch))
        tokens = [[] for _ in batch]
        chunk = 1 if cell == "auto_step" else new_tokens
        seconds = STREAM_CHUNK_SECONDS if cell == "auto_stream" else None
        emissions = decoder.run(
            batch,
            new_tokens,
            sampling,
            seed=0,
            auto=AlwaysPlain(),
            plain_chunk=chunk,
            plain_chunk_seconds=seconds,
        )
        for e in emissions:
            for row, new in zip(e.rows, e.tokens):
                tokens[row].extend(new)
        rows += tokens
    return rows, time.perf_counter() - started


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--draft", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--temperature", nargs="+", type=float, default=[1.0])
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--num-prompts", type=int, default=4, help="prompts per batch size (batches of --batch)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="", help="suffix of the results file")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = load(args.target, args.draft, dtype=resolve_dtype(args.dtype))
    mismatches, results = [], []
    for B in args.batch:
        prompts = prompts_for(model, args.num_prompts, 100)
        batches = [prompts[i : i + B] for i in range(0, len(prompts), B)]
        for temperature in args.temperature:
            for cell in CELLS:  # warm-up (first calls at these shapes)
                run_cell(model, cell, batches[:1], 8, temperature)
            want, _ = run_cell(model, "vanilla", batches, args.new_tokens, temperature)
            seconds = {cell: [] for cell in CELLS}
            for r in range(args.repeats):
                for cell in CELLS if r % 2 == 0 else CELLS[::-1]:
                    got, s = run_cell(model, cell, batches, args.new_tokens, temperature)
                    seconds[cell].append(s)
                    if got != want:
                        mismatches.append((B, temperature, cell))
            tokens = sum(len(row) for row in want)
            speed = {cell: tokens / statistics.median(s) for cell, s in seconds.items()}
            line = f"B {B}, T {temperature:g}: vanilla {speed['vanilla']:.0f} tok/s"
            for cell in CELLS[1:]:
                line += f"; {cell} {speed[cell]:.0f} ({speed[cell] / speed['vanilla']:.3f}x)"
            print(line)
            results.append(
                {
                    "batch": B,
                    "temperature": temperature,
                    "tokens_per_s": speed,
                    "ratio_to_vanilla": {cell: speed[cell] / speed["vanilla"] for cell in CELLS},
                    "seconds": seconds,
                }
            )
    if mismatches:
        print(f"\nTOKENS DIFFER from plain decoding in {mismatches}", file=sys.stderr)
        return 1
    print("every cell gave plain decoding's tokens")
    if not args.no_save:
        name = f"adaptive_plain_{args.target}_{args.dtype}{'_' + args.name if args.name else ''}.json"
        path = save_json(name, {"settings": vars(args), "machine": machine_info(), "results": results})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
