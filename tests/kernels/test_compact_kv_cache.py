from __future__ import annotations

import pytest
import torch

import eagle_kernels
from eagle_kernels import _ext, compact_kv_cache, compact_kv_cache_ref
from tests.kernels.helpers import backends_for, run_with_backend

OP = "compact_kv_cache"


def random_paths(B: int, n: int, steps: int, gen: torch.Generator, index_dtype):
    """Random accepted paths: slot 0 first, then strictly increasing slots, padded with -1."""
    accept_index = torch.full((B, steps), -1, dtype=index_dtype)
    accept_num = torch.zeros(B, dtype=index_dtype)
    for b in range(B):
        k = int(torch.randint(0, min(steps, n), (1,), generator=gen))
        slots = torch.randperm(n - 1, generator=gen)[:k].sort().values + 1
        accept_index[b, 0] = b * n
        accept_index[b, 1 : k + 1] = b * n + slots
        accept_num[b] = k
    return accept_index, accept_num


def loop_oracle(kv, seqlens, accept_index, accept_num, n):
    """The definition spelled out element by element, independent of the vectorised reference."""
    kv = kv.clone()
    for b in range(kv.shape[2]):
        for j in range(int(accept_num[b]) + 1):
            slot = int(accept_index[b, j]) - b * n
            kv[:, :, b, :, int(seqlens[b]) + j] = kv[:, :, b, :, int(seqlens[b]) + slot].clone()
    return kv, seqlens + accept_num.to(torch.int32) + 1


def make_case(B, n, steps, H, D, dtype, index_dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    L, S = 3, 0
    seqlens = torch.randint(0, 20, (B,), generator=gen, dtype=torch.int32)
    S = int(seqlens.max()) + n + int(torch.randint(0, 5, (1,), generator=gen))
    kv = torch.randn(L, 2, B, H, S, D, generator=gen, dtype=torch.float64).to(dtype)
    accept_index, accept_num = random_paths(B, n, steps, gen, index_dtype)
    return [t.to(device) for t in (kv, seqlens, accept_index, accept_num)]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("B,n,steps,H,D", [(1, 8, 4, 1, 16), (3, 13, 7, 2, 24), (5, 64, 7, 4, 64)])
def test_reference_matches_loop_oracle(B, n, steps, H, D, index_dtype):
    kv, seqlens, idx, num = make_case(B, n, steps, H, D, torch.float32, index_dtype, "cpu", seed=B * n)
    want_kv, want_len = loop_oracle(kv, seqlens, idx, num, n)
    got_len = compact_kv_cache_ref(kv, seqlens, idx, num, n)
    assert torch.equal(kv, want_kv)
    assert torch.equal(got_len, want_len)


def test_int64_cache_seqlens_give_int64_lengths_and_the_same_cache(device):
    """SGLang's seq_lens are int64 (DESIGN §4: int32 and int64 index dtypes)."""
    kv, seqlens, idx, num = make_case(3, 9, 4, 2, 16, torch.float32, torch.int64, device, seed=4)
    want = kv.clone()
    want_len = compact_kv_cache_ref(want, seqlens, idx, num, 9)
    for backend in ["torch", *backends_for(OP, device)]:
        got = kv.clone()
        got_len = run_with_backend(
            backend, compact_kv_cache, got, seqlens.long(), idx, num, num_draft_tokens=9
        )
        assert torch.equal(got, want) and got_len.dtype == torch.int64, backend
        assert torch.equal(got_len, want_len.long()), backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_backends_match_reference_fuzzed(device, dtype, index_dtype):
    backends = backends_for(OP, device)
    assert backends, "no accelerated backend reachable; the extension or triton is missing"
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        B = int(torch.randint(1, 6, (1,), generator=gen))
        n = int(torch.randint(2, 33, (1,), generator=gen))
        steps = int(torch.randint(1, n + 1, (1,), generator=gen))
        H = int(torch.randint(1, 4, (1,), generator=gen))
        D = (16, 24, 40, 64)[int(torch.randint(0, 4, (1,), generator=gen))]
        kv, seqlens, idx, num = make_case(B, n, steps, H, D, dtype, index_dtype, device, seed)
        want = kv.clone()
        want_len = compact_kv_cache_ref(want, seqlens, idx, num, n)
        for backend in backends:
            got = kv.clone()
            got_len = run_with_backend(backend, compact_kv_cache, got, seqlens, idx, num, num_draft_tokens=n)
            assert torch.equal(got, want), f"{backend} seed={seed}"
            assert torch.equal(got_len, want_len), f"{backend} seed={seed}"
            assert got_len.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.bool, torch.int64])
def test_quantised_and_integer_caches_are_moved_bit_for_bit(device, dtype):
    """The op copies rows: an fp8 or int8 (quantised) cache, or any other 1/2/4/8-byte dtype, moves
    exactly like a float one on every backend."""
    for seed in range(3):
        kv, seqlens, idx, num = make_case(3, 9, 4, 2, 24, torch.float32, torch.int64, device, seed)
        kv = (kv * 8).to(dtype)
        want = kv.clone()
        want_len = compact_kv_cache_ref(want, seqlens, idx, num, 9)
        for backend in backends_for(OP, device):
            got = kv.clone()
            got_len = run_with_backend(backend, compact_kv_cache, got, seqlens, idx, num, num_draft_tokens=9)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{backend} seed={seed}"
            assert torch.equal(got_len, want_len)


def test_a_16_byte_cache_dtype_is_refused(device):
    kv, seqlens, idx, num = make_case(2, 4, 2, 1, 16, torch.float32, torch.int32, device, 0)
    wide = kv.to(torch.complex128)
    with pytest.raises(
        TypeError, match="kv_cache must have a dtype of 1, 2, 4 or 8 bytes, got torch.complex128"
    ):
        compact_kv_cache(wide, seqlens, idx, num, num_draft_tokens=4)
    if _ext.has_op("compact_kv_cache", wide.device.type):  # the C++ / CUDA op called directly
        with pytest.raises(
            RuntimeError, match="kv_cache must have a dtype of 1, 2, 4 or 8 bytes, got ComplexDouble"
        ):
            _ext.op("compact_kv_cache")(wide, seqlens, idx, num, 4)


def test_noncontiguous_layer_view(device):
    """A cache that is a slice of a bigger buffer (strided batch dim) is updated in place correctly."""
    kv, seqlens, idx, num = make_case(2, 10, 5, 2, 32, torch.float32, torch.int64, device, seed=7)
    big = torch.zeros(kv.shape[0], 2, 4, *kv.shape[3:], device=device)
    big[:, :, ::2] = kv
    view = big[:, :, ::2]
    want = kv.clone()
    compact_kv_cache_ref(want, seqlens, idx, num, 10)
    for backend in backends_for(OP, device) + ["torch"]:
        big[:, :, ::2] = kv
        run_with_backend(backend, compact_kv_cache, view, seqlens, idx, num, num_draft_tokens=10)
        assert torch.equal(big[:, :, ::2], want), backend
        assert torch.equal(big[:, :, 1::2], torch.zeros_like(want)), backend


def test_root_row_not_first_in_the_block(device):
    """A permuted retrive_index can put the root's row anywhere in the block: every backend copies
    accepted column 0 too (the reference does), instead of assuming it is already in place."""
    kv, seqlens, _, _ = make_case(2, 4, 3, 1, 16, torch.float32, torch.int64, device, seed=5)
    idx = torch.tensor([[1, 3, -1], [4, 6, 7]], device=device)  # sequence 0: root at slot 1
    num = torch.tensor([1, 2], device=device)
    want = kv.clone()
    want_len = compact_kv_cache_ref(want, seqlens, idx, num, 4)
    want_oracle, _ = loop_oracle(kv, seqlens, idx, num, 4)
    assert torch.equal(want, want_oracle)
    for backend in backends_for(OP, device):
        got = kv.clone()
        got_len = run_with_backend(backend, compact_kv_cache, got, seqlens, idx, num, num_draft_tokens=4)
        assert torch.equal(got, want), backend
        assert torch.equal(got_len, want_len), backend


def _unchecked_kernels(device: torch.device) -> dict:
    """The kernels as they run when no value check precedes them (CUDA outside debug mode): the
    Triton launcher and, on CUDA, the CUDA op, called directly."""
    from eagle_kernels._backend import available_backends
    from eagle_kernels.compact_kv_cache import _compact_kv_cache_triton

    avail = available_backends(OP, device)
    kernels = {"triton": _compact_kv_cache_triton} if "triton" in avail else {}
    if device.type == "cuda" and "cuda" in avail:
        kernels["cuda"] = _ext.op(OP)
    return kernels


def test_unchecked_kernels_stay_inside_the_row_and_the_tree_on_malformed_input(device):
    """A count of num_spec_steps (one column past accept_index's row: sequence 1 would read past the
    tensor) and a slot outside the sequence's tree (-1: the row before the tree) must not be read;
    the kernels stop at the row's last column and skip the slot."""
    kernels = _unchecked_kernels(device)
    if not kernels:
        pytest.skip(f"no unchecked kernel of {OP} runs on {device.type} here")
    kv, seqlens, _, _ = make_case(2, 4, 3, 1, 16, torch.float32, torch.int64, device, seed=8)
    idx = torch.tensor([[0, -1, 3], [4, 6, 7]], device=device)
    num = torch.tensor([3, 3], dtype=torch.int32, device=device)
    want = kv.clone()  # the same copies with the bad column dropped and the bad slot left in place
    compact_kv_cache_ref(want, seqlens, torch.tensor([[0, 1, 3], [4, 6, 7]], device=device), num - 1, 4)
    for name, kernel in kernels.items():
        got = kv.clone()
        kernel(got, seqlens, idx, num, 4)
        assert torch.equal(got, want), name
    # accept_index wider than the tree with a count past the tree: the destination rows must stay
    # inside it too (they ran to seqlen + count, past S_max into the next head's rows)
    wide = torch.tensor([[0, 1, 2, 3, 1, 2], [4, 5, 6, 7, 5, 6]], device=device)
    big = torch.tensor([5, 5], dtype=torch.int32, device=device)
    want = kv.clone()  # the in-tree part of the path: slots 0..3 onto themselves (no move)
    for name, kernel in kernels.items():
        got = kv.clone()
        kernel(got, seqlens, wide, big, 4)
        assert torch.equal(got, want), name


def test_unchecked_kernels_stay_inside_the_sequences_cache_on_a_bad_length(device):
    """A length whose tree passes S_max (cache_seqlens + n > S_max: a sequence at the end of its
    cache, a stale length) or a negative one is not checked outside debug mode: the kernels moved
    rows past the sequence's cache, into the next head's rows and, from the last head, past the
    tensor. Now only copies whose two rows are inside [0, S_max) run (here: sequence 0's move of
    slot 2 to row 6, inside; its slot 3 would come from row 9), and nothing past the tensor changes."""
    kernels = _unchecked_kernels(device)
    if not kernels:
        pytest.skip(f"no unchecked kernel of {OP} runs on {device.type} here")
    L, B, H, S, D, n = 1, 2, 2, 8, 4, 4
    numel = L * 2 * B * H * S * D
    seqlens = torch.tensor([5, -1], dtype=torch.int32, device=device)  # rows 5..8 of 0..7; negative
    accept_index = torch.tensor([[0, 2, 3], [4, 5, 7]], dtype=torch.int32, device=device)
    accept_num = torch.tensor([2, 2], dtype=torch.int32, device=device)
    for name, kernel in kernels.items():
        backing = -1.0 - torch.arange(numel + 64.0, device=device)  # the cache, then a guard region
        kv = backing[:numel].view(L, 2, B, H, S, D)
        kv.copy_(torch.arange(numel, dtype=torch.float32, device=device).view_as(kv))
        want = kv.clone()
        want[:, :, 0, :, 6] = want[:, :, 0, :, 7]
        guard = backing[numel:].clone()
        kernel(kv, seqlens, accept_index, accept_num, n)
        assert torch.equal(kv, want), name
        assert torch.equal(backing[numel:], guard), f"{name} wrote past the tensor"


def test_accept_index_wider_than_the_tree(device):
    """SGLang's accept_index is speculative_num_steps + 1 wide whatever the tree size, and
    verify_tree_greedy takes num_spec_steps > n: the extra columns are padding."""
    kv, seqlens, idx, num = make_case(3, 4, 4, 2, 16, torch.float32, torch.int64, device, seed=9)
    wide = torch.cat([idx, torch.full((3, 3), -1, dtype=idx.dtype, device=device)], 1)  # 7 columns, n = 4
    want = kv.clone()
    want_len = compact_kv_cache_ref(want, seqlens, idx, num, 4)
    for backend in ["torch", *backends_for(OP, device)]:
        got = kv.clone()
        got_len = run_with_backend(backend, compact_kv_cache, got, seqlens, wide, num, num_draft_tokens=4)
        assert torch.equal(got, want) and torch.equal(got_len, want_len), backend


def test_strided_seqlens_and_counts(device):
    """Views with a stride (every other element of a bigger tensor) are read by value, not as raw
    memory: a kernel that indexed them as contiguous would read the interleaved junk (99, 77)."""
    kv, _, _, _ = make_case(2, 4, 3, 1, 16, torch.float32, torch.int64, device, seed=6)
    seqlens = torch.tensor([2, 99, 5, 99], dtype=torch.int32, device=device)[::2]
    num = torch.tensor([1, 77, 2, 77], dtype=torch.int32, device=device)[::2]
    idx = torch.tensor([[0, 3, -1], [4, 6, 7]], device=device)
    want = kv.clone()
    want_len = compact_kv_cache_ref(want, seqlens, idx, num, 4)
    for backend in backends_for(OP, device):
        got = kv.clone()
        got_len = run_with_backend(backend, compact_kv_cache, got, seqlens, idx, num, num_draft_tokens=4)
        assert torch.equal(got, want), backend
        assert torch.equal(got_len, want_len), backend


def test_int64_counts_are_checked_before_narrowing():
    # 2**32 + 1 would become 1 in int32 and pass; it must be refused as out of range.
    kv, seqlens, idx, num = make_case(2, 10, 5, 2, 16, torch.float32, torch.int64, "cpu", seed=3)
    num[:] = torch.tensor([2**32 + 1, 0])
    for backend in ["torch"] + backends_for(OP, torch.device("cpu")):
        with pytest.raises(ValueError, match="accept_token_num must be in"):
            run_with_backend(backend, compact_kv_cache, kv, seqlens, idx, num, num_draft_tokens=10)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(kv=a["kv"][0]), "6 dimensions"),
        (lambda a: a.update(seqlens=a["seqlens"].float()), "cache_seqlens must have dtype"),
        (lambda a: a.update(seqlens=a["seqlens"].long() + 2**32), "must fit S_max"),  # would wrap in int32
        (lambda a: a.update(idx=a["idx"].float()), "accept_index must have dtype"),
        (lambda a: a.update(num=a["num"][:1]), "accept_token_num must have shape"),
        (lambda a: a["idx"].__setitem__((1, 1), 1), "outside its sequence"),
        (lambda a: a["num"].__setitem__(0, 99), "accept_token_num must be in"),
        (lambda a: a["num"].__setitem__(0, 5), "accept_token_num must be in"),  # = steps: one too many
        (lambda a: a["seqlens"].__setitem__(0, 10_000), "must fit S_max"),
        (lambda a: a["idx"].__setitem__((0, slice(1, 3)), torch.tensor([5, 3])), "strictly increasing"),
        (lambda a: a["idx"].__setitem__((0, slice(1, 3)), torch.tensor([4, 4])), "strictly increasing"),
        (lambda a: a["seqlens"].__setitem__(0, -1), "must be >= 0|must fit S_max"),
        (
            lambda a: a.update(kv=torch.cat([a["kv"], a["kv"][:, :1]], 1)),
            r"\[num_layers, 2, B, Hkv, S_max, D\]",
        ),
        (lambda a: a.update(idx=a["idx"][:, :0]), "at least one column"),
        (lambda a: a.update(n=a["kv"].shape[4] + 1), "exceeds the cache's S_max"),
    ],
)
def test_bad_input_raises(mutate, match):
    kv, seqlens, idx, num = make_case(2, 10, 5, 2, 16, torch.float32, torch.int64, "cpu", seed=3)
    idx[:, :3] = torch.tensor([[0, 2, 4], [10, 11, 15]])
    num[:] = 2
    args = {"kv": kv, "seqlens": seqlens, "idx": idx, "num": num, "n": 10}
    mutate(args)
    for backend in ["torch"] + backends_for(OP, torch.device("cpu")):
        with pytest.raises((ValueError, TypeError), match=match):
            run_with_backend(
                backend,
                compact_kv_cache,
                args["kv"],
                args["seqlens"],
                args["idx"],
                args["num"],
                num_draft_tokens=args["n"],
            )


def test_opcheck_and_compile():
    kv, seqlens, idx, num = make_case(2, 8, 4, 2, 16, torch.float32, torch.int64, "cpu", seed=1)
    torch.library.opcheck(torch.ops.eagle.compact_kv_cache.default, (kv, seqlens, idx, num, 8))

    def step(kv, seqlens, idx, num):
        return compact_kv_cache(kv, seqlens, idx, num, num_draft_tokens=8) * 2

    want = kv.clone()
    want_len = step(want, seqlens, idx, num)
    got = kv.clone()
    got_len = torch.compile(step, fullgraph=True)(got, seqlens, idx, num)
    assert torch.equal(got, want) and torch.equal(got_len, want_len)


@pytest.mark.extension
def test_default_cpu_backend_is_cpp():
    """On CPU the C++ kernel is what runs by default once the extension is built."""
    assert eagle_kernels.select_backend(OP, torch.device("cpu")) == "cpp"


# --------------------------------------------------------------------------------------------------
# Host fast path: cached argument checks, direct eager calls (issue 4)
# --------------------------------------------------------------------------------------------------
def test_cached_checks_fast_path_and_forced_backend(monkeypatch):
    """Bad input still raises after the same shapes passed (strides and num_draft_tokens are part of
    the cached signature, values never are), the eager fast path matches the registered op, and a
    forced backend applies after cached calls."""
    import sys

    module = sys.modules["eagle_kernels.compact_kv_cache"]
    kv, seqlens, idx, num = make_case(2, 10, 5, 2, 16, torch.float32, torch.int64, "cpu", seed=3)
    fast_kv, registered_kv = kv.clone(), kv.clone()
    fast = compact_kv_cache(fast_kv, seqlens, idx, num, num_draft_tokens=10)
    compact_kv_cache(kv.clone(), seqlens, idx, num, num_draft_tokens=10)  # served by the cache
    registered = torch.ops.eagle.compact_kv_cache(registered_kv, seqlens, idx, num, 10)
    assert torch.equal(fast, registered) and torch.equal(fast_kv, registered_kv)
    strided = torch.empty(*kv.shape[:-1], 2 * kv.shape[-1])[..., ::2]
    for _ in range(2):
        with pytest.raises(ValueError, match="last \\(head\\) dimension must be contiguous"):
            compact_kv_cache(strided, seqlens, idx, num, num_draft_tokens=10)
        with pytest.raises(ValueError, match="num_draft_tokens=0 must be >= 1"):
            compact_kv_cache(kv, seqlens, idx, num, num_draft_tokens=0)
        for wrong in (10.0, True, "10"):  # after 10 passed: the cache keys scalars by type too
            with pytest.raises(TypeError, match="num_draft_tokens must be an int"):
                compact_kv_cache(kv, seqlens, idx, num, num_draft_tokens=wrong)
    bad_num = num.clone()
    bad_num[0] = 99
    with pytest.raises(ValueError, match="accept_token_num must be in"):
        compact_kv_cache(kv, seqlens, idx, bad_num, num_draft_tokens=10)
    calls = []
    real = module.compact_kv_cache_ref
    monkeypatch.setattr(module, "compact_kv_cache_ref", lambda *a: calls.append(1) or real(*a))
    forced_kv = kv.clone()
    with eagle_kernels.use_backend("torch"):
        forced = compact_kv_cache(forced_kv, seqlens, idx, num, num_draft_tokens=10)
    assert calls == [1]
    assert torch.equal(forced, fast) and torch.equal(forced_kv, fast_kv)
