"""tree_attention's P @ V on AMX tiles (bfloat16 caches, the default where the scores run on AMX) against
float32 FMAs (``EAGLE_CPU_AMX_PV=0``), end to end: plain decoding and EAGLE with fixed trees on the
bundled pair in bfloat16, the two settings alternating in one process.

    OMP_NUM_THREADS=1 python bench/bench_amx_pv.py
    OMP_NUM_THREADS=1 python bench/bench_amx_pv.py --trees 3/4/12 5/8/32 chain --temperature 0 1 --repeats 5

The kernel reads EAGLE_CPU_AMX_PV at every call, so each repeat runs every cell once under each
setting (in alternating order) over the same held-out prompts; a cell's figure is the median over
repeats of its tokens/s. Within each setting every greedy EAGLE run must reproduce that setting's
plain decoding token for token (each path keeps a row's attention independent of the rows beside it
and of where its keys sit); the script exits non-zero otherwise. Sampled runs (T > 0, seed 0) are
timed only. Writes bench/results/amx_pv_<target>_bfloat16.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_draft_dtype import timed_plain, timed_speculative  # noqa: E402
from bench.bench_loop import prompts_for  # noqa: E402
from bench.utils import save_json  # noqa: E402
from eagle.api import load  # noqa: E402
from eagle.speculate import SpeculativeDecoder  # noqa: E402
from eagle.tree import TreeConfig  # noqa: E402

SETTINGS = {"fma": "0", "amx": "1"}  # EAGLE_CPU_AMX_PV per setting; "amx" is the default


def parse_tree(spec: str):
    if spec == "chain":
        return TreeConfig.chain(5)
    depth, topk, total = (int(x) for x in spec.split("/"))
    return TreeConfig(depth, topk, total)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--draft", default=None)
    p.add_argument("--trees", nargs="+", default=["3/4/12", "5/8/32"], help="depth/topk/tokens or chain")
    p.add_argument("--temperature", nargs="+", type=float, default=[0.0])
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    import eagle_kernels  # noqa: F401  (loads the extension's ops)

    torch.set_num_threads(args.threads)
    if not hasattr(torch.ops.eagle_C, "tree_attention_cpu_variant") or (
        torch.ops.eagle_C.tree_attention_cpu_variant() != "amx"
    ):
        print(
            "tree_attention does not run on AMX tiles here (eagle info): nothing to compare", file=sys.stderr
        )
        return 2
    model = load(args.target, args.draft, dtype=torch.bfloat16)
    prompts = prompts_for(model, args.num_prompts, 100)
    batches = [[prompt] for prompt in prompts]
    decoders = {tree: SpeculativeDecoder(model.target, model.head, parse_tree(tree)) for tree in args.trees}
    saved = os.environ.get("EAGLE_CPU_AMX_PV")
    results, mismatches = [], []
    try:
        for temp in args.temperature:
            seconds = {(s, c): [] for s in SETTINGS for c in ["plain", *args.trees]}
            rounds = {}
            for repeat in range(args.repeats + 1):  # repeat 0 warms up and is not timed
                order = list(SETTINGS) if repeat % 2 else list(reversed(SETTINGS))
                for setting in order:
                    os.environ["EAGLE_CPU_AMX_PV"] = SETTINGS[setting]
                    want, t = timed_plain(model.target, batches, args.new_tokens, temp)
                    if repeat:
                        seconds[(setting, "plain")].append(t)
                    for tree, decoder in decoders.items():
                        got, rounds[(setting, tree)], t = timed_speculative(
                            decoder, batches, args.new_tokens, temp
                        )
                        if repeat:
                            seconds[(setting, tree)].append(t)
                        if temp == 0 and got != want:
                            mismatches.append((setting, tree))
            tokens = args.num_prompts * args.new_tokens
            tps = {key: tokens / statistics.median(v) for key, v in seconds.items()}
            print(
                f"\nT = {temp:g}, B 1, bfloat16, {args.threads} thread(s): median of {args.repeats} repeats"
            )
            print(f"  {'cell':8s} {'tok/s fma':>9s} {'amx':>6s} {'amx/fma':>8s}   {'tau fma':>7s} {'amx':>5s}"
                  f"   {'round ms fma':>12s} {'amx':>6s} {'amx/fma':>8s}")  # fmt: skip
            for cell in ["plain", *args.trees]:
                a, b = tps[("fma", cell)], tps[("amx", cell)]
                row = {"temperature": temp, "cell": cell, "fma_tokens_per_s": a, "amx_tokens_per_s": b,
                       "amx_over_fma": b / a}  # fmt: skip
                line = f"  {cell:8s} {a:9.0f} {b:6.0f} {b / a:7.3f}x"
                if (
                    cell != "plain"
                ):  # the settings' tokens may differ (P rounded to bf16 or not): per round too
                    n = {s: rounds[(s, cell)] for s in SETTINGS}
                    tau = {s: args.num_prompts * (args.new_tokens - 1) / n[s] for s in SETTINGS}
                    ms = {s: 1e3 * statistics.median(seconds[(s, cell)]) / n[s] for s in SETTINGS}
                    line += (f"   {tau['fma']:7.2f} {tau['amx']:5.2f}   {ms['fma']:12.3f} {ms['amx']:6.3f}"
                             f" {ms['amx'] / ms['fma']:7.3f}x")  # fmt: skip
                    row.update(
                        tau_fma=tau["fma"], tau_amx=tau["amx"], round_ms_fma=ms["fma"], round_ms_amx=ms["amx"]
                    )
                print(line)
                results.append(row)
    finally:
        if saved is None:
            os.environ.pop("EAGLE_CPU_AMX_PV", None)
        else:
            os.environ["EAGLE_CPU_AMX_PV"] = saved
    if mismatches:
        print(f"\nOUTPUT DIFFERS from plain decoding in {sorted(set(mismatches))}", file=sys.stderr)
        return 1
    print("\nevery greedy EAGLE run reproduced its setting's plain decoding")
    if not args.no_save:
        path = save_json(f"amx_pv_{args.target}_bfloat16.json", {"settings": vars(args), "results": results})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
