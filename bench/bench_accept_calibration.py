"""tree="dynamic" with the acceptance rate refitted from earlier runs (eagle.api.EagleModel.accept_rates)
against the fixed prior rate (eagle.autotree.ACCEPT_RATE) it used before, and plain decoding, in one
process, alternating.

    python bench/bench_accept_calibration.py                       # tiny-code, bfloat16, T = 0 and 1
    python bench/bench_accept_calibration.py --dtype float32 --temperature 0 --repeats 9

EagleModel wrappers share the loaded pair: "vanilla" (speculative=False), "fixed" (the dynamic tree
chosen with the generic prior ACCEPT_RATE and WIDENING_GAIN, never refitted), "stored" (where the head
ships acceptance.json, eagle/acceptance.py: chosen with the pair's measured acceptance, never refitted)
and "refitted" (the default: the pair's acceptance.json, or the generic prior, as the first run's
prior; each run then refits the rate). Each repeat runs
the three over the same held-out prompts, one prompt per call (batch 1), in alternating order; repeat
0 warms up (and calibrates) and is not timed. A cell's figure is the median over repeats of its
tokens/s; its speedup is the ratio of that median to vanilla's. Greedy outputs of every cell must
equal vanilla's; the script exits non-zero otherwise. Sampled calls are not seeded: a seeded sampled
call sizes its tree from the prior alone (eagle.api.EagleModel._tree), which would leave nothing to refit.
``--variants log2`` adds a refitted cell that chooses as eagle.autotree did before session 18, swapped
in around that cell's calls: "refitted_log2", with its acceptance model (a fixed gain of 0.15 per
doubling of the tree's width; now the gain grows with the square root of the doublings, see
bench/bench_accept_model.py). (Session 18 also ran a "depth3" variant while depths 1-2 were
candidates: ..._session18.json; they were left out again, see eagle.autotree.DEPTHS.)
Writes bench/results/accept_calibration_<target>_<dtype>.json (``--name``: another stem).

The "fixed" cell's tree comes from timed forwards (eagle.autotree), so on a noisy machine two runs may
start from different trees: where the prior's choice happens to be the tree the refitted rate picks,
the two cells run the same tree (bench/results/accept_calibration_tiny-code_bfloat16_rerun.json).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_loop import prompts_for  # noqa: E402
from bench.utils import save_json  # noqa: E402
from eagle import autotree  # noqa: E402
from eagle.api import EagleModel, load  # noqa: E402
from eagle.bench import tree_label  # noqa: E402

VARIANTS = ("log2",)


def _cells(base: EagleModel, variants=()) -> dict[str, tuple[EagleModel, bool]]:
    fixed = EagleModel(base.target, base.head, base.tokenizer)  # no acceptance.json: the generic prior
    fixed._learn_acceptance = lambda *args: None  # keeps choosing with ACCEPT_RATE
    cells = {
        "vanilla": (EagleModel(base.target, base.head, base.tokenizer), False),
        "fixed": (fixed, True),
    }
    if base.pair_acceptance is not None:
        stored = EagleModel(base.target, base.head, base.tokenizer, base.pair_acceptance)
        stored._learn_acceptance = lambda *args: None  # keeps choosing with the pair's acceptance.json
        cells["stored"] = (stored, True)
    cells["refitted"] = (EagleModel(base.target, base.head, base.tokenizer, base.pair_acceptance), True)
    for variant in variants:
        cells[f"refitted_{variant}"] = (EagleModel(base.target, base.head, base.tokenizer), True)
    return cells


def log2_expected_tau(depth: int, width: int, accept_rate: float = autotree.ACCEPT_RATE, gain=None) -> float:
    """eagle.autotree.expected_tau before session 18: a fixed gain of 0.15 per doubling of the width."""
    chain = sum(accept_rate**i for i in range(depth + 1))
    return chain * (1.0 + 0.15 * math.log2(max(width, depth + 1) / (depth + 1)))


@contextlib.contextmanager
def tree_choice(cell: str):
    """The "refitted_log2" cell chooses (and refits) with log2_expected_tau (choose_tree and
    fit_accept_rate look it up per call); the other cells as shipped."""
    patches = {"refitted_log2": {"expected_tau": log2_expected_tau}}.get(cell, {})
    shipped = {name: getattr(autotree, name) for name in patches}
    for name, value in patches.items():
        setattr(autotree, name, value)
    try:
        yield
    finally:
        for name, value in shipped.items():
            setattr(autotree, name, value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--draft", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--temperature", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--name", default=None, help="result file stem (default accept_calibration_<target>_<dtype>)"
    )
    p.add_argument("--variants", nargs="*", default=[], choices=VARIANTS, help="refitted cells (see above)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load(args.target, args.draft, dtype=getattr(torch, args.dtype))
    prompts = prompts_for(base, args.num_prompts, args.prompt_tokens)
    # the forwards' timings as shipped, before a variant cell could time fewer widths into the cache
    autotree.choose_tree(base.target, 1, base.head)
    results, mismatches = [], []
    for temp in args.temperature:
        cells = _cells(base, args.variants)
        seconds = {name: [] for name in cells}
        trees: dict[str, list[str]] = {name: [] for name in cells}
        for repeat in range(args.repeats + 1):
            names = list(cells) if repeat % 2 else list(reversed(cells))
            outputs = {}
            for name in names:
                model, speculative = cells[name]
                t0 = time.perf_counter()
                outputs[name] = []
                for prompt in prompts:
                    with tree_choice(name):
                        res = model.generate(  # EOS ignored: every cell makes total tokens
                            [prompt],
                            args.new_tokens,
                            temperature=temp,
                            speculative=speculative,
                            eos_token_id=[],
                        )
                    outputs[name].append(res.tokens[0])
                    label = None if res.tree is None else tree_label(res.tree)
                    if label is not None and label not in trees[name]:
                        trees[name].append(label)
                if repeat:
                    seconds[name].append(time.perf_counter() - t0)
            if temp == 0:
                mismatches += [(name, repeat) for name in cells if outputs[name] != outputs["vanilla"]]
        total = args.num_prompts * args.new_tokens
        speed = {name: statistics.median(total / s for s in seconds[name]) for name in cells}
        print(
            f"\ntree='dynamic' acceptance, T = {temp:g}, B 1, {args.dtype}: median of {args.repeats} repeats"
        )
        print(f"  {'cell':<10}{'tok/s':>8}{'speedup':>9}  trees (rate)")
        for name, (model, _) in cells.items():
            rates = {str(k.temperature): round(v, 3) for k, v in model.accept_rates.items()}
            print(
                f"  {name:<10}{speed[name]:>8.0f}{speed[name] / speed['vanilla']:>8.2f}x  {' / '.join(trees[name]) or '-'} {rates or ''}"
            )
            results.append(
                {
                    "temperature": temp,
                    "cell": name,
                    "tokens_per_s": speed[name],
                    "speedup_vs_vanilla": speed[name] / speed["vanilla"],
                    "tokens_per_s_all_repeats": [total / s for s in seconds[name]],
                    "trees": trees[name],
                    "accept_rate": next(iter(model.accept_rates.values()), None),
                }
            )
    if mismatches:
        print(f"\nGREEDY OUTPUT DIFFERS from vanilla in {sorted(set(mismatches))}", file=sys.stderr)
        return 1
    print("\nevery greedy run reproduced vanilla's tokens")
    if not args.no_save:
        name = f"{args.name or f'accept_calibration_{args.target}_{args.dtype}'}.json"
        print(f"wrote {save_json(name, {'settings': vars(args), 'results': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
