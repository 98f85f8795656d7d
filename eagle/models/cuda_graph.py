"""CUDA-graph capture of a decoding step, shared by plain decoding and the EAGLE loop.

A step is a Python function whose kernels read and write fixed tensors (inputs copied in place,
caches updated in place). Capturing runs its Python once without executing its kernels, so host-side
bookkeeping it does (the caches' ``length_bound``) is undone after the capture; the caller advances it
per replay by what one replay commits.

Threads (a server's workers sharing one model) may capture and replay at once:

* captures and the warm-ups before them take turns (one lock per process): they share a side stream
  per device, on which two captures at once fail (and a warm-up's kernels would join the capture),
  and ``torch.cuda.graph`` synchronises the whole device on entry, which invalidates a capture in
  progress in another thread whatever its mode;
* a capture runs in ``thread_local`` mode (``cudaStreamCaptureModeThreadLocal``), not the default
  ``global`` one, under which another thread's potentially unsafe CUDA call meanwhile (an allocation
  growing the caching allocator, a synchronous copy of an eager round) fails that call and invalidates
  the capture;
* the decoding loops wait for their own stream (:func:`synchronize_stream`), never for the whole
  device, for the same reason.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch

from eagle.models.kv_cache import KVCache

T = TypeVar("T")
V = TypeVar("V")

# batch states whose buffers and CUDA graph a pool keeps by default (an EagleModel's trees together,
# plain decoding of a model, or a SpeculativeDecoder built alone)
DEFAULT_POOL_CAPACITY = 4


def check_pool_capacity(capacity: object) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"the number of kept batch states must be an int >= 1, got {capacity!r}")
    return capacity


class BufferPool(Generic[V]):
    """Buffers (KV caches, step state, their CUDA graph) of finished runs, kept for later runs.

    A run ``take``s the entry of its key (so no other run can use it meanwhile) and ``put``s it back
    when it ends. At most ``capacity`` keys are kept; putting a new one evicts the least recently
    used, so a caller cycling through many batch sizes or sampling settings does not keep a cache
    for each.
    """

    def __init__(self, capacity: int = DEFAULT_POOL_CAPACITY) -> None:
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self.capacity = capacity

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, capacity: int) -> None:
        """Setting a smaller capacity drops the least recently used entries beyond it."""
        self._capacity = check_pool_capacity(capacity)
        self._evict()

    def _evict(self) -> None:
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def take(self, key: Hashable) -> V | None:
        return self._entries.pop(key, None)

    def put(self, key: Hashable, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        self._evict()

    def clear(self) -> None:
        self._entries.clear()

    def discard_where(self, predicate: Callable[[Hashable], bool]) -> None:
        """Drop the entries whose key satisfies ``predicate`` (one user's entries of a shared pool)."""
        for key in [k for k in self._entries if predicate(k)]:
            del self._entries[key]

    def values(self) -> list[V]:
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


def on_side_stream(fn: Callable[[], T], device: torch.device) -> T:
    """Run ``fn`` on ``device``'s side stream, the one captures use (joined both ways with the current
    stream), taking turns with captures. Lazily created per-stream state (cuBLAS workspaces, Triton
    compiles) then exists before a graph capture, which also runs on a side stream, as the CUDA-graph
    recipe of the PyTorch docs prescribes. Not a fresh ``torch.cuda.Stream()``: torch hands those out
    round-robin from a pool of 32 per device and priority, so every 32nd was the capture stream, and a
    warm-up in one thread would have queued its kernels into another thread's capture.

    Streams, captures and replays belong to the *current* CUDA device, so each of these helpers makes
    the model's device current: a model on ``cuda:1`` with device 0 current is captured and replayed
    on ``cuda:1``."""
    with _CAPTURE_LOCK, torch.cuda.device(device):
        side = _capture_stream(device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
    return out


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}
# one capture or warm-up at a time in the process (see the module docstring); reentrant, in case a
# warm-up's step ever captures
_CAPTURE_LOCK = threading.RLock()


def synchronize_stream(device: torch.device) -> None:
    """Wait for the work queued on ``device``'s current stream (this thread's), not for the whole
    device: a device-wide synchronisation from one thread invalidates a CUDA-graph capture running in
    another, in any capture mode. No-op off CUDA."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture and warm-up on it (as torch.cuda.graph's default,
    which is one stream for the whole process, created on the device that captured first), taken
    from torch's high-priority pool so that other code's default-priority streams are not it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(index, priority=-1)
    return _CAPTURE_STREAMS[index]


def replay(graph: torch.cuda.CUDAGraph, device: torch.device) -> None:
    """Replay ``graph`` (captured by :func:`capture` on ``device``) on ``device``'s current stream."""
    with torch.cuda.device(device):
        graph.replay()


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
    device = caches[0].device
    synchronize_stream(device)
    try:
        with _CAPTURE_LOCK, torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            try:
                with torch.cuda.graph(
                    graph, stream=_capture_stream(device), capture_error_mode="thread_local"
                ):
                    out = step()
            except BaseException:
                # torch.cuda.graph's exit ends the capture before it restores the stream; when ending
                # it raises (an invalidated capture), the capture stream stayed current for the thread.
                # Restored inside the device context: set_stream also makes the stream's device current.
                torch.cuda.set_stream(stream)
                raise
    finally:
        for c, bound in zip(caches, bounds):
            c.length_bound = bound
    return graph, out
