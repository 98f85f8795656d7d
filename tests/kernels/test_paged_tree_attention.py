"""paged_tree_attention: the contiguous op's cases, paged with random block placement, page sizes and
layouts, against the float64 oracle (and, on CPU, bit for bit against the contiguous op).

Every paged case poisons what the op must not read: the positions after each sequence's window
(the contiguous cases already do), the pool's unused blocks (NaN) and the table entries past a
sequence's pages (-1, or a huge id).
"""

from __future__ import annotations

import sys

import pytest
import torch

import eagle_kernels
from eagle_kernels import gather_pages, paged_tree_attention, paged_tree_attention_ref, tree_attention
from eagle_kernels.tree_attention import LaunchConfig, _tree_attention_triton
from tests.kernels.helpers import FP32_RTOL, backends_for, run_with_backend
from tests.kernels.test_tree_attention import Case, assert_matches, isa_params, make_case, oracle

OP = "paged_tree_attention"
pta_module = sys.modules["eagle_kernels.paged_tree_attention"]
# [2, num_blocks, page, H, D] (vLLM's FlashAttention backend), [num_blocks, 2, page, H, D] (its Triton and
# FlashInfer backends, FlashInfer's NHD), [num_blocks, 2, H, page, D] (FlashInfer's HND, TensorRT-LLM)
LAYOUTS = ("vllm", "nhd", "hnd")


def paged(case: Case, page: int, layout: str, seed: int, *, spare_blocks: int = 3, pad=-1):
    """The case's caches scattered into a block pool: (k_pool, v_pool, block_table).

    Blocks are placed at random; unused blocks are NaN; the table has one spare column per sequence,
    padded with ``pad``. ``layout``: how the pool is stored (:data:`LAYOUTS`); the views returned are
    ``[num_blocks, page, H, D]``."""
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, S, D = case.k.shape
    T = case.q.shape[1]
    pages = [(int(s) + T + page - 1) // page for s in case.seqlens]
    width = max(pages, default=0) + 1
    num_blocks = sum(pages) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.full((B, width), pad, dtype=torch.int32)
    shape = {"hnd": (num_blocks, 2, Hkv, page, D), "nhd": (num_blocks, 2, page, Hkv, D)}.get(
        layout, (2, num_blocks, page, Hkv, D)
    )
    pool = torch.full(shape, float("nan"), dtype=case.k.dtype)
    if layout == "hnd":
        k_pool, v_pool = pool[:, 0].transpose(1, 2), pool[:, 1].transpose(1, 2)
    elif layout == "nhd":
        k_pool, v_pool = pool[:, 0], pool[:, 1]
    else:
        k_pool, v_pool = pool[0], pool[1]
    used = 0
    for b in range(B):
        for c in range(pages[b]):
            block = int(order[used])
            used += 1
            table[b, c] = block
            end = min((c + 1) * page, S)
            k_pool[block, : end - c * page] = case.k[b, :, c * page : end].transpose(0, 1)
            v_pool[block, : end - c * page] = case.v[b, :, c * page : end].transpose(0, 1)
    return k_pool, v_pool, table


def paged_args(case: Case, page: int, layout: str = "vllm", seed: int = 0, **kw):
    k_pool, v_pool, table = paged(case, page, layout, seed, **kw)
    return case.q, k_pool, v_pool, table, case.seqlens, case.mask


def _all_backends(device):
    return ["torch", *backends_for(OP, device)]


# --------------------------------------------------------------------------------------------------
# Reference and backends
# --------------------------------------------------------------------------------------------------
def test_gather_pages_reads_each_sequences_blocks_in_order():
    case = make_case(3, 4, 2, 2, 16, "causal", seed=1, spare=0)
    k_pool, _, table = paged(case, 3, "vllm", seed=1)
    lengths = case.seqlens.long() + 4
    got = gather_pages(k_pool, table, lengths)
    for b in range(3):
        n = int(lengths[b])
        assert torch.equal(got[b, :, :n], case.k[b, :, :n]), b


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page", [1, 3, 16])
@pytest.mark.parametrize("mask_fmt", ["causal", "bool", "u8", "i32"])
def test_reference_matches_oracle(layout, page, mask_fmt):
    case = make_case(3, 6, 4, 2, 16, mask_fmt, seed=page)
    got = paged_tree_attention_ref(*paged_args(case, page, layout, seed=page))
    assert_matches(got, case, oracle(case), f"{layout} page {page}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backends_match_the_oracle_fuzzed(device, dtype):
    """Random shapes, page sizes, layouts and masks on every backend. Triton runs the contiguous op's
    kernel reading block ids per key tile (interpreted on CPU: small sizes)."""
    backends = backends_for(OP, device)
    assert backends, "no accelerated backend reachable; the extension or triton is missing"
    gen = torch.Generator().manual_seed(int(dtype.itemsize))
    for seed in range(4):
        B = int(torch.randint(1, 4, (1,), generator=gen))
        T = int(torch.randint(1, 9, (1,), generator=gen))
        Hkv = int(torch.randint(1, 3, (1,), generator=gen))
        G = [1, 2, 4][int(torch.randint(0, 3, (1,), generator=gen))]
        page = [1, 2, 5, 16][int(torch.randint(0, 4, (1,), generator=gen))]
        mask_fmt = ["causal", "bool", "u8", "i32"][seed]
        layout = LAYOUTS[seed % len(LAYOUTS)]
        case = make_case(B, T, Hkv * G, Hkv, 16, mask_fmt, seed=seed, prefix_max=30)
        want = oracle(case)
        low = case.to(dtype, device)
        args = [
            a.to(device) if isinstance(a, torch.Tensor) else a for a in paged_args(low, page, layout, seed)
        ]
        for backend in backends:
            got = run_with_backend(backend, paged_tree_attention, *args)
            assert_matches(got, low, want, f"{backend} seed {seed} page {page} {layout} {mask_fmt}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_backends_equal_the_contiguous_op_bit_for_bit(dtype):
    """On CPU the gathered pages go through tree_attention's own kernel: the same bits."""
    case = make_case(3, 7, 4, 2, 32, "bool", seed=5).to(dtype)
    for backend in ["torch", *backends_for("tree_attention", torch.device("cpu"), exclude=("triton",))]:
        want = run_with_backend(backend, tree_attention, *case.args())
        got = run_with_backend(backend, paged_tree_attention, *paged_args(case, 4, "hnd", seed=5))
        assert torch.equal(got, want), backend


def test_triton_split_prefix_and_small_blocks_match_the_oracle(device):
    """The flash-decoding split (a combine kernel after it) and key tiles that span several pages."""
    if "triton" not in backends_for(OP, device):
        pytest.skip("Triton is not reachable here")
    case = make_case(2, 5, 4, 2, 16, "i32", seed=9, prefix_max=50, first_prefix=50).to(torch.float32, device)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in paged_args(case, 3, "vllm", seed=9)]
    q, k_pool, v_pool, table, seqlens, mask = args
    want = oracle(case)
    for config in (
        LaunchConfig(block_m=16, block_n=16, num_splits=3),
        LaunchConfig(block_m=16, num_splits=1),
    ):
        got = _tree_attention_triton(q, k_pool, v_pool, seqlens, mask, 16**-0.5, config, block_table=table)
        assert_matches(got, case, want, str(config))


def test_blocks_shared_between_sequences(device):
    """Two sequences whose common prefix lies in the same blocks (prefix caching) and whose trees
    lie in their own."""
    case = make_case(2, 4, 2, 1, 16, "bool", seed=11, prefix_max=0).to(torch.float32, device)
    page, prefix = 4, 8
    gen = torch.Generator().manual_seed(11)
    shared = torch.randn(2, 1, prefix, 16, generator=gen).to(device)  # k, v of the common prefix
    k = torch.cat([shared[0].expand(2, -1, -1, -1), case.k[:, :, :4]], dim=2)
    v = torch.cat([shared[1].expand(2, -1, -1, -1), case.v[:, :, :4]], dim=2)
    contiguous = Case(
        case.q, k, v, torch.full((2,), prefix, dtype=torch.int32, device=device), case.mask, case.mask_bool
    )
    pool_k = torch.full((4, page, 1, 16), float("nan"), device=device)
    pool_v = pool_k.clone()
    for block, (src, start) in enumerate([(0, 0), (0, 4), (0, 8), (1, 8)]):  # blocks 0, 1: the prefix
        pool_k[block] = k[src, :, start : start + page].transpose(0, 1)
        pool_v[block] = v[src, :, start : start + page].transpose(0, 1)
    table = torch.tensor([[0, 1, 2], [0, 1, 3]], dtype=torch.int32, device=device)
    want = oracle(contiguous.to(device="cpu"))
    for backend in _all_backends(device):
        got = run_with_backend(
            backend, paged_tree_attention, case.q, pool_k, pool_v, table, contiguous.seqlens, case.mask
        )
        assert_matches(got, contiguous, want, backend)


@pytest.mark.parametrize("pad", [-1, 2**31 - 1])
def test_table_entries_past_a_sequences_pages_are_never_read(device, pad):
    case = make_case(3, 3, 2, 2, 16, "causal", seed=13).to(torch.float32, device)
    args = [
        a.to(device) if isinstance(a, torch.Tensor) else a
        for a in paged_args(case, 2, "vllm", seed=13, pad=pad)
    ]
    want = oracle(case)
    for backend in _all_backends(device):
        assert_matches(run_with_backend(backend, paged_tree_attention, *args), case, want, backend)


def _strided_tables(table: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same table values column-major and as every other column of a wider buffer."""
    wide = torch.full((table.shape[0], 2 * table.shape[1]), -7, dtype=table.dtype, device=table.device)
    wide[:, ::2] = table
    return {"column-major": table.t().contiguous().t(), "every other column": wide[:, ::2]}


def test_a_strided_block_table_is_read_by_value(device):
    """A table whose columns are not adjacent (a transposed buffer, a slice of a wider one) gives the
    contiguous table's result on every backend: the Triton kernel read entry c at row + c and
    attended over other blocks, silently."""
    case = make_case(3, 4, 4, 2, 16, "bool", seed=35).to(torch.float32, device)
    q, k, v, table, seqlens, mask = (
        a.to(device) if isinstance(a, torch.Tensor) else a for a in paged_args(case, 2, seed=35)
    )
    for backend in _all_backends(device):
        want = run_with_backend(backend, paged_tree_attention, q, k, v, table, seqlens, mask)
        for name, strided in _strided_tables(table).items():
            got = run_with_backend(backend, paged_tree_attention, q, k, v, strided, seqlens, mask)
            assert torch.equal(got, want), f"{backend}, {name}"


def test_the_table_columns_past_every_sequences_pages_are_not_read(device):
    """An engine's table may be as wide as its longest context (SGLang's req_to_token): the columns
    no sequence reads hold anything, and cost no check."""
    case = make_case(2, 3, 2, 1, 16, "causal", seed=37).to(torch.float32, device)
    q, k, v, table, seqlens, mask = (
        a.to(device) if isinstance(a, torch.Tensor) else a for a in paged_args(case, 4, seed=37)
    )
    wide = torch.full((2, 50_000), -1, dtype=table.dtype, device=device)
    wide[:, : table.shape[1]] = table
    for backend in _all_backends(device):
        want = run_with_backend(backend, paged_tree_attention, q, k, v, table, seqlens, mask)
        assert torch.equal(
            run_with_backend(backend, paged_tree_attention, q, k, v, wide, seqlens, mask), want
        )


def test_int64_table_and_lengths_match_int32(device):
    case = make_case(2, 4, 4, 2, 16, "u8", seed=15).to(torch.float32, device)
    q, k, v, table, seqlens, mask = (
        a.to(device) if isinstance(a, torch.Tensor) else a for a in paged_args(case, 4)
    )
    for backend in _all_backends(device):
        want = run_with_backend(backend, paged_tree_attention, q, k, v, table, seqlens, mask)
        got = run_with_backend(backend, paged_tree_attention, q, k, v, table.long(), seqlens.long(), mask)
        assert torch.equal(got, want), backend


def test_empty_batch_and_zero_tokens():
    case = make_case(2, 3, 2, 1, 16, "causal", seed=17)
    q, k, v, table, seqlens, _ = paged_args(case, 4)
    assert paged_tree_attention(q[:, :0], k, v, table, seqlens).shape == (2, 0, 2, 16)
    assert paged_tree_attention(q[:0], k, v, table[:0], seqlens[:0]).shape == (0, 3, 2, 16)


def test_the_unchecked_triton_kernel_clamps_a_bad_block_id_into_the_pool(device):
    """Without the value check (CUDA outside debug mode) a block id past the pool reads the last
    block (the kernel clamps it), never outside the cache."""
    if "triton" not in backends_for(OP, device):
        pytest.skip("Triton is not reachable here")
    case = make_case(1, 2, 2, 1, 16, "causal", seed=19, prefix_max=0, first_prefix=6).to(
        torch.float32, device
    )
    q, k, v, table, seqlens, _ = (
        a.to(device) if isinstance(a, torch.Tensor) else a for a in paged_args(case, 4)
    )
    last = k.shape[0] - 1
    bad, clamped = table.clone(), table.clone()
    bad[0, 0], clamped[0, 0] = 10**6, last
    k[last], v[last] = 1.0, 2.0  # a finite block: a NaN one would hide which block was read
    got = _tree_attention_triton(q, k, v, seqlens, None, 0.25, block_table=bad)
    want = _tree_attention_triton(q, k, v, seqlens, None, 0.25, block_table=clamped)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _good():
    case = make_case(2, 3, 4, 2, 16, "bool", seed=21, prefix_max=5).to(torch.float32)
    return list(paged_args(case, 4))


def _set(i, value):
    def mutate(args):
        args[i] = value(args[i]) if callable(value) else value

    return mutate


BAD = [
    (_set(3, lambda t: t.float()), TypeError, "block_table must have dtype"),
    (_set(3, lambda t: t[0]), ValueError, "block_table must have 2 dimensions"),
    (_set(3, lambda t: t[:1]), ValueError, r"block_table must have shape \[2, \*\]"),
    (_set(3, lambda t: t[:, :0]), ValueError, "T=3 new tokens cannot fit the block table's 0 blocks"),
    (_set(4, lambda t: t + 100), ValueError, r"cache_seqlens \+ T \(T=3\) must fit the block table's"),
    (_set(4, lambda t: t - 100), ValueError, "cache_seqlens must be >= 0"),
    (_set(1, lambda t: t[:, :, :1]), ValueError, r"k_cache \[.*\] and v_cache \[.*\] must match"),
    (_set(1, lambda t: t[:0]), ValueError, "must match"),
    (_set(2, lambda t: t.double()), TypeError, "dtypes must match"),
    (_set(1, lambda t: t[..., :8]), ValueError, "must match"),
    (
        _set(0, lambda t: t[:, :, :3]),
        ValueError,
        r"query heads Hq=3 must be a positive multiple of kv heads Hkv=2",
    ),
    (_set(0, lambda t: t[..., :8]), ValueError, "head dim mismatch"),
    (_set(5, lambda t: t[:, :2]), ValueError, r"tree_mask \(bool\) must have shape"),
]


@pytest.mark.parametrize("mutate,error,match", BAD)
def test_bad_input_raises(mutate, error, match):
    for backend in _all_backends(torch.device("cpu")):
        args = _good()
        mutate(args)
        with pytest.raises(error, match=match):
            run_with_backend(backend, paged_tree_attention, *args)


def test_empty_pool_is_refused():
    q, k, v, table, seqlens, mask = _good()
    with pytest.raises(ValueError, match="at least one block of at least one position"):
        paged_tree_attention(q, k[:0], v[:0], table, seqlens, mask)
    with pytest.raises(ValueError, match="at least one block of at least one position"):
        paged_tree_attention(q, k[:, :0], v[:, :0], table, seqlens, mask)


@pytest.mark.parametrize("value", [-1, 10**6])
def test_a_block_id_outside_the_pool_is_refused_by_name(value):
    args = _good()
    table = args[3].clone()
    table[1, 0] = value
    args[3] = table
    for backend in _all_backends(torch.device("cpu")):
        with pytest.raises(ValueError, match=rf"block_table\[1, 0\] = {value} is not a block of the cache"):
            run_with_backend(backend, paged_tree_attention, *args)


def test_registered_ops_check_their_arguments():
    args = _good()
    args[3] = args[3][:1]
    with pytest.raises(ValueError, match="block_table must have shape"):
        torch.ops.eagle.paged_tree_attention(*args, 0.25)
    with pytest.raises(ValueError, match="block_table must have shape"):
        torch.ops.eagle.paged_tree_attention_out(*args, 0.25, torch.empty(2, 3, 4, 16))


# --------------------------------------------------------------------------------------------------
# The C++ kernel
# --------------------------------------------------------------------------------------------------
def _require_cpp():
    if "cpp" not in backends_for(OP, torch.device("cpu")):
        pytest.skip("the C++ extension is not built")


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page, D", [(1, 32), (5, 17), (16, 64), (64, 40)])
def test_cpp_equals_the_contiguous_op_bit_for_bit_on_every_isa(isa, dtype, page, D, monkeypatch):
    """Each C++ task gathers its rows (any page size, an odd row of 17 elements too) and runs the
    contiguous kernel on them: the same bits as the contiguous op, for every instruction-set variant."""
    _require_cpp()
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", isa)
    for seed, mask_fmt in enumerate(["causal", "u8"]):
        case = make_case(3, 6, 4, 2, D, mask_fmt, seed=seed + page).to(dtype)
        want = run_with_backend("cpp", tree_attention, *case.args())
        for layout in LAYOUTS:
            got = run_with_backend("cpp", paged_tree_attention, *paged_args(case, page, layout, seed=seed))
            assert torch.equal(got, want), f"{layout} {mask_fmt}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_a_new_tokens_non_finite_v_gives_the_contiguous_ops_nan_rows(dtype):
    """The rare redo of P @ V over finite values (a draft token's V overflowed) reads every V row at
    once: a paged task gathers them for it, and its rows come out as the contiguous op's, NaN where
    they see the bad token and exact elsewhere."""
    _require_cpp()
    case = make_case(2, 6, 4, 2, 32, "bool", seed=41).to(dtype)
    for b in range(2):
        case.v[b, :, int(case.seqlens[b]) + 2] = float("nan")
    want = run_with_backend("cpp", tree_attention, *case.args())
    assert want.isnan().any() and not want.isnan().all()
    got = run_with_backend("cpp", paged_tree_attention, *paged_args(case, 3, "nhd", seed=41))
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [128, 256])
def test_cpp_reads_whole_blocks_in_place_from_big_pages(dtype, page):
    """Pages of the kernel's 128-key block or a multiple (vLLM's CPU block size is 128): each block
    lies in one page and is read in place at the page's row stride, not gathered. Prefixes of several
    pages; the contiguous op's bits in every layout."""
    _require_cpp()
    case = make_case(3, 5, 4, 2, 32, "i32", seed=page, prefix_max=600, first_prefix=600).to(dtype)
    want = run_with_backend("cpp", tree_attention, *case.args())
    for layout in LAYOUTS:
        got = run_with_backend("cpp", paged_tree_attention, *paged_args(case, page, layout, seed=page))
        assert torch.equal(got, want), layout


def test_cpp_reads_a_head_dim_stride():
    """A pool whose head dim is not contiguous (a [num_blocks, page, D, Hkv] store seen transposed)."""
    _require_cpp()
    case = make_case(2, 3, 4, 2, 16, "bool", seed=3).to(torch.float32)
    q, k, v, table, seqlens, mask = paged_args(case, 4)
    k_t, v_t = (c.transpose(2, 3).contiguous().transpose(2, 3) for c in (k, v))
    assert k_t.stride(3) != 1
    want = run_with_backend("cpp", paged_tree_attention, q, k, v, table, seqlens, mask)
    assert torch.equal(run_with_backend("cpp", paged_tree_attention, q, k_t, v_t, table, seqlens, mask), want)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (_set(3, lambda t: t.clone().fill_(-1)), r"block_table\[0, 0\] = -1 is not a block of the cache"),
        (_set(3, lambda t: t[:1]), r"block_table must be \[B, max_blocks\] with B=2"),
        (_set(3, lambda t: t.float()), "block_table must be int32 or int64"),
        (_set(4, lambda t: t + 100), r"must fit the block table's capacity \(max_blocks \* page_size\)"),
        (_set(1, lambda t: t[:0]), "at least one block of at least one position"),
        (_set(0, lambda t: t[:, :, :3]), "multiple of kv heads"),
    ],
)
def test_cpp_op_checks_its_own_arguments(mutate, match):
    """The extension op validates too (it can be called directly as torch.ops.eagle_C.paged_tree_attention)."""
    _require_cpp()
    args = _good()
    mutate(args)
    if args[1].shape != args[2].shape:
        args[2] = args[2][: args[1].shape[0]]
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.eagle_C.paged_tree_attention(*args, 0.25)


# --------------------------------------------------------------------------------------------------
# out= and torch.library integration
# --------------------------------------------------------------------------------------------------
def test_out_is_written_and_returned_on_every_backend(device):
    case = make_case(2, 5, 4, 2, 16, "u8", seed=23).to(torch.float32, device)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in paged_args(case, 4)]
    for backend in _all_backends(device):
        want = run_with_backend(backend, paged_tree_attention, *args)
        B, T, Hq, D = case.q.shape
        for out in (
            torch.full_like(case.q, float("nan")),
            torch.full((B, Hq, T, D), float("nan"), device=device).transpose(1, 2),
        ):
            got = run_with_backend(backend, paged_tree_attention, *args, out=out)
            assert got is out and torch.equal(out, want), backend
    with pytest.raises(ValueError, match="out must not share memory with q"):
        paged_tree_attention(*args, out=case.q)


@pytest.mark.parametrize("mask_fmt", ["causal", "i32"])
def test_opcheck(mask_fmt):
    case = make_case(2, 5, 4, 2, 16, mask_fmt, seed=25).to(torch.float32)
    args = paged_args(case, 4)
    torch.library.opcheck(torch.ops.eagle.paged_tree_attention.default, (*args, 0.25))
    torch.library.opcheck(
        torch.ops.eagle.paged_tree_attention_out.default, (*args, 0.25, torch.empty_like(case.q))
    )


def test_torch_compile():
    case = make_case(2, 6, 4, 2, 16, "bool", seed=27).to(torch.float32)

    def layer(q, k, v, table, seqlens, mask):
        return paged_tree_attention(q * 2, k, v, table, seqlens, mask).sum(-1)

    args = paged_args(case, 4)
    want = layer(*args)
    got = torch.compile(layer, fullgraph=True)(*args)
    torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=1e-6)


def test_listed_as_an_op_with_its_backends():
    assert OP in eagle_kernels.OPS
    cpu = torch.device("cpu")
    assert eagle_kernels.select_backend(OP, cpu) == eagle_kernels.select_backend("tree_attention", cpu)
    assert pta_module.OP == OP


# --------------------------------------------------------------------------------------------------
# Page lists (FlashInfer's kv_indptr / kv_indices)
# --------------------------------------------------------------------------------------------------
def test_block_table_from_page_lists(device):
    indptr = torch.tensor([0, 3, 3, 5], device=device)
    indices = torch.tensor([7, 2, 9, 4, 0], dtype=torch.int32, device=device)
    table = eagle_kernels.block_table_from_page_lists(indptr, indices, 4)
    assert table.dtype == torch.int32 and table.device == indices.device
    assert table.tolist() == [[7, 2, 9, -1], [-1, -1, -1, -1], [4, 0, -1, -1]]
    empty = eagle_kernels.block_table_from_page_lists(
        torch.zeros(3, dtype=torch.int64), indices[:0], 2, pad=0
    )
    assert empty.tolist() == [[0, 0], [0, 0]]


def test_page_lists_drive_the_op_as_their_table_does():
    case = make_case(3, 4, 4, 2, 16, "u8", seed=43).to(torch.float32)
    q, k, v, table, seqlens, mask = paged_args(case, 4, seed=43)
    pages = ((seqlens.long() + 4 + 3) // 4).tolist()
    indptr = torch.tensor([0, *torch.tensor(pages).cumsum(0).tolist()])
    indices = torch.cat([table[b, : pages[b]] for b in range(3)])
    rebuilt = eagle_kernels.block_table_from_page_lists(indptr, indices, max(pages))
    want = paged_tree_attention(q, k, v, table, seqlens, mask)
    assert torch.equal(paged_tree_attention(q, k, v, rebuilt, seqlens, mask), want)


@pytest.mark.parametrize(
    "indptr,max_blocks,match",
    [
        ([1, 3], 4, "must rise from 0"),
        ([0, 3, 2], 4, "must rise from 0"),
        ([0, 9], 9, "must rise from 0 to at most len"),
        ([0, 5], 4, "a sequence has 5 pages, more than max_blocks=4"),
        ([], 4, "B \\+ 1 >= 1"),
    ],
)
def test_bad_page_lists_are_refused(indptr, max_blocks, match):
    with pytest.raises(ValueError, match=match):
        eagle_kernels.block_table_from_page_lists(
            torch.tensor(indptr, dtype=torch.int64), torch.arange(5), max_blocks
        )


def test_the_reference_clamps_a_bad_block_id_as_the_kernel_does():
    """Unchecked (CUDA outside debug mode), the reference reads the last block for an id past the pool,
    as the Triton kernel does, instead of indexing past the tensor (a device-side assert on CUDA)."""
    case = make_case(1, 2, 2, 1, 16, "causal", seed=45, prefix_max=0, first_prefix=6).to(torch.float32)
    q, k, v, table, seqlens, _ = paged_args(case, 4)
    bad, clamped = table.clone(), table.clone()
    bad[0, 0], clamped[0, 0] = 10**6, k.shape[0] - 1
    k[-1], v[-1] = 1.0, 2.0
    assert torch.equal(
        paged_tree_attention_ref(q, k, v, bad, seqlens), paged_tree_attention_ref(q, k, v, clamped, seqlens)
    )
