"""Import Triton when it is installed; otherwise provide inert stand-ins.

Kernel modules write ``from eagle_kernels._triton import triton, tl, HAS_TRITON`` so that they stay
importable on platforms without Triton (macOS, aarch64 without a wheel). Launching a kernel then
fails with a clear error, and dispatch never picks the Triton backend in the first place.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

    class _Missing:
        """Stands in for ``triton`` / ``tl``: attribute access works, launching raises."""

        def __getattr__(self, name):
            return _Missing()

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return _Missing()  # used as a decorator: @triton.jit
            raise RuntimeError("Triton is not installed; install it or use another backend")

        def __getitem__(self, item):
            return self

    triton = _Missing()
    tl = _Missing()


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
