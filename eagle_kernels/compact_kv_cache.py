"""In-place KV-cache compaction after tree verification.

After the target verified a draft tree of ``n`` slots written at positions ``cache_seqlens[b] + s``,
only the accepted path survives. This op moves, for every layer, K and V, sequence and kv-head at
once, the accepted slot ``accept_index[b, j] - b*n`` to the contiguous position
``cache_seqlens[b] + j`` and returns the new committed lengths. Rejected entries are left where they
are and get overwritten by the next round.
"""

from __future__ import annotations

import torch

from eagle_kernels import _ext
from eagle_kernels._backend import debug_checks_enabled, eager_fast_path, select_backend
from eagle_kernels._checks import INDEX_DTYPES, SignatureCache, check_tensor, python_value_checks_due
from eagle_kernels._triton import launches_on_input_device, tl, triton

OP = "compact_kv_cache"


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
# The copy moves bits: any cache dtype (fp8 or int8 quantised caches too) is moved as the integer
# type of its size, which every Triton GPU target loads and stores, and which torch indexes on every
# device (fp8 indexing came late to torch).
_BITS_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(kv_cache: torch.Tensor) -> torch.Tensor:
    """The cache viewed as the integer type of its element size (same storage, same strides)."""
    bits = _BITS_DTYPES.get(kv_cache.element_size())
    return kv_cache if bits is None or kv_cache.dtype == bits else kv_cache.view(bits)


def compact_kv_cache_ref(
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    num_draft_tokens: int,
) -> torch.Tensor:
    """PyTorch definition of the op (see :func:`compact_kv_cache`); updates ``kv_cache`` in place.

    Gathering every accepted row before writing any is the same as copying in order j = 0, 1, ...:
    accepted slots are strictly increasing, so slot_j >= j and no source is overwritten before it
    is read.
    """
    n = num_draft_tokens
    accept_index = accept_index[:, :n]  # a path holds at most n slots: wider columns are padding
    B, steps = accept_index.shape
    kv_cache = _as_bits(kv_cache)
    device = kv_cache.device
    seqlens = cache_seqlens.to(torch.int64)[:, None]
    cols = torch.arange(steps, device=device)[None, :]
    valid = cols <= accept_token_num.to(torch.int64)[:, None]
    slots = accept_index.to(torch.int64) - torch.arange(B, device=device)[:, None] * n
    src = torch.where(valid, seqlens + slots, seqlens + cols)  # padding copies a row onto itself
    dst = seqlens + cols
    batch = torch.arange(B, device=device)[:, None].expand(B, steps)
    kv_cache[:, :, batch, :, dst, :] = kv_cache[:, :, batch, :, src, :]
    return cache_seqlens + accept_token_num.to(cache_seqlens.dtype) + 1


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _row_ptr(head, pos, table_row, st_c, s_b, s_pos, num_blocks, PAGE_SIZE: tl.constexpr):
    """Pointer to the row of cache position ``pos`` (int64) of one (layer, k/v, sequence, head):
    ``head + pos * s_pos`` for a contiguous cache; for a paged one (``PAGE_SIZE > 0``, ``head``
    without the sequence term) slot ``pos % PAGE_SIZE`` of block ``table_row[(pos // PAGE_SIZE) * st_c]``,
    ``s_b`` the block stride. A block id outside ``[0, num_blocks)`` (checked on CPU and in debug
    mode) is clamped so that it cannot reach outside the cache."""
    if PAGE_SIZE > 0:
        blk = tl.load(table_row + (pos // PAGE_SIZE) * st_c).to(tl.int64)
        blk = tl.minimum(tl.maximum(blk, 0), num_blocks - 1)
        return head + blk * s_b + (pos % PAGE_SIZE) * s_pos
    return head + pos * s_pos


@triton.jit
def _compact_kv_cache_kernel(
    kv_ptr,
    seqlens_ptr,
    accept_index_ptr,
    accept_num_ptr,
    table_ptr,
    B,
    H,
    D,
    num_steps,
    n,
    S_max,
    s_layer,
    s_kv,
    s_b,
    s_h,
    s_pos,
    st_b,
    st_c,
    num_blocks,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    """One program per (layer, k/v, sequence, head). Steps j run in order inside the program, so
    the in-place copy is safe (slot_j >= j). Values are checked only in debug mode (a host sync): a
    length whose tree would pass S_max (or a negative one) must not move rows outside the sequence's
    cache, into the next head's or past the tensor, so both rows of a copy are bounded by it.
    ``PAGE_SIZE > 0``: a paged cache ``[L, 2, num_blocks, PAGE_SIZE, H, D]`` (``paged_compact_kv_cache``):
    ``s_b`` steps over blocks, ``s_pos`` over a block's slots, sequence b's position p is slot
    ``p % PAGE_SIZE`` of block ``table[b, p // PAGE_SIZE]`` and ``S_max`` is the table's capacity."""
    r = tl.program_id(0)
    h = r % H
    b = (r // H) % B
    which = (r // (H * B)) % 2
    layer = r // (H * B * 2)
    # int64 offsets: a stride below 2**31 comes in as int32, and (H - 1) * s_h can pass it (a head-outer cache)
    head = kv_ptr + layer.to(tl.int64) * s_layer + which.to(tl.int64) * s_kv + h.to(tl.int64) * s_h
    if PAGE_SIZE == 0:
        head += b.to(tl.int64) * s_b
    table_row = table_ptr + b.to(tl.int64) * st_b
    start = tl.load(seqlens_ptr + b).to(tl.int64)
    acc = tl.load(accept_num_ptr + b)
    offs = tl.arange(0, BLOCK_D)
    dmask = offs < D
    for j in range(0, num_steps):  # j = 0 too: the root's row need not be the block's first
        if (j <= acc) & (j < n):  # (a path holds at most n slots; accept_index may be wider)
            slot = tl.load(accept_index_ptr + b * num_steps + j).to(tl.int64) - b * n
            in_cache = (start >= 0) & (start + tl.maximum(slot, j) < S_max)
            if (slot != j) & (slot >= 0) & (slot < n) & in_cache:  # out-of-tree slots are skipped
                src = _row_ptr(head, start + slot, table_row, st_c, s_b, s_pos, num_blocks, PAGE_SIZE)
                dst = _row_ptr(head, start + j, table_row, st_c, s_b, s_pos, num_blocks, PAGE_SIZE)
                tl.store(dst + offs, tl.load(src + offs, mask=dmask), mask=dmask)


@launches_on_input_device
def _compact_kv_cache_triton(
    kv_cache, cache_seqlens, accept_index, accept_token_num, num_draft_tokens, block_table=None
):
    """Launch the kernel; with ``block_table`` ``[B, max_blocks]`` the cache is paged,
    ``[L, 2, num_blocks, page_size, H, D]``, else ``[L, 2, B, H, S_max, D]``."""
    if block_table is None:
        L, _, B, H, S_max, D = kv_cache.shape
        page_size, num_blocks, table, table_strides = 0, 0, cache_seqlens, (0, 0)  # (never read)
        strides = kv_cache.stride()[:5]
    else:
        L, _, num_blocks, page_size, H, D = kv_cache.shape
        B, S_max = block_table.shape[0], block_table.shape[1] * page_size
        table, table_strides = block_table, block_table.stride()
        s = kv_cache.stride()  # the kernel's (sequence, head, position) strides are (block, head, slot)
        strides = (s[0], s[1], s[2], s[4], s[3])
    kv_cache = _as_bits(kv_cache)
    # The kernel reads element b of these at base + b: strided views must be made contiguous.
    accept_num = accept_token_num.to(torch.int32).contiguous()
    grid = (L * 2 * B * H,)
    if grid[0] > 0:
        _compact_kv_cache_kernel[grid](
            kv_cache,
            cache_seqlens.contiguous(),
            accept_index.contiguous(),
            accept_num,
            table,
            B,
            H,
            D,
            accept_index.shape[1],
            num_draft_tokens,
            S_max,
            *strides,
            *table_strides,
            num_blocks,
            BLOCK_D=triton.next_power_of_2(D),
            PAGE_SIZE=page_size,
        )
    return cache_seqlens + accept_num + 1


def _check_values(S: int, cache_seqlens, accept_index, accept_token_num, n, capacity: str = "S_max"):
    """Index-range checks for a cache of ``S`` positions per sequence (``capacity`` names it in the
    message); they read tensor values, so on CUDA they run only in debug mode."""
    B, steps = accept_index.shape
    num = accept_token_num.to(torch.int64).cpu()
    if bool(((num < 0) | (num >= steps)).any()):
        raise ValueError(f"accept_token_num must be in [0, {steps - 1}], got {num.tolist()}")
    seq = cache_seqlens.to(torch.int64).cpu()
    if bool(((seq < 0) | (seq + n > S)).any()):
        raise ValueError(f"cache_seqlens + num_draft_tokens={n} must fit {capacity}={S}, got {seq.tolist()}")
    slots = accept_index.to(torch.int64).cpu() - torch.arange(B)[:, None] * n
    valid = torch.arange(steps)[None, :] <= num[:, None]
    if bool(((slots < 0) | (slots >= n))[valid].any()):
        raise ValueError("accept_index holds a row outside its sequence's tree (expected b*n .. b*n+n-1)")
    increasing = (slots[:, 1:] > slots[:, :-1]) | ~valid[:, 1:]
    if not bool(increasing.all()):
        raise ValueError("accept_index must list strictly increasing tree slots per sequence")


# --------------------------------------------------------------------------------------------------
# Registered op and dispatch
# --------------------------------------------------------------------------------------------------
def _run_compact_kv_cache(kv_cache, cache_seqlens, accept_index, accept_token_num, num_draft_tokens):
    """The op's body: value checks where due, then the backend chosen for the tensors' device."""
    backend = select_backend(OP, kv_cache.device)
    args = (kv_cache, cache_seqlens, accept_index, accept_token_num, num_draft_tokens)
    # The C++ kernel validates values itself; elsewhere check on CPU, and on CUDA only in debug mode.
    # int64 lengths (SGLang's seq_lens) are checked in Python where narrowing them to the kernels'
    # int32 would change them (checking every path there made a CPU call 116 us instead of 26, ad hoc).
    wide = cache_seqlens.dtype == torch.int64
    if python_value_checks_due(backend, kv_cache.device, cache_seqlens, debug_checks_enabled()):
        _check_values(kv_cache.shape[4], *args[1:])
    if wide:
        new_lens = _run_backend(backend, kv_cache, cache_seqlens.to(torch.int32), *args[2:])
        return new_lens.to(torch.int64)
    return _run_backend(backend, *args)


def _run_backend(backend, *args):
    if backend in ("cpp", "cuda"):
        return _ext.op(OP)(*args)
    if backend == "triton":
        return _compact_kv_cache_triton(*args)
    return compact_kv_cache_ref(*args)


@torch.library.custom_op("eagle::compact_kv_cache", mutates_args=("kv_cache",))
def _compact_kv_cache_op(
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    num_draft_tokens: int,
) -> torch.Tensor:
    args = (kv_cache, cache_seqlens, accept_index, accept_token_num)
    _CHECKED.run(_check_args, *args, num_draft_tokens)  # a cache hit after the public function's check
    return _run_compact_kv_cache(*args, num_draft_tokens)


@_compact_kv_cache_op.register_fake
def _(kv_cache, cache_seqlens, accept_index, accept_token_num, num_draft_tokens):
    return torch.empty_like(cache_seqlens)


def _check_args(kv_cache, cache_seqlens, accept_index, accept_token_num, num_draft_tokens) -> None:
    """Shapes, dtypes, devices, the head stride and ``num_draft_tokens`` (no value reads: the verdict
    depends only on the call's signature, so :data:`_CHECKED` skips a signature that already passed)."""
    check_tensor("kv_cache", kv_cache, ndim=6)
    if kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be [num_layers, 2, B, Hkv, S_max, D], got {list(kv_cache.shape)}")
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache's last (head) dimension must be contiguous")
    if kv_cache.element_size() not in _BITS_DTYPES:
        raise TypeError(f"kv_cache must have a dtype of 1, 2, 4 or 8 bytes, got {kv_cache.dtype}")
    B, device = kv_cache.shape[2], kv_cache.device
    check_tensor("cache_seqlens", cache_seqlens, dtypes=INDEX_DTYPES, device=device, shape=(B,))
    check_tensor("accept_index", accept_index, ndim=2, dtypes=INDEX_DTYPES, device=device, shape=(B, None))
    check_tensor("accept_token_num", accept_token_num, dtypes=INDEX_DTYPES, device=device, shape=(B,))
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int):
        raise TypeError(
            f"num_draft_tokens must be an int, got {type(num_draft_tokens).__name__} {num_draft_tokens!r}"
        )
    if num_draft_tokens > kv_cache.shape[4]:
        raise ValueError(f"num_draft_tokens={num_draft_tokens} exceeds the cache's S_max={kv_cache.shape[4]}")
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens={num_draft_tokens} must be >= 1")
    if accept_index.shape[1] == 0:
        raise ValueError("accept_index must have at least one column (the root)")


_CHECKED = SignatureCache()


def compact_kv_cache(
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    *,
    num_draft_tokens: int,
) -> torch.Tensor:
    """Move the accepted tree slots of every layer's K/V into contiguous positions, in place.

    Parameters
    ----------
    kv_cache : Tensor ``[num_layers, 2, B, Hkv, S_max, D]``, any dtype of 1, 2, 4 or 8 bytes
        The model's in-place cache (index 0 of dim 1 is K, 1 is V). Tree slot ``s`` of sequence
        ``b`` is stored at position ``cache_seqlens[b] + s``. Modified in place. Rows are copied bit
        for bit, so quantised caches (fp8, int8) work as well as fp16/bf16/fp32.
    cache_seqlens : Tensor ``[B]``, int32 or int64
        Committed length of each sequence before this round (int64, SGLang's ``seq_lens``, costs
        two narrowing/widening copies around the int32 kernels).
    accept_index : Tensor ``[B, num_spec_steps]``, int32 or int64
        Accepted tree rows as flat indices ``b * num_draft_tokens + slot``, root first, padded with -1
        (the output of ``verify_tree_greedy`` / ``tree_speculative_sampling`` with SGLang's
        ``retrive_index[b, s] = b * n + s``: those ops accept other row permutations, this one reads
        rows as slots). Slots are strictly increasing along the path (children after their parents:
        the moves are in place). Checked on CPU and with ``EAGLE_KERNELS_DEBUG=1``; on CUDA otherwise a
        path that goes back a slot would overwrite a row before it is read. It may have more
        columns than ``num_draft_tokens`` (SGLang's is ``speculative_num_steps + 1`` wide whatever
        the tree size); a path never fills more than ``num_draft_tokens`` of them.
    accept_token_num : Tensor ``[B]``, int32 or int64
        Number of accepted draft tokens (the root is not counted).
    num_draft_tokens : int
        Tree size ``n`` (slots per sequence, root included).

    Returns
    -------
    Tensor ``[B]``, cache_seqlens' dtype: ``cache_seqlens + accept_token_num + 1``, the new committed lengths
    (accepted drafts plus the root). After the call ``kv_cache[..., b, :, cache_seqlens[b] + j, :]``
    holds the K/V of accepted slot ``j`` for ``j <= accept_token_num[b]``.
    """
    args = (kv_cache, cache_seqlens, accept_index, accept_token_num)
    _CHECKED.run(_check_args, *args, num_draft_tokens)
    if eager_fast_path(*args):
        return _run_compact_kv_cache(*args, num_draft_tokens)
    return torch.ops.eagle.compact_kv_cache(
        kv_cache, cache_seqlens, accept_index, accept_token_num, num_draft_tokens
    )
