"""Temperature, top-k, top-p and min-p warping of target logits into probabilities, per row.

The semantics are exactly Hugging Face transformers' sampling warpers, applied in the order
``generate`` applies them: ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``,
``MinPLogitsWarper`` (``min_tokens_to_keep=1``), then a softmax:

* temperature: ``scores = logits / temperature`` (float32 division); ``temperature == 0`` gives
  the one-hot distribution of the first maximal logit (greedy, like ``generate`` without sampling);
* top-k: tokens whose score is below the ``k``-th largest score are removed, so every token tied
  with the ``k``-th one stays; ``top_k == 0`` (or ``>= V``, or ``-1``: vLLM's and SGLang's "off")
  disables the filter;
* top-p: with the remaining scores sorted ascending, a token is removed when the cumulative
  probability up to and including it is ``<= 1 - top_p``; the most probable token always stays.
  Equivalently a token stays when the probability of the tokens ranked above it is ``< top_p``.
  HF ranks equal scores by ``torch.sort``, which is not stable (its order of ties depends on the
  device and the row length); here ties are ranked as a *stable* ascending sort ranks them, so when
  the cut falls inside a group of equal scores the tokens with the larger vocabulary ids stay. The
  number of tokens kept is HF's in every case; ``top_p == 1`` disables the filter;
* min-p: a token is removed when its probability (after the filters above) is below
  ``min_p * max probability``; ``min_p == 0`` disables the filter.

Kernels: the reference is HF's sort-based formulation, vectorised with per-row parameters. The
Triton kernel (one program per row) and the C++ kernel (rows in parallel) never sort the
vocabulary: the Triton kernel finds the top-k and top-p thresholds by binary searches over the
order-preserving integer keys of the float32 scores (each probe counts / sums over the row and
jumps to the nearest actual score, so a search ends within 32 passes, exactly on a score of the
row); the C++ kernel uses a size-k heap (``std::nth_element`` for large k) for top-k and a
mass-weighted quickselect for top-p.
The probabilities they compute differ from the sort-based ones only by float rounding, so a token
whose cumulative probability lands within rounding of the ``1 - top_p`` cut (or of the min-p cut)
may be decided differently.
"""

from __future__ import annotations

import math

import torch

from eagle_kernels import _ext
from eagle_kernels._backend import debug_checks_enabled, eager_fast_path, select_backend
from eagle_kernels._checks import SignatureCache, check_tensor
from eagle_kernels._triton import launches_on_input_device, tl, triton

OP = "warp_logits"
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_PARAM_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def _top_k_ref(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    V = scores.shape[-1]
    k = torch.where((top_k <= 0) | (top_k > V), V, top_k).long()
    kth = scores.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p_ref(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    ascending, order = torch.sort(scores, dim=-1, stable=True)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)[:, None]
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return scores.masked_fill(remove & (top_p < 1)[:, None], float("-inf"))


def _min_p_ref(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = scores.softmax(dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    return scores.masked_fill(probs < min_p[:, None] * top, float("-inf"))


def warp_logits_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """PyTorch definition of the op (see :func:`warp_logits`) on ``[R, V]`` logits with ``[R]``
    parameters (float32 temperature/top_p/min_p, int64 top_k); returns float32 probabilities."""
    x = logits.float()
    greedy = temperature == 0
    scores = x / torch.where(greedy, 1.0, temperature)[:, None]
    scores = _top_k_ref(scores, top_k)
    scores = _top_p_ref(scores, top_p)
    scores = _min_p_ref(scores, min_p)
    probs = scores.softmax(dim=-1)
    one_hot = torch.nn.functional.one_hot(x.argmax(dim=-1), x.shape[-1]).float()
    return torch.where(greedy[:, None], one_hot, probs)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _load_scores(row_ptr, offs, V, t_div):
    """Scaled scores of one block (correctly rounded division, like torch) and the in-row mask."""
    inside = offs < V
    x = tl.load(row_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    return tl.math.div_rn(x, t_div), inside


@triton.jit
def _order_key(y):
    """int64 key ordered like the float32 value ``y`` (-0.0 and +0.0 share key 0)."""
    bits = y.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(y == 0.0, 0, key).to(tl.int64)


@triton.jit
def _key_value(key):
    """Inverse of :func:`_order_key` for a scalar key."""
    k32 = key.to(tl.int32)
    bits = tl.where(k32 < 0, k32 ^ 0x7FFFFFFF, k32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest_key(row_ptr, V, t_div, k, lo, hi, BLOCK: tl.constexpr):
    """Key of the k-th largest score: the largest key t with count(key >= t) >= k.

    Invariant: lo and hi are keys of scores in the row and the answer lies in [lo, hi]. Every probe
    moves lo up (or hi down) to the nearest score at or past the probe."""
    lanes = tl.arange(0, BLOCK)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        count = tl.zeros([], dtype=tl.int64)
        up = hi
        down = lo
        for start in range(0, V, BLOCK):
            y, inside = _load_scores(row_ptr, start + lanes, V, t_div)
            key = _order_key(y)
            at_or_above = inside & (key >= mid)
            count += tl.sum(at_or_above.to(tl.int64), 0)
            up = tl.minimum(up, tl.min(tl.where(at_or_above, key, hi), 0))
            down = tl.maximum(down, tl.max(tl.where(inside & (key < mid), key, lo), 0))
        enough = count >= k
        lo = tl.where(enough, up, lo)
        hi = tl.where(enough, hi, down)
    return lo


@triton.jit
def _top_p_cut_key(row_ptr, V, t_div, y_max, kth_key, z, top_p, lo, hi, BLOCK: tl.constexpr):
    """Smallest kept key t such that the kept scores strictly above t carry probability < top_p:
    the score of the last token top-p keeps. Same search scheme as :func:`_kth_largest_key`."""
    lanes = tl.arange(0, BLOCK)
    while lo < hi:
        mid = lo + (hi - lo) // 2
        mass = tl.zeros([], dtype=tl.float32)
        up = hi
        down = lo
        for start in range(0, V, BLOCK):
            y, inside = _load_scores(row_ptr, start + lanes, V, t_div)
            key = _order_key(y)
            kept = inside & (key >= kth_key)
            above = kept & (key > mid)
            mass += tl.sum(tl.where(above, tl.exp(y - y_max), 0.0), 0)
            up = tl.minimum(up, tl.min(tl.where(above, key, hi), 0))
            down = tl.maximum(down, tl.max(tl.where(kept & (key <= mid), key, lo), 0))
        small = mass / z < top_p
        lo = tl.where(small, lo, up)
        hi = tl.where(small, down, hi)
    return lo


@triton.jit
def _first_kept_tie(row_ptr, V, t_div, cut_key, keep, BLOCK: tl.constexpr):
    """Lowest vocabulary id among the ``keep`` largest ids whose score has key ``cut_key``."""
    lanes = tl.arange(0, BLOCK)
    lo = tl.zeros([], dtype=tl.int64)
    hi = tl.zeros([], dtype=tl.int64) + (V - 1)  # V may be specialised to a constexpr
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        count = tl.zeros([], dtype=tl.int64)
        up = hi
        down = lo
        for start in range(0, V, BLOCK):
            offs = start + lanes
            y, inside = _load_scores(row_ptr, offs, V, t_div)
            tie = inside & (_order_key(y) == cut_key)
            from_mid = tie & (offs >= mid)
            count += tl.sum(from_mid.to(tl.int64), 0)
            up = tl.minimum(up, tl.min(tl.where(from_mid, offs.to(tl.int64), hi), 0))
            down = tl.maximum(down, tl.max(tl.where(tie & (offs < mid), offs.to(tl.int64), lo), 0))
        enough = count >= keep
        lo = tl.where(enough, up, lo)
        hi = tl.where(enough, hi, down)
    return lo


@triton.jit
def _warp_logits_kernel(
    logits_ptr,
    temperature_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    out_ptr,
    V,
    stride_row,
    BLOCK: tl.constexpr,
):
    """One program per row; every step is a few passes over the row, nothing is sorted.

    kept after top-k:  key >= kth_key
    kept after top-p:  key > cut_key, or key == cut_key and id >= first_tie
    kept after min-p:  also exp(y - y_max) / z2 >= min_p / z2
    """
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    out_row = out_ptr + row.to(tl.int64) * V
    lanes = tl.arange(0, BLOCK)
    temperature = tl.load(temperature_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    greedy = temperature == 0.0
    t_div = tl.where(greedy, 1.0, temperature)

    y_max = tl.full([], float("-inf"), tl.float32)
    y_min = tl.full([], float("inf"), tl.float32)
    arg_max = tl.zeros([], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        y, inside = _load_scores(row_ptr, offs, V, t_div)
        block_max = tl.max(tl.where(inside, y, float("-inf")), 0)
        block_arg = tl.min(tl.where(inside & (y == block_max), offs, V), 0)
        arg_max = tl.where(block_max > y_max, block_arg, arg_max)
        y_max = tl.maximum(y_max, block_max)
        y_min = tl.minimum(y_min, tl.min(tl.where(inside, y, float("inf")), 0))

    if greedy:
        for start in range(0, V, BLOCK):
            offs = start + lanes
            tl.store(out_row + offs, tl.where(offs == arg_max, 1.0, 0.0), mask=offs < V)
    else:
        max_key = _order_key(y_max)
        kth_key = _order_key(y_min)
        if (top_k > 0) & (top_k < V):
            kth_key = _kth_largest_key(row_ptr, V, t_div, top_k, kth_key, max_key, BLOCK)

        cut_key = kth_key
        first_tie = tl.zeros([], dtype=tl.int64)
        if top_p < 1.0:
            z1 = tl.zeros([], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                y, inside = _load_scores(row_ptr, start + lanes, V, t_div)
                kept = inside & (_order_key(y) >= kth_key)
                z1 += tl.sum(tl.where(kept, tl.exp(y - y_max), 0.0), 0)
            cut_key = _top_p_cut_key(row_ptr, V, t_div, y_max, kth_key, z1, top_p, kth_key, max_key, BLOCK)
            mass_above = tl.zeros([], dtype=tl.float32)
            ties = tl.zeros([], dtype=tl.int64)
            for start in range(0, V, BLOCK):
                y, inside = _load_scores(row_ptr, start + lanes, V, t_div)
                key = _order_key(y)
                mass_above += tl.sum(tl.where(inside & (key > cut_key), tl.exp(y - y_max), 0.0), 0)
                ties += tl.sum((inside & (key == cut_key)).to(tl.int64), 0)
            # Tied tokens i = 0, 1, ... (largest ids first) stay while mass_above + i * q < top_p.
            q = tl.exp(_key_value(cut_key) - y_max) / z1
            keep = tl.ceil((top_p - mass_above / z1) / q)
            keep = tl.minimum(tl.maximum(keep, 1.0), ties.to(tl.float32)).to(tl.int64)
            if keep < ties:
                first_tie = _first_kept_tie(row_ptr, V, t_div, cut_key, keep, BLOCK)

        z2 = tl.full([], 1.0, tl.float32)
        if min_p > 0.0:
            z2 = tl.zeros([], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + lanes
                y, inside = _load_scores(row_ptr, offs, V, t_div)
                key = _order_key(y)
                kept = inside & ((key > cut_key) | ((key == cut_key) & (offs >= first_tie)))
                z2 += tl.sum(tl.where(kept, tl.exp(y - y_max), 0.0), 0)
        min_prob = min_p * (1.0 / z2)  # the max probability after top-p is exp(0) / z2

        z3 = tl.zeros([], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + lanes
            y, inside = _load_scores(row_ptr, offs, V, t_div)
            key = _order_key(y)
            w = tl.exp(y - y_max)
            kept = (
                inside & ((key > cut_key) | ((key == cut_key) & (offs >= first_tie))) & (w / z2 >= min_prob)
            )
            z3 += tl.sum(tl.where(kept, w, 0.0), 0)
        for start in range(0, V, BLOCK):
            offs = start + lanes
            y, inside = _load_scores(row_ptr, offs, V, t_div)
            key = _order_key(y)
            w = tl.exp(y - y_max)
            kept = (
                inside & ((key > cut_key) | ((key == cut_key) & (offs >= first_tie))) & (w / z2 >= min_prob)
            )
            tl.store(out_row + offs, tl.where(kept, w / z3, 0.0), mask=inside)


@launches_on_input_device
def _warp_logits_triton(logits, temperature, top_k, top_p, min_p):
    R, V = logits.shape
    out = torch.empty(R, V, dtype=torch.float32, device=logits.device)
    if R == 0:
        return out
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    block = min(triton.next_power_of_2(V), 4096)
    _warp_logits_kernel[(R,)](
        logits,
        temperature,
        top_k,
        top_p,
        min_p,
        out,
        V,
        logits.stride(0),
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Value checks (CPU always; CUDA only in debug mode; the C++ kernel performs them itself)
# --------------------------------------------------------------------------------------------------
def _check_values(logits, temperature, top_k, top_p, min_p):
    # -inf is a masked token (grammar, bad words, a vocabulary mask), as in HF's warpers
    if bool((torch.isnan(logits) | (logits == float("inf"))).any()):
        raise ValueError("logits contain NaN or +inf (-inf, a masked token, is allowed)")
    if logits.numel() > 0 and not bool((logits > float("-inf")).any(-1).all()):
        raise ValueError("a row of logits has no finite value (every token masked with -inf)")
    if not bool(((temperature >= 0) & torch.isfinite(temperature)).all()):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature.tolist()}")
    if bool((top_k < -1).any()):
        raise ValueError(f"top_k must be >= 0, or -1 (0 and -1 disable it), got {top_k.tolist()}")
    if not bool(((top_p > 0) & (top_p <= 1)).all()):
        raise ValueError(f"top_p must be in (0, 1], got {top_p.tolist()}")
    if not bool(((min_p >= 0) & (min_p <= 1)).all()):
        raise ValueError(f"min_p must be in [0, 1], got {min_p.tolist()}")
    if logits.numel() > 0:
        scale = torch.where(temperature > 0, temperature, 1.0)
        # (a negative logit that overflows to -inf is a removed token, as in HF's float32 division,
        # but not every token of a row: that row would be NaN, or all zeros)
        scaled_max = logits.float().amax(dim=-1) / scale
        if bool((scaled_max == float("inf")).any()):
            raise ValueError("logits / temperature overflows float32; raise the temperature")
        if bool((scaled_max == float("-inf")).any()):
            raise ValueError(
                "logits / temperature underflows to -inf for every token of a row (every logit is below "
                "-3.4e38 * temperature); raise the temperature"
            )


# --------------------------------------------------------------------------------------------------
# Registered op and dispatch
# --------------------------------------------------------------------------------------------------
def _run_warp_logits(logits, temperature, top_k, top_p, min_p):
    """The op's body: value checks where due, then the backend chosen for the tensors' device."""
    backend = select_backend(OP, logits.device)
    args = (logits, temperature, top_k, top_p, min_p)
    if backend != "cpp" and (logits.device.type == "cpu" or debug_checks_enabled()):
        _check_values(*args)
    if backend in ("cpp", "cuda"):
        return _ext.op(OP)(*args)
    if backend == "triton":
        return _warp_logits_triton(*args)
    return warp_logits_ref(*args)


@torch.library.custom_op("eagle::warp_logits", mutates_args=())
def _warp_logits_op(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    _CHECKED.run(_check_op_args, logits, temperature, top_k, top_p, min_p)
    return _run_warp_logits(logits, temperature, top_k, top_p, min_p)


def _check_op_args(logits, temperature, top_k, top_p, min_p) -> None:
    """The registered op's exact forms (what :func:`warp_logits` passes it): ``[R, V]`` logits and
    contiguous ``[R]`` float32 / int64 parameters, which the kernels index by row."""
    check_tensor("logits", logits, ndim=2, dtypes=LOGIT_DTYPES)
    R, device = logits.shape[0], logits.device
    for name, t, dtype in (
        ("temperature", temperature, torch.float32),
        ("top_k", top_k, torch.int64),
        ("top_p", top_p, torch.float32),
        ("min_p", min_p, torch.float32),
    ):
        check_tensor(name, t, dtypes=(dtype,), device=device, shape=(R,))
        if R > 1 and t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")


_CHECKED = SignatureCache()


@_warp_logits_op.register_fake
def _(logits, temperature, top_k, top_p, min_p):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _filled(value: int | float, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.full((rows,), value)``, reused across plain eager calls (the ops only read their
    parameters, and the tensor never leaves this module). Not cached while tracing (torch.compile)
    or while a CUDA graph is being captured: such a tensor would hold no values outside them. Nor
    handed out to a capture: the graph would keep reading its memory after the cache dropped it (the
    cache is cleared when full) and the allocator gave it to something else. A tensor made during the
    capture lives in the graph's private pool, reserved for as long as the graph."""
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.full((rows,), value, dtype=dtype, device=device)  # (a key would specialise on rows)
    sign = math.copysign(1.0, value) if type(value) is float else 1.0  # keeps -0.0 apart from 0.0
    key = (type(value), value, sign, rows, device, dtype)
    t = _FILLED.get(key)
    if t is not None:
        return t
    t = torch.full((rows,), value, dtype=dtype, device=device)
    if type(t) is not torch.Tensor:
        return t
    if len(_FILLED) >= _MAX_FILLED:
        _FILLED.clear()
    _FILLED[key] = t
    return t


_FILLED: dict[tuple, torch.Tensor] = {}
_MAX_FILLED = 64


def _per_row(name, value, rows, leading_shape, device, dtypes, dtype):
    """A parameter as a contiguous ``[rows]`` tensor of ``dtype`` (scalars are broadcast)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a tensor, got bool")
    if isinstance(value, (int, float)):
        if dtype == torch.int64 and not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        return _filled(value, rows, device, dtype)
    check_tensor(name, value, dtypes=dtypes, device=device)
    if value.dim() == 0:
        return value.to(dtype).expand(rows).contiguous()
    if tuple(value.shape) not in ((rows,), tuple(leading_shape)):
        raise ValueError(
            f"{name} must be a scalar or have shape [{rows}] or {list(leading_shape)} (one value per row), "
            f"got {list(value.shape)}"
        )
    return value.reshape(rows).to(dtype).contiguous()


def warp_logits(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Probabilities after HF's temperature, top-k, top-p and min-p warpers, with per-row parameters.

    Parameters
    ----------
    logits : Tensor ``[..., V]``, float16, bfloat16 or float32
        Target logits; every leading index is one row ``r`` of ``R = numel // V`` rows. Computed in
        float32. ``-inf`` masks a token (probability 0), as in HF's warpers.
    temperature : float or Tensor ``[R]`` (or the leading shape), float
        ``> 0`` divides the logits; ``0`` makes the row one-hot at its first maximal logit.
    top_k : int or Tensor ``[R]``, int32/int64
        Keep the scores ``>=`` the ``top_k``-th largest (ties included); ``0`` or ``-1`` (vLLM's and
        SGLang's value for "off") disables.
    top_p : float or Tensor ``[R]``, float in ``(0, 1]``
        Nucleus filter with HF's rule (see the module docstring for ties); ``1`` disables.
    min_p : float or Tensor ``[R]``, float in ``[0, 1]``
        Remove tokens with probability ``< min_p * max probability``; ``0`` disables.

    Returns
    -------
    Tensor ``[..., V]``, float32: each row sums to 1; removed tokens are exactly 0.

    Raises
    ------
    ValueError / TypeError
        Bad shapes or dtypes; on CPU (on CUDA with ``EAGLE_KERNELS_DEBUG=1``) also NaN or +inf
        logits, a row whose every logit is -inf, a negative or non-finite temperature,
        ``logits / temperature`` overflowing float32 (upwards),
        ``top_k < -1``, ``top_p`` outside ``(0, 1]`` or ``min_p`` outside ``[0, 1]``.
    """
    check_tensor("logits", logits, dtypes=LOGIT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {list(logits.shape)}")
    V = logits.shape[-1]
    leading = logits.shape[:-1]
    R = logits.numel() // V
    device = logits.device
    params = (
        _per_row("temperature", temperature, R, leading, device, FLOAT_PARAM_DTYPES, torch.float32),
        _per_row("top_k", top_k, R, leading, device, INT_PARAM_DTYPES, torch.int64),
        _per_row("top_p", top_p, R, leading, device, FLOAT_PARAM_DTYPES, torch.float32),
        _per_row("min_p", min_p, R, leading, device, FLOAT_PARAM_DTYPES, torch.float32),
    )
    flat = logits.reshape(R, V)
    if eager_fast_path(flat, *params):
        probs = _run_warp_logits(flat, *params)
    else:
        probs = torch.ops.eagle.warp_logits(flat, *params)
    return probs.reshape(logits.shape)
