"""Per-call backend selection shared by every op.

Default, by the device of the op's tensors:

* CUDA tensors -> the CUDA extension kernel when the op has one and prefers it, else Triton;
* CPU tensors  -> the C++ extension kernel when it is built, else the PyTorch reference.

``EAGLE_KERNELS_BACKEND=cuda|triton|cpp|torch`` (or the :func:`use_backend` context manager, which
wins over the variable) forces one backend for every op. A forced backend that cannot run raises an
error saying why instead of silently using another one. ``triton`` on CPU tensors runs through the
Triton interpreter and therefore requires ``TRITON_INTERPRET=1`` to be set before triton is
imported.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

import torch

from eagle_kernels import _ext
from eagle_kernels._triton import HAS_TRITON, TRITON_UNUSABLE_REASON, interpreter_enabled

BACKENDS = ("cuda", "triton", "cpp", "torch")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("eagle_kernels_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` (one of :data:`BACKENDS`, or None for automatic) within the ``with`` block."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or None")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _environ_reader() -> tuple[Callable[[str], object], Callable[[object], object]]:
    """``(encode_key, read_raw)``: a fast reader of raw environment values. CPython keeps
    ``os.environ`` in a dict of encoded keys and values; reading it with a pre-encoded key skips
    the encoding of ``os.environ.get`` (~0.5 us a lookup). Every change made through ``os.environ``
    (``monkeypatch.setenv`` included) is seen at once; values stay raw (bytes on POSIX) and serve as
    cache keys."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and callable(encode):
        return encode, data.get
    return (lambda name: name), os.environ.get  # pragma: no cover - other os.environ implementations


_encode_key, _raw_env = _environ_reader()
_BACKEND_VAR = _encode_key("EAGLE_KERNELS_BACKEND")
_DEBUG_VAR = _encode_key("EAGLE_KERNELS_DEBUG")
_INTERPRET_VAR = _encode_key("TRITON_INTERPRET")


def _decode(raw: object) -> str:
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``EAGLE_KERNELS_BACKEND``, if any."""
    name = _override.get()
    if name is not None:
        return name
    raw = _raw_env(_BACKEND_VAR)
    if raw is None:
        return None
    env = _decode(raw).strip().lower()
    if not env or env == "auto":
        return None
    if env not in BACKENDS:
        raise ValueError(f"EAGLE_KERNELS_BACKEND={env!r} is not one of {BACKENDS} (or 'auto')")
    return env


def _unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run ``op`` on ``device``, else a human-readable reason."""
    if backend == "torch":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device.type} tensors"
        if not _ext.has_op(op, "cpu"):
            return f"the C++ extension does not provide eagle_C::{op} ({_ext.STATUS.reason})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device.type} tensors"
        if not _ext.has_op(op, "cuda"):
            return f"the CUDA extension does not provide eagle_C::{op} ({_ext.STATUS.reason})"
        index = _cuda_index(device)
        if index is None:
            return "no CUDA GPU is available"
        if not _ext.cuda_device_supported(index):
            return "the CUDA extension was not compiled for this GPU's architecture"
        return None
    if backend == "triton":
        if not HAS_TRITON:
            return TRITON_UNUSABLE_REASON or "Triton is not installed"
        if device.type == "cpu" and not interpreter_enabled():
            return (
                "Triton on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 in the "
                "environment before eagle_kernels (and triton) is first imported"
            )
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels here support CUDA (or interpreted CPU) tensors, got {device.type}"
        return None
    raise ValueError(f"unknown backend {backend!r}")


# Ops whose CUDA extension kernel beat their Triton kernel on a GPU (bench/results/
# gpu_2026-11-26b_NVIDIA-H200.md): on CUDA tensors they run the extension when it is built.
# build_tree: 10 vs 80 us kernel time at n = 64; verify_tree_greedy and tree_speculative_sampling:
# eager calls 2-3x cheaper (37-67 vs 78-233 us) at kernel times within a few us; compact_kv_cache:
# eager 84 vs 110 us at the Llama-7B cache.
CUDA_EXT_FIRST = frozenset(
    {"build_tree", "verify_tree_greedy", "tree_speculative_sampling", "compact_kv_cache"}
)


def _cuda_index(device: torch.device) -> int | None:
    """The GPU index of a CUDA ``device`` ("cuda": the current one; None where no GPU is usable)."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def select_backend(op: str, device: torch.device, *, prefer_cuda_ext: bool | None = None) -> str:
    """Pick the backend that runs ``op`` on tensors of ``device``.

    ``prefer_cuda_ext``: the op's CUDA extension kernel is faster than its Triton kernel (measured),
    so it is the default on CUDA tensors when built; None (the default): whether ``op`` is in
    :data:`CUDA_EXT_FIRST`.

    The choice depends only on the arguments, the :func:`use_backend` override and the raw values of
    ``EAGLE_KERNELS_BACKEND`` and ``TRITON_INTERPRET`` (the extension and Triton are fixed per
    process), so it is cached under exactly that key: a changed override or variable is a new key.
    A forced backend that cannot run is never cached; it raises on every call.
    """
    if prefer_cuda_ext is None:
        prefer_cuda_ext = op in CUDA_EXT_FIRST
    key = (
        op,
        device.type,
        # GPUs of one machine may differ in architecture (_ext.cuda_device_supported): "cuda" is keyed
        # by the GPU current now (an op's tensors always name theirs)
        _cuda_index(device) if device.type == "cuda" else None,
        prefer_cuda_ext,
        _override.get(),
        _raw_env(_BACKEND_VAR),
        _raw_env(_INTERPRET_VAR),
    )
    backend = _SELECTED.get(key)
    if backend is None:
        backend = _select_backend_uncached(op, device, prefer_cuda_ext)
        if len(_SELECTED) >= _MAX_SELECTED:
            _SELECTED.clear()
        _SELECTED[key] = backend
    return backend


_SELECTED: dict[tuple, str] = {}
_MAX_SELECTED = 256


def _select_backend_uncached(op: str, device: torch.device, prefer_cuda_ext: bool) -> str:
    forced = forced_backend()
    if forced is not None:
        reason = _unavailable_reason(op, forced, device)
        if reason is not None:
            raise RuntimeError(f"eagle_kernels.{op}: backend {forced!r} was forced but {reason}")
        return forced
    if device.type == "cuda":
        index = _cuda_index(device)
        extension = _ext.has_op(op, "cuda") and index is not None and _ext.cuda_device_supported(index)
        if prefer_cuda_ext and extension:
            return "cuda"
        if HAS_TRITON:
            return "triton"
        return "cuda" if extension else "torch"
    if device.type == "cpu" and _ext.has_op(op, "cpu"):
        return "cpp"
    return "torch"


def available_backends(op: str, device: torch.device) -> list[str]:
    """Every backend that could run ``op`` on ``device`` in this process (used by tests/benchmarks)."""
    return [b for b in BACKENDS if _unavailable_reason(op, b, device) is None]


def debug_checks_enabled() -> bool:
    """Value checks that need a device->host copy (e.g. index ranges on CUDA) run only when
    ``EAGLE_KERNELS_DEBUG=1``; on CPU they are always on because they cost no synchronisation."""
    return _raw_env(_DEBUG_VAR) in (b"1", "1")


# A model's weights are nn.Parameter: plain tensors for this purpose (autograd is checked apart).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def eager_fast_path(*tensors: torch.Tensor | None) -> bool:
    """True for a plain eager call: no tracing (torch.compile / export), no tensor subclass (fake,
    functional; an ``nn.Parameter`` counts as plain), no autograd. Public functions then run the op's implementation directly: the
    custom-op wrapper costs ~20-30 us per call on CPU, more than a whole op at decode sizes. Every
    other call goes through the registered ``torch.ops.eagle.*`` op, whose body is the same code."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: ~2x cheaper than all() over a generator
        if t is not None and (type(t) not in _PLAIN_TENSORS or (grad and t.requires_grad)):
            return False
    return True
