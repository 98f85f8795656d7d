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

Packed rows may be wider than that (SGLang's whole 1 / 2 / 4-byte words, an engine's buffer sized for
its largest tree): bits at ``j >= T``, in the last byte/word and in any byte/word past it, are
ignored. :func:`pack_tree_mask` and
:func:`unpack_tree_mask` convert between them.

Backends: Triton on CUDA tensors; on CPU the C++ kernel (``csrc/cpu/tree_attention.cpp``) is the
default because it measured faster than this module's vectorised torch reference on every
decode-loop shape of ``bench/bench_tree_attention.py`` (2-9x) and at least on par with PyTorch's
SDPA given a prebuilt mask; the reference is the fallback when the extension is not built.

The Triton launch (row and key block sizes, warps, pipelining stages, flash-decoding splits) is chosen
from shapes alone by :func:`plan_launch`; :class:`LaunchConfig` overrides any of it through the
internal launcher ``_tree_attention_triton(..., config)``, which ``bench/sweep_tree_attention.py``
uses to measure a grid of configurations on a GPU.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import torch

from eagle_kernels import _ext, _kv_quant
from eagle_kernels._backend import debug_checks_enabled, eager_fast_path, forced_backend, select_backend
from eagle_kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    SignatureCache,
    check_out_buffer,
    check_tensor,
)
from eagle_kernels._kv_quant import KV_DTYPES
from eagle_kernels._triton import launches_on_input_device, tl, triton

OP = "tree_attention"
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
PACKED_FORMATS = {"u8": (torch.uint8, 8), "i32": (torch.int32, 32)}

# Mask kinds as the kernels see them.
CAUSAL, BOOL_MASK, U8_BITS, I32_BITS = 0, 1, 2, 3
LOG2E = math.log2(math.e)


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
    """Bool ``[B, T, T]`` view of any accepted mask format (a bool mask is returned as it is): bool
    ``[B, T, T]``, or uint8 / int32 bit-packed rows ``[B, T, W]`` with ``W >= ceil(T / 8)`` /
    ``ceil(T / 32)`` (SGLang pads its rows to whole words)."""
    check_tensor("tree_mask", tree_mask, ndim=3, dtypes=(torch.bool, torch.uint8, torch.int32))
    if not isinstance(T, (bool, torch.SymInt)):  # a numpy or 0-d tensor integer as an int
        try:
            T = operator.index(T)
        except TypeError:
            pass
    if isinstance(T, bool) or not isinstance(T, (int, torch.SymInt)) or T < 0:
        raise ValueError(f"T must be an int >= 0, got {T!r}")
    B = tree_mask.shape[0]
    if tree_mask.dtype == torch.bool:
        if tuple(tree_mask.shape) != (B, T, T):
            raise ValueError(
                f"tree_mask (bool) must have shape [B, T, T] with T={T}, got {list(tree_mask.shape)}"
            )
        return tree_mask
    bits = 8 if tree_mask.dtype == torch.uint8 else 32
    width = -(-T // bits)
    if tree_mask.shape[1] != T or tree_mask.shape[2] < width:
        raise ValueError(
            f"tree_mask ({tree_mask.dtype}, bit-packed) must have shape [B, T, >= {width}] with T={T}, "
            f"got {list(tree_mask.shape)}"
        )
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
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch definition of the op (see :func:`tree_attention`): masked softmax attention in fp32
    (fp64 for fp64 inputs) over the key positions ``0 .. cache_seqlens[b] + T - 1``, with the keys
    ``k_cache * k_scale`` and the values ``v_cache * v_scale`` (an 8-bit cache's real values).

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
    ks = _kv_quant.broadcast_scale(_kv_quant.as_scale("k_scale", k_scale), acc, q.device)
    vs = _kv_quant.broadcast_scale(_kv_quant.as_scale("v_scale", v_scale), acc, q.device)
    k, v = k_cache[:, :, :L].to(acc), v_cache[:, :, :L].to(acc)
    k, v = (k if ks is None else k * ks), (v if vs is None else v * vs)
    k = torch.where(in_window[:, None, :, None], k, 0.0)
    v = torch.where(in_window[:, None, :, None], v, 0.0)
    rows = q.to(acc).permute(0, 2, 1, 3).reshape(B, Hkv, G * T, D)  # row g*T + t is head kvh*G + g
    scores = (rows @ k.transpose(-1, -2)).view(B, Hkv, G, T, L) * scale
    visible = _visible_keys(cache_seqlens, tree_mask, T, L)[:, None, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.where(visible.any(-1, keepdim=True), probs, 0.0)  # rows that see nothing: 0, not NaN
    # A NaN / inf in a new token's V must reach only the rows that see that token: in the product a
    # masked key's 0 times NaN would spread it to every row (a rejected draft token whose V overflowed
    # float16 would turn the whole verified tree NaN). So the new tokens' V rows enter the product
    # with their finite values, and the rows that see a non-finite one come out NaN. (The prefix is
    # seen by every row: the product spreads its NaN as it should.)
    if T > 0:
        new_pos = cache_seqlens.to(torch.int64)[:, None] + torch.arange(T, device=q.device)  # [B, T]
        index = new_pos[:, None, :, None].expand(B, Hkv, T, D)
        new_v = v.gather(2, index)
        finite = torch.isfinite(new_v)
        fixed = torch.where(finite, new_v, 0.0)
        # out of place only for autograd (the backward differentiates this); else the copy of v costs
        # ~30% of a long cache's reference call
        v = v.scatter(2, index, fixed) if v.requires_grad else v.scatter_(2, index, fixed)
        bad_new = ~finite.all(-1)  # [B, Hkv, T]: new token j's V holds NaN / inf
        sees_new = visible[:, 0, 0].gather(2, new_pos[:, None, :].expand(B, T, T))  # [B, T, T]
        sees_bad = (sees_new[:, None] & bad_new[:, :, None, :]).any(-1)  # [B, Hkv, T]
    out = probs.view(B, Hkv, G * T, L) @ v
    if T > 0:
        rows_bad = sees_bad[:, :, None, :].expand(B, Hkv, G, T).reshape(B, Hkv, G * T, 1)
        out = torch.where(rows_bad, float("nan"), out)
    return out.view(B, Hq, T, D).permute(0, 2, 1, 3).to(q.dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
# Design for bandwidth (the goal shape: 32 query / 8 kv heads of 128, prefix 2048, a 64-token tree):
# * a program owns BLOCK_M rows of one (sequence, kv head); a row is a (new token t, grouped head g)
#   pair, row = t * G + g, so each K/V tile feeds the whole GQA group with one load. With T * G = 256
#   rows, BLOCK_M = 128 or 256 reads the prefix 2x or 1x (and the row blocks of one kv head are
#   adjacent in the grid, so they run together and share K/V tiles through L2);
# * the prefix loop runs over full BLOCK_N tiles with unmasked loads and no visibility test (the
#   prefix is always visible); only the last, partial tile is masked, and only the T new tokens
#   evaluate the tree mask;
# * the head dim is a constexpr: with BLOCK_D == D and a unit stride (the usual cache layout) no load
#   has a column mask, so K/V tiles are fetched with 16-byte async copies and pipelined
#   (``num_stages``);
# * offsets inside the loops are int32 tile offsets from int64 per-(sequence, head, split) bases;
# * softmax in the log2 domain (exp2, scale folded with log2(e));
# * flash-decoding split of the prefix when there are too few (row block, sequence, kv head)
#   programs to fill the GPU (batch 1 and 8 at T = 64); the split that holds the end of the prefix
#   also does the new tokens (it has the least prefix left), and a combine kernel merges the splits.
@triton.jit
def _load_kv_tile(ptrs, pos_ok, d_ok, POS_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """[BLOCK_N, BLOCK_D] tile; masks only where a row (position) or column (head dim) can be out of range."""
    if POS_MASK:
        if EVEN_D:
            tile = tl.load(ptrs, mask=pos_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return tile


@triton.jit
def _kv_to_compute(x, q, FP8_BITS: tl.constexpr):
    """A loaded K/V tile in q's dtype. 8-bit caches convert exactly (every fp8 / int8 value is a
    float16 and a bfloat16 value); a 16- or 32-bit tile of q's dtype is returned as it is.

    ``FP8_BITS``: 0, the tile has its own dtype; 1 or 2, it is float8_e4m3fn / float8_e5m2 loaded as
    uint8 and converted here in integer code. e5m2 is float16's top byte, so the byte shifted left by 8
    is the float16 (infinities, NaN and subnormals included). For e4m3fn, the sign, 4 exponent and 3
    mantissa bits placed at bits 15 and 13..7 of a float16 give the value times 2**-8 (the exponent
    biases are 15 and 7, and e4m3's subnormals land on float16 subnormals), and the exact multiply by
    256 restores it; e4m3fn has no infinity, and its NaN is S.1111.111."""
    if FP8_BITS == 1:
        bits = x.to(tl.uint16)
        half = (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.float16, bitcast=True) * 256.0
        return tl.where((bits & 0x7F) == 0x7F, float("nan"), half).to(q.dtype)
    elif FP8_BITS == 2:
        return (x.to(tl.uint16) << 8).to(tl.float16, bitcast=True).to(q.dtype)
    elif x.dtype.is_int8():  # through float32 (exact): the interpreter's int8 -> bfloat16 cast is wrong
        return x.to(tl.float32).to(q.dtype)
    else:
        return x.to(q.dtype)


@triton.jit
def _scores(q, k, FP32_DOT: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 ``q k^T``, unscaled (the softmax step folds the scale into its FMA)."""
    if FP32_DOT:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    return tl.dot(q, tl.trans(k))


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v, qk_scale, MAY_BE_EMPTY: tl.constexpr, FP32_DOT: tl.constexpr):
    """Fold one key block (raw scores ``s``, -inf where invisible) into the running row max ``m_i``,
    row sum ``l_i`` and weighted-V ``acc``, in the log2 domain (``qk_scale`` = sm_scale * log2(e) >= 0).
    ``MAY_BE_EMPTY``: a row of ``s`` may be all -inf (only under the tree mask; a prefix tile always
    has a visible key)."""
    # max(s) * scale == max(s * scale) for scale > 0 (rounding is monotonic), and s * scale - m is one
    # FMA per score instead of a multiply and a subtract (written out: Triton's default FP fusion is
    # to be switched off in 3.10). A row whose scaled scores overflow gets m = +inf and p = 0, not
    # NaN: the epilogue turns such rows into NaN. m * -1.0, not -m: Triton's unary minus is 0 - m,
    # which LLVM may not fold into the FMA's negated operand (0 - 0 is +0); the extra FADD reordered
    # sm_90's schedule so the two rows' max reductions no longer overlapped the exponentials (SASS
    # of a triton 3.6 AOT compile; the change measured ~2.5% slower at B 32 on an H200, 2026-11-28).
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MAY_BE_EMPTY:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(tl.fma(s, qk_scale, m_safe[:, None] * -1.0))
    l_i = l_i * alpha + tl.sum(p, 1)
    # The rescaled accumulator is the dot's accumulator input, so the MMA adds into it in place
    # (no second [BLOCK_M, D] fp32 tile for the product and no separate add).
    acc = acc * alpha[:, None]
    if FP32_DOT:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _new_token_visibility(mask_ptr, b, t, js, T, n_new, sm_b, sm_i, sm_w, MASK_KIND: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: query token t (rows) sees new token js (columns); false for padding
    rows (t >= T) and outside 0 <= js < n_new (n_new <= T: the new keys this program covers)."""
    inside = (t[:, None] < T) & (js[None, :] >= 0) & (js[None, :] < n_new)
    if MASK_KIND == 0:
        vis = js[None, :] <= t[:, None]
    elif MASK_KIND == 1:
        row = mask_ptr + b.to(tl.int64) * sm_b + t[:, None] * sm_i
        vis = tl.load(row + js[None, :] * sm_w, mask=inside, other=0) != 0
    elif MASK_KIND == 2:
        row = mask_ptr + b.to(tl.int64) * sm_b + t[:, None] * sm_i
        byte = tl.load(row + (js[None, :] // 8) * sm_w, mask=inside, other=0).to(tl.int32)
        # & 7, not % 8: a masked column js < 0 has a negative remainder, and so an undefined shift
        vis = ((byte >> (js[None, :] & 7)) & 1) != 0
    else:
        row = mask_ptr + b.to(tl.int64) * sm_b + t[:, None] * sm_i
        word = tl.load(row + (js[None, :] // 32) * sm_w, mask=inside, other=0)
        vis = ((word >> (js[None, :] & 31)) & 1) != 0
    return vis & inside


@triton.jit
def _paged_tile_ptrs(
    k_head,
    v_head,
    table_row,
    st_c,
    pos,
    pos_ok,
    num_blocks,
    sk_blk,
    sk_s,
    sv_blk,
    sv_s,
    d,
    sk_d,
    sv_d,
    PAGE_SIZE: tl.constexpr,
    POS_MASK: tl.constexpr,
):
    """[BLOCK_N, BLOCK_D] K and V pointers of cache positions ``pos`` of one sequence's paged cache:
    position p is slot ``p % PAGE_SIZE`` of block ``table_row[(p // PAGE_SIZE) * st_c]``. Block ids are
    checked only on CPU and in debug mode (a host sync): one outside ``[0, num_blocks)`` is clamped so
    that it cannot read outside the cache."""
    if POS_MASK:
        blk = tl.load(table_row + (pos // PAGE_SIZE) * st_c, mask=pos_ok, other=0)
    else:
        blk = tl.load(table_row + (pos // PAGE_SIZE) * st_c)
    blk = tl.minimum(tl.maximum(blk, 0), num_blocks - 1).to(tl.int64)
    slot = (pos % PAGE_SIZE).to(tl.int64)
    k_ptrs = k_head + (blk * sk_blk + slot * sk_s)[:, None] + d[None, :] * sk_d
    v_ptrs = v_head + (blk * sv_blk + slot * sv_s)[:, None] + d[None, :] * sv_d
    return k_ptrs, v_ptrs


@triton.jit
def _tree_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_desc,
    v_desc,
    out_ptr,
    lse_ptr,
    seqlens_ptr,
    mask_ptr,
    table_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    v_scale,
    B,
    T,
    G,
    Hkv,
    chunk,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_h,
    sk_s,
    sv_b,
    sv_h,
    sv_s,
    sm_b,
    sm_i,
    sm_w,
    st_b,
    st_c,
    num_blocks,
    S_max,
    sq_d: tl.constexpr,
    sk_d: tl.constexpr,
    sv_d: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SPLIT: tl.constexpr,
    FP32_DOT: tl.constexpr,
    KV_TMA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    K_SCALE: tl.constexpr,
    V_SCALE: tl.constexpr,
    KV_FP8_BITS: tl.constexpr,
):
    """One program per (block of query rows, sequence x kv head, prefix split).

    The rows of a block are (token t, grouped head g) pairs, row = t * G + g. Program ``split`` covers
    prefix positions [split * chunk, min((split + 1) * chunk, seqlen)), and the split holding position
    ``seqlen`` also the T new tokens (without SPLIT there is one split with chunk >= S_max).
    Without SPLIT the program writes the normalised output into ``out`` (contiguous [B, T, Hq, D]);
    with SPLIT its normalised partial output into ``out`` (contiguous [splits, B, T, Hq, D], fp32) and
    the rows' log2-sum-exp into ``lse`` ([splits, B, T, Hq]) for the combine kernel.
    Head-dim strides are constexprs: 1 for the usual layouts, which makes tile loads contiguous.
    With ``KV_TMA`` the full prefix tiles come through ``k_desc``/``v_desc``, tensor descriptors over
    the contiguous caches seen as [B * Hkv * S_max, D] (Hopper's bulk tensor copies); else, and for
    the masked tiles always, through pointers.
    ``PAGE_SIZE > 0``: a paged cache (``paged_tree_attention``). Then the ``sk_b`` / ``sv_b`` strides
    step over blocks, ``sk_s`` / ``sv_s`` over a block's slots, and sequence ``b``'s position p is slot
    ``p % PAGE_SIZE`` of block ``table[b, p // PAGE_SIZE]`` (``table_ptr``, strides ``st_b``, ``st_c``);
    ``S_max`` is the table's capacity, its columns times PAGE_SIZE.
    8-bit caches (``eagle_kernels._kv_quant``): each loaded tile is converted to q's dtype
    (:func:`_kv_to_compute`, ``KV_FP8_BITS`` for fp8 loaded as bytes); the key scale multiplies
    ``qk_scale`` and the value scale the output.
    ``K_SCALE`` / ``V_SCALE``: 0 none, 1 the value at ``*_scale_ptr``, 2 kv head ``kvh``'s value at
    ``*_scale_ptr + kvh``, 3 (V only) the ``v_scale`` argument (a host-side K scale is folded into
    ``qk_scale`` by the launcher).
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
    d_ok = d < HEAD_DIM
    cols = tl.arange(0, BLOCK_N)
    if K_SCALE == 1:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    elif K_SCALE == 2:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kvh)

    b64 = b.to(tl.int64)
    q_rows = q_ptr + b64 * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + d[None, :] * sq_d
    q = tl.load(q_rows, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # Values are checked only in debug mode (a host sync): a length whose new tokens would pass S_max
    # (or a negative one) must not read outside the sequence's cache, into the next head's rows or
    # past the tensor. Valid lengths are unchanged.
    seqlen = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b), 0), S_max - T)
    if PAGE_SIZE > 0:
        k_head = k_ptr + kvh.to(tl.int64) * sk_h
        v_head = v_ptr + kvh.to(tl.int64) * sv_h
        table_row = table_ptr + b64 * st_b
    else:
        k_head = k_ptr + b64 * sk_b + kvh.to(tl.int64) * sk_h
        v_head = v_ptr + b64 * sv_b + kvh.to(tl.int64) * sv_h
        table_row = table_ptr
    k_tile = cols[:, None] * sk_s + d[None, :] * sk_d  # int32 offsets of a tile from its first position
    v_tile = cols[:, None] * sv_s + d[None, :] * sv_d

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # This program's keys, relative to position `start`: its prefix positions [0, length), always
    # visible, and, for the split whose range holds position seqlen, the new tokens right after them.
    start = split * chunk
    length = tl.maximum(tl.minimum(chunk, seqlen - start), 0)
    if MASK_KIND == 0:  # causal: this block's last token bounds the new keys it can see
        new_keys = tl.minimum(((pid_m + 1) * BLOCK_M - 1) // G + 1, T)
    else:
        new_keys = T
    new_keys = tl.where(seqlen // chunk == split, new_keys, 0)
    full = (length // BLOCK_N) * BLOCK_N
    k_base = k_head + start.to(tl.int64) * sk_s
    v_base = v_head + start.to(tl.int64) * sv_s

    # Full prefix tiles: no mask at all (the pipelined, bandwidth-bound loop).
    if KV_TMA:
        first_row = pid_bh * S_max + start  # row of position `start` in the [B * Hkv * S_max, D] view
        for n0 in range(0, full, BLOCK_N):
            k = _kv_to_compute(k_desc.load([first_row + n0, 0]), q, KV_FP8_BITS)
            v = _kv_to_compute(v_desc.load([first_row + n0, 0]), q, KV_FP8_BITS)
            s = _scores(q, k, FP32_DOT)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, qk_scale, False, FP32_DOT)
    else:
        for n0 in range(0, full, BLOCK_N):
            if PAGE_SIZE > 0:
                k_ptrs, v_ptrs = _paged_tile_ptrs(
                    k_head,
                    v_head,
                    table_row,
                    st_c,
                    start + n0 + cols,
                    cols >= 0,
                    num_blocks,
                    sk_b,
                    sk_s,
                    sv_b,
                    sv_s,
                    d,
                    sk_d,
                    sv_d,
                    PAGE_SIZE,
                    False,
                )
            else:
                k_ptrs = k_base + n0 * sk_s + k_tile
                v_ptrs = v_base + n0 * sv_s + v_tile
            k = _kv_to_compute(_load_kv_tile(k_ptrs, cols, d_ok, False, EVEN_D), q, KV_FP8_BITS)
            v = _kv_to_compute(_load_kv_tile(v_ptrs, cols, d_ok, False, EVEN_D), q, KV_FP8_BITS)
            s = _scores(q, k, FP32_DOT)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, qk_scale, False, FP32_DOT)

    # The partial prefix tile and the new tokens (1-2 tiles for a 64-token tree): masked.
    for n0 in tl.range(full, length + new_keys, BLOCK_N, num_stages=1):
        rel = n0 + cols
        js = rel - length  # new-token index; negative on prefix positions
        if PAGE_SIZE > 0:
            k_ptrs, v_ptrs = _paged_tile_ptrs(
                k_head,
                v_head,
                table_row,
                st_c,
                start + rel,
                js < new_keys,
                num_blocks,
                sk_b,
                sk_s,
                sv_b,
                sv_s,
                d,
                sk_d,
                sv_d,
                PAGE_SIZE,
                True,
            )
        else:
            k_ptrs = k_base + n0 * sk_s + k_tile
            v_ptrs = v_base + n0 * sv_s + v_tile
        k = _kv_to_compute(_load_kv_tile(k_ptrs, js < new_keys, d_ok, True, EVEN_D), q, KV_FP8_BITS)
        v = _kv_to_compute(_load_kv_tile(v_ptrs, js < new_keys, d_ok, True, EVEN_D), q, KV_FP8_BITS)
        tree = _new_token_visibility(mask_ptr, b, t, js, T, new_keys, sm_b, sm_i, sm_w, MASK_KIND)
        visible = (js < 0)[None, :] | tree
        # A NaN / inf in V reaches only the rows that see its key: in the dot a masked key's p = 0
        # times NaN would reach every row (a rejected draft token whose V overflowed float16 turned
        # the whole verified tree NaN). The dot takes finite values, and a visible key with a
        # non-finite V gets a NaN score, so its p, and the row's sum and accumulator, are NaN (as in
        # the reference). No [BLOCK_M] flag or extra row reduction: a version with both spilled
        # ~500 bytes of registers on sm_90 and made the whole kernel 5-12% slower
        # (bench/ab_tree_attention.py, 2026-11-28). (|v| < inf, not v * 0 == 0: the interpreter
        # gives bf16 NaN * 0 = 0.)
        v_ok = tl.abs(v) < float("inf")  # false for NaN too
        bad_key = tl.min(v_ok.to(tl.int32), 1) == 0  # [BLOCK_N]
        v = tl.where(v_ok, v, tl.zeros_like(v))
        # Scaled before masking (a zero scale must not meet -inf), so the step's scale is 1.
        s = _scores(q, k, FP32_DOT) * qk_scale
        s = tl.where(visible, tl.where(bad_key[None, :], float("nan"), s), float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, 1.0, True, FP32_DOT)

    # l = 0: the row saw nothing and keeps acc = 0; l = NaN (a visible key's V was not finite) stays
    # NaN, in the output and in the split's lse, so the combine need not rely on 0 * NaN
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    # m = +inf: a finite score overflowed float32 once scaled (the fused s * scale - m gave -inf, so
    # p = 0); NaN as in the reference, not the zeros of a row that saw nothing
    nan_row = m_i == float("inf")
    out = tl.where(nan_row[:, None], float("nan"), acc / l_safe[:, None])
    if V_SCALE == 1:
        out = out * tl.load(v_scale_ptr)
    elif V_SCALE == 2:
        out = out * tl.load(v_scale_ptr + kvh)
    elif V_SCALE == 3:
        out = out * v_scale
    Hq = Hkv * G
    row_off = (t * Hq + h).to(tl.int64)  # row within [B, T, Hq]
    dst = b64 * T * Hq + row_off
    if SPLIT:
        dst += split.to(tl.int64) * B * T * Hq
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        lse = tl.where(nan_row, float("nan"), lse)
        tl.store(lse_ptr + dst, lse, mask=row_ok)
    o_ptrs = out_ptr + dst[:, None] * HEAD_DIM + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_splits_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    num_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_R output rows (a row is one (sequence, token, head)): merge the per-split
    normalised partial outputs by their log2-sum-exp weights in one pass with a running max.
    ``part`` is contiguous [splits, rows, D] fp32, ``lse`` [splits, rows], ``out`` contiguous [rows, D]."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_rows
    d = tl.arange(0, BLOCK_D)
    tile_ok = r_ok[:, None] & (d < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    row = r  # split s's row r, s * num_rows + r, kept in int64: splits x rows can pass 2^31
    for _ in range(0, num_splits):
        lse = tl.load(lse_ptr + row, mask=r_ok, other=float("-inf"))
        part = tl.load(part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=tile_ok, other=0.0)
        row += num_rows
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse - m_safe)  # 0 for an empty split (lse = -inf; its part is 0)
        total = total * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * part
        m = m_new
    out = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    tl.store(out_ptr + r[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_ok)


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------
_POW2_BLOCKS = (16, 32, 64, 128, 256)
_WARPS = (1, 2, 4, 8, 16)
MAX_SPLITS = 128  # what a LaunchConfig may ask for
MAX_DEFAULT_SPLITS = 64  # what the heuristic picks at most


@dataclass(frozen=True)
class LaunchConfig:
    """Overrides of the Triton launch; a None field keeps :func:`plan_launch`'s shape-based choice.

    Attributes
    ----------
    block_m : query rows per program (rows are (token, grouped head) pairs), a power of two 16..256.
    block_n : keys per tile, a power of two 16..256.
    num_warps : warps per program, 1..16 (power of two).
    num_stages : software-pipelining depth of the K/V tile loads, 1..8.
    num_splits : flash-decoding splits of the prefix, 1..128 (1: no split, no combine kernel).
    kv_tma : load the full prefix K/V tiles through tensor descriptors (TMA bulk copies on Hopper and
        later) instead of pointers. Needs contiguous ``k_cache``/``v_cache``, a power-of-two head
        dim, 16-byte rows and, on CUDA, compute capability 9.0+; else the launch raises ValueError.
    """

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    num_splits: int | None = None
    kv_tma: bool | None = None

    def __post_init__(self) -> None:
        allowed = {
            "block_m": _POW2_BLOCKS,
            "block_n": _POW2_BLOCKS,
            "num_warps": _WARPS,
            "num_stages": range(1, 9),
            "num_splits": range(1, MAX_SPLITS + 1),
        }
        for name, values in allowed.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value not in values):
                shown = list(values) if len(values) < 10 else f"{values[0]}..{values[-1]}"
                raise ValueError(f"LaunchConfig.{name} must be None or one of {shown}, got {value!r}")
        if self.kv_tma is not None and not isinstance(self.kv_tma, bool):
            raise ValueError(f"LaunchConfig.kv_tma must be None or a bool, got {self.kv_tma!r}")


@dataclass(frozen=True)
class LaunchPlan:
    """A resolved launch: block sizes, warps, pipelining depth and the prefix split."""

    block_m: int
    block_n: int
    num_splits: int
    chunk: int  # prefix positions per split (a multiple of block_n)
    num_warps: int
    num_stages: int
    kv_tma: bool = False


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the interpreter (CPU tensors)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device.index or 0).multi_processor_count


# fp32 caches: the dots run as exact FMA loops (no tensor cores, no TF32), so the work is spread over
# as many programs as possible: 16-row blocks (the least tl.dot takes) and prefix splits down to 64
# positions. On an H200, the bundled target's shapes (4 / 2 heads of 64, prefix 192, S_max 320 / 256;
# bench/results/sweep_tree_attention_NVIDIA-H200_s21_tiny_fp32.json): a 64-token tree took 1285 us with
# the 16-bit plan (128-row blocks on 4 warps: the fp32 accumulators spill) and 18.6 / 16.9 / 15.0 us
# with 16-row blocks and 1 / 2 / 3 splits (chunks of 320 / 192 / 128); this plan gives it 5 chunks of
# 64 at batch 1 (untried, the trend extended) and 3 of 128 at batch 4 (the best tried there, 15.8 us);
# a one-token step 10.2 us with its 4 chunks of 64, the best tried, against 19.5. 32-row blocks ran
# 1.8-2.5x slower than 16 and 2 stages as fast as 3. Measured at D = 64 only.
FP32_BLOCK_M = 16
FP32_MIN_CHUNK = 64


def _default_block_m(rows: int, D: int, elem_size: int = 2) -> int:
    """Query rows per program: all T * G rows of a kv head up to a cap, then blocks of the cap. The cap
    keeps the fp32 accumulator (block_m x D over 8 warps) in registers: 128 rows for D <= 128 (what
    the Hopper flash-attention configurations use), 64 beyond. fp32 caches: :data:`FP32_BLOCK_M`."""
    if elem_size >= 4:
        return FP32_BLOCK_M
    cap = 128 if D <= 128 else 64
    return min(max(16, triton.next_power_of_2(rows)), cap)


def _default_splits(programs: int, block_m: int, S_max: int, num_sms: int, elem_size: int = 2) -> int:
    """Prefix splits so that the grid covers the SMs: one program per SM for the big 128-row
    programs, two for the lighter ones (more bytes in flight per SM). Splits of fewer than
    256 positions are not worth their combine cost (16-bit caches; fp32: :data:`FP32_MIN_CHUNK`)."""
    min_chunk = FP32_MIN_CHUNK if elem_size >= 4 else 256
    target = num_sms if block_m >= 128 else 2 * num_sms
    if programs >= target or S_max < 2 * min_chunk:
        return 1
    return max(1, min(target // programs, S_max // min_chunk, MAX_DEFAULT_SPLITS))


def _default_stages(block_m: int, block_n: int, D: int, num_splits: int, elem_size: int) -> int:
    """K/V tiles in flight. A 128-row block of a 16-bit cache streaming a whole prefix (no split)
    keeps 4 where four K+V stages take at most 128 KB (up to D = 128 with 64-key tiles): 1.06x at B 8
    and 1.02x at B 32 of the goal shape on an H100, in two sweeps
    (bench/results/sweep_tree_attention_NVIDIA-H100-80GB-HBM3_s10*.json). A split's few tiles per
    program keep 3 (4 measured 0.96x at B 1). fp32 caches keep 2 (as fast as 3 with their 16-row
    blocks, see :data:`FP32_BLOCK_M`), as does D > 128 to fit shared memory."""
    if D > 128 or elem_size >= 4:
        return 2
    four_stages = 4 * 2 * block_n * triton.next_power_of_2(D) * elem_size
    deep = elem_size == 2 and block_m >= 128 and num_splits == 1 and four_stages <= 128 * 1024
    return 4 if deep else 3


@functools.lru_cache(maxsize=256)
def plan_launch(
    B: int,
    Hkv: int,
    T: int,
    G: int,
    S_max: int,
    D: int,
    num_sms: int,
    config: LaunchConfig | None = None,
    elem_size: int = 2,
) -> LaunchPlan:
    """Block sizes, warps, stages and prefix splits; decided from shapes only (no host sync).

    Query rows per kv head are T * G (the GQA group is packed into the query block). When the
    (row block, sequence, kv head) programs cannot fill the GPU and the cache is long, the prefix is
    split (flash-decoding) so that e.g. batch 1 with a long prefix still uses every SM. ``config``
    overrides any of the choices (see :class:`LaunchConfig`); the split's chunk (prefix positions per
    split, a multiple of ``block_n``) is always derived from ``S_max`` and the number of splits.
    ``elem_size``: bytes per cache element (2 for fp16/bf16, 4 for fp32), which bounds the pipelining
    depth that fits in shared memory.
    """
    config = config or LaunchConfig()
    rows = max(T * G, 1)
    block_m = config.block_m or _default_block_m(rows, D, elem_size)
    block_n = config.block_n or (64 if D <= 128 else 32)
    programs = triton.cdiv(rows, block_m) * B * Hkv
    if config.num_splits is not None:  # exactly as asked (trailing splits may be empty)
        num_splits = config.num_splits
        chunk = triton.cdiv(triton.cdiv(S_max, num_splits), block_n) * block_n
    else:
        num_splits = _default_splits(programs, block_m, S_max, num_sms, elem_size)
        chunk = triton.cdiv(triton.cdiv(S_max, num_splits), block_n) * block_n
        num_splits = triton.cdiv(S_max, chunk)  # rounding chunk up to block_n can leave a split empty
    # 8 warps from a 128 x 128 accumulator up. At 64 x 128, 4 warps (ptxas reports spills) still ran
    # 1.2-1.5x faster than 8 on an H200 (bench/results/sweep_tree_attention_NVIDIA-H200.json: T = 16 at
    # B 8, 35.1 vs 42.8 us; 64-row blocks of T = 64 at B 8, 59.4 vs 90.5 us).
    num_warps = config.num_warps or (4 if block_m * triton.next_power_of_2(D) <= 64 * 128 else 8)
    num_stages = config.num_stages or _default_stages(block_m, block_n, D, num_splits, elem_size)
    return LaunchPlan(block_m, block_n, num_splits, chunk, num_warps, num_stages, bool(config.kv_tma))


def _dot_in_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """fp32 inputs keep exact fp32 dots (no TF32). The CPU interpreter's tl.dot multiplies raw bf16 bit
    patterns (triton-lang/triton#11584, unsupported upstream), so interpreted bf16 dots run in fp32."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and device.type == "cpu")


@dataclass(frozen=True)
class _LaunchSpec:
    """Everything about a launch that depends only on shapes, dtypes, device and config (cached)."""

    plan: LaunchPlan
    grid: tuple[int, int, int]
    combine_grid: tuple[int]
    constexprs: dict
    combine_constexprs: dict


_INT32_MAX = 2**31 - 1


@functools.lru_cache(maxsize=256)
def _launch_spec(
    B: int,
    T: int,
    Hq: int,
    Hkv: int,
    S_max: int,
    D: int,
    dtype: torch.dtype,
    device: torch.device,
    mask_kind: int,
    head_strides: tuple[int, int, int],
    config: LaunchConfig | None,
    page_size: int = 0,
    scale_kinds: tuple[int, int] = (0, 0),
    fp8_bits: int = 0,
) -> _LaunchSpec:
    """The cached launch of one (shapes, q's dtype, device, mask kind, head-dim strides, config, page
    size, scales) key; ``page_size`` 0 is a contiguous cache, ``S_max`` a paged one's table capacity.
    ``scale_kinds``: the K_SCALE and V_SCALE constexprs; ``fp8_bits``: KV_FP8_BITS. The plan is the one
    of a q-dtype cache (8-bit tiles take less shared memory, so its pipelining depth fits)."""
    G = Hq // Hkv
    sms = _num_sms(device)
    plan = plan_launch(B, Hkv, T, G, S_max, D, sms, config, dtype.itemsize)
    block_d = triton.next_power_of_2(D)
    constexprs = dict(
        sq_d=head_strides[0],
        sk_d=head_strides[1],
        sv_d=head_strides[2],
        MASK_KIND=mask_kind,
        SPLIT=plan.num_splits > 1,
        FP32_DOT=_dot_in_fp32(dtype, device),
        KV_TMA=plan.kv_tma,
        HEAD_DIM=D,
        EVEN_D=block_d == D,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_D=block_d,
        PAGE_SIZE=page_size,
        K_SCALE=scale_kinds[0],
        V_SCALE=scale_kinds[1],
        KV_FP8_BITS=fp8_bits,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    grid = (triton.cdiv(T * G, plan.block_m), B * Hkv, plan.num_splits)
    rows = B * T * Hq
    block_r = max(1, min(16, 2048 // block_d))
    combine_warps = 4 if block_r * block_d >= 1024 else 2
    combine = dict(HEAD_DIM=D, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=combine_warps)
    return _LaunchSpec(plan, grid, (triton.cdiv(rows, block_r),), constexprs, combine)


_MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's y (and z) dimension


def _check_int32_offsets(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, paged: bool) -> None:
    """Offsets inside one sequence's q rows or one (sequence, head) cache slice are int32 in the kernel;
    a slice spanning 2**31 elements or more would overflow them (a paged cache's are int64)."""
    spans = [("q", q, (1, 2, 3))]
    if not paged:
        spans += [("k_cache", k_cache, (2, 3)), ("v_cache", v_cache, (2, 3))]
    for name, t, dims in spans:
        span = sum((t.shape[i] - 1) * abs(t.stride(i)) for i in dims)
        if span > _INT32_MAX:
            raise ValueError(
                f"tree_attention: {name} {list(t.shape)} with strides {list(t.stride())} spans {span} "
                "elements per sequence/head, over the Triton kernel's int32 offsets"
            )


def _kv_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int) -> tuple:
    """Tensor descriptors over contiguous caches seen as ``[B * Hkv * S_max, D]``, tiles of
    ``[block_n, D]`` (LaunchConfig.kv_tma). Raises ValueError where the bulk copy cannot be used."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        raise ValueError(
            f"tree_attention: LaunchConfig(kv_tma=True) needs Triton >= 3.4 (tensor descriptors); "
            f"this is Triton {triton.__version__}"
        ) from None

    B, Hkv, S_max, D = k_cache.shape
    rows = B * Hkv * S_max
    problems = []
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        problems.append("k_cache and v_cache must be contiguous")
    if D & (D - 1) or D * k_cache.element_size() % 16:
        problems.append(f"the head dim {D} must be a power of two of 16-byte rows")
    if rows > _INT32_MAX:
        problems.append(f"B * Hkv * S_max = {rows} rows exceed int32 coordinates")
    if k_cache.is_cuda and torch.cuda.get_device_capability(k_cache.device) < (9, 0):
        problems.append("tensor-descriptor loads need compute capability 9.0+")
    if problems:
        raise ValueError("tree_attention: LaunchConfig(kv_tma=True): " + "; ".join(problems))
    return tuple(
        TensorDescriptor(c.view(rows, D), shape=[rows, D], strides=[D, 1], block_shape=[block_n, D])
        for c in (k_cache, v_cache)
    )


def _scale_argument(scale: float | torch.Tensor | None, placeholder: torch.Tensor) -> tuple[object, int]:
    """(kernel pointer argument, K_SCALE / V_SCALE kind) of a scale: a float goes by value (the
    ``placeholder`` tensor stands in for the pointer, never read), a tensor as a float32 pointer."""
    if scale is None:
        return placeholder, _kv_quant.NO_SCALE
    if isinstance(scale, float):
        return placeholder, _kv_quant.SCALE_VALUE
    flat = scale.reshape(-1).to(torch.float32).contiguous()  # (no copy for a float32 [1] or [Hkv])
    return flat, _kv_quant.SCALE_AT_PTR if flat.numel() == 1 else _kv_quant.SCALE_PER_HEAD


def _host_scale(scale: float | torch.Tensor | None, device: torch.device) -> float | torch.Tensor | None:
    """A one-value CPU scale of a CUDA call as a float (read on the host: no copy to the device, no
    sync), else the scale as it is."""
    if isinstance(scale, torch.Tensor) and scale.device.type == "cpu" and device.type != "cpu":
        return float(scale)
    return scale


# Tests set this to run the bit-level float8_e4m3fn conversion of pre-sm_89 GPUs on any GPU.
_FORCE_SOFT_E4M3 = False


def _fp8_bits(cache: torch.Tensor, q_dtype: torch.dtype = torch.float16) -> int:
    """The KV_FP8_BITS constexpr: whether fp8 tiles are loaded as bytes and converted in the kernel's
    integer code (:func:`_kv_to_compute`). In the interpreter (CPU tensors) always: Triton 3.9's own
    conversions there read e4m3's NaN bytes as +-480 and round e5m2's subnormals. On CUDA float8_e4m3fn
    before sm_89, where Triton has no e4m3 type, and float8_e5m2 into bfloat16, which Triton 3.9 does
    by a shift and a multiply by 2**112 that turns inf / NaN bytes into finite values (PTX for sm_80,
    sm_89 and sm_90, found in review). Elsewhere the hardware's conversion. 1: e4m3fn bytes, 2: e5m2
    bytes, 0: the tile's own dtype."""
    code = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}.get(cache.dtype, 0)
    device = cache.device
    if code == 0 or device.type == "cpu":
        return code
    if code == 1 and (_FORCE_SOFT_E4M3 or (device.type == "cuda" and _capability(device) < (8, 9))):
        return 1
    if code == 2 and q_dtype == torch.bfloat16:
        return 2
    return 0


@functools.lru_cache(maxsize=16)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _launch(kernel, grid, *args, **constexprs) -> None:
    """The one place that launches a Triton kernel (tests replace it to time the host path alone)."""
    kernel[grid](*args, **constexprs)


@launches_on_input_device
def _tree_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor | None,
    sm_scale: float,
    config: LaunchConfig | None = None,
    out: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the Triton kernels; ``config`` overrides the shape heuristic (sweeps, tests).

    With ``block_table`` ``[B, max_blocks]`` the caches are paged, ``[num_blocks, page_size, Hkv, D]``
    (``paged_tree_attention``), else ``[B, Hkv, S_max, D]``. The caches may be 8-bit with scales
    (checked by the caller): a float scale, or a one-value CPU tensor of a CUDA call, is passed by
    value; a tensor on q's device (one value or ``[Hkv]``) is read by the kernel.
    Returns a new contiguous ``[B, T, Hq, D]`` tensor in q's dtype, or ``out`` (checked by the
    caller) written in place: by the kernels when contiguous, else by a copy. No host synchronisation.
    """
    if out is not None and not out.is_contiguous():
        return out.copy_(
            _tree_attention_triton(
                q,
                k_cache,
                v_cache,
                cache_seqlens,
                tree_mask,
                sm_scale,
                config,
                block_table=block_table,
                k_scale=k_scale,
                v_scale=v_scale,
            )
        )
    if q.dtype == torch.float64:
        raise TypeError("tree_attention: the Triton kernel supports fp32/fp16/bf16, not float64")
    k_scale, v_scale = _host_scale(k_scale, q.device), _host_scale(v_scale, q.device)
    if isinstance(k_scale, float):  # s_k > 0 folds into the softmax scale: q (s_k k)^T c = q k^T (s_k c)
        sm_scale, k_scale = sm_scale * k_scale, None
    if sm_scale < 0:  # the kernel's row maxima are of unscaled scores, which needs a positive scale;
        q, sm_scale = -q, -sm_scale  # (-q) k^T * -c == q k^T * c exactly (negation is exact)
    B, T, Hq, D = q.shape
    paged = block_table is not None
    Hkv = k_cache.shape[2 if paged else 1]
    if B * Hkv > _MAX_GRID_Y:  # the grid's y is B * Hkv: past CUDA's limit, the batch in chunks
        step = _MAX_GRID_Y // Hkv
        chunks = [
            _tree_attention_triton(
                q[b : b + step],
                k_cache if paged else k_cache[b : b + step],
                v_cache if paged else v_cache[b : b + step],
                cache_seqlens[b : b + step],
                None if tree_mask is None else tree_mask[b : b + step],
                sm_scale,
                config,
                None if out is None else out[b : b + step],
                None if block_table is None else block_table[b : b + step],
                k_scale,
                v_scale,
            )
            for b in range(0, B, step)
        ]
        return out if out is not None else torch.cat(chunks)
    if out is None:
        out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    if B * T * Hq == 0:
        return out
    kind = _mask_kind(tree_mask)
    page_size = k_cache.shape[1] if paged else 0
    S_max = block_table.shape[1] * page_size if paged else k_cache.shape[2]
    head_strides = (q.stride(3), k_cache.stride(3), v_cache.stride(3))
    (k_scale_arg, k_kind), (v_scale_arg, v_kind) = (
        _scale_argument(k_scale, cache_seqlens),
        _scale_argument(v_scale, cache_seqlens),
    )
    fp8_bits = _fp8_bits(k_cache, q.dtype)
    if fp8_bits:  # the kernel converts the bytes itself
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    spec = _launch_spec(
        B,
        T,
        Hq,
        Hkv,
        S_max,
        D,
        q.dtype,
        q.device,
        kind,
        head_strides,
        config,
        page_size,
        (k_kind, v_kind),
        fp8_bits,
    )
    if kind == BOOL_MASK:
        mask, mask_strides = tree_mask.view(torch.uint8), tree_mask.stride()
    elif kind == CAUSAL:
        mask, mask_strides = cache_seqlens, (0, 0, 0)  # never read
    else:
        mask, mask_strides = tree_mask, tree_mask.stride()
    split = spec.plan.num_splits > 1
    if split:
        part = torch.empty(spec.plan.num_splits, B, T, Hq, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(spec.plan.num_splits, B, T, Hq, dtype=torch.float32, device=q.device)
    else:
        part, lse = out, out  # lse is not written without SPLIT
    sq, sk, sv = q.stride(), k_cache.stride(), v_cache.stride()
    if paged:  # the kernel's (sequence, head, position) strides are (block, head, slot) here
        sk, sv = (sk[0], sk[2], sk[1], sk[3]), (sv[0], sv[2], sv[1], sv[3])
        table, table_strides, num_blocks = block_table, block_table.stride(), k_cache.shape[0]
    else:
        table, table_strides, num_blocks = cache_seqlens, (0, 0), 0  # never read
    span_s = 0 if paged else S_max * max(sk[2], sv[2])
    if max(T * sq[1] + Hq * sq[2], span_s) + D * max(sq[3], sk[3], sv[3]) > _INT32_MAX:
        _check_int32_offsets(q, k_cache, v_cache, paged)  # the precise check, only near the limit
    k_desc = v_desc = None
    if spec.plan.kv_tma:
        if paged:
            raise ValueError("paged_tree_attention: LaunchConfig(kv_tma=True) needs a contiguous cache")
        k_desc, v_desc = _kv_descriptors(k_cache, v_cache, spec.plan.block_n)
    _launch(
        _tree_attention_kernel,
        spec.grid,
        q,
        k_cache,
        v_cache,
        k_desc,
        v_desc,
        part,
        lse,
        cache_seqlens.contiguous(),  # read as b-th element: a strided view would give other lengths
        mask,
        table,
        k_scale_arg,
        v_scale_arg,
        sm_scale * LOG2E,
        float(v_scale) if v_kind == _kv_quant.SCALE_VALUE else 1.0,
        B,
        T,
        Hq // Hkv,
        Hkv,
        spec.plan.chunk,
        sq[0],
        sq[1],
        sq[2],
        sk[0],
        sk[1],
        sk[2],
        sv[0],
        sv[1],
        sv[2],
        *mask_strides,
        *table_strides,
        num_blocks,
        S_max,
        **spec.constexprs,
    )
    if split:
        _launch(
            _combine_splits_kernel,
            spec.combine_grid,
            part,
            lse,
            out,
            spec.plan.num_splits,
            B * T * Hq,
            **spec.combine_constexprs,
        )
    return out


# --------------------------------------------------------------------------------------------------
# Registered op and dispatch
# --------------------------------------------------------------------------------------------------
def _run_tree_attention(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    tree_mask,
    sm_scale: float,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op's body: value checks where due, then the backend chosen for q's device; the result in
    ``out`` when given (the Triton kernels write it directly when it is contiguous)."""
    tree_mask = _packed_rows_trimmed(tree_mask, q.shape[1])  # (for direct torch.ops calls too)
    backend = select_backend(OP, q.device)
    if backend == "triton" and q.dtype == torch.float64 and forced_backend() != "triton":
        backend = "torch"  # float64 on CUDA: only the reference handles it
    scaled = k_scale is not None or v_scale is not None
    # The C++ kernel checks the lengths itself (same message); elsewhere check on CPU, and on CUDA only
    # in debug mode (a host sync). int64 lengths (SGLang's seq_lens) are checked before they are
    # narrowed to the kernels' int32, where a length past 2**31 would wrap.
    wide = cache_seqlens.dtype == torch.int64
    if (backend != "cpp" or wide) and (q.device.type == "cpu" or debug_checks_enabled()):
        _check_values(cache_seqlens, q.shape[1], k_cache.shape[2])
    if scaled:
        _kv_quant.check_scale_values(k_scale, v_scale, debug_checks_enabled())
    if wide:
        cache_seqlens = cache_seqlens.to(torch.int32)
    args = (q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale)
    if backend == "triton":
        return _tree_attention_triton(*args, out=out, k_scale=k_scale, v_scale=v_scale)
    if backend in ("cpp", "cuda"):
        if scaled or k_cache.dtype != q.dtype:
            result = _dequantized_cpp(
                q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale, k_scale, v_scale
            )
        else:
            result = _ext.op(OP)(*args)
    else:
        result = tree_attention_ref(*args, k_scale=k_scale, v_scale=v_scale)
    return result if out is None else out.copy_(result)


def _dequantized_cpp(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale, k_scale, v_scale):
    """8-bit (or scaled) caches on the C++ backend: the kernel that converts each block of keys as it
    reads it, else (a scaled cache in q's dtype) each sequence's positions up to its last new token
    dequantized into q's dtype (``_kv_quant.dequantize``), then the C++ kernel. Lengths checked."""
    fused = _kv_quant.cpu_attention(
        q, k_cache, v_cache, None, cache_seqlens, tree_mask, sm_scale, k_scale, v_scale
    )
    if fused is not None:  # (the C++ op checks the lengths itself)
        return fused
    _check_values(cache_seqlens, q.shape[1], k_cache.shape[2])  # before the lengths size the copies
    lengths = cache_seqlens.to(torch.int64) + q.shape[1]
    k = _kv_quant.dequantize(k_cache, k_scale, q.dtype, lengths)
    v = _kv_quant.dequantize(v_cache, v_scale, q.dtype, lengths)
    return _ext.op(OP)(q, k, v, cache_seqlens, tree_mask, sm_scale)


@torch.library.custom_op("eagle::tree_attention", mutates_args=())
def _tree_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor | None,
    sm_scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    # The public function checked these already (a cache hit here); a direct torch.ops call or a
    # compiled graph reaches the kernels only through this check.
    _check_args(q, k_cache, v_cache, cache_seqlens, tree_mask, k_scale, v_scale)
    return _run_tree_attention(
        q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale, k_scale=k_scale, v_scale=v_scale
    )


@_tree_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale, k_scale=None, v_scale=None):
    return q.new_empty(q.shape)


def _tree_attention_setup_context(ctx, inputs, output) -> None:
    q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale, k_scale, v_scale = inputs
    ctx.save_for_backward(q, k_cache, v_cache, cache_seqlens, tree_mask, k_scale, v_scale)
    ctx.sm_scale = sm_scale


def _tree_attention_backward(ctx, grad: torch.Tensor):
    """Gradients for q, k_cache and v_cache by differentiating :func:`tree_attention_ref` (recomputed
    from the saved inputs; it materialises the [B, Hq, T, S_max] scores: a training-time path, e.g.
    EAGLE-3's training-time test, not a fast one). The cache's positions a query never sees get 0."""
    q, k_cache, v_cache, cache_seqlens, tree_mask, k_scale, v_scale = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if tree_mask is not None:
        tree_mask = _packed_rows_trimmed(tree_mask, q.shape[1])
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k_cache, v_cache), need)]
        out = tree_attention_ref(*leaves, cache_seqlens, tree_mask, ctx.sm_scale, k_scale, v_scale)
        grads = iter(torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad))
    return (*(next(grads) if n else None for n in need), None, None, None, None, None)


_tree_attention_op.register_autograd(_tree_attention_backward, setup_context=_tree_attention_setup_context)


@torch.library.custom_op("eagle::tree_attention_out", mutates_args=("out",))
def _tree_attention_out_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor | None,
    sm_scale: float,
    out: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """:func:`tree_attention` into a preallocated ``out`` ``[B, T, Hq, D]`` (q's dtype and device)."""
    _check_args(q, k_cache, v_cache, cache_seqlens, tree_mask, k_scale, v_scale)
    _check_out(out, q, k_cache, v_cache)
    _run_tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale, out, k_scale, v_scale)


@_tree_attention_out_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale, out, k_scale=None, v_scale=None):
    return None


def _check_out(out, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """``out`` must be q's shape, dtype and device and share no memory with q or the caches."""
    check_tensor("out", out, dtypes=(q.dtype,), device=q.device, shape=tuple(q.shape))
    check_out_buffer(out, {"q": q, "k_cache": k_cache, "v_cache": v_cache})


def _packed_mask_width(dtype: torch.dtype, T: int) -> int:
    """Words of a bit-packed mask row that hold ``T`` bits (bytes for uint8, words for int32)."""
    return -(-T // (8 if dtype == torch.uint8 else 32))


def _packed_rows_trimmed(tree_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """A bit-packed mask whose rows are wider than ``T`` bits need (SGLang's whole 1 / 2 / 4-byte
    words, a buffer sized for an engine's largest tree) as a view of the words the kernels read (the
    words past them hold only bits of columns >= T); any other mask unchanged."""
    if tree_mask is None or tree_mask.dtype == torch.bool or tree_mask.dim() != 3:
        return tree_mask
    need = _packed_mask_width(tree_mask.dtype, T)
    return tree_mask[..., :need] if tree_mask.shape[2] > need else tree_mask


def _check_mask(tree_mask: torch.Tensor, B: int, T: int, device: torch.device) -> None:
    dtypes = (torch.bool, torch.uint8, torch.int32)
    check_tensor("tree_mask", tree_mask, ndim=3, dtypes=dtypes, device=device)
    if tree_mask.dtype == torch.bool:
        if tuple(tree_mask.shape) != (B, T, T):
            raise ValueError(
                f"tree_mask (bool) must have shape [B, T, {T}] = [{B}, {T}, {T}] for q of B={B}, T={T}, "
                f"got {list(tree_mask.shape)}"
            )
        return
    fmt = {torch.uint8: "uint8 bit-packed", torch.int32: "int32 bit-packed"}[tree_mask.dtype]
    need = _packed_mask_width(tree_mask.dtype, T)
    if tuple(tree_mask.shape[:2]) != (B, T) or tree_mask.shape[2] < need:
        raise ValueError(
            f"tree_mask ({fmt}) must have shape [B, T, >= {need}] = [{B}, {T}, >= {need}] for q of "
            f"B={B}, T={T}, got {list(tree_mask.shape)}"
        )


def _check_args(q, k_cache, v_cache, cache_seqlens, tree_mask, k_scale=None, v_scale=None) -> None:
    """Shape/dtype/device checks (no value reads). A call whose signature (shapes, dtypes, devices,
    strides) already passed skips them: the signature is all they look at."""
    if k_scale is None and v_scale is None:  # (two arguments fewer to hash on the hot path)
        _CHECKED.run(_check_args_uncached, q, k_cache, v_cache, cache_seqlens, tree_mask)
    else:
        _CHECKED.run(_check_args_uncached, q, k_cache, v_cache, cache_seqlens, tree_mask, k_scale, v_scale)


_CHECKED = SignatureCache()


def _check_args_uncached(q, k_cache, v_cache, cache_seqlens, tree_mask, k_scale=None, v_scale=None) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, T, Hq, D = q.shape
    device = q.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=KV_DTYPES, device=device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=KV_DTYPES, device=device)
    _kv_quant.check_kv_dtypes(q, k_cache, v_cache)
    _kv_quant.check_scale("k_scale", k_scale, k_cache.shape[1], device)
    _kv_quant.check_scale("v_scale", v_scale, k_cache.shape[1], device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} must match")
    if k_cache.shape[0] != B:
        raise ValueError(f"k_cache must be [B, Hkv, S_max, D] with B={B} (from q), got {list(k_cache.shape)}")
    _check_heads(q, k_cache.shape[1], k_cache.shape[3])
    check_tensor("cache_seqlens", cache_seqlens, dtypes=INDEX_DTYPES, device=device, shape=(B,))
    if B > 0 and T > k_cache.shape[2]:  # (a shape check, so the unchecked kernels never meet it either)
        raise ValueError(f"T={T} new tokens cannot fit a cache of S_max={k_cache.shape[2]} positions")
    if tree_mask is not None:
        _check_mask(tree_mask, B, T, device)


def _check_heads(q: torch.Tensor, Hkv: int, D_kv: int) -> None:
    """q's head dim matches the caches' and is supported; its heads are a multiple of the kv heads."""
    Hq, D = q.shape[2], q.shape[3]
    if D_kv != D:
        raise ValueError(f"head dim mismatch: q has D={D}, k_cache/v_cache have D={D_kv}")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is outside the supported {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads Hq={Hq} must be a positive multiple of kv heads Hkv={Hkv} (GQA)")


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
    out: torch.Tensor | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``T`` new tokens per sequence over the committed prefix and the new tokens.

    Parameters
    ----------
    q : Tensor ``[B, T, Hq, D]``, float16 / bfloat16 / float32 (float64 on the CPU backends; on CUDA
        float64 runs the reference)
        Queries of the ``T`` new tokens of each sequence (a prefill chunk, one decode token, or the
        slots of a draft tree). Any strides.
    k_cache, v_cache : Tensor ``[B, Hkv, S_max, D]``, q's dtype, or an 8-bit KV cache: float8_e4m3fn,
        float8_e5m2 or int8 (both the same dtype; see ``k_scale``)
        Keys and values of the in-place cache, typically the strided views ``kv[layer, 0]`` and
        ``kv[layer, 1]`` of a ``[num_layers, 2, B, Hkv, S_max, D]`` buffer. Positions
        ``0 .. cache_seqlens[b] - 1`` hold the committed prefix; the new tokens' K/V are already
        written at ``cache_seqlens[b] + j``, ``j < T``. Positions after that are never read.
        ``Hq`` must be a multiple of ``Hkv`` (GQA: query head ``h`` uses kv head ``h // (Hq/Hkv)``);
        ``16 <= D <= 256``.
    cache_seqlens : Tensor ``[B]``, int32 or int64
        Committed length of each sequence (ragged). ``cache_seqlens[b] + T <= S_max``. int64 (SGLang's
        ``seq_lens``) costs one narrowing copy to the kernels' int32.
    tree_mask : Tensor, optional
        Which new tokens each new token sees (the committed prefix is always visible). None: causal,
        token ``i`` sees ``j <= i``. Otherwise, by dtype: bool ``[B, T, T]`` (``[b, i, j]`` true: i
        sees j); uint8 ``[B, T, W >= ceil(T/8)]`` bit-packed rows, bit ``j % 8`` of byte ``j // 8``
        (SGLang's ``QLEN_ONLY_BITPACKING``, here for any ``T``; SGLang's per-row uint16/uint32 words
        viewed as uint8, e.g. ``build_tree``'s ``qlen_bits_u8`` rows of 4 bytes for 17 <= T <= 24);
        int32 ``[B, T, W >= ceil(T/32)]``, bit ``j % 32`` of word ``j // 32`` (TensorRT-LLM, whose
        buffers are sized for the largest tree). Bytes / words past ``ceil(T/8)`` / ``ceil(T/32)`` are
        never read. See :func:`pack_tree_mask`.
    sm_scale : float, optional
        Softmax scale; default ``D ** -0.5``.
    out : Tensor ``[B, T, Hq, D]``, optional
        q's dtype and device, sharing no memory with q or the caches: the result is written into it
        and it is returned (an engine's preallocated output, e.g. a view of ``[num_tokens, Hq * D]``).
        Any strides; a contiguous ``out`` is written by the CUDA kernels directly. Not with autograd.
    k_scale, v_scale : float or Tensor, optional
        Dequantization scales of an 8-bit cache (vLLM's and SGLang's ``k_scale`` / ``v_scale``): the
        keys are ``k_cache * k_scale`` and the values ``v_cache * v_scale``. A float, or a floating
        tensor holding one value (``[]`` / ``[1]``) or one per kv head (``[Hkv]``) on q's device (a
        one-value scale may also be a CPU tensor: it is read on the host). Finite and > 0 (checked for
        floats and CPU tensors; on CUDA in debug mode). None: 1 (e.g. vLLM's ``fp8_e5m2``). The
        Triton kernel converts each 8-bit tile to q's dtype, which is exact, and folds the scales into
        the softmax scale and the output; float8_e4m3fn on GPUs before sm_89 (A100) is converted in
        the kernel's integer code. On CPU the C++ kernel converts each block of keys into q's dtype
        as it reads it (``stored * scale`` rounded once: the result is the kernel's on the dequantized
        cache, bit for bit; with float16 q, in float32 where ``stored * scale`` could pass 65504); a
        scaled cache in q's dtype is dequantized first. A float or CPU scale is read when the
        call runs (inside a CUDA graph: its value at capture); a tensor on q's device is read by the
        kernel (vLLM's ``layer._k_scale``). No gradient flows into the scales (one that requires grad
        is refused). vLLM allocates fp8 caches as uint8: pass ``cache.view(torch.float8_e4m3fn)``.

    Returns
    -------
    Tensor ``[B, T, Hq, D]``, q's dtype, contiguous (or ``out``): ``softmax(q k^T * sm_scale) v`` over the visible
    keys, accumulated in fp32 (fp64 for fp64 inputs). A query that sees no key at all (empty prefix
    and an all-false mask row) gets zeros. NaN/inf in the K or V of a key reach exactly the rows that
    see that key (a new token's key with a non-finite V makes them NaN); a scaled score that
    overflows float32 makes its row NaN. On Triton a row whose scaled scores reach about
    2**31 in magnitude (log2 units) comes out NaN: its ``s * scale - max`` is one fused multiply-add,
    which keeps the max's rounding error, and 2**-24 of that is past exp2's range. The kernels sum
    ``p * v`` before dividing by the row's sum (flash-attention style), so V values within a factor of
    the number of visible keys of the accumulator's largest finite value (|v| near 1e38 in float32 or
    bfloat16) can overflow to inf where the reference, which normalises first, stays finite.

    Backends: Triton on CUDA tensors (flash-attention style, with a split-prefix flash-decoding
    variant chosen by :func:`plan_launch`); the C++ kernel on CPU tensors when the extension is
    built, else :func:`tree_attention_ref`. Differentiable in q, k_cache and v_cache: the backward
    differentiates the reference (recomputed; memory ``[B, Hq, T, S_max]``), for training, not speed.
    """
    if k_scale is None and v_scale is None and out is None:  # the hot path, as it was before scales
        _check_args(q, k_cache, v_cache, cache_seqlens, tree_mask)
        scale = q.shape[3] ** -0.5 if sm_scale is None else float(sm_scale)
        if eager_fast_path(q, k_cache, v_cache, cache_seqlens, tree_mask):
            return _run_tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, scale)
        return torch.ops.eagle.tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, scale)
    args, scales = (q, k_cache, v_cache, cache_seqlens, tree_mask), _kv_quant.scale_args(k_scale, v_scale)
    _check_args(*args, *scales)
    scale = q.shape[3] ** -0.5 if sm_scale is None else float(sm_scale)
    if out is not None:
        _check_out(out, q, k_cache, v_cache)
        if eager_fast_path(*args, out, *scales):
            return _run_tree_attention(*args, scale, out, *scales)
        torch.ops.eagle.tree_attention_out(*args, scale, out, *scales)
        return out
    if eager_fast_path(*args, *scales):
        return _run_tree_attention(*args, scale, None, *scales)
    return torch.ops.eagle.tree_attention(*args, scale, *scales)
