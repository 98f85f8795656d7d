"""oneDNN-packed copies of linear weights for bfloat16/float16 matmuls on CPU.

A bfloat16 ``F.linear`` on CPU goes through oneDNN, which reorders the weight into its blocked
layout on every call (a large share of a matmul for this package's small models). With the weight
reordered once at load time (``torch.ops.mkldnn._reorder_linear_weight``) the same oneDNN kernel
runs without that step, and its result is bit-identical to ``F.linear``. On CPUs with AMX the cost
of such a matmul barely changes from 1 to ~64 rows, which is what makes tree verification nearly
free on CPU as it is on a GPU (measured with ``python bench/bench_runtime.py --forwards --dtype
bfloat16``).

The packed copy is an extra copy of every packed weight (the dense one stays: embeddings, state
dicts, CUDA and autograd use it), so packing is skipped when it would take more than a quarter of
the memory available. ``EAGLE_CPU_PACKED_WEIGHTS=0`` turns it off.

A packed copy is used only while it is valid: looked up by the identity of the dense tensor, and
checked against the tensor's data pointer and version counter, so a weight moved to another device,
replaced or modified in place (an optimizer step) falls back to ``F.linear`` instead of using a
stale copy. Autograd always takes the dense path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

_PACKABLE_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _Entry:
    packed: torch.Tensor  # mkldnn (opaque) layout, the dense weight's shape [N, K] and dtype
    data_ptr: int
    version: int | None  # None for inference tensors, which have no version counter


_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_generation = 0  # bumped by every packing, so cached weight lists know to look again


def tensor_version(t: torch.Tensor) -> int | None:
    """``t._version``, None for inference tensors (which do not track versions)."""
    try:
        return t._version
    except RuntimeError:
        return None


def packing_generation() -> int:
    """How many times weights were packed in this process (cached weight lists compare it)."""
    return _generation


def packing_supported(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """True when weights of ``dtype`` on ``device`` can be packed: a CPU device, bfloat16 (float16)
    with oneDNN support for it on this CPU, the ops present in this torch build, and
    ``EAGLE_CPU_PACKED_WEIGHTS`` not 0."""
    if os.environ.get("EAGLE_CPU_PACKED_WEIGHTS", "1") == "0":
        return False
    if torch.device(device).type != "cpu" or dtype not in _PACKABLE_DTYPES:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    supported = ops._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else ops._is_mkldnn_fp16_supported
    return bool(supported())


def cpu_has_amx_bf16() -> bool:
    """True when the CPU advertises AMX bf16 tiles (Linux ``/proc/cpuinfo``): there a packed bf16
    matmul costs about the same for 1 and 64 rows. False when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def _available_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def pack_linear_weights(weights: Iterable[torch.Tensor | None]) -> int:
    """Pack each 2-D weight ``[N, K]`` (bfloat16/float16, CPU) for :func:`linear`; returns how many
    tensors now have a valid packed copy (entries that are not 2-D tensors are skipped). Tensors sharing storage with one packed earlier (a head's
    detached view of the target's lm_head, say) share its packed copy. Nothing is packed when
    :func:`packing_supported` is false or the copies would take over a quarter of the free memory."""
    todo = [w for w in dict.fromkeys(weights, None) if isinstance(w, torch.Tensor) and w.dim() == 2]
    todo = [w for w in todo if packing_supported(w.dtype, w.device) and packed_weight(w) is w]
    if not todo:
        return 0
    free = _available_memory_bytes()
    if free is not None and sum(w.numel() * w.element_size() for w in todo) > free // 4:
        return 0
    global _generation
    _generation += 1
    existing = [(src, entry) for src, entry in _PACKED.items()]
    count = 0
    for w in todo:
        reuse = next(
            (e for src, e in existing if _same_storage(src, w) and e.version == tensor_version(w)), None
        )
        if reuse is None:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            reuse = _Entry(packed, w.data_ptr(), tensor_version(w))
            existing.append((w, reuse))
        _PACKED[w] = reuse
        count += 1
    return count


def packed_weight(w: torch.Tensor) -> torch.Tensor:
    """The packed copy of ``w`` when one is valid (same data pointer and version), else ``w``."""
    if not _PACKED:
        return w
    entry = _PACKED.get(w)
    if entry is None or entry.data_ptr != w.data_ptr() or entry.version != tensor_version(w):
        return w
    return entry.packed


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when grad mode is on and any of ``tensors`` requires grad (a graph must be recorded)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the packed weight when one is valid and no autograd
    graph is needed (same result, bit for bit)."""
    w = packed_weight(weight)
    if w is weight or x.device.type != "cpu" or x.dtype != w.dtype or needs_autograd(x, weight, bias):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


class Linear(nn.Linear):
    """``nn.Linear`` that multiplies through :func:`linear` (the packed weight when there is one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def pack_module_linears(module: nn.Module, extra: Iterable[torch.Tensor | None] = ()) -> int:
    """Pack the weights of every :class:`nn.Linear` in ``module`` plus ``extra`` tensors (an lm_head
    kept as a plain tensor; None entries are skipped); returns how many have a packed copy. See
    :func:`pack_linear_weights`."""
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    return pack_linear_weights([*weights, *extra])
