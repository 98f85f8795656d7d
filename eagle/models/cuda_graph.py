"""CUDA-graph capture of a decoding step, shared by plain decoding and the EAGLE loop.

A step is a Python function whose kernels read and write fixed tensors (inputs copied in place,
caches updated in place). Capturing runs its Python once without executing its kernels, so host-side
bookkeeping it does (the caches' ``length_bound``) is undone after the capture; the caller advances it
per replay by what one replay commits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from eagle.models.kv_cache import KVCache

T = TypeVar("T")


def on_side_stream(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh CUDA stream (joined both ways with the current one). Lazily created
    per-stream state (cuBLAS workspaces, Triton compiles) then exists before a graph capture, which
    also runs on a side stream, as the CUDA-graph recipe of the PyTorch docs prescribes."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def capture(
    step: Callable[[], T], caches: Sequence[KVCache], generator: torch.Generator | None = None
) -> tuple[torch.cuda.CUDAGraph, T]:
    """Capture ``step`` into a CUDA graph; returns (graph, the step's graph-owned outputs).

    The caches' host bounds must already be tight enough that nothing inside ``step`` reads lengths
    back (call their ``check_room`` first); they are restored after the capture. ``generator``: a
    non-default generator the step draws from (registered with the graph).
    """
    bounds = [c.length_bound for c in caches]
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    torch.cuda.synchronize(caches[0].device)
    try:
        with torch.cuda.graph(graph):
            out = step()
    finally:
        for c, bound in zip(caches, bounds):
            c.length_bound = bound
    return graph, out
