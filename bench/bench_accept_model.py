"""How well eagle.autotree's acceptance model predicts a pair's tau across tree shapes.

tree="dynamic" picks the tree that minimises time per expected token, with the expected tokens per
target forward of a tree of depth ``d`` verifying ``W`` tokens modelled as

    tau(d, W) = chain(a, d) * (1 + g * shape(log2(W / (d + 1))))

(``chain(a, d) = 1 + a + ... + a^d``: a chain's expected accepted length at per-token acceptance
``a``; ``g``: the gain of widening). This measures tau on held-out prompts for chains of depths 3 and
5 (which give ``a`` alone) and for the trees ``eagle.autotree.tree_for(d, W)`` at widths 8-60, at
T = 0 and T = 1, then fits one ``g`` per temperature for each candidate shape (least squares on
tau / chain - 1) and prints each shape's relative error per tree. Nothing is timed (acceptance does
not depend on the machine's speed), so it may use every thread.

    python bench/bench_accept_model.py                     # tiny-code pair, float32, 16 prompts
    python bench/bench_accept_model.py --num-prompts 4 --new-tokens 32 --no-save   # a quick look

Writes bench/results/accept_model_<target>.json (``--name``: another stem).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_loop import prompts_for  # noqa: E402
from bench.utils import save_json  # noqa: E402
from eagle.acceptance import measure_tau  # noqa: E402
from eagle.api import load  # noqa: E402
from eagle.autotree import fit_accept_rate, tree_for  # noqa: E402
from eagle.tree import TreeConfig  # noqa: E402

# candidate shapes of the widening gain, as functions of x = log2(W / (d + 1)) >= 0
SHAPES = {
    "log2": lambda x: x,  # a fixed gain per doubling (eagle.autotree before session 18)
    "sqrt_log2": lambda x: math.sqrt(x),  # each doubling gains less than the one before
}


def fit_gain(points: list[dict], shape) -> float:
    """The g minimising sum (g * shape(x) - y)^2 over points with y = tau / chain - 1."""
    xs = [shape(p["doublings"]) for p in points]
    ys = [p["tau"] / p["chain_tau"] - 1.0 for p in points]
    den = sum(x * x for x in xs)
    return sum(x * y for x, y in zip(xs, ys)) / den if den > 0 else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--draft", default=None)
    p.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"))
    p.add_argument("--temperature", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--depths", nargs="+", type=int, default=[3, 5])
    p.add_argument("--widths", nargs="+", type=int, default=[8, 16, 32, 60])
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--name", default=None)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    model = load(args.target, args.draft, dtype=getattr(torch, args.dtype))
    if model.head is None:
        print("the pair has no draft head: nothing to measure", file=sys.stderr)
        return 2
    prompts = prompts_for(model, args.num_prompts, args.prompt_tokens)
    results = []
    for temp in args.temperature:
        chains, trees = {}, []
        for d in args.depths:
            tau = measure_tau(model, prompts, TreeConfig.chain(d), temp, args.new_tokens)
            chains[d] = {"depth": d, "tau": tau, "accept_rate": fit_accept_rate(d, d + 1, tau)}
            for w in args.widths:
                tree = tree_for(d, w)
                if tree.total_tokens <= d + 1:
                    continue
                trees.append(
                    {
                        "tree": f"{tree.depth}/{tree.topk}/{tree.total_tokens}",
                        "depth": d,
                        "width": tree.total_tokens,
                        "doublings": math.log2(tree.total_tokens / (d + 1)),
                        "tau": measure_tau(model, prompts, tree, temp, args.new_tokens),
                        "chain_tau": tau,
                    }
                )
            print(f"T = {temp:g}: depth {d} measured", flush=True)
        fits = {}
        for name, shape in SHAPES.items():
            g = fit_gain(trees, shape)
            errors = [g * shape(t["doublings"]) - (t["tau"] / t["chain_tau"] - 1.0) for t in trees]
            rel = [(1.0 + g * shape(t["doublings"])) * t["chain_tau"] / t["tau"] - 1.0 for t in trees]
            fits[name] = {
                "gain": g,
                "rms_relative_error": math.sqrt(sum(e * e for e in rel) / len(rel)),
                "relative_error_per_tree": {t["tree"]: e for t, e in zip(trees, rel)},
                "max_abs_gain_error": max(abs(e) for e in errors),
            }
        results.append({"temperature": temp, "chains": list(chains.values()), "trees": trees, "fits": fits})

    for r in results:
        print(f"\nT = {r['temperature']:g}")
        for c in r["chains"]:
            print(
                f"  chain depth {c['depth']}: tau {c['tau']:.3f}, fitted acceptance a = {c['accept_rate']:.3f}"
            )
        names = list(SHAPES)
        print("  tree        tau   " + "  ".join(f"{n:>14}" for n in names))
        for t in r["trees"]:
            errs = "  ".join(
                f"{100 * r['fits'][n]['relative_error_per_tree'][t['tree']]:+13.1f}%" for n in names
            )
            print(f"  {t['tree']:<9} {t['tau']:6.3f}  {errs}")
        for n in names:
            f = r["fits"][n]
            print(
                f"  {n}: g = {f['gain']:.3f}, rms relative error of tau {100 * f['rms_relative_error']:.1f}%"
            )
    if not args.no_save:
        payload = {
            "target": args.target,
            "draft": args.draft,
            "dtype": args.dtype,
            "num_prompts": args.num_prompts,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "results": results,
        }
        path = save_json(f"{args.name or f'accept_model_{args.target}'}.json", payload)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
