"""Type checks of the numbers the public entry points take (sampling settings, seeds, tree sizes)."""

from __future__ import annotations

import numbers


def as_number(name: str, value, *, integral: bool, hint: str = "") -> int | float:
    """``value`` as a Python int (``integral``) or float: numpy scalars are numbers; a bool, a string,
    None or a tensor raises TypeError naming ``name`` (``hint`` follows what it must be)."""
    kind = numbers.Integral if integral else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integral else "a real number"
        raise TypeError(f"{name} must be {what}{hint}, got {type(value).__name__} {value!r}")
    return int(value) if integral else float(value)


def is_array(x) -> bool:
    """A torch tensor or a numpy array / scalar (numpy is not imported for the test)."""
    import torch

    return isinstance(x, torch.Tensor) or type(x).__module__ == "numpy"


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (a thread count, a batch size)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def checked_device(name: str) -> str:
    """An argparse ``type``: a device kind this package runs on ('cpu', 'cuda', 'cuda:N'), checked before
    any model loads (a 'meta' or 'mps' device failed deep inside training with NotImplementedError);
    whether a CUDA device is present is left to the command, which names that."""
    import argparse

    import torch

    try:
        kind = torch.device(name).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return name
