"""A head in another dtype than its target (``eagle.load(draft_dtype=...)``): tokens/s and tau of EAGLE
with the head in the target's dtype and in ``--draft-dtype``, against plain decoding, in one process.

    python bench/bench_draft_dtype.py                        # tiny-code: float32 target, bfloat16 head
    python bench/bench_draft_dtype.py --trees dynamic chain --batch 1 4 --new-tokens 128 --repeats 3

The head only proposes, so every speculative run must reproduce plain decoding's tokens (greedy); the
script checks that and exits non-zero otherwise. Each repeat runs plain decoding and every (tree,
head) cell once, over the same held-out prompts, in reverse order every other repeat; a cell's figure
is the median over repeats of its tokens/s, and its speedup the ratio of that median to plain
decoding's in the same run. tau is per row (tokens per round of each sequence).
Writes bench/results/draft_dtype_<target>_<dtype>_vs_<draft dtype>.json.
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
from bench.utils import save_json  # noqa: E402
from eagle.api import load  # noqa: E402
from eagle.models.generate_plain import generate_plain  # noqa: E402
from eagle.models.weights import resolve_dtype  # noqa: E402
from eagle.speculate import SamplingParams, SpeculativeDecoder  # noqa: E402


def speculative_tokens(
    decoder: SpeculativeDecoder, prompts, new_tokens: int, temperature: float = 0.0
) -> tuple[list[list[int]], int, list[int]]:
    """Tokens of every prompt (run together as one batch; greedy, or sampled with seed 0), the
    rounds after the prefill, and every row's tokens per round (tau = their mean: a batch runs until
    its slowest row finishes, so rounds * B overcounts the forwards of the rows that finished first)."""
    tokens: dict[int, list[int]] = {row: [] for row in range(len(prompts))}
    forwards = 0
    for emission in decoder.run(prompts, new_tokens, SamplingParams(temperature=temperature), seed=0):
        forwards += 1
        for row, new in zip(emission.rows, emission.tokens):
            tokens[row].extend(new)
    lengths = [n for row in decoder.accept_lengths().values() for n in row]
    return [tokens[row] for row in range(len(prompts))], forwards - 1, lengths


def timed_plain(target, batches, new_tokens: int, temperature: float = 0.0) -> tuple[list[list[int]], float]:
    """Plain tokens (greedy, or sampled with seed 0) of every row of every batch, and the seconds it
    took."""
    t0 = time.perf_counter()
    tokens = [
        row
        for batch in batches
        for row in generate_plain(target, batch, new_tokens, temperature=temperature, seed=0)
    ]
    return tokens, time.perf_counter() - t0


def timed_speculative(
    decoder, batches, new_tokens: int, temperature: float = 0.0
) -> tuple[list[list[int]], int, float, float]:
    """Speculative tokens (greedy, or sampled with seed 0) of every row of every batch, the rounds,
    the seconds it took and tau (tokens per round per row, over every row's rounds)."""
    t0 = time.perf_counter()
    outs = [speculative_tokens(decoder, batch, new_tokens, temperature) for batch in batches]
    seconds = time.perf_counter() - t0
    lengths = [n for _, _, row_lengths in outs for n in row_lengths]
    tau = sum(lengths) / max(len(lengths), 1)
    return (
        [row for tokens, _, _ in outs for row in tokens],
        sum(rounds for _, rounds, _ in outs),
        seconds,
        tau,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--draft", default=None)
    p.add_argument("--dtype", default="float32", help="the target's dtype")
    p.add_argument("--draft-dtype", default="bfloat16", help="the other dtype of the head")
    p.add_argument("--trees", nargs="+", default=["dynamic", "chain"])
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--num-prompts", type=int, default=4, help="prompts per batch size (batches of --batch)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype, head_dtype = resolve_dtype(args.dtype), resolve_dtype(args.draft_dtype)
    same = load(args.target, args.draft, dtype=dtype)
    other = load(args.target, args.draft, dtype=dtype, draft_dtype=head_dtype)
    heads = {str(dtype).removeprefix("torch."): same.head, str(head_dtype).removeprefix("torch."): other.head}
    target = same.target
    mismatches = []
    results = []
    for B in args.batch:
        prompts = prompts_for(same, args.num_prompts, 100)
        batches = [prompts[i : i + B] for i in range(0, len(prompts), B)]
        cells = {}
        for tree in args.trees:
            for name, head in heads.items():
                decoder = SpeculativeDecoder(target, head, same._tree(tree, B))
                cells[(tree, name)] = decoder
                speculative_tokens(decoder, batches[0], 8)  # warm-up (and the tree choice's timings)
        plain_s, cell_s, cell_tau = [], {key: [] for key in cells}, {key: 0.0 for key in cells}
        want, _ = timed_plain(target, batches, args.new_tokens)  # (warm-up; the tokens to match)
        order = ["plain", *cells]
        for r in range(args.repeats):  # alternating, the order reversed every other repeat
            for key in order if r % 2 == 0 else order[::-1]:
                if key == "plain":
                    _, seconds = timed_plain(target, batches, args.new_tokens)
                    plain_s.append(seconds)
                    continue
                got, _, seconds, cell_tau[key] = timed_speculative(cells[key], batches, args.new_tokens)
                cell_s[key].append(seconds)
                if got != want:
                    mismatches.append((B, *key))
        tokens = args.num_prompts * args.new_tokens
        plain_tps = tokens / statistics.median(plain_s)
        print(
            f"\nB {B}: plain decoding {plain_tps:.0f} tok/s ({args.dtype} target, {args.threads} thread(s))"
        )
        results.append({"batch": B, "method": "plain", "tokens_per_s": plain_tps})
        for (tree, name), seconds in cell_s.items():
            tps = tokens / statistics.median(seconds)
            tau = cell_tau[(tree, name)]  # per row (before session 23: rounds * B, ~30% low at B 4)
            print(
                f"  EAGLE {tree:8s} {name:9s} head: {tps:6.0f} tok/s  {tps / plain_tps:.2f}x  tau {tau:.2f}"
            )
            results.append(
                {"batch": B, "method": f"eagle-{tree}", "head_dtype": name, "tokens_per_s": tps,
                 "speedup": tps / plain_tps, "tau": tau}
            )  # fmt: skip
        for tree in args.trees:
            a, b = (statistics.median(cell_s[(tree, n)]) for n in heads)
            print(f"  {tree}: the {list(heads)[1]} head is {a / b:.2f}x the {list(heads)[0]} head")
    if mismatches:
        print(f"\nOUTPUT DIFFERS from plain decoding in {mismatches}", file=sys.stderr)
        return 1
    print("\nevery speculative run reproduced plain decoding's tokens")
    if not args.no_save:
        name = f"draft_dtype_{args.target}_{args.dtype}_vs_{args.draft_dtype}.json"
        path = save_json(name, {"settings": vars(args), "results": results})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
