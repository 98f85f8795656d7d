"""The rest of a CPU round after the verify forward in one C++ call (``eagle_C::eagle2_verify_update``
greedy, ``eagle2_verify_update_sampled`` sampled; used by default) against the same ops from Python
(``set_cpu_verify_update(False)``): tokens/s in one process. The one-call greedy round
(``eagle_C::eagle2_round_greedy``, which folds this call together with the draft and the target's
forward) is switched off here; ``bench/bench_cpu_switches.py --switch cpu_round`` measures it.

    OMP_NUM_THREADS=1 python bench/bench_verify_update.py                  # tiny-code, float32, greedy
    OMP_NUM_THREADS=1 python bench/bench_verify_update.py --dtype bfloat16 --trees dynamic chain
    OMP_NUM_THREADS=1 python bench/bench_verify_update.py --temperature 1  # sampled, seed 0

The two paths make the same ops, so their tokens must be identical: greedy, the script checks both
against plain decoding; sampled, against each other (one seed); it exits non-zero otherwise. Sampled,
plain decoding is timed twice as well: with eagle.rng's C++ uniforms and inverse CDF (the default) and
with its tensor ops (``eagle.rng.set_cpu_ops(False)``), which must also sample the same tokens. Each
repeat runs every plain cell and every (tree, path) cell once, over the same held-out prompts (batch
1), in reverse order every other repeat; a cell's figure is the median over repeats of its tokens/s. Writes
bench/results/verify_update_<target>_<dtype>[_t<temperature>].json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_draft_dtype import timed_plain, timed_speculative  # noqa: E402
from bench.bench_loop import prompts_for  # noqa: E402
from bench.utils import save_json  # noqa: E402
from eagle.api import load  # noqa: E402
from eagle.models.draft import set_cpu_round, set_cpu_verify_update  # noqa: E402
from eagle.models.weights import resolve_dtype  # noqa: E402
from eagle.rng import set_cpu_ops  # noqa: E402
from eagle.speculate import SpeculativeDecoder  # noqa: E402

PATHS = {"one C++ call": True, "Python": False}
RNG_PATHS = {"C++ RNG": True, "tensor-op RNG": False}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--draft", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--trees", nargs="+", default=["dynamic"])
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    T = args.temperature
    model = load(args.target, args.draft, dtype=resolve_dtype(args.dtype))
    batches = [[prompt] for prompt in prompts_for(model, args.num_prompts, 100)]
    decoders = {
        tree: SpeculativeDecoder(model.target, model.head, model._tree(tree, 1)) for tree in args.trees
    }
    rng_paths = RNG_PATHS if T > 0 else {"": True}
    previous, previous_rng = set_cpu_verify_update(True), set_cpu_ops(True)
    previous_round = set_cpu_round(False)  # the rest alone (the one-call round: --switch cpu_round)
    try:
        for decoder in decoders.values():
            timed_speculative(decoder, batches[:1], 8, T)  # warm-up (and the tree choice's timings)
        plain_s = {name: [] for name in rng_paths}
        cell_s, outputs = {(t, n): [] for t in decoders for n in PATHS}, {}
        order = [("plain", name) for name in rng_paths] + list(cell_s)
        for r in range(args.repeats):  # alternating, the order reversed every other repeat
            for kind, name in order if r % 2 == 0 else order[::-1]:
                if kind == "plain":
                    set_cpu_ops(rng_paths[name])
                    tokens, seconds = timed_plain(model.target, batches, args.new_tokens, T)
                    set_cpu_ops(True)
                    plain_s[name].append(seconds)
                else:
                    set_cpu_verify_update(PATHS[name])
                    tokens, _, seconds, _ = timed_speculative(decoders[kind], batches, args.new_tokens, T)
                    cell_s[(kind, name)].append(seconds)
                outputs.setdefault((kind, name), tokens)
    finally:
        set_cpu_verify_update(previous)
        set_cpu_ops(previous_rng)
        set_cpu_round(previous_round)
    tokens = args.num_prompts * args.new_tokens
    plain_tps = {name: tokens / statistics.median(s) for name, s in plain_s.items()}
    base = plain_tps[next(iter(rng_paths))]
    kind = "greedy" if T == 0 else f"sampled at T={T:g}, seed 0"
    print(f"plain decoding {base:.0f} tok/s ({args.dtype}, {args.threads} thread(s), batch 1, {kind})")
    results = [{"method": "plain", "tokens_per_s": base}]
    if T > 0:
        other = plain_tps["tensor-op RNG"]
        print(f"  plain with the tensor-op RNG: {other:.0f} tok/s; the C++ RNG is {base / other:.3f}x it")
        results.append({"method": "plain", "path": "tensor-op RNG", "tokens_per_s": other})
    for tree in decoders:
        tps = {name: tokens / statistics.median(cell_s[(tree, name)]) for name in PATHS}
        for name, value in tps.items():
            # (EAGLE without the one-call round, which users get by default: the ratio to plain
            # decoding understates what they see; bench_cpu_switches --switch cpu_round measures it)
            print(
                f"  EAGLE {tree:8s} {name:13s}: {value:6.0f} tok/s  {value / base:.2f}x plain (one-call round off)"
            )
            results.append(
                {"method": f"eagle-{tree}", "path": name, "tokens_per_s": value,
                 "speedup_without_cpu_round": value / base}
            )  # fmt: skip
        print(f"  {tree}: one C++ call is {tps['one C++ call'] / tps['Python']:.3f}x the Python path")
    # greedy: everything equals plain decoding; sampled: each pair of paths samples the same tokens
    groups = [list(outputs)] if T == 0 else [[k for k in outputs if k[0] == g] for g in ("plain", *decoders)]
    mismatches = [keys for keys in groups if any(outputs[k] != outputs[keys[0]] for k in keys)]
    if mismatches:
        print(f"\nOUTPUTS DIFFER between {mismatches}", file=sys.stderr)
        return 1
    print(
        "\nevery speculative run reproduced plain decoding's tokens"
        if T == 0
        else "\nboth paths sampled the same tokens"
    )
    if not args.no_save:
        suffix = "" if T == 0 else f"_t{T:g}"
        path = save_json(
            f"verify_update_{args.target}_{args.dtype}{suffix}.json",
            {"settings": vars(args) | {"cpu_round": False}, "results": results},
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
