from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eagle_kernels
from eagle_kernels import fused_draft_input, fused_draft_input_ref, fused_eagle3_input, fused_eagle3_input_ref
from tests.kernels.helpers import FP32_RTOL, assert_close_lowp, backends_for, run_with_backend

OP, OP3 = "fused_draft_input", "fused_eagle3_input"
CPU = torch.device("cpu")
LOWP = (torch.float16, torch.bfloat16)


def draft_oracle(hidden, token_ids, embed, fc_weight, fc_bias):
    """float64, row by row, with the two weight halves applied separately (no concat anywhere)."""
    H = hidden.shape[-1]
    w_emb, w_feat = fc_weight.double()[:, :H], fc_weight.double()[:, H:]
    rows = []
    for t, h in zip(token_ids.reshape(-1).tolist(), hidden.reshape(-1, H).double()):
        row = w_emb @ embed.double()[t] + w_feat @ h
        rows.append(row if fc_bias is None else row + fc_bias.double())
    return torch.stack(rows).reshape(hidden.shape) if rows else hidden.double().new_empty(hidden.shape)


def eagle3_oracle(h_low, h_mid, h_high, fc_weight, fc_bias):
    H = h_low.shape[-1]
    w = fc_weight.double()
    out = sum(x.double() @ w[:, i * H : (i + 1) * H].T for i, x in enumerate((h_low, h_mid, h_high)))
    return out if fc_bias is None else out + fc_bias.double()


def make_draft_case(shape, H, V, dtype, id_dtype, bias, device=CPU, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, V, shape, generator=gen, dtype=id_dtype)
    embed = torch.randn(V, H, generator=gen, dtype=torch.float64)
    fc_weight = torch.randn(H, 2 * H, generator=gen, dtype=torch.float64) / (2 * H) ** 0.5
    fc_bias = torch.randn(H, generator=gen, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), ids.to(device), cast(embed), cast(fc_weight), cast(fc_bias)


def make_eagle3_case(shape, H, dtype, bias, device=CPU, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hs = [torch.randn(*shape, H, generator=gen, dtype=torch.float64) * s for s in (1.0, 2.0, 4.0)]
    fc_weight = torch.randn(H, 3 * H, generator=gen, dtype=torch.float64) / (3 * H) ** 0.5
    fc_bias = torch.randn(H, generator=gen, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return (*[cast(h) for h in hs], cast(fc_weight), cast(fc_bias))


def as64(args):
    return [a.double() if a is not None and a.is_floating_point() else a for a in args]


def assert_matches(out, ref_fn, args, dtype):
    """DESIGN §6: fp32 within 1e-5 relative (to the output's scale); fp16/bf16 within 2x the error
    that the reference computed in the same low precision makes against float64."""
    ref64 = ref_fn(*as64(args))
    assert out.dtype == dtype and out.shape == ref64.shape
    if dtype in LOWP:
        assert_close_lowp(out, ref64, ref_fn(*args))
    else:
        rtol = FP32_RTOL if dtype == torch.float32 else 1e-12
        scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
        torch.testing.assert_close(out.double(), ref64, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------------------------------
# The reference against independent oracles
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_draft_reference_matches_oracle(shape, bias):
    args = make_draft_case(shape, 24, 50, torch.float64, torch.int64, bias, seed=len(shape))
    torch.testing.assert_close(fused_draft_input_ref(*args), draft_oracle(*args), rtol=1e-12, atol=1e-12)


def test_draft_order_is_embedding_first():
    """Swapping the halves would give a different answer: the oracle pins EAGLE-1/2's order."""
    hidden, ids, embed, w, b = make_draft_case((4,), 16, 20, torch.float64, torch.int64, True)
    swapped = torch.cat([w[:, 16:], w[:, :16]], dim=1)
    assert not torch.allclose(
        fused_draft_input_ref(hidden, ids, embed, swapped, b), draft_oracle(hidden, ids, embed, w, b)
    )


@pytest.mark.parametrize("bias", [True, False])
def test_eagle3_reference_matches_oracle(bias):
    args = make_eagle3_case((2, 3), 24, torch.float64, bias)
    torch.testing.assert_close(fused_eagle3_input_ref(*args), eagle3_oracle(*args), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Every backend against the reference
# --------------------------------------------------------------------------------------------------
ALL_BACKENDS = ["torch"] + backends_for(OP, CPU)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H", [(1, 16), (7, 48), (33, 16), (33, 48)])
def test_draft_backends_match_reference(backend, dtype, N, H):
    for seed, (id_dtype, bias) in enumerate([(torch.int32, True), (torch.int64, False)]):
        args = make_draft_case((N,), H, 50, dtype, id_dtype, bias, seed=seed + N)
        out = run_with_backend(backend, fused_draft_input, *args)
        assert_matches(out, fused_draft_input_ref, args, dtype)


NEEDS_AVX512 = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512", reason="the skinny kernel needs AVX-512"
)
CPP_PATHS = [  # (EAGLE_KERNELS_CPU_ISA, EAGLE_KERNELS_CPU_BF16DOT)
    pytest.param(("generic", "1"), id="blas"),
    pytest.param(("avx512", "1"), id="skinny", marks=NEEDS_AVX512),
    pytest.param(("avx512", "0"), id="skinny-widen-bf16", marks=NEEDS_AVX512),
    pytest.param(("auto", "1"), id="auto"),
]


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="C++ extension without fused_draft_input")
@pytest.mark.parametrize("isa", CPP_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_gemm_paths(monkeypatch, isa, dtype):
    """Both C++ GEMMs (AVX-512 skinny tiles of 1-4 rows, 8/4 features, a masked K tail, bf16 dot
    products or widening; oneDNN addmm), and the row-count crossovers between them."""
    if dtype != torch.bfloat16 and isa[1] == "0":
        pytest.skip("EAGLE_KERNELS_CPU_BF16DOT only changes the bf16 path")
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", isa[0])
    monkeypatch.setenv("EAGLE_KERNELS_CPU_BF16DOT", isa[1])
    for seed, (N, H) in enumerate([(1, 19), (3, 40), (5, 16), (33, 21), (70, 24)]):
        args = make_draft_case((N,), H, 50, dtype, torch.int32, seed % 2 == 0, seed=seed)
        assert_matches(run_with_backend("cpp", fused_draft_input, *args), fused_draft_input_ref, args, dtype)
        args3 = make_eagle3_case((N,), H, dtype, seed % 2 == 1, seed=seed)
        assert_matches(
            run_with_backend("cpp", fused_eagle3_input, *args3), fused_eagle3_input_ref, args3, dtype
        )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draft_3d_inputs(backend, dtype):
    args = make_draft_case((3, 5), 48, 37, dtype, torch.int64, True, seed=11)
    out = run_with_backend(backend, fused_draft_input, *args)
    assert out.shape == (3, 5, 48)
    assert_matches(out, fused_draft_input_ref, args, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_draft_odd_sizes_and_strided_inputs(backend):
    """Odd H, a feature tensor that is a strided view, a non-contiguous embedding table."""
    H, V = 19, 41
    hidden, ids, embed, w, b = make_draft_case((9,), H, V, torch.float32, torch.int32, True, seed=5)
    hidden_view = torch.randn(9, 2 * H + 3)[:, 1 : 1 + 2 * H : 2]
    hidden_view.copy_(hidden)
    embed_t = embed.t().contiguous().t()  # column-major [V, H]
    out = run_with_backend(backend, fused_draft_input, hidden_view, ids, embed_t, w, b)
    assert_matches(out, fused_draft_input_ref, (hidden, ids, embed, w, b), torch.float32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_token_ids_and_bias_are_read_as_their_values(backend):
    """Token ids as a column of a [N, 2] block (``tokens[:, -1]``) and a bias with stride 2 passed the
    checks, and the Triton kernels read both as contiguous: other embedding rows, another bias."""
    hidden, ids, embed, w, b = make_draft_case((5,), 16, 30, torch.float32, torch.int64, True, seed=8)
    ids_view = torch.stack([ids, torch.zeros_like(ids)], 1)[:, 0]
    bias_view = torch.stack([b, torch.full_like(b, 100.0)], 1)[:, 0]
    assert ids_view.stride(0) == 2 and bias_view.stride(0) == 2
    out = run_with_backend(backend, fused_draft_input, hidden, ids_view, embed, w, bias_view)
    assert_matches(out, fused_draft_input_ref, (hidden, ids, embed, w, b), torch.float32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_draft_empty_batch(backend):
    args = make_draft_case((0,), 16, 10, torch.float32, torch.int64, True)
    out = run_with_backend(backend, fused_draft_input, *args)
    assert out.shape == (0, 16)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,H,bias", [((1,), 16, False), ((7,), 48, True), ((2, 17), 16, True)])
def test_eagle3_backends_match_reference(backend, dtype, shape, H, bias):
    args = make_eagle3_case(shape, H, dtype, bias, seed=H)
    out = run_with_backend(backend, fused_eagle3_input, *args)
    assert_matches(out, fused_eagle3_input_ref, args, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_argument_is_written_in_place(backend):
    args = make_draft_case((2, 3), 16, 30, torch.float32, torch.int64, True, seed=2)
    out = torch.full((2, 3, 16), float("nan"))
    got = run_with_backend(backend, fused_draft_input, *args, out=out)
    assert got is out
    assert_matches(out, fused_draft_input_ref, args, torch.float32)
    args3 = make_eagle3_case((5,), 16, torch.float32, False, seed=3)
    out3 = torch.full((5, 16), float("nan"))
    assert run_with_backend(backend, fused_eagle3_input, *args3, out=out3) is out3
    assert_matches(out3, fused_eagle3_input_ref, args3, torch.float32)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton"])
def test_float64_on_cpu_paths(backend):
    args = make_draft_case((6,), 16, 30, torch.float64, torch.int64, True, seed=4)
    assert_matches(
        run_with_backend(backend, fused_draft_input, *args), fused_draft_input_ref, args, torch.float64
    )


# --------------------------------------------------------------------------------------------------
# Triton-backend plans: both paths, tile configurations, split-K, the heuristic, tuning tables
# --------------------------------------------------------------------------------------------------
fdi = importlib.import_module("eagle_kernels.fused_draft_input")
NEEDS_TRITON = pytest.mark.skipif(
    "triton" not in ALL_BACKENDS, reason="triton unavailable on CPU tensors here"
)
PLANS = [
    "gather_mm",
    "fused:bm16_bn16_bk16_gm8_sk1_w4_st2",  # H=32: even K, no masked load; M < BLOCK_M: clamped rows
    "fused:bm16_bn16_bk16_gm8_sk3_w4_st2",  # split-K with an uneven split (and an empty one at H=32)
    "fused:bm16_bn32_bk32_gm2_sk1_w4_st2",  # H=48: masked K tail; 3 row blocks swizzled in groups of 2
    "fused:bm32_bn16_bk64_gm1_sk2_w4_st2",  # block_k > H: one masked tile per segment, split over them
    "gemv:bm1_bn16_bk16_w4_st1",  # one row per program; H=48: 3 column blocks, even K
    "gemv:bm4_bn8_bk32_w2_st1",  # 4-row blocks (last one partial), masked K tail at H=48
    "gemv:bm8_bn32_bk16_w4_st1",  # column block wider than H=32 (clamped columns, never stored)
]
PLAN_CASES = [  # (op, rows, H, bias, id dtype)
    ("draft", 5, 32, True, torch.int32),
    ("draft", 37, 48, False, torch.int64),
    ("eagle3", 19, 32, True, None),
]


@pytest.fixture
def plan_cache():
    """Plans are cached per shape; start and end every test that touches them with a clean cache."""
    fdi.clear_plan_cache()
    yield
    fdi.clear_plan_cache()


def _plan_case(op, rows, H, bias, id_dtype, dtype, seed=0):
    if op == "draft":
        args = make_draft_case((rows,), H, 41, dtype, id_dtype, bias, seed=seed)
        return fused_draft_input, fused_draft_input_ref, args
    return fused_eagle3_input, fused_eagle3_input_ref, make_eagle3_case((rows,), H, dtype, bias, seed=seed)


@NEEDS_TRITON
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: f"{c[0]}-N{c[1]}-H{c[2]}")
def test_triton_plans_match_reference(plan, dtype, case):
    fn, ref_fn, args = _plan_case(*case, dtype, seed=len(plan))
    with fdi.use_plan(plan):
        out = run_with_backend("triton", fn, *args)
    assert_matches(out, ref_fn, args, dtype)


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["draft", "eagle3"])
def test_gather_mm_is_the_unfused_gemm_bit_for_bit(dtype, op):
    """gather_mm packs the segments and makes the very GEMM call F.linear makes on the concat."""
    fn, ref_fn, args = _plan_case(op, 9, 32, op == "draft", torch.int64, dtype, seed=3)
    with fdi.use_plan("gather_mm"):
        out = run_with_backend("triton", fn, *args)
    assert torch.equal(out, ref_fn(*args))


@NEEDS_TRITON
def test_default_plans_route_to_their_path(monkeypatch, plan_cache):
    """Below GATHER_MM_MIN_ROWS the fused GEMM runs, from it on gather_mm; use_plan overrides both,
    and leaving the block restores the default."""
    calls = []
    for name in ("_run_fused_gemm", "_run_gather_mm", "_run_gemv"):
        real = getattr(fdi, name)
        monkeypatch.setattr(fdi, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    few = make_draft_case((3,), 16, 20, torch.float32, torch.int64, True, seed=1)
    many = make_draft_case((fdi.GATHER_MM_MIN_ROWS,), 16, 20, torch.float32, torch.int64, True, seed=2)
    for args, path in ((few, "_run_fused_gemm"), (many, "_run_gather_mm")):
        calls.clear()
        assert_matches(
            run_with_backend("triton", fused_draft_input, *args), fused_draft_input_ref, args, torch.float32
        )
        assert calls == [path]
    calls.clear()
    with fdi.use_plan(fdi.Plan("gather_mm")):
        run_with_backend("triton", fused_draft_input, *few)
    with fdi.use_plan(fdi.GemmConfig(16, 16, 16)):
        run_with_backend("triton", fused_draft_input, *many)
    with fdi.use_plan(fdi.GemvConfig(2, 8, 16)):
        out = run_with_backend("triton", fused_draft_input, *few)
    assert_matches(out, fused_draft_input_ref, few, torch.float32)
    with fdi.use_plan("gemv"):
        run_with_backend("triton", fused_draft_input, *few)
    run_with_backend("triton", fused_draft_input, *few)
    assert calls == ["_run_gather_mm", "_run_fused_gemm", "_run_gemv", "_run_gemv", "_run_fused_gemm"]


@NEEDS_TRITON
def test_gemv_launch_grid_covers_rows_and_columns():
    """A GEMV program covers min(block_m, next power of two of M) rows: a 1-row call launches one
    row block of one row, not eight; columns are split in block_n blocks."""
    plan = fdi.Plan("gemv", fdi.GemvConfig(8, 16, 64))
    for M, rows, row_blocks in ((1, 1, 1), (3, 4, 1), (8, 8, 1), (9, 8, 2), (40, 8, 5)):
        launch = fdi._make_launch(plan, M, 100, 2, torch.bfloat16, 132, True, True)
        assert launch.path == "gemv" and launch.meta["ROWS"] == rows
        assert launch.grid == (7, row_blocks) and launch.meta["EVEN_K"] is False


@pytest.mark.parametrize("H", [1024, 2048, 4096, 5120, 8192])
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 33, 64, 65, 255])
@pytest.mark.parametrize("segments", [2, 3])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_heuristic_config_properties(H, rows, segments, itemsize):
    """Decode tiles: the rows fit one block up to 64 (W is streamed once), the K tile divides H (no
    masked load), the grid has programs for at least half the SMs of an H100, split-K only where
    the tiles alone are few."""
    cfg = fdi.heuristic_config(rows, H, segments, itemsize, fdi.DEFAULT_NUM_SMS)
    assert cfg == fdi.GemmConfig.from_name(cfg.name)
    tiles = -(-rows // cfg.block_m) * -(-H // cfg.block_n)
    if rows <= 64:
        assert cfg.block_m >= rows and cfg.block_m <= max(16, 2 * rows)
    assert H % cfg.block_k == 0 and H % cfg.block_n == 0
    assert tiles * cfg.split_k >= fdi.DEFAULT_NUM_SMS // 2 and cfg.split_k <= 4
    assert cfg.split_k == 1 or tiles * cfg.split_k <= fdi.DEFAULT_NUM_SMS
    assert itemsize == 2 or cfg.num_stages <= 3
    assert fdi.default_plan(rows, H, segments, torch.bfloat16).config is not None
    assert fdi.default_plan(fdi.GATHER_MM_MIN_ROWS, H, segments, torch.bfloat16) == fdi.Plan("gather_mm")


def test_plan_and_config_names_round_trip():
    cfg = fdi.GemmConfig(16, 32, 256, group_m=4, split_k=2, num_warps=8, num_stages=5)
    assert cfg.name == "bm16_bn32_bk256_gm4_sk2_w8_st5" and fdi.GemmConfig.from_name(cfg.name) == cfg
    gemv = fdi.GemvConfig(2, 16, 256, num_warps=8, num_stages=1)
    assert gemv.name == "bm2_bn16_bk256_w8_st1" and fdi.GemvConfig.from_name(gemv.name) == gemv
    plans = (fdi.Plan("gather_mm"), fdi.Plan("fused"), fdi.Plan("fused", cfg), fdi.Plan("gemv"))
    for plan in (*plans, fdi.Plan("gemv", gemv)):
        assert fdi.Plan.from_name(plan.name) == plan


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: fdi.GemmConfig(8, 16, 16), "block_m must be a power of two in"),
        (lambda: fdi.GemmConfig(16, 48, 16), "block_n must be a power of two in"),
        (lambda: fdi.GemmConfig(16, 16, 1024), "block_k must be a power of two in"),
        (lambda: fdi.GemmConfig(16, 16, 16, split_k=0), "group_m and split_k must be >= 1"),
        (lambda: fdi.GemmConfig(16, 16, 16, num_warps=3), "num_warps must be"),
        (lambda: fdi.GemmConfig(16, 16, 16, num_stages=0), "num_stages must be in"),
        (lambda: fdi.GemmConfig.from_name("bm16_bn16"), "not a GemmConfig name"),
        (lambda: fdi.Plan("cublas"), "Plan.path must be one of"),
        (lambda: fdi.Plan("gather_mm", fdi.GemmConfig(16, 16, 16)), "None for 'gather_mm'"),
        (lambda: fdi.Plan("fused", fdi.GemvConfig(1, 16, 16)), "GemmConfig for the 'fused' path"),
        (lambda: fdi.Plan("gemv", fdi.GemmConfig(16, 16, 16)), "GemvConfig for 'gemv'"),
        (lambda: fdi.GemvConfig(3, 16, 16), "block_m must be a power of two in"),
        (lambda: fdi.GemvConfig(16, 16, 16), "block_m must be a power of two in"),
        (lambda: fdi.GemvConfig(1, 24, 16), "block_n must be a power of two in"),
        (lambda: fdi.GemvConfig(1, 16, 8192), "block_k must be a power of two in"),
        (lambda: fdi.GemvConfig(8, 32, 64), "exceeds GEMV_MAX_TILE"),
        (lambda: fdi.GemvConfig(1, 16, 16, num_warps=6), "num_warps must be"),
        (lambda: fdi.GemvConfig(1, 16, 16, num_stages=9), "num_stages must be in"),
        (lambda: fdi.GemvConfig.from_name("bm1_bn16_bk16_gm8_sk1_w4_st3"), "not a GemvConfig name"),
    ],
)
def test_bad_plans_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_use_plan_rejects_other_types():
    with pytest.raises(
        TypeError, match="use_plan takes a Plan, a GemmConfig, a GemvConfig, a plan name or None"
    ):
        with fdi.use_plan(3):
            pass


def _write_table(path: Path, best: list[dict]) -> str:
    path.write_text(json.dumps({"best": best}))
    return str(path)


def test_tuning_table_sets_default_plans(tmp_path, monkeypatch, plan_cache):
    """EAGLE_KERNELS_FDI_TUNING: per (H, segments, dtype) the plan of the smallest tuned row count
    >= rows (else the largest) replaces the built-in choice; other shapes keep it."""
    tuned_small = "fused:bm16_bn64_bk128_gm8_sk4_w4_st4"
    best = [
        {"hidden": 4096, "segments": 2, "dtype": "bf16", "rows": 16, "plan": tuned_small},
        {"hidden": 4096, "segments": 2, "dtype": "bf16", "rows": 512, "plan": "gather_mm"},
        {"hidden": 4096, "segments": 2, "dtype": "bfloat16", "rows": 64, "plan": "fused"},
    ]
    monkeypatch.setenv(fdi.TUNING_ENV, _write_table(tmp_path / "sweep.json", best))
    fdi.clear_plan_cache()
    plan = lambda rows, H=4096, seg=2, dtype=torch.bfloat16: fdi.default_plan(rows, H, seg, dtype).name  # noqa: E731
    assert plan(1) == plan(16) == tuned_small
    assert plan(17) == plan(64) == "fused"
    assert plan(65) == plan(10_000) == "gather_mm"
    builtin = fdi.heuristic_config(1, 4096, 3, 2, fdi.DEFAULT_NUM_SMS).name
    assert plan(1, seg=3) == f"fused:{builtin}" and plan(1, dtype=torch.float16).startswith("fused:bm16")


def test_builtin_plans_per_capability(tmp_path, monkeypatch, plan_cache):
    """On sm_90 the plans measured there replace the heuristic for the shapes they list (the smallest
    listed row count >= rows, else the largest); other shapes, other GPUs and CPU keep the heuristic;
    an EAGLE_KERNELS_FDI_TUNING table wins where it lists the shape."""
    from eagle_kernels import _fdi_tuned_plans

    sm90, sms = (9, 0), fdi.DEFAULT_NUM_SMS
    plan = lambda rows, H=4096, seg=2, cap=sm90: (
        fdi._default_plan(rows, H, seg, torch.bfloat16, sms, cap).name
    )  # noqa: E731
    listed = {(h, s, r): p for h, s, d, r, p in _fdi_tuned_plans.SM90 if d == "bf16"}
    assert plan(1) == listed[(4096, 2, 1)] != fdi.Plan("fused", fdi.heuristic_config(1, 4096, 2, 2, sms)).name
    assert plan(2) == plan(16) == listed[(4096, 2, 16)]
    assert plan(17) == plan(64) == "gather_mm" and plan(10**5) == listed[(4096, 2, 4096)]
    assert plan(1, H=8192) == listed[(8192, 2, 1)] and plan(1, seg=3) == listed[(4096, 3, 1)]
    heuristic = fdi.Plan("fused", fdi.heuristic_config(1, 2048, 2, 2, sms)).name
    assert plan(1, H=2048) == plan(1, H=2048, cap=(8, 0)) == heuristic  # not listed / another GPU
    assert fdi._default_plan(1, 4096, 2, torch.bfloat16, sms, (8, 0)).config == fdi.heuristic_config(
        1, 4096, 2, 2, sms
    )
    assert fdi.default_plan(1, 4096, 2, torch.bfloat16) == fdi._default_plan(
        1, 4096, 2, torch.bfloat16, sms, None
    )
    every = {p for *_, p in _fdi_tuned_plans.SM90}
    assert all(fdi.Plan.from_name(p).name == p for p in every)  # every listed name parses back
    best = [{"hidden": 4096, "segments": 2, "dtype": "bf16", "rows": 16, "plan": "gather_mm"}]
    monkeypatch.setenv(fdi.TUNING_ENV, _write_table(tmp_path / "sweep.json", best))
    fdi.clear_plan_cache()
    assert plan(1) == "gather_mm" and plan(1, seg=3) == listed[(4096, 3, 1)]


@pytest.mark.parametrize("content", ["not json", '{"shapes": []}', '{"best": [{"hidden": 64}]}'])
def test_bad_tuning_table_raises(tmp_path, monkeypatch, plan_cache, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    monkeypatch.setenv(fdi.TUNING_ENV, str(path))
    fdi.clear_plan_cache()
    with pytest.raises(ValueError, match=f"{fdi.TUNING_ENV}=.*bad.json: not a readable sweep result"):
        fdi.default_plan(1, 64, 2, torch.float32)


@NEEDS_TRITON
def test_sweep_dry_run_feeds_the_tuning_table(tmp_path, monkeypatch, plan_cache):
    """bench/sweep_fused_draft_input.py --dry-run (interpreter): every candidate runs and passes the
    reference check, and its result file works as EAGLE_KERNELS_FDI_TUNING."""
    sweep = importlib.import_module("bench.sweep_fused_draft_input")
    out = tmp_path / "sweep.json"
    assert sweep.main(["--dry-run", "--hidden", "32", "--rows", "3", "300", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    statuses = {name: r["status"] for shape in result["shapes"] for name, r in shape["results"].items()}
    assert len(statuses) >= 10 and set(statuses.values()) == {"ok"}, statuses
    assert {(e["rows"], e["hidden"]) for e in result["best"]} == {(3, 32), (300, 32)}
    monkeypatch.setenv(fdi.TUNING_ENV, str(out))
    fdi.clear_plan_cache()
    for entry in result["best"]:
        assert fdi.default_plan(entry["rows"], 32, 2, torch.bfloat16).name == entry["plan"]


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _draft_kwargs():
    hidden, ids, embed, w, b = make_draft_case((4,), 16, 30, torch.float32, torch.int64, True, seed=9)
    return dict(hidden=hidden, token_ids=ids, embed_weight=embed, fc_weight=w, fc_bias=b)


DRAFT_BAD = [
    (lambda a: a.update(hidden=a["hidden"][0]), ValueError, r"hidden must be \[N, H\] or \[B, T, H\]"),
    (lambda a: a.update(hidden=a["hidden"][None, None]), ValueError, r"hidden must be \[N, H\]"),
    (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden must have dtype"),
    (lambda a: a.update(token_ids=a["token_ids"][:3]), ValueError, "token_ids must have shape"),
    (lambda a: a.update(token_ids=a["token_ids"].float()), TypeError, "token_ids must have dtype"),
    (lambda a: a.update(embed_weight=a["embed_weight"][:, :8]), ValueError, r"embed_weight must be \[V, H\]"),
    (lambda a: a.update(embed_weight=a["embed_weight"][:0]), ValueError, "empty vocabulary"),
    (lambda a: a.update(fc_weight=a["fc_weight"][:, :16]), ValueError, r"fc_weight must be \[H, 2H\]"),
    (lambda a: a.update(fc_weight=a["fc_weight"].t()), ValueError, r"fc_weight must be \[H, 2H\]"),
    (lambda a: a.update(fc_bias=a["fc_bias"][:8]), ValueError, "fc_bias must have shape"),
    (lambda a: a.update(embed_weight=a["embed_weight"].half()), TypeError, "dtypes must match"),
    (lambda a: a.update(fc_bias=a["fc_bias"].double()), TypeError, "dtypes must match"),
    (lambda a: a.update(embed_weight=a["embed_weight"].to("meta")), ValueError, "embed_weight is on meta"),
    (lambda a: a.update(fc_weight=a["fc_weight"].to("meta")), ValueError, "fc_weight is on meta"),
    (lambda a: a["token_ids"].__setitem__(2, 30), ValueError, r"token_ids must be in \[0, 30\)"),
    (lambda a: a["token_ids"].__setitem__(0, -1), ValueError, r"token_ids must be in \[0, 30\)"),
]


@pytest.mark.parametrize("mutate,exc,match", DRAFT_BAD)
def test_draft_bad_input_raises(mutate, exc, match):
    kwargs = _draft_kwargs()
    mutate(kwargs)
    for backend in ALL_BACKENDS:
        with pytest.raises(exc, match=match):
            run_with_backend(backend, fused_draft_input, **kwargs)


def test_bad_out_raises():
    kwargs = _draft_kwargs()
    with pytest.raises(ValueError, match="out must have shape"):
        fused_draft_input(**kwargs, out=torch.empty(4, 8))
    with pytest.raises(TypeError, match="out must have dtype"):
        fused_draft_input(**kwargs, out=torch.empty(4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must not share memory with hidden"):
        fused_draft_input(**kwargs, out=kwargs["hidden"])
    h3 = torch.randn(2, 3, 16)
    # one workspace: out and hidden in disjoint halves is fine, overlapping halves are not
    workspace = torch.empty(2, *kwargs["hidden"].shape, dtype=kwargs["hidden"].dtype)
    workspace[0] = kwargs["hidden"]
    want = fused_draft_input(**kwargs)
    got = fused_draft_input(**(kwargs | {"hidden": workspace[0]}), out=workspace[1])
    torch.testing.assert_close(got, want)
    flat = workspace.view(-1)
    rows = kwargs["hidden"].numel()
    with pytest.raises(ValueError, match="out must not share memory with hidden"):
        overlapping = flat[rows // 2 : rows // 2 + rows].view(kwargs["hidden"].shape)
        fused_draft_input(**(kwargs | {"hidden": workspace[0]}), out=overlapping)
    args3 = (h3, torch.zeros(2, 3, dtype=torch.int64), *list(kwargs.values())[2:])
    with pytest.raises(ValueError, match="cannot be viewed"):
        fused_draft_input(*args3, out=torch.empty(3, 2, 16).transpose(0, 1))


EAGLE3_BAD = [
    (lambda a: a.__setitem__(1, a[1][:, :8]), ValueError, "h_mid must have shape"),
    (lambda a: a.__setitem__(2, a[2][None]), ValueError, "h_high must have shape"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, r"h_low must be \[N, H\]"),
    (lambda a: a.__setitem__(1, a[1].half()), TypeError, "dtypes must match"),
    (lambda a: a.__setitem__(3, a[3][:, :32]), ValueError, r"fc_weight must be \[H, 3H\]"),
    (lambda a: a.__setitem__(4, torch.zeros(8)), ValueError, "fc_bias must have shape"),
    (lambda a: a.__setitem__(2, a[2].to("meta")), ValueError, "h_high is on meta"),
]


@pytest.mark.parametrize("mutate,exc,match", EAGLE3_BAD)
def test_eagle3_bad_input_raises(mutate, exc, match):
    args = list(make_eagle3_case((4,), 16, torch.float32, True))
    mutate(args)
    for backend in ALL_BACKENDS:
        with pytest.raises(exc, match=match):
            run_with_backend(backend, fused_eagle3_input, *args)


@pytest.mark.skipif("triton" not in ALL_BACKENDS, reason="triton unavailable on CPU tensors here")
@pytest.mark.parametrize("ids", [[0, 1, 8, 2], [0, 10, 1, 2], [0, 1, 2, -1]], ids=["V", "V+2", "-1"])
def test_unchecked_triton_plans_read_only_the_embedding_on_bad_ids(ids):
    """Token ids are range-checked only in debug mode on CUDA (a host sync): with an id outside
    [0, V) every Triton plan read rows before or past the embedding table. The table is a view into
    a buffer with guard rows on both sides: the output must not depend on them (a bad id reads a
    valid row instead)."""
    if "triton" not in ALL_BACKENDS:
        pytest.skip("no Triton backend here")
    gen = torch.Generator().manual_seed(11)
    H, V, guard = 16, 8, 4
    hidden, fc_w, fc_b = (
        torch.randn(4, H, generator=gen),
        torch.randn(H, 2 * H, generator=gen),
        torch.randn(H),
    )
    token_ids = torch.tensor(ids)
    plans = (fdi.Plan("fused", fdi.GemmConfig(16, 16, 16)), fdi.Plan("gemv", fdi.GemvConfig(4, 16, 16)))
    for plan in (*plans, fdi.Plan("gather_mm")):
        outs = []
        for guard_value in (0.0, 1000.0):
            backing = torch.full((guard + V + guard, H), guard_value)
            backing[guard : guard + V] = torch.randn(V, H, generator=torch.Generator().manual_seed(12))
            out = torch.empty(4, H)
            with fdi.use_plan(plan):
                fdi._fused_draft_input_triton(hidden, token_ids, backing[guard : guard + V], fc_w, fc_b, out)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), plan.path


def test_forced_triton_rejects_float64():
    args = make_draft_case((3,), 16, 10, torch.float64, torch.int64, False)
    with pytest.raises(TypeError, match="triton backend supports fp16/bf16/fp32"):
        run_with_backend("triton", fused_draft_input, *args)


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="C++ extension without fused_draft_input")
def test_cpp_op_checks_its_own_arguments():
    """The extension op is callable on its own (e.g. from C++); it validates ids and shapes too."""
    hidden, ids, embed, w, b = make_draft_case((4,), 16, 30, torch.float32, torch.int32, True)
    ext = torch.ops.eagle_C
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, 30\) .*, got token_ids\[1\]=30"):
        ext.fused_draft_input(
            hidden, torch.tensor([0, 30, 1, 2], dtype=torch.int32), embed, w, b, torch.empty(4, 16)
        )
    with pytest.raises(ValueError, match="fc_weight must be"):
        ext.fused_draft_input(hidden, ids, embed, w[:, :16], b, torch.empty(4, 16))
    with pytest.raises(TypeError, match="embed_weight dtype"):
        ext.fused_draft_input(hidden, ids, embed.double(), w, b, torch.empty(4, 16))
    h = [hidden, hidden[:3], hidden]
    with pytest.raises(ValueError, match="h_mid must be"):
        ext.fused_eagle3_input(*h, torch.randn(16, 48), None, torch.empty(4, 16))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_registered_ops_and_their_fakes_refuse_3d_rows(backend):
    """The public functions flatten [B, T, H]; the registered ops take [N, H] only. The fakes refuse
    what the real ops refuse, so a traced graph cannot hold a shape the real op would reject."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    hidden, ids, embed, w, _ = make_draft_case((2, 3), 16, 30, torch.float32, torch.int64, False)
    w3 = torch.randn(16, 48)
    match = r"takes \[N, H\] feature rows, got shape \(2, 3, 16\)"
    with pytest.raises(ValueError, match=match):
        run_with_backend(backend, torch.ops.eagle.fused_draft_input, hidden, ids, embed, w, None)
    with pytest.raises(ValueError, match=match):
        run_with_backend(backend, torch.ops.eagle.fused_eagle3_input, hidden, hidden, hidden, w3, None)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (hidden, ids, embed, w, w3)]
        with pytest.raises(ValueError, match=match):
            torch.ops.eagle.fused_draft_input(*fake[:4], None)
        with pytest.raises(ValueError, match=match):
            torch.ops.eagle.fused_eagle3_input(fake[0], fake[0], fake[0], fake[4], None)


# --------------------------------------------------------------------------------------------------
# torch.library registration, torch.compile, dispatch defaults
# --------------------------------------------------------------------------------------------------
def test_opcheck():
    hidden, ids, embed, w, b = make_draft_case((5,), 16, 30, torch.float32, torch.int64, True)
    torch.library.opcheck(torch.ops.eagle.fused_draft_input.default, (hidden, ids, embed, w, b))
    torch.library.opcheck(torch.ops.eagle.fused_draft_input.default, (hidden, ids.int(), embed, w, None))
    torch.library.opcheck(
        torch.ops.eagle.fused_draft_input_out.default, (hidden, ids, embed, w, b, torch.empty(5, 16))
    )
    h_low, h_mid, h_high, w3, b3 = make_eagle3_case((5,), 16, torch.float32, True)
    torch.library.opcheck(torch.ops.eagle.fused_eagle3_input.default, (h_low, h_mid, h_high, w3, b3))
    torch.library.opcheck(torch.ops.eagle.fused_eagle3_input.default, (h_low, h_mid, h_high, w3, None))
    torch.library.opcheck(
        torch.ops.eagle.fused_eagle3_input_out.default, (h_low, h_mid, h_high, w3, b3, torch.empty(5, 16))
    )
    # with gradients required, opcheck also checks the autograd registration and AOT dispatch
    grad_args = (hidden.requires_grad_(), ids, embed, w.requires_grad_(), b.requires_grad_())
    torch.library.opcheck(torch.ops.eagle.fused_draft_input.default, grad_args)
    grad_args3 = tuple(t.requires_grad_() for t in (h_low, h_mid, h_high, w3, b3))
    torch.library.opcheck(torch.ops.eagle.fused_eagle3_input.default, grad_args3)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton"])
def test_gradients(backend):
    """Registered backward formulas against finite differences (float64), for every input."""
    hidden, ids, embed, w, b = make_draft_case((2, 3), 8, 11, torch.float64, torch.int32, True, seed=6)
    ids[0, :2] = 4  # a repeated token: its embedding row's gradient must accumulate
    draft = [t.requires_grad_() for t in (hidden, embed, w, b)]
    fn = lambda h, e, w, b: run_with_backend(backend, fused_draft_input, h, ids, e, w, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, draft)
    eagle3 = [t.requires_grad_() for t in make_eagle3_case((4,), 8, torch.float64, True, seed=6)]
    assert torch.autograd.gradcheck(lambda *a: run_with_backend(backend, fused_eagle3_input, *a), eagle3)


def test_torch_compile():
    draft_args = make_draft_case((2, 3), 16, 30, torch.float32, torch.int64, True, seed=1)
    eagle3_args = make_eagle3_case((2, 3), 16, torch.float32, False, seed=1)

    def draft_step(hidden, ids, embed, w, b):
        return torch.relu(fused_draft_input(hidden, ids, embed, w, b)) * 2

    def eagle3_step(h_low, h_mid, h_high, w, b):
        return fused_eagle3_input(h_low, h_mid, h_high, w, b) + 1

    def draft_step_out(hidden, ids, embed, w, b):  # the preallocated (CUDA-graph) form
        out = torch.empty(*hidden.shape[:-1], w.shape[0], dtype=hidden.dtype)
        return fused_draft_input(hidden, ids, embed, w, b, out=out) * 2

    def eagle3_step_out(h_low, h_mid, h_high, w, b):
        out = torch.empty(*h_low.shape[:-1], w.shape[0], dtype=h_low.dtype)
        return fused_eagle3_input(h_low, h_mid, h_high, w, b, out=out) + 1

    for fn, args in (
        (draft_step, draft_args),
        (eagle3_step, eagle3_args),
        (draft_step_out, draft_args),
        (eagle3_step_out, eagle3_args),
    ):
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True)(*args)  # no graph break (backend picked at run time)
        torch.testing.assert_close(got, fn(*args), rtol=0, atol=0)


def test_out_refuses_inputs_that_require_grad():
    """out= cannot carry a gradient (as torch's own out= functions): refused, not silently detached."""
    hidden, ids, embed, w, b = make_draft_case((4,), 16, 30, torch.float32, torch.int64, True, seed=2)
    out = torch.empty(4, w.shape[0])
    w = w.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="fc_weight requires grad"):
        fused_draft_input(hidden, ids, embed, w, b, out=out)
    h_low, h_mid, h_high, w3, b3 = make_eagle3_case((4,), 16, torch.float32, False, seed=2)
    with pytest.raises(RuntimeError, match="h_mid requires grad"):
        fused_eagle3_input(
            h_low, h_mid.clone().requires_grad_(), h_high, w3, b3, out=torch.empty(4, w3.shape[0])
        )
    with torch.no_grad():  # no autograd: fine
        fused_draft_input(hidden, ids, embed, w, b, out=out)


@pytest.mark.extension
def test_default_cpu_backend_is_registered_cpp():
    """The C++ op is the measured CPU default: select_backend picks it, backend_info reports it."""
    info = eagle_kernels.backend_info()["cpu_backend"]
    assert eagle_kernels.select_backend(OP, CPU) == "cpp" and info[OP] == "cpp"
    assert eagle_kernels.select_backend(OP3, CPU) == "cpp" and info[OP3] == "cpp"


@pytest.mark.skipif("triton" not in ALL_BACKENDS, reason="triton unavailable")
def test_default_plans_compile_and_pipeline_for_sm90():
    """Without a GPU: lower the fused GEMM of every default decode plan of the sweep's shapes (H 4096
    and 8192, EAGLE-1/2 and EAGLE-3) to sm_90 and check that it fits in shared memory and that every
    A load (embedding rows, features) and W load of the K loop became a pipelined async copy; the
    default GEMV plans, the split-K reduction and the gather_mm packing kernel must compile too."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    script = Path(__file__).resolve().parents[2] / "bench" / "sweep_fused_draft_input.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--aot-check", "--eagle3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    gemms = [r for r in reports if "plan" in r]
    assert len(gemms) >= 4 and all(r["ok"] and r["async_copies"] >= 4 for r in gemms), gemms
    gemvs = [r for r in reports if "gemv_plan" in r]  # the built-in 1-row plans are GEMVs
    assert len(gemvs) >= 1 and all(r["ok"] for r in gemvs), gemvs
    assert {r["kernel"] for r in reports if "kernel" in r} == {"splitk_reduce", "pack_segments"}


# --------------------------------------------------------------------------------------------------
# GPU: decode and prefill shapes through the compiled Triton kernel
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "N,H,V", [(1, 4096, 32000), (64, 1024, 32000), (511, 2048, 4096), (2048, 4096, 32000)]
)
def test_gpu_large_shapes(dtype, N, H, V):
    cuda = torch.device("cuda")
    args = make_draft_case((N,), H, V, dtype, torch.int64, True, device=cuda, seed=N)
    assert eagle_kernels.select_backend(OP, cuda) == "triton"
    assert_matches(fused_draft_input(*args), fused_draft_input_ref, args, dtype)
    args3 = make_eagle3_case((N,), H, dtype, False, device=cuda, seed=N)
    assert_matches(fused_eagle3_input(*args3), fused_eagle3_input_ref, args3, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("N,H", [(1, 4096), (16, 2048), (64, 4096), (300, 1024)])
def test_gpu_plans_match_reference(N, H):
    """The default plan, gather_mm and a split-K and a square fused configuration on compiled
    kernels, EAGLE-1/2 and EAGLE-3, bf16."""
    cuda = torch.device("cuda")
    plans = [
        fdi.default_plan(N, H, 2, torch.bfloat16, cuda),
        fdi.Plan("gather_mm"),
        fdi.Plan.from_name("fused:bm16_bn64_bk128_gm8_sk4_w4_st4"),
        fdi.Plan.from_name("fused:bm64_bn128_bk64_gm8_sk1_w4_st4"),
        fdi.Plan("gemv"),
        fdi.Plan.from_name("gemv:bm4_bn8_bk256_w4_st3"),
    ]
    draft = make_draft_case((N,), H, 32000, torch.bfloat16, torch.int32, True, device=cuda, seed=N)
    eagle3 = make_eagle3_case((N,), H, torch.bfloat16, False, device=cuda, seed=N)
    for plan in plans:
        with fdi.use_plan(plan):
            assert_matches(fused_draft_input(*draft), fused_draft_input_ref, draft, torch.bfloat16)
            assert_matches(fused_eagle3_input(*eagle3), fused_eagle3_input_ref, eagle3, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "plan", [None, "gather_mm", "fused:bm16_bn64_bk128_gm8_sk4_w4_st4", "gemv:bm2_bn16_bk256_w4_st3"]
)
def test_gpu_cuda_graph_replay_matches_eager(plan):
    """Every path (split-K's workspace and gather_mm's scratch are allocated per call) can be
    captured in a CUDA graph; a replay on new features equals an eager call."""
    cuda = torch.device("cuda")
    hidden, ids, embed, w, b = make_draft_case(
        (8,), 1024, 32000, torch.bfloat16, torch.int64, True, device=cuda
    )
    out = torch.empty_like(hidden)
    with fdi.use_plan(plan):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fused_draft_input(hidden, ids, embed, w, b, out=out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fused_draft_input(hidden, ids, embed, w, b, out=out)
        hidden.copy_(torch.randn_like(hidden))
        ids.copy_(torch.randint_like(ids, 32000))
        graph.replay()
        torch.testing.assert_close(out, fused_draft_input(hidden, ids, embed, w, b), rtol=0, atol=0)


def test_model_weights_take_the_eager_fast_path_and_the_cached_checks():
    """A model passes its weights as nn.Parameter: under no_grad they are plain tensors for dispatch
    (the eager path, not the ~20-30 us custom-op wrapper, and cached argument checks); with autograd
    on, a weight that requires grad still goes through the registered op."""
    from eagle_kernels._backend import eager_fast_path
    from eagle_kernels._checks import call_signature

    fc = torch.nn.Linear(8, 4)
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert eager_fast_path(x, fc.weight, fc.bias)
    assert not eager_fast_path(x, fc.weight)
    assert call_signature(x, fc.weight) == call_signature(x, fc.weight.detach())
