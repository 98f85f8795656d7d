"""Tree attention over a paged KV cache: :func:`tree_attention`'s op with a block table.

Serving stacks keep K/V in fixed-size blocks (pages) shared by all sequences and give each sequence a
row of block ids. Here sequence ``b``'s cache position ``p`` is slot ``p % page_size`` of block
``block_table[b, p // page_size]`` of ``k_cache`` / ``v_cache`` ``[num_blocks, page_size, Hkv, D]``.
Everything else (queries, ``cache_seqlens``, the three mask formats, GQA, the outputs and their
NaN rules) is :func:`eagle_kernels.tree_attention`'s.

The caches may have any strides, so the common layouts are views, not copies:

* vLLM: a layer's cache as its attention backend's ``get_kv_cache_shape`` lays it out. FlashAttention's
  ``[2, num_blocks, block_size, Hkv, D]``: ``kv_cache[0]``, ``kv_cache[1]``; the Triton and
  FlashInfer backends' ``[num_blocks, 2, block_size, Hkv, D]``: ``kv_cache[:, 0]``, ``kv_cache[:, 1]``
  (``kv_cache[0]`` of that one is block 0's K and V, which reads as a two-block pool: a table of
  ids 0 and 1 would pass every check). vLLM's ``block_table`` as is, and its ``seq_lens`` minus the
  ``T`` new tokens as ``cache_seqlens`` (vLLM counts the new tokens in, this op does not);
* FlashInfer ``NHD`` ``[num_pages, 2, page_size, H, D]``: ``kv[:, 0]``, ``kv[:, 1]``; ``HND``
  ``[num_pages, 2, H, page_size, D]``: ``kv[:, 0].transpose(1, 2)``. FlashInfer's
  ``(kv_indptr, kv_indices)`` page lists become a table with :func:`block_table_from_page_lists`;
* TensorRT-LLM ``[num_blocks, 2, Hkv, tokens_per_block, D]``: ``kv[:, 0].transpose(1, 2)``;
* SGLang's token pool (page size 1): ``k_buffer[:, None]`` with ``req_to_token`` rows as the table.

Backends: Triton on CUDA (the contiguous op's kernel, which reads each key tile's block ids from the
table: no copy of the cache). On CPU the C++ kernel (``csrc/cpu/tree_attention.cpp``) runs the
contiguous kernel's code on each block of 128 keys of a task, read in place where it lies in one page
(pages of 128 or a multiple), else gathered into scratch just before it is read, so its output is
:func:`tree_attention`'s bit for bit. ``bench/bench_paged_tree_attention.py`` on one core
(``bench/results/bench_paged_cpu_zen4_s34.json``) gives 1.00-1.38x the contiguous op's time for trees of
6-60 tokens and a 128-token prefill; a one-token decode, which only streams the cache, 1.18x / 1.37x at
batch 1 / 16 with pages of 128 whose rows of a head are adjacent, and 2.0-4.4x with small pages or
vLLM's token-major rows. The reference
:func:`paged_tree_attention_ref` gathers every sequence's pages into a contiguous cache and runs
:func:`tree_attention_ref`.
"""

from __future__ import annotations

import torch

from eagle_kernels import _ext, _kv_quant
from eagle_kernels._backend import debug_checks_enabled, eager_fast_path, forced_backend, select_backend
from eagle_kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    SignatureCache,
    check_block_ids,
    check_tensor,
    python_value_checks_due,
)
from eagle_kernels._kv_quant import KV_DTYPES
from eagle_kernels.tree_attention import (
    _check_heads,
    _check_mask,
    _check_out,
    _packed_rows_trimmed,
    _tree_attention_triton,
    tree_attention_ref,
)

OP = "paged_tree_attention"


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The first ``lengths[b]`` positions of each sequence's paged cache as a contiguous-per-sequence
    tensor.

    ``cache``: ``[num_blocks, page_size, Hkv, D]``; ``block_table``: int ``[B, max_blocks]``;
    ``lengths``: int ``[B]``, positions to read per sequence (at most ``max_blocks * page_size``).
    Returns ``[B, Hkv, S, D]`` in the cache's dtype, a view of one gathered copy, with
    ``S = max_blocks * page_size`` on CUDA (no host sync) and the pages the longest sequence needs on
    CPU. Positions ``>= lengths[b]`` hold block 0's data (table entries past a sequence's pages are
    never used as indices, whatever they hold).
    """
    page = cache.shape[1]
    B, max_blocks = block_table.shape
    lengths = lengths.to(torch.int64)
    if cache.device.type == "cpu" and B > 0:  # on CPU reading the longest costs no sync
        max_blocks = min(max_blocks, -(-int(lengths.max()) // page))
    pages_needed = (lengths + page - 1) // page  # [B]
    cols = torch.arange(max_blocks, device=block_table.device)
    used = cols[None, :] < pages_needed[:, None]
    # (ids outside the pool are clamped into it, as the Triton kernel does: on CUDA they are checked
    # only in debug mode, and an index past the tensor would be a device-side assert)
    ids = torch.where(used, block_table[:, :max_blocks].to(torch.int64), 0).clamp(0, cache.shape[0] - 1)
    gathered = cache[ids]  # [B, max_blocks, page, Hkv, D]
    return gathered.permute(0, 3, 1, 2, 4).flatten(2, 3)  # a view: blocks then slots are one axis


def paged_tree_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch definition of the op (see :func:`paged_tree_attention`): the pages each sequence reads
    gathered into a contiguous cache, then :func:`tree_attention_ref` (with the 8-bit caches' scales)."""
    T = q.shape[1]
    lengths = cache_seqlens.to(torch.int64) + T
    k = gather_pages(k_cache, block_table, lengths)
    v = gather_pages(v_cache, block_table, lengths)
    mask = _packed_rows_trimmed(tree_mask, T)
    return tree_attention_ref(q, k, v, cache_seqlens, mask, sm_scale, k_scale, v_scale)


def block_table_from_page_lists(
    page_indptr: torch.Tensor, page_indices: torch.Tensor, max_blocks: int, *, pad: int = -1
) -> torch.Tensor:
    """A ``[B, max_blocks]`` block table from ragged page lists (FlashInfer's ``kv_indptr`` /
    ``kv_indices``, SGLang's ``kv_indptr`` / ``kv_indices``): row ``b`` holds
    ``page_indices[page_indptr[b] : page_indptr[b + 1]]``, then ``pad``.

    ``page_indptr``: int32/int64 ``[B + 1]``, non-decreasing from 0; ``page_indices``: int32/int64
    ``[nnz]``; ``max_blocks``: the table's width, at least the longest list (a sequence's pages past it
    would be dropped: on CPU that is checked, on CUDA it is not, since it would need a host sync).
    Returns ``page_indices``' dtype, on its device; no host sync on CUDA.
    """
    check_tensor("page_indptr", page_indptr, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor("page_indices", page_indices, ndim=1, dtypes=INDEX_DTYPES, device=page_indptr.device)
    if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 0:
        raise ValueError(f"max_blocks must be an int >= 0, got {max_blocks!r}")
    if page_indptr.numel() == 0:
        raise ValueError("page_indptr must have B + 1 >= 1 entries")
    starts, ends = page_indptr[:-1].to(torch.int64), page_indptr[1:].to(torch.int64)
    if page_indptr.device.type == "cpu" or debug_checks_enabled():
        counts = ends - starts
        if (
            int(page_indptr[0]) != 0
            or bool((counts < 0).any())
            or int(page_indptr[-1]) > page_indices.numel()
        ):
            raise ValueError(
                f"page_indptr must rise from 0 to at most len(page_indices)={page_indices.numel()}, "
                f"got {page_indptr.tolist()}"
            )
        if counts.numel() and int(counts.max()) > max_blocks:
            raise ValueError(f"a sequence has {int(counts.max())} pages, more than max_blocks={max_blocks}")
    cols = torch.arange(max_blocks, device=page_indptr.device)
    position = starts[:, None] + cols[None, :]
    held = position < ends[:, None]
    if page_indices.numel() == 0:
        return torch.full(position.shape, pad, dtype=page_indices.dtype, device=page_indices.device)
    ids = page_indices[position.clamp(max=page_indices.numel() - 1)]
    return torch.where(held, ids, torch.full_like(ids, pad))


# --------------------------------------------------------------------------------------------------
# Dispatch and registered ops
# --------------------------------------------------------------------------------------------------
def _check_values(block_table: torch.Tensor, cache_seqlens: torch.Tensor, T: int, page: int, num_blocks: int):
    """Lengths and the block ids each sequence reads; they read values, so on CUDA only in debug mode."""
    B, max_blocks = block_table.shape
    if B == 0:
        return
    lengths = cache_seqlens.to(torch.int64).cpu()
    capacity = max_blocks * page
    if bool((lengths < 0).any()) or bool((lengths + T > capacity).any()):
        raise ValueError(
            f"cache_seqlens must be >= 0 and cache_seqlens + T (T={T}) must fit the block table's "
            f"{max_blocks} blocks of {page} positions ({capacity}), got min {int(lengths.min())}, "
            f"max {int(lengths.max())}"
        )
    check_block_ids(block_table, (lengths + T + page - 1) // page, num_blocks, " reads")


def _run_paged_tree_attention(
    q,
    k_cache,
    v_cache,
    block_table,
    cache_seqlens,
    tree_mask,
    sm_scale: float,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op's body: value checks where due (the C++ kernel checks its own), then the backend chosen
    for q's device; the result in ``out`` when given (Triton writes a contiguous one directly)."""
    T = q.shape[1]
    tree_mask = _packed_rows_trimmed(tree_mask, T)
    backend = select_backend(OP, q.device)
    if backend == "triton" and q.dtype == torch.float64 and forced_backend() != "triton":
        backend = "torch"  # float64 on CUDA: only the reference handles it
    # int64 lengths are checked before they are narrowed to the kernels' int32
    # (the C++ kernel checks int32 lengths itself: int64 ones need the check only where narrowing would
    # change them)
    wide = cache_seqlens.dtype == torch.int64
    debug = debug_checks_enabled()
    scaled = k_scale is not None or v_scale is not None
    quantized = scaled or k_cache.dtype != q.dtype
    if python_value_checks_due(backend, q.device, cache_seqlens, debug):
        _check_values(block_table, cache_seqlens, T, k_cache.shape[1], k_cache.shape[0])
    if scaled:
        _kv_quant.check_scale_values(k_scale, v_scale, debug)
    seqlens = cache_seqlens.to(torch.int32) if wide else cache_seqlens
    if backend == "triton":
        return _tree_attention_triton(
            q,
            k_cache,
            v_cache,
            seqlens,
            tree_mask,
            sm_scale,
            out=out,
            block_table=block_table,
            k_scale=k_scale,
            v_scale=v_scale,
        )
    if backend == "cpp" and quantized:
        result = _dequantized_cpp(
            q, k_cache, v_cache, block_table, seqlens, tree_mask, sm_scale, k_scale, v_scale
        )
    elif backend == "cpp":
        result = _ext.op(OP)(q, k_cache, v_cache, block_table, seqlens, tree_mask, sm_scale)
    else:
        result = paged_tree_attention_ref(
            q, k_cache, v_cache, block_table, cache_seqlens, tree_mask, sm_scale, k_scale, v_scale
        )
    return result if out is None else out.copy_(result)


def _dequantized_cpp(q, k_cache, v_cache, block_table, cache_seqlens, tree_mask, sm_scale, k_scale, v_scale):
    """8-bit (or scaled) paged caches on the C++ backend: the kernel that converts each block of keys as
    it reads it, else each sequence's pages up to its last new token gathered and dequantized into q's
    dtype, then the contiguous C++ kernel. Values checked before."""
    fused = _kv_quant.cpu_attention(
        q, k_cache, v_cache, block_table, cache_seqlens, tree_mask, sm_scale, k_scale, v_scale
    )
    if fused is not None:  # (the C++ op checks the lengths and block ids itself)
        return fused
    _check_values(block_table, cache_seqlens, q.shape[1], k_cache.shape[1], k_cache.shape[0])
    lengths = cache_seqlens.to(torch.int64) + q.shape[1]
    k = _kv_quant.dequantize(gather_pages(k_cache, block_table, lengths), k_scale, q.dtype, lengths)
    v = _kv_quant.dequantize(gather_pages(v_cache, block_table, lengths), v_scale, q.dtype, lengths)
    return _ext.op("tree_attention")(q, k, v, cache_seqlens, tree_mask, sm_scale)


@torch.library.custom_op("eagle::paged_tree_attention", mutates_args=())
def _paged_tree_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor | None,
    sm_scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    args = (q, k_cache, v_cache, block_table, cache_seqlens, tree_mask)
    _check_args(*args, k_scale, v_scale)
    return _run_paged_tree_attention(*args, sm_scale, k_scale=k_scale, v_scale=v_scale)


@_paged_tree_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, cache_seqlens, tree_mask, sm_scale, k_scale=None, v_scale=None):
    return q.new_empty(q.shape)


@torch.library.custom_op("eagle::paged_tree_attention_out", mutates_args=("out",))
def _paged_tree_attention_out_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor | None,
    sm_scale: float,
    out: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """:func:`paged_tree_attention` into a preallocated ``out`` ``[B, T, Hq, D]``."""
    args = (q, k_cache, v_cache, block_table, cache_seqlens, tree_mask)
    _check_args(*args, k_scale, v_scale)
    _check_out(out, q, k_cache, v_cache)
    _run_paged_tree_attention(*args, sm_scale, out, k_scale, v_scale)


@_paged_tree_attention_out_op.register_fake
def _(q, k_cache, v_cache, block_table, cache_seqlens, tree_mask, sm_scale, out, k_scale=None, v_scale=None):
    return None


def _check_args(
    q, k_cache, v_cache, block_table, cache_seqlens, tree_mask, k_scale=None, v_scale=None
) -> None:
    """Shape/dtype/device checks (no value reads), skipped for a signature that already passed."""
    args = (q, k_cache, v_cache, block_table, cache_seqlens, tree_mask)
    if k_scale is None and v_scale is None:  # (two arguments fewer to hash on the hot path)
        _CHECKED.run(_check_args_uncached, *args)
    else:
        _CHECKED.run(_check_args_uncached, *args, k_scale, v_scale)


_CHECKED = SignatureCache()


def _check_args_uncached(
    q, k_cache, v_cache, block_table, cache_seqlens, tree_mask, k_scale=None, v_scale=None
) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, T = q.shape[:2]
    device = q.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=KV_DTYPES, device=device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=KV_DTYPES, device=device)
    _kv_quant.check_kv_dtypes(q, k_cache, v_cache)
    _kv_quant.check_scale("k_scale", k_scale, k_cache.shape[2], device)
    _kv_quant.check_scale("v_scale", v_scale, k_cache.shape[2], device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} must match")
    num_blocks, page = k_cache.shape[:2]
    if num_blocks == 0 or page == 0:
        raise ValueError(
            f"k_cache must be [num_blocks, page_size, Hkv, D] with at least one block of at least one "
            f"position, got {list(k_cache.shape)}"
        )
    _check_heads(q, k_cache.shape[2], k_cache.shape[3])
    check_tensor("block_table", block_table, ndim=2, dtypes=INDEX_DTYPES, device=device, shape=(B, None))
    check_tensor("cache_seqlens", cache_seqlens, dtypes=INDEX_DTYPES, device=device, shape=(B,))
    capacity = block_table.shape[1] * page
    if B > 0 and T > capacity:  # (a shape check, so the unchecked kernels never meet it either)
        raise ValueError(
            f"T={T} new tokens cannot fit the block table's {block_table.shape[1]} blocks of {page} positions"
        )
    if tree_mask is not None:
        _check_mask(tree_mask, B, T, device)


def paged_tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    *,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``T`` new tokens per sequence over a paged cache (block table).

    Parameters
    ----------
    q : Tensor ``[B, T, Hq, D]``, float16 / bfloat16 / float32 (float64 on CPU; on CUDA it runs the
        reference). Any strides.
    k_cache, v_cache : Tensor ``[num_blocks, page_size, Hkv, D]``, q's dtype or one 8-bit dtype
        (float8_e4m3fn, float8_e5m2, int8: vLLM's and SGLang's fp8 caches; see ``k_scale``), any strides
        The block pool (see the module docstring for vLLM's, FlashInfer's, TensorRT-LLM's and
        SGLang's layouts as views). Sequence ``b``'s position ``p`` is slot ``p % page_size`` of
        block ``block_table[b, p // page_size]``. Positions ``0 .. cache_seqlens[b] - 1`` hold the
        committed prefix, and the new tokens' K/V are already written at ``cache_seqlens[b] + j``,
        ``j < T``. Nothing past them is read. ``Hq`` a multiple of ``Hkv``; ``16 <= D <= 256``.
    block_table : Tensor ``[B, max_blocks]``, int32 or int64
        Block ids of each sequence's pages in order. Entries past the
        ``ceil((cache_seqlens[b] + T) / page_size)`` a sequence reads are never read (any value,
        e.g. -1 padding); the ones it reads must lie in ``[0, num_blocks)`` (checked on CPU and with
        ``EAGLE_KERNELS_DEBUG=1``; on CUDA otherwise an id outside is clamped into the pool, so it
        reads another block but never outside the cache). Blocks may be shared between sequences
        (a common prefix).
    cache_seqlens : Tensor ``[B]``, int32 or int64
        Committed length of each sequence, not counting the ``T`` new tokens;
        ``cache_seqlens[b] + T <= max_blocks * page_size``.
    tree_mask : Tensor, optional
        As :func:`tree_attention`: None (causal), bool ``[B, T, T]``, or bit-packed uint8 / int32 rows.
    sm_scale : float, optional
        Softmax scale; default ``D ** -0.5``.
    out : Tensor ``[B, T, Hq, D]``, optional
        q's dtype and device, sharing no memory with q or the caches: the result is written into it
        and returned.
    k_scale, v_scale : float or Tensor, optional
        Dequantization scales of an 8-bit cache, as :func:`tree_attention`'s: a float, or one value
        (``[]`` / ``[1]``) or one per kv head (``[Hkv]``) on q's device (one value may be on the CPU).
        The keys are ``k_cache * k_scale``, the values ``v_cache * v_scale``. On CPU the C++ kernel
        converts each block of keys as it reads it through the table (a scaled cache in q's dtype is
        gathered and dequantized first).

    Returns
    -------
    Tensor ``[B, T, Hq, D]``, q's dtype (or ``out``): what :func:`tree_attention` returns for the
    same keys and values laid out contiguously, within the Triton kernel's rounding (on CPU the
    contiguous op runs on the gathered pages, so it is that op's result bit for bit). Not
    differentiable (use :func:`tree_attention` for training).
    """
    args = (q, k_cache, v_cache, block_table, cache_seqlens, tree_mask)
    scales = _kv_quant.scale_args(k_scale, v_scale)
    _check_args(*args, *scales)
    scale = q.shape[3] ** -0.5 if sm_scale is None else float(sm_scale)
    if out is not None:
        _check_out(out, q, k_cache, v_cache)
        if eager_fast_path(*args, out, *scales):
            return _run_paged_tree_attention(*args, scale, out, *scales)
        torch.ops.eagle.paged_tree_attention_out(*args, scale, out, *scales)
        return out
    if eager_fast_path(*args, *scales):
        return _run_paged_tree_attention(*args, scale, None, *scales)
    return torch.ops.eagle.paged_tree_attention(*args, scale, *scales)
