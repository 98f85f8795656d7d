"""Operator launches per decoding round and per plain step, by round phase, without a GPU.

On a GPU a small model's decoding is launch-bound: each kernel costs a few microseconds whatever its
size, so a round costs about what its kernel count costs (the tiny-code pair on an H100: a plain step
1.1 ms, a dynamic-tree round 4.9 ms). This counts what a GPU would launch, on CPU: the decoding loop
runs with the CPU-only fast paths switched off (the fused C++ layers and the C++ draft loop, which
the CUDA path does not have) under a ``TorchDispatchMode`` that counts every operator call that
would launch work -- aten ops except views and allocations, and each ``eagle::`` kernel op as one
(the Triton / CUDA kernels it stands for are one or two launches each) -- and every host
synchronisation (``.item()``, ``.tolist()``, nonzero, ...), which a CUDA graph cannot contain.

    python bench/count_ops.py                        # bundled pair: dynamic, static, chain at B 1
    python bench/count_ops.py --trees dynamic --batch 4 --top 15

Prints, per tree: operator calls per round in each phase (draft, verify, accept, compact, draft
update) beside a plain decoding step's, the round / step ratio, and the most frequent operators of
each phase. The counts are shape-independent for a given tree, so they compare code, not machines.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ.setdefault("EAGLE_CPU_FAST_PATH", "0")  # before eagle is imported: the GPU's code path
os.environ.setdefault("EAGLE_CPU_DRAFT_LOOP", "0")

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_loop import prompts_for  # noqa: E402
from eagle.api import load  # noqa: E402
from eagle.models import generate_plain  # noqa: E402
from eagle.speculate import SamplingParams, SpeculativeDecoder  # noqa: E402
from eagle.tree import TreeConfig  # noqa: E402

PHASES = ("draft", "verify", "accept", "compact", "draft_update")
# Calls that launch no kernel: allocations without initialisation and metadata-only ops.
_NO_LAUNCH = {
    "empty",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "empty_like",
    "lift_fresh",
    "detach",
    "alias",
    "resize_",
    "set_",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "is_same_size",
}
# Calls that wait for the device (a host sync on CUDA).
_SYNCS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "_assert_async", "unique", "masked_select"}


def op_name(func) -> str:
    """``aten.add`` / ``eagle.tree_attention`` (namespace and op, no overload)."""
    schema = func._schema.name  # "aten::add"
    return schema.replace("::", ".")


def launches(func) -> bool:
    name = func._schema.name.split("::", 1)[1]
    return not (getattr(func, "is_view", False) or name in _NO_LAUNCH)


class OpCounter(TorchDispatchMode):
    """Counts launching operator calls (and host syncs) into the current bucket."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.total = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::", 1)[1]
        if name in _SYNCS:
            self.syncs += 1
        if launches(func):
            self.counts[op_name(func)] += 1
            self.total += 1
        return func(*args, **(kwargs or {}))


class PhaseRecorder:
    """Attributes counted ops to round phases. ``SpeculativeDecoder._round`` takes six timestamps
    (before draft, verify, accept, compact, draft update, and at the end); each call of ``_stamp``
    closes the phase before it."""

    def __init__(self, counter: OpCounter) -> None:
        self.counter = counter
        self.per_phase = {p: collections.Counter() for p in PHASES}
        self.syncs = dict.fromkeys(PHASES, 0)
        self.rounds = 0
        self._stamps = 0
        self._snapshot = (collections.Counter(), 0)

    def stamp(self) -> float:
        counts, syncs = collections.Counter(self.counter.counts), self.counter.syncs
        if self._stamps % 6:  # not the first stamp of a round
            phase = PHASES[self._stamps % 6 - 1]
            self.per_phase[phase].update(counts - self._snapshot[0])
            self.syncs[phase] += syncs - self._snapshot[1]
            if phase == PHASES[-1]:
                self.rounds += 1
        self._snapshot = (counts, syncs)
        self._stamps += 1
        return 0.0


def count_round(model, tree: str | TreeConfig, batch: int, new_tokens: int, temperature: float) -> dict:
    """Ops per round by phase for one tree kind, counted over every round of one ``run``."""
    prompts = prompts_for(model, batch, 64)
    decoder = SpeculativeDecoder(
        model.target, model.head, tree if isinstance(tree, TreeConfig) else model._tree(tree, batch)
    )
    list(decoder.run(prompts, 4, SamplingParams(temperature=temperature), seed=0))  # warm-up: lazy setup
    counter = OpCounter()
    recorder = PhaseRecorder(counter)
    decoder._stamp = recorder.stamp  # the round stamps its phases whether or not it profiles
    with counter:
        for _ in decoder.run(prompts, new_tokens, SamplingParams(temperature=temperature), seed=1):
            pass
    rounds = max(recorder.rounds, 1)
    return {
        "rounds": recorder.rounds,
        "per_round": {p: sum(recorder.per_phase[p].values()) / rounds for p in PHASES},
        "syncs_per_round": {p: recorder.syncs[p] / rounds for p in PHASES},
        "top": {p: recorder.per_phase[p] for p in PHASES},
    }


def count_plain_step(model, batch: int, new_tokens: int, temperature: float) -> tuple[float, float, dict]:
    """Ops and host syncs per token step of plain decoding (prefill excluded: the difference of two
    runs that differ only in the number of new tokens)."""
    prompts = prompts_for(model, batch, 64)

    def run(n: int) -> OpCounter:
        counter = OpCounter()
        with counter:
            generate_plain(model.target, prompts, n, temperature=temperature)
        return counter

    run(2)  # warm-up
    short, long = run(2), run(2 + new_tokens)
    per_step = {k: (long.counts[k] - short.counts[k]) / new_tokens for k in long.counts}
    return (long.total - short.total) / new_tokens, (long.syncs - short.syncs) / new_tokens, per_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="tiny-code", help="bundled pair name or a directory (default tiny-code)"
    )
    p.add_argument("--trees", nargs="+", default=["dynamic", "static", "chain"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--top", type=int, default=8, help="most frequent ops shown per phase")
    p.add_argument(
        "--dynamic",
        nargs=3,
        type=int,
        metavar=("DEPTH", "TOPK", "TOKENS"),
        help="the dynamic tree's shape (default: the one chosen for this CPU; on a GPU the tiny-code pair "
        "gets depth 4, top-k 8, 32 tokens)",
    )
    args = p.parse_args(argv)

    model = load(args.model, device="cpu", dtype=torch.float32)
    step_ops, step_syncs, step_top = count_plain_step(model, args.batch, args.new_tokens, args.temperature)
    layers = model.target.config.num_layers
    print(
        f"plain step: {step_ops:.1f} ops ({step_ops / layers:.1f} per layer of {layers}), {step_syncs:.2f} syncs"
    )
    for name, n in sorted(step_top.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"    {n:7.1f}  {name}")
    for tree in args.trees:
        shape = TreeConfig(*args.dynamic) if tree == "dynamic" and args.dynamic else tree
        r = count_round(model, shape, args.batch, args.new_tokens, args.temperature)
        total = sum(r["per_round"].values())
        print(
            f"\n{tree} tree, batch {args.batch}, T={args.temperature:g}: {total:.1f} ops per round "
            f"= {total / step_ops:.2f} plain steps ({r['rounds']} rounds)"
        )
        for phase in PHASES:
            n = r["per_round"][phase]
            syncs = r["syncs_per_round"][phase]
            print(f"  {phase:13s} {n:7.1f} ops  {syncs:5.2f} syncs")
            for name, c in r["top"][phase].most_common(args.top):
                print(f"      {c / max(r['rounds'], 1):7.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
