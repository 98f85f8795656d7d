"""Type checks of the numbers and token ids the entry points take (sampling settings, seeds, tree sizes,
prompts, stop ids)."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence, Set


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


def token_ids(prompt, name: str, what: str = "a sequence of token ids") -> list[int]:
    """A prompt given as token ids (a list, tuple, 1-D tensor or array of integers) as a list of
    ints; floats, bools and nested lists are refused rather than truncated (``what``: what the
    message says the prompt must be)."""
    if is_array(prompt):
        if prompt.ndim != 1:
            raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    if isinstance(prompt, (str, bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise TypeError(f"{name} must be {what}, got {type(prompt).__name__}")
    ids = []
    for t in prompt:
        try:
            if isinstance(t, bool):
                raise TypeError
            ids.append(operator.index(t))  # ints and numpy / 0-d tensor integers; never a float
        except TypeError:
            raise TypeError(f"{name} holds {t!r} ({type(t).__name__}); token ids must be integers") from None
    return ids


def numpy_batch_as_list(prompts):
    """A 1-D numpy array of objects or strings (a batch of texts or of ragged id lists) as a list of
    its entries; anything else unchanged."""
    if is_array(prompts) and prompts.ndim == 1 and getattr(prompts.dtype, "kind", None) in ("O", "U", "S"):
        return prompts.tolist()
    return prompts


def prompt_id_lists(prompts) -> list[list[int]]:
    """The prompts of the low-level loops (a batch of token-id sequences) as lists of ints, each
    checked by :func:`token_ids`; a single prompt (a flat list of ids) or a string is refused."""
    prompts = numpy_batch_as_list(prompts)
    if is_array(prompts):
        if prompts.ndim != 2:
            raise ValueError(f"prompts must be a batch of token-id rows, got shape {tuple(prompts.shape)}")
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes, bytearray)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) and isinstance(prompts[0], numbers.Integral):
        raise TypeError("prompts must be a list of token-id lists, not a single prompt: pass [ids]")
    return [token_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]


def stop_ids(value, vocab_size: int, source: str = "eos_token_id", fix: str = "") -> list[int]:
    """Stop token ids given as an int, a sequence or set of ints, a tensor or a numpy array (None: none) as a
    list of ints in ``[0, vocab_size)``; a string, a float or a bool raises TypeError naming
    ``source`` (``fix`` follows the message), an id outside the vocabulary ValueError."""
    if value is None:
        return []
    if is_array(value):  # a tensor, a numpy array or a numpy scalar
        ids = value.reshape(-1).tolist()
    elif isinstance(value, (Sequence, Set)) and not isinstance(value, (str, bytes, bytearray)):
        ids = list(value)
    else:
        ids = [value]
    try:  # ints and numpy / 0-d tensor integers as Python ints; never a float or a bool
        if any(isinstance(t, bool) or str(getattr(t, "dtype", "")).endswith("bool") for t in ids):
            raise TypeError  # (a bool tensor or numpy bool passes operator.index)
        ids = [operator.index(t) for t in ids]
    except TypeError:
        raise TypeError(f"{source} must be an int or a list of ints, got {value!r}{fix}") from None
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{source} holds ids outside the vocabulary [0, {vocab_size}): {bad}{fix}")
    return ids


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
