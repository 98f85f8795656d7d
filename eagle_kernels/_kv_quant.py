"""Quantized KV caches for the attention ops: fp8 / int8 caches with per-tensor or per-kv-head scales.

Serving stacks halve their KV memory by storing K and V in 8 bits: vLLM's and SGLang's
``kv_cache_dtype="fp8"`` (``float8_e4m3fn``, with ``k_scale`` / ``v_scale``), ``"fp8_e5m2"``
(``float8_e5m2``, usually without scales) and TensorRT-LLM's int8 / fp8 caches. The real key of a
stored one is ``k_stored * k_scale`` (and V likewise); a scale is one value for the whole cache, or
one per kv head.

:func:`eagle_kernels.tree_attention` and :func:`eagle_kernels.paged_tree_attention` take such caches
with ``k_scale=`` / ``v_scale=`` (vLLM allocates its fp8 caches as uint8: view them as
``torch.float8_e4m3fn`` / ``torch.float8_e5m2``; ROCm's ``*fnuz`` formats are not supported). Their
Triton kernel converts each loaded tile to q's dtype (exact: an fp8 or int8 value is a float16 /
bfloat16 value) and folds the scales into the softmax scale (K) and the output (V), which is
``softmax(q (s_k k)^T) (s_v v) = s_v softmax((s_k q) k^T) v`` written out. The C++ kernel converts
each block of keys into q's dtype as it reads it (``csrc/cpu/kv_decode.h``: ``stored * scale`` rounded
once, as :func:`dequantize` does).
"""

from __future__ import annotations

import math
import numbers

import torch

from eagle_kernels import _ext
from eagle_kernels._checks import FLOAT_DTYPES, check_tensor

QUANT_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
KV_DTYPES = FLOAT_DTYPES + QUANT_KV_DTYPES

# How the Triton kernel gets a scale (constexprs K_SCALE / V_SCALE): none, one value read from device
# memory, one per kv head read from device memory, or one value passed as a kernel argument (a scale
# held on the host; for K it is folded into the softmax scale before the launch).
NO_SCALE, SCALE_AT_PTR, SCALE_PER_HEAD, SCALE_VALUE = 0, 1, 2, 3


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_kv_dtypes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """K and V share one dtype: q's, or an 8-bit one of :data:`QUANT_KV_DTYPES` (dequantized with the
    scales). The caches' own dtype checks (:data:`KV_DTYPES`) come first."""
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(
            f"dtypes must match: k_cache={_name(k_cache.dtype)}, v_cache={_name(v_cache.dtype)} "
            "(K and V share one dtype)"
        )
    if k_cache.dtype != q.dtype and k_cache.dtype not in QUANT_KV_DTYPES:
        raise TypeError(
            f"dtypes must match: q={_name(q.dtype)}, k_cache={_name(k_cache.dtype)}, "
            f"v_cache={_name(v_cache.dtype)} (or the caches may be "
            f"{', '.join(_name(d) for d in QUANT_KV_DTYPES)} with k_scale / v_scale)"
        )


def as_scale(name: str, value: object) -> torch.Tensor | None:
    """The public argument as the registered op takes it: None, or a tensor (a Python number becomes a
    float32 0-d CPU tensor, which the op reads on the host: no device copy, no sync). A number must be
    finite and positive."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if torch.compiler.is_compiling() and not isinstance(value, bool):
        # torch.compile may trace a float as a symbol (dynamic floats), whose value Python cannot test
        # here; the op checks the CPU tensor's value when it runs
        return torch.tensor(value, dtype=torch.float32)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be None, a float or a tensor, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return torch.tensor(value, dtype=torch.float32)


def scale_args(k_scale: object, v_scale: object) -> tuple:
    """The public functions' ``k_scale`` / ``v_scale`` as the registered ops take them: ``()`` when both
    are None (the unscaled call passes no extra arguments), else the two as :func:`as_scale` makes
    them. Scales are constants of a calibrated cache: no gradient flows into them, so one that
    requires grad is refused rather than silently left without a gradient."""
    if k_scale is None and v_scale is None:
        return ()
    scales = (as_scale("k_scale", k_scale), as_scale("v_scale", v_scale))
    if torch.is_grad_enabled():
        for name, scale in zip(("k_scale", "v_scale"), scales):
            if scale is not None and scale.requires_grad:
                raise RuntimeError(f"{name} requires grad, but no gradient flows into the scales; detach it")
    return scales


def check_scale(name: str, scale: torch.Tensor | None, Hkv: int, device: torch.device) -> None:
    """Shape, dtype and device of a scale tensor (no value reads): a floating tensor holding one value
    (``[]`` or ``[1]``) or one per kv head (``[Hkv]``), on q's device; a one-value scale may also be
    on the CPU whatever q's device (it is read on the host)."""
    if scale is None:
        return
    check_tensor(name, scale, dtypes=FLOAT_DTYPES)
    per_tensor = scale.dim() <= 1 and scale.numel() == 1
    if not per_tensor and tuple(scale.shape) != (Hkv,):
        raise ValueError(
            f"{name} must hold one value ([] or [1]) or one per kv head ([Hkv] = [{Hkv}]), "
            f"got shape {list(scale.shape)}"
        )
    if scale.device != device and not (per_tensor and scale.device.type == "cpu"):
        raise ValueError(
            f"{name} is on {scale.device} but the other inputs are on {device} (a one-value scale may "
            "also be a CPU tensor)"
        )


def check_scale_values(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, debug: bool) -> None:
    """Every value finite and > 0 (a zero, negative or NaN scale is a broken checkpoint, and the kernels'
    running maximum assumes a positive softmax scale), for the scales whose values can be read without
    a device sync (CPU tensors), and for all of them in debug mode."""
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None or not (scale.device.type == "cpu" or debug):
            continue
        values = scale.tolist()  # (a few values: cheaper than tensor ops on CPU)
        values = values if isinstance(values, list) else [values]
        if not all(math.isfinite(x) and x > 0 for x in values):
            raise ValueError(f"{name} must be finite and > 0, got {values}")


def broadcast_scale(
    scale: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """A scale as ``[1, Hkv or 1, 1, 1]`` in ``dtype`` on ``device``, to multiply a ``[B, Hkv, S, D]``
    cache by."""
    if scale is None:
        return None
    return scale.to(device=device, dtype=dtype).reshape(1, -1, 1, 1)


def dequantize(
    cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """``cache * scale`` in ``dtype`` (a new tensor): ``cache`` ``[B, Hkv, S, D]``, any dtype; the
    product is taken in float32 (float64 for a float64 ``dtype``) and rounded once. With ``lengths``
    (int ``[B]``, CPU) only rows ``s < lengths[b]`` are converted and the result is
    ``[B, Hkv, max(lengths), D]``, zero past each length.

    An 8-bit CPU cache goes through the extension's ``dequantize_kv``, which gives the same values
    (PyTorch's own float8_e4m3fn conversion costs more than the attention it feeds:
    ``bench/bench_tree_attention_quantized_kv.py``)."""
    kind = _KINDS.get(cache.dtype)
    if kind is not None and cache.device.type == "cpu" and _ext.has_op("dequantize_kv"):
        if lengths is None:
            lengths = torch.full((cache.shape[0],), cache.shape[2], dtype=torch.int64)
        scales = None if scale is None else scale.to(device="cpu", dtype=torch.float64).reshape(-1)
        return _ext.op("dequantize_kv")(cache.view(torch.uint8), kind, scales, dtype, lengths)
    if lengths is not None:
        cache = cache[:, :, : int(lengths.max()) if lengths.numel() else 0]
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    if scale is None:
        out = cache.to(dtype)
    else:
        out = (cache.to(wide) * broadcast_scale(scale, wide, cache.device)).to(dtype)
    if lengths is not None:  # (zero past each length, as the extension's op)
        past = torch.arange(out.shape[2], device=out.device)[None, :] >= lengths.to(out.device)[:, None]
        out = out.masked_fill(past[:, None, :, None], 0)
    return out


def cpu_attention(q, k_cache, v_cache, block_table, cache_seqlens, tree_mask, sm_scale, k_scale, v_scale):
    """The C++ attention over an 8-bit CPU cache, converting each block of keys as it reads it
    (``eagle_C::quantized_tree_attention``: contiguous caches with ``block_table`` None, else paged);
    None where the extension lacks it or the cache is not 8-bit (the caller then dequantizes first).
    ``cache_seqlens`` int32; values checked by the caller."""
    kind = _KINDS.get(k_cache.dtype)
    if kind is None or not _ext.has_op("quantized_tree_attention"):
        return None
    # The kernel converts stored * scale to q's dtype: past 65504 that is inf in float16, where the Triton
    # kernel (which folds the scales) and the reference stay finite; so float32 there.
    wide = q.dtype == torch.float16 and _may_overflow_float16(kind, k_scale, v_scale)
    k_bytes, v_bytes = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    out = _ext.op("quantized_tree_attention")(
        q.float() if wide else q,
        k_bytes,
        v_bytes,
        block_table,
        cache_seqlens,
        tree_mask,
        sm_scale,
        kind,
        k_scale,
        v_scale,
    )
    return out.to(q.dtype) if wide else out


# The largest magnitude of each 8-bit format (by _KINDS code), finite values only.
_FORMAT_MAX = {0: 128.0, 1: 448.0, 2: 57344.0}


def _may_overflow_float16(kind: int, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> bool:
    """Whether some stored value times its (CPU) scale can pass float16's largest finite value."""
    top = max(1.0 if s is None else max(s.reshape(-1).tolist()) for s in (k_scale, v_scale))
    return _FORMAT_MAX[kind] * top > torch.finfo(torch.float16).max


# The extension's codes of the 8-bit dtypes (csrc/cpu/kv_decode.h).
_KINDS = {torch.int8: 0, torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}
