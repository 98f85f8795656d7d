"""The greedy rest of a CPU round in one C++ call (``eagle_C::eagle2_verify_update``, used by default)
against the same ops from Python (``set_cpu_verify_update(False)``): tokens/s in one process.

    OMP_NUM_THREADS=1 python bench/bench_verify_update.py                  # tiny-code, float32
    OMP_NUM_THREADS=1 python bench/bench_verify_update.py --dtype bfloat16 --trees dynamic chain

The two paths make the same ops, so their tokens must be identical: the script checks that against
plain decoding and exits non-zero otherwise. Each repeat runs plain decoding, then every (tree, path)
cell once, over the same held-out prompts (batch 1); a cell's figure is the median over repeats of its
tokens/s. Writes bench/results/verify_update_<target>_<dtype>.json.
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
from eagle.models.draft import set_cpu_verify_update  # noqa: E402
from eagle.models.weights import resolve_dtype  # noqa: E402
from eagle.speculate import SpeculativeDecoder  # noqa: E402

PATHS = {"one C++ call": True, "Python": False}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--draft", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--trees", nargs="+", default=["dynamic"])
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = load(args.target, args.draft, dtype=resolve_dtype(args.dtype))
    batches = [[prompt] for prompt in prompts_for(model, args.num_prompts, 100)]
    decoders = {
        tree: SpeculativeDecoder(model.target, model.head, model._tree(tree, 1)) for tree in args.trees
    }
    previous = set_cpu_verify_update(True)
    try:
        for decoder in decoders.values():
            timed_speculative(decoder, batches[:1], 8)  # warm-up (and the tree choice's timings)
        plain_s, cell_s, mismatches = [], {(t, n): [] for t in decoders for n in PATHS}, []
        for _ in range(args.repeats):
            want, seconds = timed_plain(model.target, batches, args.new_tokens)
            plain_s.append(seconds)
            for tree, decoder in decoders.items():
                for name, fused in PATHS.items():
                    set_cpu_verify_update(fused)
                    got, _, seconds = timed_speculative(decoder, batches, args.new_tokens)
                    cell_s[(tree, name)].append(seconds)
                    if got != want:
                        mismatches.append((tree, name))
    finally:
        set_cpu_verify_update(previous)
    tokens = args.num_prompts * args.new_tokens
    plain_tps = tokens / statistics.median(plain_s)
    print(f"plain decoding {plain_tps:.0f} tok/s ({args.dtype}, {args.threads} thread(s), batch 1)")
    results = [{"method": "plain", "tokens_per_s": plain_tps}]
    for tree in decoders:
        tps = {name: tokens / statistics.median(cell_s[(tree, name)]) for name in PATHS}
        for name, value in tps.items():
            print(f"  EAGLE {tree:8s} {name:13s}: {value:6.0f} tok/s  {value / plain_tps:.2f}x plain")
            results.append(
                {"method": f"eagle-{tree}", "path": name, "tokens_per_s": value, "speedup": value / plain_tps}
            )
        print(f"  {tree}: one C++ call is {tps['one C++ call'] / tps['Python']:.3f}x the Python path")
    if mismatches:
        print(f"\nOUTPUT DIFFERS from plain decoding in {mismatches}", file=sys.stderr)
        return 1
    print("\nevery speculative run reproduced plain decoding's tokens")
    if not args.no_save:
        path = save_json(
            f"verify_update_{args.target}_{args.dtype}.json", {"settings": vars(args), "results": results}
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
