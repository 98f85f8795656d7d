"""tree_attention: reference vs a float64 per-sequence oracle, every backend vs the reference.

Every case poisons the cache positions after each sequence's window (``cache_seqlens[b] + T ..``)
with NaN, so a backend that reads them fails. Triton runs through the interpreter on CPU: its cases
are kept tiny.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton

import eagle_kernels
from eagle_kernels import pack_tree_mask, tree_attention, tree_attention_ref, unpack_tree_mask
from eagle_kernels.tree_attention import LaunchConfig, _tree_attention_triton, plan_launch
from tests.kernels.helpers import (
    FP32_RTOL,
    assert_close_lowp,
    backends_for,
    compile_like_jit,
    record_tree_attention_launches,
    require_jit_specialisation,
    run_with_backend,
    run_without_interpreter,
)
from tests.kernels.random_trees import random_trees, trees_from_parents

OP = "tree_attention"
ta_module = sys.modules["eagle_kernels.tree_attention"]  # the name is shadowed by the function
MASK_FORMATS = ("causal", "bool", "u8", "i32")
LOWP = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Cases and the oracle
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor  # view kv[1, 0] of a [layers, 2, B, Hkv, S, D] buffer
    v: torch.Tensor
    seqlens: torch.Tensor
    mask: torch.Tensor | None  # in the format under test
    mask_bool: torch.Tensor  # [B, T, T], what `mask` means

    def args(self):
        return self.q, self.k, self.v, self.seqlens, self.mask

    def to(self, dtype=None, device=None):
        def conv(t, floating):
            t = t.to(device) if device is not None else t
            return t.to(dtype) if (floating and dtype is not None) else t

        kv = torch.stack([self.k, self.v])  # rebuild a strided layer view in the new dtype/device
        kv = conv(kv, True)
        mask = None if self.mask is None else conv(self.mask, False)
        return Case(conv(self.q, True), kv[0], kv[1], conv(self.seqlens, False), mask, self.mask_bool)


def tree_masks(B: int, T: int, seed: int) -> torch.Tensor:
    """EAGLE-style trees: each token sees itself and its ancestors (random parent arrays)."""
    return random_trees(B, T, max_depth=max(1, min(T - 1, 6)), seed=seed).mask


def make_case(
    B, T, Hq, Hkv, D, mask_fmt, seed, *, prefix_max=40, dtype=torch.float64, spare=3, first_prefix=None
) -> Case:
    """Random case; ``first_prefix`` fixes sequence 0's prefix length (the others stay random)."""
    gen = torch.Generator().manual_seed(seed)
    seqlens = torch.randint(0, prefix_max + 1, (B,), generator=gen, dtype=torch.int32)
    if first_prefix is not None:
        seqlens[0] = first_prefix
    S = int(seqlens.max()) + T + spare
    kv = torch.randn(2, 2, B, Hkv, S, D, generator=gen, dtype=torch.float64)
    for b in range(B):
        kv[:, :, b, :, int(seqlens[b]) + T :] = float("nan")  # never written, never to be read
    q = torch.randn(B, T, Hq, D, generator=gen, dtype=torch.float64)
    if mask_fmt == "causal":
        mask_bool = torch.tril(torch.ones(T, T, dtype=torch.bool)).expand(B, T, T)
        mask = None
    else:
        mask_bool = tree_masks(B, T, seed)
        mask = mask_bool if mask_fmt == "bool" else pack_tree_mask(mask_bool, mask_fmt)
    kv = kv.to(dtype)
    return Case(q.to(dtype), kv[1, 0], kv[1, 1], seqlens, mask, mask_bool)


def oracle(case: Case, sm_scale: float | None = None) -> torch.Tensor:
    """float64 attention spelled out per sequence: keys 0..s+T-1, prefix visible, new tokens masked."""
    q, k, v = case.q.double(), case.k.double(), case.v.double()
    B, T, Hq, D = q.shape
    G = Hq // k.shape[1]
    scale = D**-0.5 if sm_scale is None else sm_scale
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    for b in range(B):
        s = int(case.seqlens[b])
        keys = k[b, :, : s + T].repeat_interleave(G, dim=0)  # [Hq, s+T, D]
        vals = v[b, :, : s + T].repeat_interleave(G, dim=0)
        visible = torch.cat([torch.ones(T, s, dtype=torch.bool), case.mask_bool[b]], dim=1)  # [T, s+T]
        scores = torch.einsum("thd,hpd->htp", q[b], keys) * scale
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        out[b] = torch.einsum("htp,hpd->thd", probs, vals)
    return out


def torch_lowp(case: Case) -> torch.Tensor:
    """The same math done by PyTorch in the low-precision dtype (the yardstick of DESIGN §6)."""
    B, T, Hq, D = case.q.shape
    G = Hq // case.k.shape[1]
    out = torch.zeros_like(case.q)
    for b in range(B):
        s = int(case.seqlens[b])
        keys = case.k[b, :, : s + T].repeat_interleave(G, dim=0)
        vals = case.v[b, :, : s + T].repeat_interleave(G, dim=0)
        visible = torch.cat([torch.ones(T, s, dtype=torch.bool), case.mask_bool[b]], dim=1).to(out.device)
        scores = (case.q[b].transpose(0, 1) @ keys.transpose(1, 2)) * D**-0.5
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[b] = (probs @ vals).transpose(0, 1)
    return out


def assert_matches(out: torch.Tensor, case: Case, want64: torch.Tensor, what: str) -> None:
    assert out.shape == case.q.shape and out.dtype == case.q.dtype, what
    assert out.is_contiguous(), what
    if out.dtype in LOWP:
        assert_close_lowp(out.cpu(), want64, torch_lowp(case).cpu())
        return
    rtol = FP32_RTOL if out.dtype == torch.float32 else 1e-10
    scale = want64.abs().max().item()
    torch.testing.assert_close(out.cpu().double(), want64, rtol=rtol, atol=rtol * scale, msg=what)


def random_shape(gen: torch.Generator, *, t_choices, d_choices, groups=(1, 2, 4, 8)):
    pick = lambda xs: xs[int(torch.randint(0, len(xs), (1,), generator=gen))]
    Hkv = pick((1, 2))
    return (
        int(torch.randint(1, 5, (1,), generator=gen)),  # B
        pick(t_choices),  # T
        Hkv * pick(groups),  # Hq
        Hkv,
        pick(d_choices),  # D
    )


def _amx_tiles_granted() -> bool:
    """AMX-BF16 tiles usable by the extension (CPU flags and the OS's permission)."""
    from eagle_kernels import _ext

    # (no extension: has_op is False and the cpp tests skip anyway; a broken probe op must fail
    # loudly here, not read as "this CPU lacks AMX" and skip 24 tests)
    return _ext.has_op("amx_linear_bf16") and bool(torch.ops.eagle_C.amx_bf16_available())


def isa_params():
    """CPU instruction-set variants of the C++ kernel runnable on this machine."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        flags = []
    have = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags), "avx2": "avx2" in flags}
    have["amx"] = have["avx512"] and _amx_tiles_granted()
    have["avx512bf16"] = have["avx512"] and "avx512_bf16" in flags
    params = []
    for isa in ("amx", "avx512bf16", "avx512", "avx2", "generic"):
        ok = have.get(isa, True)
        params.append(pytest.param(isa, marks=() if ok else pytest.mark.skip(reason=f"CPU lacks {isa}")))
    return params


def _amx_available() -> bool:
    return "amx" in [p.values[0] for p in isa_params() if not p.marks]


# --------------------------------------------------------------------------------------------------
# Mask formats
# --------------------------------------------------------------------------------------------------
def test_pack_tree_mask_known_bits():
    mask = torch.zeros(1, 40, 40, dtype=torch.bool)
    mask[0, 0, [0, 3, 9]] = True
    mask[0, 1, [31, 32, 39]] = True
    u8 = pack_tree_mask(mask, "u8")
    i32 = pack_tree_mask(mask, "i32")
    assert u8.dtype == torch.uint8 and u8.shape == (1, 40, 5)
    assert i32.dtype == torch.int32 and i32.shape == (1, 40, 2)
    assert u8[0, 0].tolist() == [0b1001, 0b10, 0, 0, 0]
    assert u8[0, 1].tolist() == [0, 0, 0, 0x80, 0x81]
    assert i32[0, 0].tolist() == [1 + 8 + 512, 0]
    assert i32[0, 1].tolist() == [-(2**31), 1 + 128]  # bit 31 is the int32 sign bit
    assert not u8[0, 2:].any() and not i32[0, 2:].any()


@pytest.mark.parametrize("T", [1, 7, 8, 9, 31, 32, 33, 64, 70])
@pytest.mark.parametrize("fmt", ["u8", "i32"])
def test_pack_unpack_roundtrip(T, fmt):
    mask = torch.rand(3, T, T, generator=torch.Generator().manual_seed(T)) < 0.5
    packed = pack_tree_mask(mask, fmt)
    assert packed.shape[-1] == math.ceil(T / (8 if fmt == "u8" else 32))
    assert torch.equal(unpack_tree_mask(packed, T), mask)


def test_unpack_ignores_bits_past_T():
    packed = torch.full((1, 5, 1), 0xFF, dtype=torch.uint8)
    assert unpack_tree_mask(packed, 5).all()
    packed32 = torch.full((1, 5, 1), -1, dtype=torch.int32)
    assert unpack_tree_mask(packed32, 5).all()
    wide = torch.full((1, 5, 4), 0xFF, dtype=torch.uint8)  # SGLang's whole 4-byte words
    assert unpack_tree_mask(wide, 5).all()
    assert unpack_tree_mask(wide, torch.tensor(5)).shape == (1, 5, 5)  # an integer of another type


@pytest.mark.parametrize("fmt,T,width", [("u8", 5, 3), ("u8", 20, 4), ("i32", 37, 3), ("i32", 9, 2)])
def test_packed_rows_wider_than_T_needs(device, fmt, T, width):
    """Packed rows from a buffer sized for a larger tree (TensorRT-LLM's int32 words for its maximum
    draft length, SGLang's whole words): the words past ceil(T/bits) are never read, whatever bits
    they hold, on every backend."""
    case = make_case(2, T, 4, 2, 16, fmt, seed=T).to(torch.float32, device)
    exact = case.mask
    wide = torch.full((2, T, width), -1 if fmt == "i32" else 0xFF, dtype=exact.dtype, device=device)
    wide[..., : exact.shape[2]] = exact
    args = case.args()[:4]
    for backend in _all_backends(device):
        want = run_with_backend(backend, tree_attention, *args, exact)
        got = run_with_backend(backend, tree_attention, *args, wide)
        assert torch.equal(got, want), backend


def test_an_empty_batch_takes_any_tree_length():
    """T > S_max is refused as a shape (the unchecked kernel read past the cache), but an empty batch
    reads nothing: it returns its empty output as before."""
    q, k = torch.randn(0, 9, 2, 16), torch.randn(0, 1, 8, 16)
    for backend in _all_backends(torch.device("cpu")):
        out = run_with_backend(backend, tree_attention, q, k, k, torch.zeros(0, dtype=torch.int32))
        assert out.shape == (0, 9, 2, 16), backend


@pytest.mark.parametrize(
    "mask, T, error, match",
    [
        (torch.zeros(2, 20, 2, dtype=torch.uint8), 20, ValueError, r"\[B, T, >= 3\] with T=20"),
        (torch.zeros(2, 12, 1, dtype=torch.int32), 11, ValueError, r"\[B, T, >= 1\] with T=11"),
        (torch.zeros(2, 12, 1, dtype=torch.int64), 12, TypeError, "tree_mask must have dtype"),
        (torch.zeros(2, 12, 12), 12, TypeError, "tree_mask must have dtype"),
        (torch.zeros(2, 12, 11, dtype=torch.bool), 12, ValueError, r"\[B, T, T\] with T=12"),
        (torch.zeros(12, 12, dtype=torch.bool), 12, ValueError, "3 dimensions"),
        (torch.zeros(2, 12, 12, dtype=torch.bool), -1, ValueError, "T must be an int >= 0"),
    ],
)
def test_unpack_rejects_a_mask_it_would_misread(mask, T, error, match):
    """A packed width short of T read past the row (a bare IndexError), and an int64 or float mask was
    decoded as 32-bit words into a wrong mask without a word of warning."""
    with pytest.raises(error, match=match):
        unpack_tree_mask(mask, T)


# --------------------------------------------------------------------------------------------------
# Reference vs oracle
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_fmt", MASK_FORMATS)
@pytest.mark.parametrize(
    "B,T,Hq,Hkv,D",
    [(1, 1, 1, 1, 16), (3, 7, 4, 2, 40), (2, 13, 8, 1, 64), (4, 5, 8, 8, 128), (2, 64, 4, 2, 16)],
)
def test_reference_matches_oracle(B, T, Hq, Hkv, D, mask_fmt):
    case = make_case(B, T, Hq, Hkv, D, mask_fmt, seed=B * 100 + T)
    want = oracle(case)
    assert_matches(tree_attention_ref(*case.args()), case, want, "float64 reference")
    case32 = case.to(torch.float32)
    assert_matches(tree_attention_ref(*case32.args()), case32, want, "float32 reference")


def test_reference_prefix_zero_and_custom_scale():
    case = make_case(3, 9, 4, 2, 32, "bool", seed=5, prefix_max=0)
    assert int(case.seqlens.max()) == 0
    assert_matches(tree_attention_ref(*case.args(), sm_scale=0.3), case, oracle(case, 0.3), "prefix 0")


def test_reference_matches_sdpa_for_causal_prefill():
    """Independent cross-check: with an empty prefix and no mask this is causal attention."""
    case = make_case(2, 11, 4, 2, 16, "causal", seed=9, prefix_max=0)
    q = case.q.transpose(1, 2)
    k, v = case.k[:, :, :11], case.v[:, :, :11]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(tree_attention_ref(*case.args()), want.transpose(1, 2), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# C++ kernel vs the reference
# --------------------------------------------------------------------------------------------------
def _require(backend: str, device: torch.device):
    if backend not in backends_for(OP, device):
        pytest.skip(f"backend {backend} is unavailable for {OP} on {device.type}")


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpp_matches_reference_fuzzed(isa, dtype, monkeypatch):
    _require("cpp", torch.device("cpu"))
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", isa)
    for seed in range(16):
        gen = torch.Generator().manual_seed(seed)
        B, T, Hq, Hkv, D = random_shape(
            gen, t_choices=(1, 1, 2, 5, 8, 17, 33, 64, 100), d_choices=(16, 40, 64, 128)
        )
        fmt = MASK_FORMATS[seed % 4]
        case = make_case(B, T, Hq, Hkv, D, fmt, seed, prefix_max=(0, 3, 70, 150)[seed % 4]).to(dtype)
        want = oracle(case)
        got = run_with_backend("cpp", tree_attention, *case.args())
        assert_matches(got, case, want, f"cpp/{isa} seed={seed} shape={(B, T, Hq, Hkv, D)} mask={fmt}")


@pytest.mark.parametrize("D", [32, 96, 128, 256])
def test_cpp_amx_scores_match_reference(D, monkeypatch):
    """The AMX score path (bf16, head dims a multiple of 32): 1-4 B tiles of query rows (up to 64
    rows per task, ragged last group), 1-8 dim tiles, ragged last key block ending exactly at the
    cache's end (its rows past the block must not be read: the tail is NaN and lies outside S_max)."""
    _require("cpp", torch.device("cpu"))
    if not _amx_available():
        pytest.skip("CPU (or OS) offers no AMX-BF16 tiles")
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", "amx")
    for seed, (B, T, Hq, Hkv) in enumerate([(1, 1, 2, 1), (2, 17, 4, 2), (3, 40, 8, 1), (1, 16, 8, 2)]):
        fmt = MASK_FORMATS[seed % 4]
        case = make_case(B, T, Hq, Hkv, D, fmt, seed, prefix_max=(5, 77, 150, 30)[seed], spare=0)
        case = case.to(torch.bfloat16)
        got = run_with_backend("cpp", tree_attention, *case.args())
        assert_matches(got, case, oracle(case), f"amx D={D} shape={(B, T, Hq, Hkv)} mask={fmt}")


def test_cpp_strided_inputs():
    """q from a fused projection, a cache whose head dim is not contiguous, an int32 mask slice."""
    _require("cpp", torch.device("cpu"))
    case = make_case(2, 6, 4, 2, 24, "i32", seed=11)
    fused = torch.randn(2, 6, 3 * 4 * 24, dtype=torch.float64)
    fused[..., : 4 * 24] = case.q.reshape(2, 6, -1)
    q = fused[..., : 4 * 24].view(2, 6, 4, 24)
    k_t = case.k.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1
    assert not q.is_contiguous() and k_t.stride(-1) != 1
    want = oracle(case)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        c = Case(q.to(dtype), k_t.to(dtype), case.v.to(dtype), case.seqlens, case.mask, case.mask_bool)
        for backend in ["torch", "cpp"]:
            got = run_with_backend(backend, tree_attention, *c.args())
            assert_matches(got, c, want, f"{backend} {dtype}")


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq, Hkv, D", [(4, 2, 64), (8, 2, 40), (3, 3, 16)])
def test_cpp_block_rows_equal_one_token_steps(isa, dtype, Hq, Hkv, D, monkeypatch):
    """Each row of a verified chain gets, bit for bit, what a one-token decoding step computes for
    that token: a row's output does not depend on how many rows share its block or its task (up to 1,
    4-row groups, 64 rows per task and several tasks). The decoding loop relies on it for greedy
    output equal to plain decoding's in float32 and bfloat16, not only up to rounding."""
    _require("cpp", torch.device("cpu"))
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(Hq * 100 + D)
    B, T, prefix = 2, 37, (150, 61)
    S = max(prefix) + T + 3
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype)
    seqlens = torch.tensor(prefix, dtype=torch.int32)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool)).expand(B, T, T)
    blocks = {
        "causal": run_with_backend("cpp", tree_attention, q, k, v, seqlens, None),
        "bool mask": run_with_backend("cpp", tree_attention, q, k, v, seqlens, causal),
    }
    for t in range(T):
        step = run_with_backend("cpp", tree_attention, q[:, t : t + 1], k, v, seqlens + t, None)
        for name, block in blocks.items():
            assert torch.equal(block[:, t : t + 1], step), f"{name} block row {t} != its one-token step"
    for start, stop in ((0, 2), (5, 13), (1, 37)):  # other sub-blocks of the same chain
        sub = run_with_backend("cpp", tree_attention, q[:, start:stop], k, v, seqlens + start, None)
        assert torch.equal(sub, blocks["causal"][:, start:stop]), f"sub-block {start}:{stop}"


def _assert_tree_rows_equal_decoding(tree, q, k, v, prefix: int, mask: torch.Tensor, what: str) -> None:
    """Each row i of ``tree`` (one sequence, T tokens after a ``prefix``-key cache, ancestor ``mask``
    [1, T, T]) equals, bit for bit, token i decoded alone once its path is committed: the prefix, then
    its ancestors and itself at consecutive positions (caches keep k's and v's layouts)."""
    for i in range(q.shape[1]):
        path = mask[0, i].nonzero()[:, 0]  # ancestors and i, in slot order
        order = torch.cat((torch.arange(prefix), prefix + path))
        k_path, v_path = torch.zeros_like(k), torch.zeros_like(v)
        k_path[:, :, : order.numel()], v_path[:, :, : order.numel()] = k[:, :, order], v[:, :, order]
        n = torch.tensor([order.numel() - 1], dtype=torch.int32)
        decoded = run_with_backend("cpp", tree_attention, q[:, i : i + 1], k_path, v_path, n, None)
        assert torch.equal(tree[:, i : i + 1], decoded), f"{what} slot {i} (path {path.tolist()})"


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq, Hkv, D", [(4, 2, 64), (8, 2, 40)])
def test_cpp_tree_rows_equal_decoding_along_their_path(isa, dtype, Hq, Hkv, D, monkeypatch):
    """A token of a verified tree sees its ancestors at their slots of the block; decoded alone after
    its path was committed, it sees the same keys at consecutive positions. Both give the same output
    bit for bit: the softmax's max is over the whole row and its sums run key by key in order, so
    neither the keys' positions (lanes, blocks of 128) nor the masked keys between them matter."""
    _require("cpp", torch.device("cpu"))
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(D)
    T, prefix = 30, 120  # the tree crosses the 128-key block boundary
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, T)]
    mask = trees_from_parents([parents]).mask
    S = prefix + T + 2
    k = torch.randn(1, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(1, Hkv, S, D, generator=gen).to(dtype)
    q = torch.randn(1, T, Hq, D, generator=gen).to(dtype)
    seqlens = torch.tensor([prefix], dtype=torch.int32)
    tree = run_with_backend("cpp", tree_attention, q, k, v, seqlens, mask)
    assert parents[1:].count(0) < T - 1, "the tree should branch below the root"
    _assert_tree_rows_equal_decoding(tree, q, k, v, prefix, mask, "tree")


@pytest.mark.parametrize("Hq, Hkv, D", [(6, 2, 64), (4, 4, 128), (2, 1, 32), (3, 1, 96)])
def test_cpp_amx_pv_tree_rows_equal_decoding(Hq, Hkv, D, monkeypatch):
    """AMX P @ V (bf16 caches, D % 32 == 0). A tile product's sum over its 32 keys depends on where the
    zero probabilities sit in the block, so a tree row takes its visible new keys packed right after
    the committed prefix, block-aligned as the same token decoded alone sees them. Prefixes at and
    around multiples of 32 (the packed part starts at the last one; 0: nothing shared; 1100: the shared
    part in three chunks of 512 keys), GQA groups of 1-3 (a token's rows straddling 16-row tiles and
    64-row tasks), 1-2 passes of 4 dim tiles, a V cache strided along D: every tree row equals its decoded path bit for bit, the whole output the
    reference within bf16 tolerance, and a chain's rows their one-token steps."""
    _require("cpp", torch.device("cpu"))
    if not _amx_available():
        pytest.skip("CPU (or OS) offers no AMX-BF16 tiles")
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", "amx")
    for case_no, (prefix, T) in enumerate(((0, 7), (31, 30), (32, 30), (64, 12), (95, 40), (1100, 20))):
        gen = torch.Generator().manual_seed(100 * D + case_no)
        parents = [-1] + [int(torch.randint(max(0, i - 4), i, (1,), generator=gen)) for i in range(1, T)]
        mask = trees_from_parents([parents]).mask
        S = prefix + T + 2
        kv = torch.randn(2, 1, Hkv, S, D, generator=gen).to(torch.bfloat16)
        k, v = kv[0], kv[1]
        if case_no % 2:  # V strided along D (read element by element when packed)
            v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
        q = torch.randn(1, T, Hq, D, generator=gen).to(torch.bfloat16)
        seqlens = torch.tensor([prefix], dtype=torch.int32)
        tree = run_with_backend("cpp", tree_attention, q, k, v, seqlens, mask)
        case = Case(q, k, v, seqlens, mask, mask)
        assert_matches(tree, case, oracle(case), f"amx pv prefix={prefix} T={T}")
        _assert_tree_rows_equal_decoding(tree, q, k, v, prefix, mask, f"prefix={prefix}")
        chain = run_with_backend("cpp", tree_attention, q, k, v, seqlens, None)
        for t in (0, T // 2, T - 1):
            step = run_with_backend("cpp", tree_attention, q[:, t : t + 1], k, v, seqlens + t, None)
            assert torch.equal(chain[:, t : t + 1], step), f"prefix={prefix} chain row {t}"


def test_cpp_amx_pv_wide_trees_equal_decoding_bit_for_bit(monkeypatch):
    """The bf16 output hides most of the tile sums' last bits, so a wrong block layout shows only now
    and then: with every tree row's keys left in place (zeros between them), 47 of 5.2M outputs of
    these shapes differed from decoding (measured). Ten 64-token trees over Llama-7B-like heads
    (2.6M outputs) must all equal their decoded paths."""
    _require("cpp", torch.device("cpu"))
    if not _amx_available():
        pytest.skip("CPU (or OS) offers no AMX-BF16 tiles")
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", "amx")
    Hq, Hkv, D, T = 32, 8, 128, 64
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        prefix = 100 + 7 * seed
        mask = random_trees(1, T, max_depth=12, seed=seed).mask
        k = torch.randn(1, Hkv, prefix + T, D, generator=gen).to(torch.bfloat16)
        v = torch.randn(1, Hkv, prefix + T, D, generator=gen).to(torch.bfloat16)
        q = (3 * torch.randn(1, T, Hq, D, generator=gen)).to(torch.bfloat16)  # peaked softmaxes
        seqlens = torch.tensor([prefix], dtype=torch.int32)
        tree = run_with_backend("cpp", tree_attention, q, k, v, seqlens, mask)
        _assert_tree_rows_equal_decoding(tree, q, k, v, prefix, mask, f"seed {seed}")


def test_cpp_long_cache_splits_rows_within_the_score_budget():
    """A task keeps every score of its rows (4 MB budget): over ~70k keys it takes a few rows at a time.
    The result still matches the reference, and each row still equals its one-token call."""
    _require("cpp", torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    B, T, Hq, Hkv, D, prefix = 1, 8, 2, 1, 16, 70_000
    k = torch.randn(B, Hkv, prefix + T, D, generator=gen)
    v = torch.randn(B, Hkv, prefix + T, D, generator=gen)
    q = torch.randn(B, T, Hq, D, generator=gen)
    seqlens = torch.tensor([prefix], dtype=torch.int32)
    got = run_with_backend("cpp", tree_attention, q, k, v, seqlens, None)
    want = tree_attention_ref(q.double(), k.double(), v.double(), seqlens)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for t in (0, 5):
        step = run_with_backend("cpp", tree_attention, q[:, t : t + 1], k, v, seqlens + t, None)
        assert torch.equal(got[:, t : t + 1], step)


# --------------------------------------------------------------------------------------------------
# Triton kernels vs the reference (interpreter on CPU: tiny sizes)
# --------------------------------------------------------------------------------------------------
def _triton_sizes(device: torch.device):
    if device.type == "cuda":
        return dict(t_choices=(1, 5, 16, 33, 64, 100), d_choices=(16, 40, 64, 80, 128, 256)), 70, 24
    return dict(t_choices=(1, 3, 6), d_choices=(16, 24)), 20, 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference_fuzzed(device, dtype):
    _require("triton", device)
    sizes, prefix_max, seeds = _triton_sizes(device)
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        B, T, Hq, Hkv, D = random_shape(
            gen, groups=(1, 2, 4, 8) if device.type == "cuda" else (1, 4), **sizes
        )
        fmt = MASK_FORMATS[seed % 4]
        case = make_case(B, T, Hq, Hkv, D, fmt, seed, prefix_max=prefix_max).to(dtype, device)
        got = run_with_backend("triton", tree_attention, *case.args())
        assert_matches(got, case, oracle(case.to(device="cpu")), f"triton seed={seed} mask={fmt}")


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_triton_split_prefix_matches_reference(device, num_splits):
    """The flash-decoding variant: prefix chunks per program plus the combine kernel; with 7 splits
    of a short prefix some splits are empty."""
    _require("triton", device)
    for fmt in ("causal", "u8"):
        case = make_case(3, 2, 4, 2, 16, fmt, seed=num_splits, prefix_max=40).to(torch.float32, device)
        got = _tree_attention_triton(*case.args(), 16**-0.5, LaunchConfig(num_splits=num_splits))
        assert_matches(got, case, oracle(case.to(device="cpu")), f"splits={num_splits} mask={fmt}")


def test_triton_long_tree_and_gqa8(device):
    """T=64 (one full query block), and the 8-head group packed into the query block."""
    _require("triton", device)
    for B, T, Hq, Hkv in [(1, 64, 1, 1), (2, 4, 8, 1)]:
        case = make_case(B, T, Hq, Hkv, 16, "i32", seed=T, prefix_max=10).to(torch.float32, device)
        got = run_with_backend("triton", tree_attention, *case.args())
        assert_matches(got, case, oracle(case.to(device="cpu")), f"triton T={T} G={Hq // Hkv}")


def test_plan_launch_heuristic():
    sms = 132
    decode = plan_launch(B=1, Hkv=8, T=1, G=4, S_max=4096, D=128, num_sms=sms)
    assert decode.num_splits > 1, "batch 1 with a long prefix must split the prefix"
    assert decode.num_splits * 8 >= 0.9 * sms, "the split grid should fill (about) every SM"
    assert decode.chunk % decode.block_n == 0 and decode.chunk * decode.num_splits >= 4096
    busy = plan_launch(B=32, Hkv=8, T=64, G=4, S_max=2112, D=128, num_sms=sms)
    assert busy.num_splits == 1, "enough (row block, sequence, head) programs: no split needed"
    short = plan_launch(B=1, Hkv=1, T=1, G=1, S_max=100, D=64, num_sms=sms)
    assert short.num_splits == 1, "a short cache is not worth splitting"
    assert plan_launch(B=1, Hkv=1, T=1, G=1, S_max=10**6, D=64, num_sms=sms).num_splits <= 64


GOAL_SHAPES = {f"tree64-B{B}": dict(B=B, Hkv=8, T=64, G=4, S_max=2048 + 64 + 16, D=128) for B in (1, 8, 32)}


def test_plan_launch_goal_shapes():
    """Issue 3's shapes (32 query / 8 kv heads of 128, prefix 2048, T = 64) on a 132-SM H100/H200."""
    plans = {name: plan_launch(**dims, num_sms=132) for name, dims in GOAL_SHAPES.items()}
    for plan in plans.values():
        assert plan.block_m == 128 and plan.num_warps == 8, "256 rows per kv head: 128-row blocks, 8 warps"
        assert plan.num_stages >= 2, "the prefix loop is software-pipelined"
    tree16 = plan_launch(B=8, Hkv=8, T=16, G=4, S_max=2048 + 16 + 16, D=128, num_sms=132)
    assert (tree16.block_m, tree16.num_warps) == (64, 4), "64 x 128 accumulators: 4 warps (measured faster)"
    assert plan_launch(B=8, Hkv=8, T=16, G=4, S_max=2080, D=256, num_sms=132).num_warps == 8
    assert plans["tree64-B8"].num_stages == plans["tree64-B32"].num_stages == 4, "whole-prefix 128-row blocks"
    assert plans["tree64-B1"].num_stages == 3, "a split program's few tiles"
    assert plan_launch(B=32, Hkv=8, T=64, G=4, S_max=2128, D=256, num_sms=132).num_stages == 2
    fp32 = plan_launch(**GOAL_SHAPES["tree64-B32"], num_sms=132, elem_size=4)
    # fp32 at D = 128: the rule measured at D = 64 (FP32_BLOCK_M), pinned here, not measured here
    assert (fp32.block_m, fp32.num_warps, fp32.num_stages) == (16, 4, 2), "fp32: FMA dots, small blocks"
    # The bundled target's tree and step in fp32 (H200, 16-row blocks: the tree 15.0 us with 3 chunks of
    # 128, the best tried, against 1285 us for the 16-bit plan; the step 10.2 us with 4 chunks of 64
    # against 19.5): the short prefix split into chunks of 64-128 positions.
    tiny_tree = plan_launch(B=1, Hkv=2, T=64, G=2, S_max=320, D=64, num_sms=132, elem_size=4)
    tiny_step = plan_launch(B=1, Hkv=2, T=1, G=2, S_max=256, D=64, num_sms=132, elem_size=4)
    for plan in (tiny_tree, tiny_step):
        assert (plan.block_m, plan.num_warps, plan.num_stages) == (16, 4, 2)
        assert 64 <= plan.chunk <= 128 and (plan.num_splits - 1) * plan.chunk < 320
    assert tiny_step.num_splits == 4
    bf16_tiny = plan_launch(B=1, Hkv=2, T=64, G=2, S_max=320, D=64, num_sms=132)
    assert (bf16_tiny.block_m, bf16_tiny.num_splits) == (128, 1), "16-bit caches keep tensor-core blocks"
    b1 = plans["tree64-B1"]
    assert b1.num_splits > 1, "16 (row block, kv head) programs cannot fill 132 SMs without a split"
    assert 0.8 * 132 <= 2 * 8 * b1.num_splits <= 132, "one wave of split programs"
    assert (b1.num_splits - 1) * b1.chunk < GOAL_SHAPES["tree64-B1"]["S_max"], (
        "no split starts past the cache"
    )
    assert plans["tree64-B8"].num_splits == 1 and plans["tree64-B32"].num_splits == 1


def test_plan_launch_honours_config():
    dims = GOAL_SHAPES["tree64-B8"]
    cfg = LaunchConfig(block_m=64, block_n=32, num_warps=4, num_stages=4, num_splits=5)
    plan = plan_launch(**dims, num_sms=132, config=cfg)
    assert (plan.block_m, plan.block_n, plan.num_warps, plan.num_stages, plan.num_splits) == (64, 32, 4, 4, 5)
    assert plan.chunk % 32 == 0 and plan.chunk * 5 >= dims["S_max"]
    partial = plan_launch(**dims, num_sms=132, config=LaunchConfig(num_stages=2))
    default = plan_launch(**dims, num_sms=132)
    assert partial.num_stages == 2 and (partial.block_m, partial.num_splits) == (
        default.block_m,
        default.num_splits,
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("block_m", 48),
        ("block_m", 512),
        ("block_n", 8),
        ("num_warps", 3),
        ("num_stages", 0),
        ("num_splits", 0),
        ("num_splits", 1000),
        ("block_n", 64.0),
    ],
)
def test_launch_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"LaunchConfig.{field} must be None or one of"):
        LaunchConfig(**{field: value})


# Interpreter-sized launch configurations: several row blocks per kv head (rows = T * G = 20 or 24),
# prefix lengths that are / are not multiples of block_n, splits (some empty, the new tokens in a
# middle split), partial head dims (D = 24 -> BLOCK_D = 32) and pipelining options.
TRITON_CONFIGS = [
    LaunchConfig(block_m=16, block_n=16, num_splits=1),
    LaunchConfig(block_m=16, block_n=16, num_warps=2, num_stages=2, num_splits=3),
    LaunchConfig(block_m=32, block_n=32, num_stages=1, num_splits=2),
    LaunchConfig(block_m=16, block_n=64, num_splits=7),
]


@pytest.mark.parametrize("config", TRITON_CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}s{c.num_splits}")
@pytest.mark.parametrize("mask_fmt", MASK_FORMATS)
def test_triton_launch_configs_match_reference(device, config, mask_fmt):
    _require("triton", device)
    _check_config_against_oracle(device, config, mask_fmt, [(2, 5, 8, 2, 16), (3, 6, 4, 1, 24)])


def _check_config_against_oracle(device, config: LaunchConfig, mask_fmt: str, shapes) -> None:
    """The launcher with ``config`` on fp32 cases of ``shapes`` (B, T, Hq, Hkv, D) against the oracle;
    sequence 0's prefix (32) is a multiple of every block_n the configs use but 64."""
    for seed, (B, T, Hq, Hkv, D) in enumerate(shapes):
        case = make_case(B, T, Hq, Hkv, D, mask_fmt, seed, prefix_max=40, first_prefix=32).to(
            torch.float32, device
        )
        got = _tree_attention_triton(*case.args(), D**-0.5, config)
        assert_matches(
            got, case, oracle(case.to(device="cpu")), f"{config} {mask_fmt} shape={(B, T, Hq, Hkv, D)}"
        )


# Tensor-descriptor (TMA) loads of the full prefix tiles: one and several splits, a prefix that is and
# one that is not a multiple of block_n (its partial tile stays on the pointer path), head dims 16/32.
TMA_CONFIGS = [
    LaunchConfig(block_m=16, block_n=16, num_splits=1, kv_tma=True),
    LaunchConfig(block_m=32, block_n=16, num_warps=2, num_stages=2, num_splits=3, kv_tma=True),
]


@pytest.mark.parametrize("config", TMA_CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}s{c.num_splits}")
@pytest.mark.parametrize("mask_fmt", ["causal", "i32"])
def test_triton_kv_tma_matches_reference(device, config, mask_fmt):
    _require("triton", device)
    if device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("tensor-descriptor loads need compute capability 9.0+")
    _check_config_against_oracle(device, config, mask_fmt, [(2, 5, 8, 2, 16), (3, 6, 4, 1, 32)])


def test_triton_kv_tma_rejects_layouts_it_cannot_load():
    config = LaunchConfig(block_m=16, block_n=16, kv_tma=True)
    case = make_case(2, 5, 8, 2, 16, "i32", seed=0).to(torch.float32)
    q, k, v, seqlens, mask = case.args()
    strided = torch.stack([k, v], dim=-1)  # head dim no longer contiguous
    with pytest.raises(ValueError, match="kv_tma=True.*must be contiguous"):
        _tree_attention_triton(q, strided[..., 0], strided[..., 1], seqlens, mask, 0.25, config)
    odd = make_case(2, 5, 8, 2, 24, "i32", seed=0).to(torch.float32)
    with pytest.raises(ValueError, match="head dim 24 must be a power of two"):
        _tree_attention_triton(*odd.args(), 0.25, config)
    with pytest.raises(ValueError, match="LaunchConfig.kv_tma must be None or a bool"):
        LaunchConfig(kv_tma=1)


def test_triton_grid_covers_row_blocks_and_splits(monkeypatch):
    """The launcher's grid: row blocks x (sequence, kv head) x splits, and the combine kernel only with
    splits. Launches are recorded instead of run."""
    launches = []
    monkeypatch.setattr(
        ta_module, "_launch", lambda kernel, grid, *a, **kw: launches.append((kernel, grid, kw))
    )
    case = make_case(2, 5, 8, 2, 16, "i32", seed=0).to(torch.float32)
    _tree_attention_triton(*case.args(), 0.25, LaunchConfig(block_m=16, num_splits=3))
    (main, grid, kw), (combine, cgrid, _) = launches
    assert main is ta_module._tree_attention_kernel and combine is ta_module._combine_splits_kernel
    assert grid == (triton.cdiv(5 * 4, 16), 2 * 2, 3) and kw["SPLIT"] and kw["BLOCK_M"] == 16
    launches.clear()
    _tree_attention_triton(*case.args(), 0.25, LaunchConfig(block_m=32, num_splits=1))
    assert len(launches) == 1 and launches[0][1] == (1, 4, 1) and not launches[0][2]["SPLIT"]


def test_triton_head_dim_stride_is_honoured(device):
    """A cache whose head dim is not contiguous (the head-dim strides are kernel constexprs)."""
    _require("triton", device)
    case = make_case(2, 3, 4, 2, 16, "u8", seed=12).to(torch.float32, device)
    k_t = case.k.transpose(-1, -2).contiguous().transpose(-1, -2)
    q_t = case.q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert k_t.stride(-1) != 1 and q_t.stride(-1) != 1
    c = Case(q_t, k_t, case.v, case.seqlens, case.mask, case.mask_bool)
    got = run_with_backend("triton", tree_attention, *c.args())
    assert_matches(got, case, oracle(case.to(device="cpu")), "strided head dim")


def test_strided_cache_seqlens_are_read_as_their_values(device):
    """A strided view of the lengths (``lens[:, 0]``) passed the checks, and the Triton kernel read it
    as contiguous: other lengths, NaN output, and on a GPU reads past the cache."""
    case = make_case(2, 3, 4, 2, 16, "bool", seed=21).to(torch.float32, device)
    padded = torch.stack([case.seqlens, torch.full_like(case.seqlens, 10**6)], 1)
    strided = padded[:, 0]
    assert strided.stride(0) == 2 and torch.equal(strided, case.seqlens)
    want = oracle(case.to(device="cpu"))
    for backend in _all_backends(device):
        c = Case(case.q, case.k, case.v, strided, case.mask, case.mask_bool)
        assert_matches(run_with_backend(backend, tree_attention, *c.args()), case, want, backend)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_the_unchecked_kernel_reads_only_the_sequences_cache_on_a_bad_length(device, num_splits):
    """Lengths are value-checked only in debug mode on CUDA (a host sync): with seqlens + T > S_max
    (or a negative length) the Triton kernel read keys past the sequence's cache, the next kv head's
    rows (or past the tensor). Its output must not depend on anything outside a head's own cache."""
    if "triton" not in backends_for(OP, device):
        pytest.skip(f"no Triton kernel runs on {device.type} here")
    gen = torch.Generator().manual_seed(3)
    B, T, Hq, Hkv, S, D = 1, 3, 2, 2, 8, 16
    q = torch.randn(B, T, Hq, D, generator=gen).to(device)
    kv = torch.randn(2, B, Hkv, S, D, generator=gen).to(device)
    config = LaunchConfig(num_splits=num_splits)
    for length in (S - 1, S, -2):
        lengths = torch.tensor([length], dtype=torch.int32, device=device)
        before = _tree_attention_triton(q, kv[0], kv[1], lengths, None, D**-0.5, config)
        other = kv.clone()
        other[:, 0, 1] += 5.0  # kv head 1's whole cache: query head 0 reads kv head 0 alone
        after = _tree_attention_triton(q, other[0], other[1], lengths, None, D**-0.5, config)
        assert torch.equal(before[:, :, 0], after[:, :, 0]), f"length {length}"


@pytest.mark.parametrize("mask_fmt", ["causal", "bool", "u8"])
def test_gradients_of_q_and_the_caches(mask_fmt):
    """No autograd formula was registered: with q requiring grad the forward returned a tensor that
    required grad and backward() failed. Now the backward differentiates the reference, checked
    against finite differences of the op itself (float64, the C++ kernel where built), through layer
    views of one cache buffer; positions no query sees get zero gradient."""
    case = make_case(2, 3, 4, 2, 16, mask_fmt, seed=5, prefix_max=4).to(torch.float64)
    kv = torch.stack((case.k, case.v)).detach().requires_grad_(True)  # [2, B, Hkv, S_max, D]
    q = case.q.detach().requires_grad_(True)

    def f(q, kv):
        return tree_attention(q, kv[0], kv[1], case.seqlens, case.mask)

    assert torch.autograd.gradcheck(f, (q, kv), eps=1e-6, atol=1e-7)
    f(q, kv).square().sum().backward()
    seen = (torch.arange(kv.shape[3])[None, :] < (case.seqlens[:, None] + 3)).to(torch.float64)
    unseen_grad = kv.grad * (1 - seen)[None, :, None, :, None]
    assert bool((unseen_grad == 0).all()) and bool((kv.grad != 0).any()) and bool((q.grad != 0).any())


def test_checked_signatures_do_not_hide_bad_input():
    """Argument checks are skipped only for a signature that passed them; any change is re-checked."""
    case = full_cache_case()
    tree_attention(case.q, case.k, case.v, case.seqlens)  # passes, signature cached
    with pytest.raises(TypeError, match="dtypes must match"):
        tree_attention(case.q.double(), case.k, case.v, case.seqlens)
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        tree_attention(case.q, case.k, case.v, case.seqlens[:1])
    with pytest.raises(ValueError, match="must fit S_max"):  # a value check: never cached
        tree_attention(case.q, case.k, case.v, case.seqlens + 1)
    with pytest.raises(TypeError, match="k_cache must be a torch.Tensor"):
        tree_attention(case.q, case.k.numpy(), case.v, case.seqlens)


# --------------------------------------------------------------------------------------------------
# Behaviour shared by every backend
# --------------------------------------------------------------------------------------------------
def _all_backends(device):
    return ["torch"] + backends_for(OP, device)


def test_row_that_sees_nothing_gets_zeros(device):
    case = make_case(2, 4, 2, 1, 16, "bool", seed=1, prefix_max=0).to(torch.float32, device)
    case.seqlens[:] = 0
    mask = case.mask.clone()
    mask[1, 2] = False  # sequence 1, token 2: no prefix and no visible new token
    for backend in _all_backends(device):
        out = run_with_backend(backend, tree_attention, case.q, case.k, case.v, case.seqlens, mask)
        assert torch.isfinite(out).all(), backend
        assert torch.equal(out[1, 2].cpu(), torch.zeros(2, 16)), backend
        assert out[0].abs().sum() > 0, backend


@pytest.mark.parametrize("sm_scale", [0.7, -0.7, 0.0])
def test_sm_scale_is_honoured(device, sm_scale):
    # prefixes of 150 positions: full key tiles (the unmasked loop) as well as a partial one
    case = make_case(2, 3, 4, 2, 16, "causal", seed=2, prefix_max=150, first_prefix=150).to(
        torch.float32, device
    )
    want = oracle(case.to(device="cpu"), sm_scale=sm_scale)
    for backend in _all_backends(device):
        out = run_with_backend(backend, tree_attention, *case.args(), sm_scale=sm_scale)
        assert_matches(out, case, want, f"{backend}, sm_scale {sm_scale}")


def test_a_large_negative_scale_does_not_overflow(device):
    """A negative scale is legal. At -40 the scaled scores spread past exp2's range, so a kernel that
    shifts by the maximum of the unscaled scores overflows. Integer q and k keep the scores exact in
    float32 and the softmax nearly one-hot, so float32 stays within its tolerance of the oracle."""
    case = make_case(2, 3, 4, 2, 16, "causal", seed=2, prefix_max=150, first_prefix=150)
    kv = torch.stack([case.k, case.v])
    kv[0] = (kv[0] * 2).round()  # NaN past each sequence stays NaN (never read)
    case = Case((case.q * 2).round(), kv[0], kv[1], case.seqlens, case.mask, case.mask_bool).to(
        torch.float32, device
    )
    want = oracle(case.to(device="cpu"), sm_scale=-40.0)
    for backend in _all_backends(device):
        out = run_with_backend(backend, tree_attention, *case.args(), sm_scale=-40.0)
        assert torch.isfinite(out).all(), backend
        assert_matches(out, case, want, backend)
    if "triton" in _all_backends(device):  # the split prefix and its combine kernel too
        split = LaunchConfig(block_m=16, block_n=16, num_splits=3)
        for scale in (-40.0, -0.7):
            out = _tree_attention_triton(*case.args(), scale, split)
            assert_matches(out, case, oracle(case.to(device="cpu"), sm_scale=scale), f"3 splits, {scale}")


def test_a_row_whose_scaled_scores_overflow_float32_is_nan_not_zero(device):
    """q . k = 1e38 is finite in float32, times sm_scale 10 it is not. Every backend gives that row
    NaN, as the float32 reference does. The Triton kernel's fused ``s * scale - max`` once made it
    p = 0 everywhere, the zeros of a row that sees no key: silently wrong. (The interpreter rounds
    the product before the subtraction, so on CPU this passes either way; a GPU run checks it.)"""
    case = make_case(2, 3, 4, 2, 16, "causal", seed=2, prefix_max=150, first_prefix=150).to(torch.float32)
    q, k = case.q.clone(), case.k.clone()
    q[0, 0, 0] = 0.0
    q[0, 0, 0, 0] = 1e19
    k[0, 0, 5] = 0.0  # kv head 0 serves query heads 0 and 1
    k[0, 0, 5, 0] = 1e19
    args = [t.to(device) for t in (q, k, case.v, case.seqlens)]
    for backend in _all_backends(device):
        out = run_with_backend(backend, tree_attention, *args, None, sm_scale=10.0).cpu()
        assert torch.isnan(out[0, 0, 0]).all(), backend
        assert torch.isfinite(out[1]).all(), f"{backend}: sequence 1 does not read the key"


def test_all_mask_formats_agree(device):
    case = make_case(2, 5, 2, 2, 16, "bool", seed=4)
    outs = []
    for fmt in ("bool", "u8", "i32"):
        mask = case.mask_bool if fmt == "bool" else pack_tree_mask(case.mask_bool, fmt)
        c = Case(case.q, case.k, case.v, case.seqlens, mask, case.mask_bool).to(torch.float32, device)
        for backend in _all_backends(device):
            outs.append((fmt, backend, run_with_backend(backend, tree_attention, *c.args()).cpu()))
    for fmt, backend, out in outs[1:]:
        torch.testing.assert_close(out, outs[0][2], rtol=FP32_RTOL, atol=1e-6, msg=f"{fmt}/{backend}")


def test_empty_batch_and_zero_tokens():
    for B, T in [(0, 3), (2, 0)]:
        q = torch.randn(B, T, 2, 16)
        k = torch.randn(B, 1, 8, 16)
        seqlens = torch.zeros(B, dtype=torch.int32)
        for backend in _all_backends(torch.device("cpu")):
            out = run_with_backend(backend, tree_attention, q, k, k, seqlens)
            assert out.shape == (B, T, 2, 16), backend


def test_default_cpu_backend_is_cpp():
    """On CPU the C++ kernel runs by default once the extension is built (faster: see the bench)."""
    _require("cpp", torch.device("cpu"))
    assert eagle_kernels.select_backend(OP, torch.device("cpu")) == "cpp"


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _bad_cases():
    def with_(**kw):
        return lambda a: a.update(kw)

    return [
        (lambda a: a.update(q=a["q"][0]), "q must have 4 dimensions"),
        (lambda a: a.update(k=a["k"][0]), "k_cache must have 4 dimensions"),
        (lambda a: a.update(q=a["q"].double()), "dtypes must match"),
        (lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), "q must have dtype"),
        (lambda a: a.update(q=a["q"][:, :, :3]), "multiple of kv heads"),
        (lambda a: a.update(q=a["q"][..., :8]), "head dim mismatch"),
        (
            lambda a: a.update(q=a["q"][..., :8], k=a["k"][..., :8], v=a["v"][..., :8]),
            "outside the supported",
        ),
        (lambda a: a.update(v=a["v"][:, :, :5]), "must match"),
        (lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), "with B=2"),
        (lambda a: a.update(seqlens=a["seqlens"].float()), "cache_seqlens must have dtype"),
        (lambda a: a.update(seqlens=a["seqlens"].long() + 2**32), "must fit S_max"),  # would wrap in int32
        (lambda a: a.update(seqlens=a["seqlens"][:1]), r"cache_seqlens must have shape \[2\]"),
        (lambda a: a["seqlens"].__setitem__(1, a["seqlens"][1] + 1), "must fit S_max"),
        (lambda a: a["seqlens"].__setitem__(0, -1), "must be >= 0"),
        (lambda a: a.update(seqlens=a["seqlens"].to("meta")), "is on meta"),
        (with_(mask=torch.ones(2, 4, 4, dtype=torch.bool)), r"must have shape \[B, T, 5\]"),
        (with_(mask=torch.ones(2, 5, 5, dtype=torch.float32)), "tree_mask must have dtype"),
        (
            with_(mask=torch.ones(2, 5, 0, dtype=torch.uint8)),
            r"uint8 bit-packed\) must have shape \[B, T, >= 1\]",
        ),
        (with_(mask=torch.ones(2, 4, 2, dtype=torch.int32)), r"int32 bit-packed\) must have shape"),
        (with_(mask=torch.ones(2, 5, dtype=torch.bool)), "tree_mask must have 3 dimensions"),
        # a shape check: the unchecked Triton kernel read the new keys at [0, T), past the head's cache
        (
            lambda a: a.update(k=a["k"][:, :, :4], v=a["v"][:, :, :4]),
            "T=5 new tokens cannot fit a cache of S_max=4",
        ),
    ]


def full_cache_case() -> Case:
    """B=2, T=5, Hq=4, Hkv=2, D=16; sequence 1 fills its cache exactly (cache_seqlens + T = S_max)."""
    case = make_case(2, 5, 4, 2, 16, "causal", seed=3, prefix_max=10, spare=0).to(torch.float32)
    case.seqlens[:] = torch.tensor([3, case.k.shape[2] - 5], dtype=torch.int32)
    return case


@pytest.mark.parametrize("mutate,match", _bad_cases())
def test_bad_input_raises(mutate, match):
    case = full_cache_case()
    args = {"q": case.q, "k": case.k, "v": case.v, "seqlens": case.seqlens.clone(), "mask": None}
    mutate(args)
    call = (args["q"], args["k"], args["v"], args["seqlens"], args["mask"])
    for backend in _all_backends(torch.device("cpu")):
        with pytest.raises((ValueError, TypeError), match=match):
            run_with_backend(backend, tree_attention, *call)
        if isinstance(args["k"], torch.Tensor) and args["seqlens"].device.type != "meta":
            # the registered op, as a serving engine's op table or a compiled graph calls it: the Triton
            # and reference backends read past the tensors (or broadcast) without this check
            with pytest.raises((ValueError, TypeError), match=match):
                run_with_backend(backend, torch.ops.eagle.tree_attention, *call, 0.25)


def test_int64_cache_seqlens_match_int32(device):
    """SGLang's seq_lens are int64 (DESIGN §4: int32 and int64 index dtypes)."""
    case = make_case(3, 4, 4, 2, 16, "bool", seed=8).to(torch.float32, device)
    want = oracle(case.to(device="cpu"))
    for backend in _all_backends(device):
        c = Case(case.q, case.k, case.v, case.seqlens.long(), case.mask, case.mask_bool)
        assert_matches(run_with_backend(backend, tree_attention, *c.args()), case, want, backend)


@pytest.mark.parametrize("mask_fmt", ["bool", "i32", "causal"])
def test_triton_launches_the_batch_in_chunks_past_the_grid_limit(monkeypatch, device, mask_fmt):
    """The grid's y is B * Hkv, which CUDA caps at 65535 (B >= 2048 at 32 kv heads): the launcher
    then runs the batch in chunks. Here the limit is lowered to 5 so that 3 x 2 needs two chunks."""
    if "triton" not in _all_backends(device):
        pytest.skip("triton unavailable")
    monkeypatch.setattr(ta_module, "_MAX_GRID_Y", 5, raising=False)
    grids = []
    launch = ta_module._launch
    monkeypatch.setattr(
        ta_module, "_launch", lambda k, grid, *a, **kw: grids.append(grid) or launch(k, grid, *a, **kw)
    )
    case = make_case(3, 5, 4, 2, 16, mask_fmt, seed=11).to(torch.float32, device)
    want = oracle(case.to(device="cpu"))
    assert_matches(run_with_backend("triton", tree_attention, *case.args()), case, want, "chunked")
    assert grids and all(len(g) < 2 or g[1] <= 5 for g in grids), grids


@pytest.mark.gpu
def test_triton_batch_past_the_grid_limit_on_cuda():
    """B * Hkv = 2048 * 32 > 65535, CUDA's grid-y limit: 'invalid argument' before the chunking."""
    if "triton" not in _all_backends(torch.device("cuda")):
        pytest.skip("triton unavailable on CUDA")
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, Hkv, S, D = 2048, 32, 16, 64
    q = torch.randn(B, 1, Hkv, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, S, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    lens = torch.full((B,), 8, dtype=torch.int32, device="cuda")
    got = run_with_backend("triton", tree_attention, q, k, v, lens)
    want = tree_attention_ref(q.double(), k.double(), v.double(), lens)
    assert_close_lowp(got, want, tree_attention_ref(q, k, v, lens))  # DESIGN §6's bf16 rule


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(3, a[3] + 1), "must fit S_max"),
        (lambda a: a.__setitem__(0, a[0][:, :, :3]), "multiple of kv heads"),
        (lambda a: a.__setitem__(4, torch.ones(2, 5, 3, dtype=torch.uint8)), "must have shape"),
        (lambda a: a.__setitem__(4, torch.ones(2, 5, 5, dtype=torch.int64)), "tree_mask must be bool"),
    ],
)
def test_cpp_op_checks_its_own_arguments(mutate, match):
    """The extension op validates too (it can be called directly as torch.ops.eagle_C.tree_attention)."""
    _require("cpp", torch.device("cpu"))
    case = full_cache_case()
    args = [case.q, case.k, case.v, case.seqlens, None, 0.25]
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.eagle_C.tree_attention(*args)


# --------------------------------------------------------------------------------------------------
# torch.library integration
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_fmt", MASK_FORMATS)
def test_opcheck(mask_fmt):
    case = make_case(2, 5, 4, 2, 16, mask_fmt, seed=6).to(torch.float32)
    torch.library.opcheck(torch.ops.eagle.tree_attention.default, (*case.args(), 0.25))


def test_torch_compile():
    case = make_case(2, 6, 4, 2, 16, "u8", seed=8).to(torch.float32)

    def layer(q, k, v, seqlens, mask):
        return tree_attention(q * 2, k, v, seqlens, mask).sum(-1)

    want = layer(*case.args())
    got = torch.compile(layer, fullgraph=True)(*case.args())
    torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=1e-6)


def _outs(like: torch.Tensor) -> dict[str, torch.Tensor]:
    """A contiguous out and a strided one ([B, T, Hq, D] seen through a [B, Hq, T, D] buffer)."""
    B, T, Hq, D = like.shape
    return {
        "contiguous": torch.full_like(like, float("nan")),
        "strided": torch.full((B, Hq, T, D), float("nan"), dtype=like.dtype, device=like.device).transpose(
            1, 2
        ),
    }


@pytest.mark.parametrize("mask_fmt", ["causal", "u8"])
def test_out_is_written_and_returned_on_every_backend(device, mask_fmt):
    """An engine's preallocated output (vLLM and SGLang attention backends pass one): the result is
    written into ``out`` (contiguous: by the kernels directly) and ``out`` is returned, with the bits of
    a call without it; also through the split prefix and its combine kernel."""
    case = make_case(2, 5, 4, 2, 16, mask_fmt, seed=31).to(torch.float32, device)
    for backend in _all_backends(device):
        want = run_with_backend(backend, tree_attention, *case.args())
        for name, out in _outs(case.q).items():
            got = run_with_backend(backend, tree_attention, *case.args(), out=out)
            assert got is out and torch.equal(out, want), f"{backend} {name}"
    if "triton" in backends_for(OP, device):
        split = LaunchConfig(block_m=16, num_splits=3)
        want = _tree_attention_triton(*case.args(), 0.25, split)
        for name, out in _outs(case.q).items():
            assert _tree_attention_triton(*case.args(), 0.25, split, out=out) is out
            assert torch.equal(out, want), f"split, {name}"


def test_out_registered_op_opcheck_and_compile():
    case = make_case(2, 4, 4, 2, 16, "bool", seed=32).to(torch.float32)
    out = torch.empty_like(case.q)
    torch.library.opcheck(torch.ops.eagle.tree_attention_out.default, (*case.args(), 0.25, out))

    def layer(q, k, v, seqlens, mask, out):
        tree_attention(q * 2, k, v, seqlens, mask, out=out)
        return out.sum(-1)

    want = layer(*case.args(), torch.empty_like(case.q))
    got = torch.compile(layer, fullgraph=True)(*case.args(), torch.empty_like(case.q))
    torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=1e-6)


def test_bad_out_raises():
    case = make_case(2, 4, 4, 2, 16, "bool", seed=33).to(torch.float32)
    args = case.args()
    with pytest.raises(ValueError, match=r"out must have shape \[2, 4, 4, 16\]"):
        tree_attention(*args, out=torch.empty(2, 4, 4, 8))
    with pytest.raises(TypeError, match="out must have dtype in .float32."):
        tree_attention(*args, out=torch.empty(2, 4, 4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must not share memory with q"):
        tree_attention(*args, out=case.q)
    with pytest.raises(ValueError, match="out must not share memory with k_cache"):
        tree_attention(*args, out=case.k.as_strided((2, 4, 4, 16), (256, 64, 16, 1)))
    q = case.q.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="out= does not support automatic differentiation"):
        tree_attention(q, *args[1:], out=torch.empty_like(case.q))


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------
def compile_for_hopper() -> None:
    """Compile the default launches of issue 3's goal shapes (bf16, int32 tree mask; batch 1 takes the
    split + combine path, batch 32 the single pass) and of a causal fp16 decode for sm_90, ahead of
    time (run without TRITON_INTERPRET; no GPU needed), and check the shared memory fits an SM."""
    cases = []
    for name in ("tree64-B1", "tree64-B32"):
        dims = GOAL_SHAPES[name]
        B, T, Hkv, G, S, D = (dims[k] for k in ("B", "T", "Hkv", "G", "S_max", "D"))
        q = torch.zeros(B, T, Hkv * G, D, dtype=torch.bfloat16)
        kv = torch.zeros(2, B, Hkv, S, D, dtype=torch.bfloat16)
        seqlens = torch.full((B,), 2048, dtype=torch.int32)
        mask = torch.zeros(B, T, 2, dtype=torch.int32)
        cases.append(((q, kv[0], kv[1], seqlens, mask), plan_launch(**dims, num_sms=132)))
    dims = GOAL_SHAPES["tree64-B32"]  # fp32: the default plan's stages must fit 4-byte tiles too
    q = torch.zeros(32, 64, 32, 128, dtype=torch.float32)
    kv = torch.zeros(2, 32, 8, dims["S_max"], 128, dtype=torch.float32)
    seqlens = torch.full((32,), 2048, dtype=torch.int32)
    plan = plan_launch(**dims, num_sms=132, elem_size=4)
    cases.append(((q, kv[0], kv[1], seqlens, torch.zeros(32, 64, 2, dtype=torch.int32)), plan))
    q = torch.zeros(4, 1, 32, 128, dtype=torch.float16)
    kv = torch.zeros(2, 4, 8, 4096, 128, dtype=torch.float16)
    seqlens = torch.full((4,), 4000, dtype=torch.int32)
    cases.append(((q, kv[0], kv[1], seqlens, None), plan_launch(4, 8, 1, 4, 4096, 128, num_sms=132)))
    configs = []
    for args, plan in cases:
        config = LaunchConfig(plan.block_m, plan.block_n, plan.num_warps, plan.num_stages, plan.num_splits)
        configs.append((args, config))
    for args, config in configs[:2]:  # the goal shapes' plans with tensor-descriptor loads
        configs.append((args, dataclasses.replace(config, kv_tma=True)))
    for args, config in configs:
        for kernel, kargs, kw in record_tree_attention_launches(*args, config):
            compiled = compile_like_jit(kernel, kargs, kw)
            assert compiled.metadata.shared <= 227 * 1024, (
                kernel.fn.__name__,
                config,
                compiled.metadata.shared,
            )


def test_triton_kernels_compile_for_hopper():
    """The interpreter runs kernels as Python, so it cannot catch what the Triton compiler rejects;
    an ahead-of-time compile for sm_90 can, without a GPU."""
    require_jit_specialisation()
    run_without_interpreter(
        "from tests.kernels.test_tree_attention import compile_for_hopper; compile_for_hopper()"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B", [1, 8, 32])
def test_triton_cuda_bench_shapes(B, dtype):
    """The benchmark's shapes (Llama-8B-like heads, prefix 2048, a 64-token tree) on a real GPU."""
    T, Hq, Hkv, D, prefix = 64, 32, 8, 128, 2048
    gen = torch.Generator().manual_seed(B)
    seqlens = torch.full((B,), prefix, dtype=torch.int32)
    kv = torch.randn(1, 2, B, Hkv, prefix + T, D, generator=gen).to(dtype)
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype)
    mask_bool = tree_masks(B, T, seed=B)
    case = Case(q, kv[0, 0], kv[0, 1], seqlens, pack_tree_mask(mask_bool, "i32"), mask_bool)
    want = tree_attention_ref(*case.to(torch.float64, "cuda").args()).cpu()
    case = case.to(device="cuda")
    got = run_with_backend("triton", tree_attention, *case.args())
    assert_matches(got, case, want, f"cuda B={B}")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 32])
def test_triton_cuda_call_does_not_synchronise(B):
    """The eager CUDA path (checks, plan, allocation, one or two launches) never waits for the GPU:
    batch 1 takes the split + combine path, batch 32 the single pass."""
    T, Hq, Hkv, D, prefix = 64, 32, 8, 128, 2048
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, B, Hkv, prefix + T, D, device="cuda", dtype=torch.bfloat16)
    seqlens = torch.full((B,), prefix, dtype=torch.int32, device="cuda")
    mask = pack_tree_mask(tree_masks(B, T, seed=B), "i32").cuda()
    with eagle_kernels.use_backend("triton"):
        tree_attention(q, kv[0], kv[1], seqlens, mask)  # compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            tree_attention(q, kv[0], kv[1], seqlens, mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------------
# bench/sweep_tree_attention.py: its CPU-runnable parts
# --------------------------------------------------------------------------------------------------
def test_sweep_dry_run_lists_goal_configurations(capsys):
    from bench import sweep_tree_attention as sweep

    assert sweep.main(["--dry-run"]) == 0
    text = capsys.readouterr().out
    for name in ("tree64-B1", "tree64-B8", "tree64-B32", "decode-B1", "decode-B32", "tree16-B8"):
        assert f"{name}: " in text
    for name in ("tiny-fp32-tree64-B1", "tiny-fp32-tree64-B4", "tiny-fp32-decode-B1"):
        assert f"{name}: " in text
    work, variants = sweep.plan_work(sweep.GPU_SHAPES, 132, interpret=False, tma=True)
    assert len(variants) <= 80, "each variant is a cold compile on the GPU machine"
    by_name = {shape.name: [plan for _, plan in items] for shape, items in work}
    for name in ("tree64-B1", "tree64-B8", "tree64-B32"):
        tma = [plan for plan in by_name[name] if plan.kv_tma]
        assert len(tma) == len(sweep.TILES_TMA), f"{name}: each TMA tile once"
        assert by_name[name][1].kv_tma, (
            f"{name}: tensor-descriptor loads are measured right after the default"
        )
    assert not any(plan.kv_tma for plan in by_name["decode-B1"]), "few-row shapes keep their tiles"
    tiny = by_name["tiny-fp32-tree64-B1"]
    assert not any(plan.kv_tma for plan in tiny), "fp32 shapes: FMA tiles, not the bf16 TMA ones"
    assert {p.block_m for p in tiny} >= {16, 32, 64} and max(p.num_splits for p in tiny) > 1, (
        "fp32 shapes try smaller row blocks and prefix splits to spread the FMA work"
    )
    no_tma, _ = sweep.plan_work(sweep.GPU_SHAPES, 132, interpret=False, tma=False)
    assert not any(plan.kv_tma for _, items in no_tma for _, plan in items)
    for shape, items in work:
        plans = [plan for _, plan in items]
        assert items[0][0] is None and len(set(plans)) == len(plans), (
            f"{shape.name}: default first, no repeats"
        )
        for plan in plans:
            assert (plan.num_splits - 1) * plan.chunk < shape.s_max, f"{shape.name}: an empty split in {plan}"


def test_sweep_interpret_reports_failures_and_keeps_going(tmp_path, monkeypatch):
    """A configuration that raises (e.g. out of shared memory) or computes a wrong result is reported
    in the JSON with its status; the others are still measured and the best is chosen among them."""
    import json

    if os.environ.get("TRITON_INTERPRET") != "1":  # a GPU run: triton was imported without the interpreter
        pytest.skip("--interpret needs TRITON_INTERPRET=1 before triton is imported (set on CPU test runs)")

    from bench import sweep_tree_attention as sweep

    real = sweep._tree_attention_triton

    def flaky(q, k, v, seqlens, mask, scale, config=None):
        if config is not None and (config.block_m, config.num_splits) == (16, 3):
            raise RuntimeError("out of resource: shared memory")
        out = real(q, k, v, seqlens, mask, scale, config)
        return out + 1.0 if config is not None and (config.block_m, config.num_splits) == (32, 1) else out

    monkeypatch.setattr(sweep, "_tree_attention_triton", flaky)
    out = tmp_path / "sweep.json"
    assert sweep.main(["--interpret", "--shapes", "tiny-tree5-B2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True and list(tmp_path.iterdir()) == [out]  # renamed into place
    entry = report["shapes"]["tiny-tree5-B2"]
    status = {r["config_desc"]: r["status"] for r in entry["results"]}
    assert status["m16 n16 w4 st2 splits3"].startswith("error: RuntimeError: out of resource")
    assert status["m32 n16 w4 st1 splits1"].startswith("wrong")
    assert status["m16 n16 w4 st2 splits1 tma"] == "ok", "the tensor-descriptor variant is swept too"
    assert sum(s == "ok" for s in status.values()) == 4
    assert entry["best"]["status"] == "ok" and entry["best"]["max_abs_err"] < 1e-4


def test_ab_compares_the_working_tree_with_an_older_module_and_rejects_a_wrong_one(tmp_path):
    """bench/ab_tree_attention.py loads another commit's module beside this one (its ops under another
    namespace), checks both against the reference and times them alternately."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("--interpret needs TRITON_INTERPRET=1 before triton is imported (set on CPU test runs)")
    import importlib

    from bench import ab_tree_attention as ab

    source = Path(importlib.import_module("eagle_kernels.tree_attention").__file__).read_text()
    same, broken = tmp_path / "same.py", tmp_path / "broken.py"
    same.write_text(source)
    wrong_output = "acc / l_safe[:, None]"
    assert source.count(wrong_output) == 1
    broken.write_text(source.replace(wrong_output, "2.0 * acc / l_safe[:, None]"))
    for baseline, old_ok in ((same, True), (broken, False)):
        out = tmp_path / f"ab_{baseline.stem}.json"
        argv = [str(baseline), "--interpret", "--rounds", "2", "--shapes", "tiny-tree5-B2", "--out", str(out)]
        assert ab.main([*argv, "--configs", "default", "m16_n16_w4_s2_k2_tma"]) == 0
        rows = json.loads(out.read_text())["shapes"]["tiny-tree5-B2"]
        assert [r["config"] for r in rows] == ["default", "m16_n16_w4_s2_k2_tma"]
        for row in rows:
            new, old = row["versions"]["new"], row["versions"]["old"]
            assert new["status"] == "ok" and len(new["times_us"]) == 2 and new["max_abs_err"] < 1e-4
            assert (old["status"] == "ok") == old_ok and ("old_over_new" in row) == old_ok, row
            if not old_ok:
                assert old["status"].startswith("wrong") and old["times_us"] == []
        assert (
            "splits=2" in rows[1]["versions"]["new"]["plan"]
            and "kv_tma=True" in rows[1]["versions"]["new"]["plan"]
        )
        # the plan of the float32 launch the interpreter makes (2 stages), not of a bf16 one (3)
        assert "num_stages=2" in rows[0]["versions"]["new"]["plan"], rows[0]["versions"]["new"]["plan"]
    with pytest.raises(SystemExit, match="not an eagle_kernels/tree_attention.py"):
        ab.load_baseline(Path(ab.sweep.__file__))
    too_old = tmp_path / "too_old.py"
    too_old.write_text(source.replace("class LaunchConfig", "class LaunchSettings"))
    with pytest.raises(SystemExit, match="before LaunchConfig"):
        ab.load_baseline(too_old)
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        ab.main([str(same), "--interpret", "--rounds", "0"])
    with pytest.raises(SystemExit):  # no abbreviations: --interp would not have set the interpreter
        ab.main([str(same), "--interp"])
    # --new: a file in place of the working tree's module (the broken one, so it must be named "new")
    out = tmp_path / "ab_new.json"
    argv = [str(same), "--new", str(broken), "--interpret", "--rounds", "1", "--shapes", "tiny-tree5-B2"]
    assert ab.main([*argv, "--configs", "default", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["shapes"]["tiny-tree5-B2"]
    assert report["new"] == str(broken)
    assert row["versions"]["new"]["status"].startswith("wrong") and row["versions"]["old"]["status"] == "ok"


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_nan_in_q_k_or_scale_reaches_exactly_the_rows_that_read_it(isa, dtype, monkeypatch):
    """A NaN score must make its row NaN on every backend, as in the reference (the C++ kernel's
    softmax max once skipped NaN, so a row of only NaN scores read as 'sees no key' and came out
    zero: a checkpoint with a NaN weight then decoded wrong text instead of raising). A row that
    sees no key at all stays zero."""
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", isa)
    exclude = ("triton",) if dtype == torch.float64 else ()  # Triton takes fp32/fp16/bf16
    backends = ["torch", *backends_for(OP, torch.device("cpu"), exclude=exclude)]
    base = make_case(2, 5, 4, 2, 32, "bool", seed=3, prefix_max=20).to(dtype)
    nan = float("nan")

    def q_nan():  # one element of sequence 0, token 1, head 2
        q = base.q.clone()
        q[0, 1, 2, 7] = nan
        expect = torch.zeros(2, 5, 4, dtype=torch.bool)
        expect[0, 1, 2] = True
        return Case(q, base.k, base.v, base.seqlens, base.mask, base.mask_bool), None, expect

    def k_nan():  # one dim of kv head 1 at every visible position of sequence 1: query heads 2, 3
        kv = torch.stack([base.k, base.v]).clone()
        kv[0, 1, 1, : int(base.seqlens[1]) + 5, 3] = nan
        expect = torch.zeros(2, 5, 4, dtype=torch.bool)
        expect[1, :, 2:] = True
        return Case(base.q, kv[0], kv[1], base.seqlens, base.mask, base.mask_bool), None, expect

    def scale_nan():
        return base, nan, torch.ones(2, 5, 4, dtype=torch.bool)

    for make in (q_nan, k_nan, scale_nan):
        case, sm_scale, expect = make()
        for backend in backends:
            out = run_with_backend(backend, tree_attention, *case.args(), sm_scale=sm_scale)
            rows_nan = out.isnan().all(-1)
            assert torch.equal(rows_nan, expect), (
                f"{backend} {make.__name__}: NaN rows {rows_nan.nonzero().tolist()}"
            )
            assert torch.isfinite(out[~expect]).all(), f"{backend} {make.__name__}"

    blind = make_case(1, 3, 2, 1, 16, "bool", seed=4, prefix_max=0).to(dtype)
    blind.mask_bool = blind.mask_bool.clone()
    blind.mask_bool[0, 1] = False  # token 1 sees no key (no prefix, not even itself)
    blind.mask = blind.mask_bool
    for backend in backends:
        out = run_with_backend(backend, tree_attention, *blind.args())
        assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1])) and torch.isfinite(out).all(), backend


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_a_non_finite_v_reaches_only_the_rows_that_see_its_key(isa, dtype, monkeypatch):
    """NaN / inf in the V of a new token reached every row on every backend (a masked key's p = 0
    times NaN): a rejected draft token whose V overflowed float16 turned the whole verified tree NaN,
    where plain decoding gives the same tokens. Now the rows that see the token come out NaN and the
    others are unchanged, bit for bit; a bad prefix V reaches every row that reads that kv head."""
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", isa)
    exclude = ("triton",) if dtype == torch.float64 else ()  # Triton takes fp32/fp16/bf16
    runners = {
        backend: lambda *args, backend=backend: run_with_backend(backend, tree_attention, *args)
        for backend in ["torch", *backends_for(OP, torch.device("cpu"), exclude=exclude)]
    }
    if "triton" in runners:  # the split prefix too: a NaN row must survive the combine of the splits
        split = LaunchConfig(block_n=16, num_splits=3)  # chunks of 16 keys: 20 prefix + 5 new keys
        runners["triton, 3 splits"] = lambda *args: _tree_attention_triton(*args, 32**-0.5, split)
    base = make_case(2, 5, 4, 2, 32, "bool", seed=3, prefix_max=20, first_prefix=20).to(dtype)
    clean = {name: run(*base.args()) for name, run in runners.items()}
    j = 3  # new token 3 of sequence 0; tokens 0-2 precede it in the tree, so never see it
    seen_by = base.mask_bool[0, :, j].clone()
    assert seen_by[j] and not seen_by[:j].any()
    for where, value in (
        ("new", float("nan")),
        ("new", float("inf")),
        ("new", -float("inf")),
        ("prefix", float("nan")),
    ):
        kv = torch.stack([base.k, base.v]).clone()
        expect = torch.zeros(2, 5, 4, dtype=torch.bool)
        if where == "new":
            kv[1, 0, 1, int(base.seqlens[0]) + j, 5] = value  # kv head 1: query heads 2 and 3
            expect[0, :, 2:] = seen_by[:, None]
        else:
            kv[1, 1, 0, 7, 5] = value  # sequence 1's prefix, kv head 0: query heads 0 and 1
            expect[1, :, :2] = True
        case = Case(base.q, kv[0], kv[1], base.seqlens, base.mask, base.mask_bool)
        for backend, run in runners.items():
            out = run(*case.args())
            what = f"{backend}, {value} in a {where} V"
            assert torch.equal(~torch.isfinite(out).all(-1), expect), (
                f"{what}: non-finite rows {(~torch.isfinite(out).all(-1)).nonzero().tolist()}"
            )
            assert torch.equal(out[~expect], clean[backend][~expect]), what


def test_float64_where_triton_is_chosen_runs_the_reference_unless_triton_is_forced(monkeypatch):
    """On CUDA the default backend is Triton, which has no float64 kernel: a float64 call runs the
    reference (as fused_draft_input's does); forcing Triton still refuses it by name."""
    module = sys.modules["eagle_kernels.tree_attention"]  # (the package attribute is the function)
    case = make_case(2, 3, 4, 2, 16, "bool", seed=11)
    args = (*case.args(), 16**-0.5)
    monkeypatch.setattr(module, "select_backend", lambda op, device: "triton")
    out = module._run_tree_attention(*args)
    assert torch.equal(out, tree_attention_ref(*args))
    if "triton" in eagle_kernels.available_backends(OP, torch.device("cpu")):
        with pytest.raises(TypeError, match="not float64"), eagle_kernels.use_backend("triton"):
            module._run_tree_attention(*args)


def test_pack_tree_mask_refuses_an_unknown_format_and_a_non_square_mask():
    square = torch.eye(5, dtype=torch.bool).expand(2, 5, 5)
    with pytest.raises(ValueError, match=r"fmt must be one of \['i32', 'u8'\], got 'u16'"):
        pack_tree_mask(square, "u16")
    with pytest.raises(ValueError, match=r"mask must be \[B, T, T\], got \[2, 5, 4\]"):
        pack_tree_mask(square[..., :4], "u8")
    with pytest.raises(TypeError, match="mask must have dtype"):
        pack_tree_mask(square.to(torch.uint8))
