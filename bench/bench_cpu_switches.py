"""Two settings of a CPU kernel switch that can change within a process, end to end: plain decoding and
EAGLE with fixed trees on the bundled pair (bfloat16 unless ``--dtype``), the two settings alternating
in one process.

    OMP_NUM_THREADS=1 python bench/bench_cpu_switches.py --switch amx_pv
    OMP_NUM_THREADS=1 python bench/bench_cpu_switches.py --switch tensor_pool --trees 3/4/12 chain --temperature 0 1
    OMP_NUM_THREADS=2 python bench/bench_cpu_switches.py --switch linear_grain --threads 2 [--dtype float32]
    OMP_NUM_THREADS=1 python bench/bench_cpu_switches.py --switch cpu_round --trees 3/4/12 chain [--dtype float32]

Switches ("off" / "on"; "on" is the default):
- ``amx_pv``: tree_attention's P @ V of bfloat16 caches on AMX tiles with bf16 probabilities, or in
  float32 FMAs (``EAGLE_CPU_AMX_PV=0``; the kernel reads it at every call). The two round differently,
  so their greedy texts (and tau) may differ; the per-round times are the fair comparison.
- ``tensor_pool``: the CPU ops' short-lived tensors from the package's block cache, or from ATen's
  allocator (``torch.ops.eagle_C.tensor_pool_set_enabled``). Same numbers either way.
- ``linear_grain``: the CPU linears' parallel tasks hold at least 64 KB of the weight or ~1M
  multiply-adds, whichever splits more, or the multiply-adds bound alone
  (``torch.ops.eagle_C.linear_grain_set_bytes``; csrc/cpu/linear_grain.h). Same numbers either way;
  only matters with more than one thread.
- ``bf16_panels``: bfloat16 linear weights in panels for this package's AVX512-BF16 kernel
  (``eagle_C::panel_linear_bf16``), or in oneDNN's layout (``EAGLE_CPU_BF16_PANEL_LINEAR``; the loaded
  model is repacked at each switch). CPUs with AVX512-BF16 and no AMX, ``--dtype bfloat16``. The two
  layouts round differently, so their greedy texts may differ (each must equal its own plain decoding).
- ``decode_step``: a plain decoding step on CPU in one C++ call (``eagle_C::llama_decode_step``), or
  the forward, the cache's advance and the pick from Python (``set_cpu_decode_step``). Same numbers
  either way; the EAGLE cells are unaffected (they show the noise).
- ``attention_dpbf16``: tree_attention's scores of bfloat16 caches by VDPBF16PS (variant ``avx512bf16``,
  csrc/cpu/tree_attention_dpbf16.cpp), or by float32 dot products (``EAGLE_KERNELS_CPU_ISA=avx512``;
  read at every call). CPUs with AVX512-BF16 and no AMX, ``--dtype bfloat16``. The scores round
  differently, so the greedy texts may differ (each must equal its own plain decoding).
- ``cpu_round``: an EAGLE round (EAGLE-1/2 head, dynamic tree) in one C++ call
  (``eagle_C::eagle2_round_greedy``; ``eagle2_round_sampled`` at T > 0), or its three C++ calls (draft tree, target forward, the rest) from
  Python (``eagle.models.draft.set_cpu_round``). Same numbers either way; plain decoding is unaffected.

Each repeat runs every cell once under each setting (in alternating order) over the same held-out
prompts; a cell's figure is the median over repeats of its tokens/s. Within each setting every greedy
EAGLE run must reproduce that setting's plain decoding token for token; the script exits non-zero
otherwise. Sampled runs (T > 0, seed 0) of a switch whose settings compute the same bits (all but
``amx_pv``) must emit the same tokens under both settings.
Writes bench/results/cpu_switch_<switch>_<target>_<dtype>[_<n>threads][_t<temperatures>].json.
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
from eagle.models import cpu_packed  # noqa: E402
from eagle.speculate import SpeculativeDecoder  # noqa: E402
from eagle.tree import TreeConfig  # noqa: E402

SETTINGS = ("off", "on")


def _amx_pv(on: bool) -> None:
    os.environ["EAGLE_CPU_AMX_PV"] = "1" if on else "0"


def _tensor_pool(on: bool) -> None:
    torch.ops.eagle_C.tensor_pool_set_enabled(on)


def _linear_grain(on: bool) -> None:
    torch.ops.eagle_C.linear_grain_set_bytes(64 << 10 if on else 0)


_LOADED = {}  # the model under test, for switches that repack its weights


def _bf16_panels(on: bool) -> None:
    from eagle.models.cpu_packed import repack_module_linears

    os.environ["EAGLE_CPU_BF16_PANEL_LINEAR"] = "1" if on else "0"
    model = _LOADED["model"]
    repack_module_linears(model.target, [model.target.lm_head_weight])
    repack_module_linears(model.head, [getattr(model.head, "lm_head_weight", None)])


def _attention_dpbf16(on: bool) -> None:
    os.environ["EAGLE_KERNELS_CPU_ISA"] = "avx512bf16" if on else "avx512"


def _decode_step(on: bool) -> None:
    import importlib

    importlib.import_module("eagle.models.generate_plain").set_cpu_decode_step(on)


def _cpu_round(on: bool) -> None:
    from eagle.models.draft import set_cpu_round

    set_cpu_round(on)


SWITCHES = {
    "amx_pv": _amx_pv,
    "tensor_pool": _tensor_pool,
    "linear_grain": _linear_grain,
    "cpu_round": _cpu_round,
    "bf16_panels": _bf16_panels,
    "decode_step": _decode_step,
    "attention_dpbf16": _attention_dpbf16,
}
# switches whose two settings compute the same bits: their sampled runs must emit the same tokens too
SAME_BITS = {"tensor_pool", "linear_grain", "cpu_round", "decode_step"}


def parse_tree(spec: str):
    if spec == "chain":
        return TreeConfig.chain(5)
    depth, topk, total = (int(x) for x in spec.split("/"))
    return TreeConfig(depth, topk, total)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--switch", choices=sorted(SWITCHES), required=True)
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--draft", default=None)
    p.add_argument("--trees", nargs="+", default=["3/4/12", "5/8/32"], help="depth/topk/tokens or chain")
    p.add_argument("--temperature", nargs="+", type=float, default=[0.0])
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    import eagle_kernels  # noqa: F401  (loads the extension's ops)

    torch.set_num_threads(args.threads)
    if args.switch == "amx_pv" and not (
        hasattr(torch.ops.eagle_C, "tree_attention_cpu_variant")
        and torch.ops.eagle_C.tree_attention_cpu_variant() == "amx"
    ):
        print(
            "tree_attention does not run on AMX tiles here (eagle info): nothing to compare", file=sys.stderr
        )
        return 2
    if args.switch == "tensor_pool" and not hasattr(torch.ops.eagle_C, "tensor_pool_set_enabled"):
        print("the extension has no tensor pool: nothing to compare", file=sys.stderr)
        return 2
    if args.switch == "bf16_panels" and not (
        args.dtype == "bfloat16"
        and cpu_packed.bf16_panel_linear_available()
        and not cpu_packed.amx_linear_available()
    ):
        print("bf16 panels do not apply (needs --dtype bfloat16, AVX512-BF16 and no AMX)", file=sys.stderr)
        return 2
    if args.switch == "attention_dpbf16" and not (
        args.dtype == "bfloat16"
        and hasattr(torch.ops.eagle_C, "tree_attention_cpu_variant")
        and torch.ops.eagle_C.tree_attention_cpu_variant() == "avx512bf16"
    ):
        print(
            "VDPBF16PS scores do not apply (needs --dtype bfloat16, AVX512-BF16 and no AMX)", file=sys.stderr
        )
        return 2
    if args.switch == "linear_grain" and not hasattr(torch.ops.eagle_C, "linear_grain_set_bytes"):
        print("the extension has no linear grain switch: nothing to compare", file=sys.stderr)
        return 2
    switch = SWITCHES[args.switch]
    model = load(args.target, args.draft, dtype=getattr(torch, args.dtype))
    _LOADED["model"] = model
    prompts = prompts_for(model, args.num_prompts, 100)
    batches = [[prompt] for prompt in prompts]
    decoders = {tree: SpeculativeDecoder(model.target, model.head, parse_tree(tree)) for tree in args.trees}
    saved_env = {name: os.environ.get(name) for name in ("EAGLE_CPU_AMX_PV", "EAGLE_CPU_BF16_PANEL_LINEAR")}
    results, mismatches = [], []
    try:
        for temp in args.temperature:
            seconds = {(s, c): [] for s in SETTINGS for c in ["plain", *args.trees]}
            rounds, sampled = {}, {}
            for repeat in range(args.repeats + 1):  # repeat 0 warms up and is not timed
                for setting in SETTINGS if repeat % 2 else reversed(SETTINGS):
                    switch(setting == "on")
                    want, t = timed_plain(model.target, batches, args.new_tokens, temp)
                    if repeat:
                        seconds[(setting, "plain")].append(t)
                    for tree, decoder in decoders.items():
                        got, rounds[(setting, tree)], t, _ = timed_speculative(
                            decoder, batches, args.new_tokens, temp
                        )
                        if repeat:
                            seconds[(setting, tree)].append(t)
                        if temp == 0 and got != want:
                            mismatches.append((setting, tree))
                        elif temp > 0 and args.switch in SAME_BITS:
                            first = sampled.setdefault((repeat, tree), got)
                            if got != first:
                                mismatches.append((f"T={temp}", tree))
            results += report(args, temp, seconds, rounds)
    finally:
        switch(True)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if mismatches:
        print(
            f"\nOUTPUT DIFFERS (greedy: from plain decoding; sampled: between the settings) in "
            f"{sorted(set(mismatches))}",
            file=sys.stderr,
        )
        return 1
    print("\nevery greedy EAGLE run reproduced its setting's plain decoding")
    if args.switch in SAME_BITS and any(t > 0 for t in args.temperature):
        print("every sampled EAGLE run emitted the same tokens under both settings")
    if not args.no_save:
        threads = f"_{args.threads}threads" if args.threads != 1 else ""
        temps = "" if args.temperature == [0.0] else "_t" + "-".join(f"{t:g}" for t in args.temperature)
        name = f"cpu_switch_{args.switch}_{args.target}_{args.dtype}{threads}{temps}.json"
        path = save_json(name, {"settings": vars(args), "results": results})
        print(f"wrote {path}")
    return 0


def report(args, temp: float, seconds: dict, rounds: dict) -> list[dict]:
    """Print and return one temperature's table: tokens/s per setting and, for EAGLE, tau and the time
    per round (the fair comparison when the settings' tokens differ)."""
    tokens = args.num_prompts * args.new_tokens
    tps = {key: tokens / statistics.median(v) for key, v in seconds.items()}
    print(
        f"\n{args.switch}, T = {temp:g}, B 1, {args.dtype}, {args.threads} thread(s): median of {args.repeats} repeats"
    )
    print(f"  {'cell':8s} {'tok/s off':>9s} {'on':>6s} {'on/off':>7s}   {'tau off':>7s} {'on':>5s}"
          f"   {'round ms off':>12s} {'on':>6s} {'on/off':>7s}")  # fmt: skip
    rows = []
    for cell in ["plain", *args.trees]:
        a, b = tps[("off", cell)], tps[("on", cell)]
        row = {
            "temperature": temp,
            "cell": cell,
            "off_tokens_per_s": a,
            "on_tokens_per_s": b,
            "on_over_off": b / a,
        }
        line = f"  {cell:8s} {a:9.0f} {b:6.0f} {b / a:6.3f}x"
        if cell != "plain":
            n = {s: rounds[(s, cell)] for s in SETTINGS}
            tau = {s: args.num_prompts * (args.new_tokens - 1) / n[s] for s in SETTINGS}
            ms = {s: 1e3 * statistics.median(seconds[(s, cell)]) / n[s] for s in SETTINGS}
            line += f"   {tau['off']:7.2f} {tau['on']:5.2f}   {ms['off']:12.3f} {ms['on']:6.3f} {ms['on'] / ms['off']:6.3f}x"
            row.update(tau_off=tau["off"], tau_on=tau["on"], round_ms_off=ms["off"], round_ms_on=ms["on"])
        print(line)
        rows.append(row)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
