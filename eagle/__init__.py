"""eagle: lossless EAGLE speculative decoding for Hugging Face Llama-family checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"  # eagle_kernels.__version__ (written here too: importing it imports torch)

# The public names load on first use (PEP 562): `import eagle` and the CLI's `eagle --help` do not
# pay for importing torch and transformers (about 2 s) until a name that needs them is used.
_LAZY = {
    "EagleModel": "eagle.api",
    "GenerateResult": "eagle.api",
    "load": "eagle.api",
    "SamplingParams": "eagle.speculate",
    "TreeConfig": "eagle.tree",
}

__all__ = ["EagleModel", "GenerateResult", "SamplingParams", "TreeConfig", "load", "__version__"]

if TYPE_CHECKING:
    from eagle.api import EagleModel, GenerateResult, load
    from eagle.speculate import SamplingParams
    from eagle.tree import TreeConfig


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eagle' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
