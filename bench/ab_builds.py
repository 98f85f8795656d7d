"""Two builds of the compiled extension (``eagle_kernels/_C*.so``) timed against each other on this CPU.

A kernel change cannot be compared with its predecessor in one process (one extension per process), so
this alternates processes: for each round, each build runs the same cases in a fresh process and the
best time per (build, case) over the rounds is kept. Each process imports ``eagle_kernels`` from a
temporary copy of the package holding that build's library, so the working tree is left alone.

    # keep the old build, rebuild, compare
    cp eagle_kernels/_C*.so /tmp/old.so && python setup.py build_ext --inplace
    OMP_NUM_THREADS=1 python bench/ab_builds.py /tmp/old.so eagle_kernels/_C.cpython-*.so --rounds 3

Cases: ``attention`` (``eagle_kernels.tree_attention`` on CPU tensors: the CPU shapes of
bench/bench_tree_attention.py plus the bundled target's trees of 32 and 64 tokens, float32 and
bfloat16) and ``forward`` (a target forward of T = 1 and 12 tokens of the bundled tiny-code target
after a 250-token cache, float32 and bfloat16) and ``draft`` (the bundled pair's C++ draft tree,
``Eagle2Head.cpu_dynamic_tree``, and greedy rest of a round, ``Eagle2Head.cpu_verify_update``, with
the arguments of a round of real decoding, for the trees depth/top-k/tokens 3/4/12 and 5/8/32) and
``loop`` (whole generations at batch 1, greedy and sampled at temperature 1 with a fixed seed: 96
new tokens after each of 3 held-out 100-token prompts, with EAGLE, tree 3/4/12, and with plain
decoding; microseconds per generated token, so each build's EAGLE speedup is the ratio of two rows). Prints microseconds per call and new / old ratios;
``--out FILE`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ("attention", "forward", "draft", "loop")


QUICK = "--quick" in sys.argv  # a smoke run: one short timing per case


def _best_us(fn, min_seconds: float = 0.05, repeats: int = 5) -> float:
    from bench.utils import best_host_us  # the worker's import (the parent process needs no torch)

    if QUICK:
        fn()
        return best_host_us(fn, 1, 1)
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    calls = max(3, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
    return best_host_us(fn, calls, repeats)


def attention_cases() -> dict[str, float]:
    import torch

    from bench.bench_tree_attention import CPU_SHAPES, make_inputs
    from eagle_kernels import tree_attention

    shapes = dict(CPU_SHAPES)
    shapes.update({f"tiny-tree{T}-B1": (1, T, 4, 2, 64, 200, "tree") for T in (32, 64)})
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, shape in shapes.items():
            q, k, v, seqlens, mask = make_inputs(shape, torch.device("cpu"), dtype)
            out[f"tree_attention {name} {str(dtype).removeprefix('torch.')}"] = _best_us(
                functools.partial(tree_attention, q, k, v, seqlens, mask)
            )
    return out


def forward_cases() -> dict[str, float]:
    import torch

    from eagle.api import load

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load("tiny-code", dtype=dtype)
        target = model.target
        for T in (1, 12):
            cache = target.new_cache(1, 400)
            cache.advance(250)
            ids = torch.randint(
                0, target.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)
            )
            mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None]
            with torch.inference_mode():
                us = _best_us(functools.partial(target, ids, cache, tree_mask=mask), min_seconds=0.2)
            out[f"tiny-code target forward T={T} {str(dtype).removeprefix('torch.')}"] = us
    return out


def draft_cases() -> dict[str, float]:
    import torch

    from bench.bench_loop import prompts_for
    from eagle.api import load
    from eagle.models.draft import set_cpu_round
    from eagle.speculate import SamplingParams, SpeculativeDecoder
    from eagle.tree import TreeConfig

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load("tiny-code", dtype=dtype)
        head = model.head
        prompts = prompts_for(model, 1, 150)
        for depth, topk, tokens in ((3, 4, 12), (5, 8, 32)):
            decoder = SpeculativeDecoder(model.target, head, TreeConfig(depth, topk, tokens))
            calls = {}
            for name in ("cpu_dynamic_tree", "cpu_verify_update"):
                real = getattr(head, name)

                def spy(*args, _real=real, _name=name, _calls=calls, **kwargs):
                    _calls.setdefault(_name, (_real, args, kwargs))  # the first round's arguments
                    return _real(*args, **kwargs)

                setattr(head, name, spy)
            fused = set_cpu_round(False)  # the two calls are timed apart: not the one-call round
            try:
                steps = decoder.run(prompts, 32, SamplingParams(temperature=0.0), seed=0)
                for _ in zip(range(3), steps):  # the prefill and two rounds
                    pass
                steps.close()
            finally:
                set_cpu_round(fused)
                for name in ("cpu_dynamic_tree", "cpu_verify_update"):
                    delattr(head, name)
            tree = f"{depth}/{topk}/{tokens}"
            label = str(dtype).removeprefix("torch.")
            for name, (fn, args, kwargs) in calls.items():
                with torch.inference_mode():  # the verify-update re-compacts the same rows: same work
                    out[f"tiny-code {name} {tree} {label}"] = _best_us(functools.partial(fn, *args, **kwargs))
    return out


def loop_cases() -> dict[str, float]:
    import torch

    from bench.bench_loop import prompts_for
    from eagle.api import load
    from eagle.models.generate_plain import generate_plain
    from eagle.tree import TreeConfig

    def one_by_one(generate, prompts):  # batch 1, one prompt after the other
        for prompt in prompts:
            generate([prompt])

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load("tiny-code", dtype=dtype)
        prompts = prompts_for(model, 1 if QUICK else 3, 100)
        label = str(dtype).removeprefix("torch.")
        tree = TreeConfig(3, 4, 12)
        new_tokens = 8 if QUICK else 96
        runs = {
            # EOS ignored, as plain decoding here: both sides make new_tokens per prompt
            "EAGLE 3/4/12 B1 T0": functools.partial(
                model.generate, max_new_tokens=new_tokens, tree=tree, eos_token_id=[]
            ),
            "plain B1 T0": functools.partial(generate_plain, model.target, max_new_tokens=new_tokens),
            # sampled: fixed seeds, so both builds generate the same tokens (same work)
            "EAGLE 3/4/12 B1 T1": functools.partial(
                model.generate, max_new_tokens=new_tokens, tree=tree, temperature=1.0, seed=0, eos_token_id=[]
            ),
            "plain B1 T1": functools.partial(
                generate_plain, model.target, max_new_tokens=new_tokens, temperature=1.0, seed=0
            ),
        }
        for name, generate in runs.items():
            us = _best_us(functools.partial(one_by_one, generate, prompts), min_seconds=0.3)
            out[f"tiny-code {name} {label}, us/token"] = us / (new_tokens * len(prompts))
    return out


def worker(cases: list[str]) -> None:
    """Runs in the child process: prints {case: microseconds} as JSON."""
    import torch

    torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    import eagle_kernels

    sys.stderr.write(f"eagle_kernels from {Path(eagle_kernels.__file__).parent}\n")
    result = {}
    if "attention" in cases:
        result.update(attention_cases())
    if "forward" in cases:
        result.update(forward_cases())
    if "draft" in cases:
        result.update(draft_cases())
    if "loop" in cases:
        result.update(loop_cases())
    print(json.dumps(result))


def package_with(build: Path, root: Path) -> Path:
    """A copy of the eagle_kernels package under ``root`` whose extension is ``build``."""
    pkg = root / "eagle_kernels"
    shutil.copytree(REPO / "eagle_kernels", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copy2(build, pkg / build.name if build.name.startswith("_C") else pkg / "_C.so")
    return root


def run_build(root: Path, cases: list[str], threads: int) -> dict[str, float]:
    env_path = f"{root}:{REPO}"
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            *cases,
            "--threads",
            str(threads),
            *(["--quick"] if QUICK else []),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": env_path},
        cwd=root,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed:\n{proc.stderr[-3000:]}")
    where = proc.stderr.strip().splitlines()[0]
    if str(root) not in where:
        raise RuntimeError(f"the worker did not import the copied package ({where})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path, help="the baseline build (an _C*.so file)")
    p.add_argument("new", type=Path, help="the build under test")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="smoke test: one short timing per case")
    args = p.parse_args(argv)

    best: dict[str, dict[str, float]] = {"old": {}, "new": {}}
    with tempfile.TemporaryDirectory() as tmp:
        roots = {name: package_with(build.resolve(), Path(tmp) / name) for name, build in
                 (("old", args.old), ("new", args.new))}  # fmt: skip
        for r in range(args.rounds):
            # old first in even rounds, new first in odd ones: a build that always ran second (a warmer
            # or a more throttled machine) showed as 4% slower on the cases its change cannot reach
            for name, root in list(roots.items())[:: -1 if r % 2 else 1]:
                for case, us in run_build(root, args.cases, args.threads).items():
                    best[name][case] = min(best[name].get(case, float("inf")), us)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{'case':58s} {'old us':>10s} {'new us':>10s} {'new/old':>8s}")
    for case, old in best["old"].items():
        new = best["new"][case]
        print(f"{case:58s} {old:10.1f} {new:10.1f} {new / old:8.3f}")
    if args.out:
        sys.path.insert(0, str(REPO))
        from bench.utils import machine_info  # (imports torch and this checkout's eagle_kernels: only now)

        settings = {k: str(v) for k, v in vars(args).items()}
        payload = {"machine": machine_info(), "settings": settings, "best_us": best}
        args.out.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker([c for c in sys.argv[sys.argv.index("--worker") + 1 :] if c in CASES])
    else:
        raise SystemExit(main())
