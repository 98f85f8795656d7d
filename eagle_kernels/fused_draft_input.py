"""The draft head's input projection, fused with the embedding gather and the concat.

EAGLE-1/2 draft heads start with ``fc(cat([embed(tokens), feature], -1))`` (fc: 2H -> H, embedding
first, feature second); EAGLE-3 heads start with ``fc(cat([h_low, h_mid, h_high], -1))`` (fc: 3H -> H).
The Triton kernel computes both as one GEMM whose K loop walks over *segments*: it reads the first H
columns of its A operand straight from embedding rows chosen by token id (or from ``h_low``) and the
following ones from the other inputs, matching each segment with its column block of ``fc_weight``.
The gathered embedding and the concatenated ``[N, 2H]`` / ``[N, 3H]`` activation never exist in memory.

On CPU the C++ op (``csrc/cpu/fused_draft_input.cpp``, the default there) writes the gathered rows
and the features once into a scratch ``[N, kH]`` buffer, then runs its own AVX-512 skinny GEMM for
decode-sized N (and for fp16 at any N) or one MKL/oneDNN ``addmm`` for large N; the crossovers and
the speedups over the unfused torch code are measured in ``bench/bench_fused_draft_input.py``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from eagle_kernels import _ext
from eagle_kernels._backend import debug_checks_enabled, eager_fast_path, forced_backend, select_backend
from eagle_kernels._checks import INDEX_DTYPES, check_same_dtype, check_tensor
from eagle_kernels._triton import tl, triton

OP = "fused_draft_input"
OP_EAGLE3 = "fused_eagle3_input"
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def fused_draft_input_ref(
    hidden: torch.Tensor,
    token_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch definition of :func:`fused_draft_input`: gather, concat, linear (materialised)."""
    return F.linear(torch.cat([embed_weight[token_ids], hidden], dim=-1), fc_weight, fc_bias)


def fused_eagle3_input_ref(
    h_low: torch.Tensor,
    h_mid: torch.Tensor,
    h_high: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch definition of :func:`fused_eagle3_input`: concat low -> mid -> high, then linear."""
    return F.linear(torch.cat([h_low, h_mid, h_high], dim=-1), fc_weight, fc_bias)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _accumulate_segment(
    acc,
    row_ptrs,
    row_mask,
    stride_ak,
    w_ptr,
    w_col0,
    stride_wn,
    stride_wk,
    offs_n,
    n_mask,
    K,
    BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """acc += A_seg[rows, :K] @ W[offs_n, w_col0 : w_col0 + K].T, where ``row_ptrs`` points at the
    first element of each A row (an embedding row chosen by token id, or a feature row)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        a = tl.load(
            row_ptrs[:, None] + k[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + (w_col0 + k)[:, None] * stride_wk,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def _fused_segments_linear_kernel(
    out_ptr,
    bias_ptr,
    w_ptr,
    ids_ptr,
    seg0_ptr,
    seg1_ptr,
    seg2_ptr,
    M,
    N,
    K,
    stride_s0m,
    stride_s0k,
    stride_s1m,
    stride_s1k,
    stride_s2m,
    stride_s2k,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    GATHER_SEG0: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, N] = cat(seg0, seg1[, seg2])[M, NUM_SEGMENTS*K] @ W[N, NUM_SEGMENTS*K].T (+ bias).

    seg0's row m is ``seg0[ids[m]]`` when GATHER_SEG0 (the embedding table), else ``seg0[m]``.
    Programs are ordered in groups of GROUP_M row blocks so that neighbours share W tiles in L2.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)
    if GATHER_SEG0:
        seg0_rows = tl.load(ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    else:
        seg0_rows = rows

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_segment(
        acc, seg0_ptr + seg0_rows * stride_s0m, m_mask, stride_s0k, w_ptr, 0,
        stride_wn, stride_wk, offs_n, n_mask, K, BLOCK_K, FP32_DOT,
    )  # fmt: skip
    acc = _accumulate_segment(
        acc, seg1_ptr + rows * stride_s1m, m_mask, stride_s1k, w_ptr, K,
        stride_wn, stride_wk, offs_n, n_mask, K, BLOCK_K, FP32_DOT,
    )  # fmt: skip
    if NUM_SEGMENTS == 3:
        acc = _accumulate_segment(
            acc, seg2_ptr + rows * stride_s2m, m_mask, stride_s2k, w_ptr, 2 * K,
            stride_wn, stride_wk, offs_n, n_mask, K, BLOCK_K, FP32_DOT,
        )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_tiles(M: int, N: int, device: torch.device, element_size: int) -> dict:
    """Tile sizes by the number of rows: decode (M = batch x tree width, up to a few hundred) is a
    skinny GEMM bound by reading W, so it takes short, wide-K tiles and splits N finely enough to
    give every SM a program; prefill (large M) takes square 128-tiles."""
    if M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    elif M <= 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    if element_size == 4:  # fp32 tiles take twice the shared memory: 2 stages fit 100 KB parts too
        cfg["num_stages"] = 2
    if device.type == "cuda":
        programs = lambda c: triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])  # noqa: E731
        while cfg["BLOCK_N"] > 32 and programs(cfg) < _num_sms(device.index or 0):
            cfg["BLOCK_N"] //= 2
    cfg["GROUP_M"] = 8
    return cfg


def _interpreted_bf16(out: torch.Tensor) -> bool:
    """The CPU interpreter mishandles bf16 arithmetic: its ``tl.dot`` multiplies bf16 bit patterns
    (triton-lang/triton#11584) and its fp32 -> bf16 cast truncates instead of rounding to nearest.
    There the kernel takes fp32 operands (bf16 products are exact in fp32, as on a tensor core) and
    writes fp32, which torch rounds to bf16, so the interpreter checks the arithmetic a GPU does."""
    return out.dtype == torch.bfloat16 and out.device.type == "cpu"


def _launch_segments_linear(out, fc_weight, fc_bias, segments, token_ids=None):
    """Run the Triton kernel: ``segments`` are the A blocks in column order; with ``token_ids`` the
    first one is an embedding table indexed by them."""
    M, N = out.shape
    K = segments[1].shape[1]
    if M == 0 or N == 0:
        return out
    if _interpreted_bf16(out):
        out.copy_(_launch_segments_linear(out.float(), fc_weight, fc_bias, segments, token_ids))
        return out
    seg = list(segments) + [segments[-1]] * (3 - len(segments))  # unused pointer slots
    cfg = _pick_tiles(M, N, out.device, fc_weight.element_size())
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _fused_segments_linear_kernel[grid](
        out,
        fc_bias if fc_bias is not None else out,
        fc_weight,
        token_ids if token_ids is not None else out,
        seg[0],
        seg[1],
        seg[2],
        M,
        N,
        K,
        *seg[0].stride(),
        *seg[1].stride(),
        *seg[2].stride(),
        *fc_weight.stride(),
        *out.stride(),
        GATHER_SEG0=token_ids is not None,
        NUM_SEGMENTS=len(segments),
        HAS_BIAS=fc_bias is not None,
        FP32_DOT=out.dtype == torch.float32,
        **cfg,
    )
    return out


def _fused_draft_input_triton(hidden, token_ids, embed_weight, fc_weight, fc_bias, out):
    return _launch_segments_linear(out, fc_weight, fc_bias, (embed_weight, hidden), token_ids)


def _fused_eagle3_input_triton(h_low, h_mid, h_high, fc_weight, fc_bias, out):
    return _launch_segments_linear(out, fc_weight, fc_bias, (h_low, h_mid, h_high))


# --------------------------------------------------------------------------------------------------
# Registered ops and dispatch
# --------------------------------------------------------------------------------------------------
def _backend_for(op: str, t: torch.Tensor) -> str:
    backend = select_backend(op, t.device)
    if backend == "triton" and t.dtype not in TRITON_DTYPES:
        if forced_backend() == "triton":
            raise TypeError(f"eagle_kernels.{op}: the triton backend supports fp16/bf16/fp32, got {t.dtype}")
        backend = "torch"  # float64 on CUDA: only the reference handles it
    return backend


def _run_draft_input(backend, hidden, token_ids, embed_weight, fc_weight, fc_bias, out) -> None:
    if backend in ("cpp", "cuda"):
        _ext.op(OP)(hidden, token_ids, embed_weight, fc_weight, fc_bias, out)
    elif backend == "triton":
        _fused_draft_input_triton(hidden, token_ids, embed_weight, fc_weight, fc_bias, out)
    else:
        out.copy_(fused_draft_input_ref(hidden, token_ids, embed_weight, fc_weight, fc_bias))


def _run_eagle3_input(backend, h_low, h_mid, h_high, fc_weight, fc_bias, out) -> None:
    if backend in ("cpp", "cuda"):
        _ext.op(OP_EAGLE3)(h_low, h_mid, h_high, fc_weight, fc_bias, out)
    elif backend == "triton":
        _fused_eagle3_input_triton(h_low, h_mid, h_high, fc_weight, fc_bias, out)
    else:
        out.copy_(fused_eagle3_input_ref(h_low, h_mid, h_high, fc_weight, fc_bias))


def _new_output(rows: torch.Tensor, fc_weight: torch.Tensor) -> torch.Tensor:
    return rows.new_empty((rows.shape[0], fc_weight.shape[0]))


@torch.library.custom_op("eagle::fused_draft_input", mutates_args=())
def _fused_draft_input_op(
    hidden: torch.Tensor,
    token_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
) -> torch.Tensor:
    out = _new_output(hidden, fc_weight)
    _run_draft_input(_backend_for(OP, hidden), hidden, token_ids, embed_weight, fc_weight, fc_bias, out)
    return out


@_fused_draft_input_op.register_fake
def _(hidden, token_ids, embed_weight, fc_weight, fc_bias):
    return _new_output(hidden, fc_weight)


@torch.library.custom_op("eagle::fused_draft_input_out", mutates_args=("out",))
def _fused_draft_input_out_op(
    hidden: torch.Tensor,
    token_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    _run_draft_input(_backend_for(OP, hidden), hidden, token_ids, embed_weight, fc_weight, fc_bias, out)


@_fused_draft_input_out_op.register_fake
def _(hidden, token_ids, embed_weight, fc_weight, fc_bias, out):
    return None


@torch.library.custom_op("eagle::fused_eagle3_input", mutates_args=())
def _fused_eagle3_input_op(
    h_low: torch.Tensor,
    h_mid: torch.Tensor,
    h_high: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
) -> torch.Tensor:
    out = _new_output(h_low, fc_weight)
    _run_eagle3_input(_backend_for(OP_EAGLE3, h_low), h_low, h_mid, h_high, fc_weight, fc_bias, out)
    return out


@_fused_eagle3_input_op.register_fake
def _(h_low, h_mid, h_high, fc_weight, fc_bias):
    return _new_output(h_low, fc_weight)


# Backward (training the draft head's fc, or back-propagating into the features): with A the virtual
# concat and W = [W_0 | W_1 | ...] split like A, dA_i = g @ W_i, dW = g.T @ A (built per block), db = sum g.
def _draft_input_setup_context(ctx, inputs, output):
    hidden, token_ids, embed_weight, fc_weight, fc_bias = inputs
    ctx.save_for_backward(hidden, token_ids, embed_weight, fc_weight)
    ctx.has_bias = fc_bias is not None


def _draft_input_backward(ctx, grad):
    hidden, token_ids, embed_weight, fc_weight = ctx.saved_tensors
    need_hidden, _, need_embed, need_weight, need_bias = ctx.needs_input_grad
    H = hidden.shape[1]
    grad_hidden = grad @ fc_weight[:, H:] if need_hidden else None
    grad_embed = None
    if need_embed:
        grad_embed = torch.zeros_like(embed_weight).index_add_(0, token_ids, grad @ fc_weight[:, :H])
    grad_weight = None
    if need_weight:
        grad_weight = torch.cat([grad.T @ embed_weight.index_select(0, token_ids), grad.T @ hidden], dim=1)
    grad_bias = grad.sum(0) if need_bias and ctx.has_bias else None
    return grad_hidden, None, grad_embed, grad_weight, grad_bias


def _eagle3_input_setup_context(ctx, inputs, output):
    *features, fc_weight, fc_bias = inputs
    ctx.save_for_backward(*features, fc_weight)
    ctx.has_bias = fc_bias is not None


def _eagle3_input_backward(ctx, grad):
    *features, fc_weight = ctx.saved_tensors
    H = features[0].shape[1]
    needs = ctx.needs_input_grad
    grads = [grad @ fc_weight[:, i * H : (i + 1) * H] if needs[i] else None for i in range(3)]
    grad_weight = torch.cat([grad.T @ f for f in features], dim=1) if needs[3] else None
    grad_bias = grad.sum(0) if needs[4] and ctx.has_bias else None
    return (*grads, grad_weight, grad_bias)


_fused_draft_input_op.register_autograd(_draft_input_backward, setup_context=_draft_input_setup_context)
_fused_eagle3_input_op.register_autograd(_eagle3_input_backward, setup_context=_eagle3_input_setup_context)


@torch.library.custom_op("eagle::fused_eagle3_input_out", mutates_args=("out",))
def _fused_eagle3_input_out_op(
    h_low: torch.Tensor,
    h_mid: torch.Tensor,
    h_high: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    _run_eagle3_input(_backend_for(OP_EAGLE3, h_low), h_low, h_mid, h_high, fc_weight, fc_bias, out)


@_fused_eagle3_input_out_op.register_fake
def _(h_low, h_mid, h_high, fc_weight, fc_bias, out):
    return None


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _check_features(name: str, t: object, like: torch.Tensor | None = None) -> torch.Tensor:
    """A ``[N, H]`` or ``[B, T, H]`` float feature tensor (matching ``like``'s shape when given)."""
    check_tensor(name, t, dtypes=INPUT_DTYPES)
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, H] or [B, T, H], got shape {tuple(t.shape)}")
    if like is not None:
        check_tensor(name, t, device=like.device, shape=tuple(like.shape))
    return t


def _check_projection(fc_weight, fc_bias, H: int, segments: int, device, **same_dtype) -> None:
    check_tensor("fc_weight", fc_weight, ndim=2, dtypes=INPUT_DTYPES, device=device)
    if tuple(fc_weight.shape) != (H, segments * H):
        raise ValueError(
            f"fc_weight must be [H, {segments}H] = [{H}, {segments * H}] for hidden size H={H}, "
            f"got {list(fc_weight.shape)}"
        )
    if fc_bias is not None:
        check_tensor("fc_bias", fc_bias, dtypes=INPUT_DTYPES, device=device, shape=(H,))
        same_dtype["fc_bias"] = fc_bias
    check_same_dtype(**same_dtype, fc_weight=fc_weight)


def _draft_args_well_formed(hidden, token_ids, embed_weight, fc_weight, fc_bias) -> bool:
    """Cheap acceptance of well-formed arguments (attribute reads only). Anything else goes to
    :func:`_check_draft_args`, which accepts exactly the same and names the problem otherwise."""
    try:
        dtype, device, H = hidden.dtype, hidden.device, hidden.shape[-1]
        return (
            hidden.dim() in (2, 3)
            and dtype in INPUT_DTYPES
            and token_ids.dtype in INDEX_DTYPES
            and token_ids.shape == hidden.shape[:-1]
            and embed_weight.dim() == 2
            and embed_weight.shape[1] == H
            and embed_weight.shape[0] > 0
            and fc_weight.shape == (H, 2 * H)
            and embed_weight.dtype == dtype
            and fc_weight.dtype == dtype
            and token_ids.device == device
            and embed_weight.device == device
            and fc_weight.device == device
            and (
                fc_bias is None
                or (fc_bias.shape == (H,) and fc_bias.dtype == dtype and fc_bias.device == device)
            )
        )
    except (AttributeError, TypeError, IndexError):
        return False


def _check_draft_args(hidden, token_ids, embed_weight, fc_weight, fc_bias) -> None:
    _check_features("hidden", hidden)
    device, H = hidden.device, hidden.shape[-1]
    check_tensor("token_ids", token_ids, dtypes=INDEX_DTYPES, device=device, shape=tuple(hidden.shape[:-1]))
    check_tensor("embed_weight", embed_weight, ndim=2, dtypes=INPUT_DTYPES, device=device)
    if embed_weight.shape[1] != H:
        raise ValueError(
            f"embed_weight must be [V, H] with H={H} (hidden's size), got {list(embed_weight.shape)}"
        )
    if embed_weight.shape[0] == 0:
        raise ValueError("embed_weight has an empty vocabulary (V=0)")
    _check_projection(fc_weight, fc_bias, H, 2, device, hidden=hidden, embed_weight=embed_weight)


def _check_token_ids_in_range(token_ids: torch.Tensor, V: int) -> None:
    """Reads the ids, so on CUDA it runs only in debug mode."""
    if token_ids.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(token_ids))
    if lo < 0 or hi >= V:
        raise ValueError(
            f"token_ids must be in [0, {V}) (the embedding's vocabulary), got min {lo}, max {hi}"
        )


def _check_out(out, shape, like: torch.Tensor, inputs: dict) -> torch.Tensor:
    """``out`` must match the result's shape/dtype/device, share no memory with an input, and be
    viewable as ``[N, H]``; returns that 2-D view."""
    check_tensor("out", out, dtypes=(like.dtype,), device=like.device, shape=shape)
    for name, t in inputs.items():
        if t is not None and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            raise ValueError(f"out must not share memory with {name}")
    try:
        return out.view(-1, shape[-1])
    except RuntimeError as exc:
        raise ValueError(f"out (strides {out.stride()}) cannot be viewed as [N, H] without a copy") from exc


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
def fused_draft_input(
    hidden: torch.Tensor,
    token_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """EAGLE-1/2 draft-head input: ``cat([embed_weight[token_ids], hidden], -1) @ fc_weight.T + fc_bias``.

    The gathered embedding rows and the concat are never materialised on CUDA (one Triton GEMM
    whose K loop reads embedding rows by token id, then the features). fp32 accumulation.

    Parameters
    ----------
    hidden : Tensor ``[N, H]`` or ``[B, T, H]``, float16 / bfloat16 / float32 (float64 on CPU)
        Target features (the target's last hidden state after its final norm, or the draft's own
        output for later draft steps). Row t is paired with the embedding of ``token_ids[t]``.
    token_ids : Tensor ``[N]`` or ``[B, T]`` (``hidden``'s leading dims), int32 or int64
        Tokens to embed, one ahead of the features, each in ``[0, V)``.
    embed_weight : Tensor ``[V, H]``, same dtype as ``hidden``
        The draft's (frozen copy of the target's) embedding table.
    fc_weight : Tensor ``[H, 2H]``, same dtype
        The draft's ``fc.weight``; columns ``[:H]`` multiply the embedding, ``[H:]`` the feature.
    fc_bias : Tensor ``[H]`` or None, same dtype
        The draft's ``fc.bias`` (absent in heads trained with ``bias: false``).
    out : Tensor shaped like ``hidden``, optional
        Pre-allocated result (CUDA-graph friendly); must not share memory with any input.

    Returns
    -------
    Tensor shaped like ``hidden`` (``[N, H]`` or ``[B, T, H]``), ``hidden``'s dtype: the projected
    draft input (``out`` when given).
    """
    if not _draft_args_well_formed(hidden, token_ids, embed_weight, fc_weight, fc_bias):
        _check_draft_args(hidden, token_ids, embed_weight, fc_weight, fc_bias)
    H = hidden.shape[-1]
    backend = _backend_for(OP, hidden)
    # The C++ op checks the ids itself (same message), so only the other backends need this pass.
    if backend != "cpp" and (hidden.device.type == "cpu" or debug_checks_enabled()):
        _check_token_ids_in_range(token_ids, embed_weight.shape[0])
    args = (hidden.reshape(-1, H), token_ids.reshape(-1), embed_weight, fc_weight, fc_bias)
    fast = eager_fast_path(*args, out)
    if out is None:
        if fast:
            out = _new_output(args[0], fc_weight)
            _run_draft_input(backend, *args, out)
            return out.view(hidden.shape)
        return torch.ops.eagle.fused_draft_input(*args).view(hidden.shape)
    inputs = dict(hidden=hidden, token_ids=token_ids, embed_weight=embed_weight, fc_weight=fc_weight)
    out2d = _check_out(out, tuple(hidden.shape), hidden, {**inputs, "fc_bias": fc_bias})
    if fast:
        _run_draft_input(backend, *args, out2d)
    else:
        torch.ops.eagle.fused_draft_input_out(*args, out2d)
    return out


def fused_eagle3_input(
    h_low: torch.Tensor,
    h_mid: torch.Tensor,
    h_high: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """EAGLE-3 feature fusion: ``cat([h_low, h_mid, h_high], -1) @ fc_weight.T (+ fc_bias)``, no concat.

    Parameters
    ----------
    h_low, h_mid, h_high : Tensor ``[N, H]`` or ``[B, T, H]`` (all the same shape),
        float16 / bfloat16 / float32 (float64 on CPU)
        Un-normalised hidden states entering target layers 2, L//2 and L-3 (low -> mid -> high).
    fc_weight : Tensor ``[H, 3H]``, same dtype
        The EAGLE-3 head's ``fc.weight``; column block i multiplies the i-th input.
    fc_bias : Tensor ``[H]`` or None, same dtype
        Optional bias (official EAGLE-3 heads have none).
    out : Tensor shaped like ``h_low``, optional
        Pre-allocated result; must not share memory with any input.

    Returns
    -------
    Tensor shaped like ``h_low``, its dtype: the fused feature fed to the EAGLE-3 draft layer.
    """
    _check_features("h_low", h_low)
    _check_features("h_mid", h_mid, like=h_low)
    _check_features("h_high", h_high, like=h_low)
    device, H = h_low.device, h_low.shape[-1]
    _check_projection(fc_weight, fc_bias, H, 3, device, h_low=h_low, h_mid=h_mid, h_high=h_high)
    args = (h_low.reshape(-1, H), h_mid.reshape(-1, H), h_high.reshape(-1, H), fc_weight, fc_bias)
    fast = eager_fast_path(*args, out)
    if out is None:
        if fast:
            out = _new_output(args[0], fc_weight)
            _run_eagle3_input(_backend_for(OP_EAGLE3, h_low), *args, out)
            return out.view(h_low.shape)
        return torch.ops.eagle.fused_eagle3_input(*args).view(h_low.shape)
    inputs = dict(h_low=h_low, h_mid=h_mid, h_high=h_high, fc_weight=fc_weight, fc_bias=fc_bias)
    out2d = _check_out(out, tuple(h_low.shape), h_low, inputs)
    if fast:
        _run_eagle3_input(_backend_for(OP_EAGLE3, h_low), *args, out2d)
    else:
        torch.ops.eagle.fused_eagle3_input_out(*args, out2d)
    return out
