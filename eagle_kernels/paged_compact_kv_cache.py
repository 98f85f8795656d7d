"""In-place KV-cache compaction after tree verification, in a paged cache (block table).

:func:`eagle_kernels.compact_kv_cache`'s op for caches kept in fixed-size blocks: after the target
verified a draft tree of ``n`` slots written at positions ``cache_seqlens[b] + s``, the accepted slot
``accept_index[b, j] - b*n`` moves to position ``cache_seqlens[b] + j``, for every layer, K and V and
kv head, where sequence ``b``'s position ``p`` is slot ``p % page_size`` of block
``block_table[b, p // page_size]``. This is SGLang's ``move_kv_cache`` step for page sizes above one
(its page-size-1 pools only remap ``req_to_token``), written for a block table.

Backends: Triton on CUDA (``compact_kv_cache``'s kernel, reading each row's block id from the table);
on CPU the C++ kernel (``csrc/cpu/compact_kv_cache.cpp``, the contiguous op's loop with the same
lookup); the reference :func:`paged_compact_kv_cache_ref` indexes in torch.
"""

from __future__ import annotations

import torch

from eagle_kernels import _ext
from eagle_kernels._backend import debug_checks_enabled, eager_fast_path, select_backend
from eagle_kernels._checks import (
    INDEX_DTYPES,
    SignatureCache,
    check_block_ids,
    check_tensor,
    python_value_checks_due,
)
from eagle_kernels.compact_kv_cache import _BITS_DTYPES, _as_bits, _compact_kv_cache_triton
from eagle_kernels.compact_kv_cache import _check_values as _check_path_values

OP = "paged_compact_kv_cache"


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def paged_compact_kv_cache_ref(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    num_draft_tokens: int,
) -> torch.Tensor:
    """PyTorch definition of the op (see :func:`paged_compact_kv_cache`); updates ``kv_cache`` in place.

    As in ``compact_kv_cache_ref``, gathering every accepted row before writing any equals copying in
    order j = 0, 1, ... (slots are strictly increasing, so slot_j >= j), and the padding columns copy
    a row onto itself. Positions map to (block, slot) through the table.
    """
    n = num_draft_tokens
    accept_index = accept_index[:, :n]  # a path holds at most n slots: wider columns are padding
    B, steps = accept_index.shape
    kv_cache = _as_bits(kv_cache)
    page = kv_cache.shape[3]
    device = kv_cache.device
    seqlens = cache_seqlens.to(torch.int64)[:, None]
    cols = torch.arange(steps, device=device)[None, :]
    valid = cols <= accept_token_num.to(torch.int64)[:, None]
    slots = accept_index.to(torch.int64) - torch.arange(B, device=device)[:, None] * n
    src = torch.where(valid, seqlens + slots, seqlens + cols)
    dst = seqlens + cols
    # ids and columns clamped into the pool and the table, as the Triton kernel does (see gather_pages)
    table = block_table.to(torch.int64).clamp(0, kv_cache.shape[2] - 1)
    last = table.shape[1] - 1
    src_block, dst_block = (table.gather(1, (pos // page).clamp(0, last)) for pos in (src, dst))
    kv_cache[:, :, dst_block, dst % page] = kv_cache[:, :, src_block, src % page]
    return cache_seqlens + accept_token_num.to(cache_seqlens.dtype) + 1


# --------------------------------------------------------------------------------------------------
# Dispatch and registered op
# --------------------------------------------------------------------------------------------------
def _check_values(kv_cache, block_table, cache_seqlens, accept_index, accept_token_num, n) -> None:
    """Index ranges (they read values: on CUDA only in debug mode): the path checks of
    ``compact_kv_cache`` over the table's capacity, and the block ids of the positions a tree covers."""
    num_blocks, page = kv_cache.shape[2], kv_cache.shape[3]
    max_blocks = block_table.shape[1]
    capacity = "the block table's capacity (max_blocks * page_size)"
    _check_path_values(max_blocks * page, cache_seqlens, accept_index, accept_token_num, n, capacity)
    pages = (cache_seqlens.to(torch.int64).cpu() + n + page - 1) // page
    check_block_ids(block_table, pages, num_blocks, "'s tree covers")


def _run_paged_compact_kv_cache(kv_cache, block_table, cache_seqlens, accept_index, accept_token_num, n):
    """The op's body: value checks where due (the C++ kernel checks its own), then the backend chosen
    for the cache's device."""
    args = (kv_cache, block_table, cache_seqlens, accept_index, accept_token_num, n)
    backend = select_backend(OP, kv_cache.device)
    # int64 lengths (SGLang's seq_lens) are checked before they are narrowed to the kernels' int32
    # (the C++ kernel checks int32 lengths itself: int64 ones need the check only where narrowing would
    # change them)
    wide = cache_seqlens.dtype == torch.int64
    if python_value_checks_due(backend, kv_cache.device, cache_seqlens, debug_checks_enabled()):
        _check_values(*args)
    if backend == "torch":
        return paged_compact_kv_cache_ref(*args)
    seqlens = cache_seqlens.to(torch.int32) if wide else cache_seqlens
    if backend == "cpp":
        new_lens = _ext.op(OP)(kv_cache, block_table, seqlens, accept_index, accept_token_num, n)
    else:
        new_lens = _compact_kv_cache_triton(kv_cache, seqlens, accept_index, accept_token_num, n, block_table)
    return new_lens.to(cache_seqlens.dtype)


@torch.library.custom_op("eagle::paged_compact_kv_cache", mutates_args=("kv_cache",))
def _paged_compact_kv_cache_op(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    num_draft_tokens: int,
) -> torch.Tensor:
    args = (kv_cache, block_table, cache_seqlens, accept_index, accept_token_num)
    _CHECKED.run(_check_args, *args, num_draft_tokens)
    return _run_paged_compact_kv_cache(*args, num_draft_tokens)


@_paged_compact_kv_cache_op.register_fake
def _(kv_cache, block_table, cache_seqlens, accept_index, accept_token_num, num_draft_tokens):
    return torch.empty_like(cache_seqlens)


def _check_args(
    kv_cache, block_table, cache_seqlens, accept_index, accept_token_num, num_draft_tokens
) -> None:
    """Shapes, dtypes, devices and ``num_draft_tokens`` (no value reads; cached per signature)."""
    check_tensor("kv_cache", kv_cache, ndim=6)
    if kv_cache.shape[1] != 2 or kv_cache.shape[2] == 0 or kv_cache.shape[3] == 0:
        raise ValueError(
            "kv_cache must be [num_layers, 2, num_blocks, page_size, Hkv, D] with at least one block of "
            f"at least one position, got {list(kv_cache.shape)}"
        )
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache's last (head) dimension must be contiguous")
    if kv_cache.element_size() not in _BITS_DTYPES:
        raise TypeError(f"kv_cache must have a dtype of 1, 2, 4 or 8 bytes, got {kv_cache.dtype}")
    device = kv_cache.device
    check_tensor("block_table", block_table, ndim=2, dtypes=INDEX_DTYPES, device=device)
    B = block_table.shape[0]
    check_tensor("cache_seqlens", cache_seqlens, dtypes=INDEX_DTYPES, device=device, shape=(B,))
    check_tensor("accept_index", accept_index, ndim=2, dtypes=INDEX_DTYPES, device=device, shape=(B, None))
    check_tensor("accept_token_num", accept_token_num, dtypes=INDEX_DTYPES, device=device, shape=(B,))
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int):
        raise TypeError(
            f"num_draft_tokens must be an int, got {type(num_draft_tokens).__name__} {num_draft_tokens!r}"
        )
    capacity = block_table.shape[1] * kv_cache.shape[3]
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens={num_draft_tokens} must be >= 1")
    if num_draft_tokens > capacity:
        raise ValueError(
            f"num_draft_tokens={num_draft_tokens} exceeds the block table's {block_table.shape[1]} blocks "
            f"of {kv_cache.shape[3]} positions"
        )
    if accept_index.shape[1] == 0:
        raise ValueError("accept_index must have at least one column (the root)")


_CHECKED = SignatureCache()


def paged_compact_kv_cache(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    *,
    num_draft_tokens: int,
) -> torch.Tensor:
    """Move the accepted tree slots of every layer's K/V into contiguous positions of a paged cache.

    Parameters
    ----------
    kv_cache : Tensor ``[num_layers, 2, num_blocks, page_size, Hkv, D]``, any dtype of 1, 2, 4 or 8 bytes
        The block pool, K at index 0 of dim 1 and V at 1, any strides with a contiguous head dim: a
        vLLM layer's ``[2, num_blocks, block_size, Hkv, D]`` (FlashAttention backend) as ``layer[None]``
        or ``[num_blocks, 2, block_size, Hkv, D]`` (Triton, FlashInfer backends) as
        ``layer.transpose(0, 1)[None]``, FlashInfer's NHD
        ``[num_pages, 2, page_size, H, D]`` as ``kv.transpose(0, 1)[None]``, TensorRT-LLM's
        ``[num_blocks, 2, Hkv, tokens_per_block, D]`` as ``kv.transpose(0, 1).transpose(2, 3)[None]``.
        Modified in place, bit for bit (fp8 / int8 caches too).
    block_table : Tensor ``[B, max_blocks]``, int32 or int64
        Sequence ``b``'s position ``p`` is slot ``p % page_size`` of block ``block_table[b, p // page_size]``.
        The entries covering positions ``< cache_seqlens[b] + num_draft_tokens`` (the committed prefix
        and the tree) must be blocks of the pool (checked on CPU and with ``EAGLE_KERNELS_DEBUG=1``;
        on CUDA otherwise clamped into the pool); later ones are never read. The blocks holding a
        sequence's tree positions must be its own: no other sequence of the call may write them.
    cache_seqlens, accept_index, accept_token_num, num_draft_tokens
        As :func:`eagle_kernels.compact_kv_cache`; ``cache_seqlens[b] + num_draft_tokens`` must fit the
        table's ``max_blocks * page_size`` positions.

    Returns
    -------
    Tensor ``[B]``, cache_seqlens' dtype: ``cache_seqlens + accept_token_num + 1``. After the call,
    position ``cache_seqlens[b] + j`` of sequence ``b`` holds accepted slot ``j``'s K/V for
    ``j <= accept_token_num[b]``.
    """
    args = (kv_cache, block_table, cache_seqlens, accept_index, accept_token_num)
    _CHECKED.run(_check_args, *args, num_draft_tokens)
    if eager_fast_path(*args):
        return _run_paged_compact_kv_cache(*args, num_draft_tokens)
    return torch.ops.eagle.paged_compact_kv_cache(*args, num_draft_tokens)
