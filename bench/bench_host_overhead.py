"""Host (Python) overhead of the eager public ops: the public call vs the bare ``eagle_C`` kernel.

    pytest bench/bench_host_overhead.py --benchmark-only --benchmark-group-by=param:case
    python bench/bench_host_overhead.py                       # table: public, bare, overhead (us/call)
    python bench/bench_host_overhead.py --compare HEAD~3      # before/after table, interleaved rounds

On CPU tensors the public function runs the same Python as on CUDA up to the kernel call (argument
checks, backend selection, output allocation, dtype conversions, the custom-op dispatch), and then the
C++ kernel, which at these decode sizes takes a few microseconds. Timing the bare kernel
(``torch.ops.eagle_C.<op>`` on pre-allocated / pre-converted arguments) on the same inputs makes the
difference the wrapper's cost per call. Sizes: B 1 and 64, trees of n 8 and 64, V 32000 for the
sampling ops (probability rows are strided views of a small pool, as the walk only reads a few).

``--compare REV`` extracts ``eagle_kernels`` at git revision ``REV`` into a temporary directory
(with this checkout's compiled ``_C`` library, so only the Python differs) and alternates rounds of
the old and the current package in subprocesses; each figure is the best over the rounds, so load
from other jobs on the machine hits both sides alike. Needs the C++ extension (the cpp backend).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

import eagle_kernels  # noqa: E402
from eagle_kernels._backend import available_backends  # noqa: E402

CPU = torch.device("cpu")
V = 32000
STEPS = 7  # root + up to 6 accepted drafts
TREES = {8: (4, 4), 64: (8, 6)}  # n -> (topk, depth) of build_tree's EAGLE-2 drafts


@dataclass(frozen=True)
class Case:
    """One op at one size: the eager public call and the bare kernel call on the same inputs."""

    op: str
    shape: str
    public: Callable[[], object]
    bare: Callable[[], object]

    @property
    def name(self) -> str:
        return f"{self.op}-{self.shape}"


def _bare(op: str) -> Callable:
    return getattr(torch.ops.eagle_C, op)


def _build_tree_cases() -> list[Case]:
    from bench.bench_build_tree import eagle2_inputs
    from eagle_kernels.build_tree import MASK_MODES, _allocate_outputs

    cases = []
    for B in (1, 64):
        for n, (topk, depth) in TREES.items():
            parents, selected = eagle2_inputs(B, n, topk, depth)
            seq_lens = torch.randint(100, 400, (B,), generator=torch.Generator().manual_seed(1))
            mode = MASK_MODES["qlen_bool"]
            outputs = _allocate_outputs(selected, seq_lens, n, mode)
            kw = dict(topk=topk, depth=depth, num_draft_tokens=n, mask_mode="qlen_bool")
            cases.append(
                Case(
                    "build_tree",
                    f"B{B}-n{n}",
                    lambda p=parents, s=selected, q=seq_lens, kw=kw: eagle_kernels.build_tree(p, s, q, **kw),
                    lambda p=parents, s=selected, q=seq_lens, o=outputs, a=(topk, depth, n, mode): _bare(
                        "build_tree"
                    )(p, s, q, *o, *a),
                )
            )
    return cases


def _verify_cases() -> list[Case]:
    from bench.bench_verify_tree_greedy import make_inputs

    cases = []
    for B in (1, 64):
        for n in TREES:
            inputs = make_inputs(B, n, CPU)
            cases.append(
                Case(
                    "verify_tree_greedy",
                    f"B{B}-n{n}",
                    lambda x=inputs: eagle_kernels.verify_tree_greedy(*x, num_spec_steps=STEPS),
                    lambda x=inputs: _bare("verify_tree_greedy")(*x, STEPS),
                )
            )
    return cases


def _tree_sampling_cases() -> list[Case]:
    from bench.bench_tree_speculative_sampling import make_inputs

    cases = []
    for B in (1, 64):
        for n in TREES:
            cand, rows, first, sibling, probs, u, uf = make_inputs(B, n, V, CPU)
            tree = (cand, rows, first, sibling, probs)
            cases.append(
                Case(
                    "tree_speculative_sampling",
                    f"B{B}-n{n}-V{V}",
                    lambda t=tree, u=u, uf=uf: eagle_kernels.tree_speculative_sampling(
                        *t, u, uf, num_spec_steps=STEPS
                    ),
                    lambda t=tree, u=u, uf=uf: _bare("tree_speculative_sampling")(
                        *t, None, u, uf, STEPS, False, 1.0, 1.0
                    ),
                )
            )
    return cases


def _chain_inputs(B: int, k: int, seed: int = 0) -> tuple:
    """vLLM-layout inputs: B requests of k one-hot drafts each, target rows from a small pool."""
    gen = torch.Generator().manual_seed(seed)
    T = B * k
    pool = torch.softmax(torch.randn(8, V, generator=gen) * 7, -1)
    target = pool[torch.arange(T) % 8]
    drafts = target.argmax(-1)  # likely accepted: the long (costly) path
    cu = torch.arange(1, B + 1, dtype=torch.int64) * k
    bonus = torch.randint(0, V, (B,), generator=gen)
    return drafts, cu, None, target, bonus, torch.rand(T, generator=gen), torch.rand(B, generator=gen)


def _chain_cases() -> list[Case]:
    cases = []
    for B in (1, 64):
        k = STEPS - 1
        args = _chain_inputs(B, k)
        cases.append(
            Case(
                "chain_speculative_sampling",
                f"B{B}-k{k}-V{V}",
                lambda a=args, k=k: eagle_kernels.chain_speculative_sampling(*a, max_spec_len=k),
                lambda a=args, k=k: _bare("chain_speculative_sampling")(*a, k),
            )
        )
    return cases


def _compact_cases() -> list[Case]:
    cases = []
    L, H, D = 4, 2, 64  # a small model's cache: the per-call host cost does not depend on it
    for B in (1, 64):
        for n in TREES:
            S = 64 + n
            kv = torch.zeros(L, 2, B, H, S, D)
            seqlens = torch.full((B,), 32, dtype=torch.int32)
            gen = torch.Generator().manual_seed(0)
            slots = torch.stack(
                [torch.randperm(n - 1, generator=gen)[: STEPS - 1].sort().values + 1 for _ in range(B)]
            )
            index = torch.cat([torch.zeros(B, 1, dtype=torch.long), slots], 1) + torch.arange(B)[:, None] * n
            num = torch.full((B,), STEPS - 1, dtype=torch.int32)
            args = (kv, seqlens, index, num)
            cases.append(
                Case(
                    "compact_kv_cache",
                    f"B{B}-n{n}",
                    lambda a=args, n=n: eagle_kernels.compact_kv_cache(*a, num_draft_tokens=n),
                    lambda a=args, n=n: _bare("compact_kv_cache")(*a, n),
                )
            )
    return cases


def _warp_cases() -> list[Case]:
    cases = []
    for R in (1, 64):
        logits = torch.randn(R, V, generator=torch.Generator().manual_seed(0)) * 3
        params = (
            torch.full((R,), 0.7),
            torch.full((R,), 50, dtype=torch.int64),
            torch.full((R,), 0.9),
            torch.full((R,), 0.05),
        )
        cases.append(
            Case(
                "warp_logits",
                f"R{R}-V{V}",
                lambda x=logits: eagle_kernels.warp_logits(x, 0.7, 50, 0.9, 0.05),
                lambda x=logits, p=params: _bare("warp_logits")(x, *p),
            )
        )
    return cases


def make_cases() -> list[Case]:
    """Every (op, size) case, in a fixed order."""
    return [
        *_build_tree_cases(),
        *_verify_cases(),
        *_tree_sampling_cases(),
        *_chain_cases(),
        *_compact_cases(),
        *_warp_cases(),
    ]


def cpp_available() -> bool:
    return all("cpp" in available_backends(op, CPU) for op in OP_NAMES)


OP_NAMES = (
    "build_tree",
    "verify_tree_greedy",
    "tree_speculative_sampling",
    "chain_speculative_sampling",
    "compact_kv_cache",
    "warp_logits",
)


# --------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------
CASE_NAMES = [
    *(f"build_tree-B{B}-n{n}" for B in (1, 64) for n in TREES),
    *(f"verify_tree_greedy-B{B}-n{n}" for B in (1, 64) for n in TREES),
    *(f"tree_speculative_sampling-B{B}-n{n}-V{V}" for B in (1, 64) for n in TREES),
    *(f"chain_speculative_sampling-B{B}-k{STEPS - 1}-V{V}" for B in (1, 64)),
    *(f"compact_kv_cache-B{B}-n{n}" for B in (1, 64) for n in TREES),
    *(f"warp_logits-R{R}-V{V}" for R in (1, 64)),
]


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    if not cpp_available():
        pytest.skip("the C++ extension is not built: there is no bare kernel to compare with")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield {c.name: c for c in make_cases()}
    finally:
        torch.set_num_threads(threads)


def test_case_names_match(cases):
    assert sorted(cases) == sorted(CASE_NAMES)


@pytest.mark.parametrize("call", ["public", "bare"])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_host_overhead(benchmark, cases, case, call):
    c = cases[case]
    with eagle_kernels.use_backend("cpp"):
        benchmark(getattr(c, call))


# --------------------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------------------
def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def measure(calls: int, repeats: int, only: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Best-of-``repeats`` microseconds per call of the public and the bare call of every case
    (public and bare alternate within each repeat)."""
    results: dict[str, dict[str, float]] = {}
    with eagle_kernels.use_backend("cpp"):
        for case in make_cases():
            if only and case.op not in only:
                continue
            public, bare = float("inf"), float("inf")
            for _ in range(repeats):
                public = min(public, _per_call_us(case.public, calls))
                bare = min(bare, _per_call_us(case.bare, calls))
            results[case.name] = {"public_us": public, "bare_us": bare}
    return results


def _format_table(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'case':44s} {'public':>9s} {'bare':>9s} {'overhead':>9s}   (us per call)"]
    for name, r in results.items():
        lines.append(
            f"{name:44s} {r['public_us']:9.1f} {r['bare_us']:9.1f} {r['public_us'] - r['bare_us']:9.1f}"
        )
    return "\n".join(lines)


def _old_package(rev: str, tmp: Path) -> Path:
    """``eagle_kernels`` at ``rev`` under ``tmp``, with this checkout's compiled extension."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "eagle_kernels"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    here = Path(eagle_kernels.__file__).parent
    for built in [*here.glob("_C*.so"), here / "_build_info.py"]:
        if built.exists():
            shutil.copy2(built, tmp / "eagle_kernels" / built.name)
    return tmp


def _run_round(pythonpath: Path | None, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--json", "--calls", str(args.calls), "--repeats", str(args.repeats)]
    if args.ops:
        cmd += ["--ops", *args.ops]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out)


def compare(args) -> dict:
    """Alternate ``args.rounds`` rounds of the package at ``args.compare`` and of this checkout."""
    with tempfile.TemporaryDirectory() as tmp:
        old_path = _old_package(args.compare, Path(tmp))
        best: dict[str, dict[str, dict[str, float]]] = {"before": {}, "after": {}}
        for _ in range(args.rounds):
            for side, path in (("before", old_path), ("after", None)):
                for name, r in _run_round(path, args)["results"].items():
                    prev = best[side].setdefault(name, {"public_us": float("inf"), "bare_us": float("inf")})
                    for key in prev:
                        prev[key] = min(prev[key], r[key])
    return best


def _format_compare(best: dict) -> str:
    head = f"{'case':44s} {'bare':>7s} {'before':>8s} {'after':>8s} {'overhead before->after':>24s}"
    lines = [head + "   (us per call)"]
    for name, after in best["after"].items():
        before = best["before"][name]
        bare = min(before["bare_us"], after["bare_us"])
        ob, oa = before["public_us"] - bare, after["public_us"] - bare
        lines.append(
            f"{name:44s} {bare:7.1f} {before['public_us']:8.1f} {after['public_us']:8.1f} "
            f"{ob:10.1f} -> {oa:6.1f} ({oa / ob if ob > 0 else float('nan'):4.2f}x)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=300, help="calls per timing")
    p.add_argument("--repeats", type=int, default=5, help="timings per case (best is kept)")
    p.add_argument("--ops", nargs="*", help=f"only these ops (of {OP_NAMES})")
    p.add_argument("--compare", metavar="REV", help="also time eagle_kernels at this git revision")
    p.add_argument("--rounds", type=int, default=3, help="--compare: alternating rounds per side")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.ops and set(args.ops) - set(OP_NAMES):
        raise SystemExit(f"unknown ops {sorted(set(args.ops) - set(OP_NAMES))}; choose from {OP_NAMES}")
    torch.set_num_threads(1)
    if not cpp_available():
        raise SystemExit("the C++ extension is not built: there is no bare kernel to compare with")
    if args.compare:
        print(_format_compare(compare(args)))
        return
    results = measure(args.calls, args.repeats, args.ops)
    if args.json:
        print(json.dumps({"eagle_kernels": eagle_kernels.__file__, "results": results}))
    else:
        print(_format_table(results))


if __name__ == "__main__":
    main()
