"""tree_speculative_sampling / tree_speculative_sampling_draft_probs and the SGLang drop-in.

* the reference against a scalar, per-sequence oracle written from the docstring definition;
* every backend against the reference on fuzzed trees (exact equality of all integer outputs);
* output invariants, one-hot targets == greedy verification, bad input;
* the key property: emitted tokens follow the target distribution. A tiny target "model" (V = 5,
  distributions that depend on the whole prefix) is enumerated exactly; many sampled rounds give the
  joint distribution of the first two emitted tokens, compared with a chi-square test, for top-k
  drafts and for drafts sampled i.i.d. from a draft model. A sampler with a known bug (the bonus
  token drawn without removing the rejected mass) must fail the same test.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import eagle_kernels
from eagle_kernels import (
    tree_speculative_sampling,
    tree_speculative_sampling_draft_probs,
    tree_speculative_sampling_draft_probs_ref,
    tree_speculative_sampling_ref,
    verify_tree_greedy_ref,
)
from eagle_kernels.tree_speculative_sampling import sglang_tree_speculative_sampling_target_only
from tests.kernels.helpers import backends_for, run_with_backend
from tests.kernels.random_trees import random_parents, trees_from_parents

# the package re-exports a function of the same name, so fetch the module itself
tss = importlib.import_module("eagle_kernels.tree_speculative_sampling")
OP = "tree_speculative_sampling"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _small_triton_blocks(monkeypatch):
    """Several vocabulary blocks even for the small test vocabularies."""
    monkeypatch.setattr(tss, "TRITON_BLOCK_V", 32)


# --------------------------------------------------------------------------------------------------
# Random inputs
# --------------------------------------------------------------------------------------------------
def sibling_distinct_tokens(parents: list[int], V: int, gen: torch.Generator) -> list[int]:
    """A token per slot, distinct among the children of each node (top-k drafts are)."""
    tokens = [int(torch.randint(0, V, (1,), generator=gen))] + [0] * (len(parents) - 1)
    children: dict[int, list[int]] = {}
    for slot, parent in enumerate(parents[1:], start=1):
        children.setdefault(parent, []).append(slot)
    for kids in children.values():
        for slot, tok in zip(kids, torch.randperm(V, generator=gen)[: len(kids)].tolist()):
            tokens[slot] = tok
    return tokens


def target_rows(B: int, n: int, V: int, cand: torch.Tensor, parents: torch.Tensor, gen) -> torch.Tensor:
    """Target rows with mass on the children's tokens (so paths get deep), some top-k truncated
    (exact zeros) and some one-hot."""
    logits = torch.randn(B, n, V, generator=gen, dtype=torch.float64) * 2
    for b in range(B):
        for slot in range(1, n):
            logits[b, parents[b, slot], cand[b, slot]] += float(torch.rand((), generator=gen) * 3)
    probs = torch.softmax(logits, -1)
    kind = torch.randint(0, 6, (B, n, 1), generator=gen)
    top3 = probs.topk(min(3, V), -1).indices
    truncated = torch.zeros_like(probs).scatter(-1, top3, probs.gather(-1, top3))
    probs = torch.where(kind == 0, truncated / truncated.sum(-1, keepdim=True), probs)
    one_hot = torch.zeros_like(probs).scatter(-1, probs.argmax(-1, keepdim=True), 1.0)
    probs = torch.where(kind == 1, one_hot, probs)
    return probs.float()


def make_case(B, n, V, depth, seed, *, index_dtype=torch.int64, token_dtype=torch.int64, draft=False):
    """Inputs of one call: B random trees of n slots (depth <= depth), vocabulary V."""
    gen = torch.Generator().manual_seed(seed)
    parent_lists = [random_parents(n, depth, gen) for _ in range(B)]
    trees = trees_from_parents(parent_lists, index_dtype)
    if draft:  # children drawn i.i.d. from their parent's draft row (repeats allowed)
        q = torch.softmax(torch.randn(B, n, V, generator=gen) * 2, -1)
        parents = trees.parents.clamp(min=0)
        q_parent = q[torch.arange(B)[:, None], parents]
        cand = torch.multinomial(q_parent.reshape(-1, V), 1, generator=gen).view(B, n)
    else:
        q = None
        cand = torch.tensor([sibling_distinct_tokens(p, V, gen) for p in parent_lists])
    probs = target_rows(B, n, V, cand, trees.parents.clamp(min=0), gen)
    if draft:
        probs = (0.5 * probs + 0.5 * q[torch.arange(B)[:, None], torch.arange(n)]).float()
        probs = probs / probs.sum(-1, keepdim=True)
    u = torch.rand(B, n, generator=gen)
    uf = torch.rand(B, generator=gen)
    steps = int(torch.randint(1, depth + 2, (1,), generator=gen).clamp(max=n))
    args = [
        cand.to(token_dtype),
        trees.retrive_index,
        trees.retrive_next_token,
        trees.retrive_next_sibling,
        probs,
    ]
    return args + ([q] if draft else []) + [u, uf], steps, trees


def fuzz_shapes(count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        B = int(torch.randint(1, 6, (1,), generator=gen))
        n = int(torch.randint(1, 20, (1,), generator=gen))
        V = int(torch.randint(max(n, 2), 90, (1,), generator=gen))
        depth = int(torch.randint(1, 7, (1,), generator=gen))
        yield i, B, n, V, depth


# --------------------------------------------------------------------------------------------------
# Scalar oracle: the docstring definition, one sequence at a time, in Python / numpy scalars
# --------------------------------------------------------------------------------------------------
SCALE = 2**60


def _mass(p: float) -> int:
    return int(float(np.float32(p)) * SCALE) if 0 <= p <= tss.PROB_LIMIT else 0


def _draw(masses: list[int], u: float) -> int:
    threshold = int(float(np.float32(u)) * float(sum(masses)))
    cum = 0
    for x, m in enumerate(masses):
        cum += m
        if cum > threshold:
            return x
    return len(masses) - 1


def oracle(cand, ri, nt, ns, P, Q, U, UF, steps, lossy=False, t_single=1.0, t_acc=1.0):
    B, n, V = P.shape
    cand, ri, nt, ns = (t.long().tolist() for t in (cand, ri, nt, ns))
    P = P.double().numpy()
    Q = None if Q is None else Q.double().numpy()
    U, UF = U.numpy(), UF.numpy()
    predicts = [0] * (B * n)
    accept = [[-1] * steps for _ in range(B)]
    nums = []
    for b in range(B):
        cur, num, coin = 0, 0, np.float32(U[b, 0])
        accept[b][0] = ri[b][0]
        tried, s_last = [], 0.0
        while num + 1 < steps:
            child, chosen, tried = nt[b][cur], -1, []
            acc, s, w = np.float32(0), 0.0, 1.0
            while child != -1:
                tok = cand[b][child]
                p = np.float32(P[b, cur, tok])
                if Q is None:
                    if lossy:
                        acc = np.float32(acc + p)
                        ok = coin <= np.float32(acc / np.float32(max(t_acc, 1e-9))) or p >= np.float32(
                            t_single
                        )
                    elif tok in tried:
                        ok = False
                    else:
                        acc = np.float32(acc + p)
                        ok = coin < acc
                    if not ok and tok not in tried:
                        tried.append(tok)
                else:
                    q = float(np.float32(Q[b, cur, tok]))
                    r = max(float(p) - s * q, 0.0)
                    ok = (float(U[b, child]) * w) * q < r and w > 0
                    if not ok:
                        s += w
                        row = [max(float(P[b, cur, x]) - s * float(Q[b, cur, x]), 0.0) for x in range(V)]
                        w = sum(int(r * SCALE) for r in row) / SCALE
                if ok:
                    chosen = child
                    break
                child = ns[b][child]
            if chosen == -1:
                s_last = s
                break
            predicts[ri[b][cur]] = cand[b][chosen]
            num += 1
            accept[b][num] = ri[b][chosen]
            cur, coin, tried = chosen, np.float32(U[b, chosen]), []
        if Q is not None and s_last > 0:
            masses = [
                int(max(float(P[b, cur, x]) - s_last * float(Q[b, cur, x]), 0.0) * SCALE) for x in range(V)
            ]
        else:
            masses = [_mass(P[b, cur, x]) for x in range(V)]
        for tok in tried:
            masses[tok] = 0
        if sum(masses) == 0:
            masses = [_mass(P[b, cur, x]) for x in range(V)]
        predicts[ri[b][cur]] = _draw(masses, UF[b])
        nums.append(num)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    return i32(predicts), i32(accept), i32(nums)


def assert_same(got, want, msg=""):
    for name, g, w in zip(("predicts", "accept_index", "accept_token_num"), got, want):
        assert g.dtype == torch.int32, f"{name} dtype {g.dtype} {msg}"
        assert torch.equal(g.cpu(), w.cpu()), f"{name} differs {msg}\n got {g}\nwant {w}"


# --------------------------------------------------------------------------------------------------
# Reference vs oracle, backends vs reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("draft", [False, True], ids=["topk", "sampled"])
def test_reference_matches_scalar_oracle(draft):
    for i, B, n, V, depth in fuzz_shapes(40, seed=11 + draft):
        args, steps, _ = make_case(B, n, min(V, 40), depth, seed=100 + i, draft=draft)
        want = oracle(*args[:5], args[5] if draft else None, *args[-2:], steps)
        ref = tree_speculative_sampling_draft_probs_ref if draft else tree_speculative_sampling_ref
        assert_same(ref(*args, num_spec_steps=steps), want, f"case {i}")


def test_lossy_reference_matches_scalar_oracle():
    for i, B, n, V, depth in fuzz_shapes(25, seed=5):
        args, steps, _ = make_case(B, n, V, depth, seed=300 + i)
        ts, ta = [(1.0, 1.0), (0.3, 0.6), (0.9, 0.2)][i % 3]
        got = tss._tree_sampling_torch(*args[:5], None, *args[5:], steps, True, ts, ta)[:3]
        assert_same(got, oracle(*args[:5], None, *args[5:], steps, True, ts, ta), f"case {i}")


def _backends(device: torch.device = CPU):
    backends = backends_for(OP, device)
    assert backends, "no accelerated backend reachable; the extension or triton is missing"
    return backends


def _on(device, args):
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def _one_level(device, probs, u_root, u_final):
    """Root token 0 with children 0 (slot 1) and 1 (slot 2), every node's row ``probs`` (V = 3)."""
    args = [
        torch.tensor([[0, 0, 1]]),
        torch.arange(3)[None],
        torch.tensor([[1, -1, -1]]),
        torch.tensor([[-1, 2, -1]]),
        torch.tensor(probs, dtype=torch.float32).expand(1, 3, 3).contiguous(),
        torch.tensor([[u_root, 0.5, 0.5]]),
        torch.tensor([u_final]),
    ]
    return _on(device, args)


@pytest.mark.parametrize(
    "probs, u_root, u_final, accepted, bonus",
    [
        # u = 0 exactly (a float32 uniform is, once in 2**24 draws): a child of probability 0 is
        # still rejected (u < mass, not <=), and slot 2 (p = 1) accepted
        ([0.0, 1.0, 0.0], 0.0, 0.0, [0, 2], [1]),
        # every child rejected by float32 rounding (masses .4999 + .5 < u): the residual has no
        # mass left, and the bonus falls back to p itself, never to token 2 (p = 0)
        ([0.4999, 0.5, 0.0], 0.99995, 0.3, [0], [0, 1]),
    ],
    ids=["u0-zero-mass-child", "rounding-rejects-all"],
)
def test_boundary_draws_never_emit_a_token_of_probability_zero(
    device, probs, u_root, u_final, accepted, bonus
):
    for backend in ["torch", *_backends(device)]:
        predicts, index, num = run_with_backend(
            backend, tree_speculative_sampling, *_one_level(device, probs, u_root, u_final), num_spec_steps=2
        )
        taken = index[0, : int(num[0]) + 1].tolist()
        assert taken == accepted, backend
        assert int(predicts[taken[-1]]) in bonus, backend  # the token after the path


def test_a_bonus_draw_at_u_zero_skips_leading_tokens_of_mass_zero(device):
    """The inverse-CDF draw takes the first token whose cumulative mass exceeds u * total: at u = 0
    that is the first token with mass, not token 0 (p = 0)."""
    args = [torch.tensor([[0]]), torch.tensor([[0]]), torch.tensor([[-1]]), torch.tensor([[-1]])]
    args += [torch.tensor([[[0.0, 1.0, 0.0]]]), torch.tensor([[0.5]]), torch.tensor([0.0])]
    for backend in ["torch", *_backends(device)]:
        predicts, _, num = run_with_backend(
            backend, tree_speculative_sampling, *_on(device, args), num_spec_steps=1
        )
        assert predicts.tolist()[0] == 1 and int(num[0]) == 0, backend


# The fuzzed comparisons run every backend of the test device (the CUDA and Triton kernels on a GPU)
# against the reference on CPU: exact equality, so the kernels' draws are the reference's.
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_backends_match_reference_fuzzed(device, index_dtype):
    """80 calls (~240 trees) per index dtype, every backend, exact equality."""
    token_dtype = torch.int64 if index_dtype == torch.int32 else torch.int32
    for i, B, n, V, depth in fuzz_shapes(80, seed=int(index_dtype == torch.int32)):
        args, steps, _ = make_case(B, n, V, depth, seed=i, index_dtype=index_dtype, token_dtype=token_dtype)
        want = tree_speculative_sampling_ref(*args, num_spec_steps=steps)
        for backend in _backends(device):
            got = run_with_backend(
                backend, tree_speculative_sampling, *_on(device, args), num_spec_steps=steps
            )
            assert_same(got, want, f"{backend} case {i}")


def test_backends_match_reference_draft_probs_fuzzed(device):
    for i, B, n, V, depth in fuzz_shapes(45, seed=7):
        index_dtype = (torch.int32, torch.int64)[i % 2]
        args, steps, _ = make_case(B, n, V, depth, seed=1000 + i, index_dtype=index_dtype, draft=True)
        want = tree_speculative_sampling_draft_probs_ref(*args, num_spec_steps=steps)
        for backend in _backends(device):
            got = run_with_backend(
                backend, tree_speculative_sampling_draft_probs, *_on(device, args), num_spec_steps=steps
            )
            assert_same(got, want, f"{backend} case {i}")


def test_backends_match_reference_lossy(device):
    for i, B, n, V, depth in fuzz_shapes(12, seed=9):
        args, steps, _ = make_case(B, n, V, depth, seed=2000 + i)
        ts, ta = [(1.0, 1.0), (0.3, 0.6), (0.9, 0.2)][i % 3]
        want = tss._tree_sampling_torch(*args[:5], None, *args[5:], steps, True, ts, ta)[:3]
        on = _on(device, args)
        for backend in _backends(device):
            got = run_with_backend(backend, tss._run, *on[:5], None, *on[5:], steps, True, ts, ta)
            assert_same(got, want, f"{backend} case {i}")


@pytest.mark.parametrize("draft", [False, True], ids=["topk", "sampled"])
def test_num_spec_steps_past_the_tree_pads_accept_index(device, draft):
    """num_spec_steps > n (SGLang sizes accept_index by its step count, whatever the tree) is taken as
    by verify_tree_greedy: the result of num_spec_steps = n, with -1 in the extra columns."""
    fn = tree_speculative_sampling_draft_probs if draft else tree_speculative_sampling
    for seed in range(3):
        args, _, _ = make_case(3, 5, 11, 4, seed=seed, draft=draft)
        want = run_with_backend("torch", fn, *args, num_spec_steps=5)
        for backend in ["torch", *_backends(device)]:
            got = run_with_backend(backend, fn, *_on(device, args), num_spec_steps=8)
            assert got[1].shape == (3, 8)
            assert torch.equal(got[1][:, 5:].cpu(), torch.full((3, 3), -1, dtype=torch.int32))
            assert_same((got[0], got[1][:, :5], got[2]), want, f"{backend} seed {seed}")


def test_large_vocab_and_strided_rows(monkeypatch):
    """Vocabularies of several 1024-token blocks (the C++ kernel's and Triton's default), rows given
    as a strided view that shares memory between sequences."""
    monkeypatch.setattr(tss, "TRITON_BLOCK_V", 1024)
    gen = torch.Generator().manual_seed(3)
    B, n, V = 3, 9, 2500
    base = torch.softmax(torch.randn(B + n, V, generator=gen) * 4, -1)
    probs = base.as_strided((B, n, V), (V, V, 1))
    args, steps, _ = make_case(B, n, 40, 3, seed=4)
    args[0] = torch.randint(0, V, (B, n), generator=gen)
    args[0][:, 1:] = torch.stack([torch.randperm(V, generator=gen)[: n - 1] for _ in range(B)])
    args[4] = probs
    for _ in range(3):
        args[5] = torch.rand(B, n, generator=gen)
        args[6] = torch.rand(B, generator=gen)
        want = tree_speculative_sampling_ref(*args, num_spec_steps=steps)
        for backend in _backends():
            assert_same(
                run_with_backend(backend, tree_speculative_sampling, *args, num_spec_steps=steps), want
            )


# --------------------------------------------------------------------------------------------------
# Invariants and greedy equivalence
# --------------------------------------------------------------------------------------------------
def check_invariants(out, args, steps, trees):
    predicts, accept_index, num = out
    cand = args[0].long()
    B, n = cand.shape
    for b in range(B):
        k = int(num[b])
        assert 0 <= k <= steps - 1
        path = accept_index[b].tolist()
        assert all(r == -1 for r in path[k + 1 :]), "padding after the accepted path must be -1"
        assert path[0] == b * n
        slots = [r - b * n for r in path[: k + 1]]
        for parent, child in zip(slots, slots[1:]):
            assert int(trees.parents[b, child]) == parent, "accepted path must follow tree edges"
            assert int(predicts[b * n + parent]) == int(cand[b, child]), "predicts holds the next token"
        off_path = set(range(b * n, b * n + n)) - {b * n + s for s in slots}
        assert all(int(predicts[r]) == 0 for r in off_path)
        assert 0 <= int(predicts[b * n + slots[-1]]) < args[4].shape[-1]


@pytest.mark.parametrize("draft", [False, True], ids=["topk", "sampled"])
def test_invariants(draft):
    fn = tree_speculative_sampling_draft_probs if draft else tree_speculative_sampling
    for i, B, n, V, depth in fuzz_shapes(30, seed=21):
        args, steps, trees = make_case(B, n, V, depth, seed=500 + i, draft=draft)
        for backend in ["torch", *backends_for(OP, CPU, exclude=("triton",))]:  # others equal torch
            check_invariants(run_with_backend(backend, fn, *args, num_spec_steps=steps), args, steps, trees)


def test_one_hot_targets_reproduce_greedy_verification():
    """With one-hot targets sampling is deterministic and must equal verify_tree_greedy."""
    for i, B, n, V, depth in fuzz_shapes(40, seed=31):
        args, steps, _ = make_case(B, n, V, depth, seed=700 + i)
        gen = torch.Generator().manual_seed(i)
        cand = args[0]
        # argmax = a child's token half of the time, so paths get accepted
        pick = torch.where(
            torch.rand(B, n, generator=gen) < 0.6, cand.roll(-1, 1), torch.randint(0, V, (B, n))
        )
        args[4] = torch.nn.functional.one_hot(pick.long(), V).float()
        want = verify_tree_greedy_ref(*args[:4], pick.long(), num_spec_steps=steps)
        for backend in ["torch", *(_backends() if i < 10 else backends_for(OP, CPU, exclude=("triton",)))]:
            assert_same(
                run_with_backend(backend, tree_speculative_sampling, *args, num_spec_steps=steps), want
            )


# --------------------------------------------------------------------------------------------------
# SGLang drop-in
# --------------------------------------------------------------------------------------------------
def _sglang_buffers(B, n, steps, V, extra_predicts=0):
    predicts = torch.full((B * n + extra_predicts,), 7, dtype=torch.int32)
    return predicts, torch.full((B, steps), -1, dtype=torch.int32), torch.zeros(B, dtype=torch.int32)


def test_sglang_drop_in_matches_functional_op():
    for i, B, n, V, depth in fuzz_shapes(20, seed=41):
        args, steps, _ = make_case(B, n, V, depth, seed=900 + i)
        cand, ri, nt, ns, probs, u, uf = args
        # SGLang allocates predicts with B*n + 1 entries (eagle_info: predict_shape[-1] += 1)
        predicts, accept_index, num = _sglang_buffers(B, n, steps, V, extra_predicts=i % 2)
        draft_scratch = torch.zeros_like(probs)
        sglang_tree_speculative_sampling_target_only(
            predicts, accept_index, num, cand, ri, nt, ns, u, uf, probs, draft_scratch
        )
        want = tree_speculative_sampling(*args, num_spec_steps=steps)
        on_path = accept_index[accept_index >= 0].long()
        assert torch.equal(predicts[on_path], want[0][on_path])
        keep = torch.ones(predicts.shape[0], dtype=torch.bool)
        keep[on_path] = False
        assert bool((predicts[keep] == 7).all()), "rows off the path (and the tail) must be left untouched"
        assert torch.equal(accept_index, want[1]) and torch.equal(num, want[2])
        assert bool((draft_scratch == 0).all())


def _ngram_tree(B: int, pads: int, V: int, seed: int):
    """SGLang's n-gram tree: a draft chain a -> c under the root, then ``pads`` padding slots of token 0
    under the root (cpp_ngram/result.cpp pads a short draft with token 0, parent 0). Returns the
    sgl-kernel arguments after the three outputs (target_probs last), for n = 3 + pads."""
    gen = torch.Generator().manual_seed(seed)
    n = 3 + pads
    cand = torch.zeros(B, n, dtype=torch.int64)
    cand[:, 1] = torch.randint(1, V, (B,), generator=gen)  # a (never 0: the pads are the repeats)
    cand[:, 2] = torch.randint(0, V, (B,), generator=gen)  # c, a's child
    ri = torch.arange(B * n).view(B, n)
    nt = torch.full((B, n), -1)
    nt[:, 0], nt[:, 1] = 1, 2
    ns = torch.full((B, n), -1)
    chain = [1, *range(3, n)]  # the root's children in sibling order: a, then the pads
    for left, right in zip(chain, chain[1:]):
        ns[:, left] = right
    probs = torch.softmax(torch.randn(B, n, V, generator=gen) * 2, -1)
    probs[:, :, 0] += 0.5  # make token 0 likely, so the pads are tried and accepted at times
    probs /= probs.sum(-1, keepdim=True)
    u, uf = torch.rand(B, n, generator=gen), torch.rand(B, generator=gen)
    return [cand, ri, nt, ns, u, uf, probs]


def test_sglang_drop_in_skips_the_repeated_padding_of_ngram_drafts():
    """SGLang's n-gram mode pads short drafts with token 0 under the root, so siblings repeat a token;
    the drop-in raised "two siblings carry the same token" on CPU (and on CUDA in debug mode). A repeated
    token is now skipped, as every backend's walk already did: once its first copy is rejected the
    residual holds none of its mass. So a tree with three pads gives what the tree with one gives."""
    B, V = 6, 12
    for seed in range(8):
        padded, single = _ngram_tree(B, 3, V, seed), _ngram_tree(B, 1, V, seed)
        # the same uniforms and probabilities on the slots both trees have
        single[4:] = padded[4][:, :4].contiguous(), padded[5], padded[6][:, :4].contiguous()
        for backend in ["torch", *_backends()]:
            results = []
            for args, n in ((padded, 6), (single, 4)):
                predicts, accept_index, num = _sglang_buffers(B, n, 4, V)
                run_with_backend(
                    backend, sglang_tree_speculative_sampling_target_only, predicts, accept_index, num, *args
                )
                rows = torch.where(accept_index >= 0, accept_index - torch.arange(B)[:, None] * n, -1)
                tokens = torch.where(accept_index >= 0, predicts[accept_index.clamp(min=0).long()], -1)
                results.append((rows, tokens, num))
            (rows6, tokens6, num6), (rows4, tokens4, num4) = results
            assert torch.equal(rows6, rows4) and torch.equal(tokens6, tokens4), f"{backend} seed {seed}"
            assert torch.equal(num6, num4), f"{backend} seed {seed}"


def test_sglang_drop_in_takes_wider_accept_index_and_no_draft_probs():
    """SGLang sizes accept_index [B, speculative_num_steps + 1] whatever the tree size, and newer
    callers pass no draft_probs scratch: the path is written first, the extra columns stay -1."""
    args, steps, _ = make_case(3, 6, 20, 5, seed=7)
    cand, ri, nt, ns, probs, u, uf = args
    want = tree_speculative_sampling(*args, num_spec_steps=6)
    predicts, accept_index, num = _sglang_buffers(3, 6, 9, 20)  # 9 columns > n = 6
    accept_index.fill_(5)  # stale values: the drop-in must write every column
    sglang_tree_speculative_sampling_target_only(
        predicts, accept_index, num, cand, ri, nt, ns, u, uf, target_probs=probs
    )
    assert torch.equal(accept_index[:, :6], want[1]) and bool((accept_index[:, 6:] == -1).all())
    assert torch.equal(num, want[2])


def test_sglang_thresholds_need_explicit_lossy():
    args, steps, _ = make_case(2, 8, 20, 3, seed=1)
    cand, ri, nt, ns, probs, u, uf = args
    with pytest.raises(ValueError, match="lossy"):
        sglang_tree_speculative_sampling_target_only(
            *_sglang_buffers(2, 8, steps, 20), cand, ri, nt, ns, u, uf, probs, torch.zeros_like(probs), 0.5
        )
    bufs = _sglang_buffers(2, 8, steps, 20)
    sglang_tree_speculative_sampling_target_only(
        *bufs, cand, ri, nt, ns, u, uf, probs, torch.zeros_like(probs), 0.5, 0.8, lossy=True
    )
    want = oracle(cand, ri, nt, ns, probs, None, u, uf, steps, True, 0.5, 0.8)
    assert torch.equal(bufs[1], want[1]) and torch.equal(bufs[2], want[2])
    for single, acc, name in ((1.5, 1.0, "threshold_single"), (0.5, -0.1, "threshold_acc")):
        with pytest.raises(
            ValueError, match=rf"{name} must be in \[0, 1\], got {acc if name == 'threshold_acc' else single}"
        ):
            sglang_tree_speculative_sampling_target_only(
                *_sglang_buffers(2, 8, steps, 20),
                cand,
                ri,
                nt,
                ns,
                u,
                uf,
                probs,
                torch.zeros_like(probs),
                single,
                acc,
                lossy=True,
            )


def test_sglang_lossy_threshold_single_accepts_likely_children():
    """threshold_single = 0: every first child is accepted (SGLang's relaxed rule)."""
    args, steps, trees = make_case(3, 12, 30, 4, seed=2)
    cand, ri, nt, ns, probs, u, uf = args
    bufs = _sglang_buffers(3, 12, steps, 30)
    sglang_tree_speculative_sampling_target_only(
        *bufs, cand, ri, nt, ns, u, uf, probs, torch.zeros_like(probs), 0.0, 1.0, lossy=True
    )
    for b in range(3):
        slot, k = 0, 0
        while k < steps - 1 and int(nt[b, slot]) != -1:
            slot, k = int(nt[b, slot]), k + 1
        assert int(bufs[2][b]) == k


def test_sglangs_own_case_with_a_sibling_linked_backwards():
    """sgl-kernel's test_tree_speculative_sampling_target_only: sequence 1's root has children 4 then 1
    (slot 4's sibling is slot 1, an earlier slot). Siblings may come in any order; the walk tries
    them in link order on every backend, giving upstream's expected outputs."""
    candidates = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    ri = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    nt = torch.tensor([[1, 2, -1, 4, 5, -1], [4, 2, 3, -1, 5, -1]])
    ns = torch.tensor([[-1, 3, -1, -1, -1, -1], [-1, -1, -1, -1, 1, -1]])
    logits = torch.full((2, 6, 20), 1.0)
    for b, slot, tok in [(0, 0, 3), (0, 3, 4), (0, 4, 5), (1, 0, 11), (1, 4, 12)]:
        logits[b, slot, tok] = 10
    logits[..., 18] = torch.where(logits.amax(-1) < 10, 10.0, 1.0)
    probs = torch.softmax(logits / 0.01, -1)
    coins, coin_final = torch.rand(2, 6, generator=torch.Generator().manual_seed(0)), torch.full((2,), 0.5)
    expected = {  # (threshold_single, threshold_acc): (predicts, accept_index, accept_token_num)
        (1.0, 1.0): ([3, -1, -1, 4, 5, 18, 11, -1, -1, -1, 12, 18], [[0, 3, 4, 5], [6, 10, 11, -1]], [3, 2]),
        (0.0, 0.0): (
            [1, 2, 18, -1, -1, -1, 11, -1, -1, -1, 12, 18],
            [[0, 1, 2, -1], [6, 10, 11, -1]],
            [2, 2],
        ),
    }
    for (t_single, t_acc), (predicts, accept_index, num) in expected.items():
        for backend in ["torch", *_backends()]:
            bufs = _sglang_buffers(2, 6, 4, 20)
            bufs[0].fill_(-1)
            run_with_backend(
                backend,
                sglang_tree_speculative_sampling_target_only,
                *bufs,
                candidates,
                ri,
                nt,
                ns,
                coins,
                coin_final,
                probs,
                torch.zeros_like(probs),
                t_single,
                t_acc,
                lossy=t_single != 1.0,
            )
            got = (bufs[0].tolist(), bufs[1].tolist(), bufs[2].tolist())
            assert got == (predicts, accept_index, num), (backend, t_single)


def test_sglang_drop_in_takes_the_newer_signature_without_draft_probs():
    """Newer sgl-kernel dropped draft_probs: (..., target_probs, threshold_single, threshold_acc,
    deterministic). Called positionally that way, the thresholds land where they belong."""
    args, steps, _ = make_case(2, 8, 20, 3, seed=12)
    cand, ri, nt, ns, probs, u, uf = args
    older = _sglang_buffers(2, 8, steps, 20)
    sglang_tree_speculative_sampling_target_only(
        *older, cand, ri, nt, ns, u, uf, probs, None, 0.0, 0.5, True, lossy=True
    )
    newer = _sglang_buffers(2, 8, steps, 20)
    sglang_tree_speculative_sampling_target_only(
        *newer, cand, ri, nt, ns, u, uf, probs, 0.0, 0.5, True, lossy=True
    )
    for got, want in zip(newer, older):
        assert torch.equal(got, want)
    lossless = _sglang_buffers(2, 8, steps, 20)
    sglang_tree_speculative_sampling_target_only(*lossless, cand, ri, nt, ns, u, uf, probs, 1.0, 1.0, True)
    mixed = _sglang_buffers(2, 8, steps, 20)  # positional threshold_single, keyword threshold_acc
    sglang_tree_speculative_sampling_target_only(
        *mixed, cand, ri, nt, ns, u, uf, probs, 0.0, threshold_acc=0.5, lossy=True
    )
    for got, want in zip(mixed, older):
        assert torch.equal(got, want)
    sglang_tree_speculative_sampling_target_only(
        *_sglang_buffers(2, 8, steps, 20), cand, ri, nt, ns, u, uf, probs, 1.0, 1.0, deterministic=False
    )
    with pytest.raises(TypeError, match="multiple values for threshold_single"):
        sglang_tree_speculative_sampling_target_only(
            *_sglang_buffers(2, 8, steps, 20), cand, ri, nt, ns, u, uf, probs, 0.5, threshold_single=0.3
        )
    with pytest.raises(ValueError, match="lossy"):  # a relaxed threshold read in the newer position
        sglang_tree_speculative_sampling_target_only(
            *_sglang_buffers(2, 8, steps, 20), cand, ri, nt, ns, u, uf, probs, 0.5
        )


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _bad_case(mutate):
    args, _, _ = make_case(2, 8, 12, 3, seed=4)
    args = [a.clone() for a in args]
    q = torch.softmax(torch.randn(2, 8, 12), -1)
    case = {"args": args, "q": q, "steps": 3}
    mutate(case)
    return case


def _first_child(args, b=0):
    return int(args[2][b, 0])


BAD_INPUTS = [
    (lambda c: c["args"].__setitem__(4, c["args"][4].double()), "target_probs must have dtype"),
    (lambda c: c["args"].__setitem__(0, c["args"][0][:1]), "candidates must have shape"),
    (lambda c: c["args"].__setitem__(1, c["args"][1].int()), "dtypes must match"),
    (lambda c: c["args"].__setitem__(5, c["args"][5][:, :3]), "uniform_samples must have shape"),
    (lambda c: c.update(steps=0), "num_spec_steps"),
    (lambda c: c["args"][2].__setitem__((1, 0), 0), "malformed tree"),  # self loop / cycle
    (lambda c: c["args"][3].__setitem__((0, 3), 1), "malformed tree"),  # slot 1's second incoming link
    (lambda c: c["args"][3].__setitem__((0, 3), 0), "malformed tree"),  # a sibling link to the root
    (lambda c: c["args"][3].__setitem__((0, 3), 3), "malformed tree"),  # a slot its own sibling
    (lambda c: c["args"][2].__setitem__((0, 3), 2), "malformed tree"),  # a child before its parent
    (lambda c: c["args"][2].__setitem__((0, 2), 99), "malformed tree"),  # out of range
    (lambda c: c["args"][1].__setitem__((1, 2), 3), "malformed tree"),  # row of another sequence
    (lambda c: c["args"][0].__setitem__((0, 1), 12), "outside \\[0, vocab_size\\)"),
    (lambda c: c["args"][5].__setitem__((0, 0), 1.0), "uniform sample"),
    (lambda c: c["args"][6].__setitem__(1, float("nan")), "uniform sample"),
    (
        lambda c: c["args"][4].__setitem__(
            (0, 0, int(c["args"][0][0, _first_child(c["args"])])), float("nan")
        ),
        "probability read by the walk",
    ),
    (lambda c: c["args"].__setitem__(4, c["args"][4] * 2), "probability|sum to 1"),
    (lambda c: c["args"][4].__setitem__((slice(None), slice(None), 0), -0.01), "negative|probability"),
]


@pytest.mark.parametrize("mutate,match", BAD_INPUTS)
def test_bad_input_raises(mutate, match):
    case = _bad_case(mutate)
    for backend in ["torch", *_backends()]:
        with pytest.raises((ValueError, TypeError), match=match):
            run_with_backend(backend, tree_speculative_sampling, *case["args"], num_spec_steps=case["steps"])


def test_duplicate_siblings_and_two_parents_raise():
    args, _, _ = make_case(1, 6, 12, 1, seed=5)  # depth 1: all slots are children of the root
    dup = [a.clone() for a in args]
    dup[0][0, 2] = dup[0][0, 1]
    dup[5][0, 0] = 0.999  # reject the first child so the duplicate is tried
    two_parents = [a.clone() for a in args]
    two_parents[2][0, 1] = 2  # slot 2 is also the root's second child
    for backend in ["torch", *_backends()]:
        with pytest.raises(ValueError, match="same token"):
            run_with_backend(backend, tree_speculative_sampling, *dup, num_spec_steps=2)
        with pytest.raises(ValueError, match="malformed tree"):
            run_with_backend(backend, tree_speculative_sampling, *two_parents, num_spec_steps=2)


def test_a_child_before_its_parent_through_a_backward_sibling_link_is_refused():
    """Slot 2's children are 3 then 1 (slot 3's sibling links back to slot 1): slot 1 comes before its
    parent. A walk that accepts it would return a path that goes back a slot (compact_kv_cache moves
    rows in place, assuming increasing slots), so every backend refuses the tree when it gets there."""
    candidates = torch.tensor([[0, 5, 6, 7]])
    ri = torch.arange(4)[None]
    nt, ns = torch.tensor([[2, -1, 3, -1]]), torch.tensor([[-1, -1, -1, 1]])
    probs = torch.zeros(1, 4, 10)
    probs[0, 0, 6] = 1.0  # the root accepts slot 2 (token 6)
    probs[0, 2, 5] = 1.0  # slot 2 rejects slot 3 (token 7) and accepts slot 1 (token 5)
    probs[0, [1, 3], 0] = 1.0
    u, uf = torch.full((1, 4), 0.5), torch.tensor([0.5])
    for backend in ["torch", *_backends()]:
        with pytest.raises(ValueError, match="every child must come after its parent"):
            run_with_backend(
                backend, tree_speculative_sampling, candidates, ri, nt, ns, probs, u, uf, num_spec_steps=3
            )
    probs[0, 2] = 0.0
    probs[0, 2, 7] = 1.0  # accepting slot 3 instead is a forward path: fine
    for backend in ["torch", *_backends()]:
        _, accept_index, num = run_with_backend(
            backend, tree_speculative_sampling, candidates, ri, nt, ns, probs, u, uf, num_spec_steps=3
        )
        assert accept_index.tolist() == [[0, 2, 3]] and num.tolist() == [2], backend


def test_draft_probs_bad_input_raises():
    args, _, _ = make_case(2, 7, 15, 2, seed=6, draft=True)
    steps = 3
    zero_q = [a.clone() for a in args]
    child = int(zero_q[2][0, 0])
    zero_q[5][0, 0, int(zero_q[0][0, child])] = 0.0  # the child's token cannot have been sampled
    bad_rows = [a.clone() for a in args]
    bad_rows[5] = bad_rows[5] * 3
    bad_rows[6][:] = 0.9999  # force rejections so the residual rows are scanned
    for backend in ["torch", *_backends()]:
        with pytest.raises(ValueError, match="zero draft probability"):
            run_with_backend(backend, tree_speculative_sampling_draft_probs, *zero_q, num_spec_steps=steps)
        with pytest.raises(ValueError, match="probability"):
            run_with_backend(backend, tree_speculative_sampling_draft_probs, *bad_rows, num_spec_steps=steps)
    with pytest.raises(ValueError, match="draft_probs must have shape"):
        tree_speculative_sampling_draft_probs(*args[:5], args[5][:, :3], *args[6:], num_spec_steps=steps)


def test_debug_mode_scans_every_row(monkeypatch):
    args, steps, _ = make_case(2, 8, 12, 3, seed=4)
    args[4][1, 7] = float("nan")  # slot 7 of sequence 1 is not necessarily on the walked path
    monkeypatch.setenv("EAGLE_KERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match=r"target_probs\[1, 7\]"):
        tree_speculative_sampling(*args, num_spec_steps=steps)


def test_opcheck_and_compile():
    args, steps, _ = make_case(3, 8, 16, 3, seed=8)
    op = torch.ops.eagle.tree_speculative_sampling.default
    torch.library.opcheck(op, (*args[:5], None, *args[5:], steps, False, 1.0, 1.0))
    argsq, stepsq, _ = make_case(3, 8, 16, 3, seed=9, draft=True)
    torch.library.opcheck(op, (*argsq, stepsq, False, 1.0, 1.0))

    def step(*a):
        predicts, accept_index, num = tree_speculative_sampling(*a, num_spec_steps=steps)
        return predicts + 1, accept_index, num * 2

    want = step(*args)
    got = torch.compile(step, fullgraph=False)(*args)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.extension
def test_default_cpu_backend_is_cpp():
    assert eagle_kernels.select_backend(OP, CPU) == "cpp"


# --------------------------------------------------------------------------------------------------
# Statistical losslessness: exact enumeration on a tiny vocabulary
# --------------------------------------------------------------------------------------------------
V_STAT = 5
# Tree shape as top-k rank paths (EAGLE-1 static-tree style): 3 children at the root, depth 3.
SHAPE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0]]
N_SLOTS = len(SHAPE) + 1
STEPS = 4
PARENT_SLOT = [-1] + [0 if len(p) == 1 else SHAPE.index(p[:-1]) + 1 for p in SHAPE]
SLOT_DEPTH = [0] + [len(p) for p in SHAPE]
STAT_TREE = trees_from_parents([PARENT_SLOT])


def stat_trees(N: int):
    """N copies of the statistical tests' tree shape: (retrive_index, next_token, next_sibling)."""
    retrive_index = torch.arange(N * N_SLOTS).view(N, N_SLOTS)
    return (
        retrive_index,
        STAT_TREE.retrive_next_token.expand(N, -1),
        STAT_TREE.retrive_next_sibling.expand(N, -1),
    )


class PrefixModel:
    """Next-token distributions of a target and a draft 'model' for every prefix of length <= 4.

    ``table[L][code]`` is the distribution after the prefix of length L whose base-V code is
    ``code``. The draft is correlated with the target (so drafts get accepted) but differs; some
    target rows have exact zeros.
    """

    def __init__(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.target, self.draft = [], []
        for length in range(5):
            rows = V_STAT**length
            t = torch.softmax(torch.randn(rows, V_STAT, generator=gen, dtype=torch.float64) * 1.3, -1)
            zero = torch.rand(rows, generator=gen) < 0.25
            t[zero, torch.randint(0, V_STAT, (int(zero.sum()),), generator=gen)] = 0.0
            t = t / t.sum(-1, keepdim=True)
            noise = torch.softmax(torch.randn(rows, V_STAT, generator=gen, dtype=torch.float64) * 1.3, -1)
            self.target.append(t.float())
            self.draft.append((0.55 * t + 0.45 * noise).float())
        self.draft_order = [torch.sort(q, dim=-1, descending=True, stable=True).indices for q in self.draft]

    def joint_first_two(self) -> torch.Tensor:
        """Exact P(first token, second token) from the empty prefix: [V, V] float64."""
        return self.target[0][0].double()[:, None] * self.target[1].double()

    def batch(self, context: torch.Tensor, sampled: bool, gen: torch.Generator):
        """Trees for contexts [N] (-1: empty prefix) or [N, 1]: candidates, target and draft rows."""
        N = context.shape[0]
        length0 = 0 if context.dim() == 1 else context.shape[1]
        codes = [context[:, 0] if length0 else torch.zeros(N, dtype=torch.int64)]
        tokens = [torch.zeros(N, dtype=torch.int64)]
        for slot in range(1, N_SLOTS):
            parent, length = PARENT_SLOT[slot], length0 + SLOT_DEPTH[slot]
            if sampled:
                tok = torch.multinomial(self.draft[length - 1][codes[parent]], 1, generator=gen)[:, 0]
            else:  # top-k drafts: rank SHAPE[slot-1][-1] of the parent's draft row
                tok = self.draft_order[length - 1][codes[parent], SHAPE[slot - 1][-1]]
            tokens.append(tok)
            codes.append(codes[parent] * V_STAT + tok)
        lengths = [length0 + d for d in SLOT_DEPTH]
        p = torch.stack([self.target[length][code] for length, code in zip(lengths, codes)], 1)
        q = torch.stack([self.draft[length][code] for length, code in zip(lengths, codes)], 1)
        return torch.stack(tokens, 1), p, q


def emitted(out) -> list[torch.Tensor]:
    predicts, accept_index, num = out
    rows = accept_index.clamp(min=0).long()
    tokens = predicts.long()[rows]
    pos = torch.arange(accept_index.shape[1])
    return torch.where(pos <= num[:, None].long(), tokens, -1)


def first_two_tokens(model: PrefixModel, sampler, sampled: bool, N: int, seed: int):
    """Run one speculative round from the empty prefix; rounds that emitted a single token get a
    second round from that token. Returns the first two emitted tokens [N, 2]."""
    gen = torch.Generator().manual_seed(seed)

    def one_round(context):
        cand, p, q = model.batch(context, sampled, gen)
        n = context.shape[0]
        u = torch.rand(n, N_SLOTS, generator=gen)
        uf = torch.rand(n, generator=gen)
        return emitted(sampler((cand, *stat_trees(n), p, q, u, uf)))

    first = one_round(torch.zeros(N, dtype=torch.int64))
    out = first[:, :2].clone()
    need = out[:, 1] < 0
    if bool(need.any()):
        out[need, 1] = one_round(out[need, :1])[:, 0]
    return out


def chi_square_pvalue(tokens: torch.Tensor, joint: torch.Tensor) -> float:
    counts = torch.zeros(V_STAT * V_STAT, dtype=torch.float64)
    counts.index_add_(
        0, tokens[:, 0] * V_STAT + tokens[:, 1], torch.ones(tokens.shape[0], dtype=torch.float64)
    )
    expected = joint.reshape(-1) / joint.sum() * tokens.shape[0]
    impossible = expected == 0
    assert bool((counts[impossible] == 0).all()), "a zero-probability token pair was emitted"
    return float(chisquare(counts[~impossible], expected[~impossible]).pvalue)


def topk_sampler(backend):
    def run(args):
        cand, ri, nt, ns, p, _, u, uf = args
        return run_with_backend(
            backend, tree_speculative_sampling, cand, ri, nt, ns, p, u, uf, num_spec_steps=STEPS
        )

    return run


def sampled_sampler(backend):
    def run(args):
        return run_with_backend(backend, tree_speculative_sampling_draft_probs, *args, num_spec_steps=STEPS)

    return run


def forgets_rejected_mass(sampler):
    """A wrong sampler: after rejecting every child it draws the bonus from the node's full target
    distribution (rejected tokens and their mass still in)."""

    def run(args):
        predicts, accept_index, num = sampler(args)
        _, _, nt, _, p, _, _, uf = args
        N = num.shape[0]
        last_row = accept_index.gather(1, num[:, None].long())[:, 0].long()
        last = last_row - torch.arange(N) * N_SLOTS
        rejected_all = (nt.gather(1, last[:, None])[:, 0] != -1) & (num < STEPS - 1)
        rows = p[torch.arange(N), last].double()
        redraw = (
            (rows.cumsum(-1) <= uf.double()[:, None] * rows.sum(-1, keepdim=True))
            .sum(-1)
            .clamp(max=V_STAT - 1)
        )
        predicts = predicts.clone()
        predicts[last_row[rejected_all]] = redraw[rejected_all].to(torch.int32)
        return predicts, accept_index, num

    return run


N_STAT = 20000


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("sampled", [False, True], ids=["topk_drafts", "sampled_drafts"])
def test_emitted_tokens_follow_target_distribution(backend, sampled):
    if backend not in ["torch", *backends_for(OP, CPU)]:
        pytest.skip(f"backend {backend} unavailable")
    model = PrefixModel(seed=1)
    sampler = sampled_sampler(backend) if sampled else topk_sampler(backend)
    tokens = first_two_tokens(model, sampler, sampled, N_STAT, seed=2)
    pvalue = chi_square_pvalue(tokens, model.joint_first_two())
    assert pvalue > 1e-3, f"emitted tokens do not follow the target (chi-square p = {pvalue:.2e})"


@pytest.mark.parametrize("sampled", [False, True], ids=["topk_drafts", "sampled_drafts"])
def test_statistical_test_detects_a_wrong_sampler(sampled):
    """Negative control: the same test must reject a sampler that keeps the rejected mass."""
    model = PrefixModel(seed=1)
    sampler = forgets_rejected_mass(sampled_sampler("torch") if sampled else topk_sampler("torch"))
    tokens = first_two_tokens(model, sampler, sampled, N_STAT, seed=2)
    pvalue = chi_square_pvalue(tokens, model.joint_first_two())
    assert pvalue < 1e-6, f"the chi-square test failed to detect a biased sampler (p = {pvalue:.2e})"


# --------------------------------------------------------------------------------------------------
# Host fast path: cached argument checks, direct eager calls (issue 4)
# --------------------------------------------------------------------------------------------------
def test_bad_input_raises_after_the_same_signature_passed():
    """Cached checks key on shapes, dtypes, devices and strides; values are never cached."""
    case = _bad_case(lambda c: None)
    args, steps = case["args"], case["steps"]
    tree_speculative_sampling(*args, num_spec_steps=steps)
    tree_speculative_sampling(*args, num_spec_steps=steps)  # served by the signature cache
    probs = args[4]
    strided = torch.empty(tuple(reversed(probs.shape))).permute(2, 1, 0)
    strided.copy_(probs)  # same shape and values, vocabulary not contiguous
    for _ in range(2):
        with pytest.raises(ValueError, match="vocabulary dimension must be contiguous"):
            tree_speculative_sampling(*args[:4], strided, *args[5:], num_spec_steps=steps)
        with pytest.raises(ValueError, match="num_spec_steps"):
            tree_speculative_sampling(*args, num_spec_steps=0)
    bad = _bad_case(lambda c: c["args"][2].__setitem__((1, 0), 0))["args"]
    with pytest.raises(ValueError, match="malformed tree"):
        tree_speculative_sampling(*bad, num_spec_steps=steps)


def test_eager_fast_path_matches_registered_op():
    case = _bad_case(lambda c: None)
    args, steps = case["args"], case["steps"]
    fast = tree_speculative_sampling(*args, num_spec_steps=steps)
    registered = torch.ops.eagle.tree_speculative_sampling(*args[:5], None, *args[5:], steps, False, 1.0, 1.0)
    for got, want in zip(fast, registered[:3]):
        assert torch.equal(got, want)


def test_forced_backend_still_applies_after_cached_calls(monkeypatch):
    tss = importlib.import_module("eagle_kernels.tree_speculative_sampling")
    case = _bad_case(lambda c: None)
    args, steps = case["args"], case["steps"]
    want = tree_speculative_sampling(*args, num_spec_steps=steps)
    calls = []
    real = tss._tree_sampling_torch
    monkeypatch.setattr(tss, "_tree_sampling_torch", lambda *a: calls.append(1) or real(*a))
    with eagle_kernels.use_backend("torch"):
        got = tree_speculative_sampling(*args, num_spec_steps=steps)
    monkeypatch.setenv("EAGLE_KERNELS_BACKEND", "torch")
    got_env = tree_speculative_sampling(*args, num_spec_steps=steps)
    assert calls == [1, 1]
    for a, b, c in zip(got, got_env, want):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_fake_tensors_get_shapes_without_the_status_check():
    """Under FakeTensorMode the CPU status check (a host read) has no values: it is skipped and the
    outputs have their shapes (session 34 left it failing with DataDependentOutputException)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for draft in (False, True):
        args, steps, _ = make_case(2, 6, 11, 3, seed=5, draft=draft)
        op = tree_speculative_sampling_draft_probs if draft else tree_speculative_sampling
        want = [t.shape for t in op(*args, num_spec_steps=steps)]
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(a) for a in args]
            predicts, accept_index, num = op(*fake, num_spec_steps=steps)
            assert [predicts.shape, accept_index.shape, num.shape] == want
