from __future__ import annotations

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

    for fn, args in ((draft_step, draft_args), (eagle3_step, eagle3_args)):
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=False)(*args)
        torch.testing.assert_close(got, fn(*args), rtol=0, atol=0)


def test_default_cpu_backend_is_registered_cpp():
    """The C++ op is the measured CPU default: select_backend picks it, backend_info reports it."""
    info = eagle_kernels.backend_info()["cpu_backend"]
    assert eagle_kernels.select_backend(OP, CPU) == "cpp" and info[OP] == "cpp"
    assert eagle_kernels.select_backend(OP3, CPU) == "cpp" and info[OP3] == "cpp"


AOT_COMPILE = """
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import eagle_kernels
mod = sys.modules["eagle_kernels.fused_draft_input"]
kernel, names = mod._fused_segments_linear_kernel, mod._fused_segments_linear_kernel.arg_names
for rows, dtype, gather, segments in [(1, "bf16", True, 2), (4096, "fp16", False, 3)]:
    cfg = mod._pick_tiles(rows, 4096, torch.device("cpu"), 2)
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    # what the JIT specialises at launch: unit inner strides, 16-divisible pointers / strides / K
    constexprs = dict(cfg, GATHER_SEG0=gather, NUM_SEGMENTS=segments, HAS_BIAS=True, FP32_DOT=False,
                      stride_s0k=1, stride_s1k=1, stride_s2k=1, stride_wk=1, stride_on=1)
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        sig[n] = "constexpr" if n in constexprs else ("*i64" if n == "ids_ptr" else
                 "*" + dtype if n.endswith("_ptr") else "i32")
        if sig[n] != "constexpr" and (n.endswith("_ptr") or n.startswith("stride") or n == "K"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, sig, {(names.index(k),): v for k, v in constexprs.items()}, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch)
    assert "async_copy_global_to_local" in compiled.asm["ttgir"], "K loop not software-pipelined"
    print(rows, dtype, "shared", compiled.metadata.shared)
"""


@pytest.mark.skipif("triton" not in ALL_BACKENDS, reason="triton unavailable")
def test_triton_kernel_compiles_for_sm90():
    """Without a GPU: lower the kernel to an sm_90 cubin (decode tile with the embedding gather,
    prefill tile with three segments) and check that the K loops are pipelined with async copies."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run(
        [sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


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
