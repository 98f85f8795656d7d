"""tree_speculative_sampling (+ the sampled-draft variant): C++ (CPU) / CUDA / Triton vs the PyTorch
reference.

    pytest bench/bench_tree_speculative_sampling.py --benchmark-only --benchmark-group-by=param:shape

``test_tree_speculative_sampling`` times the public op per backend (validation included: fused into
the kernels). On CUDA extra_info adds the kernel-only time (``kernel_us``, CUDA-graph replays:
``bench/utils.py``) next to the eager figures, each with GB/s and the roofline fraction of
:func:`walk_bytes` (the full probability rows a walk must read: one per sequence for the bonus, two
with draft probabilities; a lower bound, the tried children's entries are not counted). ``test_kernel_only`` times the bare C++ op against the bare reference function at
B=16, n=64, V=32000, the size the >= 10x target is set at. Trees: random, depth <= 6, every node's
children are the top tokens of the node's target row (as top-k drafts of a good draft model would
be), so paths get accepted deep. Target rows are peaked softmaxes; to keep the largest shapes
affordable in memory, row ``(b, s)`` is row ``b + s`` of a ``[B + n, V]`` pool (a strided view).
"""

from __future__ import annotations

import random

import pytest
import torch

import eagle_kernels
from bench.utils import check_against_reference, record_kernel_time, synchronized
from eagle_kernels._backend import available_backends
from eagle_kernels.tree_speculative_sampling import _tree_sampling_torch

OP = "tree_speculative_sampling"
STEPS = 7  # root + up to 6 accepted drafts
SHAPES = {f"B{B}-n{n}-V{V}": (B, n, V) for V in (32000, 128256) for n in (8, 64) for B in (1, 8, 64)}
SHAPES["B16-n64-V32000"] = (16, 64, 32000)


def make_inputs(B: int, n: int, V: int, device: torch.device, *, draft: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    pool = torch.softmax(torch.randn(B + n, V, generator=gen) * 7, -1)
    probs = pool.as_strided((B, n, V), (V, V, 1))
    top = pool.topk(n, dim=-1).indices  # children are the best tokens of their parent's row
    cand = torch.zeros(B, n, dtype=torch.int64)
    first = torch.full((B, n), -1, dtype=torch.int64)
    sibling = torch.full((B, n), -1, dtype=torch.int64)
    for b in range(B):
        depth, last_child, rank = [0] * n, {}, [0] * n
        for s in range(1, n):
            parent = rng.choice([p for p in range(s) if depth[p] < STEPS - 1])
            depth[s] = depth[parent] + 1
            if parent in last_child:
                sibling[b, last_child[parent]] = s
            else:
                first[b, parent] = s
            last_child[parent] = s
            cand[b, s] = top[b + parent, rank[parent]]
            rank[parent] += 1
    rows = torch.arange(B * n, dtype=torch.int64).view(B, n)
    u = torch.rand(B, n, generator=gen)
    uf = torch.rand(B, generator=gen)
    inputs = [cand, rows, first, sibling, probs]
    if draft:
        inputs.append(
            torch.softmax(torch.randn(B + n, V, generator=gen) * 4, -1).as_strided((B, n, V), (V, V, 1))
        )
    return [t.to(device) for t in (*inputs, u, uf)]


def walk_bytes(B: int, n: int, V: int, *, draft: bool = False) -> int:
    """Lower bound of the traffic of one call: per sequence the float32 row the bonus token is drawn
    from (and, with draft probabilities, the draft row of the residual), plus the int64 tree arrays
    and the uniforms."""
    return B * V * 4 * (2 if draft else 1) + B * n * (4 * 8 + 4) + B * 4


def backends(device: torch.device) -> list[str]:
    return [b for b in available_backends(OP, device) if not (b == "triton" and device.type == "cpu")]


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda", "triton"])
def test_tree_speculative_sampling(benchmark, bench_device, shape, backend):
    if backend not in backends(bench_device):
        pytest.skip(f"{backend} not available on {bench_device.type}")
    B, n, V = SHAPES[shape]
    inputs = make_inputs(B, n, V, bench_device)
    call = lambda: eagle_kernels.tree_speculative_sampling(*inputs, num_spec_steps=STEPS)  # noqa: E731
    fn = synchronized(call, bench_device)
    check_against_reference(call, backend)
    with eagle_kernels.use_backend(backend):
        benchmark(fn)
        benchmark.extra_info["mean_accepted"] = float(fn()[2].float().mean())
        record_kernel_time(benchmark, call, walk_bytes(B, n, V), bench_device)


@pytest.mark.parametrize("shape", ["B8-n64-V32000", "B64-n64-V32000"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda", "triton"])
def test_tree_speculative_sampling_draft_probs(benchmark, bench_device, shape, backend):
    if backend not in backends(bench_device):
        pytest.skip(f"{backend} not available on {bench_device.type}")
    B, n, V = SHAPES[shape]
    inputs = make_inputs(B, n, V, bench_device, draft=True)
    call = lambda: eagle_kernels.tree_speculative_sampling_draft_probs(*inputs, num_spec_steps=STEPS)  # noqa: E731
    fn = synchronized(call, bench_device)
    check_against_reference(call, backend)
    with eagle_kernels.use_backend(backend):
        benchmark(fn)
        benchmark.extra_info["mean_accepted"] = float(fn()[2].float().mean())
        record_kernel_time(benchmark, call, walk_bytes(B, n, V, draft=True), bench_device)


@pytest.mark.parametrize("impl", ["reference", "cpp-kernel"])
def test_kernel_only(benchmark, impl):
    """The >= 10x target: bare C++ op vs bare reference, B=16, n=64, V=32000."""
    if impl == "cpp-kernel" and "cpp" not in available_backends(OP, torch.device("cpu")):
        pytest.skip("C++ extension not built")
    args = make_inputs(16, 64, 32000, torch.device("cpu"))
    full = (*args[:5], None, *args[5:], STEPS, False, 1.0, 1.0)
    if impl == "reference":
        benchmark(_tree_sampling_torch, *full)
    else:
        benchmark(torch.ops.eagle_C.tree_speculative_sampling, *full)
