"""Greedy verification of a draft tree against the target's argmax (SGLang's ``verify_tree_greedy``).

Walking down from the root, each node accepts its first child, in sibling order, whose draft token
equals the target's argmax at that node; the walk stops at a node where no child matches (or at a
leaf, or after ``num_spec_steps - 1`` accepted drafts). The target's argmax at the last accepted node
is the bonus token. Tree layout (SGLang's, DESIGN §4): ``retrive_index[b, s]`` is the flat row of
slot ``s`` (``b*n + s`` in practice), ``retrive_next_token[b, s]`` its first child (-1: leaf) and
``retrive_next_sibling[b, s]`` its next sibling (-1: none). As in sgl-kernel, candidates are read by
slot and ``target_predict`` / ``predicts`` by flat row.

Kernels: the reference scans child lists like SGLang's one-thread kernel, vectorised over the batch.
The Triton kernel (one program per sequence) instead resolves every slot's parent and sibling rank
at once by pointer jumping, compares every slot's token with its parent's target in parallel, and
then follows the path with one vector reduction per accepted level, so a sequence costs
``O(log n + depth)`` vector steps, independent of the batch size.
"""

from __future__ import annotations

import math

import torch

from eagle_kernels import _ext
from eagle_kernels._backend import debug_checks_enabled, eager_fast_path, select_backend
from eagle_kernels._checks import INDEX_DTYPES, SignatureCache, check_same_dtype, check_tensor
from eagle_kernels._triton import launches_on_input_device, tl, triton

OP = "verify_tree_greedy"
INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def verify_tree_greedy_ref(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
    num_spec_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch definition of the op (see :func:`verify_tree_greedy`), vectorised over the batch.

    At every level each still-active sequence scans its current node's child list in sibling order
    (at most ``n`` hops) and accepts the first child whose token equals the target at the node.
    """
    B, n = candidates.shape
    device = candidates.device
    on_cpu = device.type == "cpu"
    cand = candidates.long()
    row_of = retrive_index.long()
    first_child = retrive_next_token.long()
    next_sibling = retrive_next_sibling.long()
    target_at_row = target_predict.reshape(-1).long()
    seqs = torch.arange(B, device=device)

    predicts = torch.zeros(B * n, dtype=torch.int32, device=device)
    accept_index = torch.full((B, num_spec_steps), -1, dtype=torch.int32, device=device)
    accept_token_num = torch.zeros(B, dtype=torch.int32, device=device)
    cur = torch.zeros(B, dtype=torch.long, device=device)
    cur_row = row_of[:, 0]
    accept_index[:, 0] = cur_row.to(torch.int32)
    active = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(1, num_spec_steps):
        target = target_at_row[cur_row]
        child = torch.where(active, first_child[seqs, cur], -1)
        chosen = torch.full_like(child, -1)
        for _ in range(n):  # a child list has fewer than n entries
            scanning = child >= 0
            if on_cpu and not bool(scanning.any()):
                break
            safe = child.clamp(min=0)
            hit = scanning & (cand[seqs, safe] == target)
            chosen = torch.where(hit, child, chosen)
            child = torch.where(scanning & ~hit, next_sibling[seqs, safe], -1)
        accepted = chosen >= 0
        if on_cpu and not bool(accepted.any()):
            break
        chosen_safe = chosen.clamp(min=0)
        chosen_row = row_of[seqs, chosen_safe]
        predicts[cur_row] = torch.where(accepted, target.to(torch.int32), predicts[cur_row])
        accept_index[:, step] = torch.where(accepted, chosen_row, -1).to(torch.int32)
        accept_token_num += accepted.to(torch.int32)
        cur = torch.where(accepted, chosen, cur)
        cur_row = torch.where(accepted, chosen_row, cur_row)
        active = accepted
    predicts[cur_row] = target_at_row[cur_row].to(torch.int32)
    return predicts, accept_index, accept_token_num


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _verify_tree_greedy_kernel(
    cand_ptr,
    row_ptr,
    first_child_ptr,
    next_sibling_ptr,
    target_ptr,
    link_ptr,
    predicts_ptr,
    accept_index_ptr,
    accept_num_ptr,
    n,
    num_steps,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    LOG_N: tl.constexpr,
):
    """One program per sequence.

    1. Invert the links: ``link[c]`` = the parent ``p`` when ``c`` is ``p``'s first child, else
       ``n + s`` when ``c`` is the next sibling of ``s`` (scattered through a scratch row).
    2. Pointer jumping (``LOG_N`` rounds) turns every sibling link into the parent and counts the
       hops, which is the slot's rank among its siblings.
    3. Every slot checks ``candidate == target at its parent`` at once; the walk then takes, per
       level, the matching child of the current node with the lowest rank (one min-reduction).
    Malformed trees (detected on CPU / in debug mode before launch) can only give wrong paths here,
    never out-of-bounds accesses or an unbounded loop.
    """
    b = tl.program_id(0)
    base = b.to(tl.int64) * n
    slots = tl.arange(0, BLOCK_N)
    in_tree = slots < n
    first_child = tl.load(first_child_ptr + base + slots, mask=in_tree, other=-1).to(tl.int32)
    next_sibling = tl.load(next_sibling_ptr + base + slots, mask=in_tree, other=-1).to(tl.int32)
    first_child = tl.where((first_child >= 0) & (first_child < n), first_child, -1)
    next_sibling = tl.where((next_sibling >= 0) & (next_sibling < n), next_sibling, -1)

    tl.store(link_ptr + base + slots, tl.full([BLOCK_N], -1, tl.int32), mask=in_tree)
    tl.debug_barrier()
    tl.store(link_ptr + base + first_child, slots, mask=first_child >= 0)
    tl.store(link_ptr + base + next_sibling, slots + n, mask=next_sibling >= 0)
    tl.debug_barrier()
    link = tl.load(link_ptr + base + slots, mask=in_tree, other=-1)

    rank = tl.where(link >= n, 1, 0)
    for _ in tl.static_range(LOG_N):
        via_sibling = link >= n
        left = tl.where(via_sibling, link - n, 0)
        left_link = tl.gather(link, left, 0)
        left_rank = tl.gather(rank, left, 0)
        link = tl.where(via_sibling, left_link, link)
        rank = tl.where(via_sibling, rank + left_rank, rank)
    parent = tl.where(link < n, link, -1)  # still a sibling link only inside a cycle

    rows = tl.load(row_ptr + base + slots, mask=in_tree, other=0).to(tl.int64)
    lo_row = base
    hi_row = base + n
    parent_row = tl.gather(rows, tl.maximum(parent, 0), 0)
    parent_row = tl.where((parent_row >= lo_row) & (parent_row < hi_row), parent_row, lo_row)
    target_at_parent = tl.load(target_ptr + parent_row, mask=in_tree & (parent >= 0), other=0).to(tl.int64)
    cand = tl.load(cand_ptr + base + slots, mask=in_tree, other=0).to(tl.int64)
    matches = in_tree & (parent >= 0) & (cand == target_at_parent)

    NONE: tl.constexpr = 2147483647
    step_ids = tl.arange(0, BLOCK_S)
    root_row = tl.load(row_ptr + base).to(tl.int64)
    root_row = tl.where((root_row >= lo_row) & (root_row < hi_row), root_row, lo_row)
    accepted_rows = tl.where(step_ids == 0, root_row, -1)
    cur = tl.zeros([], dtype=tl.int32)
    cur_row = root_row
    count = tl.zeros([], dtype=tl.int32)
    walking = count == 0
    for step in range(1, num_steps):
        order = tl.where(matches & (parent == cur), rank * BLOCK_N + slots, NONE)
        best = tl.min(order, 0)
        take = walking & (best < NONE)
        child = tl.where(take, best % BLOCK_N, 0)
        child_row = tl.load(row_ptr + base + child).to(tl.int64)
        take = take & (child_row >= lo_row) & (child_row < hi_row)
        child_token = tl.load(cand_ptr + base + child)
        tl.store(predicts_ptr + cur_row, child_token.to(tl.int32), mask=take)
        accepted_rows = tl.where((step_ids == step) & take, child_row, accepted_rows)
        cur = tl.where(take, child, cur)
        cur_row = tl.where(take, child_row, cur_row)
        count += take.to(tl.int32)
        walking = take
    bonus = tl.load(target_ptr + cur_row).to(tl.int32)
    tl.store(predicts_ptr + cur_row, bonus)
    tl.store(
        accept_index_ptr + b.to(tl.int64) * num_steps + step_ids,
        accepted_rows.to(tl.int32),
        mask=step_ids < num_steps,
    )
    tl.store(accept_num_ptr + b, count)


# The Triton walk orders a node's children by the int32 key rank * next_pow2(n) + slot: past 2**15
# slots it would wrap negative and read before the inputs.
TRITON_MAX_TREE_SLOTS = 2**15
CUDA_MAX_TREE_SLOTS = 2048  # EAGLE_VERIFY_TREE_GREEDY_MAX_N of csrc/cuda/verify_tree_greedy.cuh


@launches_on_input_device
def _verify_tree_greedy_triton(
    candidates, retrive_index, retrive_next_token, retrive_next_sibling, target_predict, num_spec_steps
):
    B, n = candidates.shape
    if n > TRITON_MAX_TREE_SLOTS:
        raise ValueError(
            f"the Triton kernel takes trees of at most {TRITON_MAX_TREE_SLOTS} slots per sequence, got n={n} "
            "(the C++ backend and the reference take any size)"
        )
    device = candidates.device
    predicts = torch.zeros(B * n, dtype=torch.int32, device=device)
    accept_index = torch.empty(B, num_spec_steps, dtype=torch.int32, device=device)
    accept_token_num = torch.empty(B, dtype=torch.int32, device=device)
    if B == 0:
        return predicts, accept_index, accept_token_num
    link = torch.empty(B, n, dtype=torch.int32, device=device)
    block_n = triton.next_power_of_2(n)
    _verify_tree_greedy_kernel[(B,)](
        candidates.contiguous(),
        retrive_index.contiguous(),
        retrive_next_token.contiguous(),
        retrive_next_sibling.contiguous(),
        target_predict.contiguous(),
        link,
        predicts,
        accept_index,
        accept_token_num,
        n,
        num_spec_steps,
        BLOCK_N=block_n,
        BLOCK_S=triton.next_power_of_2(num_spec_steps),
        LOG_N=max(1, math.ceil(math.log2(n))) if n > 1 else 1,
        num_warps=4 if block_n <= 256 else 8,
    )
    return predicts, accept_index, accept_token_num


# --------------------------------------------------------------------------------------------------
# Value checks (CPU always; CUDA only in debug mode; the C++ kernel performs them itself)
# --------------------------------------------------------------------------------------------------
def _check_values(candidates, retrive_index, retrive_next_token, retrive_next_sibling, target_predict):
    B, n = candidates.shape
    if B == 0:
        return
    rows = retrive_index.long().cpu()
    first_child = retrive_next_token.long().cpu()
    next_sibling = retrive_next_sibling.long().cpu()
    target = target_predict.long().cpu()
    own_rows = torch.arange(B)[:, None] * n
    if bool(((rows < own_rows) | (rows >= own_rows + n)).any()):
        raise ValueError(
            "retrive_index is out of range: slot s of sequence b must map to a row in [b*n, b*n+n)"
        )
    if not torch.equal(rows.sort(dim=1).values, own_rows + torch.arange(n)):
        raise ValueError("retrive_index must map the n slots of each sequence to n distinct rows")
    for name, links in (("retrive_next_token", first_child), ("retrive_next_sibling", next_sibling)):
        if bool(((links < -1) | (links >= n)).any()):
            raise ValueError(f"{name} is out of range: entries must be -1 or a slot in [0, {n})")
    if bool(((target < 0) | (target > INT32_MAX)).any()):
        raise ValueError("target_predict is out of range: token ids must be in [0, 2**31)")
    if bool((next_sibling[:, 0] != -1).any()):
        raise ValueError(
            "the root (slot 0) cannot have a next sibling (retrive_next_sibling[:, 0] must be -1)"
        )
    _check_links_form_a_forest(first_child, next_sibling)


def _check_links_form_a_forest(first_child: torch.Tensor, next_sibling: torch.Tensor) -> None:
    """Every slot is the target of at most one link, the root of none, and following links
    backwards from any slot ends (no cycle)."""
    B, n = first_child.shape
    sources = torch.arange(n).expand(B, n)
    in_degree = torch.zeros(B, n + 1, dtype=torch.long)
    pred = torch.full((B, n + 1), -1, dtype=torch.long)
    for links in (first_child, next_sibling):
        dest = torch.where(links >= 0, links, n)  # column n collects the -1 entries
        in_degree.scatter_add_(1, dest, torch.ones_like(dest))
        pred.scatter_(1, dest, sources)
    in_degree, pred = in_degree[:, :n], pred[:, :n]
    if bool((in_degree[:, 0] > 0).any()):
        raise ValueError("cycle in the tree arrays: a link points back to the root (slot 0)")
    if bool((in_degree > 1).any()):
        b, s = (in_degree > 1).nonzero()[0].tolist()
        raise ValueError(
            f"cycle or shared node in the tree arrays: slot {s} of sequence {b} is linked more than once"
        )
    rounds = max(1, math.ceil(math.log2(n))) + 1  # pointer jumping: 2**k >= n ancestors
    root = pred
    for _ in range(rounds):
        root = torch.where(root >= 0, root.gather(1, root.clamp(min=0)), root)
    if bool((root >= 0).any()):
        b = int((root >= 0).any(1).nonzero()[0])
        raise ValueError(
            f"cycle in the tree arrays of sequence {b} (retrive_next_token / retrive_next_sibling)"
        )
    _check_children_follow_their_parents(first_child, next_sibling, pred, rounds)


def _check_children_follow_their_parents(first_child, next_sibling, pred, rounds: int) -> None:
    """Every slot's parent (the slot whose first child starts the sibling chain it is on) is an
    earlier slot, as in SGLang's build_tree (sibling order is free): an accepted path then lists
    increasing slots, which compact_kv_cache's in-place moves rely on. ``pred``: the slot linking to
    each slot (-1: none); the arrays are a forest (checked before)."""
    B, n = first_child.shape
    via_sibling = torch.zeros(B, n, dtype=torch.bool)
    via_sibling.scatter_(1, next_sibling.clamp(min=0), next_sibling >= 0)
    # Pointer doubling: while ``sibling[s]``, s's parent is that of ``up[s]`` (s entered its chain by
    # a sibling link from it); once false, ``up[s]`` is the parent itself (or -1 for the root).
    up, sibling = pred, via_sibling
    for _ in range(rounds):
        at = up.clamp(min=0)
        up, sibling = torch.where(sibling, up.gather(1, at), up), sibling & sibling.gather(1, at)
    parent = up
    slots = torch.arange(n).expand(B, n)
    bad = (parent >= 0) & (parent >= slots)
    if bool(bad.any()):
        b, s = bad.nonzero()[0].tolist()
        raise ValueError(
            f"a child must come after its parent in the tree arrays: slot {s} of sequence {b} is a "
            f"child of slot {int(parent[b, s])}"
        )


# --------------------------------------------------------------------------------------------------
# Registered op and dispatch
# --------------------------------------------------------------------------------------------------
def _run_verify_tree_greedy(
    candidates, retrive_index, retrive_next_token, retrive_next_sibling, target_predict, num_spec_steps
):
    """The op's body: value checks where due, then the backend chosen for the tensors' device."""
    # The CUDA kernel holds a tree in one block's shared memory; larger ones go to Triton (unless the
    # CUDA backend is forced, which then raises naming the limit).
    fits_cuda = candidates.shape[1] <= CUDA_MAX_TREE_SLOTS
    backend = select_backend(OP, candidates.device, prefer_cuda_ext=None if fits_cuda else False)
    args = (candidates, retrive_index, retrive_next_token, retrive_next_sibling, target_predict)
    if backend != "cpp" and (candidates.device.type == "cpu" or debug_checks_enabled()):
        _check_values(*args)
    if backend in ("cpp", "cuda"):
        return _ext.op(OP)(*args, num_spec_steps)
    if backend == "triton":
        return _verify_tree_greedy_triton(*args, num_spec_steps)
    return verify_tree_greedy_ref(*args, num_spec_steps)


@torch.library.custom_op("eagle::verify_tree_greedy", mutates_args=())
def _verify_tree_greedy_op(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
    num_spec_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (candidates, retrive_index, retrive_next_token, retrive_next_sibling, target_predict)
    _CHECKED.run(_check_args, *args, num_spec_steps)  # a cache hit after the public function's check
    return _run_verify_tree_greedy(*args, num_spec_steps)


@_verify_tree_greedy_op.register_fake
def _(candidates, retrive_index, retrive_next_token, retrive_next_sibling, target_predict, num_spec_steps):
    B, n = candidates.shape
    return (
        candidates.new_empty(B * n, dtype=torch.int32),
        candidates.new_empty(B, num_spec_steps, dtype=torch.int32),
        candidates.new_empty(B, dtype=torch.int32),
    )


def _check_args(candidates, retrive_index, retrive_next_token, retrive_next_sibling, target_predict, steps):
    """Shapes, dtypes, devices and ``num_spec_steps`` (no value reads: the verdict depends only on the
    call's signature, so :data:`_CHECKED` skips a signature that already passed)."""
    check_tensor("candidates", candidates, ndim=2, dtypes=INDEX_DTYPES)
    B, n = candidates.shape
    device = candidates.device
    for name, t in (
        ("retrive_index", retrive_index),
        ("retrive_next_token", retrive_next_token),
        ("retrive_next_sibling", retrive_next_sibling),
        ("target_predict", target_predict),
    ):
        check_tensor(name, t, dtypes=INDEX_DTYPES, device=device, shape=(B, n))
    check_same_dtype(
        retrive_index=retrive_index,
        retrive_next_token=retrive_next_token,
        retrive_next_sibling=retrive_next_sibling,
    )
    if n < 1:
        raise ValueError("candidates must have at least one slot per sequence (the root), got n=0")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_spec_steps must be an int >= 1 (root plus drafts), got {steps!r}")


_CHECKED = SignatureCache()


def verify_tree_greedy(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
    *,
    num_spec_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept the longest draft path that agrees with the target's greedy choices.

    From the root, each node accepts its first child (in sibling order) whose token equals the
    target's argmax at that node; the walk stops when no child matches, at a leaf, or after
    ``num_spec_steps - 1`` accepted drafts.

    Parameters
    ----------
    candidates : Tensor ``[B, n]``, int32 or int64
        Token of each tree slot; slot 0 is the root (the last committed token).
    retrive_index : Tensor ``[B, n]``, int32 or int64
        Flat row of each slot, a permutation of ``b*n .. b*n+n-1`` per sequence (``b*n + s`` in
        SGLang's layout). ``target_predict`` and ``predicts`` are indexed by these rows.
    retrive_next_token : Tensor ``[B, n]``, same dtype as ``retrive_index``
        First child slot of each slot, -1 for a leaf. Children come after their parent (slot > parent,
        as SGLang's build_tree makes them), so an accepted path lists increasing slots.
    retrive_next_sibling : Tensor ``[B, n]``, same dtype as ``retrive_index``
        Next sibling slot, -1 for the last child (and for the root); any order of siblings.
    target_predict : Tensor ``[B, n]``, int32 or int64
        The target's argmax token at each row: ``target_predict.view(-1)[retrive_index[b, s]]``
        belongs to slot ``s`` (simply ``target_predict[b, s]`` when ``retrive_index[b, s] = b*n + s``).
    num_spec_steps : int
        Columns of ``accept_index``: the root plus at most ``num_spec_steps - 1`` accepted drafts.

    Returns
    -------
    predicts : Tensor ``[B * n]``, int32
        At the row of every accepted node, the token that follows it: the accepted child's token,
        and at the last accepted node the target's argmax there (the bonus token). Rows off the
        accepted path are 0.
    accept_index : Tensor ``[B, num_spec_steps]``, int32
        Rows (``retrive_index`` values) of the accepted nodes, root first, then -1.
    accept_token_num : Tensor ``[B]``, int32
        Accepted drafts per sequence, root and bonus excluded.

    Raises
    ------
    ValueError / TypeError
        Bad shapes, dtypes or devices; on CPU (on CUDA with ``EAGLE_KERNELS_DEBUG=1``) also slots or
        rows out of range, a slot linked twice, a cycle or a child before its parent in the tree
        arrays, target tokens outside
        ``[0, 2**31)``. On CUDA without debug checks a malformed tree gives a wrong path but never an
        out-of-bounds access or a hang: every walk is bounded by ``n`` and ``num_spec_steps``.
    """
    args = (candidates, retrive_index, retrive_next_token, retrive_next_sibling, target_predict)
    _CHECKED.run(_check_args, *args, num_spec_steps)
    if eager_fast_path(*args):
        return _run_verify_tree_greedy(*args, num_spec_steps)
    return torch.ops.eagle.verify_tree_greedy(*args, num_spec_steps)


def sglang_verify_tree_greedy(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
    cuda_stream: int | None = None,
) -> None:
    """Drop-in for sgl-kernel's ``verify_tree_greedy``: same arguments, outputs written in place.

    ``predicts [>= B*n]`` (its first ``B*n`` entries; SGLang allocates ``B*n + 1``),
    ``accept_index [B, num_spec_steps]`` and ``accept_token_num [B]`` are int32 and mutated; ``num_spec_steps`` is taken from ``accept_index.shape[1]``. As in sgl-kernel,
    ``predicts`` changes only at the accepted rows; ``accept_index`` is written whole (entries past
    the path become -1, which is what SGLang callers pre-fill). ``cuda_stream`` (accepted for the
    builds whose binding took it) is ignored: work goes to the current stream.
    """
    check_tensor("candidates", candidates, ndim=2, dtypes=INDEX_DTYPES)
    B, n = candidates.shape
    for name, t, shape in (
        ("predicts", predicts, (None,)),
        ("accept_index", accept_index, (B, None)),
        ("accept_token_num", accept_token_num, (B,)),
    ):
        check_tensor(name, t, dtypes=(torch.int32,), device=candidates.device, shape=shape)
    if predicts.shape[0] < B * n:
        raise ValueError(f"predicts must have at least B*n={B * n} entries, got shape {list(predicts.shape)}")
    predicts = predicts[: B * n]  # SGLang allocates B*n + 1; the tail is left alone
    new_predicts, new_index, new_num = verify_tree_greedy(
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        target_predict,
        num_spec_steps=accept_index.shape[1],
    )
    on_path = torch.zeros(B * n + 1, dtype=torch.bool, device=predicts.device)
    path_rows = torch.where(new_index >= 0, new_index, B * n).reshape(-1).long()
    on_path.scatter_(0, path_rows, True)
    predicts.copy_(torch.where(on_path[: B * n], new_predicts, predicts))
    accept_index.copy_(new_index)
    accept_token_num.copy_(new_num)
