"""Attention of ``T`` new tokens over a committed KV prefix and over themselves (tree or causal mask).

One op serves prefill chunks, single-token decode and the verification of an EAGLE draft tree. The
queries of the ``T`` new tokens of sequence ``b`` see every committed position
``0 .. cache_seqlens[b] - 1`` of the in-place cache, and, among the new tokens (whose K/V the model
has already written at ``cache_seqlens[b] + j``), token ``j`` when the mask allows it: causal
(``j <= i``) without a mask, else the bool or bit-packed ``tree_mask``.

Mask formats (detected by dtype), for new-token rows ``i`` and columns ``j`` of sequence ``b``:

* bool ``[B, T, T]``: ``tree_mask[b, i, j]``;
* uint8 ``[B, T, ceil(T/8)]``: bit ``j % 8`` of byte ``j // 8`` of row ``(b, i)`` (SGLang's
  ``QLEN_ONLY_BITPACKING``, little-endian). SGLang stops at ``T <= 32``; here any ``T`` works;
* int32 ``[B, T, ceil(T/32)]``: bit ``j % 32`` of word ``j // 32`` (TensorRT-LLM's packed rows).

Bits at ``j >= T`` in the last byte/word are ignored. :func:`pack_tree_mask` and
:func:`unpack_tree_mask` convert between them.

Backends: Triton on CUDA tensors; on CPU the C++ kernel (``csrc/cpu/tree_attention.cpp``) is the
default because it measured faster than this module's vectorised torch reference on every
decode-loop shape of ``bench/bench_tree_attention.py`` (2-9x) and at least on par with PyTorch's
SDPA given a prebuilt mask; the reference is the fallback when the extension is not built.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from eagle_kernels import _ext
from eagle_kernels._backend import debug_checks_enabled, eager_fast_path, select_backend
from eagle_kernels._checks import FLOAT_DTYPES, check_same_dtype, check_tensor
from eagle_kernels._triton import tl, triton

OP = "tree_attention"
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
PACKED_FORMATS = {"u8": (torch.uint8, 8), "i32": (torch.int32, 32)}

# Mask kinds as the kernels see them.
CAUSAL, BOOL_MASK, U8_BITS, I32_BITS = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------------
# Mask formats
# --------------------------------------------------------------------------------------------------
def pack_tree_mask(mask: torch.Tensor, fmt: str = "u8") -> torch.Tensor:
    """Bit-pack a bool tree mask ``[B, T, T]`` row by row, little-endian.

    Parameters
    ----------
    mask : Tensor ``[B, T, T]``, bool
        ``mask[b, i, j]`` is true when new token ``i`` of sequence ``b`` sees new token ``j``.
    fmt : ``"u8"`` or ``"i32"``
        ``"u8"``: uint8 ``[B, T, ceil(T/8)]``, bit ``j % 8`` of byte ``j // 8`` (SGLang).
        ``"i32"``: int32 ``[B, T, ceil(T/32)]``, bit ``j % 32`` of word ``j // 32`` (TensorRT-LLM).

    Returns
    -------
    Tensor of the chosen format; unused high bits of the last byte/word are zero.
    """
    check_tensor("mask", mask, ndim=3, dtypes=(torch.bool,))
    if fmt not in PACKED_FORMATS:
        raise ValueError(f"fmt must be one of {sorted(PACKED_FORMATS)}, got {fmt!r}")
    dtype, bits = PACKED_FORMATS[fmt]
    B, T, T2 = mask.shape
    if T != T2:
        raise ValueError(f"mask must be [B, T, T], got {list(mask.shape)}")
    words = -(-T // bits)
    padded = torch.zeros(B, T, words * bits, dtype=torch.int64, device=mask.device)
    padded[..., :T] = mask
    weights = torch.pow(2, torch.arange(bits, device=mask.device, dtype=torch.int64))
    packed = (padded.view(B, T, words, bits) * weights).sum(-1)
    if dtype == torch.int32:  # bit 31 set means a negative int32: wrap from [0, 2**32)
        packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(dtype)


def unpack_tree_mask(tree_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Bool ``[B, T, T]`` view of any accepted mask format (a bool mask is returned as it is)."""
    if tree_mask.dtype == torch.bool:
        return tree_mask
    bits = 8 if tree_mask.dtype == torch.uint8 else 32
    j = torch.arange(T, device=tree_mask.device)
    words = tree_mask[..., j // bits].to(torch.int64)  # int32 words sign-extend; bit j%32 is kept
    return ((words >> (j % bits)) & 1).bool()


def _mask_kind(tree_mask: torch.Tensor | None) -> int:
    if tree_mask is None:
        return CAUSAL
    return {torch.bool: BOOL_MASK, torch.uint8: U8_BITS, torch.int32: I32_BITS}[tree_mask.dtype]


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def _visible_keys(
    cache_seqlens: torch.Tensor, tree_mask: torch.Tensor | None, T: int, L: int
) -> torch.Tensor:
    """Bool ``[B, T, L]``: query ``i`` of sequence ``b`` sees key position ``p``."""
    B, device = cache_seqlens.shape[0], cache_seqlens.device
    rel = torch.arange(L, device=device)[None, None, :] - cache_seqlens.to(torch.int64)[:, None, None]
    prefix = rel < 0
    is_new = (rel >= 0) & (rel < T)
    if tree_mask is None:
        new_visible = rel <= torch.arange(T, device=device)[None, :, None]
    else:
        new = unpack_tree_mask(tree_mask, T)
        new_visible = torch.gather(new, 2, rel.clamp(0, max(T - 1, 0)).expand(B, T, L))
    return prefix | (is_new & new_visible)


def tree_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """PyTorch definition of the op (see :func:`tree_attention`): masked softmax attention in fp32
    (fp64 for fp64 inputs) over the key positions ``0 .. cache_seqlens[b] + T - 1``.

    A query that sees no key at all (empty prefix and an all-false mask row) gets a zero output.
    """
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    scale = D**-0.5 if sm_scale is None else sm_scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Keys past the longest sequence are never visible; on CPU reading the max costs no sync.
    L = k_cache.shape[2] if q.device.type != "cpu" or B == 0 else int(cache_seqlens.max()) + T
    positions = torch.arange(L, device=q.device)
    in_window = positions[None, :] < (cache_seqlens.to(torch.int64) + T)[:, None]  # [B, L]
    # Zero the unwritten tail of each sequence's cache so garbage (even NaN) cannot leak into 0 * v.
    k = torch.where(in_window[:, None, :, None], k_cache[:, :, :L].to(acc), 0.0)
    v = torch.where(in_window[:, None, :, None], v_cache[:, :, :L].to(acc), 0.0)
    rows = q.to(acc).permute(0, 2, 1, 3).reshape(B, Hkv, G * T, D)  # row g*T + t is head kvh*G + g
    scores = (rows @ k.transpose(-1, -2)).view(B, Hkv, G, T, L) * scale
    visible = _visible_keys(cache_seqlens, tree_mask, T, L)[:, None, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.where(visible.any(-1, keepdim=True), probs, 0.0)  # rows that see nothing: 0, not NaN
    out = probs.view(B, Hkv, G * T, L) @ v
    return out.view(B, Hq, T, D).permute(0, 2, 1, 3).to(q.dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, FP32_DOT: tl.constexpr):
    """Fold one key block into the running (max, sum, weighted V) of every query row (log2 domain)."""
    if FP32_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if FP32_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _new_token_visibility(mask_ptr, b, t, js, T, sm_b, sm_i, sm_w, MASK_KIND: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: query token t (rows) sees new token js (columns)."""
    inside = (t[:, None] < T) & (js[None, :] < T)
    if MASK_KIND == 0:
        vis = js[None, :] <= t[:, None]
    elif MASK_KIND == 1:
        row = mask_ptr + b.to(tl.int64) * sm_b + t[:, None] * sm_i
        vis = tl.load(row + js[None, :] * sm_w, mask=inside, other=0) != 0
    elif MASK_KIND == 2:
        row = mask_ptr + b.to(tl.int64) * sm_b + t[:, None] * sm_i
        byte = tl.load(row + (js[None, :] // 8) * sm_w, mask=inside, other=0).to(tl.int32)
        vis = ((byte >> (js[None, :] % 8)) & 1) != 0
    else:
        row = mask_ptr + b.to(tl.int64) * sm_b + t[:, None] * sm_i
        word = tl.load(row + (js[None, :] // 32) * sm_w, mask=inside, other=0)
        vis = ((word >> (js[None, :] % 32)) & 1) != 0
    return vis & inside


@triton.jit
def _tree_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    seqlens_ptr,
    mask_ptr,
    qk_scale,
    T,
    G,
    Hkv,
    D,
    chunk,
    sq_b,
    sq_t,
    sq_h,
    sq_d,
    sk_b,
    sk_h,
    sk_s,
    sk_d,
    sv_b,
    sv_h,
    sv_s,
    sv_d,
    so_split,
    so_b,
    so_t,
    so_h,
    so_d,
    sl_split,
    sl_b,
    sl_t,
    sl_h,
    sm_b,
    sm_i,
    sm_w,
    MASK_KIND: tl.constexpr,
    SPLIT: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (block of query rows, sequence x kv head[, prefix split]).

    The rows of a block are (token t, grouped head g) pairs, row = t * G + g, so the K/V tiles of a kv
    head are loaded once for its whole GQA group. Without SPLIT a program streams the whole prefix,
    then the new tokens under the mask, and writes the normalised output. With SPLIT program
    ``split`` covers prefix positions [split * chunk, (split + 1) * chunk) and split 0 also the new
    tokens; each writes its normalised partial output and log2-sum-exp for the combine kernel.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    h = kvh * G + rows % G
    row_ok = t < T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    b64 = b.to(tl.int64)
    q_rows = q_ptr + b64 * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + d[None, :] * sq_d
    q = tl.load(q_rows, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_head = k_ptr + b64 * sk_b + kvh.to(tl.int64) * sk_h
    v_head = v_ptr + b64 * sv_b + kvh.to(tl.int64) * sv_h
    seqlen = tl.load(seqlens_ptr + b)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)

    if SPLIT:
        start = split * chunk
        end = tl.minimum(start + chunk, seqlen)
    else:
        start = 0
        end = seqlen
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + cols
        pos_ok = pos < end
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_head + pos[:, None] * sk_s + d[None, :] * sk_d, mask=kv_mask, other=0.0)
        v = tl.load(v_head + pos[:, None] * sv_s + d[None, :] * sv_d, mask=kv_mask, other=0.0)
        visible = row_ok[:, None] & pos_ok[None, :]
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, FP32_DOT)

    if MASK_KIND == 0:  # causal: this block's last token bounds the new keys it can see
        new_end = tl.minimum(((pid_m + 1) * BLOCK_M - 1) // G + 1, T)
    else:
        new_end = T
    if SPLIT:
        new_end = tl.where(split == 0, new_end, 0)  # split 0 also covers the new tokens
    for j0 in range(0, new_end, BLOCK_N):
        js = j0 + cols
        pos = seqlen + js
        kv_mask = (js < T)[:, None] & d_ok[None, :]
        k = tl.load(k_head + pos[:, None] * sk_s + d[None, :] * sk_d, mask=kv_mask, other=0.0)
        v = tl.load(v_head + pos[:, None] * sv_s + d[None, :] * sv_d, mask=kv_mask, other=0.0)
        visible = _new_token_visibility(mask_ptr, b, t, js, T, sm_b, sm_i, sm_w, MASK_KIND)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, FP32_DOT)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # rows that saw nothing keep acc = 0
    out = acc / l_safe[:, None]
    split64 = split.to(tl.int64)
    o_rows = out_ptr + split64 * so_split + b64 * so_b + t[:, None] * so_t + h[:, None] * so_h
    tl.store(
        o_rows + d[None, :] * so_d, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :]
    )
    if SPLIT:
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + split64 * sl_split + b64 * sl_b + t * sl_t + h * sl_h, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    T,
    Hq,
    D,
    sp_split,
    sl_split,
    so_b,
    so_t,
    so_h,
    so_d,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (sequence, token, head) row: merge the per-split partial outputs by their
    log2-sum-exp weights. Partials are contiguous [split, B, T, Hq, D] (lse without D)."""
    row = tl.program_id(0).to(tl.int64)
    h = row % Hq
    t = (row // Hq) % T
    b = row // (Hq * T)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    lse = tl.load(lse_ptr + s * sl_split + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe)
    part = tl.load(
        part_ptr + s[:, None] * sp_split + row * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :]
    )
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total > 0.0, total, 1.0)
    dst = out_ptr + b * so_b + t * so_t + h * so_h + d * so_d
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@dataclass(frozen=True)
class LaunchPlan:
    block_m: int
    block_n: int
    num_splits: int
    chunk: int  # prefix positions per split (a multiple of block_n)
    num_warps: int


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_launch(B: int, Hkv: int, T: int, G: int, S_max: int, D: int, num_sms: int) -> LaunchPlan:
    """Block sizes and the number of prefix splits; decided from shapes only (no host sync).

    Query rows per kv head are T * G (the GQA group is packed into the query block). When the
    (row block, sequence, kv head) programs cannot fill the GPU twice over and the cache is long, the
    prefix is split (flash-decoding) so that e.g. batch 1 with a long prefix still uses every SM.
    """
    rows = max(T * G, 1)
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n = 64 if D <= 128 else 32
    programs = triton.cdiv(rows, block_m) * B * Hkv
    num_splits = 1
    min_chunk = 256
    if S_max >= 2 * min_chunk and programs < 2 * num_sms:
        num_splits = min(triton.cdiv(2 * num_sms, programs), triton.cdiv(S_max, min_chunk), 64)
    chunk = triton.cdiv(triton.cdiv(S_max, num_splits), block_n) * block_n
    num_warps = 4 if block_m * triton.next_power_of_2(D) <= 64 * 64 else 8
    return LaunchPlan(block_m, block_n, num_splits, chunk, num_warps)


def _dot_in_fp32(q: torch.Tensor) -> bool:
    """fp32 inputs keep exact fp32 dots (no TF32). The CPU interpreter's tl.dot multiplies raw bf16 bit
    patterns (triton-lang/triton#11584, unsupported upstream), so interpreted bf16 dots run in fp32."""
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type == "cpu")


def _tree_attention_triton(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale, num_splits=None):
    """Launch the Triton kernels. ``num_splits`` overrides the heuristic's prefix split (tests)."""
    if q.dtype == torch.float64:
        raise TypeError("tree_attention: the Triton kernel supports fp32/fp16/bf16, not float64")
    B, T, Hq, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    sms = _num_sms(q.device.index or 0) if q.device.type == "cuda" else 1
    plan = plan_launch(B, Hkv, T, G, S_max, D, sms)
    if num_splits is not None:
        chunk = triton.cdiv(triton.cdiv(S_max, num_splits), plan.block_n) * plan.block_n
        plan = LaunchPlan(plan.block_m, plan.block_n, num_splits, chunk, plan.num_warps)
    kind = _mask_kind(tree_mask)
    mask = tree_mask.view(torch.uint8) if kind == BOOL_MASK else tree_mask
    mask_arg = mask if mask is not None else cache_seqlens  # never read when causal
    mask_strides = mask.stride() if mask is not None else (0, 0, 0)
    block_d = triton.next_power_of_2(D)
    split = plan.num_splits > 1
    if split:
        part = torch.empty(plan.num_splits, B, T, Hq, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(plan.num_splits, B, T, Hq, dtype=torch.float32, device=q.device)
        dst, dst_strides, lse_strides = part, part.stride(), lse.stride()
    else:
        lse = out  # unused
        dst, dst_strides, lse_strides = out, (0, *out.stride()), (0, 0, 0, 0)
    grid = (triton.cdiv(T * G, plan.block_m), B * Hkv, plan.num_splits)
    _tree_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        dst,
        lse,
        cache_seqlens,
        mask_arg,
        sm_scale * math.log2(math.e),
        T,
        G,
        Hkv,
        D,
        plan.chunk,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *dst_strides,
        *lse_strides,
        *mask_strides,
        MASK_KIND=kind,
        SPLIT=split,
        FP32_DOT=_dot_in_fp32(q),
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_D=block_d,
        num_warps=plan.num_warps,
    )
    if split:
        _combine_splits_kernel[(B * T * Hq,)](
            part,
            lse,
            out,
            plan.num_splits,
            T,
            Hq,
            D,
            part.stride(0),
            lse.stride(0),
            *out.stride(),
            BLOCK_S=triton.next_power_of_2(plan.num_splits),
            BLOCK_D=block_d,
        )
    return out


# --------------------------------------------------------------------------------------------------
# Registered op and dispatch
# --------------------------------------------------------------------------------------------------
def _run_tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale: float) -> torch.Tensor:
    """The op's body: dispatch to the backend chosen for q's device."""
    backend = select_backend(OP, q.device)
    args = (q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale)
    if backend in ("cpp", "cuda"):
        return _ext.op(OP)(*args)
    if backend == "triton":
        return _tree_attention_triton(*args)
    return tree_attention_ref(*args)


@torch.library.custom_op("eagle::tree_attention", mutates_args=())
def _tree_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor | None,
    sm_scale: float,
) -> torch.Tensor:
    return _run_tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale)


@_tree_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale):
    return q.new_empty(q.shape)


def _check_mask(tree_mask: torch.Tensor, B: int, T: int, device: torch.device) -> None:
    dtypes = (torch.bool, torch.uint8, torch.int32)
    check_tensor("tree_mask", tree_mask, ndim=3, dtypes=dtypes, device=device)
    width = {torch.bool: T, torch.uint8: -(-T // 8), torch.int32: -(-T // 32)}[tree_mask.dtype]
    fmt = {torch.bool: "bool", torch.uint8: "uint8 bit-packed", torch.int32: "int32 bit-packed"}
    if tuple(tree_mask.shape) != (B, T, width):
        raise ValueError(
            f"tree_mask ({fmt[tree_mask.dtype]}) must have shape [B, T, {width}] = [{B}, {T}, {width}] "
            f"for q of B={B}, T={T}, got {list(tree_mask.shape)}"
        )


def _check_args(q, k_cache, v_cache, cache_seqlens, tree_mask) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, T, Hq, D = q.shape
    device = q.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} must match")
    if k_cache.shape[0] != B:
        raise ValueError(f"k_cache must be [B, Hkv, S_max, D] with B={B} (from q), got {list(k_cache.shape)}")
    if k_cache.shape[3] != D:
        raise ValueError(f"head dim mismatch: q has D={D}, k_cache/v_cache have D={k_cache.shape[3]}")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is outside the supported {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    Hkv = k_cache.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads Hq={Hq} must be a positive multiple of kv heads Hkv={Hkv} (GQA)")
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), device=device, shape=(B,))
    if tree_mask is not None:
        _check_mask(tree_mask, B, T, device)


def _check_values(cache_seqlens: torch.Tensor, T: int, S_max: int) -> None:
    """Cache-length range check; it reads values, so on CUDA it runs only in debug mode."""
    if cache_seqlens.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
    if lo < 0 or hi + T > S_max:
        raise ValueError(
            f"cache_seqlens must be >= 0 and cache_seqlens + T (T={T}) must fit S_max={S_max}, "
            f"got min {lo}, max {hi}"
        )


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    *,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Attention of ``T`` new tokens per sequence over the committed prefix and the new tokens.

    Parameters
    ----------
    q : Tensor ``[B, T, Hq, D]``, float16 / bfloat16 / float32 (float64 on the CPU backends)
        Queries of the ``T`` new tokens of each sequence (a prefill chunk, one decode token, or the
        slots of a draft tree). Any strides.
    k_cache, v_cache : Tensor ``[B, Hkv, S_max, D]``, q's dtype
        Keys and values of the in-place cache, typically the strided views ``kv[layer, 0]`` and
        ``kv[layer, 1]`` of a ``[num_layers, 2, B, Hkv, S_max, D]`` buffer. Positions
        ``0 .. cache_seqlens[b] - 1`` hold the committed prefix; the new tokens' K/V are already
        written at ``cache_seqlens[b] + j``, ``j < T``. Positions after that are never read.
        ``Hq`` must be a multiple of ``Hkv`` (GQA: query head ``h`` uses kv head ``h // (Hq/Hkv)``);
        ``16 <= D <= 256``.
    cache_seqlens : Tensor ``[B]``, int32
        Committed length of each sequence (ragged). ``cache_seqlens[b] + T <= S_max``.
    tree_mask : Tensor, optional
        Which new tokens each new token sees (the committed prefix is always visible). None: causal,
        token ``i`` sees ``j <= i``. Otherwise, by dtype: bool ``[B, T, T]`` (``[b, i, j]`` true: i
        sees j); uint8 ``[B, T, ceil(T/8)]`` bit-packed rows, bit ``j % 8`` of byte ``j // 8``
        (SGLang's ``QLEN_ONLY_BITPACKING``, here for any ``T``; SGLang's per-row uint16/uint32 words
        are this format after ``.view(torch.uint8)[..., :ceil(T/8)]``); int32
        ``[B, T, ceil(T/32)]``, bit ``j % 32`` of word ``j // 32`` (TensorRT-LLM). See
        :func:`pack_tree_mask`.
    sm_scale : float, optional
        Softmax scale; default ``D ** -0.5``.

    Returns
    -------
    Tensor ``[B, T, Hq, D]``, q's dtype, contiguous: ``softmax(q k^T * sm_scale) v`` over the visible
    keys, accumulated in fp32 (fp64 for fp64 inputs). A query that sees no key at all (empty prefix
    and an all-false mask row) gets zeros. NaN/inf in visible K/V propagate to the output.

    Backends: Triton on CUDA tensors (flash-attention style, with a split-prefix flash-decoding
    variant chosen by :func:`plan_launch`); the C++ kernel on CPU tensors when the extension is
    built, else :func:`tree_attention_ref`.
    """
    _check_args(q, k_cache, v_cache, cache_seqlens, tree_mask)
    if q.device.type == "cpu" or debug_checks_enabled():
        _check_values(cache_seqlens, q.shape[1], k_cache.shape[2])
    scale = q.shape[3] ** -0.5 if sm_scale is None else float(sm_scale)
    if eager_fast_path(q, k_cache, v_cache, cache_seqlens, tree_mask):
        return _run_tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, scale)
    return torch.ops.eagle.tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, scale)
