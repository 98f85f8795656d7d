"""Where a decoding round's time goes on a device: device time by kernel, device busy vs wall time.

``bench/count_ops.py`` counts what a round launches; this measures what the launches cost. It runs one
warm-up generation (which also captures the CUDA graphs), then profiles speculative and plain
generations with ``torch.profiler``, alternating (``--repeats`` of each, the order reversed every other
repeat, the quickest of each kept; CUPTI records the kernels of graph replays one by one), and prints,
per round and per plain step: wall time, summed kernel time (how busy the device was),
kernel count, and the kernels that take the most time. The prefill is left out: both decoders are
generators whose first item is the prefill's token, and the profiler starts after it, so nothing is
subtracted (a difference of two runs went negative on a loaded machine).

    python bench/profile_round.py --device cuda --cuda-graph             # tiny-code pair, dynamic tree, B 1
    python bench/profile_round.py --device cuda --cuda-graph --tree chain --batch 4 --top 30
    python bench/profile_round.py                                        # CPU: operator times instead

A round whose kernel time is far below its wall time is bound by the host (Python, launches, syncs);
one whose kernel time is close to it is bound by the kernels listed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_loop import prompts_for  # noqa: E402
from eagle.api import _default_dtype, load  # noqa: E402
from eagle.models.generate_plain import plain_decode_steps  # noqa: E402
from eagle.speculate import SamplingParams, SpeculativeDecoder  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_events(prof, device: torch.device) -> list[tuple[str, float]]:
    """(name, microseconds) of every kernel (CUDA) or top-level operator (CPU) the profiler saw."""
    out = []
    for e in prof.events():
        if device.type == "cuda":
            if e.device_type == torch.autograd.DeviceType.CUDA:
                out.append((e.name, e.device_time_total))
        elif e.cpu_parent is None and e.name.startswith(("aten::", "eagle")):
            out.append((e.name, e.cpu_time_total))
    return out


def _totals(events) -> dict[str, list[float]]:
    """{name: [summed microseconds, calls]}."""
    by_name: dict[str, list[float]] = {}
    for name, us in events:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    return by_name


def summarise(label: str, run, units: int, unit_name: str, top: int) -> dict:
    """Per-unit figures of ``run`` = (events, wall seconds) of ``units`` rounds or steps, by kernel name."""
    totals = _totals(run[0])
    per = max(units, 1)
    wall_s = run[1]
    total_us = sum(us for us, _ in totals.values())
    calls = sum(c for _, c in totals.values())
    print(
        f"\n{label}: {units} {unit_name}s; per {unit_name}: wall {wall_s * 1e3 / per:.3f} ms, "
        f"device busy {total_us / 1e3 / per:.3f} ms ({total_us / 1e6 / max(wall_s, 1e-9):.0%} of wall), "
        f"{calls / per:.1f} kernels"
    )
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    for name, (us, n) in ranked[:top]:
        print(f"  {us / per:9.1f} us  {n / per:6.1f}x  {us / max(n, 1):7.2f} us each  {name[:110]}")
    return {
        "units": units,
        "wall_ms_per": wall_s * 1e3 / per,
        "busy_ms_per": total_us / 1e3 / per,
        "kernels_per": calls / per,
        "top": [(name, us / per, n / per) for name, (us, n) in ranked[:top]],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-code")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: the device's (float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--tree", default="dynamic", help="dynamic, static or chain")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="profiled runs of each kind; the quickest is used")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else _default_dtype(device)
    model = load(args.model, device=device, dtype=dtype)
    prompts = prompts_for(model, args.batch, 100)
    sampling = SamplingParams(temperature=args.temperature)
    decoder = SpeculativeDecoder(
        model.target, model.head, model._tree(args.tree, args.batch), cuda_graph=args.cuda_graph
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def speculative():  # yields the prefill's tokens, then one item per round
        return decoder.run(prompts, args.new_tokens, sampling, seed=0)

    def plain():  # yields the prefill's token, then one item per step
        return plain_decode_steps(model.target, prompts, args.new_tokens, temperature=args.temperature,
                                  cuda_graph=args.cuda_graph)  # fmt: skip

    def profiled_once(steps) -> tuple[tuple[list, float], int]:
        """(kernel events, wall seconds) and the count of the rounds or steps after the prefill."""
        items = steps()
        next(items)  # the prefill, not profiled
        _sync(device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            units = sum(1 for _ in items)
            _sync(device)
            wall = time.perf_counter() - t0
        return (device_events(prof, device), wall), units

    kinds = {"EAGLE " + args.tree: (speculative, "round"), "plain": (plain, "step")}

    def profiled_alternating() -> dict[str, tuple[tuple[list, float], int]]:
        """Per kind, the quickest of its repeats (one run slowed by another process would skew the
        figures), the kinds alternating, in reverse order on odd repeats, so a load change hits both."""
        runs: dict[str, list] = {label: [] for label in kinds}
        for r in range(args.repeats):
            for label in list(kinds) if r % 2 == 0 else list(kinds)[::-1]:
                runs[label].append(profiled_once(kinds[label][0]))
        return {label: min(rs, key=lambda run: run[0][1]) for label, rs in runs.items()}

    for steps in (speculative, plain):  # warm-up: compiles, captures and keeps the graphs
        for _ in steps():
            pass
    profiled_once(plain)  # and the profiler's own first-use set-up
    _sync(device)
    results = {}
    for label, (run, units) in profiled_alternating().items():
        results[label] = summarise(label, run, units, kinds[label][1], args.top)
    spec, base = results["EAGLE " + args.tree], results["plain"]
    print(
        f"\nround / plain step: wall {spec['wall_ms_per'] / base['wall_ms_per']:.2f}x, "
        f"device busy {spec['busy_ms_per'] / max(base['busy_ms_per'], 1e-9):.2f}x, "
        f"kernels {spec['kernels_per'] / max(base['kernels_per'], 1e-9):.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
