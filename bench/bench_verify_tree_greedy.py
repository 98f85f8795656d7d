"""verify_tree_greedy: C++ (CPU) / CUDA / Triton vs the PyTorch reference.

pytest bench/bench_verify_tree_greedy.py --benchmark-only --benchmark-group-by=param:shape

``test_verify_tree_greedy`` times the public op per backend (argument and tree validation included:
in Python for the reference and Triton on CPU, inside the kernel for C++); on CUDA extra_info adds
the kernel-only time (``kernel_us``, CUDA-graph replays: ``bench/utils.py``) with GB/s of the inputs
and outputs and the roofline fraction, next to the eager figures. ``test_kernel_only`` times
the bare C++ op against the bare reference function at B=16, n=64, the size the >= 10x target is set at.
Trees: random, depth <= 6, siblings in random order; the target agrees with some child of a node
with probability 0.8, so accepted paths are long (the costly case for a serial walk).
"""

from __future__ import annotations

import random

import pytest
import torch

import eagle_kernels
from bench.utils import check_against_reference, record_kernel_time, synchronized, tensor_bytes
from eagle_kernels._backend import available_backends
from eagle_kernels.verify_tree_greedy import verify_tree_greedy_ref

OP = "verify_tree_greedy"
STEPS = 7  # root + up to 6 accepted drafts
SHAPES = {f"B{B}-n{n}": (B, n) for n in (8, 64) for B in (1, 8, 16, 64)}


def make_inputs(B: int, n: int, device: torch.device, seed: int = 0):
    rng = random.Random(seed)
    depth = [0] * n
    cand = torch.empty(B, n, dtype=torch.int64)
    target = torch.empty(B, n, dtype=torch.int64)
    first = torch.full((B, n), -1, dtype=torch.int64)
    sibling = torch.full((B, n), -1, dtype=torch.int64)
    for b in range(B):
        children: list[list[int]] = [[] for _ in range(n)]
        for s in range(1, n):
            parent = rng.choice([p for p in range(s) if depth[p] < STEPS - 1])
            depth[s] = depth[parent] + 1
            children[parent].append(s)
        for p, kids in enumerate(children):
            rng.shuffle(kids)
            if kids:
                first[b, p] = kids[0]
            for left, right in zip(kids, kids[1:]):
                sibling[b, left] = right
        cand[b] = torch.tensor([rng.randrange(32000) for _ in range(n)])
        for s in range(n):
            kids = children[s]
            target[b, s] = cand[b, rng.choice(kids)] if kids and rng.random() < 0.8 else rng.randrange(32000)
    rows = torch.arange(B * n, dtype=torch.int64).view(B, n)
    return tuple(t.to(device) for t in (cand, rows, first, sibling, target))


def backends(device: torch.device) -> list[str]:
    return [b for b in available_backends(OP, device) if not (b == "triton" and device.type == "cpu")]


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda", "triton"])
def test_verify_tree_greedy(benchmark, bench_device, shape, backend):
    if backend not in backends(bench_device):
        pytest.skip(f"{backend} not available on {bench_device.type}")
    B, n = SHAPES[shape]
    inputs = make_inputs(B, n, bench_device)
    call = lambda: eagle_kernels.verify_tree_greedy(*inputs, num_spec_steps=STEPS)  # noqa: E731
    fn = synchronized(call, bench_device)
    check_against_reference(call, backend)
    with eagle_kernels.use_backend(backend):
        benchmark(fn)
        record_kernel_time(benchmark, call, tensor_bytes(inputs, fn()), bench_device)
    benchmark.extra_info["mean_accepted"] = float(fn()[2].float().mean())


@pytest.mark.parametrize("impl", ["reference", "cpp-kernel"])
def test_kernel_only(benchmark, impl):
    if impl == "cpp-kernel" and "cpp" not in available_backends(OP, torch.device("cpu")):
        pytest.skip("C++ extension not built")
    inputs = make_inputs(16, 64, torch.device("cpu"))
    if impl == "reference":
        benchmark(verify_tree_greedy_ref, *inputs, STEPS)
    else:
        benchmark(torch.ops.eagle_C.verify_tree_greedy, *inputs, STEPS)
