"""Every op's Triton kernels compile for sm_80 and sm_90, ahead of time, without a GPU.

The CPU test runs execute the kernels through Triton's interpreter, which runs them as Python and so
cannot see what the compiler rejects: a name the installed Triton lacks (``tl.gather`` before 3.3), or
an assertion inside its passes (Triton 3.6 on the sampling kernel at ``num_spec_steps == 1``, found
on an H200). Here each op's launcher runs on small CPU tensors with its kernels replaced by
recorders, and every recorded launch is compiled for both targets with the specialisation Triton's
JIT would give its arguments (:func:`tests.kernels.helpers.compile_like_jit`): dtypes, int32 / int64
indices, arguments equal to 1 (made constants), and each constexpr variant a launcher picks.

The compiles run in a subprocess without ``TRITON_INTERPRET`` (the test process has it set).
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

from tests.kernels.helpers import (
    LaunchRecorder,
    compile_like_jit,
    record_tree_attention_launches,
    require_jit_specialisation,
    run_without_interpreter,
)

ARCHS = (80, 90)
Z = torch.zeros
F32, F16, BF16, I32, I64 = torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64


def _module(name: str):
    return importlib.import_module(f"eagle_kernels.{name}")  # the package re-exports a function per name


def _recorded(module, kernel_names: list[str], launcher, *args) -> list[tuple]:
    """(kernel, args, kwargs) of every launch ``launcher(*args)`` makes, the kernels replaced."""
    recorders = {name: LaunchRecorder(getattr(module, name)) for name in kernel_names}
    saved = {name: getattr(module, name) for name in kernel_names}
    for name, recorder in recorders.items():
        setattr(module, name, recorder)
    try:
        launcher(*args)
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)
    launches = [launch for recorder in recorders.values() for launch in recorder.launches]
    assert launches, f"{launcher.__name__} launched nothing"
    return launches


def _tree_attention(B, T, Hq, Hkv, S, D, dtype, mask_kind, splits=None) -> list[tuple]:
    ta = _module("tree_attention")
    q, kv = Z(B, T, Hq, D, dtype=dtype), Z(2, B, Hkv, S, D, dtype=dtype)
    seqlens = torch.full((B,), S - T, dtype=I32)
    mask = {
        None: None,
        "bool": Z(B, T, T, dtype=torch.bool),
        "u8": Z(B, T, (T + 7) // 8, dtype=torch.uint8),
        "i32": Z(B, T, (T + 31) // 32, dtype=I32),
    }[mask_kind]
    plan = ta.plan_launch(B, Hkv, T, Hq // Hkv, S, D, num_sms=132, elem_size=dtype.itemsize)
    config = ta.LaunchConfig(
        plan.block_m, plan.block_n, plan.num_warps, plan.num_stages, splits or plan.num_splits
    )
    return record_tree_attention_launches(q, kv[0], kv[1], seqlens, mask, config)


def _paged_tree_attention(
    B, T, Hq, Hkv, page, blocks, D, dtype, mask_kind, splits, index_dtype=I32
) -> list[tuple]:
    ta = _module("tree_attention")
    q, pool = Z(B, T, Hq, D, dtype=dtype), Z(2, B * blocks, page, Hkv, D, dtype=dtype)
    table = torch.arange(B * blocks, dtype=index_dtype).view(B, blocks)
    seqlens = torch.full((B,), blocks * page - T, dtype=I32)
    mask = None if mask_kind is None else Z(B, T, (T + 31) // 32, dtype=I32)
    config = ta.LaunchConfig(num_splits=splits)
    return record_tree_attention_launches(q, pool[0], pool[1], seqlens, mask, config, table)


def _quantized_tree_attention(B, T, Hkv, S, kv_dtype, scales, native_e4m3=False, page=0) -> list[tuple]:
    """8-bit caches (fp8 / int8) with ``scales``: "heads" ([Hkv] tensors read by the kernel), "one"
    ([1] tensors) or "floats" (a CUDA call's host-side scales: K folded, V by value). On CPU tensors
    the launcher converts e4m3 bit by bit (as on GPUs before sm_89); ``native_e4m3`` records the
    launch of an sm_89+ GPU instead. ``page``: a paged cache of that page size."""
    ta = _module("tree_attention")
    Hq, D = 4 * Hkv, 128
    q, kv = Z(B, T, Hq, D, dtype=BF16), Z(2, B, Hkv, S, D).to(kv_dtype)
    k, v, table = kv[0], kv[1], None
    if page:
        k, v = (c.transpose(1, 2).reshape(B * S // page, page, Hkv, D) for c in (k, v))
        table = torch.arange(B * S // page, dtype=I32).view(B, S // page)
    seqlens = torch.full((B,), S - T, dtype=I32)
    mask = Z(B, T, (T + 31) // 32, dtype=I32)
    kw = {
        "heads": dict(k_scale=torch.ones(Hkv), v_scale=torch.ones(Hkv)),
        "one": dict(k_scale=torch.ones(1), v_scale=torch.ones(1)),
        "floats": dict(k_scale=0.5, v_scale=0.25),
    }[scales]
    config = ta.LaunchConfig(num_splits=2 if B == 1 else 1)
    fp8_bits = ta._fp8_bits
    if native_e4m3:
        ta._fp8_bits = lambda cache, q_dtype=None: 0
    try:
        return record_tree_attention_launches(q, k, v, seqlens, mask, config, table, **kw)
    finally:
        ta._fp8_bits = fp8_bits


# Cases that only some targets can compile: Triton has float8_e4m3fn from sm_89 on.
ONLY_ON = {"tree_attention fp8 e4m3 native B1 split": (90,), "paged_tree_attention fp8 e4m3 native": (90,)}


def _tree_sampling(B, n, V, steps, draft, lossy, index_dtype=I64) -> list[tuple]:
    tss = _module("tree_speculative_sampling")
    index = Z(B, n, dtype=index_dtype)
    q = Z(B, n, V) if draft else None
    args = (Z(B, n, dtype=I64), index, index, index, Z(B, n, V), q, Z(B, n), Z(B), steps, lossy, 0.5, 0.5)
    return _recorded(tss, ["_tree_sampling_kernel"], tss._tree_sampling_triton, *args)


def _chain_sampling(B, L, V, draft, index_dtype) -> list[tuple]:
    css = _module("chain_speculative_sampling")
    T = B * L
    args = (
        Z(T, dtype=index_dtype),
        torch.arange(1, B + 1, dtype=index_dtype) * L,
        Z(T, V) if draft else None,
        Z(T, V),
        Z(B, dtype=index_dtype),
        Z(T),
        Z(B),
        L,
    )
    return _recorded(css, ["_chain_sampling_kernel"], css._chain_sampling_triton, *args)


def _verify(B, n, steps, index_dtype) -> list[tuple]:
    vtg = _module("verify_tree_greedy")
    t = Z(B, n, dtype=index_dtype)
    args = (t, t, t, t, Z(B * n, dtype=index_dtype), steps)
    return _recorded(vtg, ["_verify_tree_greedy_kernel"], vtg._verify_tree_greedy_triton, *args)


def _warp(R, V, dtype) -> list[tuple]:
    wl = _module("warp_logits")
    args = (Z(R, V, dtype=dtype), Z(R), Z(R, dtype=I64), Z(R), Z(R))
    return _recorded(wl, ["_warp_logits_kernel"], wl._warp_logits_triton, *args)


def _paged_compact(layers, B, H, page, blocks, D, dtype, index_dtype, n, steps) -> list[tuple]:
    ckv = _module("compact_kv_cache")
    args = (
        Z(layers, 2, B * blocks, page, H, D, dtype=dtype),
        Z(B, dtype=index_dtype),
        Z(B, steps, dtype=index_dtype),
        Z(B, dtype=index_dtype),
        n,
        torch.arange(B * blocks, dtype=index_dtype).view(B, blocks),
    )
    return _recorded(ckv, ["_compact_kv_cache_kernel"], ckv._compact_kv_cache_triton, *args)


def _compact(layers, B, H, S, D, dtype, index_dtype, n, steps) -> list[tuple]:
    ckv = _module("compact_kv_cache")
    args = (
        Z(layers, 2, B, H, S, D, dtype=dtype),
        Z(B, dtype=index_dtype),
        Z(B, steps, dtype=index_dtype),
        Z(B, dtype=index_dtype),
        n,
    )
    return _recorded(ckv, ["_compact_kv_cache_kernel"], ckv._compact_kv_cache_triton, *args)


def _build_tree(B, topk, depth, n, mode, index_dtype) -> list[tuple]:
    bt = _module("build_tree")
    selected = Z(B, n - 1, dtype=index_dtype)
    seq_lens = torch.full((B,), 100, dtype=index_dtype)
    outputs = bt._allocate_outputs(selected, seq_lens, n, mode)
    parents = Z(B, bt.parent_list_width(topk, depth), dtype=index_dtype)
    args = (parents, selected, seq_lens, outputs, topk, depth, n, mode)
    return _recorded(bt, ["_build_tree_kernel"], bt._build_tree_triton, *args)


FDI_KERNELS = [
    "_fused_segments_linear_kernel",
    "_splitk_reduce_kernel",
    "_segments_gemv_kernel",
    "_pack_segments_kernel",
]


def _fused_input(eagle3, rows, H, dtype, plan, bias=True, index_dtype=I64) -> list[tuple]:
    fdi = _module("fused_draft_input")
    segments = 3 if eagle3 else 2
    weight, out = Z(H, segments * H, dtype=dtype), Z(rows, H, dtype=dtype)
    b = Z(H, dtype=dtype) if bias else None
    if eagle3:
        launcher = fdi._fused_eagle3_input_triton
        args = (*(Z(rows, H, dtype=dtype) for _ in range(3)), weight, b, out)
    else:
        launcher = fdi._fused_draft_input_triton
        args = (Z(rows, H, dtype=dtype), Z(rows, dtype=index_dtype), Z(100, H, dtype=dtype), weight, b, out)
    interpreted = fdi._interpreted_bf16
    fdi._interpreted_bf16 = lambda out: False  # a CUDA launch keeps bf16 operands
    try:
        with fdi.use_plan(plan):
            return _recorded(fdi, FDI_KERNELS, launcher, *args)
    finally:
        fdi._interpreted_bf16 = interpreted


def cases() -> list[tuple[str, object]]:
    """(name, a function returning the launches) per case."""
    fdi = _module("fused_draft_input")
    out = [
        (
            "tree_attention goal B1 bf16 (split)",
            lambda: _tree_attention(1, 64, 32, 8, 2128, 128, BF16, "i32"),
        ),
        ("tree_attention goal B32 bf16", lambda: _tree_attention(32, 64, 32, 8, 2128, 128, BF16, "i32")),
        ("tree_attention B32 fp32", lambda: _tree_attention(32, 64, 32, 8, 2128, 128, F32, "i32")),
        ("tree_attention decode fp16", lambda: _tree_attention(4, 1, 32, 8, 4096, 128, F16, None)),
        ("tree_attention ones", lambda: _tree_attention(1, 1, 1, 1, 64, 64, F16, None, splits=1)),
        ("tree_attention bool D80", lambda: _tree_attention(2, 8, 4, 4, 272, 80, BF16, "bool")),
        ("tree_attention u8 fp32 split", lambda: _tree_attention(3, 16, 8, 4, 1040, 64, F32, "u8", splits=3)),
        ("tree_attention D256", lambda: _tree_attention(1, 64, 64, 8, 1100, 256, F16, "i32", splits=1)),
        (
            "paged_tree_attention goal B32 bf16 page 16",
            lambda: _paged_tree_attention(32, 64, 32, 8, 16, 133, 128, BF16, "i32", 1),
        ),
        (
            "paged_tree_attention B1 split fp16 page 1 int64 table",
            lambda: _paged_tree_attention(1, 1, 8, 8, 1, 300, 64, F16, None, 3, I64),
        ),
        (
            "paged_tree_attention fp32 page 64",
            lambda: _paged_tree_attention(2, 8, 4, 2, 64, 3, 64, F32, "i32", 2),
        ),
    ]
    E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
    out += [
        (
            "tree_attention fp8 e4m3 bits B1 split",
            lambda: _quantized_tree_attention(1, 64, 8, 2128, E4M3, "heads"),
        ),
        (
            "tree_attention fp8 e4m3 native B1 split",
            lambda: _quantized_tree_attention(1, 64, 8, 2128, E4M3, "heads", True),
        ),
        (
            "tree_attention fp8 e5m2 bits B8 floats",
            lambda: _quantized_tree_attention(8, 64, 8, 2128, E5M2, "floats"),
        ),
        (
            "tree_attention fp8 e5m2 native B1",
            lambda: _quantized_tree_attention(1, 64, 8, 2128, E5M2, "one", True),
        ),
        ("tree_attention int8 B8 one", lambda: _quantized_tree_attention(8, 16, 2, 1040, torch.int8, "one")),
        (
            "paged_tree_attention fp8 e4m3 native",
            lambda: _quantized_tree_attention(4, 64, 8, 2048, E4M3, "heads", True, 16),
        ),
        (
            "paged_tree_attention fp8 e4m3 bits",
            lambda: _quantized_tree_attention(4, 64, 8, 2048, E4M3, "one", False, 16),
        ),
    ]
    for draft, lossy in ((True, False), (False, False), (False, True)):
        tag = "draft" if draft else ("lossy" if lossy else "target-only")
        out += [
            (f"tree_sampling {tag} steps 1", lambda d=draft, lo=lossy: _tree_sampling(1, 17, 69, 1, d, lo)),
            (f"tree_sampling {tag} i32", lambda d=draft, lo=lossy: _tree_sampling(2, 9, 3000, 3, d, lo, I32)),
        ]
    out += [
        ("chain_sampling draft ones", lambda: _chain_sampling(1, 1, 1000, True, I64)),
        ("chain_sampling target-only i32", lambda: _chain_sampling(4, 5, 3000, False, I32)),
        ("verify ones", lambda: _verify(1, 1, 1, I64)),
        ("verify i32", lambda: _verify(2, 8, 4, I32)),
        ("verify wide tree", lambda: _verify(1, 300, 8, I32)),
        ("warp_logits ones", lambda: _warp(1, 1, F32)),
        ("warp_logits bf16", lambda: _warp(4, 3000, BF16)),
        ("compact fp16 ones", lambda: _compact(1, 1, 1, 64, 128, F16, I32, 1, 1)),
        ("compact bf16 D80", lambda: _compact(2, 3, 8, 300, 80, BF16, I64, 8, 5)),
        ("compact fp8", lambda: _compact(1, 2, 2, 64, 128, torch.float8_e4m3fn, I64, 4, 3)),
        ("paged_compact bf16 page 16", lambda: _paged_compact(2, 3, 8, 16, 5, 128, BF16, I32, 8, 5)),
        (
            "paged_compact fp8 page 1 int64",
            lambda: _paged_compact(1, 2, 2, 1, 40, 64, torch.float8_e4m3fn, I64, 4, 3),
        ),
        ("build_tree ones", lambda: _build_tree(1, 1, 1, 1, 0, I64)),
    ]
    for mode, name in enumerate(("full", "qlen_bool", "qlen_bits_u8", "qlen_bits_i32")):
        out.append((f"build_tree {name}", lambda m=mode: _build_tree(2, 4, 3, 16, m, I32)))
    for eagle3 in (False, True):
        tag = "eagle3" if eagle3 else "eagle"
        segments = 3 if eagle3 else 2
        fused = fdi.Plan("fused", fdi.heuristic_config(16, 1024, segments, 2, 132))
        split = fdi.Plan("fused", fdi.heuristic_config(1, 1024, segments, 2, 132))
        out += [
            (f"{tag} gemv bf16", lambda e=eagle3: _fused_input(e, 1, 1024, BF16, fdi.Plan("gemv"))),
            (
                f"{tag} gemv fp32 odd",
                lambda e=eagle3: _fused_input(e, 5, 100, F32, fdi.Plan("gemv"), False, I32),
            ),
            (f"{tag} fused fp16", lambda e=eagle3, p=fused: _fused_input(e, 16, 1024, F16, p)),
            (f"{tag} fused split-K bf16", lambda e=eagle3, p=split: _fused_input(e, 1, 1024, BF16, p, False)),
            (
                f"{tag} gather_mm fp32",
                lambda e=eagle3: _fused_input(e, 300, 1024, F32, fdi.Plan("gather_mm")),
            ),
        ]
    return out


def compile_all() -> None:
    """Record and compile every case for every target; raise naming each failure."""
    failures = []
    for name, record in cases():
        try:
            launches = record()
        except Exception as exc:  # noqa: BLE001 - reported below with the case's name
            failures.append(f"{name}: recording failed: {type(exc).__name__}: {exc}")
            continue
        for kernel, args, kwargs in launches:
            for arch in ONLY_ON.get(name, ARCHS):
                try:
                    compile_like_jit(kernel, args, kwargs, arch)
                except Exception as exc:  # noqa: BLE001
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    failures.append(f"{name}: {kernel.fn.__name__} for sm_{arch}: {first}")
    if failures:
        raise AssertionError("Triton compile failures:\n" + "\n".join(failures))


def test_every_op_has_a_case():
    from eagle_kernels import OPS

    names = " ".join(name for name, _ in cases())
    short = {"tree_speculative_sampling": "tree_sampling", "chain_speculative_sampling": "chain_sampling"}
    short |= {
        "verify_tree_greedy": "verify",
        "compact_kv_cache": "compact",
        "paged_compact_kv_cache": "paged_compact",
    }
    short |= {"fused_draft_input": "eagle gemv", "fused_eagle3_input": "eagle3 gemv"}
    missing = [op for op in OPS if short.get(op, op) not in names]
    assert not missing, missing


def test_every_triton_kernel_compiles_for_sm80_and_sm90():
    require_jit_specialisation()
    run_without_interpreter("from tests.kernels.test_triton_compile import compile_all; compile_all()", 4000)


# Bytes of per-thread stack (register spills) the sm_90 tree_attention kernel may use at the goal
# shapes. A non-finite-V check that kept a [BLOCK_M] flag and an extra row reduction spilled 480-528
# bytes there with triton 3.6 (304-384 with 3.9) and made the kernel 5-12% slower on an H200
# (2026-11-28). Through bench/sass_tree_attention.py with triton 3.9, B 32 / B 32 TMA / B 1: 344 / 360 /
# 304 bytes on 9e7bb1c at the benchmark's int32 masks; now 64 / 16 / 16 there and 64 / 64 / 80 at the
# bool masks the decoding loop passes.
MAX_TREE_ATTENTION_STACK = 128


def _cuobjdump() -> str:
    import os

    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def tree_attention_stack_report() -> None:
    """Compile tree_attention's Triton kernel for sm_90 at issue 3's goal shapes (prefix 2048, T = 64,
    Hq 32 / Hkv 8, D 128, bf16: batch 32 with and without TMA loads, batch 1 with the split prefix),
    with int32 bit-packed and bool masks, through bench/sass_tree_attention.py, and raise when its
    stack (spills) passes the bound above, or when not all six compiled."""
    from bench import sass_tree_attention as sass

    shapes = {s.name: s for s in sass.sweep.GPU_SHAPES}
    ta = _module("tree_attention")
    stacks, over = [], []
    cases = [("tree64-B32", "default"), ("tree64-B32", "tma"), ("tree64-B1", "default")]
    for (name, config), mask in itertools.product(cases, ("int32", "bool")):
        for row in sass.report_version(ta, shapes[name], config, 90, 132, mask):
            if row["kernel"] != "_tree_attention_kernel":
                continue
            assert "error" not in row, row
            stacks.append(row["stack_bytes"])
            print(f"{name} {config} {mask} masks {row['plan']}: stack {row['stack_bytes']} bytes")
            if not 0 <= row["stack_bytes"] <= MAX_TREE_ATTENTION_STACK:
                over.append(
                    f"{name} {config} {mask}: {row['stack_bytes']} bytes of stack > {MAX_TREE_ATTENTION_STACK}"
                )
    assert len(stacks) == 6, f"expected 6 compiles of _tree_attention_kernel, got {len(stacks)}"
    assert not over, "tree_attention spills registers on sm_90: " + "; ".join(over)


def test_tree_attention_does_not_spill_registers_on_sm90_at_the_goal_shapes():
    import os

    require_jit_specialisation()
    if not os.path.exists(_cuobjdump()):
        pytest.skip(f"this triton install has no cuobjdump ({_cuobjdump()})")
    run_without_interpreter(
        "from tests.kernels.test_triton_compile import tree_attention_stack_report; tree_attention_stack_report()"
    )


def sass_report_of_itself(out: str) -> None:
    """bench/sass_tree_attention.py with the working tree's module as its own baseline: both versions
    report the same registers, stack, instructions and loops, for both kernels of a split launch."""
    import json
    from pathlib import Path

    from bench import sass_tree_attention as sass

    module_file = str(Path(_module("tree_attention").__file__))
    assert sass.main([module_file, "--shapes", "tree64-B1", "--configs", "default", "--out", out]) == 0
    versions = json.loads(Path(out).read_text())["shapes"]["tree64-B1"]["default"]
    assert versions["new"] == versions["old"], versions
    kernels = {row["kernel"]: row for row in versions["new"]}
    assert set(kernels) == {"_tree_attention_kernel", "_combine_splits_kernel"}, kernels
    main = kernels["_tree_attention_kernel"]
    assert "error" not in main and main["registers"] > 0 and main["instructions"] > 100, main
    assert len(main["loops"]) >= 2 and "num_splits=" in main["plan"], main  # the prefix loop, the masked one


def test_the_sass_report_compiles_both_versions_alike(tmp_path):
    import os

    require_jit_specialisation()
    if not os.path.exists(_cuobjdump()):
        pytest.skip(f"this triton install has no cuobjdump ({_cuobjdump()})")
    out = tmp_path / "sass.json"
    run_without_interpreter(
        f"from tests.kernels.test_triton_compile import sass_report_of_itself; sass_report_of_itself({str(out)!r})"
    )
