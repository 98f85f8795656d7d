"""Packed copies of linear weights for float32/bfloat16/float16 matmuls on CPU.

Three layouts, chosen per weight when it is packed:

* **float32 panels** (float32 on CPUs with AVX-512F, ``N % 16 == 0``): the weight is stored as
  ``[N/16, K, 16]``, so that ``W[:, k]`` for 16 output features is one vector, and multiplied by this
  package's kernel ``eagle_C::panel_linear_f32`` (``csrc/cpu/panel_linear.cpp``): register blocks of
  up to 12 rows with no horizontal sums, each weight read once per 12 rows. On the 2-core
  development machine, the linears of the tiny-code target (38 MB, streamed from L3) took the same
  time as MKL's for 1-2 rows and about half for 8-12 (``python bench/bench_runtime.py
  --linears-f32``), which is what a verified draft tree needs. Every output is one FMA chain over k
  in order, so a row's result does not depend on the rows beside it.

* **AMX tiles** (bfloat16 on CPUs with AMX, ``N % 16 == 0`` and ``K % 32 == 0``): the weight is
  stored in the pair-interleaved tile layout ``[N/16, K/32, 16, 32]`` that ``TDPBF16PS`` reads, and
  multiplied by this package's kernel ``eagle_C::amx_linear_bf16`` (``csrc/cpu/amx_linear.cpp``).
  A call costs a few microseconds plus the arithmetic, where a oneDNN call costs ~20 us whatever
  the size (``python bench/bench_runtime.py --linears``). Every output row is computed
  independently of the others (float32 accumulation over K in a fixed order), so a row verified in a
  block of 60 tree tokens gets exactly the logits it gets decoded alone.
* **bfloat16 panels** (bfloat16 on CPUs with AVX512-BF16 but no AMX, e.g. AMD Zen 4, ``N % 16 == 0``
  and ``K`` even): the weight is stored as ``[N/16, K/2, 32]``, ``W[:, k:k+2]`` of 16 output features
  in one vector (the operand layout of ``VDPBF16PS``), and multiplied by
  ``eagle_C::panel_linear_bf16`` (``csrc/cpu/panel_linear.cpp``): the float32 panels' register blocks
  at half the bytes per weight, a float32 chain over the k pairs in order per output, rounded once to
  bfloat16, so a row's result does not depend on the rows beside it either.
* **oneDNN** (otherwise, when oneDNN supports the dtype): ``torch.ops.mkldnn._reorder_linear_weight``
  once at load time instead of oneDNN's reorder inside every bf16 ``F.linear``; the result is
  bit-identical to ``F.linear``.

On CPUs with AMX the cost of either barely changes from 1 to ~64 rows, which is what makes tree
verification nearly free on CPU as it is on a GPU (measured with ``python bench/bench_runtime.py
--forwards --dtype bfloat16``).

The packed copy is an extra copy of every packed weight (the dense one stays: embeddings, state
dicts, CUDA and autograd use it), so packing is skipped, with a warning, when the copies would take
more than half of the memory available (MemAvailable, capped by a cgroup's limit); until session 31
a quarter of the free pages, which left a 1B-parameter float32 model unpacked on a 24 GiB machine,
silently. ``EAGLE_CPU_PACKED_WEIGHTS=0`` turns packing off; ``EAGLE_CPU_AMX_LINEAR=0``
keeps the oneDNN layout even where AMX tiles are available (``EAGLE_CPU_BF16_PANEL_LINEAR=0``: where
bfloat16 panels are); ``EAGLE_CPU_PANEL_LINEAR=0`` leaves float32
weights unpacked (their linears then take ``eagle_C::skinny_linear_f32`` for up to 16 rows, else MKL).

A packed copy is used only while it is valid: looked up by the identity of the dense tensor, and
checked against the tensor's data pointer and version counter. A weight modified in place (a
``load_state_dict`` or an optimizer step, even one that writes back the same values) or given new
storage (``Module.to``) is packed again at its next use outside autograd (:func:`packed_weight`):
never used stale, and not left on the dense path either, which would lose the packed kernels' speed
and the row independence that makes greedy EAGLE output equal plain decoding's bit for bit (a dense
float32 weight goes to MKL beyond 16 rows). A weight moved off the CPU just drops its copy. Autograd
always takes the dense path (and repacks nothing: training steps would repack at every forward).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from eagle_kernels import _ext

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PANEL_WIDTH = 16  # output features per float32 panel (one AVX-512 vector)


@dataclass(frozen=True)
class _Entry:
    # panels [N/16, K, 16] fp32, AMX tiles [N/16, K/32, 16, 32] bf16, bf16 panels [N/16, K/2, 32], or mkldnn [N, K]
    packed: torch.Tensor
    data_ptr: int
    version: int | None  # None for inference tensors, which have no version counter


_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_PACKING = threading.RLock()  # held while _PACKED changes (threads may pack and repack at once)
_generation = 0  # bumped by every packing, so cached weight lists know to look again


def tensor_version(t: torch.Tensor) -> int | None:
    """``t._version``, None for inference tensors (which do not track versions)."""
    try:
        return t._version
    except RuntimeError:
        return None


def invalidate_cpu_caches() -> None:
    """Bump :func:`packing_generation`: every cached weight list or cached C++ call looks again (the
    CPU switches, e.g. ``set_cpu_fast_path``, call it when they change)."""
    global _generation
    _generation += 1


def packing_generation() -> int:
    """How many times weights were packed in this process (cached weight lists compare it)."""
    return _generation


def amx_linear_available() -> bool:
    """True when bfloat16 weights are packed into AMX tiles for ``eagle_C::amx_linear_bf16``: the
    extension has the op, the CPU has AMX-BF16 and the OS grants the tile state, and
    ``EAGLE_CPU_AMX_LINEAR`` is not 0."""
    if os.environ.get("EAGLE_CPU_AMX_LINEAR", "1") == "0" or not _ext.has_op("amx_linear_bf16"):
        return False
    return bool(torch.ops.eagle_C.amx_bf16_available())


def bf16_panel_linear_available() -> bool:
    """True when bfloat16 weights are packed into bf16 panels for ``eagle_C::panel_linear_bf16``
    where AMX tiles are not (:func:`amx_linear_available`): the extension has the op, the CPU has
    AVX512-BF16, and ``EAGLE_CPU_BF16_PANEL_LINEAR`` is not 0."""
    if os.environ.get("EAGLE_CPU_BF16_PANEL_LINEAR", "1") == "0":
        return False
    return _bf16_panel_op_runs()


@functools.cache
def _bf16_panel_op_runs() -> bool:
    return _ext.has_op("panel_linear_bf16") and bool(torch.ops.eagle_C.panel_linear_bf16_available())


def panel_linear_available() -> bool:
    """True when float32 weights are packed into panels for ``eagle_C::panel_linear_f32``: the
    extension has the op, the CPU has AVX-512F, and ``EAGLE_CPU_PANEL_LINEAR`` is not 0."""
    if os.environ.get("EAGLE_CPU_PANEL_LINEAR", "1") == "0":
        return False
    return _panel_op_runs()


@functools.cache
def _panel_op_runs() -> bool:
    return _ext.has_op("panel_linear_f32") and bool(torch.ops.eagle_C.panel_linear_available())


def packing_supported(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """True when weights of ``dtype`` on ``device`` can be packed: a CPU device, float32 with the
    panel kernel (:func:`panel_linear_available`), bfloat16 with AMX tiles
    (:func:`amx_linear_available`) or bfloat16/float16 with oneDNN support for it on this CPU and the
    ops present in this torch build, and ``EAGLE_CPU_PACKED_WEIGHTS`` not 0."""
    if os.environ.get("EAGLE_CPU_PACKED_WEIGHTS", "1") == "0":
        return False
    if torch.device(device).type != "cpu" or dtype not in _PACKABLE_DTYPES:
        return False
    if dtype == torch.float32:
        return panel_linear_available()
    if dtype == torch.bfloat16 and (amx_linear_available() or bf16_panel_linear_available()):
        return True
    return _onednn_supports(dtype)


def _onednn_supports(dtype: torch.dtype) -> bool:
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


def _available_memory_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Memory this process can still take: the kernel's MemAvailable (free pages plus the page cache it
    can reclaim; free pages alone, where it is missing, read half of a warm machine as used), capped
    by a cgroup's limit minus its usage (a container's limit, which MemAvailable does not see)."""
    available = None
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            with open(os.path.join(cgroup, limit_file)) as f:
                limit = f.read().strip()
            with open(os.path.join(cgroup, usage_file)) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # ("max", or v1's huge number: no limit)
            available = min(available, max(int(limit) - usage, 0))
        break
    return available


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def pack_linear_weights(weights: Iterable[torch.Tensor | None]) -> int:
    """Pack each 2-D weight ``[N, K]`` (float32/bfloat16/float16, CPU) for :func:`linear`: float32 into
    panels, bfloat16 into AMX tiles or else bf16 panels where possible, else oneDNN's layout; returns how many tensors now
    have a valid packed copy (entries that are not 2-D tensors are skipped). Tensors sharing storage with one packed earlier (a head's
    detached view of the target's lm_head, say) share its packed copy. Nothing is packed when
    :func:`packing_supported` is false, or (with a warning) when the copies would take over half of the
    available memory."""
    todo = [w for w in dict.fromkeys(weights, None) if isinstance(w, torch.Tensor) and w.dim() == 2]
    with _PACKING:
        todo = [w for w in todo if packing_supported(w.dtype, w.device) and _valid_copy(w) is None]
        if not todo:
            return 0
        free = _available_memory_bytes()
        needed = sum(w.numel() * w.element_size() for w in todo)
        if free is not None and needed > free // 2:
            warnings.warn(
                f"not packing {len(todo)} linear weights ({needed / 2**30:.2f} GiB) for this package's CPU "
                f"kernels: {free / 2**30:.2f} GiB of memory is available, and the copies may take at most "
                f"half of it. These linears take the dense path: slower for a draft tree's verify, and a "
                f"verified row may then differ in its last bits from plain decoding (a near-tie can "
                f"flip a greedy token). EAGLE_CPU_PACKED_WEIGHTS=0 skips packing without this warning",
                stacklevel=2,
            )
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
                    packed = _pack(w.detach())
                if packed is None:
                    continue
                reuse = _Entry(packed, w.data_ptr(), tensor_version(w))
                existing.append((w, reuse))
            _PACKED[w] = reuse
            count += 1
        return count


def amx_tiles(w: torch.Tensor) -> torch.Tensor:
    """``w [N, K]`` in the AMX tile layout ``[N/16, K/32, 16, 32]``: tile ``(nb, kb)`` holds
    ``w[nb*16 + c, kb*32 + 2r + j]`` at ``[r, 2c + j]`` (K in pairs, the layout ``TDPBF16PS`` reads)."""
    N, K = w.shape
    return (
        w.reshape(N // 16, 16, K // 32, 16, 2)
        .permute(0, 2, 3, 1, 4)
        .contiguous()
        .view(N // 16, K // 32, 16, 32)
    )


def panels(w: torch.Tensor) -> torch.Tensor:
    """``w [N, K]`` in the float32 panel layout ``[N/16, K, 16]``: ``panels[p, k, c] = w[16p + c, k]``."""
    N, K = w.shape
    return w.reshape(N // _PANEL_WIDTH, _PANEL_WIDTH, K).transpose(1, 2).contiguous()


def bf16_panels(w: torch.Tensor) -> torch.Tensor:
    """``w [N, K]`` (K even) in the bfloat16 panel layout ``[N/16, K/2, 32]``:
    ``bf16_panels[p, i, 2c + j] = w[16p + c, 2i + j]`` (K in pairs, the layout ``VDPBF16PS`` reads)."""
    N, K = w.shape
    return (
        w.reshape(N // _PANEL_WIDTH, _PANEL_WIDTH, K // 2, 2)
        .permute(0, 2, 1, 3)
        .contiguous()
        .view(N // _PANEL_WIDTH, K // 2, 2 * _PANEL_WIDTH)
    )


def is_panels(packed: torch.Tensor) -> bool:
    """True for a packed copy made by :func:`panels`."""
    return not packed.is_mkldnn and packed.dim() == 3 and packed.dtype == torch.float32


def is_bf16_panels(packed: torch.Tensor) -> bool:
    """True for a packed copy made by :func:`bf16_panels`."""
    return not packed.is_mkldnn and packed.dim() == 3 and packed.dtype == torch.bfloat16


def is_amx_tiled(packed: torch.Tensor) -> bool:
    """True for a packed copy made by :func:`amx_tiles` (a oneDNN copy is an mkldnn tensor)."""
    return not packed.is_mkldnn and packed.dim() == 4


def _pack(w: torch.Tensor) -> torch.Tensor | None:
    N, K = w.shape
    if w.dtype == torch.float32:  # (packing_supported checked the panel kernel)
        # no packed form for N % 16 != 0: such a weight keeps the skinny kernel / MKL
        return panels(w) if N % _PANEL_WIDTH == 0 and K > 0 else None
    if w.dtype == torch.bfloat16 and N % 16 == 0 and K % 32 == 0 and amx_linear_available():
        return amx_tiles(w)
    if (
        w.dtype == torch.bfloat16
        and N % _PANEL_WIDTH == 0
        and K % 2 == 0
        and K > 0
        and not amx_linear_available()
        and bf16_panel_linear_available()
    ):
        return bf16_panels(w)
    if _onednn_supports(w.dtype):
        return torch.ops.mkldnn._reorder_linear_weight(w, None)
    return None  # no packed form for this weight (AMX only, and a shape the tiles do not fit)


def _is_current(w: torch.Tensor, entry: _Entry) -> bool:
    return entry.data_ptr == w.data_ptr() and entry.version == tensor_version(w)


def _valid_copy(w: torch.Tensor) -> torch.Tensor | None:
    entry = _PACKED.get(w)
    return entry.packed if entry is not None and _is_current(w, entry) else None


def packed_weight(w: torch.Tensor) -> torch.Tensor:
    """The packed copy of ``w``, else ``w`` (never packed, or no packed form). A copy made before ``w``
    changed (same tensor, another data pointer or version) is made again first (see the module
    docstring); callers on the autograd path must not call this (it would repack every step)."""
    if not _PACKED:
        return w
    entry = _PACKED.get(w)
    if entry is None:
        return w
    if _is_current(w, entry):
        return entry.packed
    return _repack_changed(w)


def _repack_changed(w: torch.Tensor) -> torch.Tensor:
    """Drop ``w``'s out-of-date copy, and those of other tensors on its storage (a head's detached view
    of its target's lm_head: the same version counter, so out of date too), then pack them again
    together (one copy, shared); ``w`` itself when it no longer packs (moved off the CPU, memory)."""
    with _PACKING:
        changed = [
            src
            for src, entry in list(_PACKED.items())
            if (src is w or _same_storage(src, w)) and not _is_current(src, entry)
        ]
        for src in changed:
            del _PACKED[src]
        invalidate_cpu_caches()  # (also when nothing packs again: cached lists held the old copy)
        pack_linear_weights(changed)
        copy = _valid_copy(w)
    return w if copy is None else copy


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when grad mode is on and any of ``tensors`` requires grad (a graph must be recorded)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the packed weight when one is valid and no autograd
    graph is needed: oneDNN's copy gives the same result bit for bit, AMX tiles and bfloat16 panels
    the float32 sum rounded once to bfloat16, float32 panels one FMA chain per output (see the module
    docstring)."""
    if needs_autograd(x, weight, bias) or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    w = packed_weight(weight)
    if w is weight and _skinny_applies(x, weight, bias):
        return torch.ops.eagle_C.skinny_linear_f32(x, weight, bias)
    if w is weight or x.dtype != w.dtype:
        return F.linear(x, weight, bias)
    if is_panels(w):
        if bias is not None and bias.dtype != x.dtype:
            return F.linear(x, weight, bias)
        return torch.ops.eagle_C.panel_linear_f32(x, w, bias)
    if is_amx_tiled(w):
        if bias is not None and bias.dtype != x.dtype:
            return F.linear(x, weight, bias)
        return torch.ops.eagle_C.amx_linear_bf16(x, w, bias)
    if is_bf16_panels(w):
        if bias is not None and bias.dtype != x.dtype:
            return F.linear(x, weight, bias)
        return torch.ops.eagle_C.panel_linear_bf16(x, w, bias)
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def skinny_max_rows() -> int:
    """Most rows the float32 kernel ``eagle_C::skinny_linear_f32`` (csrc/cpu/skinny_linear.cpp) takes
    on this CPU; 0 when it is off (no extension or no AVX-512, or ``EAGLE_CPU_SKINNY_LINEAR=0``, read
    at every call as the C++ side does)."""
    if os.environ.get("EAGLE_CPU_SKINNY_LINEAR", "1") == "0":
        return 0
    return _skinny_rows_supported()


@functools.cache
def _skinny_rows_supported() -> int:
    if not _ext.has_op("skinny_linear_f32"):
        return 0
    return int(torch.ops.eagle_C.skinny_linear_max_rows())


def _skinny_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The C++ rule of skinny::applies (llama_layers calls the kernel under the same condition, so the
    Python modules and the C++ layers stay bit-identical)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous() or x.dim() < 1:
        return False
    K = weight.shape[1]
    if K == 0 or x.shape[-1] != K or torch.compiler.is_compiling():
        return False
    if bias is not None and (
        bias.dtype != torch.float32 or bias.device.type != "cpu" or bias.numel() != weight.shape[0]
    ):
        return False
    return 1 <= x.numel() // K <= skinny_max_rows()


def repack_module_linears(module: nn.Module, extra: Iterable[torch.Tensor | None] = ()) -> int:
    """Drop the packed copies of ``module``'s linear weights and ``extra`` tensors, then pack them again
    under the current settings (the ``EAGLE_CPU_*`` switches above, read now): how to change a loaded
    model's layout at run time, e.g. to compare two layouts in one process. Returns
    :func:`pack_module_linears`' count."""
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    with _PACKING:
        for w in [*weights, *extra]:
            if isinstance(w, torch.Tensor):
                _PACKED.pop(w, None)
        invalidate_cpu_caches()  # cached weight lists look again even when nothing is packed now
        return pack_module_linears(module, extra)


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
