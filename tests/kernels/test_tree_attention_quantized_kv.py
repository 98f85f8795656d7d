"""8-bit KV caches (float8_e4m3fn, float8_e5m2, int8) with k_scale / v_scale in tree_attention and
paged_tree_attention: every backend against the float64 oracle of the dequantized cache.

The stored caches are quantized from random values; the oracle sees ``stored * scale`` exactly (in
float64), so the only error a backend may add is its own arithmetic's, judged as the unquantized
tests judge it (DESIGN §6): float32 within 1e-5, float16 / bfloat16 within twice PyTorch's own error
on the same (dequantized, then rounded to q's dtype) cache. Positions after each window hold NaN (fp8)
or the largest int8, so a backend that reads them fails.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl

from eagle_kernels import _ext, _kv_quant, paged_tree_attention, tree_attention, tree_attention_ref
from eagle_kernels._kv_quant import QUANT_KV_DTYPES
from eagle_kernels.tree_attention import LaunchConfig, _tree_attention_triton
from tests.kernels.helpers import FP32_RTOL, backends_for, run_with_backend
from tests.kernels.test_paged_tree_attention import paged
from tests.kernels.test_tree_attention import Case, assert_matches, isa_params, make_case, oracle

ta = sys.modules["eagle_kernels.tree_attention"]
E4M3, E5M2, I8 = torch.float8_e4m3fn, torch.float8_e5m2, torch.int8
SCALE_KINDS = ("none", "float", "scalar", "one", "per_head")


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------
def quantize(real: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``real / scale`` (scale broadcast over ``[B, Hkv, S, D]``'s heads) stored in ``dtype``; NaN
    stays NaN in fp8 and becomes 127 in int8 (which has no NaN)."""
    x = real / scale.double().reshape(1, -1, 1, 1)
    if dtype == I8:
        return x.round().clamp(-127, 127).nan_to_num(127).to(I8)
    return x.to(dtype)


def scales_for(kind: str, Hkv: int, seed: int) -> tuple[object, object, torch.Tensor, torch.Tensor]:
    """(k_scale, v_scale) as passed to the op, and the same as float64 ``[Hkv]`` tensors."""
    gen = torch.Generator().manual_seed(seed)
    k_heads = 0.25 + torch.rand(Hkv, generator=gen, dtype=torch.float64)
    v_heads = 0.25 + torch.rand(Hkv, generator=gen, dtype=torch.float64)
    if kind == "none":
        return None, None, torch.ones(Hkv, dtype=torch.float64), torch.ones(Hkv, dtype=torch.float64)
    if kind == "per_head":
        return k_heads.float(), v_heads.float(), k_heads.float().double(), v_heads.float().double()
    k1, v1 = k_heads[:1].float(), v_heads[:1].float()
    wide = (k1.double().expand(Hkv), v1.double().expand(Hkv))
    if kind == "float":
        return float(k1), float(v1), *wide
    if kind == "scalar":
        return k1.reshape(()), v1.reshape(()), *wide
    return k1, v1, *wide  # "one": shape [1]


def quantized_case(B, T, Hq, Hkv, D, mask_fmt, seed, kv_dtype, scale_kind, **kw):
    """(the case in float64 holding the real values the op must see, stored k, stored v, k_scale,
    v_scale). The stored caches are strided views ``kv[1, 0]``, ``kv[1, 1]`` of one 8-bit buffer."""
    case = make_case(B, T, Hq, Hkv, D, mask_fmt, seed, **kw)
    k_scale, v_scale, ks, vs = scales_for(scale_kind, Hkv, seed)
    buffer = torch.zeros(2, 2, *case.k.shape, dtype=kv_dtype)
    buffer[1, 0], buffer[1, 1] = quantize(case.k, ks, kv_dtype), quantize(case.v, vs, kv_dtype)
    k, v = buffer[1, 0], buffer[1, 1]
    real_k = k.double() * ks.reshape(1, -1, 1, 1)
    real_v = v.double() * vs.reshape(1, -1, 1, 1)
    real = Case(case.q, real_k, real_v, case.seqlens, case.mask, case.mask_bool)
    return real, k, v, k_scale, v_scale


def on(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def lowp_case(real: Case, dtype, device) -> Case:
    """The yardstick case: q and the dequantized caches in ``dtype`` (PyTorch's own rounding)."""
    return real.to(dtype, device)


def _all_backends(device):
    return ["torch", *backends_for("tree_attention", device)]


# --------------------------------------------------------------------------------------------------
# The Triton conversion of float8_e4m3fn on GPUs before sm_89
# --------------------------------------------------------------------------------------------------
@triton.jit
def _convert_kernel(x_ptr, q_ptr, out_ptr, FP8_BITS: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, N)
    q = tl.load(q_ptr + offs)
    tl.store(out_ptr + offs, ta._kv_to_compute(tl.load(x_ptr + offs), q, FP8_BITS).to(tl.float32))


def _converted(x: torch.Tensor, q_dtype: torch.dtype, fp8_bits: int) -> torch.Tensor:
    out = torch.empty(x.numel(), dtype=torch.float32, device=x.device)
    q = torch.zeros(x.numel(), dtype=q_dtype, device=x.device)
    _convert_kernel[(1,)](x.view(torch.uint8) if fp8_bits else x, q, out, FP8_BITS=fp8_bits, N=x.numel())
    return out


def _require_triton(device):
    if "triton" not in _all_backends(device):
        pytest.skip(f"no Triton backend on {device}")


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_8_bit_value_converts_exactly(device, q_dtype):
    """All 256 bytes of each 8-bit dtype through the kernel's conversion to q's dtype, as the launcher
    picks it for this device, and the bit-level paths everywhere: equal to PyTorch's conversion (NaN
    where it gives NaN, infinities included)."""
    _require_triton(device)
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(device)
    for dtype in QUANT_KV_DTYPES:
        stored = every.view(dtype)
        want = stored.to(q_dtype).float()
        for fp8_bits in sorted({ta._fp8_bits(stored, q_dtype), {E4M3: 1, E5M2: 2}.get(dtype, 0)}):
            got = _converted(stored, q_dtype, fp8_bits)
            assert torch.equal(got.isnan(), want.isnan()), (dtype, fp8_bits)
            ok = ~want.isnan()
            assert torch.equal(got[ok], want[ok]), (dtype, fp8_bits, (got - want)[ok].abs().max())


def test_the_launcher_converts_fp8_bytes_where_triton_cannot(monkeypatch):
    """In the interpreter (CPU tensors) fp8 is always converted bit by bit (its own conversions are
    wrong on NaN and subnormals); on CUDA e4m3fn before sm_89 (Triton has no e4m3 type there)."""
    cpu = torch.zeros(1)
    assert ta._fp8_bits(cpu.to(E5M2)) == 2 and ta._fp8_bits(cpu.to(E4M3)) == 1
    assert ta._fp8_bits(cpu.to(I8)) == 0 and ta._fp8_bits(cpu.bfloat16()) == 0
    e4m3, e5m2 = (SimpleNamespace(dtype=d, device=torch.device("cuda", 0)) for d in (E4M3, E5M2))
    for capability, bits in [((8, 0), 1), ((8, 6), 1), ((8, 9), 0), ((9, 0), 0)]:
        monkeypatch.setattr(ta, "_capability", lambda device, c=capability: c)
        assert ta._fp8_bits(e4m3) == bits and ta._fp8_bits(e5m2) == 0, capability
        # Triton's own e5m2 -> bfloat16 turns inf / NaN bytes into finite values
        assert ta._fp8_bits(e5m2, torch.bfloat16) == 2 and ta._fp8_bits(e5m2, torch.float32) == 0
    monkeypatch.setattr(ta, "_FORCE_SOFT_E4M3", True)
    assert ta._fp8_bits(e4m3) == 1 and ta._fp8_bits(e5m2) == 0


# --------------------------------------------------------------------------------------------------
# Every backend against the oracle
# --------------------------------------------------------------------------------------------------
def _check(out, real: Case, dtype, device, what):
    want = oracle(real)
    assert_matches(out, lowp_case(real, dtype, device), want, what)


@pytest.mark.parametrize("kv_dtype", QUANT_KV_DTYPES, ids=str)
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_backends_match_the_oracle(device, kv_dtype, q_dtype):
    """Each scale kind (none, a float, a 0-d / [1] tensor, one per kv head) and mask format, GQA."""
    for seed, (kind, mask_fmt) in enumerate(zip(SCALE_KINDS, ["causal", "bool", "u8", "i32", "bool"])):
        real, k, v, k_scale, v_scale = quantized_case(
            2, 5, 4, 2, 16, mask_fmt, seed, kv_dtype, kind, prefix_max=30
        )
        q, k, v, seqlens, mask, k_scale, v_scale = on(
            device, real.q.to(q_dtype), k, v, real.seqlens, real.mask, k_scale, v_scale
        )
        for backend in _all_backends(device):
            out = run_with_backend(
                backend, tree_attention, q, k, v, seqlens, mask, k_scale=k_scale, v_scale=v_scale
            )
            _check(out, real, q_dtype, device, f"{backend} {kind} {mask_fmt}")


def paged_quantized(real: Case, k, v, page: int, layout: str, kv_dtype):
    """(k_pool, v_pool, table): the stored 8-bit caches scattered into a block pool of ``layout``
    (:func:`tests.kernels.test_paged_tree_attention.paged`; unused blocks NaN, 127 in int8)."""
    stored = Case(real.q, k.float(), v.float(), real.seqlens, real.mask, real.mask_bool)  # exact
    k_pool, v_pool, table = paged(stored, page, layout, seed=page)
    pool = k_pool._base.nan_to_num(127).to(kv_dtype)  # the whole pool, so the views keep their strides
    views = (torch.as_strided(pool, p.shape, p.stride(), p.storage_offset()) for p in (k_pool, v_pool))
    return *views, table


@pytest.mark.parametrize("kv_dtype", [E4M3, I8], ids=str)
@pytest.mark.parametrize("layout, page", [("vllm", 1), ("nhd", 4), ("hnd", 16)])
def test_paged_backends_match_the_oracle(device, kv_dtype, layout, page):
    """The same caches scattered into a block pool of each layout."""
    real, k, v, k_scale, v_scale = quantized_case(
        3, 4, 6, 3, 16, "i32", page, kv_dtype, "per_head", prefix_max=25
    )
    k_pool, v_pool, table = paged_quantized(real, k, v, page, layout, kv_dtype)
    for dtype in (torch.float32, torch.bfloat16):
        args = on(device, real.q.to(dtype), k_pool, v_pool, table, real.seqlens, real.mask)
        scales = on(device, k_scale, v_scale)
        for backend in _all_backends(device):
            out = run_with_backend(backend, paged_tree_attention, *args, k_scale=scales[0], v_scale=scales[1])
            _check(out, real, dtype, device, f"{backend} {layout} page {page} {dtype}")


# --------------------------------------------------------------------------------------------------
# Triton launches: splits, TMA, scales passed by value, the bit-level e4m3 path
# --------------------------------------------------------------------------------------------------
SPLIT_CONFIGS = [
    LaunchConfig(block_m=16, block_n=16, num_splits=3),
    LaunchConfig(block_m=16, block_n=16, num_splits=1, kv_tma=True),
    LaunchConfig(block_m=32, block_n=16, num_warps=2, num_stages=2, num_splits=3, kv_tma=True),
]


@pytest.mark.parametrize("config", SPLIT_CONFIGS, ids=lambda c: f"s{c.num_splits}{'tma' if c.kv_tma else ''}")
@pytest.mark.parametrize("kv_dtype", QUANT_KV_DTYPES, ids=str)
def test_triton_splits_and_tma_with_per_head_scales(device, config, kv_dtype):
    """Per-head scales on a split prefix (each split's partial output is scaled, then combined) and
    through tensor-descriptor loads of 8-bit tiles."""
    _require_triton(device)
    if config.kv_tma and device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("tensor-descriptor loads need compute capability 9.0+")
    real, k, v, k_scale, v_scale = quantized_case(
        2, 5, 4, 2, 16, "i32", 3, kv_dtype, "per_head", prefix_max=60
    )
    if config.kv_tma:
        k, v = k.contiguous(), v.contiguous()
    for dtype in (torch.float32, torch.bfloat16):
        q, k_, v_, seqlens, mask, ks, vs = on(
            device, real.q.to(dtype), k, v, real.seqlens, real.mask, k_scale, v_scale
        )
        out = _tree_attention_triton(q, k_, v_, seqlens, mask, 0.25, config, k_scale=ks, v_scale=vs)
        assert_matches(out, lowp_case(real, dtype, device), oracle(real, 0.25), f"{config} {dtype}")


def test_triton_scales_passed_by_value(device):
    """A CUDA call's one-value CPU scales reach the kernel as floats (K folded into the softmax scale,
    V as an argument), with no copy to the device; here the launcher is given the floats directly."""
    _require_triton(device)
    real, k, v, k_scale, v_scale = quantized_case(2, 4, 4, 2, 16, "bool", 5, E4M3, "float", prefix_max=40)
    for sm_scale in (0.25, -0.5):
        q, k_, v_, seqlens, mask = on(device, real.q.float(), k, v, real.seqlens, real.mask)
        out = _tree_attention_triton(q, k_, v_, seqlens, mask, sm_scale, k_scale=k_scale, v_scale=v_scale)
        assert_matches(out, lowp_case(real, torch.float32, device), oracle(real, sm_scale), f"{sm_scale}")
    cuda = torch.device("cuda", 0)
    one = torch.tensor([0.5])
    assert ta._host_scale(one, cuda) == 0.5 and isinstance(ta._host_scale(one, cuda), float)
    assert ta._host_scale(one, torch.device("cpu")) is one and ta._host_scale(None, cuda) is None


def test_triton_soft_e4m3_equals_native_bit_for_bit(device, monkeypatch):
    """The pre-sm_89 bit-level conversion gives the native conversion's result bit for bit (on a GPU
    of sm_89+ both run; elsewhere the launcher already takes the bit-level path)."""
    _require_triton(device)
    real, k, v, k_scale, v_scale = quantized_case(2, 6, 4, 2, 32, "u8", 7, E4M3, "per_head", prefix_max=50)
    args = on(device, real.q.half(), k, v, real.seqlens, real.mask)
    scales = dict(zip(("k_scale", "v_scale"), on(device, k_scale, v_scale)))
    native = _tree_attention_triton(*args, 0.25, **scales)
    monkeypatch.setattr(ta, "_FORCE_SOFT_E4M3", True)
    assert torch.equal(_tree_attention_triton(*args, 0.25, **scales), native)


# --------------------------------------------------------------------------------------------------
# Non-finite stored values, out=, autograd, ops
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", [E4M3, E5M2], ids=str)
def test_a_nan_byte_in_a_new_tokens_v_reaches_only_the_rows_that_see_it(device, kv_dtype):
    """fp8 NaN (and e5m2's inf) in a draft token's stored V: the rows whose tree holds that token are
    NaN, the others are finite and right (as with a float cache)."""
    real, k, v, k_scale, v_scale = quantized_case(
        2, 5, 4, 2, 16, "bool", 9, kv_dtype, "per_head", prefix_max=20
    )
    b, j = 1, 2
    pos = int(real.seqlens[b]) + j
    bad = torch.tensor(float("inf") if kv_dtype == E5M2 else float("nan")).to(kv_dtype)
    want = oracle(real)  # (the rows that do not see the token do not depend on its value)
    v[b, 0, pos, 3] = bad
    sees = real.mask_bool[b, :, j]  # [T]: which new tokens see token j
    args = on(device, real.q.float(), k, v, real.seqlens, real.mask, k_scale, v_scale)
    for backend in _all_backends(device):
        out = run_with_backend(backend, tree_attention, *args[:5], k_scale=args[5], v_scale=args[6]).cpu()
        assert out[b, sees, :2].isnan().all(), backend  # kv head 0's query heads (G = 2)
        rest = torch.ones_like(out, dtype=torch.bool)
        rest[b, sees, :2] = False
        assert torch.isfinite(out[rest]).all(), backend
        torch.testing.assert_close(out[rest].double(), want[rest], rtol=FP32_RTOL, atol=1e-5, msg=backend)


def test_out_and_the_registered_ops(device):
    real, k, v, k_scale, v_scale = quantized_case(2, 5, 4, 2, 16, "i32", 11, E4M3, "per_head")
    args = on(device, real.q.float(), k, v, real.seqlens, real.mask)
    ks, vs = on(device, k_scale, v_scale)
    want = oracle(real)
    for backend in _all_backends(device):
        out = torch.full_like(args[0], float("nan"))
        got = run_with_backend(backend, tree_attention, *args, out=out, k_scale=ks, v_scale=vs)
        assert got is out
        assert_matches(out, lowp_case(real, torch.float32, device), want, backend)
        op = run_with_backend(backend, torch.ops.eagle.tree_attention, *args, 16**-0.5, ks, vs)
        assert torch.equal(op, out), backend


@pytest.mark.parametrize(
    "kv_dtype, scale_kind", [(I8, "scalar"), (I8, "per_head"), (E4M3, "per_head")], ids=str
)
def test_opcheck(kv_dtype, scale_kind):
    real, k, v, k_scale, v_scale = quantized_case(2, 5, 4, 2, 16, "i32", 13, kv_dtype, scale_kind)
    # opcheck's schema test compares the inputs before and after with allclose, which PyTorch lacks
    # for float8 on CPU (torch 2.13)
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    utils = utils if kv_dtype == E4M3 else ("test_schema", *utils)
    args = (real.q.float(), k, v, real.seqlens, real.mask, 0.25, k_scale, v_scale)
    torch.library.opcheck(torch.ops.eagle.tree_attention.default, args, test_utils=utils)
    out_args = (*args[:6], torch.empty_like(args[0]), *args[6:])
    torch.library.opcheck(torch.ops.eagle.tree_attention_out.default, out_args, test_utils=utils)
    k_pool, v_pool, table = paged_quantized(real, k, v, 4, "nhd", kv_dtype)
    paged_args = (args[0], k_pool, v_pool, table, real.seqlens, real.mask, 0.25, k_scale, v_scale)
    torch.library.opcheck(torch.ops.eagle.paged_tree_attention.default, paged_args, test_utils=utils)


def test_torch_compile_with_float_and_tensor_scales():
    real, k, v, k_scale, v_scale = quantized_case(2, 6, 4, 2, 16, "bool", 15, E5M2, "per_head")

    def layer(q, k, v, seqlens, mask, ks, vs):
        a = tree_attention(q * 2, k, v, seqlens, mask, k_scale=ks, v_scale=vs)
        b = tree_attention(q, k, v, seqlens, mask, k_scale=0.5, v_scale=2.0)
        return (a + b).sum(-1)

    args = (real.q.float(), k, v, real.seqlens, real.mask, k_scale, v_scale)
    want = layer(*args)
    got = torch.compile(layer, fullgraph=True)(*args)
    torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=1e-5)

    def with_floats(q, k, v, seqlens, mask, ks: float, vs: float):
        return tree_attention(q, k, v, seqlens, mask, k_scale=ks, v_scale=vs)

    # floats passed in, and changed between calls: traced as symbols, not constants (found in review:
    # the Python value check failed on them under fullgraph)
    compiled = torch.compile(with_floats, fullgraph=True)
    for ks, vs in [(0.5, 2.0), (0.25, 3.0), (0.75, 1.5)]:
        torch.testing.assert_close(
            compiled(*args[:5], ks, vs), with_floats(*args[:5], ks, vs), rtol=FP32_RTOL, atol=1e-5
        )


def test_a_scale_that_requires_grad_is_refused():
    """No gradient flows into the scales (constants of a calibrated cache): found in review to be
    silently dropped, as it was with out=."""
    real, k, v, _, _ = quantized_case(2, 4, 4, 2, 16, "bool", 21, E4M3, "none")
    ks = torch.tensor([0.5, 2.0], requires_grad=True)
    for call in (
        lambda **kw: tree_attention(real.q.float(), k, v, real.seqlens, real.mask, k_scale=ks, **kw),
        lambda **kw: paged_tree_attention(
            real.q.float(),
            *paged_quantized(real, k, v, 4, "nhd", E4M3)[:3],
            real.seqlens,
            real.mask,
            v_scale=ks,
            **kw,
        ),
    ):
        with pytest.raises(
            RuntimeError, match="(k|v)_scale requires grad, but no gradient flows into the scales"
        ):
            call()
        with pytest.raises(RuntimeError, match="requires grad"):
            call(out=torch.empty_like(real.q.float()))
        with torch.no_grad():
            assert torch.isfinite(call()).all()


def test_gradient_of_q_through_an_8_bit_cache():
    """The backward (the reference's) sees the dequantized cache: q's gradient equals the one through
    the float32 cache holding ``stored * scale`` (power-of-two scales: the product is exact)."""
    real, k, v, _, _ = quantized_case(2, 4, 4, 2, 16, "bool", 17, E4M3, "none")
    ks, vs = torch.tensor([0.5, 2.0]), torch.tensor(0.25)
    grads = []
    for kk, vv, kw in [
        (k, v, dict(k_scale=ks, v_scale=vs)),
        (k.float() * ks.view(1, -1, 1, 1), v.float() * vs, {}),
    ]:
        q = real.q.float().requires_grad_()
        tree_attention(q, kk, vv, real.seqlens, real.mask, **kw).square().sum().backward()
        grads.append(q.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=FP32_RTOL, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _bad_cases():
    kw = lambda **k: lambda a: a.update(k)  # noqa: E731
    return [
        (
            kw(k=lambda c: c.to(E4M3), v=lambda c: c.to(I8)),
            TypeError,
            r"dtypes must match: k_cache=float8_e4m3fn, v_cache=int8",
        ),
        (
            kw(k=lambda c: c.half(), v=lambda c: c.half()),
            TypeError,
            r"dtypes must match: q=float32, k_cache=float16",
        ),
        (kw(q=torch.zeros(2, 5, 4, 16, dtype=E4M3)), TypeError, "q must have dtype in"),
        (
            kw(k=lambda c: c.to(torch.uint8), v=lambda c: c.to(torch.uint8)),
            TypeError,
            "k_cache must have dtype in",
        ),
        (
            kw(k_scale=torch.ones(3)),
            ValueError,
            r"k_scale must hold one value \(\[\] or \[1\]\) or one per kv head \(\[Hkv\] = \[2\]\)",
        ),
        (kw(v_scale=torch.ones(1, 1)), ValueError, r"v_scale must hold one value"),
        (kw(k_scale=torch.ones(2, dtype=torch.int32)), TypeError, "k_scale must have dtype in"),
        (
            kw(v_scale=torch.ones(2, device="meta")),
            ValueError,
            "v_scale is on meta but the other inputs are on cpu",
        ),
        (kw(k_scale=0.0), ValueError, "k_scale must be finite and > 0, got 0.0"),
        (kw(v_scale=-1), ValueError, "v_scale must be finite and > 0"),
        (kw(k_scale=float("nan")), ValueError, "k_scale must be finite and > 0"),
        (kw(k_scale=True), TypeError, "k_scale must be None, a float or a tensor, got bool"),
        (kw(v_scale="0.5"), TypeError, "v_scale must be None, a float or a tensor, got str"),
        (
            kw(k_scale=torch.tensor([1.0, 0.0])),
            ValueError,
            r"k_scale must be finite and > 0, got \[1.0, 0.0\]",
        ),
        (kw(v_scale=torch.tensor(float("inf"))), ValueError, "v_scale must be finite and > 0"),
    ]


def _as_pool(cache: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, S, D]`` as a pool of pages of one position, ``[B * S, 1, Hkv, D]``."""
    B, Hkv, S, D = cache.shape
    return cache.transpose(1, 2).reshape(B * S, 1, Hkv, D)


@pytest.mark.parametrize("mutate,error,match", _bad_cases())
@pytest.mark.parametrize("paged_cache", [False, True], ids=["contiguous", "paged"])
def test_bad_input_raises(mutate, error, match, paged_cache):
    real, k, v, _, _ = quantized_case(2, 5, 4, 2, 16, "causal", 19, E4M3, "none")
    args = {"q": real.q.float(), "k": lambda c: c, "v": lambda c: c, "k_scale": None, "v_scale": None}
    mutate(args)
    k_, v_ = args["k"](k.float()), args["v"](v.float())
    scales = dict(k_scale=args["k_scale"], v_scale=args["v_scale"])
    if paged_cache:
        S = k_.shape[2]
        table = torch.arange(2 * S, dtype=torch.int32).view(2, S)
        call = (paged_tree_attention, args["q"], _as_pool(k_), _as_pool(v_), table, real.seqlens)
    else:
        call = (tree_attention, args["q"], k_, v_, real.seqlens)
    for backend in _all_backends(torch.device("cpu")):
        with pytest.raises(error, match=match):
            run_with_backend(backend, *call, **scales)


# --------------------------------------------------------------------------------------------------
# The CPU dequantization (the extension's table lookup, and its torch fallback)
# --------------------------------------------------------------------------------------------------
def _require_dequantize_op():
    if not _ext.has_op("dequantize_kv"):
        pytest.skip("the C++ extension (dequantize_kv) is not built")


@pytest.mark.parametrize("kv_dtype", QUANT_KV_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_cpu_dequantization_equals_the_torch_conversion(kv_dtype, dtype, monkeypatch):
    """Every byte value, per-head / one / no scale, a strided cache and ragged lengths: the lookup
    gives ``stored * scale`` rounded once, as the torch path does, and zeros past each length."""
    _require_dequantize_op()
    gen = torch.Generator().manual_seed(0)
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    raw = every[torch.randint(0, 256, (3, 2, 40, 24), generator=gen)]
    cache = raw.view(kv_dtype).transpose(1, 2).contiguous().transpose(1, 2)[..., :20]  # strided, D 20
    lengths = torch.tensor([40, 0, 17])
    for scale in (None, torch.tensor([0.37, 3.1]), torch.tensor(0.05)):
        got = _kv_quant.dequantize(cache, scale, dtype, lengths)
        monkeypatch.setattr(_ext, "has_op", lambda name, device_type="cpu": False)
        want = _kv_quant.dequantize(cache, scale, dtype, lengths)
        monkeypatch.undo()
        assert got.shape == (3, 2, 40, 20) and got.dtype == dtype
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), scale
        assert not got[1].any() and not got[2, :, 17:].any()  # zero past each length


def test_cpu_dequantization_op_checks_its_arguments():
    _require_dequantize_op()
    op = _ext.op("dequantize_kv")
    cache, scale, lengths = (
        torch.zeros(2, 3, 8, 16, dtype=torch.uint8),
        torch.ones(3, dtype=torch.float64),
        torch.tensor([8, 1]),
    )
    assert op(cache, 1, scale, torch.float32, lengths).shape == (2, 3, 8, 16)
    for args, match in [
        ((cache.float(), 1, scale, torch.float32, lengths), "cache must be uint8"),
        ((cache[0], 1, scale, torch.float32, lengths), r"cache must be \[B, H, S, D\]"),
        ((cache, 3, scale, torch.float32, lengths), r"kind must be 0 \(int8\), 1 \(float8_e4m3fn\) or 2"),
        ((cache, 1, scale, torch.int32, lengths), "dtype must be float32, bfloat16, float16 or float64"),
        ((cache, 1, scale[:2], torch.float32, lengths), r"scale must be a CPU tensor \[1 or H=3\]"),
        ((cache, 1, scale[None], torch.float32, lengths), r"scale must be a CPU tensor"),
        ((cache, 1, scale, torch.float32, lengths.float()), "lengths must be int32 or int64"),
        ((cache, 1, scale, torch.float32, lengths[:1]), r"lengths must be \[B=2\]"),
        ((cache, 1, scale, torch.float32, torch.tensor([9, 1])), r"lengths\[0\] = 9 is outside 0..S=8"),
        ((cache, 1, scale, torch.float32, torch.tensor([1, -1])), r"lengths\[1\] = -1 is outside"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            op(*args)


# --------------------------------------------------------------------------------------------------
# The C++ kernel reading 8-bit caches (converting each block of keys as it reads it)
# --------------------------------------------------------------------------------------------------
def _require_quantized_cpp():
    if not _ext.has_op("quantized_tree_attention"):
        pytest.skip("the C++ extension (quantized_tree_attention) is not built")


def _dequantized_then_cpp(q, k, v, seqlens, mask, k_scale, v_scale):
    """What the fused kernel must equal: the cache dequantized (dequantize_kv, the same conversion),
    then the C++ kernel on the q-dtype cache; in float32 for a float16 q whose stored * scale could pass
    65504 (as the route does)."""
    ks, vs = _kv_quant.as_scale("k", k_scale), _kv_quant.as_scale("v", v_scale)
    if q.dtype == torch.float16 and _kv_quant._may_overflow_float16(_kv_quant._KINDS[k.dtype], ks, vs):
        return _dequantized_then_cpp(q.float(), k, v, seqlens, mask, k_scale, v_scale).half()
    lengths = seqlens.long() + q.shape[1]
    kd = _kv_quant.dequantize(k, _kv_quant.as_scale("k", k_scale), q.dtype, lengths)
    vd = _kv_quant.dequantize(v, _kv_quant.as_scale("v", v_scale), q.dtype, lengths)
    return run_with_backend("cpp", tree_attention, q, kd, vd, seqlens, mask)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kv_dtype", QUANT_KV_DTYPES, ids=str)
def test_cpp_reads_8_bit_caches_as_their_dequantized_copy_bit_for_bit(isa, dtype, kv_dtype, monkeypatch):
    """Contiguous and paged (every layout, pages of 1 / 5 / 16), per-head and one-value scales, ragged
    lengths, D 17 and 64: the same bits as the kernel on the dequantized cache, on every instruction-set
    variant."""
    _require_quantized_cpp()
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", isa)
    for seed, (D, kind, mask_fmt) in enumerate([(64, "per_head", "u8"), (17, "scalar", "causal")]):
        real, k, v, k_scale, v_scale = quantized_case(
            3, 6, 4, 2, D, mask_fmt, seed, kv_dtype, kind, prefix_max=150
        )
        q = real.q.to(dtype)
        want = _dequantized_then_cpp(q, k, v, real.seqlens, real.mask, k_scale, v_scale)
        got = run_with_backend(
            "cpp", tree_attention, q, k, v, real.seqlens, real.mask, k_scale=k_scale, v_scale=v_scale
        )
        assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
        for layout, page in [("vllm", 1), ("nhd", 5), ("hnd", 16)]:
            k_pool, v_pool, table = paged_quantized(real, k, v, page, layout, kv_dtype)
            got = run_with_backend(
                "cpp",
                paged_tree_attention,
                q,
                k_pool,
                v_pool,
                table,
                real.seqlens,
                real.mask,
                k_scale=k_scale,
                v_scale=v_scale,
            )
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), f"{layout} page {page}"
            assert torch.equal(got.isnan(), want.isnan()), f"{layout} page {page}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_8_bit_nan_rows_match_the_dequantized_copy(dtype):
    """A NaN byte in a draft token's V: the rare redo of P @ V reads every V row at once, converted."""
    _require_quantized_cpp()
    real, k, v, k_scale, v_scale = quantized_case(2, 6, 4, 2, 32, "bool", 41, E4M3, "per_head")
    for b in range(2):
        v[b, :, int(real.seqlens[b]) + 2, 5] = torch.tensor(float("nan")).to(E4M3)
    q = real.q.to(dtype)
    want = _dequantized_then_cpp(q, k, v, real.seqlens, real.mask, k_scale, v_scale)
    assert want.isnan().any() and not want.isnan().all()
    got = run_with_backend(
        "cpp", tree_attention, q, k, v, real.seqlens, real.mask, k_scale=k_scale, v_scale=v_scale
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_cpp_quantized_op_checks_its_arguments():
    _require_quantized_cpp()
    op = _ext.op("quantized_tree_attention")
    q, kv = torch.zeros(2, 3, 4, 16), torch.zeros(2, 2, 2, 10, 16, dtype=torch.uint8)
    seqlens, one = torch.tensor([2, 7], dtype=torch.int32), torch.ones(1, dtype=torch.float64)
    assert op(q, kv[0], kv[1], None, seqlens, None, 0.25, 1, one, None).shape == (2, 3, 4, 16)
    pool, table = torch.zeros(2, 6, 4, 2, 16, dtype=torch.uint8), torch.tensor([[0, 1], [2, 3]])
    assert op(q, pool[0], pool[1], table, seqlens - 2, None, 0.25, 2, None, one).shape == (2, 3, 4, 16)
    for args, match in [
        (
            (q, kv[0].float(), kv[1].float(), None, seqlens, None, 0.25, 1, None, None),
            r"passed as their bytes \(uint8\)",
        ),
        ((q, kv[0], kv[1], None, seqlens, None, 0.25, 3, None, None), r"kind must be 0 \(int8\)"),
        ((q, kv[0], kv[1], None, seqlens + 1, None, 0.25, 1, None, None), "must fit S_max=10"),
        (
            (q, kv[0], kv[1], None, seqlens, None, 0.25, 1, torch.ones(3, dtype=torch.float64), None),
            r"k_scale must be a CPU tensor \[\], \[1\] or \[Hkv=2\]",
        ),
        (
            (q, pool[0], pool[1], table + 4, seqlens - 2, None, 0.25, 1, None, None),
            r"block_table\[1, 0\] = 6 is not a block",
        ),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            op(*args)


@pytest.mark.parametrize("kv_dtype", [E4M3, torch.float32], ids=str)
def test_bad_lengths_are_refused_on_every_route(kv_dtype):
    """8-bit caches (the C++ op checks them) and scaled q-dtype caches (dequantized in Python first,
    where the lengths size the copies): a length past the cache raises, by name, on every backend."""
    real, k, v, _, _ = quantized_case(2, 5, 4, 2, 16, "causal", 23, E4M3, "none")
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    too_long = real.seqlens.clone()
    too_long[1] = k.shape[2] - 4
    S = k.shape[2]
    table = torch.arange(2 * S, dtype=torch.int32).view(2, S)
    for backend in _all_backends(torch.device("cpu")):
        with pytest.raises(ValueError, match=r"cache_seqlens \+ T \(T=5\) must fit"):
            run_with_backend(backend, tree_attention, real.q.float(), k, v, too_long, k_scale=0.5)
        with pytest.raises(ValueError, match=r"cache_seqlens \+ T \(T=5\) must fit"):
            run_with_backend(
                backend,
                paged_tree_attention,
                real.q.float(),
                _as_pool(k),
                _as_pool(v),
                table,
                too_long,
                k_scale=0.5,
            )


def test_cpp_mixed_scale_kinds_and_a_head_dim_stride_equal_the_dequantized_copy():
    """A one-value K scale with per-head V scales (and the reverse), and a cache whose head dim is
    strided (the conversion's strided loop): the fused kernel equals the dequantized copy bit for bit."""
    _require_quantized_cpp()
    real, k, v, _, _ = quantized_case(2, 5, 4, 2, 32, "bool", 29, E4M3, "none", prefix_max=140)
    wide = torch.zeros(2, *k.shape[:3], 2 * k.shape[3], dtype=torch.uint8)
    wide[..., ::2] = torch.stack([k, v]).view(torch.uint8)
    k_strided, v_strided = wide[0, ..., ::2].view(E4M3), wide[1, ..., ::2].view(E4M3)
    assert k_strided.stride(-1) == 2
    for k_scale, v_scale in [
        (torch.tensor(0.5), torch.tensor([0.25, 3.0])),
        (torch.tensor([2.0, 0.75]), 1.5),
    ]:
        for kk, vv in [(k, v), (k_strided, v_strided)]:
            want = _dequantized_then_cpp(real.q.float(), kk, vv, real.seqlens, real.mask, k_scale, v_scale)
            got = run_with_backend(
                "cpp",
                tree_attention,
                real.q.float(),
                kk,
                vv,
                real.seqlens,
                real.mask,
                k_scale=k_scale,
                v_scale=v_scale,
            )
            assert torch.equal(got, want)


def test_cpp_float16_q_does_not_overflow_where_stored_times_scale_passes_65504():
    """float16 q: a stored value times its scale past 65504 (e5m2's 57344 x 1.2) would be inf once
    converted to q's dtype; the route computes in float32 then, and stays finite like the reference
    (found in review)."""
    _require_quantized_cpp()
    real, k, v, _, _ = quantized_case(
        1, 3, 2, 1, 16, "causal", 31, E5M2, "none", prefix_max=10, first_prefix=10
    )
    k.zero_()
    v.zero_()
    v[0, 0, :13] = torch.tensor(2.0).to(E5M2)
    v[0, 0, 4, 0] = torch.tensor(57344.0).to(E5M2)
    q = torch.zeros(1, 3, 2, 16, dtype=torch.float16)
    want = tree_attention_ref(q.double(), k.double(), v.double(), real.seqlens, None, None, 1.2, 2.0)
    for backend in _all_backends(torch.device("cpu")):
        got = run_with_backend(
            "cpp" if backend == "cpp" else backend,
            tree_attention,
            q,
            k,
            v,
            real.seqlens,
            k_scale=1.2,
            v_scale=2.0,
        )
        assert torch.isfinite(got).all(), backend
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=1e-3, msg=backend)


def test_cpp_quantized_op_refuses_bad_scale_values_itself():
    """Called directly (torch.ops.eagle_C), the op checks its scales' dtype and values (found in review:
    NaN, zero, negative and integer scales went through)."""
    _require_quantized_cpp()
    op = _ext.op("quantized_tree_attention")
    q, kv = torch.zeros(2, 3, 4, 16), torch.zeros(2, 2, 2, 10, 16, dtype=torch.uint8)
    seqlens = torch.tensor([2, 7], dtype=torch.int32)
    for scale, error, match in [
        (torch.tensor([float("nan")]), ValueError, "k_scale must be finite and > 0"),
        (torch.tensor([0.0]), ValueError, "k_scale must be finite and > 0"),
        (torch.tensor([1.0, -1.0]), ValueError, "k_scale must be finite and > 0, got -1 at 1"),
        (torch.tensor([float("inf")]), ValueError, "k_scale must be finite"),
        (torch.ones(1, dtype=torch.int32), TypeError, "k_scale must be a floating tensor"),
        (torch.ones(1, dtype=torch.complex64), TypeError, "k_scale must be a floating tensor"),
    ]:
        with pytest.raises(error, match=match):
            op(q, kv[0], kv[1], None, seqlens, None, 0.25, 1, scale, None)
