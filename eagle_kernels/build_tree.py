"""EAGLE-2 dynamic draft tree -> tree mask, positions and SGLang's ``retrive_*`` arrays.

The EAGLE-2 draft loop (DESIGN §5) records, per sequence, a flat list of candidate scores: the
``topk`` children of the root, then ``topk * topk`` children per later level. Candidate ``v`` sits in
row ``v // topk`` of that list; row 0 holds the root's children and row ``r >= 1`` the children of
the node whose flat index is ``parent_list[r]``. The globally best ``n - 1`` candidates, sorted
ascending (``selected_index``), become tree slots ``1 .. n-1``; slot 0 is the root. This op links
every slot to its parent and derives the tree's attention mask, positions and child lists, with
SGLang's semantics (``build_tree_kernel_efficient``): children listed in ascending slot order, mask
row ``i`` true at the root, at ``i`` and at every ancestor of ``i``.

Also here: :func:`build_static_tree` (EAGLE-1 static trees from top-k rank paths, e.g.
:data:`MC_SIM_7B_63`) and :func:`sglang_build_tree_kernel_efficient`, sgl-kernel's in-place entry
point.

Malformed input (what NaN draft scores produce: a selected node whose parent was not selected) raises
a ValueError on CPU. On CUDA the kernels never hang or read out of bounds: every walk is bounded by
``depth``, and each slot whose ancestry is broken is flagged with ``positions == -1``, unlinked from
the child lists, and its mask row reduced to the root and itself; ``EAGLE_KERNELS_DEBUG=1`` validates
on the host first and raises instead.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eagle_kernels import _ext
from eagle_kernels._backend import debug_checks_enabled, eager_fast_path, select_backend
from eagle_kernels._checks import INDEX_DTYPES, SignatureCache, check_tensor
from eagle_kernels._triton import launches_on_input_device, tl, triton

OP = "build_tree"

# mask_mode name -> id used by the kernels. Ids 0..2 are SGLang's TreeMaskMode values.
MASK_MODES = {"full": 0, "qlen_bool": 1, "qlen_bits_u8": 2, "qlen_bits_i32": 3}
FULL, QLEN_BOOL, QLEN_BITS_U8, QLEN_BITS_I32 = 0, 1, 2, 3
# sgl-kernel's TreeMaskMode.
FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING = 0, 1, 2
MAX_DRAFT_TOKENS = 1024  # one CUDA thread per slot


# --------------------------------------------------------------------------------------------------
# Sizes of the layouts
# --------------------------------------------------------------------------------------------------
def parent_list_width(topk: int, depth: int) -> int:
    """Columns of ``parent_list``: one per row of the candidate list, ``topk*(depth-1)+1``."""
    return topk * (depth - 1) + 1


def num_candidates(topk: int, depth: int) -> int:
    """Size of the flat candidate list a draft of ``depth`` levels produces: ``topk + (depth-1)*topk^2``."""
    return topk + (depth - 1) * topk * topk


def u8_bytes_per_row(n: int) -> int:
    """Bytes per packed mask row in ``qlen_bits_u8`` mode, like SGLang: 1, 2 or 4 for n <= 8, 16, 32."""
    if n > 32:
        raise ValueError(
            f"mask_mode 'qlen_bits_u8' packs a row into at most 4 bytes: num_draft_tokens={n} > 32"
        )
    return 1 if n <= 8 else (2 if n <= 16 else 4)


def i32_words_per_row(n: int) -> int:
    return (n + 31) // 32


def full_mask_numel(seq_lens: torch.Tensor, n: int) -> int:
    """Elements of the ``full`` mask: ``sum(seq_lens) * n + B * n * n`` (reads ``seq_lens`` on the host)."""
    return int(seq_lens.to(torch.int64).sum()) * n + seq_lens.shape[0] * n * n


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def _first_index(flags: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(x) for x in flags.nonzero()[0])


def _check_selected_ref(sel: torch.Tensor, seq_lens: torch.Tensor, topk: int, depth: int) -> None:
    if bool((seq_lens < 0).any()):
        (b,) = _first_index(seq_lens < 0)
        raise ValueError(f"seq_lens[{b}]={int(seq_lens[b])} must be >= 0")
    size = num_candidates(topk, depth)
    out_of_range = (sel < 0) | (sel >= size)
    if bool(out_of_range.any()):
        b, k = _first_index(out_of_range)
        raise ValueError(
            f"selected_index[{b}, {k}]={int(sel[b, k])} is out of range [0, {size}) "
            f"(topk + (depth-1)*topk^2 for topk={topk}, depth={depth})"
        )
    unsorted = sel[:, 1:] <= sel[:, :-1]
    if bool(unsorted.any()):
        b, k = _first_index(unsorted)
        raise ValueError(
            f"selected_index[{b}] must be strictly increasing (sort the top-k indices ascending), "
            f"but entry {k + 1} ({int(sel[b, k + 1])}) follows {int(sel[b, k])}"
        )


def _parent_slots_ref(parent_list: torch.Tensor, sel: torch.Tensor, topk: int) -> torch.Tensor:
    """Parent slot of every slot, ``[B, n]`` int64 (-1 for the root)."""
    B, count = sel.shape
    root = torch.full((B, 1), -1, dtype=torch.int64, device=sel.device)
    if count == 0:
        return root
    row = sel // topk
    if parent_list.shape[1] == 0:  # depth 1: SGLang passes an empty parent list; every row is 0
        parent_list = torch.full((B, 1), -1, dtype=torch.int64, device=sel.device)
    parent_value = parent_list.to(torch.int64).gather(1, row)
    pos = torch.searchsorted(sel, parent_value)  # rows of sel are sorted
    found = (pos < count) & (sel.gather(1, pos.clamp(max=count - 1)) == parent_value)
    child_of_root = row == 0
    if bool((~child_of_root & ~found).any()):
        b, k = _first_index(~child_of_root & ~found)
        raise ValueError(
            f"tree slot {k + 1} of sequence {b} (selected_index={int(sel[b, k])}): its parent "
            f"parent_list[{b}, {int(row[b, k])}]={int(parent_value[b, k])} is not among the selected "
            "nodes; the draft scores probably contain NaN"
        )
    late = ~child_of_root & (parent_value >= row * topk)
    if bool(late.any()):
        b, k = _first_index(late)
        raise ValueError(
            f"tree slot {k + 1} of sequence {b} (selected_index={int(sel[b, k])}): its parent "
            f"parent_list[{b}, {int(row[b, k])}]={int(parent_value[b, k])} does not precede it "
            "(a parent must come from an earlier row of the candidate list)"
        )
    return torch.cat([root, torch.where(child_of_root, 0, pos + 1)], dim=1)


def _walk_to_root_ref(parent: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Climb from every slot towards the root, at most ``depth`` hops (all slots at once).

    Returns the depth of every slot ``[B, n]`` and the ancestor mask ``[B, n, n]`` (row i true at
    the root, at i and at every ancestor of i).
    """
    B, n = parent.shape
    node = torch.arange(n, device=parent.device).expand(B, n).clone()
    ancestors = torch.zeros(B, n, n, dtype=torch.bool, device=parent.device)
    ancestors.scatter_(2, node[..., None], True)
    levels = torch.zeros(B, n, dtype=torch.int64, device=parent.device)
    parent_or_root = parent.clamp(min=0)  # the root's "parent" is itself: a finished walk stays put
    for _ in range(depth):
        climbing = node > 0
        levels += climbing
        node = parent_or_root.gather(1, node)
        ancestors.scatter_(2, node[..., None], True)
    too_deep = node > 0
    if bool(too_deep.any()):
        b, i = _first_index(too_deep)
        raise ValueError(f"tree slot {i} of sequence {b} is deeper than depth={depth}")
    return levels, ancestors


def _child_links_ref(parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First child and next sibling of every slot, children in ascending slot order (-1: none)."""
    B, n = parent.shape
    slots = torch.arange(n, device=parent.device)
    is_child = parent[:, None, :] == slots[None, :, None]  # [b, p, j]: j is a child of p
    first_child = torch.where(is_child, slots, n).amin(-1)
    later_sibling = (
        (parent[:, None, :] == parent[:, :, None])
        & (slots[None, None, :] > slots[None, :, None])
        & (parent[:, :, None] >= 0)
    )  # [b, i, j]: j is a later sibling of i
    next_sibling = torch.where(later_sibling, slots, n).amin(-1)
    return first_child.masked_fill(first_child == n, -1), next_sibling.masked_fill(next_sibling == n, -1)


def _full_mask_tree_index(seq_lens: torch.Tensor, n: int) -> torch.Tensor:
    """Flat positions ``[B, n, n]`` of the tree columns in the ``full`` layout (FlashInfer's
    custom_mask): request b owns n rows of ``seq_lens[b] + n`` columns, after all earlier requests."""
    L = seq_lens.to(torch.int64)
    size = L * n + n * n
    start = torch.cumsum(size, 0) - size
    i = torch.arange(n, device=L.device)[None, :, None]
    j = torch.arange(n, device=L.device)[None, None, :]
    L3 = L[:, None, None]
    return start[:, None, None] + i * (L3 + n) + L3 + j


def _pack_rows_ref(ancestors: torch.Tensor, bits_per_unit: int, units: int) -> torch.Tensor:
    """Little-endian bit-packing of each row: bit j%bits of unit j//bits; int64 values."""
    B, n, _ = ancestors.shape
    padded = torch.zeros(B, n, units * bits_per_unit, dtype=torch.int64, device=ancestors.device)
    padded[..., :n] = ancestors
    weights = torch.pow(2, torch.arange(bits_per_unit, dtype=torch.int64, device=ancestors.device))
    return (padded.view(B, n, units, bits_per_unit) * weights).sum(-1)


def _encode_mask_ref(
    ancestors: torch.Tensor, mode: int, tree_mask: torch.Tensor, seq_lens: torch.Tensor
) -> None:
    """Write the ancestor mask into ``tree_mask`` in the layout of ``mode`` (``full``: tree columns only)."""
    B, n, _ = ancestors.shape
    flat = tree_mask.view(-1)
    if mode == FULL:
        flat[_full_mask_tree_index(seq_lens, n).view(-1)] = ancestors.reshape(-1)
    elif mode == QLEN_BOOL:
        flat.copy_(ancestors.reshape(-1))
    elif mode == QLEN_BITS_U8:
        flat.copy_(_pack_rows_ref(ancestors, 8, u8_bytes_per_row(n)).reshape(-1))
    else:
        words = _pack_rows_ref(ancestors, 32, i32_words_per_row(n))
        flat.copy_(torch.where(words >= 2**31, words - 2**32, words).reshape(-1))  # int32 wrap


def _allocate_outputs(
    selected_index: torch.Tensor, seq_lens: torch.Tensor, n: int, mode: int
) -> tuple[torch.Tensor, ...]:
    B, device, index_dtype = selected_index.shape[0], selected_index.device, selected_index.dtype
    if mode == FULL:
        tree_mask = torch.ones(full_mask_numel(seq_lens, n), dtype=torch.bool, device=device)
    elif mode == QLEN_BOOL:
        tree_mask = torch.empty(B, n, n, dtype=torch.bool, device=device)
    elif mode == QLEN_BITS_U8:
        tree_mask = torch.empty(B, n, u8_bytes_per_row(n), dtype=torch.uint8, device=device)
    else:
        tree_mask = torch.empty(B, n, i32_words_per_row(n), dtype=torch.int32, device=device)
    positions = torch.empty(B * n, dtype=torch.int64, device=device)
    links = [torch.empty(B, n, dtype=index_dtype, device=device) for _ in range(3)]
    return (tree_mask, positions, *links)


def _build_tree_into_ref(parent_list, selected_index, seq_lens, outputs, topk, depth, n, mode) -> None:
    """The reference, writing into pre-allocated outputs (the ``torch`` backend of the op)."""
    tree_mask, positions, retrive_index, next_token, next_sibling = outputs
    B = selected_index.shape[0]
    sel = selected_index.to(torch.int64)
    seq = seq_lens.to(torch.int64)
    _check_selected_ref(sel, seq, topk, depth)
    if mode == FULL and tree_mask.numel() < int(seq.sum()) * n + B * n * n:
        raise ValueError(
            f"tree_mask has {tree_mask.numel()} elements but mask mode full needs at least "
            f"{int(seq.sum()) * n + B * n * n}"
        )
    parent = _parent_slots_ref(parent_list, sel, topk)
    levels, ancestors = _walk_to_root_ref(parent, depth)
    first_child, later_sibling = _child_links_ref(parent)
    _encode_mask_ref(ancestors, mode, tree_mask, seq)
    positions.view(-1).copy_((seq[:, None] + levels).view(-1))  # any contiguous shape of B*n elements
    retrive_index.copy_(torch.arange(B * n, device=sel.device).view(B, n))
    next_token.copy_(first_child)
    next_sibling.copy_(later_sibling)


def build_tree_ref(
    parent_list: torch.Tensor,
    selected_index: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    topk: int,
    depth: int,
    num_draft_tokens: int,
    mask_mode: str = "qlen_bool",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch definition of :func:`build_tree` (same arguments and outputs); raises ValueError on
    malformed trees.

    Slot ``i >= 1`` is candidate ``v = selected_index[b, i-1]``. If ``v // topk == 0`` its parent is
    the root, else it is the slot holding candidate ``parent_list[b, v // topk]``, which must be
    selected and lie in an earlier row of the candidate list. Walking parent links (at most ``depth``
    hops) gives each slot's depth and ancestors.
    """
    mode = _mode_id(mask_mode)
    parent_list = _index_dtype_if_empty(parent_list)
    _check_args(parent_list, selected_index, seq_lens, topk, depth, num_draft_tokens, mode)
    outputs = _allocate_outputs(selected_index, seq_lens, num_draft_tokens, mode)
    _build_tree_into_ref(parent_list, selected_index, seq_lens, outputs, topk, depth, num_draft_tokens, mode)
    return outputs


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per sequence, vectorised over slots
# --------------------------------------------------------------------------------------------------
@triton.jit
def _lower_bound(row_ptr, count, target, SEARCH_STEPS: tl.constexpr):
    """Vectorised binary search of ``target`` in the sorted ``row_ptr[0:count]``: (index, found)."""
    lo = tl.zeros_like(target)
    hi = tl.zeros_like(target) + count
    for _ in tl.static_range(SEARCH_STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        value = tl.load(row_ptr + mid, mask=active, other=0).to(tl.int64)
        below = value < target
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    inside = lo < count
    found = inside & (tl.load(row_ptr + lo, mask=inside, other=0).to(tl.int64) == target)
    return lo, found


@triton.jit
def _mark(acc, slot, lanes, take, ACC: tl.constexpr):
    """Set the mask bit of ``slot`` in each row of ``acc`` where ``take`` (ACC 1: bools, 2: int32 words)."""
    if ACC == 1:
        acc = acc | ((lanes[None, :] == slot[:, None]) & take[:, None])
    elif ACC == 2:
        bit = (tl.full(slot.shape, 1, tl.int64) << (slot % 32)).to(tl.int32)
        hit = (lanes[None, :] == (slot // 32)[:, None]) & take[:, None]
        acc = acc | tl.where(hit, bit[:, None], 0)
    return acc


@triton.jit
def _walk_to_root(
    slots,
    sel_row,
    sel_vec,
    parent_row,
    count,
    topk,
    depth,
    seq_bad,
    acc,
    lanes,
    ACC: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Climb from every slot in ``slots`` to the root, at most ``depth`` hops.

    Returns (parent slot, depth, valid, acc with every ancestor marked). A slot is invalid when a hop
    finds its parent unselected or not in an earlier row, or the root is not reached in time.
    """
    live = slots <= count
    is_root = slots == 0
    ok = live & ((slots * 0 + seq_bad) == 0)  # (vector & scalar-bool trips the interpreter)
    value = tl.load(sel_row + slots - 1, mask=ok & ~is_root, other=0).to(tl.int64)
    here = slots.to(tl.int64)
    lanes_n = tl.arange(0, BLOCK_N)
    parent = tl.full(slots.shape, -1, tl.int64)
    levels = tl.zeros(slots.shape, tl.int64)
    arrived = is_root
    for _ in range(depth):
        climbing = ok & ~arrived
        row = value // topk
        to_root = row == 0
        up = tl.load(parent_row + row, mask=climbing & ~to_root, other=0).to(tl.int64)
        # Where is the parent among the selected? (Inlined: nested jit calls are slow to interpret.)
        if SEARCH_STEPS == 0:  # small n: compare with the whole selected row, held in registers
            hit = (sel_vec[None, :] == up[:, None]) & (lanes_n[None, :] < count)
            pos = tl.min(tl.where(hit, lanes_n[None, :], BLOCK_N), axis=1).to(tl.int64)
            found = pos < BLOCK_N
        else:  # binary search in memory
            pos, found = _lower_bound(sel_row, count, up, SEARCH_STEPS)
        good = to_root | (found & (up < row * topk))
        ok = ok & (~climbing | good)
        step = climbing & good
        here = tl.where(step, tl.where(to_root, 0, pos + 1), here)
        parent = tl.where(step & (levels == 0), here, parent)
        levels += step.to(tl.int64)
        arrived = arrived | (step & to_root)
        value = tl.where(step, up, value)
        if ACC == 1:  # mark the new ancestor (inlined _mark)
            acc = acc | ((lanes[None, :] == here[:, None]) & step[:, None])
        elif ACC == 2:
            bit = (tl.full(here.shape, 1, tl.int64) << (here % 32)).to(tl.int32)
            acc = acc | tl.where((lanes[None, :] == (here // 32)[:, None]) & step[:, None], bit[:, None], 0)
    return parent, levels, ok & arrived, acc


@triton.jit
def _initial_rows(rows, lanes, n, MODE: tl.constexpr, BLOCK_W: tl.constexpr):
    """Mask rows before the walk: the root and the slot itself."""
    if MODE <= 1:
        init = (lanes[None, :] == rows[:, None]) | (lanes[None, :] == 0)
    else:
        live = rows < n
        init = tl.zeros([rows.shape[0], BLOCK_W], tl.int32)
        init = _mark(init, rows.to(tl.int64), lanes, live, 2)
        init = _mark(init, rows.to(tl.int64) * 0, lanes, live, 2)
    return init


@triton.jit
def _store_rows(
    b, n, rows, parent, levels, valid, acc, init, col_parent, col_valid, cols, lanes, seq_len, misfit,
    row_start, row_stride, col_start, mask_ptr, pos_ptr, ridx_ptr, next_ptr, sib_ptr,
    MODE: tl.constexpr, NUM_UNITS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Write positions, links and mask rows of the slots ``rows`` (flagged slots: position -1, no
    links, mask = root + self)."""
    live = rows < n
    acc = tl.where(valid[:, None], acc, init)
    flat = b * n + rows
    tl.store(pos_ptr + flat, tl.where(valid, seq_len + levels, -1), mask=live)
    tl.store(ridx_ptr + flat, flat.to(ridx_ptr.dtype.element_ty), mask=live)
    later_sibling = (
        (col_parent[None, :] == parent[:, None])
        & col_valid[None, :]
        & (cols[None, :] > rows[:, None])
        & valid[:, None]
    )
    nxt = tl.min(tl.where(later_sibling, cols[None, :], BLOCK_N), axis=1)
    child = (col_parent[None, :] == rows[:, None]) & col_valid[None, :]
    first = tl.min(tl.where(child, cols[None, :], BLOCK_N), axis=1)
    tl.store(sib_ptr + flat, tl.where(nxt == BLOCK_N, -1, nxt).to(sib_ptr.dtype.element_ty), mask=live)
    tl.store(next_ptr + flat, tl.where(first == BLOCK_N, -1, first).to(next_ptr.dtype.element_ty), mask=live)
    if MODE <= 1:
        where = mask_ptr + row_start + rows[:, None] * row_stride + col_start + lanes[None, :]
        fits = (lanes[None, :] * 0 + misfit) == 0
        tl.store(where, acc, mask=live[:, None] & (lanes[None, :] < n) & fits)
    elif MODE == 2:
        byte = tl.arange(0, 4)
        values = ((acc >> (8 * byte[None, :])) & 255).to(tl.uint8)
        where = mask_ptr + flat[:, None] * NUM_UNITS + byte[None, :]
        tl.store(where, values, mask=live[:, None] & (byte[None, :] < NUM_UNITS))
    else:
        where = mask_ptr + flat[:, None] * NUM_UNITS + lanes[None, :]
        tl.store(where, acc, mask=live[:, None] & (lanes[None, :] < NUM_UNITS))


@triton.jit
def _build_tree_kernel(
    parent_ptr,
    sel_ptr,
    seq_ptr,
    mask_ptr,
    pos_ptr,
    ridx_ptr,
    next_ptr,
    sib_ptr,
    mask_numel,
    topk,
    depth,
    n,
    parent_width,
    score_size,
    MODE: tl.constexpr,
    NUM_UNITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid.to(tl.int64)
    count = n - 1
    sel_row = sel_ptr + b * count
    parent_row = parent_ptr + b * parent_width
    seq_len = tl.load(seq_ptr + b).to(tl.int64)

    # Whole-sequence checks: selected_index in range and strictly increasing; mask fits.
    k = tl.arange(0, BLOCK_N)
    v = tl.load(sel_row + k, mask=k < count, other=0).to(tl.int64)
    v_next = tl.load(sel_row + k + 1, mask=k + 1 < count, other=0).to(tl.int64)
    bad = ((k < count) & ((v < 0) | (v >= score_size))) | ((k + 1 < count) & (v_next <= v))
    seq_bad = tl.sum(bad.to(tl.int32), axis=0) + (seq_len < 0).to(tl.int32)
    row_start = (b * n) * n
    row_stride = n
    col_start = 0
    misfit = 0
    if MODE == 0:  # full: rows of seq_len + n columns after every earlier request's rows
        earlier = tl.zeros([BLOCK_N], tl.int64)
        for c0 in range(0, pid, BLOCK_N):
            c = c0 + k
            earlier += tl.load(seq_ptr + c, mask=c < pid, other=0).to(tl.int64)
        earlier_sum = tl.sum(earlier, axis=0)
        row_start = earlier_sum * n + b * n * n
        row_stride = seq_len + n
        col_start = seq_len
        # Bound every term first so that garbage lengths cannot overflow into an in-range offset.
        fits = (seq_len >= 0) & (seq_len <= mask_numel) & (earlier_sum >= 0) & (earlier_sum <= mask_numel)
        fits = fits & (row_start + n * row_stride <= mask_numel)
        misfit = 1 - fits.to(tl.int32)
        seq_bad += misfit

    if MODE <= 1:
        lanes = tl.arange(0, BLOCK_N)
    else:
        lanes = tl.arange(0, BLOCK_W)
    cols = tl.arange(0, BLOCK_N)
    if BLOCK_R == BLOCK_N:  # one tile holds every slot: its walk also gives the link columns
        init = _initial_rows(cols, lanes, n, MODE, BLOCK_W)
        parent, levels, valid, acc = _walk_to_root(
            cols, sel_row, v, parent_row, count, topk, depth, seq_bad, init, lanes, 1 if MODE <= 1 else 2,
            SEARCH_STEPS, BLOCK_N,
        )  # fmt: skip
        _store_rows(
            b, n, cols, parent, levels, valid, acc, init, parent, valid, cols, lanes, seq_len, misfit,
            row_start, row_stride, col_start, mask_ptr, pos_ptr, ridx_ptr, next_ptr, sib_ptr,
            MODE, NUM_UNITS, BLOCK_N,
        )  # fmt: skip
    else:
        col_parent, _, col_valid, _ = _walk_to_root(
            cols, sel_row, v, parent_row, count, topk, depth, seq_bad, cols, cols, 0, SEARCH_STEPS, BLOCK_N
        )
        for r0 in range(0, n, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            init = _initial_rows(rows, lanes, n, MODE, BLOCK_W)
            parent, levels, valid, acc = _walk_to_root(
                rows, sel_row, v, parent_row, count, topk, depth, seq_bad, init, lanes, 1 if MODE <= 1 else 2,
                SEARCH_STEPS, BLOCK_N,
            )  # fmt: skip
            _store_rows(
                b, n, rows, parent, levels, valid, acc, init, col_parent, col_valid, cols, lanes, seq_len, misfit,
                row_start, row_stride, col_start, mask_ptr, pos_ptr, ridx_ptr, next_ptr, sib_ptr,
                MODE, NUM_UNITS, BLOCK_N,
            )  # fmt: skip


@launches_on_input_device
def _build_tree_triton(parent_list, selected_index, seq_lens, outputs, topk, depth, n, mode) -> None:
    tree_mask, positions, retrive_index, next_token, next_sibling = outputs
    B = selected_index.shape[0]
    if B == 0:
        return
    block_n = max(16, triton.next_power_of_2(n))
    units = {QLEN_BITS_U8: 1, QLEN_BITS_I32: i32_words_per_row(n)}.get(mode, 1)
    num_units = u8_bytes_per_row(n) if mode == QLEN_BITS_U8 else units
    block_w = triton.next_power_of_2(units)
    _build_tree_kernel[(B,)](
        parent_list.contiguous(),
        selected_index.contiguous(),
        seq_lens.contiguous(),
        tree_mask,
        positions,
        retrive_index,
        next_token,
        next_sibling,
        tree_mask.numel(),
        topk,
        depth,
        n,
        parent_list.shape[1],
        num_candidates(topk, depth),
        MODE=mode,
        NUM_UNITS=num_units,
        BLOCK_N=block_n,
        BLOCK_R=max(1, min(block_n, 4096 // block_n)),
        BLOCK_W=block_w,
        # Small trees find parents by comparing against the whole selected row (in registers);
        # larger ones binary-search it in memory.
        SEARCH_STEPS=0 if block_n <= 64 else n.bit_length(),
    )


# --------------------------------------------------------------------------------------------------
# Registered op and dispatch
# --------------------------------------------------------------------------------------------------
def _run_build_tree(parent_list, selected_index, seq_lens, outputs, topk, depth, n, mode) -> None:
    """The op's body (and the eager fast path's): value checks where due, then the backend chosen for
    the tensors' device writes ``outputs``."""
    device = selected_index.device
    backend = select_backend(OP, device)
    # The C++ kernel and the reference validate the values themselves; Triton on CPU tensors (the
    # interpreter) is checked here, and CUDA only in debug mode (a host sync).
    if (device.type == "cpu" and backend not in ("cpp", "torch")) or (
        device.type != "cpu" and debug_checks_enabled()
    ):
        _validate_values(parent_list, selected_index, seq_lens, n, mode, outputs[0], topk, depth)
    if backend in ("cpp", "cuda"):
        _ext.op(OP)(parent_list, selected_index, seq_lens, *outputs, topk, depth, n, mode)
    elif backend == "triton":
        _build_tree_triton(parent_list, selected_index, seq_lens, outputs, topk, depth, n, mode)
    else:
        _build_tree_into_ref(parent_list, selected_index, seq_lens, outputs, topk, depth, n, mode)


@torch.library.custom_op(
    "eagle::build_tree",
    mutates_args=("tree_mask", "positions", "retrive_index", "retrive_next_token", "retrive_next_sibling"),
)
def _build_tree_op(
    parent_list: torch.Tensor,
    selected_index: torch.Tensor,
    seq_lens: torch.Tensor,
    tree_mask: torch.Tensor,
    positions: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    topk: int,
    depth: int,
    num_draft_tokens: int,
    mask_mode: int,
) -> None:
    outputs = (tree_mask, positions, retrive_index, retrive_next_token, retrive_next_sibling)
    n = num_draft_tokens
    # Cache hits after the public function's checks; a direct torch.ops call is checked here.
    _CHECKED_ARGS.run(_check_args, parent_list, selected_index, seq_lens, topk, depth, n, mask_mode)
    _CHECKED_OUTPUTS.run(_check_outputs_flat, *outputs, selected_index, n, mask_mode)
    _run_build_tree(parent_list, selected_index, seq_lens, outputs, topk, depth, n, mask_mode)


@_build_tree_op.register_fake
def _(
    parent_list,
    selected_index,
    seq_lens,
    tree_mask,
    positions,
    retrive_index,
    retrive_next_token,
    retrive_next_sibling,
    topk,
    depth,
    num_draft_tokens,
    mask_mode,
):
    return None


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------
def _mode_id(mask_mode: str) -> int:
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {sorted(MASK_MODES)}, got {mask_mode!r}")
    return MASK_MODES[mask_mode]


def _index_dtype_if_empty(parent_list: torch.Tensor) -> torch.Tensor:
    """SGLang passes ``torch.empty(bs, 0)`` (float32) as the parent list of a depth-1 draft: nothing in
    it is read, so an empty list of another dtype is taken as an empty int64 one."""
    if parent_list.dim() == 2 and parent_list.shape[1] == 0 and parent_list.dtype not in INDEX_DTYPES:
        return parent_list.to(torch.int64)
    return parent_list


def _plain_int(value):
    """An integer-like scalar (a numpy or other ``__index__`` integer) as a Python int; anything else
    as it is, for :func:`_check_args` to name."""
    if isinstance(value, int) or isinstance(value, bool) or not hasattr(type(value), "__index__"):
        return value
    return operator.index(value)


def _check_args(parent_list, selected_index, seq_lens, topk, depth, n, mode) -> None:
    """Shapes, dtypes and sizes (cheap, no host synchronisation). No value reads: the verdict depends
    only on the call's signature, so :data:`_CHECKED_ARGS` skips a signature that already passed."""
    for name, value in (("topk", topk), ("depth", depth), ("num_draft_tokens", n)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if n > MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens={n} exceeds the supported maximum {MAX_DRAFT_TOKENS}")
    if n - 1 > num_candidates(topk, depth):
        raise ValueError(
            f"num_draft_tokens - 1 = {n - 1} exceeds the {num_candidates(topk, depth)} candidates a draft "
            f"with topk={topk}, depth={depth} produces (topk + (depth-1)*topk^2)"
        )
    if mode == QLEN_BITS_U8:
        u8_bytes_per_row(n)
    check_tensor("selected_index", selected_index, ndim=2, dtypes=INDEX_DTYPES)
    B, device = selected_index.shape[0], selected_index.device
    check_tensor("selected_index", selected_index, shape=(B, n - 1))
    empty_ok = depth == 1 and parent_list.dim() == 2 and parent_list.shape[1] == 0  # SGLang, depth 1
    width = 0 if empty_ok else parent_list_width(topk, depth)
    check_tensor("parent_list", parent_list, dtypes=INDEX_DTYPES, device=device, shape=(B, width))
    check_tensor("seq_lens", seq_lens, dtypes=INDEX_DTYPES, device=device, shape=(B,))


_CHECKED_ARGS = SignatureCache()
_CHECKED_OUTPUTS = SignatureCache()


def _check_outputs(outputs, selected_index, n, mode) -> None:
    """Pre-allocated outputs: dtype, size, device and contiguity (the ``full`` size is checked by the
    kernels against ``seq_lens``)."""
    if len(outputs) != 5:
        raise ValueError(
            "out must hold 5 tensors: (tree_mask, positions, retrive_index, next_token, next_sibling)"
        )
    tree_mask, positions, *links = outputs
    B, device = selected_index.shape[0], selected_index.device
    mask_dtype, mask_numel = {
        FULL: (torch.bool, None),
        QLEN_BOOL: (torch.bool, B * n * n),
        QLEN_BITS_U8: (torch.uint8, B * n * (u8_bytes_per_row(n) if mode == QLEN_BITS_U8 else 0)),
        QLEN_BITS_I32: (torch.int32, B * n * i32_words_per_row(n)),
    }[mode]
    check_tensor("tree_mask", tree_mask, dtypes=(mask_dtype,), device=device)
    if mask_numel is not None and tree_mask.numel() != mask_numel:
        raise ValueError(
            f"tree_mask must have {mask_numel} elements for this mask mode, got {tree_mask.numel()}"
        )
    check_tensor("positions", positions, dtypes=(torch.int64,), device=device)
    if positions.numel() != B * n:
        raise ValueError(f"positions must have B*n={B * n} elements, got {positions.numel()}")
    for name, t in zip(("retrive_index", "retrive_next_token", "retrive_next_sibling"), links):
        check_tensor(name, t, dtypes=(selected_index.dtype,), device=device, shape=(B, n))
    for name, t in zip(
        ("tree_mask", "positions", "retrive_index", "retrive_next_token", "retrive_next_sibling"), outputs
    ):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _check_outputs_flat(
    tree_mask, positions, retrive_index, next_token, next_sibling, selected_index, n, mode
):
    """:func:`_check_outputs` with the five outputs as separate arguments (a cacheable signature)."""
    _check_outputs((tree_mask, positions, retrive_index, next_token, next_sibling), selected_index, n, mode)


def _validate_values(parent_list, selected_index, seq_lens, n, mode, tree_mask, topk, depth) -> None:
    """The reference's value checks on host copies (CPU Triton path, or CUDA with debug checks)."""
    sel = selected_index.to("cpu", torch.int64)
    seq = seq_lens.to("cpu", torch.int64)
    _check_selected_ref(sel, seq, topk, depth)
    parent = _parent_slots_ref(parent_list.cpu(), sel, topk)
    _walk_to_root_ref(parent, depth)
    if mode == FULL:
        need = int(seq.sum()) * n + sel.shape[0] * n * n
        if tree_mask.numel() < need:
            raise ValueError(
                f"tree_mask has {tree_mask.numel()} elements but mask mode full needs at least {need}"
            )


def _run(parent_list, selected_index, seq_lens, outputs, topk, depth, n, mode) -> None:
    # Traced (torch.compile): the op, whose body checks the values when the graph runs (no host
    # reads while tracing: a graph break each). eager_fast_path is False then.
    if eager_fast_path(parent_list, selected_index, seq_lens, *outputs):
        _run_build_tree(parent_list, selected_index, seq_lens, outputs, topk, depth, n, mode)
    else:
        torch.ops.eagle.build_tree(parent_list, selected_index, seq_lens, *outputs, topk, depth, n, mode)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
def build_tree(
    parent_list: torch.Tensor,
    selected_index: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    topk: int,
    depth: int,
    num_draft_tokens: int,
    mask_mode: str = "qlen_bool",
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the EAGLE-2 dynamic draft tree of every sequence (SGLang's ``build_tree_kernel_efficient``).

    Parameters
    ----------
    parent_list : Tensor ``[B, topk*(depth-1)+1]``, int32 or int64
        For row ``r >= 1`` of the flat candidate list, the flat index of the node whose children
        that row holds (column 0, the root's row, is not read). This is SGLang's
        ``cat(parents_list[:-1])`` from the draft loop; for ``depth == 1`` SGLang's empty ``[B, 0]``
        is accepted too.
    selected_index : Tensor ``[B, n-1]``, int32 or int64
        The globally best ``n-1`` candidates, as flat indices into the candidate list of size
        ``topk + (depth-1)*topk^2``, strictly increasing. Candidate ``selected_index[b, i-1]``
        becomes tree slot ``i``.
    seq_lens : Tensor ``[B]``, int32 or int64
        Committed length of each sequence (the root sits at position ``seq_lens[b]``).
    topk, depth : int
        The draft's expansion width and number of draft levels.
    num_draft_tokens : int
        ``n``, tree slots per sequence including the root (1 <= n <= 1024).
    mask_mode : str
        Layout of ``tree_mask``; row ``i`` is true at the root, at ``i`` and at every ancestor of ``i``:

        * ``"full"``: bool, flat, FlashInfer's ``custom_mask``: per request ``n`` rows of
          ``seq_lens[b] + n`` columns (prefix columns first, all true), requests concatenated;
          ``sum(seq_lens)*n + B*n*n`` elements; a larger buffer (SGLang's worst-case CUDA-graph
          mask) is fine, its elements past them are left alone.
        * ``"qlen_bool"``: bool ``[B, n, n]`` (the prefix is implicitly visible).
        * ``"qlen_bits_u8"``: uint8 ``[B, n, nbytes]``, each row packed little-endian (bit ``j % 8``
          of byte ``j // 8``) into ``nbytes`` = 1, 2 or 4 bytes for n <= 8, 16, 32 like SGLang
          (``.view(torch.int16/int32)`` gives SGLang's wide words); n > 32 raises.
        * ``"qlen_bits_i32"``: int32 ``[B, n, ceil(n/32)]``, bit ``j % 32`` of word ``j // 32``
          (TensorRT-LLM).
    out : tuple of 5 tensors, optional
        Pre-allocated outputs to write into (CUDA-graph safe). In ``full`` mode only the tree columns
        are written; the caller pre-fills the prefix columns with True, as SGLang does. Without
        ``out``, ``full`` mode reads ``sum(seq_lens)`` on the host to size the mask (a device sync).

    Returns
    -------
    tree_mask : Tensor, layout as above
    positions : Tensor ``[B*n]``, int64
        ``seq_lens[b] + depth(slot)``; the root has depth 0.
    retrive_index : Tensor ``[B, n]``, dtype of ``selected_index``
        ``b*n + i``, the flat row of slot ``i``.
    retrive_next_token : Tensor ``[B, n]``, dtype of ``selected_index``
        First child slot, -1 for a leaf. Children are listed in ascending slot order.
    retrive_next_sibling : Tensor ``[B, n]``, dtype of ``selected_index``
        Next sibling slot, -1 for the last one.

    Raises
    ------
    ValueError
        On inconsistent shapes, and on CPU (on CUDA with ``EAGLE_KERNELS_DEBUG=1``) when
        ``selected_index`` is out of range or unsorted, a selected node's parent is not selected
        (NaN draft scores), a parent does not precede its child, or a slot is deeper than ``depth``.
        Without debug checks the CUDA kernels flag such slots with ``positions == -1`` instead.

    Notes
    -----
    Backends: CPU tensors run the C++ kernel (else the reference). CUDA tensors run the CUDA
    extension kernel (``csrc/cuda/build_tree.cu``, one block per sequence, one thread per slot) where
    it is built: 10 against Triton's 80 us at n = 64 on an H200 (``_backend.CUDA_EXT_FIRST``); else
    the Triton kernel (one program per sequence). ``EAGLE_KERNELS_BACKEND`` picks either.
    """
    mode = _mode_id(mask_mode)
    n = num_draft_tokens
    parent_list = _index_dtype_if_empty(parent_list)
    _CHECKED_ARGS.run(_check_args, parent_list, selected_index, seq_lens, topk, depth, n, mode)
    if out is None:
        out = _allocate_outputs(selected_index, seq_lens, n, mode)
    else:
        out = tuple(out)
        if len(out) == 5:
            _CHECKED_OUTPUTS.run(_check_outputs_flat, *out, selected_index, n, mode)
        else:
            _check_outputs(out, selected_index, n, mode)
    _run(parent_list, selected_index, seq_lens, out, topk, depth, n, mode)
    return out


def sglang_build_tree_kernel_efficient(
    parent_list: torch.Tensor,
    selected_index: torch.Tensor,
    verified_seq_len: torch.Tensor,
    tree_mask: torch.Tensor,
    positions: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    topk: int,
    depth: int,
    draft_token_num: int,
    tree_mask_mode: int = FULL_MASK,
) -> None:
    """Drop-in for sgl-kernel's ``build_tree_kernel_efficient``: same arguments, writes in place.

    ``tree_mask_mode`` is SGLang's ``TreeMaskMode``: ``FULL_MASK`` (0, flat bool with prefix
    columns, which are left as the caller filled them), ``QLEN_ONLY`` (1, bool ``B*n*n``) or
    ``QLEN_ONLY_BITPACKING`` (2, ``B*n`` rows of 1/2/4 bytes: uint8, uint16/int16 or uint32/int32
    elements). The older 11-argument form (no ``tree_mask_mode``) means ``FULL_MASK``. Unlike
    sgl-kernel, every output element is written (no -1 / zero pre-fill needed) and a malformed tree
    raises on CPU instead of printing a warning (see :func:`build_tree`).
    """
    if tree_mask_mode not in (FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING):
        raise ValueError(
            f"tree_mask_mode must be 0 (FULL_MASK), 1 (QLEN_ONLY) or 2 (QLEN_ONLY_BITPACKING), got {tree_mask_mode!r}"
        )
    mode = {FULL_MASK: FULL, QLEN_ONLY: QLEN_BOOL, QLEN_ONLY_BITPACKING: QLEN_BITS_U8}[tree_mask_mode]
    topk, depth, n = (_plain_int(v) for v in (topk, depth, draft_token_num))  # (a config's numpy ints)
    parent_list = _index_dtype_if_empty(parent_list)  # SGLang's depth-1 torch.empty(bs, 0) is float32
    _CHECKED_ARGS.run(_check_args, parent_list, selected_index, verified_seq_len, topk, depth, n, mode)
    B = selected_index.shape[0]
    if mode == QLEN_BITS_U8 and tree_mask.dtype != torch.uint8:
        if tree_mask.element_size() != u8_bytes_per_row(n) or tree_mask.numel() != B * n:
            raise ValueError(
                f"tree_mask for QLEN_ONLY_BITPACKING with draft_token_num={n} must hold B*n={B * n} "
                f"{u8_bytes_per_row(n)}-byte rows, got {tree_mask.numel()} x {tree_mask.element_size()} bytes"
            )
        tree_mask = tree_mask.view(torch.uint8)
    outputs = (tree_mask, positions, retrive_index, retrive_next_token, retrive_next_sibling)
    _CHECKED_OUTPUTS.run(_check_outputs_flat, *outputs, selected_index, n, mode)
    _run(parent_list, selected_index, verified_seq_len, outputs, topk, depth, n, mode)


# --------------------------------------------------------------------------------------------------
# Static trees (EAGLE-1)
# --------------------------------------------------------------------------------------------------
MC_SIM_7B_63: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
)  # fmt: skip
"""EAGLE-1's default static tree (``eagle/model/choices.py``): 25 draft nodes as top-k rank paths."""


@dataclass(frozen=True, eq=False, repr=False)
class StaticTree:
    """A static draft tree in SGLang's layout (all tensors int64 on CPU unless noted).

    ``paths`` and ``topk`` define it (every tensor is derived from them), so they alone decide
    equality, hashing and the repr.

    Slot 0 is the root; slot ``i >= 1`` is ``paths[i-1]``, the paths sorted by length, then
    lexicographically, so slots are in level order and siblings in rank order.

    How a decoding round fills the tree: draft step ``d`` (d = 0, 1, ...) feeds the draft the slots
    of depth ``d`` that have children, in slot order; they are rows ``expand_row[slot]`` of one
    ``[num_expanded, topk]`` table of top-k draft tokens (rows grouped by depth, in slot order).
    Slot ``i >= 1`` takes rank ``rank[i]`` of its parent's row, i.e. entry
    ``token_source[i-1] = expand_row[parent[i]] * topk + rank[i]`` of the flattened table; see
    :meth:`gather_tokens`.
    """

    paths: tuple[tuple[int, ...], ...]
    topk: int
    parent: torch.Tensor  # [n], -1 for the root
    depth: torch.Tensor  # [n], 0 for the root
    rank: torch.Tensor  # [n], top-k rank within the parent's children, -1 for the root
    retrive_next_token: torch.Tensor  # [n], first child slot or -1
    retrive_next_sibling: torch.Tensor  # [n], next sibling slot or -1
    mask: torch.Tensor  # [n, n] bool: row i true at the root, at i and at i's ancestors
    expand_slots: torch.Tensor  # [num_expanded], slots with children, in slot order
    expand_row: torch.Tensor  # [n], row of the slot in the top-k table, -1 for leaves
    token_source: torch.Tensor  # [n-1], flat index into the [num_expanded, topk] top-k table

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StaticTree):
            return NotImplemented
        return (self.paths, self.topk) == (other.paths, other.topk)

    def __hash__(self) -> int:
        return hash((self.paths, self.topk))

    def __repr__(self) -> str:
        return (
            f"StaticTree(num_draft_tokens={self.num_draft_tokens}, max_depth={self.max_depth}, "
            f"topk={self.topk}, paths={self.paths})"
        )

    @property
    def num_draft_tokens(self) -> int:
        return int(self.parent.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    def expanded_at_depth(self, d: int) -> torch.Tensor:
        """Slots fed to the draft at step ``d`` (depth ``d``, with children), in slot order."""
        return self.expand_slots[self.depth[self.expand_slots] == d]

    def gather_tokens(self, root_tokens: torch.Tensor, topk_tokens: torch.Tensor) -> torch.Tensor:
        """Tree tokens ``[B, n]`` from the roots ``[B]`` and the draft's top-k table
        ``[B, num_expanded, topk]`` (row k: the top-k tokens drafted after slot ``expand_slots[k]``)."""
        source = self.token_source.to(topk_tokens.device)
        return torch.cat([root_tokens[:, None], topk_tokens.flatten(1)[:, source]], dim=1)

    def positions(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """``[B*n]`` int64: ``seq_lens[b] + depth(slot)``."""
        return (seq_lens.to(torch.int64)[:, None] + self.depth.to(seq_lens.device)).reshape(-1)

    def batched(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.int64
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(retrive_index, retrive_next_token, retrive_next_sibling)``, each ``[B, n]``, for the
        verification ops (``retrive_index[b, i] = b*n + i``)."""
        n = self.num_draft_tokens
        index = torch.arange(batch_size * n, device=device, dtype=dtype).view(batch_size, n)
        expand = (batch_size, n)
        return (
            index,
            self.retrive_next_token.to(device=device, dtype=dtype).expand(expand).contiguous(),
            self.retrive_next_sibling.to(device=device, dtype=dtype).expand(expand).contiguous(),
        )


def _normalise_paths(tree_paths: Sequence[Sequence[int]], topk: int | None) -> tuple[tuple[int, ...], ...]:
    paths = []
    for p in tree_paths:
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise TypeError(f"each tree path must be a sequence of ints, got {p!r}")
        if len(p) == 0:
            raise ValueError("tree paths must be non-empty (the root is implicit)")
        for r in p:
            if not isinstance(r, int) or isinstance(r, bool):
                raise TypeError(f"tree path {list(p)} holds a non-int rank {r!r}")
            if r < 0:
                raise ValueError(f"tree path {list(p)} has a negative rank {r}")
            if topk is not None and r >= topk:
                raise ValueError(f"tree path {list(p)} has rank {r} >= topk={topk}")
        paths.append(tuple(p))
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"tree path {list(dup)} appears more than once")
    present = set(paths)
    for p in paths:
        if len(p) > 1 and p[:-1] not in present:
            raise ValueError(
                f"tree paths are not prefix-closed: {list(p)} needs its parent path {list(p[:-1])}"
            )
    return tuple(sorted(paths, key=lambda p: (len(p), p)))


def build_static_tree(tree_paths: Sequence[Sequence[int]], *, topk: int | None = None) -> StaticTree:
    """Turn a list of top-k rank paths (EAGLE-1 ``tree_choices``, e.g. :data:`MC_SIM_7B_63`) into a
    :class:`StaticTree` in SGLang's layout.

    Parameters
    ----------
    tree_paths : sequence of sequences of int
        Each draft node as the top-k ranks chosen from the root down, e.g. ``[0, 1]`` is the second
        best child of the best child of the root. Must be prefix-closed, ranks >= 0, no duplicates.
    topk : int, optional
        Width of the draft's top-k table; default ``1 + max rank``. Ranks must be ``< topk``.

    Returns
    -------
    StaticTree with ``n = len(tree_paths) + 1`` slots (root included).
    """
    if topk is not None and (not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    paths = _normalise_paths(tree_paths, topk)
    if topk is None:
        topk = 1 + max((r for p in paths for r in p), default=0)
    slot_of = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
    n = len(paths) + 1
    parent, depth, rank = [-1] * n, [0] * n, [-1] * n
    for p, i in slot_of.items():
        if p:
            parent[i], depth[i], rank[i] = slot_of[p[:-1]], len(p), p[-1]
    next_token, next_sibling = [-1] * n, [-1] * n
    last_child: dict[int, int] = {}
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):  # parents precede children, so a parent's mask row is complete
        mask[i, i] = True
        if parent[i] >= 0:
            mask[i] |= mask[parent[i]]
            if parent[i] in last_child:
                next_sibling[last_child[parent[i]]] = i
            else:
                next_token[parent[i]] = i
            last_child[parent[i]] = i
    expand_slots = [i for i in range(n) if next_token[i] != -1]
    expand_row = [-1] * n
    for row, slot in enumerate(expand_slots):
        expand_row[slot] = row
    token_source = [expand_row[parent[i]] * topk + rank[i] for i in range(1, n)]

    def t(values):
        return torch.tensor(values, dtype=torch.int64)

    return StaticTree(
        paths=paths,
        topk=topk,
        parent=t(parent),
        depth=t(depth),
        rank=t(rank),
        retrive_next_token=t(next_token),
        retrive_next_sibling=t(next_sibling),
        mask=mask,
        expand_slots=t(expand_slots),
        expand_row=t(expand_row),
        token_source=t(token_source),
    )
