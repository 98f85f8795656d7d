"""Argument validation shared by the ops: each failure names the argument and what was expected."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Raise TypeError/ValueError unless ``t`` is a tensor of the given rank, dtype, device and shape
    (``None`` entries in ``shape`` match any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if shape is not None:
        if len(shape) != t.dim() or any(e is not None and e != s for e, s in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    return t


def check_same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {n: t.dtype for n, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{n}={str(d).replace('torch.', '')}" for n, d in dtypes.items())
        raise TypeError(f"dtypes must match: {desc}")


def byte_ranges_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the bytes ``a`` and ``b`` can reach overlap (two halves of one workspace do not)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() or a.numel() == 0 or b.numel() == 0:
        return False

    def byte_range(t: torch.Tensor) -> tuple[int, int]:
        reach = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (reach + 1) * t.element_size()

    (a0, a1), (b0, b1) = byte_range(a), byte_range(b)
    return a0 < b1 and b0 < a1


def check_out_buffer(out: torch.Tensor, inputs: dict[str, torch.Tensor | None]) -> None:
    """An ``out=`` buffer (shape / dtype / device checked by the caller) next to the op's ``inputs``:
    refused when one of them requires grad (as torch's own out= functions: the result would silently
    carry no gradient) or shares memory with it."""
    if torch.is_grad_enabled():
        needing = [name for name, t in inputs.items() if t is not None and t.requires_grad]
        if needing:
            raise RuntimeError(
                f"out= does not support automatic differentiation, but {', '.join(needing)} requires grad; "
                "call without out= (or under torch.no_grad())"
            )
    if not torch.compiler.is_compiling():  # (Dynamo cannot trace storage pointers; opcheck covers aliasing)
        for name, t in inputs.items():
            if t is not None and byte_ranges_overlap(t, out):
                raise ValueError(f"out must not share memory with {name}")


_PLAIN_SCALARS = (int, float, bool, str, type(None))


def call_signature(*args: object) -> tuple | None:
    """Everything shape/dtype/device checks of a call can look at: per tensor its shape, dtype,
    device and strides, per scalar its type and value. None when an argument is neither a plain
    ``torch.Tensor`` (or ``nn.Parameter``) nor a plain scalar (a subclass such as FakeTensor, a list, ...): such calls are
    never cached, so they always get the full checks and their precise errors."""
    sig = []
    for a in args:
        cls = type(a)
        if cls is torch.Tensor or cls is torch.nn.Parameter:  # (a model's weights are Parameters)
            sig.append((a.shape, a.dtype, a.device, a.stride()))
        elif cls in _PLAIN_SCALARS:
            sig.append((cls, a))
        else:
            return None
    return tuple(sig)


class SignatureCache:
    """Remembers the call signatures (:func:`call_signature`) whose argument checks passed.

    Checks that look only at the signature (never at tensor values) give the same verdict for the
    same signature, so a call whose signature already passed can skip them; a call that fails is
    never remembered, so bad input raises the same error every time. Bounded: cleared when full.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self._passed: set[tuple] = set()
        self._maxsize = maxsize

    def run(self, check: Callable[..., None], *args: object) -> None:
        """``check(*args)`` unless ``args``' signature already passed it. While torch.compile traces
        (Dynamo hands the public functions plain tensors with symbolic sizes) the checks always run and
        nothing is looked up: hashing a signature would read every size and specialise the graph on it,
        so a batch size marked dynamic (``torch._dynamo.mark_dynamic``) could not stay dynamic."""
        if torch.compiler.is_compiling():
            check(*args)
            return
        sig = call_signature(*args)
        if sig is not None and sig in self._passed:
            return
        check(*args)
        if sig is not None:
            if len(self._passed) >= self._maxsize:
                self._passed.clear()
            self._passed.add(sig)

    def clear(self) -> None:
        self._passed.clear()

    def __len__(self) -> int:
        return len(self._passed)


def fits_int32(t: torch.Tensor) -> bool:
    """Whether every value of an integer tensor survives narrowing to int32 (reads values: on CUDA a
    host sync)."""
    if t.numel() == 0 or t.dtype == torch.int32:
        return True
    lo, hi = (int(x) for x in torch.aminmax(t))
    return -(2**31) <= lo and hi < 2**31


def python_value_checks_due(
    backend: str, device: torch.device, cache_seqlens: torch.Tensor, debug: bool
) -> bool:
    """Whether an op's Python value checks run: on CPU (on CUDA only in debug mode, ``debug``), and
    not before the C++ kernel, which checks int32 lengths itself, unless int64 lengths (SGLang's
    ``seq_lens``) would change when narrowed to its int32."""
    if device.type != "cpu" and not debug:
        return False
    return backend != "cpp" or not fits_int32(cache_seqlens)


def check_block_ids(block_table: torch.Tensor, pages: torch.Tensor, num_blocks: int, reads: str) -> None:
    """Raise unless the first ``pages[b]`` entries of every row of ``block_table`` are blocks of a pool
    of ``num_blocks`` (int64 CPU ``pages``; only the columns some row reads are looked at: a table may
    be as wide as the longest context). ``reads``: what sequence b does with them, for the message (" reads", "'s tree covers")."""
    if pages.numel() == 0:
        return
    read = int(pages.max())
    ids = block_table[:, :read].to(torch.int64).cpu()
    bad = (torch.arange(read)[None, :] < pages[:, None]) & ((ids < 0) | (ids >= num_blocks))
    if bool(bad.any()):
        b, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"block_table[{b}, {col}] = {int(ids[b, col])} is not a block of the cache (0 .. {num_blocks - 1}); "
            f"sequence {b}{reads} its first {int(pages[b])} entries"
        )
