"""Lossless tree speculative sampling (multi-draft recursive rejection sampling).

The target model scored every node of a draft tree in one forward pass; ``target_probs[b, s]`` is its
(already warped) next-token distribution at tree slot ``s``. Starting at the root, one child after
the other is tried against that distribution; the first accepted child becomes the new node, and
when a node's children are all rejected (or the walk reaches a leaf or ``num_spec_steps - 1``
accepted drafts) one more token, the *bonus*, is drawn from what is left of the distribution. The
emitted tokens are then distributed exactly as if the target had sampled them one by one.

Two draft models are supported:

* :func:`tree_speculative_sampling` -- deterministic drafts (EAGLE-2 top-k, static top-k trees,
  n-gram): the children of a node are *fixed* tokens given the context. The draft "distribution" of
  each child is a point mass, so child ``x`` is accepted with probability
  ``p(x) / (1 - mass of the siblings already rejected)`` and the bonus after a full rejection is
  drawn from ``p`` with the tried tokens removed. This is what SGLang's
  ``tree_speculative_sampling_target_only`` does with thresholds 1.
* :func:`tree_speculative_sampling_draft_probs` -- sampled drafts: the children of a node were drawn
  i.i.d. from the draft distribution ``q`` at that node (SpecInfer's recursive rejection sampling).

Uniforms are inputs, so every backend returns bit-identical results for the same inputs. To make
that hold whatever order a backend reduces the vocabulary in, the bonus is drawn from *integer*
masses: ``mass(x) = trunc(r(x) * 2**60)`` (exact for float32 probabilities down to 2**-60), summed
in int64, and the sampled token is the first ``x`` whose cumulative mass exceeds
``trunc(float64(u) * float64(total))``. The walk itself adds float32 probabilities one sibling at a
time in sibling order, which is the same sequence of roundings everywhere.

Validation is fused into the kernels: each backend returns a per-sequence status word (see
``STATUS_MESSAGES``) covering the whole tree structure, every token and uniform, and every
probability the walk *reads* (each tried child's probability, the full row the bonus is drawn
from, and for sampled drafts every row a residual is computed on). Scanning all ``B * n * V``
probabilities would cost far more than the op itself; set ``EAGLE_KERNELS_DEBUG=1`` to also scan
every row. On CPU the status is always turned into a ``ValueError``; on CUDA only in debug mode
(reading it synchronises with the host).

Backends: PyTorch reference (the definition, vectorised over the batch), Triton (one program per
sequence), C++ CPU (``csrc/cpu``, parallel over the batch) and a CUDA kernel (``csrc/cuda``, one block
per sequence). On CUDA tensors the CUDA kernel is the default where the extension is built (its eager
calls measured 2-3x cheaper than Triton's at about the same kernel time on an H200:
``eagle_kernels._backend.CUDA_EXT_FIRST``), else Triton; ``EAGLE_KERNELS_BACKEND`` picks either.
"""

from __future__ import annotations

import torch

from eagle_kernels import _ext
from eagle_kernels._backend import debug_checks_enabled, eager_fast_path, select_backend
from eagle_kernels._checks import INDEX_DTYPES, SignatureCache, check_same_dtype, check_tensor
from eagle_kernels._triton import launches_on_input_device, tl, triton

OP = "tree_speculative_sampling"

# Probabilities may exceed 1 / rows may miss 1 by this much (float32 softmax + renormalisation error).
PROB_TOL = 1e-3
# float32(1 + PROB_TOL): the bound every backend compares a single probability against.
PROB_LIMIT = float(torch.tensor(1.0 + PROB_TOL, dtype=torch.float32))
MASS_SCALE = 2.0**60  # fixed-point scale of the integer masses the bonus token is drawn from

# Status bits (per sequence), shared with csrc/cpu/tree_speculative_sampling.h and the CUDA kernel.
BAD_TREE = 1
BAD_TOKEN = 2
BAD_UNIFORM = 4
BAD_PROB = 8
BAD_ROW = 16
DUP_SIBLING = 32
BAD_DRAFT = 64

STATUS_MESSAGES = {
    BAD_TREE: "malformed tree: every child must come after its parent (retrive_next_token holds -1 or a "
    "later slot < num_draft_tokens; retrive_next_sibling -1 or another slot in 1 .. num_draft_tokens-1, "
    "siblings in any order, but a sibling of a later slot than its parent), the root has no sibling, no "
    "slot has two incoming links, and retrive_index[b] must be a permutation of the rows b*n .. b*n+n-1",
    BAD_TOKEN: "a candidate token is outside [0, vocab_size)",
    BAD_UNIFORM: "a uniform sample is outside [0, 1) or NaN",
    BAD_PROB: "a probability read by the walk is NaN, negative or above 1, or the children of a node "
    "carry more than probability 1",
    BAD_ROW: "a probability row the op samples from has NaN, infinite or negative entries, or does "
    f"not sum to 1 (tolerance {PROB_TOL})",
    DUP_SIBLING: "two siblings carry the same token; deterministic (top-k) drafts are distinct "
    "(use tree_speculative_sampling_draft_probs for sampled drafts)",
    BAD_DRAFT: "a draft token has zero draft probability, so it cannot have been sampled from draft_probs",
}


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def _valid_prob(p: torch.Tensor) -> torch.Tensor:
    return (p >= 0) & (p <= PROB_LIMIT)


def _masses(r: torch.Tensor) -> torch.Tensor:
    """Fixed-point masses: trunc(r * 2**60) as int64 (exact scaling, so float32 or float64 agree)."""
    return (r * MASS_SCALE).to(torch.int64)


def _residual(p: torch.Tensor, q: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
    """``max(0, p - s*q)`` in float64 with invalid entries zeroed; rows [B, V], ``s`` [B] float64."""
    pc = torch.where(_valid_prob(p), p, 0.0)
    if q is None:
        return pc
    qc = torch.where(_valid_prob(q), q, 0.0).double()
    return torch.clamp_min(pc.double() - s[:, None] * qc, 0.0)


def _row_status(rows: torch.Tensor) -> torch.Tensor:
    """BAD_ROW where a full row [B, V] has invalid entries or does not sum to 1, else 0 ([B] int32)."""
    ok = _valid_prob(rows)
    total = torch.where(ok, rows, 0.0).double().sum(-1)
    bad = ~ok.all(-1) | ((total - 1.0).abs() > PROB_TOL)
    return torch.where(bad, BAD_ROW, 0).to(torch.int32)


def _inverse_cdf(masses: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First index whose cumulative mass exceeds trunc(u * total), per row of int64 ``masses``."""
    total = masses.sum(-1)
    threshold = (u.double() * total.double()).to(torch.int64)
    below = (masses.cumsum(-1) <= threshold[:, None]).sum(-1)
    return below.clamp(max=masses.shape[-1] - 1)


def _sample_bonus(p, q, s, tried, u):
    """Bonus token per sequence from the residual at its last node.

    ``p``/``q``: [B, V] rows; ``s``: [B] float64 draft-mass multiplier (0: no draft subtraction);
    ``tried``: [B, k] tokens to remove (-1 = none). A residual without mass (possible only through
    rounding) falls back to ``p`` itself.
    """
    B, V = p.shape
    masses = _masses(_residual(p, q, s))
    drop = torch.zeros(B, V + 1, dtype=torch.bool, device=p.device)
    drop.scatter_(1, torch.where(tried >= 0, tried, V), True)
    residual = torch.where(drop[:, :V], 0, masses)
    empty = residual.sum(-1) == 0
    full = _masses(_residual(p, None, s))
    return _inverse_cdf(torch.where(empty[:, None], full, residual), u)


def _tree_status(candidates, retrive_index, next_token, next_sibling, uniforms, uniform_final, V):
    """Structure / token / uniform checks of every sequence, as status bits [B] int32."""
    B, n = candidates.shape
    device = candidates.device
    slots = torch.arange(n, device=device)
    bad_tree = torch.zeros(B, dtype=torch.bool, device=device)
    # A child comes after its parent; siblings may sit in any order (SGLang's trees link some
    # backwards). One incoming link per slot and none into the root keep every walk finite: a cycle
    # reached from the root would need a slot with two incoming links.
    bad_tree |= ((next_token != -1) & ((next_token <= slots) | (next_token >= n))).any(-1)
    bad_tree |= (
        (next_sibling != -1) & ((next_sibling < 1) | (next_sibling >= n) | (next_sibling == slots))
    ).any(-1)
    bad_tree |= next_sibling[:, 0] != -1
    links = torch.cat([next_token, next_sibling], dim=1)
    indegree = torch.zeros(B, n + 1, dtype=torch.int64, device=device)
    indegree.scatter_add_(1, torch.where((links > 0) & (links < n), links, n), torch.ones_like(links))
    bad_tree |= (indegree[:, :n] > 1).any(-1)
    rows = retrive_index - torch.arange(B, device=device)[:, None] * n
    seen = torch.zeros(B, n + 1, dtype=torch.int64, device=device)
    seen.scatter_add_(1, torch.where((rows >= 0) & (rows < n), rows, n), torch.ones_like(rows))
    bad_tree |= (seen[:, :n] != 1).any(-1)
    bad_token = ((candidates[:, 1:] < 0) | (candidates[:, 1:] >= V)).any(-1)
    ok_u = ((uniforms >= 0) & (uniforms < 1)).all(-1) & (uniform_final >= 0) & (uniform_final < 1)
    status = torch.where(bad_tree, BAD_TREE, 0) | torch.where(bad_token, BAD_TOKEN, 0)
    return (status | torch.where(ok_u, 0, BAD_UNIFORM)).to(torch.int32)


def _flag(status: torch.Tensor, where: torch.Tensor, bit: int) -> torch.Tensor:
    return status | torch.where(where, bit, 0).to(torch.int32)


def _try_children_topk(probs, cand, nt, ns, cur, active, coin, status, lossy, threshold_single, t_acc):
    """One level for deterministic drafts: every active sequence tries the children of its node
    ``cur`` in sibling order. Returns (chosen child slot or -1, rejected tokens [B, n] (-1 padded),
    status)."""
    B, n = cand.shape
    bidx = torch.arange(B, device=cand.device)
    child = torch.where(active, nt[bidx, cur], -1)
    chosen = torch.full_like(child, -1)
    tried = torch.full((B, n), -1, dtype=torch.int64, device=cand.device)
    k = torch.zeros_like(child)
    acc = torch.zeros(B, dtype=torch.float32, device=cand.device)  # float32, added in sibling order
    while bool((child != -1).any()):
        trying = child != -1
        c = child.clamp(min=0)
        tok = cand[bidx, c]
        p = probs[bidx, cur, tok]
        status = _flag(status, trying & ~_valid_prob(p), BAD_PROB)
        pc = torch.where(_valid_prob(p), p, 0.0)
        dup = (tried == tok[:, None]).any(-1)
        if lossy:  # SGLang's relaxed rule, verbatim (a repeated token counts twice)
            acc = torch.where(trying, acc + pc, acc)
            accept = trying & ((coin <= acc / t_acc) | (pc >= threshold_single))
        else:
            status = _flag(status, trying & dup, DUP_SIBLING)
            acc = torch.where(trying & ~dup, acc + pc, acc)
            accept = trying & (coin < acc)
        record = trying & ~accept & ~dup
        tried[bidx[record], k[record]] = tok[record]
        k += record.long()
        chosen = torch.where(accept, child, chosen)
        child = torch.where(trying & ~accept, ns[bidx, c], -1)
    return chosen, tried, _flag(status, acc > PROB_LIMIT, BAD_PROB)


def _try_children_sampled(probs, draft, cand, nt, ns, cur, active, uniforms, status):
    """One level for sampled drafts (recursive rejection sampling with i.i.d. siblings). Returns
    (chosen child slot or -1, the residual multiplier S of the node after its rejections, status)."""
    B = cand.shape[0]
    bidx = torch.arange(B, device=cand.device)
    child = torch.where(active, nt[bidx, cur], -1)
    chosen = torch.full_like(child, -1)
    s = torch.zeros(B, dtype=torch.float64, device=cand.device)  # S_(j-1)
    w = torch.ones(B, dtype=torch.float64, device=cand.device)  # W_j, mass of max(0, p - S_(j-1) q)
    rows = None  # the nodes' full rows, gathered at the first rejection
    scanned = torch.zeros(B, dtype=torch.bool, device=cand.device)  # rows a residual was computed on
    while bool((child != -1).any()):
        trying = child != -1
        c = child.clamp(min=0)
        tok = cand[bidx, c]
        p, q = probs[bidx, cur, tok], draft[bidx, cur, tok]
        status = _flag(status, trying & ~(_valid_prob(p) & _valid_prob(q)), BAD_PROB)
        qc = torch.where(_valid_prob(q), q, 0.0).double()
        status = _flag(status, trying & _valid_prob(q) & (qc == 0), BAD_DRAFT)
        r = torch.clamp_min(torch.where(_valid_prob(p), p, 0.0).double() - s * qc, 0.0)
        accept = trying & (uniforms[bidx, c].double() * w * qc < r) & (w > 0)
        rejected = trying & ~accept
        if bool(rejected.any()):
            if rows is None:
                rows = probs[bidx, cur], draft[bidx, cur]
            scanned |= rejected
            s = torch.where(rejected, s + w, s)
            w = torch.where(rejected, _masses(_residual(*rows, s)).sum(-1).double() / MASS_SCALE, w)
        chosen = torch.where(accept, child, chosen)
        child = torch.where(rejected, ns[bidx, c], -1)
    if rows is not None:
        status = _flag(status, scanned & ((_row_status(rows[0]) | _row_status(rows[1])) != 0), BAD_ROW)
    return chosen, s, status


def _tree_sampling_torch(
    candidates,
    retrive_index,
    retrive_next_token,
    retrive_next_sibling,
    target_probs,
    draft_probs,
    uniform_samples,
    uniform_final,
    num_spec_steps,
    lossy=False,
    threshold_single=1.0,
    threshold_acc=1.0,
):
    """The op, vectorised over the batch: returns (predicts, accept_index, accept_token_num, status)."""
    B, n, V = target_probs.shape
    device = target_probs.device
    cand, ri = candidates.long(), retrive_index.long()
    nt, ns = retrive_next_token.long(), retrive_next_sibling.long()
    status = _tree_status(cand, ri, nt, ns, uniform_samples, uniform_final, V)
    walkable = (status & (BAD_TREE | BAD_TOKEN)) == 0
    flat_rows = torch.arange(B * n, device=device).view(B, n)
    ri = torch.where(walkable[:, None], ri, flat_rows)  # never write outside a sequence's rows
    bidx = torch.arange(B, device=device)
    t_acc = torch.tensor(max(threshold_acc, 1e-9), dtype=torch.float32, device=device)

    predicts = torch.zeros(B * n, dtype=torch.int32, device=device)
    accept_index = torch.full((B, num_spec_steps), -1, dtype=torch.int32, device=device)
    accept_index[:, 0] = ri[:, 0].to(torch.int32)
    num = torch.zeros(B, dtype=torch.int64, device=device)
    cur = torch.zeros(B, dtype=torch.int64, device=device)
    coin = uniform_samples[:, 0]
    alive = walkable.clone()
    tried = torch.full((B, n), -1, dtype=torch.int64, device=device)  # rejected tokens at the last node
    s = torch.zeros(B, dtype=torch.float64, device=device)  # residual multiplier at the last node
    for _ in range(1, num_spec_steps):
        if not bool(alive.any()):
            break
        if draft_probs is None:
            chosen, level_tried, status = _try_children_topk(
                target_probs, cand, nt, ns, cur, alive, coin, status, lossy, threshold_single, t_acc
            )
            level_s = torch.zeros_like(s)
        else:
            chosen, level_s, status = _try_children_sampled(
                target_probs, draft_probs, cand, nt, ns, cur, alive, uniform_samples, status
            )
            level_tried = torch.full_like(tried, -1)
        # A sibling linked backwards can put a child before its parent: the path must go forward
        # (compact_kv_cache moves rows in place), so such a child ends the walk as a bad tree.
        backwards = (chosen != -1) & (chosen <= cur)
        status = _flag(status, backwards, BAD_TREE)
        chosen = torch.where(backwards, -1, chosen)
        got = chosen != -1
        stopped = alive & ~got
        tried = torch.where(stopped[:, None], level_tried, tried)
        s = torch.where(stopped, level_s, s)
        g = bidx[got]
        predicts[ri[g, cur[got]]] = cand[g, chosen[got]].to(torch.int32)
        num += got.long()
        accept_index[g, num[got]] = ri[g, chosen[got]].to(torch.int32)
        cur = torch.where(got, chosen, cur)
        coin = torch.where(got, uniform_samples[bidx, cur], coin)
        alive &= got

    p_last = target_probs[bidx, cur]
    q_last = None if draft_probs is None else draft_probs[bidx, cur]
    status |= _row_status(p_last)
    if q_last is not None:
        status |= torch.where(s > 0, _row_status(q_last), 0).to(torch.int32)
    bonus = _sample_bonus(p_last, q_last, s, tried, uniform_final)
    predicts[ri[bidx, cur]] = bonus.to(torch.int32)
    return predicts, accept_index, num.to(torch.int32), status


def tree_speculative_sampling_ref(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_probs: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_final: torch.Tensor,
    *,
    num_spec_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch definition of :func:`tree_speculative_sampling` (no input validation)."""
    out = _tree_sampling_torch(
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        target_probs,
        None,
        uniform_samples,
        uniform_final,
        num_spec_steps,
    )
    return out[:3]


def tree_speculative_sampling_draft_probs_ref(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_final: torch.Tensor,
    *,
    num_spec_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch definition of :func:`tree_speculative_sampling_draft_probs` (no input validation)."""
    out = _tree_sampling_torch(
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        target_probs,
        draft_probs,
        uniform_samples,
        uniform_final,
        num_spec_steps,
    )
    return out[:3]


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per sequence. The walk is scalar; every vocabulary reduction runs over
# BLOCK_V-wide vectors, and per-block masses are kept in a [NB_PAD] register vector so the bonus
# search reads its row once plus one block.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _block_masses(p_row, q_row, offs, V, s, prob_limit, HAS_Q: tl.constexpr):
    """int64 masses of max(0, p - s*q) (or of p) at ``offs``, the count of invalid entries, and the
    float32 sums of the valid p and q entries (for the normalisation check)."""
    inside = offs < V
    p = tl.load(p_row + offs, mask=inside, other=0.0)
    p_ok = (p >= 0.0) & (p <= prob_limit)
    n_bad = tl.sum((inside & (p_ok == 0)).to(tl.int32))
    pc = tl.where(p_ok, p, 0.0)
    p_sum = tl.sum(pc)
    q_sum = p_sum * 0.0
    if HAS_Q:
        q = tl.load(q_row + offs, mask=inside, other=0.0)
        q_ok = (q >= 0.0) & (q <= prob_limit)
        n_bad += tl.sum((inside & (q_ok == 0)).to(tl.int32))
        qc = tl.where(q_ok, q, 0.0)
        q_sum = tl.sum(qc)
        r = tl.maximum(pc.to(tl.float64) - s * qc.to(tl.float64), 0.0)
        masses = (r * 1152921504606846976.0).to(tl.int64)
    else:
        masses = (pc * 1152921504606846976.0).to(tl.int64)
    return masses, n_bad, p_sum, q_sum


@triton.jit
def _row_block_masses(
    p_row, q_row, V, s, prob_limit, prob_tol, HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr, NB_PAD: tl.constexpr
):
    """Per-block int64 masses of a whole row ([NB_PAD]) and BAD_ROW (16) when the row is invalid."""
    blocks = tl.arange(0, NB_PAD)
    per_block = tl.zeros([NB_PAD], dtype=tl.int64)
    n_bad = tl.sum(tl.zeros([NB_PAD], dtype=tl.int32))
    p_sum = tl.sum(tl.zeros([NB_PAD], dtype=tl.float32))
    q_sum = p_sum
    for i in range(0, tl.cdiv(V, BLOCK_V)):
        offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
        masses, bad, ps, qs = _block_masses(p_row, q_row, offs, V, s, prob_limit, HAS_Q)
        per_block = tl.where(blocks == i, tl.sum(masses), per_block)
        n_bad += bad
        p_sum += ps
        q_sum += qs
    bad_row = (n_bad > 0) | (tl.abs(p_sum - 1.0) > prob_tol)
    if HAS_Q:
        bad_row = bad_row | (tl.abs(q_sum - 1.0) > prob_tol)
    return per_block, tl.where(bad_row, 16, 0)


@triton.jit
def _sample_residual(
    p_row,
    q_row,
    V,
    s,
    tried,
    n_tried,
    u,
    prob_limit,
    prob_tol,
    HAS_Q: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NB_PAD: tl.constexpr,
):
    """Inverse-CDF sample from the integer masses of max(0, p - s*q) with the first ``n_tried``
    tokens of ``tried`` removed, falling back to p when nothing is left. Returns (token, status)."""
    blocks = tl.arange(0, NB_PAD)
    lanes = tl.arange(0, tried.shape[0])
    per_block, status = _row_block_masses(p_row, q_row, V, s, prob_limit, prob_tol, HAS_Q, BLOCK_V, NB_PAD)
    residual = per_block
    for i in range(0, n_tried):  # a handful of rejected siblings: one scalar pass each
        token = tl.sum(tl.where(lanes == i, tried, 0))
        p = tl.load(p_row + token)
        mass = (tl.where((p >= 0.0) & (p <= prob_limit), p, 0.0) * 1152921504606846976.0).to(tl.int64)
        residual = tl.where(blocks == token // BLOCK_V, residual - mass, residual)
    exclude = tl.sum(residual) > 0
    if exclude == 0:
        s = s * 0.0
        if HAS_Q:
            per_block, _ = _row_block_masses(p_row, q_row, V, s, prob_limit, prob_tol, HAS_Q, BLOCK_V, NB_PAD)
        residual = per_block
    threshold = (u.to(tl.float64) * tl.sum(residual).to(tl.float64)).to(tl.int64)
    cum = tl.cumsum(residual, axis=0)
    blk = tl.min(tl.where(cum > threshold, blocks, NB_PAD))
    carry = tl.sum(tl.where(blocks == blk, cum - residual, 0))
    offs = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    masses, _, _, _ = _block_masses(p_row, q_row, offs, V, s, prob_limit, HAS_Q)
    if exclude:
        for i in range(0, n_tried):
            masses = tl.where(offs == tl.sum(tl.where(lanes == i, tried, 0)), 0, masses)
    cum_in = tl.cumsum(masses, axis=0) + carry
    token = tl.min(tl.where((cum_in > threshold) & (offs < V), offs, V))
    return tl.minimum(token, V - 1), status


@triton.jit
def _tree_status_vec(cand_ptr, ri_ptr, nt_ptr, ns_ptr, u_ptr, uf_ptr, b, n, V, N_PAD: tl.constexpr):
    """Status bits of sequence ``b``'s tree, tokens and uniforms, checked vectorised over slots."""
    slots = tl.arange(0, N_PAD)
    inside = slots < n
    base = b * n
    nt = tl.load(nt_ptr + base + slots, mask=inside, other=-1).to(tl.int64)
    ns = tl.load(ns_ptr + base + slots, mask=inside, other=-1).to(tl.int64)
    ri = tl.load(ri_ptr + base + slots, mask=inside, other=0).to(tl.int64) - base
    bad = inside & (nt != -1) & ((nt <= slots) | (nt >= n))
    bad |= inside & (ns != -1) & ((ns < 1) | (ns >= n) | (ns == slots) | (slots == 0))  # siblings: any order
    bad |= inside & ((ri < 0) | (ri >= n))
    links = tl.sum((nt[None, :] == slots[:, None]).to(tl.int32), axis=1)
    links += tl.sum((ns[None, :] == slots[:, None]).to(tl.int32), axis=1)
    rows = tl.sum(((ri[None, :] == slots[:, None]) & inside[None, :]).to(tl.int32), axis=1)
    bad |= inside & ((links > 1) | (rows != 1))
    status = tl.where(tl.max(bad.to(tl.int32)) > 0, 1, 0)
    tok = tl.load(cand_ptr + base + slots, mask=inside, other=0).to(tl.int64)
    bad_tok = inside & (slots > 0) & ((tok < 0) | (tok >= V))
    status |= tl.where(tl.max(bad_tok.to(tl.int32)) > 0, 2, 0)
    u = tl.load(u_ptr + base + slots, mask=inside, other=0.0)
    uf = tl.load(uf_ptr + b)
    bad_u = tl.max((inside & (((u >= 0.0) & (u < 1.0)) == 0)).to(tl.int32)) > 0
    bad_u = bad_u | (((uf >= 0.0) & (uf < 1.0)) == 0)
    return status | tl.where(bad_u, 4, 0)


# steps == 1 (the bonus token alone) would be compiled as a constant: Triton 3.6's sm_90 pipeline
# (torch 2.11's) then fails an assertion in its coalescing pass on the HAS_Q variant (3.9 does not).
@triton.jit(do_not_specialize=["steps"])
def _tree_sampling_kernel(
    cand_ptr,
    ri_ptr,
    nt_ptr,
    ns_ptr,
    p_ptr,
    q_ptr,
    u_ptr,
    uf_ptr,
    predicts_ptr,
    accept_ptr,
    num_ptr,
    status_ptr,
    n,
    V,
    steps,
    stride_pb,
    stride_pn,
    stride_qb,
    stride_qn,
    threshold_single,
    threshold_acc,
    prob_limit,
    prob_tol,
    HAS_Q: tl.constexpr,
    LOSSY: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NB_PAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    base = b * n
    slots = tl.arange(0, N_PAD)
    status = _tree_status_vec(cand_ptr, ri_ptr, nt_ptr, ns_ptr, u_ptr, uf_ptr, b, n, V, N_PAD)
    walkable = (status & 3) == 0
    ri_vec = tl.load(ri_ptr + base + slots, mask=slots < n, other=0).to(tl.int64)
    ri_vec = tl.where(walkable, ri_vec, base + slots)  # never write outside this sequence's rows
    pred_vec = tl.zeros([N_PAD], dtype=tl.int32)  # predicts by slot, stored once at the end
    acc_vec = tl.full([N_PAD], -1, dtype=tl.int32)  # accept_index by step
    acc_vec = tl.where(slots == 0, tl.sum(tl.where(slots == 0, ri_vec, 0)).to(tl.int32), acc_vec)

    cur = base * 0
    num = tl.sum(tl.zeros([N_PAD], dtype=tl.int32))
    coin = tl.load(u_ptr + base)
    tried = tl.full([N_PAD], -1, dtype=tl.int64)  # tokens rejected at the current node, and their count
    k = num * 0
    s = tl.sum(tl.zeros([N_PAD], dtype=tl.float64))
    go = walkable & (steps > 1)
    while go:
        p_row = p_ptr + b * stride_pb + cur * stride_pn
        q_row = q_ptr + b * stride_qb + cur * stride_qn
        child = tl.load(nt_ptr + base + cur).to(tl.int64)
        chosen = child * 0 - 1
        tried = tl.full([N_PAD], -1, dtype=tl.int64)
        k = num * 0
        acc = coin * 0.0
        s = s * 0.0
        w = s + 1.0
        while (child != -1) & (chosen == -1):
            tok = tl.load(cand_ptr + base + child).to(tl.int64)
            p = tl.load(p_row + tok)
            p_ok = (p >= 0.0) & (p <= prob_limit)
            status |= tl.where(p_ok, 0, 8)
            pc = tl.where(p_ok, p, 0.0)
            if HAS_Q:
                q = tl.load(q_row + tok)
                q_ok = (q >= 0.0) & (q <= prob_limit)
                qc = tl.where(q_ok, q, 0.0).to(tl.float64)
                status |= tl.where(q_ok, 0, 8) | tl.where(q_ok & (qc == 0.0), 64, 0)
                r = tl.maximum(pc.to(tl.float64) - s * qc, 0.0)
                u_child = tl.load(u_ptr + base + child).to(tl.float64)
                accept = (u_child * w * qc < r) & (w > 0.0)
                if accept == 0:
                    s = s + w
                    per_block, row_bad = _row_block_masses(
                        p_row, q_row, V, s, prob_limit, prob_tol, HAS_Q, BLOCK_V, NB_PAD
                    )
                    w = tl.sum(per_block).to(tl.float64) / 1152921504606846976.0
                    status |= row_bad
            else:
                dup = tl.max((tried == tok).to(tl.int32)) > 0
                if LOSSY:
                    acc = acc + pc
                    accept = (coin <= acc / threshold_acc) | (pc >= threshold_single)
                else:
                    status |= tl.where(dup, 32, 0)
                    acc = tl.where(dup, acc, acc + pc)
                    accept = coin < acc
                record = (accept == 0) & (dup == 0)
                tried = tl.where(slots == tl.where(record, k, -1), tok, tried)
                k += record.to(tl.int32)
            chosen = tl.where(accept, child, chosen)
            if accept == 0:
                child = tl.load(ns_ptr + base + child).to(tl.int64)
        if HAS_Q == 0:
            status |= tl.where(acc > prob_limit, 8, 0)
        backwards = (chosen != -1) & (chosen <= cur)  # a child before its parent: a bad tree
        status |= tl.where(backwards, 1, 0)
        chosen = tl.where(backwards, -1, chosen)
        got = chosen != -1
        if got:
            token = tl.load(cand_ptr + base + chosen).to(tl.int32)
            pred_vec = tl.where(slots == cur, token, pred_vec)
            num += 1
            row = tl.sum(tl.where(slots == chosen, ri_vec, 0)).to(tl.int32)
            acc_vec = tl.where(slots == num, row, acc_vec)
            cur = chosen
            coin = tl.load(u_ptr + base + chosen)
            tried = tl.full([N_PAD], -1, dtype=tl.int64)
            k = num * 0
            s = s * 0.0
        go = got & (num + 1 < steps)

    p_row = p_ptr + b * stride_pb + cur * stride_pn
    q_row = q_ptr + b * stride_qb + cur * stride_qn
    uf = tl.load(uf_ptr + b)
    # The residual reads the draft row only after a rejection at this node (s > 0).
    bonus, row_bad = _sample_residual(
        p_row, q_row, V, s, tried, k, uf, prob_limit, prob_tol, False, BLOCK_V, NB_PAD
    )
    if HAS_Q:
        if s > 0.0:
            bonus, row_bad = _sample_residual(
                p_row, q_row, V, s, tried, k, uf, prob_limit, prob_tol, True, BLOCK_V, NB_PAD
            )
    status |= row_bad
    pred_vec = tl.where(slots == cur, bonus.to(tl.int32), pred_vec)
    tl.store(predicts_ptr + ri_vec, pred_vec, mask=slots < n)
    tl.store(accept_ptr + b * steps + slots, acc_vec, mask=slots < steps)
    tl.store(num_ptr + b, num)
    tl.store(status_ptr + b, status)


TRITON_BLOCK_V = 1024  # vocabulary block of the Triton kernels (tests lower it to exercise many blocks)


def _triton_sizes(n: int, V: int) -> dict:
    block_v = max(16, min(TRITON_BLOCK_V, triton.next_power_of_2(V)))
    return {
        "N_PAD": max(16, triton.next_power_of_2(n)),
        "BLOCK_V": block_v,
        "NB_PAD": max(2, triton.next_power_of_2(triton.cdiv(V, block_v))),
    }


@launches_on_input_device
def _tree_sampling_triton(
    candidates,
    retrive_index,
    retrive_next_token,
    retrive_next_sibling,
    target_probs,
    draft_probs,
    uniform_samples,
    uniform_final,
    num_spec_steps,
    lossy=False,
    threshold_single=1.0,
    threshold_acc=1.0,
):
    B, n, V = target_probs.shape
    device = target_probs.device
    predicts = torch.empty(B * n, dtype=torch.int32, device=device)
    accept_index = torch.empty(B, num_spec_steps, dtype=torch.int32, device=device)
    num = torch.empty(B, dtype=torch.int32, device=device)
    status = torch.empty(B, dtype=torch.int32, device=device)
    if B == 0:
        return predicts, accept_index, num, status
    q = target_probs if draft_probs is None else draft_probs
    _tree_sampling_kernel[(B,)](
        candidates.contiguous(),
        retrive_index.contiguous(),
        retrive_next_token.contiguous(),
        retrive_next_sibling.contiguous(),
        target_probs,
        q,
        uniform_samples.contiguous(),
        uniform_final.contiguous(),
        predicts,
        accept_index,
        num,
        status,
        n,
        V,
        num_spec_steps,
        target_probs.stride(0),
        target_probs.stride(1),
        q.stride(0),
        q.stride(1),
        float(threshold_single),
        max(float(threshold_acc), 1e-9),
        PROB_LIMIT,
        PROB_TOL,
        HAS_Q=draft_probs is not None,
        LOSSY=lossy,
        enable_fp_fusion=False,  # max(0, p - s*q) must round identically in every backend
        **_triton_sizes(n, V),
    )
    return predicts, accept_index, num, status


# --------------------------------------------------------------------------------------------------
# Registered op and dispatch
# --------------------------------------------------------------------------------------------------
def _run_tree_sampling(*args):
    """The op's body (arguments as in :func:`_tree_speculative_sampling_op`): the backend chosen for
    the tensors' device."""
    n, steps = args[4].shape[1], args[8]
    if steps > n:  # a path holds at most n slots: the columns past n are -1 (as verify_tree_greedy's)
        predicts, accept_index, num, status = _run_tree_sampling(*args[:8], n, *args[9:])
        return predicts, torch.nn.functional.pad(accept_index, (0, steps - n), value=-1), num, status
    backend = select_backend(OP, args[4].device)
    if backend in ("cpp", "cuda"):
        return tuple(_ext.op(OP)(*args))
    if backend == "triton":
        return _tree_sampling_triton(*args)
    return _tree_sampling_torch(*args)


@torch.library.custom_op("eagle::tree_speculative_sampling", mutates_args=())
def _tree_speculative_sampling_op(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    uniform_samples: torch.Tensor,
    uniform_final: torch.Tensor,
    num_spec_steps: int,
    lossy: bool,
    threshold_single: float,
    threshold_acc: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tensors = (
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        target_probs,
        draft_probs,
        uniform_samples,
        uniform_final,
    )
    _CHECKED.run(_check_args, *tensors, num_spec_steps)  # a cache hit after the public function's check
    return _run_tree_sampling(*tensors, num_spec_steps, lossy, threshold_single, threshold_acc)


@_tree_speculative_sampling_op.register_fake
def _(candidates, retrive_index, next_token, next_sibling, target_probs, draft_probs, u, uf, steps, *_):
    B, n, _ = target_probs.shape
    new = lambda *shape: target_probs.new_empty(shape, dtype=torch.int32)
    return new(B * n), new(B, steps), new(B), new(B)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
def _check_args(candidates, retrive_index, next_token, next_sibling, target_probs, draft_probs, u, uf, steps):
    """Shapes, dtypes, devices, strides and ``num_spec_steps`` (no value reads: the verdict depends
    only on the call's signature, so :data:`_CHECKED` skips a signature that already passed)."""
    check_tensor("target_probs", target_probs, ndim=3, dtypes=(torch.float32,))
    B, n, V = target_probs.shape
    device = target_probs.device
    if n < 1 or V < 1:
        raise ValueError(f"target_probs must be [B, n >= 1, V >= 1], got {list(target_probs.shape)}")
    if target_probs.stride(2) != 1:
        raise ValueError("target_probs' vocabulary dimension must be contiguous (stride 1)")
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, dtypes=(torch.float32,), device=device, shape=(B, n, V))
        if draft_probs.stride(2) != 1:
            raise ValueError("draft_probs' vocabulary dimension must be contiguous (stride 1)")
    check_tensor("candidates", candidates, dtypes=INDEX_DTYPES, device=device, shape=(B, n))
    for name, t in (("retrive_index", retrive_index), ("retrive_next_token", next_token)):
        check_tensor(name, t, dtypes=INDEX_DTYPES, device=device, shape=(B, n))
    check_tensor("retrive_next_sibling", next_sibling, dtypes=INDEX_DTYPES, device=device, shape=(B, n))
    check_same_dtype(
        retrive_index=retrive_index, retrive_next_token=next_token, retrive_next_sibling=next_sibling
    )
    check_tensor("uniform_samples", u, dtypes=(torch.float32,), device=device, shape=(B, n))
    check_tensor("uniform_final", uf, dtypes=(torch.float32,), device=device, shape=(B,))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_spec_steps must be an int >= 1 (root plus drafts), got {steps!r}")


def _debug_scan_rows(name: str, probs: torch.Tensor) -> None:
    """EAGLE_KERNELS_DEBUG=1: every row (not only those the walk reads) must be a distribution."""
    ok = _valid_prob(probs)
    bad_sum = (torch.where(ok, probs, 0.0).double().sum(-1) - 1.0).abs() > PROB_TOL
    bad = ~ok.all(-1) | bad_sum
    if bool(bad.any()):
        b, s = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{b}, {s}] is not a probability distribution (NaN, infinite or negative entries, "
            f"or a sum off 1 by more than {PROB_TOL})"
        )


def _raise_on_status(op: str, status: torch.Tensor, messages: dict[int, str] = STATUS_MESSAGES) -> None:
    """Turn the per-sequence status words of an op into one ValueError naming the first problem. A fake
    tensor (FakeTensorMode, torch.export's tracing) holds no values: nothing to check."""
    if _is_fake(status):
        return
    status = status.cpu()
    if int(status.count_nonzero()) == 0:
        return
    b = int((status != 0).nonzero()[0])
    word = int(status[b])
    problems = "; ".join(msg for bit, msg in messages.items() if word & bit)
    raise ValueError(f"eagle_kernels.{op}: sequence {b}: {problems}")


def _is_fake(t: torch.Tensor) -> bool:
    """Whether ``t`` is a fake tensor (or a functional wrapper of one): shapes without values."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


# Reads the status on the host: a deliberate graph break under torch.compile (plain eager calls use
# the undecorated function, which skips the decorator's per-call cost). torch._disable_dynamo is
# torch.compiler.disable that imports torch._dynamo at the first call, not now: importing it costs
# ~0.9 s, most of `import eagle_kernels` (and of every `eagle` CLI start).
_lazy_disable = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable
raise_on_status = _lazy_disable(_raise_on_status)

_CHECKED = SignatureCache()


def _run(
    candidates,
    retrive_index,
    next_token,
    next_sibling,
    target_probs,
    draft_probs,
    u,
    uf,
    steps,
    lossy=False,
    threshold_single=1.0,
    threshold_acc=1.0,
    allow_duplicate_siblings=False,
):
    """The checked call of the op; ``allow_duplicate_siblings``: a repeated sibling token is not an
    error (every backend skips it: after its first copy is rejected the residual holds none of its
    mass, so the copy is rejected for sure; SGLang's n-gram drafts pad with repeated token 0)."""
    tensors = (candidates, retrive_index, next_token, next_sibling, target_probs, draft_probs, u, uf)
    _CHECKED.run(_check_args, *tensors, steps)
    debug = debug_checks_enabled()
    if debug:
        _debug_scan_rows("target_probs", target_probs)
    args = (*tensors, steps, lossy, float(threshold_single), float(threshold_acc))
    eager = eager_fast_path(*tensors)
    if eager:
        predicts, accept_index, num, status = _run_tree_sampling(*args)
    else:
        predicts, accept_index, num, status = torch.ops.eagle.tree_speculative_sampling(*args)
    if target_probs.device.type == "cpu" or debug:
        op = OP if draft_probs is None else f"{OP}_draft_probs"
        if allow_duplicate_siblings:
            status = status & ~DUP_SIBLING
        (_raise_on_status if eager else raise_on_status)(op, status)
    return predicts, accept_index, num


def tree_speculative_sampling(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_probs: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_final: torch.Tensor,
    *,
    num_spec_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless tree speculative sampling for deterministic (top-k) drafts.

    Walk from the root. At a node with target distribution ``p`` try its children in sibling order:
    with one uniform ``u = uniform_samples[b, node]`` per node, child ``x_k`` is accepted when
    ``u < p(x_1) + ... + p(x_k)`` (float32 sum in sibling order), i.e. with probability
    ``p(x_k) / (1 - p(x_1) - ... - p(x_(k-1)))`` once its elder siblings were rejected. The first
    accepted child becomes the node; the walk stops after ``num_spec_steps - 1`` accepted drafts, at
    a leaf, or when every child is rejected. The bonus token is then drawn with ``uniform_final[b]``
    from ``p`` at the last node with the rejected children removed (nothing removed at a leaf or
    after the step limit), by inverse CDF on the fixed-point masses described in the module
    docstring; a residual left without mass by rounding falls back to ``p`` itself.

    Why it is lossless: with deterministic drafts the children are constants given the context, so
    trying them one by one with ``u`` against the cumulative mass is exactly sampling
    ``x ~ p`` by inverse CDF over the order (children first, then the rest) and keeping ``x`` when it
    is a child; when it is not, ``x`` is distributed as ``p`` restricted to the other tokens, which is
    the bonus distribution. Each emitted token is therefore an exact draw from the target at its
    context. Siblings must carry distinct tokens.

    Parameters
    ----------
    candidates : Tensor ``[B, n]``, int32 or int64
        Token of every tree slot (slot 0, the root, holds the last committed token and is not read).
    retrive_index : Tensor ``[B, n]``, int32 or int64
        Flat row of every slot, a permutation of ``b*n .. b*n+n-1`` (SGLang: ``b*n + slot``). Rows
        name the entries of ``predicts`` and ``accept_index``.
    retrive_next_token : Tensor ``[B, n]``, same dtype as ``retrive_index``
        First child slot of every slot, -1 for a leaf. Children come after their parent (slot > parent).
    retrive_next_sibling : Tensor ``[B, n]``, same dtype as ``retrive_index``
        Next sibling slot, -1 for the last one; siblings are tried in this order, which need not be
        the slots' (SGLang links some backwards). No slot has two incoming links; the root no sibling.
    target_probs : Tensor ``[B, n, V]``, float32, vocabulary dimension contiguous
        Target distribution at every slot, already warped (temperature, top-k, top-p, min-p) and
        normalised. Only the rows on the walked path are read.
    uniform_samples : Tensor ``[B, n]``, float32 in [0, 1)
        ``uniform_samples[b, s]`` decides which child of slot ``s`` is accepted.
    uniform_final : Tensor ``[B]``, float32 in [0, 1)
        Uniform of the bonus token.
    num_spec_steps : int
        Columns of ``accept_index``: at most ``num_spec_steps - 1`` drafts are accepted
        (num_spec_steps >= 1; a path holds at most n slots, so columns past n are -1).

    Returns
    -------
    predicts : Tensor ``[B * n]``, int32
        At the row of every accepted node (root included) the token that follows it: the accepted
        child's token, and at the last accepted node the bonus token. 0 at every other row (as in
        ``verify_tree_greedy``).
    accept_index : Tensor ``[B, num_spec_steps]``, int32
        Rows of the accepted path, root first, padded with -1.
    accept_token_num : Tensor ``[B]``, int32
        Number of accepted draft tokens (root and bonus not counted). The emitted tokens are
        ``predicts[accept_index[b, :accept_token_num[b] + 1]]``: accepted drafts, then the bonus.

    Raises
    ------
    TypeError / ValueError
        Wrong shape, dtype or device. On CPU (and on CUDA with ``EAGLE_KERNELS_DEBUG=1``) also a
        malformed tree (out-of-range link, cycle, slot with two parents), a token outside the
        vocabulary, a uniform outside [0, 1), or a probability the op reads that is NaN, negative,
        above 1, or from a row that is not normalised (tolerance ``PROB_TOL``).
    """
    return _run(
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        target_probs,
        None,
        uniform_samples,
        uniform_final,
        num_spec_steps,
    )


def tree_speculative_sampling_draft_probs(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_final: torch.Tensor,
    *,
    num_spec_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless tree speculative sampling for drafts *sampled* from a draft distribution.

    Sampling model (what makes the result exact): the tree's shape is fixed independently of the
    sampled tokens, and the children ``x_1, ..., x_k`` of every node were drawn **i.i.d. (with
    replacement) from the draft distribution** ``q = draft_probs[b, node]`` at that node, given the
    node's context (repeated tokens among siblings are allowed). Drafts sampled *without*
    replacement (EAGLE-1's multinomial) or deduplicated do not fit this model.

    Algorithm (SpecInfer's multi-draft recursive rejection sampling). With ``r_1 = p`` the target
    distribution at the node: child ``x_j`` is accepted when
    ``uniform_samples[b, slot of x_j] * q(x_j) < r_j(x_j)``, i.e. with probability
    ``min(1, r_j(x_j) / q(x_j))``; on rejection ``r_(j+1) = norm(max(0, r_j - q))``. The same ``q``
    is used for every sibling because they are i.i.d. The first accepted child becomes the node;
    when all are rejected the bonus token is drawn from ``r_(k+1)``, at a leaf (or after
    ``num_spec_steps - 1`` accepted drafts) from ``p``. Unrolled, ``r_(j+1)`` is proportional to
    ``max(0, p - S_j q)`` with ``S_j = W_1 + ... + W_j`` and ``W_j`` the mass of
    ``max(0, p - S_(j-1) q)`` (``W_1 = 1``); the op computes exactly these quantities (residual in
    float64, masses in fixed point), so it never materialises ``r``.

    Proof of exactness, by induction on the number ``k`` of remaining siblings at a node, for any
    current residual ``r``: with ``k = 0`` the output is a draw from ``r``. For ``k >= 1`` draw
    ``X ~ q`` and accept it with probability ``min(1, r(X)/q(X))``; otherwise continue with
    ``r' = norm(max(0, r - q))`` and ``k - 1`` siblings, which are independent of ``X`` and by
    induction output a draw from ``r'``. Then
    ``P(out = y) = q(y) min(1, r(y)/q(y)) + (1 - sum_x min(q(x), r(x))) r'(y)
    = min(q(y), r(y)) + max(0, r(y) - q(y)) = r(y)``, because the mass of ``max(0, r - q)`` is
    ``1 - sum_x min(q(x), r(x))``. So the token leaving each node is an exact draw from ``p``, and
    (by induction over the depth, the subtree of an accepted child being sampled from that child's
    context) so is every emitted sequence. ``tests/kernels/test_tree_speculative_sampling.py``
    checks this by exact enumeration and a chi-square test.

    Parameters
    ----------
    candidates : Tensor ``[B, n]``, int32 or int64
        Token of every tree slot (slot 0, the root, holds the last committed token and is not read).
    retrive_index : Tensor ``[B, n]``, int32 or int64
        Flat row of every slot, a permutation of ``b*n .. b*n+n-1`` (SGLang: ``b*n + slot``). Rows
        name the entries of ``predicts`` and ``accept_index``.
    retrive_next_token : Tensor ``[B, n]``, same dtype as ``retrive_index``
        First child slot of every slot, -1 for a leaf. Children come after their parent (slot > parent).
    retrive_next_sibling : Tensor ``[B, n]``, same dtype as ``retrive_index``
        Next sibling slot, -1 for the last one; siblings are tried in this order, which need not be
        the slots' (SGLang links some backwards). No slot has two incoming links; the root no sibling.
    target_probs : Tensor ``[B, n, V]``, float32, vocabulary dimension contiguous
        Target distribution at every slot (warped, normalised).
    draft_probs : Tensor ``[B, n, V]``, float32, vocabulary dimension contiguous
        Draft distribution at every slot, the one its children were sampled from (rows of leaves
        are not read). Every child token must have ``q(x) > 0``.
    uniform_samples : Tensor ``[B, n]``, float32 in [0, 1)
        ``uniform_samples[b, s]`` is the acceptance coin of the child at slot ``s`` (slot 0 unused).
    uniform_final : Tensor ``[B]``, float32 in [0, 1)
        Uniform of the bonus token.
    num_spec_steps : int
        Columns of ``accept_index`` (num_spec_steps >= 1; columns past n are -1).

    Returns
    -------
    predicts : Tensor ``[B * n]``, int32
        At the row of every accepted node (root included) the token that follows it: the accepted
        child's token, and at the last accepted node the bonus token. 0 at every other row (as in
        ``verify_tree_greedy``).
    accept_index : Tensor ``[B, num_spec_steps]``, int32
        Rows of the accepted path, root first, padded with -1.
    accept_token_num : Tensor ``[B]``, int32
        Number of accepted draft tokens (root and bonus not counted). The emitted tokens are
        ``predicts[accept_index[b, :accept_token_num[b] + 1]]``: accepted drafts, then the bonus.

    Raises
    ------
    TypeError / ValueError
        Wrong shape, dtype or device. On CPU (and on CUDA with ``EAGLE_KERNELS_DEBUG=1``) also a
        malformed tree (out-of-range link, cycle, slot with two parents), a token outside the
        vocabulary, a uniform outside [0, 1), or a probability the op reads that is NaN, negative,
        above 1, or from a row that is not normalised (tolerance ``PROB_TOL``).
    """
    return _run(
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        target_probs,
        draft_probs,
        uniform_samples,
        uniform_final,
        num_spec_steps,
    )


_SGL_OLDER = ("draft_probs", "threshold_single", "threshold_acc", "deterministic")
_SGL_DEFAULTS = {"draft_probs": None, "threshold_single": 1.0, "threshold_acc": 1.0, "deterministic": True}


def _sgl_sampling_arguments(args: tuple, kwargs: dict) -> tuple:
    """``(draft_probs, threshold_single, threshold_acc, deterministic)`` of a call in either of
    sgl-kernel's signatures: the first argument after ``target_probs`` is ``draft_probs`` (a tensor
    or None) in the older one, ``threshold_single`` (a number) in the newer one."""
    unknown = set(kwargs) - set(_SGL_OLDER)
    if unknown:
        raise TypeError(f"tree_speculative_sampling_target_only: unexpected arguments {sorted(unknown)}")
    newer = bool(args) and args[0] is not None and not isinstance(args[0], torch.Tensor)
    names = _SGL_OLDER[1:] if newer else _SGL_OLDER
    if len(args) > len(names):
        raise TypeError(
            f"tree_speculative_sampling_target_only: {len(args)} arguments after target_probs, "
            f"at most {len(names)} ({', '.join(names)})"
        )
    values = dict(_SGL_DEFAULTS)
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"tree_speculative_sampling_target_only: got multiple values for {name}")
        values[name] = value
    values.update(kwargs)
    return tuple(values[name] for name in _SGL_OLDER)


def sglang_tree_speculative_sampling_target_only(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_samples_for_final_sampling: torch.Tensor,
    target_probs: torch.Tensor,
    *args,
    lossy: bool = False,
    **kwargs,
) -> None:
    """Drop-in for sgl-kernel's ``tree_speculative_sampling_target_only`` (same in-place signature):
    after ``target_probs``, either sgl-kernel's older ``draft_probs=None, threshold_single=1.0,
    threshold_acc=1.0, deterministic=True`` or its newer ``threshold_single=1.0, threshold_acc=1.0,
    deterministic=True`` (no ``draft_probs``), positionally or by keyword.

    Writes ``predicts [>= B*n]`` (its first ``B*n`` entries: SGLang allocates ``B*n + 1``),
    ``accept_index [B, num_spec_steps]`` and ``accept_token_num [B]`` (int32, preallocated; ``num_spec_steps`` is ``accept_index.shape[1]``, which may exceed ``n``
    as in SGLang, where it is ``speculative_num_steps + 1`` whatever the tree size) with the results
    of :func:`tree_speculative_sampling`. As in sgl-kernel, ``predicts`` changes only at the accepted
    rows; ``accept_index`` is written whole (-1 past the path, what SGLang callers pre-fill).
    ``draft_probs`` ``[B, n, V]`` float32 is accepted for signature compatibility only (optional):
    SGLang uses it as scratch for rejected mass, this implementation neither reads nor writes it.
    Newer sgl-kernel releases dropped it (``..., target_probs, threshold_single=1.0,
    threshold_acc=1.0, deterministic=True``); both forms are taken: a number where ``draft_probs``
    stands is read as ``threshold_single`` of the newer one, and keyword calls work with either.
    ``deterministic`` is ignored: results are always deterministic.

    Thresholds below 1 make SGLang's acceptance *lossy* (a child is accepted when
    ``coin <= cumulative_mass / threshold_acc`` or ``p(child) >= threshold_single``), which changes
    the output distribution; they are refused with a ValueError unless ``lossy=True`` is passed,
    in which case that relaxed rule is applied exactly as SGLang does (sibling duplicates then
    count twice in the cumulative mass, as in SGLang). With thresholds 1 and ``lossy=False`` the
    lossless op runs (``coin < mass``: SGLang's ``<=`` differs only on a measure-zero event); a
    repeated sibling token (SGLang's n-gram drafts pad short drafts with token 0 under the root) is
    skipped, not refused: once its first copy is rejected the residual holds none of its mass (sgl-kernel
    adds its probability again, which is not lossless).
    """
    draft_probs, threshold_single, threshold_acc, deterministic = _sgl_sampling_arguments(args, kwargs)
    check_tensor("predicts", predicts, ndim=1, dtypes=(torch.int32,))
    check_tensor("accept_index", accept_index, ndim=2, dtypes=(torch.int32,))
    check_tensor("accept_token_num", accept_token_num, ndim=1, dtypes=(torch.int32,))
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, ndim=3)
    B, n = candidates.shape if candidates.dim() == 2 else (0, 0)
    if predicts.shape[0] < B * n or accept_index.shape[0] != B or accept_token_num.shape[0] != B:
        raise ValueError(
            f"predicts must have at least B*n={B * n} entries, accept_index be [B={B}, steps], "
            f"accept_token_num [B={B}]; got "
            f"{list(predicts.shape)}, {list(accept_index.shape)}, {list(accept_token_num.shape)}"
        )
    predicts = predicts[: B * n]  # SGLang allocates B*n + 1; the tail is left alone
    for name, t in (("threshold_single", threshold_single), ("threshold_acc", threshold_acc)):
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {t}")
    relaxed = float(threshold_single) != 1.0 or float(threshold_acc) != 1.0
    if relaxed and not lossy:
        raise ValueError(
            f"threshold_single={threshold_single}, threshold_acc={threshold_acc} relax acceptance and make "
            "sampling lossy (the output no longer follows the target distribution); pass lossy=True to "
            "opt in (in place of sgl-kernel's function: functools.partial(this function, lossy=True)), or "
            "keep both thresholds at 1.0"
        )
    out = _run(
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        target_probs,
        None,
        uniform_samples,
        uniform_samples_for_final_sampling,
        min(accept_index.shape[1], n),  # a path holds at most n slots: wider columns stay -1
        lossy=lossy,
        threshold_single=threshold_single,
        threshold_acc=threshold_acc,
        allow_duplicate_siblings=True,  # SGLang's n-gram drafts pad a short draft with token 0
    )
    on_path = torch.zeros(B * n + 1, dtype=torch.bool, device=predicts.device)
    on_path[torch.where(out[1] >= 0, out[1], B * n).reshape(-1).long()] = True
    predicts.copy_(torch.where(on_path[: B * n], out[0], predicts))
    steps = out[1].shape[1]
    accept_index[:, :steps].copy_(out[1])
    accept_index[:, steps:].fill_(-1)
    accept_token_num.copy_(out[2])
