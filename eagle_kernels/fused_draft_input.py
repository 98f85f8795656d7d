"""The draft head's input projection, fused with the embedding gather and the concat.

EAGLE-1/2 draft heads start with ``fc(cat([embed(tokens), feature], -1))`` (fc: 2H -> H, embedding
first, feature second); EAGLE-3 heads start with ``fc(cat([h_low, h_mid, h_high], -1))`` (fc: 3H -> H).

On CUDA (the Triton backend) each call follows a :class:`Plan`:

* ``fused`` (default below :data:`GATHER_MM_MIN_ROWS` rows, i.e. decoding): one Triton GEMM whose
  K loop walks over *segments*: it reads the first H columns of its A operand straight from
  embedding rows chosen by token id (or from ``h_low``) and the following ones from the other
  inputs, matching each segment with its column block of ``fc_weight``. The gathered embedding and
  the concatenated ``[N, 2H]`` / ``[N, 3H]`` activation never exist in memory. Tiles
  (:class:`GemmConfig`, split-K included) come from :func:`heuristic_config`.
* ``gather_mm`` (default from :data:`GATHER_MM_MIN_ROWS` rows on, where the op is compute-bound and
  cuBLAS's GEMM is the fastest there is): one Triton copy kernel packs the segments into an internal
  scratch that is freed after the call (never returned to the caller), then one cuBLAS ``addmm``,
  the same GEMM call as the unfused ``F.linear`` and so the same result bit for bit.
* ``gemv`` (measured plans only; on sm_90 the 1-row default): one Triton kernel without tensor cores
  that reads A as ``fused`` does and streams ``fc_weight`` with plain vector loads, each thread
  keeping fp32 partial products that are summed over k once at the end (:class:`GemvConfig`). At one
  row it matches the best ``fused`` tiles' time in a single launch with no split-K workspace.

``EAGLE_KERNELS_FDI_TUNING=<sweep result JSON>`` (``bench/sweep_fused_draft_input.py``) replaces the
defaults by measured best plans per (H, segments, dtype, rows); :func:`use_plan` forces one plan.

On CPU the C++ op (``csrc/cpu/fused_draft_input.cpp``, the default there) writes the gathered rows
and the features once into a scratch ``[N, kH]`` buffer, then runs its own AVX-512 skinny GEMM for
decode-sized N (and for fp16 at any N) or one MKL/oneDNN ``addmm`` for large N; the crossovers and
the speedups over the unfused torch code are measured in ``bench/bench_fused_draft_input.py``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from eagle_kernels import _ext, _fdi_tuned_plans
from eagle_kernels._backend import debug_checks_enabled, eager_fast_path, forced_backend, select_backend
from eagle_kernels._checks import (
    INDEX_DTYPES,
    SignatureCache,
    check_out_buffer,
    check_same_dtype,
    check_tensor,
)
from eagle_kernels._triton import launches_on_input_device, tl, triton

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
# Plans: which CUDA path runs, with which tiles
# --------------------------------------------------------------------------------------------------
PATHS = ("fused", "gather_mm", "gemv")
# From this many rows on, the default is "gather_mm": the op is compute-bound there and cuBLAS's GEMM
# beat the fused Triton GEMM on the first H200 run (H4096 N=4096: 403 vs 515 us, N=512: 76 vs 129 us
# eager). Below it the op is bound by reading fc_weight and the fused kernel saves two launches.
# Measured plans override both for the shapes they list: a tuning table (EAGLE_KERNELS_FDI_TUNING,
# written by bench/sweep_fused_draft_input.py) first, then the built-in plans per compute capability
# (eagle_kernels/_fdi_tuned_plans.py, the same sweep's results on a GPU of that architecture).
GATHER_MM_MIN_ROWS = 256
TUNING_ENV = "EAGLE_KERNELS_FDI_TUNING"
DEFAULT_NUM_SMS = 132  # H100 SXM / H200; used for plans made without a CUDA device (interpreter, AOT)
# Short dtype names used in tuning tables ("bf16"); torch dtypes and their long names map to them.
_DTYPE_NAMES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "float32": "fp32",
}
_NAME_RE = re.compile(r"bm(\d+)_bn(\d+)_bk(\d+)_gm(\d+)_sk(\d+)_w(\d+)_st(\d+)")
_GEMV_NAME_RE = re.compile(r"bm(\d+)_bn(\d+)_bk(\d+)_w(\d+)_st(\d+)")
# Largest rows x columns x K-tile product a GEMV program keeps as fp32 partial products (64 registers
# per thread at 4 warps); GemvConfig rejects tiles beyond it, which would spill.
GEMV_MAX_TILE = 8192


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclass(frozen=True)
class GemmConfig:
    """Tiles of the fused Triton GEMM ``out[M, N] = A[M, S*K] @ W[N, S*K].T`` (S segments of K).

    block_m/block_n/block_k: tile sizes (powers of two >= 16, the smallest ``tl.dot`` shape);
    group_m: row blocks that share a column block in the launch order (L2 reuse of W tiles);
    split_k: programs per output tile along the K loop (fp32 partials + a reduction kernel);
    num_warps / num_stages: Triton launch options (warps per program, software-pipeline depth).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for field in ("block_m", "block_n", "block_k"):
            value = getattr(self, field)
            if not (_is_pow2(value) and 16 <= value <= 512):
                raise ValueError(f"GemmConfig.{field} must be a power of two in [16, 512], got {value}")
        if self.group_m < 1 or self.split_k < 1:
            raise ValueError(
                f"GemmConfig group_m and split_k must be >= 1, got {self.group_m}, {self.split_k}"
            )
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"GemmConfig.num_stages must be in [1, 8], got {self.num_stages}")

    @property
    def name(self) -> str:
        return (
            f"bm{self.block_m}_bn{self.block_n}_bk{self.block_k}_gm{self.group_m}"
            f"_sk{self.split_k}_w{self.num_warps}_st{self.num_stages}"
        )

    @classmethod
    def from_name(cls, name: str) -> GemmConfig:
        """Inverse of :attr:`name` (``bm16_bn32_bk256_gm8_sk1_w4_st4``)."""
        match = _NAME_RE.fullmatch(name)
        if match is None:
            raise ValueError(
                f"not a GemmConfig name: {name!r} (expected e.g. 'bm16_bn32_bk256_gm8_sk1_w4_st4')"
            )
        return cls(*(int(g) for g in match.groups()))


@dataclass(frozen=True)
class GemvConfig:
    """Tiles of the few-rows Triton GEMV (no tensor cores): program (column block, row block) keeps
    ``block_m x block_n x block_k`` fp32 products of A rows and W rows in registers, accumulates them
    over the whole K loop with FMAs only, and sums over k once at the end.

    block_m: rows per program (a power of two <= 8; calls with fewer rows use the next power of two
    of their row count); block_n / block_k: output columns per program and K tile (powers of two,
    ``block_m * block_n * block_k <= GEMV_MAX_TILE``); num_warps / num_stages: Triton launch options.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        if not (_is_pow2(self.block_m) and self.block_m <= 8):
            raise ValueError(f"GemvConfig.block_m must be a power of two in [1, 8], got {self.block_m}")
        for field in ("block_n", "block_k"):
            value = getattr(self, field)
            if not (_is_pow2(value) and 4 <= value <= 4096):
                raise ValueError(f"GemvConfig.{field} must be a power of two in [4, 4096], got {value}")
        if self.block_m * self.block_n * self.block_k > GEMV_MAX_TILE:
            raise ValueError(
                f"GemvConfig tile {self.block_m}x{self.block_n}x{self.block_k} exceeds GEMV_MAX_TILE="
                f"{GEMV_MAX_TILE} fp32 partial products per program"
            )
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemvConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"GemvConfig.num_stages must be in [1, 8], got {self.num_stages}")

    @property
    def name(self) -> str:
        return f"bm{self.block_m}_bn{self.block_n}_bk{self.block_k}_w{self.num_warps}_st{self.num_stages}"

    @classmethod
    def from_name(cls, name: str) -> GemvConfig:
        """Inverse of :attr:`name` (``bm1_bn16_bk512_w4_st3``)."""
        match = _GEMV_NAME_RE.fullmatch(name)
        if match is None:
            raise ValueError(f"not a GemvConfig name: {name!r} (expected e.g. 'bm1_bn16_bk512_w4_st3')")
        return cls(*(int(g) for g in match.groups()))


DEFAULT_GEMV = GemvConfig(1, 16, 512)


@dataclass(frozen=True)
class Plan:
    """How the Triton backend computes one call.

    path ``"fused"``: one Triton GEMM whose K loop reads A straight from the segments (embedding rows
    by token id, then the features), ``config`` its tiles (None: the shape heuristic's);
    path ``"gather_mm"``: one Triton copy kernel packs the segments into an internal ``[N, S*H]``
    scratch (never returned, freed after the call), then one cuBLAS ``addmm`` with ``fc_weight``:
    the same GEMM call as the unfused ``F.linear``, so the same result bit for bit;
    path ``"gemv"``: one Triton GEMV kernel for a few rows (``config`` a :class:`GemvConfig`, None:
    :data:`DEFAULT_GEMV`) that reads A the fused way and streams ``fc_weight`` with plain loads and
    FMAs, no tensor-core tiles (which at 1 row waste 15 of 16 rows of every A tile).
    """

    path: str
    config: GemmConfig | GemvConfig | None = None

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"Plan.path must be one of {PATHS}, got {self.path!r}")
        wanted = {"fused": GemmConfig, "gemv": GemvConfig}.get(self.path)
        if self.config is not None and (wanted is None or not isinstance(self.config, wanted)):
            raise ValueError(
                "Plan.config must be a GemmConfig for the 'fused' path, a GemvConfig for 'gemv', "
                f"and None for 'gather_mm'; got {type(self.config).__name__} for {self.path!r}"
            )

    @property
    def name(self) -> str:
        return self.path if self.config is None else f"{self.path}:{self.config.name}"

    @classmethod
    def from_name(cls, name: str) -> Plan:
        """Inverse of :attr:`name`: ``gather_mm``, ``fused`` or ``fused:<GemmConfig name>``."""
        path, _, config = name.partition(":")
        if not config:
            return cls(path)
        return cls(path, (GemvConfig if path == "gemv" else GemmConfig).from_name(config))


_PLAN_OVERRIDE: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("eagle_fdi_plan", default=None)


@contextlib.contextmanager
def use_plan(plan: Plan | GemmConfig | str | None) -> Iterator[None]:
    """Within the block, every Triton-backend call of both ops uses ``plan`` (a :class:`Plan`, a
    :class:`GemmConfig` for the fused path, a :class:`GemvConfig` for the GEMV, or a plan name); None restores the default choice.
    For sweeps and tests; it does not change which backend runs."""
    if isinstance(plan, str):
        plan = Plan.from_name(plan)
    elif isinstance(plan, GemmConfig):
        plan = Plan("fused", plan)
    elif isinstance(plan, GemvConfig):
        plan = Plan("gemv", plan)
    elif plan is not None and not isinstance(plan, Plan):
        raise TypeError(
            "use_plan takes a Plan, a GemmConfig, a GemvConfig, a plan name or None, "
            f"got {type(plan).__name__}"
        )
    token = _PLAN_OVERRIDE.set(plan)
    try:
        yield
    finally:
        _PLAN_OVERRIDE.reset(token)


@functools.lru_cache(maxsize=16)
def _sms_of(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; :data:`DEFAULT_NUM_SMS` for other devices."""
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def heuristic_config(
    rows: int, hidden_size: int, num_segments: int, element_size: int, num_sms: int
) -> GemmConfig:
    """Tiles of the fused GEMM by shape (rows M = N tokens, output width H, K loop of S*H).

    Decode sizes are bound by streaming fc_weight (S*H*H elements) once: rows fit one 16- to 64-row
    block, and the column block shrinks (64 -> 32 -> 16) until there is a program per SM; the K tile
    is long (256 for 2-byte types, 16 rows * 512 B per W tile) and 3-4 stages deep so every SM keeps
    ~50 KB of loads in flight. When even 16-column blocks leave most SMs idle (small H), the K loop
    is split in two or four (fp32 partials, one reduction kernel). A wider row block re-reads A from
    L2 once per column block, so 17..64 rows keep 64 columns and take split-K to fill the SMs (and
    narrower columns only when that still leaves more than half of them idle).
    """
    N, K = hidden_size, hidden_size
    two_byte = element_size <= 2
    if rows <= 16:
        bm, bn, bk, stages = 16, 64, 256 if two_byte else 128, 4
    elif rows <= 32:
        bm, bn, bk, stages = 32, 64, 128, 4
    elif rows <= 64:
        bm, bn, bk, stages = 64, 64, 128 if two_byte else 64, 3
    else:
        bm, bn, bk, stages = 64, 128, 64, 4
    if not two_byte:
        stages = min(stages, 3)
    bk = min(bk, max(16, _next_pow2(K)))
    row_blocks = triton.cdiv(rows, bm)
    min_bn = 16 if rows <= 16 else 64
    while bn > min_bn and row_blocks * triton.cdiv(N, bn) < num_sms:
        bn //= 2
    bn = min(bn, max(16, _next_pow2(N)))
    tiles, k_tiles, split = row_blocks * triton.cdiv(N, bn), num_segments * triton.cdiv(K, bk), 1
    while split < 4 and tiles * split * 2 <= num_sms and k_tiles // (2 * split) >= 4:
        split *= 2
    while bn > 16 and tiles * split < num_sms // 2:  # small H: narrower column blocks as well
        bn //= 2
        tiles = row_blocks * triton.cdiv(N, bn)
    return GemmConfig(bm, bn, bk, group_m=8, split_k=split, num_warps=4, num_stages=stages)


_TuningTable = dict[tuple[int, int, str], list[tuple[int, Plan]]]


def _table_from_rows(rows) -> _TuningTable:
    """``{(H, segments, dtype name): [(rows, plan), ...] sorted by rows}`` from
    ``(hidden, segments, dtype, rows, plan name)`` tuples."""
    table: _TuningTable = {}
    for hidden, segments, dtype, count, plan in rows:
        key = (int(hidden), int(segments), _DTYPE_NAMES.get(dtype, str(dtype)))
        table.setdefault(key, []).append((int(count), Plan.from_name(plan)))
    return {key: sorted(entries) for key, entries in table.items()}


def _tuning_entries(path: str) -> _TuningTable:
    """The tuning table of a sweep result file (its ``best`` list)."""
    try:
        best = json.loads(Path(path).read_text())["best"]
        return _table_from_rows((e["hidden"], e["segments"], e["dtype"], e["rows"], e["plan"]) for e in best)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{TUNING_ENV}={path}: not a readable sweep result with a 'best' list ({exc})"
        ) from exc


@functools.lru_cache(maxsize=1)
def _tuning_table() -> _TuningTable:
    path = os.environ.get(TUNING_ENV, "")
    return _tuning_entries(path) if path else {}


@functools.lru_cache(maxsize=8)
def _builtin_table(capability: tuple[int, int] | None) -> _TuningTable:
    return _table_from_rows(_fdi_tuned_plans.BY_CAPABILITY.get(capability, ()))


def _tuned_plan(
    rows: int, hidden_size: int, num_segments: int, dtype: torch.dtype, capability: tuple[int, int] | None
) -> Plan | None:
    """The tuned plan for the smallest tuned row count >= rows (else the largest), if any: from the
    ``EAGLE_KERNELS_FDI_TUNING`` table, else from the plans measured for this compute capability."""
    key = (hidden_size, num_segments, _DTYPE_NAMES.get(dtype, str(dtype)))
    entries = _tuning_table().get(key) or _builtin_table(capability).get(key)
    if not entries:
        return None
    return next((plan for tuned_rows, plan in entries if tuned_rows >= rows), entries[-1][1])


@functools.lru_cache(maxsize=4096)
def _default_plan(
    rows: int,
    hidden_size: int,
    num_segments: int,
    dtype: torch.dtype,
    num_sms: int,
    capability: tuple[int, int] | None = None,
) -> Plan:
    tuned = _tuned_plan(rows, hidden_size, num_segments, dtype, capability)
    if tuned is not None:
        return tuned
    if rows >= GATHER_MM_MIN_ROWS:
        return Plan("gather_mm")
    return Plan("fused", heuristic_config(rows, hidden_size, num_segments, dtype.itemsize, num_sms))


@functools.lru_cache(maxsize=16)
def _capability_of(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device; None for other devices (the interpreter)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index))


def default_plan(
    rows: int, hidden_size: int, num_segments: int, dtype: torch.dtype, device: torch.device | None = None
) -> Plan:
    """The plan a Triton-backend call with ``rows`` tokens uses when no :func:`use_plan` is active:
    the tuning table named by ``EAGLE_KERNELS_FDI_TUNING`` when it covers ``(hidden_size,
    num_segments, dtype)``, else the plans measured for the device's compute capability
    (``eagle_kernels._fdi_tuned_plans``; none without a CUDA device), else ``gather_mm`` from
    :data:`GATHER_MM_MIN_ROWS` rows on and the fused GEMM with :func:`heuristic_config`'s tiles below.
    Cached per shape (see :func:`clear_plan_cache`)."""
    if device is None:
        return _default_plan(rows, hidden_size, num_segments, dtype, DEFAULT_NUM_SMS, None)
    return _default_plan(rows, hidden_size, num_segments, dtype, _sms_of(device), _capability_of(device))


def clear_plan_cache() -> None:
    """Forget cached plans and the tuning table (after changing ``EAGLE_KERNELS_FDI_TUNING``)."""
    _tuning_table.cache_clear()
    _builtin_table.cache_clear()
    _default_plan.cache_clear()
    _default_launch.cache_clear()
    _override_launch.cache_clear()


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M"])
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
    seg0_len,
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
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """out[M, N] = cat(seg0, seg1[, seg2])[M, NUM_SEGMENTS*K] @ W[N, NUM_SEGMENTS*K].T (+ bias).

    seg0's row m is ``seg0[ids[m]]`` when GATHER_SEG0 (the embedding table), else ``seg0[m]``.
    One K loop runs over the tiles of every segment in column order: tile t reads the A rows of
    segment t // tiles_per_segment (a select between row-pointer vectors) and W's matching columns,
    so the embedding rows and the features stream through the same software pipeline. Rows past M
    and columns past N re-read the last valid one (never stored), so with EVEN_K no load is masked.
    With SPLIT_K > 1, program (tile, s) covers the s-th run of K tiles and writes fp32 partials
    (``out_ptr`` is then a ``[SPLIT_K, M, N]`` fp32 workspace; bias and cast happen in the reduction).
    Programs are ordered in groups of GROUP_M row blocks so that neighbours share W tiles in L2.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    if GATHER_SEG0:  # (ids are range-checked only in debug mode on CUDA: a bad one reads a valid row)
        seg0_rows = tl.minimum(tl.maximum(tl.load(ids_ptr + rows).to(tl.int64), 0), seg0_len - 1)
    else:
        seg0_rows = rows
    a0 = seg0_ptr + seg0_rows * stride_s0m
    a1 = seg1_ptr + rows * stride_s1m
    a2 = seg2_ptr + rows * stride_s2m
    w_rows = w_ptr + cols * stride_wn
    offs_k = tl.arange(0, BLOCK_K)

    tiles_per_segment = tl.cdiv(K, BLOCK_K)
    num_tiles = NUM_SEGMENTS * tiles_per_segment
    tiles_per_split = tl.cdiv(num_tiles, SPLIT_K)
    t_begin = pid_k * tiles_per_split
    t_end = min(t_begin + tiles_per_split, num_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_begin, t_end):
        segment = t // tiles_per_segment
        k = (t - segment * tiles_per_segment) * BLOCK_K + offs_k  # column within the segment
        # Select between whole 2-D pointer tiles: a select of the 1-D row pointers loses the
        # contiguity along k that the pipeliner needs for async copies (checked on sm_90 TTGIR).
        a_ptrs = tl.where(
            segment == 0, a0[:, None] + k[None, :] * stride_s0k, a1[:, None] + k[None, :] * stride_s1k
        )
        if NUM_SEGMENTS == 3:
            a_ptrs = tl.where(segment == 2, a2[:, None] + k[None, :] * stride_s2k, a_ptrs)
        w_ptrs = w_rows[None, :] + (segment * K + k)[:, None] * stride_wk
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_in = k < K
            a = tl.load(a_ptrs, mask=k_in[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)

    store_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        part_ptrs = out_ptr + pid_k.to(tl.int64) * M * N + rows[:, None] * N + cols[None, :]
        tl.store(part_ptrs, acc, mask=store_mask)


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(
    part_ptr,
    out_ptr,
    bias_ptr,
    M,
    N,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[m, n] = sum_s part[s, m, n] (+ bias[n]), cast to out's dtype; always in the order s = 0, 1, ...
    (deterministic). ``part`` is the contiguous fp32 ``[SPLIT_K, M, N]`` workspace."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    numel = M.to(tl.int64) * N
    in_range = offs < numel
    acc = tl.load(part_ptr + offs, mask=in_range, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * numel + offs, mask=in_range, other=0.0)
    m = offs // N
    n = offs - m * N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=in_range, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=in_range)


@triton.jit(do_not_specialize=["M"])
def _segments_gemv_kernel(
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
    seg0_len,
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
    EVEN_K: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The same product as :func:`_fused_segments_linear_kernel` for a few rows, without tensor cores.

    Program (column block, row block) holds ``prod[ROWS, BLOCK_N, BLOCK_K]`` fp32 partial products:
    every K tile adds ``a[r, k] * w[n, k]`` elementwise (FMAs only, no cross-lane traffic inside the
    loop), and one sum over k at the end gives the outputs. Each W element is read by exactly one
    program per row block; A rows (a few KB) come from L2. Rows past M and columns past N re-read the
    last valid one and are never stored, so with EVEN_K no load is masked.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * ROWS + tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    if GATHER_SEG0:  # (ids are range-checked only in debug mode on CUDA: a bad one reads a valid row)
        seg0_rows = tl.minimum(tl.maximum(tl.load(ids_ptr + rows).to(tl.int64), 0), seg0_len - 1)
    else:
        seg0_rows = rows
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols[:, None] * stride_wn  # [BLOCK_N, 1]

    prod = tl.zeros((ROWS, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for segment in tl.static_range(NUM_SEGMENTS):
        if segment == 0:
            a_rows = seg0_ptr + seg0_rows * stride_s0m
            stride_ak = stride_s0k
        elif segment == 1:
            a_rows = seg1_ptr + rows * stride_s1m
            stride_ak = stride_s1k
        else:
            a_rows = seg2_ptr + rows * stride_s2m
            stride_ak = stride_s2k
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            a_ptrs = a_rows[:, None] + k[None, :] * stride_ak  # [ROWS, BLOCK_K]
            w_ptrs = w_rows + (segment * K + k)[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_in = k < K
                a = tl.load(a_ptrs, mask=k_in[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_in[None, :], other=0.0)
            prod += a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]

    acc = tl.sum(prod, axis=2)  # [ROWS, BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    store_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit(do_not_specialize=["M"])
def _pack_segments_kernel(
    dst_ptr,
    ids_ptr,
    seg0_ptr,
    seg1_ptr,
    seg2_ptr,
    M,
    K,
    seg0_len,
    stride_s0m,
    stride_s0k,
    stride_s1m,
    stride_s1k,
    stride_s2m,
    stride_s2k,
    GATHER_SEG0: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dst[m, :] = cat(seg0[ids[m] or m], seg1[m][, seg2[m]]) for the ``[M, NUM_SEGMENTS*K]``
    contiguous scratch; program (m, j) copies columns [j*BLOCK, (j+1)*BLOCK) of every segment."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < K
    if GATHER_SEG0:  # (ids are range-checked only in debug mode on CUDA: a bad one reads a valid row)
        src0 = tl.minimum(tl.maximum(tl.load(ids_ptr + row).to(tl.int64), 0), seg0_len - 1)
    else:
        src0 = row
    dst_row = dst_ptr + row * (NUM_SEGMENTS * K)
    x0 = tl.load(seg0_ptr + src0 * stride_s0m + offs * stride_s0k, mask=in_row)
    tl.store(dst_row + offs, x0, mask=in_row)
    x1 = tl.load(seg1_ptr + row * stride_s1m + offs * stride_s1k, mask=in_row)
    tl.store(dst_row + K + offs, x1, mask=in_row)
    if NUM_SEGMENTS == 3:
        x2 = tl.load(seg2_ptr + row * stride_s2m + offs * stride_s2k, mask=in_row)
        tl.store(dst_row + 2 * K + offs, x2, mask=in_row)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
PACK_BLOCK = 1024
REDUCE_BLOCK = 1024


def _interpreted_bf16(out: torch.Tensor) -> bool:
    """The CPU interpreter mishandles bf16 arithmetic: its ``tl.dot`` multiplies bf16 bit patterns
    (triton-lang/triton#11584) and its fp32 -> bf16 cast truncates instead of rounding to nearest.
    There the fused kernel takes fp32 operands (bf16 products are exact in fp32, as on a tensor core)
    and writes fp32, which torch rounds to bf16, so the interpreter checks the arithmetic a GPU does."""
    return out.dtype == torch.bfloat16 and out.is_cpu


class _Launch(NamedTuple):
    """One call's launch, cached per shape: the path, and for the fused GEMM its grid, effective
    split and kernel keywords (all but FP32_DOT, which follows the output buffer's dtype)."""

    path: str
    grid: tuple[int, int]
    split: int
    meta: dict


def _gemv_rows(config: GemvConfig, M: int) -> int:
    """Rows per GEMV program: the config's, or fewer (the next power of two of M) for fewer rows."""
    return min(config.block_m, _next_pow2(M))


def _make_launch(
    plan: Plan, M: int, N: int, segments: int, dtype: torch.dtype, sms: int, gather: bool, has_bias: bool
) -> _Launch:
    if plan.path == "gather_mm":
        return _Launch("gather_mm", (0, 0), 1, {})
    if plan.path == "gemv":
        config = plan.config or DEFAULT_GEMV
        rows = _gemv_rows(config, M)
        grid = (triton.cdiv(N, config.block_n), triton.cdiv(M, rows))
        meta = dict(
            GATHER_SEG0=gather,
            NUM_SEGMENTS=segments,
            HAS_BIAS=has_bias,
            EVEN_K=N % config.block_k == 0,
            ROWS=rows,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        return _Launch("gemv", grid, 1, meta)
    config = plan.config or heuristic_config(M, N, segments, dtype.itemsize, sms)
    split = max(1, min(config.split_k, segments * triton.cdiv(N, config.block_k)))  # K == N == H
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n), split)
    meta = dict(
        GATHER_SEG0=gather,
        NUM_SEGMENTS=segments,
        HAS_BIAS=has_bias,
        EVEN_K=N % config.block_k == 0,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        SPLIT_K=split,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return _Launch("fused", grid, split, meta)


@functools.lru_cache(maxsize=4096)
def _default_launch(
    M: int, N: int, segments: int, dtype: torch.dtype, device: torch.device, gather: bool, has_bias: bool
) -> _Launch:
    plan = default_plan(M, N, segments, dtype, device)
    return _make_launch(plan, M, N, segments, dtype, _sms_of(device), gather, has_bias)


_override_launch = functools.lru_cache(maxsize=1024)(_make_launch)


def _segment_strides(segments) -> tuple[tuple, tuple[int, ...]]:
    """Three segment slots (unused ones repeat the last) and their six strides."""
    seg = (*segments, segments[-1]) if len(segments) == 2 else tuple(segments)
    return seg, (*seg[0].stride(), *seg[1].stride(), *seg[2].stride())


def _segment_kernel_args(target, out, fc_weight, fc_bias, segments, token_ids) -> tuple:
    """The runtime arguments shared by the fused GEMM and the GEMV kernel, in their order: the
    destination, bias, W, ids (unused slots point at ``out``), the three segments, M, N, K, the first
    segment's rows (ids are clamped to them) and the strides (every segment is H wide, as the output:
    K == N)."""
    M, N = out.shape
    seg, seg_strides = _segment_strides(segments)
    bias = fc_bias if fc_bias is not None else out
    ids = token_ids if token_ids is not None else out
    return (
        target,
        bias,
        fc_weight,
        ids,
        *seg,
        M,
        N,
        N,
        seg[0].shape[0],  # rows of the first segment (the embedding table when gathering)
        *seg_strides,
        *fc_weight.stride(),
        *out.stride(),
    )


def _fp32_output_when_interpreted(run):
    """Under the CPU interpreter a bf16 output is computed in fp32 and rounded by torch (see
    :func:`_interpreted_bf16`)."""

    @functools.wraps(run)
    def wrapper(out, *args) -> None:
        if not _interpreted_bf16(out):
            return run(out, *args)
        out32 = out.float()
        run(out32, *args)
        out.copy_(out32)

    return wrapper


@_fp32_output_when_interpreted
def _run_fused_gemm(out, fc_weight, fc_bias, segments, token_ids, launch: _Launch) -> None:
    """The fused Triton GEMM into ``out`` ``[M, N]`` (split-K: via an fp32 workspace + reduction)."""
    M, N = out.shape
    split = launch.split
    target = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=out.device)
    args = _segment_kernel_args(target, out, fc_weight, fc_bias, segments, token_ids)
    _fused_segments_linear_kernel[launch.grid](*args, FP32_DOT=out.dtype == torch.float32, **launch.meta)
    if split > 1:
        _splitk_reduce_kernel[(triton.cdiv(M * N, REDUCE_BLOCK),)](
            target,
            out,
            fc_bias if fc_bias is not None else out,
            M,
            N,
            *out.stride(),
            HAS_BIAS=fc_bias is not None,
            SPLIT_K=split,
            BLOCK=REDUCE_BLOCK,
        )


@_fp32_output_when_interpreted
def _run_gemv(out, fc_weight, fc_bias, segments, token_ids, launch: _Launch) -> None:
    """The few-rows Triton GEMV into ``out`` ``[M, N]``."""
    args = _segment_kernel_args(out, out, fc_weight, fc_bias, segments, token_ids)
    _segments_gemv_kernel[launch.grid](*args, **launch.meta)


def _run_gather_mm(out, fc_weight, fc_bias, segments, token_ids) -> None:
    """Pack the segments into an internal ``[M, S*K]`` scratch (one Triton copy kernel), then one
    ``addmm`` -- the call ``F.linear`` makes on the concatenation, hence the same result."""
    M = out.shape[0]
    K = segments[1].shape[1]
    scratch = torch.empty((M, len(segments) * K), dtype=out.dtype, device=out.device)
    seg, seg_strides = _segment_strides(segments)
    _pack_segments_kernel[(M, triton.cdiv(K, PACK_BLOCK))](
        scratch,
        token_ids if token_ids is not None else scratch,
        *seg,
        M,
        K,
        seg[0].shape[0],
        *seg_strides,
        GATHER_SEG0=token_ids is not None,
        NUM_SEGMENTS=len(segments),
        BLOCK=PACK_BLOCK,
    )
    if fc_bias is None:
        torch.mm(scratch, fc_weight.t(), out=out)
    else:
        torch.addmm(fc_bias, scratch, fc_weight.t(), out=out)


def _launch_segments_linear(out, fc_weight, fc_bias, segments, token_ids=None):
    """Run the Triton backend into ``out`` ``[M, N]``: ``segments`` are the A blocks in column
    order; with ``token_ids`` the first one is an embedding table indexed by them. The plan comes
    from :func:`use_plan` when active, else :func:`default_plan`."""
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    # the kernels read the ids and the bias as contiguous vectors (no-ops for contiguous inputs)
    token_ids = token_ids.contiguous() if token_ids is not None else None
    fc_bias = fc_bias.contiguous() if fc_bias is not None else None
    plan = _PLAN_OVERRIDE.get()
    gather, has_bias = token_ids is not None, fc_bias is not None
    if plan is None:
        launch = _default_launch(M, N, len(segments), out.dtype, out.device, gather, has_bias)
    else:
        sms = _sms_of(out.device)
        launch = _override_launch(plan, M, N, len(segments), out.dtype, sms, gather, has_bias)
    if launch.path == "gather_mm":
        _run_gather_mm(out, fc_weight, fc_bias, segments, token_ids)
    elif launch.path == "gemv":
        _run_gemv(out, fc_weight, fc_bias, segments, token_ids, launch)
    else:
        _run_fused_gemm(out, fc_weight, fc_bias, segments, token_ids, launch)
    return out


@launches_on_input_device
def _fused_draft_input_triton(hidden, token_ids, embed_weight, fc_weight, fc_bias, out):
    return _launch_segments_linear(out, fc_weight, fc_bias, (embed_weight, hidden), token_ids)


@launches_on_input_device
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
    """The op's body (and the eager fast path's). Reading the ids costs a host sync on CUDA, so there
    they are checked only in debug mode; the C++ op checks them itself (same message)."""
    if backend != "cpp" and (hidden.is_cpu or debug_checks_enabled()):
        _check_token_ids_in_range(token_ids, embed_weight.shape[0])
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


def _op_output_shape(rows: torch.Tensor, fc_weight: torch.Tensor) -> tuple[int, int]:
    """``(N, H_out)``: the registered ops and their fakes take 2-D rows only (the public functions
    flatten ``[B, T, H]``), so tracing refuses what the real op would."""
    if rows.dim() != 2:
        raise ValueError(f"the registered op takes [N, H] feature rows, got shape {tuple(rows.shape)}")
    return rows.shape[0], fc_weight.shape[0]


def _check_op_out(out: torch.Tensor, rows: torch.Tensor, fc_weight: torch.Tensor) -> None:
    """The ``out`` of a registered ``*_out`` op: the result's ``[N, H_out]`` shape, dtype and device."""
    shape = _op_output_shape(rows, fc_weight)
    check_tensor("out", out, dtypes=(rows.dtype,), device=rows.device, shape=shape)


def _new_output(rows: torch.Tensor, fc_weight: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(_op_output_shape(rows, fc_weight))


@torch.library.custom_op("eagle::fused_draft_input", mutates_args=())
def _fused_draft_input_op(
    hidden: torch.Tensor,
    token_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
) -> torch.Tensor:
    out = _new_output(hidden, fc_weight)
    _CHECKED.run(_check_draft_args, hidden, token_ids, embed_weight, fc_weight, fc_bias)  # (a cache hit
    # after the public function's check; a direct torch.ops call is checked here)
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
    _CHECKED.run(_check_draft_args, hidden, token_ids, embed_weight, fc_weight, fc_bias)
    _check_op_out(out, hidden, fc_weight)
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
    _CHECKED.run(_check_eagle3_args, h_low, h_mid, h_high, fc_weight, fc_bias)
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
    _CHECKED.run(_check_eagle3_args, h_low, h_mid, h_high, fc_weight, fc_bias)
    _check_op_out(out, h_low, fc_weight)
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


# Shape/dtype/device checks look only at the call signature: a signature that passed skips them.
_CHECKED = SignatureCache()


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


def _check_eagle3_args(h_low, h_mid, h_high, fc_weight, fc_bias) -> None:
    _check_features("h_low", h_low)
    _check_features("h_mid", h_mid, like=h_low)
    _check_features("h_high", h_high, like=h_low)
    H = h_low.shape[-1]
    _check_projection(fc_weight, fc_bias, H, 3, h_low.device, h_low=h_low, h_mid=h_mid, h_high=h_high)


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
    check_out_buffer(out, inputs)
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

    The gathered embedding rows and the concat are never materialised in memory the caller sees; on
    CUDA decode-sized N runs one Triton GEMM whose K loop reads embedding rows by token id, then the
    features, and large N packs them into an internal scratch for one cuBLAS GEMM (see the module
    docstring and :func:`default_plan`). fp32 accumulation.

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
    _CHECKED.run(_check_draft_args, hidden, token_ids, embed_weight, fc_weight, fc_bias)
    # Traced (torch.compile) the op picks its backend when the graph runs, and reads the ids then (in
    # its body, :func:`_run_draft_input`), not here (a graph break each).
    backend = None if torch.compiler.is_compiling() else _backend_for(OP, hidden)
    if hidden.dim() == 2:  # the common case skips two reshapes and a view (~4 us of host time)
        args = (hidden, token_ids, embed_weight, fc_weight, fc_bias)
    else:
        args = (hidden.reshape(-1, hidden.shape[-1]), token_ids.reshape(-1), embed_weight, fc_weight, fc_bias)
    fast = eager_fast_path(*args, out)
    if out is None:
        if fast:
            out2d = _new_output(args[0], fc_weight)
            _run_draft_input(backend, *args, out2d)
        else:
            out2d = torch.ops.eagle.fused_draft_input(*args)
        return out2d if hidden.dim() == 2 else out2d.view(hidden.shape)
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
    _CHECKED.run(_check_eagle3_args, h_low, h_mid, h_high, fc_weight, fc_bias)
    backend = None if torch.compiler.is_compiling() else _backend_for(OP_EAGLE3, h_low)  # (see above)
    if h_low.dim() == 2:
        args = (h_low, h_mid, h_high, fc_weight, fc_bias)
    else:
        H = h_low.shape[-1]
        args = (h_low.reshape(-1, H), h_mid.reshape(-1, H), h_high.reshape(-1, H), fc_weight, fc_bias)
    fast = eager_fast_path(*args, out)
    if out is None:
        if fast:
            out2d = _new_output(args[0], fc_weight)
            _run_eagle3_input(backend, *args, out2d)
        else:
            out2d = torch.ops.eagle.fused_eagle3_input(*args)
        return out2d if h_low.dim() == 2 else out2d.view(h_low.shape)
    inputs = dict(h_low=h_low, h_mid=h_mid, h_high=h_high, fc_weight=fc_weight, fc_bias=fc_bias)
    out2d = _check_out(out, tuple(h_low.shape), h_low, inputs)
    if fast:
        _run_eagle3_input(backend, *args, out2d)
    else:
        torch.ops.eagle.fused_eagle3_input_out(*args, out2d)
    return out
