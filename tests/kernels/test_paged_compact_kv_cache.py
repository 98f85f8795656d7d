"""paged_compact_kv_cache: the contiguous op's random paths, with the cache scattered into a block
pool, must leave every sequence's positions exactly as compact_kv_cache leaves the contiguous cache,
on every backend. Unused blocks hold NaN and table entries past a sequence's pages -1: a backend
that touched them would fail the comparison of the whole pool."""

from __future__ import annotations

import pytest
import torch

import eagle_kernels
from eagle_kernels import compact_kv_cache_ref, paged_compact_kv_cache, paged_compact_kv_cache_ref
from tests.kernels.helpers import backends_for, run_with_backend
from tests.kernels.test_compact_kv_cache import make_case

OP = "paged_compact_kv_cache"


def to_pool(kv: torch.Tensor, seqlens: torch.Tensor, n: int, page: int, layout: str, seed: int):
    """``kv`` ``[L, 2, B, H, S, D]`` scattered into (pool ``[L, 2, num_blocks, page, H, D]``, table).

    Each sequence gets the blocks covering its prefix and tree (positions < seqlens[b] + n), placed at
    random; spare blocks are NaN (0x7f.. bits for integer dtypes) and the table has a -1 column.
    ``layout`` "trtllm" stores the pool as TensorRT-LLM's [num_blocks, 2, H, page, D] per layer
    (returned as a strided view)."""
    gen = torch.Generator().manual_seed(seed)
    L, _, B, H, S, D = kv.shape
    pages = [(int(s) + n + page - 1) // page for s in seqlens]
    num_blocks = sum(pages) + 2
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.full((B, max(pages) + 1), -1, dtype=torch.int32)
    if layout == "trtllm":
        store = torch.empty(L, num_blocks, 2, H, page, D, dtype=kv.dtype)
        pool = store.transpose(1, 2).transpose(3, 4)  # [L, 2, num_blocks, page, H, D]
    else:
        pool = torch.empty(L, 2, num_blocks, page, H, D, dtype=kv.dtype)
    pool.view(torch.uint8).fill_(0x7F)  # NaN in every float dtype
    used = 0
    for b in range(B):
        for c in range(pages[b]):
            block = int(order[used])
            used += 1
            table[b, c] = block
            end = min((c + 1) * page, S)
            pool[:, :, block, : end - c * page] = kv[:, :, b, :, c * page : end].transpose(2, 3)
    return pool, table


def unpaged(pool: torch.Tensor, table: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """Sequence b's first ``length`` positions of the pool as ``[L, 2, H, length, D]``."""
    page = pool.shape[3]
    rows = [pool[:, :, int(table[b, p // page]), p % page] for p in range(length)]  # [L, 2, H, D] each
    return torch.stack(rows, dim=3)


def assert_pool_matches(pool, table, want_kv, untouched_pool, seqlens, n, what):
    """Every sequence's covered positions equal the contiguous result; every other block is untouched."""
    for b in range(want_kv.shape[2]):
        length = int(seqlens[b]) + n
        got = unpaged(pool.cpu(), table.cpu(), b, length)
        assert torch.equal(
            got.view(torch.uint8), want_kv[:, :, b, :, :length].cpu().contiguous().view(torch.uint8)
        ), f"{what}: sequence {b}"
    used = set(table[table >= 0].tolist())
    for block in range(pool.shape[2]):
        if block not in used:
            assert torch.equal(
                pool[:, :, block].view(torch.uint8), untouched_pool[:, :, block].view(torch.uint8)
            ), f"{what}: spare block {block} changed"


def _backends(device):
    return ["torch", *backends_for(OP, device)]


@pytest.mark.parametrize("layout", ["vllm", "trtllm"])
@pytest.mark.parametrize("page", [1, 3, 16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_every_backend_matches_the_contiguous_op(device, layout, page, index_dtype):
    for seed in range(3):
        B, n, steps = 3, 9, 5 + seed
        kv, seqlens, idx, num = make_case(B, n, steps, 2, 16, torch.float32, index_dtype, "cpu", seed)
        want = kv.clone()
        want_len = compact_kv_cache_ref(want, seqlens, idx, num, n)
        pool, table = to_pool(kv, seqlens, n, page, layout, seed)
        for backend in _backends(device):
            got_pool = pool.clone().to(device) if layout == "vllm" else _restrided(pool, device)
            args = [t.to(device) for t in (table, seqlens, idx, num)]
            got_len = run_with_backend(backend, paged_compact_kv_cache, got_pool, *args, num_draft_tokens=n)
            what = f"{backend} page {page} {layout} seed {seed}"
            assert torch.equal(got_len.cpu(), want_len), what
            assert_pool_matches(got_pool, table, want, pool, seqlens, n, what)


def _restrided(pool: torch.Tensor, device) -> torch.Tensor:
    """A copy of a TensorRT-LLM-strided pool with the same strides, on ``device``."""
    L, _, nb, page, H, D = pool.shape
    store = torch.empty(L, nb, 2, H, page, D, dtype=pool.dtype, device=device)
    view = store.transpose(1, 2).transpose(3, 4)
    view.copy_(pool)
    return view


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, torch.bfloat16])
def test_quantised_caches_are_moved_bit_for_bit(device, dtype):
    kv, seqlens, idx, num = make_case(3, 9, 4, 2, 24, torch.float32, torch.int64, "cpu", seed=2)
    kv = (kv * 8).to(dtype)
    want = kv.clone()
    compact_kv_cache_ref(want, seqlens, idx, num, 9)
    pool, table = to_pool(kv, seqlens, 9, 4, "vllm", seed=2)
    for backend in _backends(device):
        got = pool.clone().to(device)
        run_with_backend(
            backend,
            paged_compact_kv_cache,
            got,
            *(t.to(device) for t in (table, seqlens, idx, num)),
            num_draft_tokens=9,
        )
        assert_pool_matches(got, table, want, pool, seqlens, 9, backend)


def test_a_strided_or_wide_block_table_is_read_by_value(device):
    """A column-major table, every other column of a wider buffer, and a table far wider than any
    sequence reads (columns past them hold -1): the contiguous table's result on every backend. The
    Triton kernel read entry c at row + c and moved one sequence's rows into another's."""
    kv, seqlens, idx, num = make_case(3, 8, 5, 2, 16, torch.float32, torch.int32, "cpu", seed=12)
    pool, table = to_pool(kv, seqlens, 8, 2, "vllm", seed=12)
    wide = torch.full((3, 2 * table.shape[1]), -7, dtype=table.dtype)
    wide[:, ::2] = table
    huge = torch.full((3, 50_000), -1, dtype=table.dtype)
    huge[:, : table.shape[1]] = table
    tables = {"column-major": table.t().contiguous().t(), "every other column": wide[:, ::2], "wide": huge}
    for backend in _backends(device):
        want = pool.clone().to(device)
        args = [t.to(device) for t in (seqlens, idx, num)]
        run_with_backend(backend, paged_compact_kv_cache, want, table.to(device), *args, num_draft_tokens=8)
        for name, strided in tables.items():
            got = pool.clone().to(device)
            run_with_backend(
                backend, paged_compact_kv_cache, got, strided.to(device), *args, num_draft_tokens=8
            )
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{backend}, {name}"


def test_reference_definition_on_a_known_case():
    """One sequence, pages of 2 at blocks [3, 0, 2]: prefix 1, a tree of 4 at positions 1..4, the
    path of slots 0, 2, 3 moves to positions 1, 2, 3 (block 3 slot 1, block 0 slots 0 and 1)."""
    pool = torch.arange(4 * 2, dtype=torch.float32).view(1, 1, 4, 2, 1, 1).expand(1, 2, 4, 2, 1, 1).clone()
    table = torch.tensor([[3, 0, 2]])
    # positions: 0 -> (3,0)=6, 1 -> (3,1)=7, 2 -> (0,0)=0, 3 -> (0,1)=1, 4 -> (2,0)=4
    new_len = paged_compact_kv_cache_ref(
        pool, table, torch.tensor([1]), torch.tensor([[0, 2, 3]]), torch.tensor([2]), 4
    )
    assert new_len.tolist() == [4]
    # slot 0 (pos 1) stays; slot 2 (pos 3, value 1) -> pos 2 (block 0 slot 0); slot 3 (pos 4, value 4) -> pos 3
    assert pool[0, 0, :, :, 0, 0].tolist() == [[1.0, 4.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]


def test_bad_input_raises():
    kv, seqlens, idx, num = make_case(2, 6, 3, 1, 16, torch.float32, torch.int64, "cpu", seed=4)
    pool, table = to_pool(kv, seqlens, 6, 4, "vllm", seed=4)

    def call(**over):
        args = dict(kv=pool.clone(), table=table, seqlens=seqlens, idx=idx, num=num, n=6) | over
        for backend in _backends(torch.device("cpu")):
            run_with_backend(
                backend,
                paged_compact_kv_cache,
                args["kv"],
                args["table"],
                args["seqlens"],
                args["idx"],
                args["num"],
                num_draft_tokens=args["n"],
            )

    bad_id = table.clone()
    bad_id[1, 0] = pool.shape[2]
    cases = [
        (dict(kv=pool[0]), ValueError, "6 dimensions"),
        (dict(kv=pool[:, :, :0]), ValueError, "at least one block of at least one position"),
        (dict(table=table.float()), TypeError, "block_table must have dtype"),
        (dict(table=table[0]), ValueError, "block_table must have 2 dimensions"),
        (dict(seqlens=seqlens[:1]), ValueError, r"cache_seqlens must have shape \[2\]"),
        (
            dict(table=bad_id),
            ValueError,
            rf"block_table\[1, 0\] = {pool.shape[2]} is not a block of the cache",
        ),
        (dict(seqlens=seqlens + 100), ValueError, "must fit the block table's capacity"),
        (dict(n=10_000), ValueError, "num_draft_tokens=10000 exceeds the block table's"),
        (dict(n=0), ValueError, "must be >= 1"),
        (dict(num=num + 10), ValueError, "accept_token_num must be in"),
    ]
    for over, error, match in cases:
        with pytest.raises(error, match=match):
            call(**over)


def test_unchecked_triton_kernel_clamps_a_bad_block_id_into_the_pool(device):
    if "triton" not in backends_for(OP, device):
        pytest.skip("Triton is not reachable here")
    from eagle_kernels.compact_kv_cache import _compact_kv_cache_triton

    kv, seqlens, idx, num = make_case(1, 6, 4, 1, 16, torch.float32, torch.int32, "cpu", seed=6)
    pool, table = to_pool(kv, seqlens, 6, 2, "vllm", seed=6)
    last = pool.shape[2] - 1
    bad, clamped = table.clone(), table.clone()
    col = (int(seqlens[0]) + 1) // 2  # a page of the tree
    bad[0, col], clamped[0, col] = 10**6, last
    got, want = pool.clone().to(device), pool.clone().to(device)
    _compact_kv_cache_triton(got, *(t.to(device) for t in (seqlens, idx, num)), 6, bad.to(device))
    _compact_kv_cache_triton(want, *(t.to(device) for t in (seqlens, idx, num)), 6, clamped.to(device))
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_opcheck_and_compile():
    kv, seqlens, idx, num = make_case(2, 8, 4, 2, 16, torch.float32, torch.int64, "cpu", seed=1)
    pool, table = to_pool(kv, seqlens, 8, 4, "vllm", seed=1)
    pool = pool.nan_to_num()  # (opcheck compares outputs with NaN-unaware checks)
    torch.library.opcheck(
        torch.ops.eagle.paged_compact_kv_cache.default, (pool.clone(), table, seqlens, idx, num, 8)
    )

    def step(kv, table, seqlens, idx, num):
        return paged_compact_kv_cache(kv, table, seqlens, idx, num, num_draft_tokens=8) * 2

    want, got = pool.clone(), pool.clone()
    want_len = step(want, table, seqlens, idx, num)
    got_len = torch.compile(step, fullgraph=True)(got, table, seqlens, idx, num)
    assert torch.equal(got, want) and torch.equal(got_len, want_len)


def test_listed_as_an_op():
    assert OP in eagle_kernels.OPS


@pytest.mark.extension
def test_default_cpu_backend_is_cpp():
    assert eagle_kernels.select_backend(OP, torch.device("cpu")) == "cpp"


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(table=-1), r"block_table\[1, 0\] = -1 is not a block of the cache"),
        (dict(seqlens=100), r"must fit the block table's capacity \(max_blocks \* page_size\)"),
        (dict(n=10_000), "num_draft_tokens=10000 must be >= 1 and fit the block table's"),
        (dict(num=9), "accept_token_num must be in"),
    ],
)
def test_cpp_op_checks_its_own_arguments(over, match):
    """The extension op validates too (it can be called directly as torch.ops.eagle_C.paged_compact_kv_cache)."""
    if "cpp" not in backends_for(OP, torch.device("cpu")):
        pytest.skip("the C++ extension is not built")
    kv, seqlens, idx, num = make_case(2, 6, 3, 1, 16, torch.float32, torch.int64, "cpu", seed=4)
    pool, table = to_pool(kv, seqlens, 6, 4, "vllm", seed=4)
    n = over.get("n", 6)
    if "table" in over:
        table[1, 0] = over["table"]
    if "seqlens" in over:
        seqlens = seqlens + over["seqlens"]
    if "num" in over:
        num = num + over["num"]
    with pytest.raises((ValueError, RuntimeError), match=match):
        torch.ops.eagle_C.paged_compact_kv_cache(pool, table, seqlens, idx, num, n)


def test_the_reference_clamps_a_bad_block_id_as_the_kernel_does():
    kv, seqlens, idx, num = make_case(1, 6, 4, 1, 16, torch.float32, torch.int32, "cpu", seed=6)
    pool, table = to_pool(kv, seqlens, 6, 2, "vllm", seed=6)
    pool = pool.nan_to_num()
    col = (int(seqlens[0]) + 1) // 2
    bad, clamped = table.clone(), table.clone()
    bad[0, col], clamped[0, col] = 10**6, pool.shape[2] - 1
    got, want = pool.clone(), pool.clone()
    paged_compact_kv_cache_ref(got, bad, seqlens, idx, num, 6)
    paged_compact_kv_cache_ref(want, clamped, seqlens, idx, num, 6)
    assert torch.equal(got, want)


def test_an_empty_batch_moves_nothing(device):
    """B = 0 (an engine step with no request in this group): the C++ op read it as a contiguous cache
    and indexed lengths it does not have (a segfault)."""
    pool = torch.randn(1, 2, 4, 4, 1, 8, device=device)
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    for backend in _backends(device):
        got = pool.clone()
        lens = run_with_backend(
            backend,
            paged_compact_kv_cache,
            got,
            torch.zeros(0, 2, dtype=torch.int32, device=device),
            empty,
            torch.zeros(0, 3, dtype=torch.int32, device=device),
            empty,
            num_draft_tokens=3,
        )
        assert lens.shape == (0,) and torch.equal(got, pool), backend
