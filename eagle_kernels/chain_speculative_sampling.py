"""Lossless chain speculative sampling in vLLM's flattened (ragged) layout.

Request ``b`` proposed ``k_b`` draft tokens, stored at positions ``t = start_b .. start_b + k_b - 1`` of
the flat arrays (``start_b = cu_num_draft_tokens[b-1]``, 0 for the first request).
``target_probs[t]`` is the target's distribution for the token at position ``t`` (computed from the
context up to the previous draft). Drafts are accepted left to right; the first rejected one is
replaced by a *recovered* token drawn from the residual distribution and ends the request's output;
when all are accepted the caller's ``bonus_token_ids[b]`` (drawn from the target after the last
draft) is appended. The output follows the target distribution exactly.

A chain is the one-child case of :mod:`eagle_kernels.tree_speculative_sampling`, and this op shares
its arithmetic (fixed-point masses, float64 acceptance test, status words), so its backends are
bit-identical for the same uniforms as well.
"""

from __future__ import annotations

import torch

from eagle_kernels import _ext
from eagle_kernels._backend import debug_checks_enabled, eager_fast_path, select_backend
from eagle_kernels._checks import INDEX_DTYPES, SignatureCache, check_tensor
from eagle_kernels._triton import launches_on_input_device, tl, triton
from eagle_kernels.tree_speculative_sampling import (
    BAD_DRAFT,
    BAD_PROB,
    BAD_TOKEN,
    BAD_TREE,
    BAD_UNIFORM,
    PROB_LIMIT,
    PROB_TOL,
    STATUS_MESSAGES,
    _is_fake,
    _raise_on_status,
    _row_status,
    _sample_bonus,
    _sample_residual,
    _triton_sizes,
    _valid_prob,
    raise_on_status,
)

OP = "chain_speculative_sampling"

BAD_LAYOUT = BAD_TREE  # same status bit, chain-specific meaning
CHAIN_STATUS_MESSAGES = {
    **STATUS_MESSAGES,
    BAD_LAYOUT: "cu_num_draft_tokens must be a non-decreasing inclusive cumsum that ends at "
    "T = len(draft_token_ids), with at most max_spec_len drafts per request",
    BAD_TOKEN: "a draft or bonus token is outside [0, vocab_size)",
    BAD_PROB: "the target or draft probability of a draft token is NaN, negative or above 1",
}


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def _chain_sampling_torch(
    draft_token_ids,
    cu_num_draft_tokens,
    draft_probs,
    target_probs,
    bonus_token_ids,
    uniform_samples,
    uniform_final,
    max_spec_len,
):
    """The op, vectorised over requests and positions: returns (output, status)."""
    T, V = target_probs.shape
    B = cu_num_draft_tokens.shape[0]
    device = target_probs.device
    ends = cu_num_draft_tokens.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    counts = ends - starts
    bad_layout = (starts < 0) | (counts < 0) | (counts > max_spec_len) | (ends > T)
    if B > 0:
        bad_layout[-1] |= ends[-1] != T
    L = max_spec_len + 1
    pos = torch.arange(L, device=device)
    valid = ~bad_layout[:, None] & (pos < counts[:, None])  # [B, L] real draft positions
    t = torch.where(valid, starts[:, None] + pos, 0).clamp(0, max(T - 1, 0))
    draft = torch.where(valid, draft_token_ids.long()[t] if T > 0 else 0, 0)
    bonus = bonus_token_ids.long()
    bad_token = ((valid & ((draft < 0) | (draft >= V))).any(-1)) | (bonus < 0) | (bonus >= V)
    u = torch.where(valid, uniform_samples[t] if T > 0 else 0.0, 0.0)
    bad_u = (valid & ~((u >= 0) & (u < 1))).any(-1) | ~((uniform_final >= 0) & (uniform_final < 1))
    status = torch.where(bad_layout, BAD_LAYOUT, 0) | torch.where(bad_token, BAD_TOKEN, 0)
    status = (status | torch.where(bad_u, BAD_UNIFORM, 0)).to(torch.int32)
    valid &= ~bad_token[:, None]
    d = torch.where(valid, draft, 0)

    out = torch.full((B, L), -1, dtype=torch.int32, device=device)
    if T == 0 or B == 0:
        ok = ~bad_layout & ~bad_token
        out[:, 0] = torch.where(ok, bonus, -1).to(torch.int32) if B > 0 else out[:, 0]
        return out, status
    p = target_probs[t, d]
    p_ok = _valid_prob(p)
    q = torch.ones_like(p, dtype=torch.float64)
    bad_prob = valid & ~p_ok
    if draft_probs is not None:
        q_raw = draft_probs[t, d]
        q_ok = _valid_prob(q_raw)
        q = torch.where(q_ok, q_raw, 0.0).double()
        bad_prob |= valid & ~q_ok
        status |= torch.where((valid & q_ok & (q == 0)).any(-1), BAD_DRAFT, 0).to(torch.int32)
    status |= torch.where(bad_prob.any(-1), BAD_PROB, 0).to(torch.int32)
    accept = (u.double() * 1.0) * q < torch.where(p_ok, p, 0.0).double()
    rejected = valid & ~accept
    first = torch.where(rejected, pos, L).min(-1).values  # first rejected position, L if none
    any_rej = first < L
    out = torch.where(valid & (pos < first[:, None]), d, -1).to(torch.int32)
    usable = ~bad_layout & ~bad_token
    bidx = torch.arange(B, device=device)
    all_acc = usable & ~any_rej
    out[bidx[all_acc], counts[all_acc]] = bonus[all_acc].to(torch.int32)
    rej = bidx[any_rej]
    if rej.numel() > 0:
        j = first[rej]
        t_rej = t[rej, j]
        p_rows = target_probs[t_rej]
        q_rows = None if draft_probs is None else draft_probs[t_rej]
        s = torch.ones(rej.numel(), dtype=torch.float64, device=device)
        tried = d[rej, j][:, None] if draft_probs is None else torch.full_like(t_rej[:, None], -1)
        recovered = _sample_bonus(p_rows, q_rows, s, tried, uniform_final[rej])
        out[rej, j] = recovered.to(torch.int32)
        row_bad = _row_status(p_rows) if q_rows is None else _row_status(p_rows) | _row_status(q_rows)
        status[rej] |= row_bad
    return out, status


def chain_speculative_sampling_ref(
    draft_token_ids: torch.Tensor,
    cu_num_draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_final: torch.Tensor,
    *,
    max_spec_len: int,
) -> torch.Tensor:
    """PyTorch definition of :func:`chain_speculative_sampling` (no input validation)."""
    return _chain_sampling_torch(
        draft_token_ids,
        cu_num_draft_tokens,
        draft_probs,
        target_probs,
        bonus_token_ids.reshape(-1),
        uniform_samples,
        uniform_final,
        max_spec_len,
    )[0]


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per request; acceptance is vectorised over its positions, the
# recovered token reuses the tree op's blocked residual sampler.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _chain_sampling_kernel(
    draft_ptr,
    cu_ptr,
    bonus_ptr,
    p_ptr,
    q_ptr,
    u_ptr,
    uf_ptr,
    out_ptr,
    status_ptr,
    B,
    T,
    V,
    max_spec_len,
    stride_p,
    stride_q,
    prob_limit,
    prob_tol,
    HAS_Q: tl.constexpr,
    L_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NB_PAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start = tl.where(b > 0, tl.load(cu_ptr + tl.maximum(b - 1, 0)).to(tl.int64), 0)
    end = tl.load(cu_ptr + b).to(tl.int64)
    count = end - start
    bad_layout = (start < 0) | (count < 0) | (count > max_spec_len) | (end > T) | ((b == B - 1) & (end != T))
    pos = tl.arange(0, L_PAD)
    # (scalar conditions are folded into the bound: the interpreter mishandles scalar & vector masks)
    valid = pos < tl.where(bad_layout, 0, count)
    t = tl.where(valid, start + pos, 0)
    d = tl.load(draft_ptr + t, mask=valid, other=0).to(tl.int64)
    bonus = tl.load(bonus_ptr + b).to(tl.int64)
    bad_token = (tl.max((valid & ((d < 0) | (d >= V))).to(tl.int32)) > 0) | (bonus < 0) | (bonus >= V)
    u = tl.load(u_ptr + t, mask=valid, other=0.0)
    uf = tl.load(uf_ptr + b)
    bad_u = tl.max((valid & (((u >= 0.0) & (u < 1.0)) == 0)).to(tl.int32)) > 0
    bad_u = bad_u | (((uf >= 0.0) & (uf < 1.0)) == 0)
    status = tl.where(bad_layout, 1, 0) | tl.where(bad_token, 2, 0) | tl.where(bad_u, 4, 0)
    valid = pos < tl.where(bad_layout | bad_token, 0, count)
    d = tl.where(valid, d, 0)

    p = tl.load(p_ptr + t * stride_p + d, mask=valid, other=0.0)
    p_ok = (p >= 0.0) & (p <= prob_limit)
    bad_prob = valid & (p_ok == 0)
    q = tl.full([L_PAD], 1.0, dtype=tl.float64)
    if HAS_Q:
        q_raw = tl.load(q_ptr + t * stride_q + d, mask=valid, other=1.0)
        q_ok = (q_raw >= 0.0) & (q_raw <= prob_limit)
        q = tl.where(q_ok, q_raw, 0.0).to(tl.float64)
        bad_prob = bad_prob | (valid & (q_ok == 0))
        status |= tl.where(tl.max((valid & q_ok & (q == 0.0)).to(tl.int32)) > 0, 64, 0)
    status |= tl.where(tl.max(bad_prob.to(tl.int32)) > 0, 8, 0)
    accept = (u.to(tl.float64) * 1.0) * q < tl.where(p_ok, p, 0.0).to(tl.float64)
    first = tl.min(tl.where(valid & (accept == 0), pos, L_PAD))
    out = tl.where(valid & (pos < first), d, -1).to(tl.int32)
    usable = (bad_layout == 0) & (bad_token == 0)
    if usable:
        if first < L_PAD:
            t_rej = start + first
            d_rej = tl.sum(tl.where(pos == first, d, 0))
            p_row = p_ptr + t_rej * stride_p
            q_row = q_ptr + t_rej * stride_q
            one = tl.sum(tl.zeros([L_PAD], dtype=tl.float64)) + 1.0
            if HAS_Q:
                tried = tl.full([L_PAD], -1, dtype=tl.int64)
                token, row_bad = _sample_residual(
                    p_row, q_row, V, one, tried, 0, uf, prob_limit, prob_tol, True, BLOCK_V, NB_PAD
                )
            else:
                tried = tl.where(pos == 0, d_rej, -1)
                token, row_bad = _sample_residual(
                    p_row, q_row, V, one, tried, 1, uf, prob_limit, prob_tol, False, BLOCK_V, NB_PAD
                )
            status |= row_bad
            out = tl.where(pos == first, token.to(tl.int32), out)
        else:
            out = tl.where(pos == count, bonus.to(tl.int32), out)
    tl.store(out_ptr + b * (max_spec_len + 1) + pos, out, mask=pos < max_spec_len + 1)
    tl.store(status_ptr + b, status)


@launches_on_input_device
def _chain_sampling_triton(
    draft_token_ids,
    cu_num_draft_tokens,
    draft_probs,
    target_probs,
    bonus_token_ids,
    uniform_samples,
    uniform_final,
    max_spec_len,
):
    T, V = target_probs.shape
    B = cu_num_draft_tokens.shape[0]
    device = target_probs.device
    out = torch.empty(B, max_spec_len + 1, dtype=torch.int32, device=device)
    status = torch.empty(B, dtype=torch.int32, device=device)
    if B == 0:
        return out, status
    q = target_probs if draft_probs is None else draft_probs
    sizes = _triton_sizes(1, V)
    _chain_sampling_kernel[(B,)](
        draft_token_ids.contiguous(),
        cu_num_draft_tokens.contiguous(),
        bonus_token_ids.contiguous(),
        target_probs,
        q,
        uniform_samples.contiguous(),
        uniform_final.contiguous(),
        out,
        status,
        B,
        T,
        V,
        max_spec_len,
        target_probs.stride(0),
        q.stride(0),
        PROB_LIMIT,
        PROB_TOL,
        HAS_Q=draft_probs is not None,
        L_PAD=max(16, triton.next_power_of_2(max_spec_len + 1)),
        BLOCK_V=sizes["BLOCK_V"],
        NB_PAD=sizes["NB_PAD"],
        enable_fp_fusion=False,
    )
    return out, status


# --------------------------------------------------------------------------------------------------
# Registered op and dispatch
# --------------------------------------------------------------------------------------------------
def _run_chain_sampling(*args):
    """The op's body (arguments as in :func:`_chain_speculative_sampling_op`): the backend chosen for
    the tensors' device."""
    backend = select_backend(OP, args[3].device)
    if backend in ("cpp", "cuda"):
        return tuple(_ext.op(OP)(*args))
    if backend == "triton":
        return _chain_sampling_triton(*args)
    return _chain_sampling_torch(*args)


@torch.library.custom_op("eagle::chain_speculative_sampling", mutates_args=())
def _chain_speculative_sampling_op(
    draft_token_ids: torch.Tensor,
    cu_num_draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_final: torch.Tensor,
    max_spec_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = (draft_token_ids, cu_num_draft_tokens, draft_probs, target_probs, bonus_token_ids)
    tensors += (uniform_samples, uniform_final)
    _CHECKED.run(_check_args, *tensors, max_spec_len)  # a cache hit after the public function's check
    return _run_chain_sampling(*tensors, max_spec_len)


@_chain_speculative_sampling_op.register_fake
def _(draft_token_ids, cu_num_draft_tokens, draft_probs, target_probs, bonus, u, uf, max_spec_len):
    B = cu_num_draft_tokens.shape[0]
    new = lambda *shape: target_probs.new_empty(shape, dtype=torch.int32)
    return new(B, max_spec_len + 1), new(B)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def _check_args(draft_token_ids, cu_num_draft_tokens, draft_probs, target_probs, bonus, u, uf, max_spec_len):
    """Shapes, dtypes, devices, strides and ``max_spec_len`` (no value reads: the verdict depends
    only on the call's signature, so :data:`_CHECKED` skips a signature that already passed)."""
    check_tensor("target_probs", target_probs, ndim=2, dtypes=(torch.float32,))
    T, V = target_probs.shape
    device = target_probs.device
    if V < 1 or target_probs.stride(1) != 1:
        raise ValueError("target_probs must be [T, V >= 1] with a contiguous vocabulary dimension")
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, dtypes=(torch.float32,), device=device, shape=(T, V))
        if draft_probs.stride(1) != 1:
            raise ValueError("draft_probs' vocabulary dimension must be contiguous (stride 1)")
    check_tensor("draft_token_ids", draft_token_ids, dtypes=INDEX_DTYPES, device=device, shape=(T,))
    check_tensor("cu_num_draft_tokens", cu_num_draft_tokens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    B = cu_num_draft_tokens.shape[0]
    check_tensor("bonus_token_ids", bonus, dtypes=INDEX_DTYPES, device=device, shape=(B,))
    check_tensor("uniform_samples", u, dtypes=(torch.float32,), device=device, shape=(T,))
    check_tensor("uniform_final", uf, dtypes=(torch.float32,), device=device, shape=(B,))
    if isinstance(max_spec_len, bool) or not isinstance(max_spec_len, int) or max_spec_len < 0:
        raise ValueError(f"max_spec_len must be a non-negative int, got {max_spec_len!r}")


_CHECKED = SignatureCache()


_BELOW_ONE_F32 = 1.0 - 2.0**-24  # the largest float32 below 1


def _as_float32_uniforms(u):
    """float64 uniforms as float32: rounding to nearest would turn a coin in (1 - 2**-25, 1) into 1.0,
    outside [0, 1), so those become the largest float32 below 1; a value that was not below 1 (or
    NaN) stays as it was, for the value check to refuse. Anything else is returned unchanged."""
    if not isinstance(u, torch.Tensor) or u.dtype != torch.float64:
        return u
    rounded = u.to(torch.float32)
    return torch.where((u < 1) & (rounded >= 1), torch.full_like(rounded, _BELOW_ONE_F32), rounded)


def chain_speculative_sampling(
    draft_token_ids: torch.Tensor,
    cu_num_draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_final: torch.Tensor,
    *,
    max_spec_len: int | None = None,
) -> torch.Tensor:
    """Lossless speculative sampling of draft chains in vLLM's flattened layout.

    For request ``b`` with drafts ``d_t`` at positions ``t = start_b .. end_b - 1``
    (``end_b = cu_num_draft_tokens[b]``, ``start_b = end_(b-1)``, ``start_0 = 0``), with
    ``p = target_probs[t]`` and ``q = draft_probs[t]`` (a point mass on ``d_t`` when ``draft_probs``
    is None): draft ``d_t`` is accepted when ``uniform_samples[t] * q(d_t) < p(d_t)`` (probability
    ``min(1, p/q)``). At the first rejection the recovered token is drawn with ``uniform_final[b]``
    from ``norm(max(0, p - q))`` (with one-hot drafts: ``p`` without ``d_t``), by inverse CDF on
    the fixed-point masses of :mod:`eagle_kernels.tree_speculative_sampling`, and the request's
    output ends there. If every draft is accepted, ``bonus_token_ids[b]`` follows them.

    Uniforms (all float32 in [0, 1), supplied by the caller so the op is deterministic):
    ``uniform_samples[t]`` is the acceptance coin of position ``t`` and ``uniform_final[b]`` drives
    the recovered token of request ``b``. Drawing the recovered token from its own uniform (instead
    of reusing the rejected coin, or vLLM's exponential race over the vocabulary) keeps it exact to
    the resolution of the masses, whatever the acceptance probability was.

    Lossless for draft tokens that were sampled from ``draft_probs[t]`` given the request's
    context (each chain position is a single draft, so the tree op's i.i.d. condition holds
    trivially), and for deterministic (argmax / n-gram) drafts with ``draft_probs=None``. For
    greedy requests pass one-hot ``target_probs``: the output is then the target argmax path.

    Parameters
    ----------
    draft_token_ids : Tensor ``[T]``, int32 or int64
        Draft tokens of all requests, concatenated.
    cu_num_draft_tokens : Tensor ``[B]``, int32 or int64
        Inclusive cumulative sum of the number of drafts per request (no leading 0); the last
        entry equals ``T``.
    draft_probs : Tensor ``[T, V]``, float32, or None
        Draft distribution each draft was sampled from; None for one-hot (top-1 / greedy) drafts.
    target_probs : Tensor ``[T, V]``, float32, vocabulary dimension contiguous
        Target distribution at each draft position (already warped, normalised).
    bonus_token_ids : Tensor ``[B]`` or ``[B, 1]``, int32 or int64
        Token appended when all of a request's drafts are accepted (sampled by the caller from the
        target after the last draft).
    uniform_samples : Tensor ``[T]``, float32 (or float64) in [0, 1)
        Acceptance coin of each draft position. float64 coins (newer vLLM draws them so) are rounded
        to float32, the kernels' precision, with a coin just below 1 kept below 1.
    uniform_final : Tensor ``[B]``, float32 (or float64) in [0, 1)
        Uniform of each request's recovered token (float64 as ``uniform_samples``).
    max_spec_len : int, optional
        Maximum number of drafts of a request (output width minus one). Pass it for CUDA graphs:
        computing it from ``cu_num_draft_tokens`` synchronises with the device.

    Returns
    -------
    Tensor ``[B, max_spec_len + 1]``, int32
        Per request the accepted drafts, then the recovered or bonus token, then -1 padding.

    Raises
    ------
    TypeError / ValueError
        Wrong shape, dtype or device; on CPU (on CUDA with ``EAGLE_KERNELS_DEBUG=1``) also a bad
        ``cu_num_draft_tokens``, tokens outside the vocabulary, uniforms outside [0, 1), invalid
        probabilities at the draft tokens, a residual row that is not a distribution, or a draft
        token with zero draft probability.
    """
    bonus = bonus_token_ids.reshape(-1) if isinstance(bonus_token_ids, torch.Tensor) else bonus_token_ids
    uniform_samples, uniform_final = (
        _as_float32_uniforms(uniform_samples),
        _as_float32_uniforms(uniform_final),
    )
    if max_spec_len is None and isinstance(cu_num_draft_tokens, torch.Tensor):
        if _is_fake(cu_num_draft_tokens):
            raise ValueError(
                "chain_speculative_sampling: pass max_spec_len= when tracing with fake tensors (FakeTensorMode, "
                "torch.export): the output's width, max_spec_len + 1, is otherwise read from cu_num_draft_tokens"
            )
        counts = torch.diff(cu_num_draft_tokens.long(), prepend=cu_num_draft_tokens.new_zeros(1).long())
        max_spec_len = max(int(counts.max()), 0) if counts.numel() else 0
    tensors = (draft_token_ids, cu_num_draft_tokens, draft_probs, target_probs, bonus)
    tensors += (uniform_samples, uniform_final)
    _CHECKED.run(_check_args, *tensors, max_spec_len)
    eager = eager_fast_path(*tensors)
    if eager:
        out, status = _run_chain_sampling(*tensors, max_spec_len)
    else:
        out, status = torch.ops.eagle.chain_speculative_sampling(*tensors, max_spec_len)
    if target_probs.device.type == "cpu" or debug_checks_enabled():
        (_raise_on_status if eager else raise_on_status)(OP, status, CHAIN_STATUS_MESSAGES)
    return out
