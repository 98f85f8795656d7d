"""Import Triton when it is installed; otherwise provide inert stand-ins.

Kernel modules write ``from eagle_kernels._triton import triton, tl, HAS_TRITON`` so that they stay
importable on platforms without Triton (macOS, aarch64 without a wheel). Launching a kernel then
fails with a clear error, and dispatch never picks the Triton backend in the first place.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

# The oldest Triton whose compiler takes every kernel here: 3.1 and 3.2 lack ``tl.gather``
# (verify_tree_greedy), and 3.1 aborts compiling tree_attention's 64-row, 8-warp tiles for sm_90.
# Ahead-of-time compiles of every launch for sm_80 and sm_90 passed on 3.3-3.9 (2026-11-27).
# pyproject.toml's extras still allow 3.1: torch 2.5 / 2.6 pin 3.1 / 3.2, which this turns off.
MIN_TRITON = (3, 3)
TRITON_UNUSABLE_REASON: str | None = None


def triton_version_reason(version: str) -> str | None:
    """Why Triton ``version`` cannot run this package's kernels, or None when it can."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return f"Triton's version {version!r} could not be read"
    if (int(match[1]), int(match[2])) < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        return f"Triton {version} is older than {need}, the oldest whose compiler takes these kernels"
    return None


try:
    import triton
    import triton.language as tl

    TRITON_UNUSABLE_REASON = triton_version_reason(getattr(triton, "__version__", "?"))
    HAS_TRITON = TRITON_UNUSABLE_REASON is None
    if not HAS_TRITON:
        # The kernels are still defined (decorating works on old versions); dispatch never picks them.
        warnings.warn(
            f"eagle_kernels: {TRITON_UNUSABLE_REASON}; the Triton backend is off (ops run on the CUDA "
            "extension or the PyTorch reference); torch 2.7 and later bring a Triton that runs them",
            stacklevel=2,
        )
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False
    TRITON_UNUSABLE_REASON = "Triton is not installed"

    class _Missing:
        """Stands in for ``triton`` / ``tl``: attribute access works, launching raises."""

        def __getattr__(self, name):
            return _Missing()

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return _Missing()  # used as a decorator: @triton.jit
            if not args and kwargs:
                return _Missing()  # a decorator factory: @triton.jit(do_not_specialize=[...])
            raise RuntimeError("Triton is not installed; install it or use another backend")

        def __getitem__(self, item):
            return self

    triton = _Missing()
    tl = _Missing()


R = TypeVar("R")


# Triton makes a kernel interpreted or compiled when ``@triton.jit`` decorates it, which the kernel
# modules do as they are imported (after this module): a variable set later changes nothing.
_INTERPRETED_KERNELS = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET=1 was
    set when this package was imported (its kernels were defined then) and still is."""
    return _INTERPRETED_KERNELS and os.environ.get("TRITON_INTERPRET", "0") == "1"


def launches_on_input_device(fn: Callable[..., R]) -> Callable[..., R]:
    """Decorate a function that launches Triton kernels on the tensors it gets, the first of which
    is on the kernels' device.

    Triton launches on the *current* CUDA device and its current stream, wherever the tensors live:
    tensors on ``cuda:1`` while device 0 is current would be read by kernels on GPU 0 (an illegal
    address, or with peer access unordered against ``cuda:1``'s stream). The call then runs with the
    first tensor's device made current; a call already on the current device (the usual case) pays
    only the comparison."""

    @functools.wraps(fn)
    def on_input_device(first, *args, **kwargs):
        device = first.device
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device.index):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return on_input_device
