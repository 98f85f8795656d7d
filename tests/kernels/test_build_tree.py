"""build_tree / build_static_tree / sglang_build_tree_kernel_efficient.

The oracle simulates the EAGLE-2 draft expansion with random scores (DESIGN §5), records every
candidate's true parent and level, and derives the expected tree element by element; the op must
rebuild exactly that tree from (parent_list, selected_index) alone.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import eagle_kernels
from eagle_kernels.build_tree import (
    MC_SIM_7B_63,
    build_static_tree,
    build_tree,
    build_tree_ref,
    sglang_build_tree_kernel_efficient,
)
from tests.kernels.helpers import backends_for, run_with_backend
from tests.kernels.random_trees import trees_from_parents

# The op module itself: the package attribute ``eagle_kernels.build_tree`` is the function.
bt = importlib.import_module("eagle_kernels.build_tree")
OP = "build_tree"
MODES = ("full", "qlen_bool", "qlen_bits_u8", "qlen_bits_i32")


# --------------------------------------------------------------------------------------------------
# Oracle: the EAGLE-2 draft loop with random scores
# --------------------------------------------------------------------------------------------------
@dataclass
class Draft:
    parent_list: torch.Tensor  # [B, topk*(depth-1)+1] int64
    selected_index: torch.Tensor  # [B, n-1] int64
    scores: torch.Tensor  # [B, num_candidates] float64
    parent_of: list[dict[int, int]]  # candidate -> parent candidate (-1: the root)
    level_of: list[dict[int, int]]


def _child_logprobs(topk: int, gen: torch.Generator) -> list[float]:
    """Top-k log-probabilities of a random draft distribution, best first (all < 0)."""
    logits = torch.randn(topk + 3, generator=gen, dtype=torch.float64) * 2
    return torch.log_softmax(logits, 0).topk(topk).values.tolist()


def simulate_eagle2(B: int, n: int, topk: int, depth: int, gen: torch.Generator) -> Draft:
    """Per level: top-k children of each frontier node, the best k of the k*k as the next frontier,
    every child a candidate; finally the global top n-1 by cumulative score, in level order."""
    size = topk + (depth - 1) * topk * topk
    parent_lists, scores_all, parent_of, level_of = [], [], [], []
    for _ in range(B):
        scores = [0.0] * size
        parent, level = {}, {}
        for c, lp in enumerate(_child_logprobs(topk, gen)):
            scores[c], parent[c], level[c] = lp, -1, 1
        frontier = list(range(topk))
        parents = [-1] + (frontier if depth > 1 else [])
        for step in range(1, depth):
            base = topk + (step - 1) * topk * topk
            for j, node in enumerate(frontier):
                for c, lp in enumerate(_child_logprobs(topk, gen)):
                    g = base + j * topk + c
                    scores[g], parent[g], level[g] = scores[node] + lp, node, step + 1
            level_scores = torch.tensor(scores[base : base + topk * topk])
            frontier = (level_scores.topk(topk).indices + base).tolist()
            if step < depth - 1:
                parents += frontier
        parent_lists.append(parents)
        scores_all.append(scores)
        parent_of.append(parent)
        level_of.append(level)
    scores_t = torch.tensor(scores_all, dtype=torch.float64)
    selected = scores_t.topk(n - 1, dim=1).indices.sort(dim=1).values
    return Draft(torch.tensor(parent_lists), selected, scores_t, parent_of, level_of)


@dataclass
class Expected:
    parent: list[list[int]]
    depth: list[list[int]]
    rows: list[list[int]]  # per flat row b*n+i: bitmask (python int) of visible slots


def expected_tree(draft: Draft, n: int) -> Expected:
    parents, depths, rows = [], [], []
    for b, sel in enumerate(draft.selected_index.tolist()):
        slot_of = {-1: 0} | {v: k + 1 for k, v in enumerate(sel)}
        parent = [-1] + [slot_of[draft.parent_of[b][v]] for v in sel]
        depth = [0] + [draft.level_of[b][v] for v in sel]
        bits = [1]
        for i in range(1, n):
            assert parent[i] < i and depth[i] == depth[parent[i]] + 1  # the simulation's own invariant
            bits.append(bits[parent[i]] | (1 << i))
        parents.append(parent)
        depths.append(depth)
        rows += bits
    return Expected(parents, depths, rows)


def encode_mask(rows: list[int], n: int, seq_lens: list[int], mode: str) -> torch.Tensor:
    B = len(seq_lens)
    if mode == "qlen_bool":
        return torch.tensor([[(r >> j) & 1 for j in range(n)] for r in rows], dtype=torch.bool).view(B, n, n)
    if mode == "full":
        flat = []
        for b, L in enumerate(seq_lens):
            for r in rows[b * n : (b + 1) * n]:
                flat += [1] * L + [(r >> j) & 1 for j in range(n)]
        return torch.tensor(flat, dtype=torch.bool)
    if mode == "qlen_bits_u8":
        nbytes = 1 if n <= 8 else (2 if n <= 16 else 4)
        return torch.tensor([list(r.to_bytes(nbytes, "little")) for r in rows], dtype=torch.uint8).view(
            B, n, nbytes
        )
    words = math.ceil(n / 32)
    signed = [
        [((r >> (32 * w)) & 0xFFFFFFFF) - ((r >> (32 * w + 31)) & 1) * 2**32 for w in range(words)]
        for r in rows
    ]
    return torch.tensor(signed, dtype=torch.int32).view(B, n, words)


def expected_outputs(exp: Expected, n: int, seq_lens: list[int], mode: str, index_dtype) -> tuple:
    B = len(seq_lens)
    next_token = [[-1] * n for _ in range(B)]
    next_sibling = [[-1] * n for _ in range(B)]
    for b in range(B):
        last: dict[int, int] = {}
        for i in range(1, n):  # children appended in ascending slot order
            p = exp.parent[b][i]
            if p in last:
                next_sibling[b][last[p]] = i
            else:
                next_token[b][p] = i
            last[p] = i
    positions = [seq_lens[b] + d for b in range(B) for d in exp.depth[b]]
    return (
        encode_mask(exp.rows, n, seq_lens, mode),
        torch.tensor(positions, dtype=torch.int64),
        torch.arange(B * n, dtype=index_dtype).view(B, n),
        torch.tensor(next_token, dtype=index_dtype),
        torch.tensor(next_sibling, dtype=index_dtype),
    )


def assert_outputs_equal(got, want, context=""):
    names = ("tree_mask", "positions", "retrive_index", "retrive_next_token", "retrive_next_sibling")
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype, f"{name} dtype {g.dtype} != {w.dtype} {context}"
        assert torch.equal(g.cpu(), w.cpu()), f"{name} differs {context}:\n{g}\n{w}"


def random_case(gen: torch.Generator, *, max_topk: int, max_depth: int, max_n: int):
    topk = int(torch.randint(1, max_topk + 1, (1,), generator=gen))
    depth = int(torch.randint(1, max_depth + 1, (1,), generator=gen))
    size = topk + (depth - 1) * topk * topk
    n = int(torch.randint(1, min(size, max_n - 1) + 2, (1,), generator=gen))
    B = int(torch.randint(1, 5, (1,), generator=gen))
    seq_lens = torch.randint(0, 12, (B,), generator=gen)
    return simulate_eagle2(B, n, topk, depth, gen), seq_lens, topk, depth, n


# --------------------------------------------------------------------------------------------------
# Reference against the oracle
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_eagle2_oracle(mode):
    gen = torch.Generator().manual_seed(11)
    configs = [
        (1, 2, 1, 1),
        (2, 4, 3, 1),
        (3, 8, 2, 3),
        (2, 11, 3, 4),
        (1, 6, 1, 5),
        (4, 30, 4, 5),
        (2, 45, 6, 6),
    ]
    for B, n, topk, depth in configs:
        if mode == "qlen_bits_u8" and n > 32:
            continue
        for index_dtype in (torch.int32, torch.int64):
            draft = simulate_eagle2(B, n, topk, depth, gen)
            seq_lens = torch.randint(0, 9, (B,), generator=gen)
            want = expected_outputs(expected_tree(draft, n), n, seq_lens.tolist(), mode, index_dtype)
            got = build_tree_ref(
                draft.parent_list.to(index_dtype),
                draft.selected_index.to(index_dtype),
                seq_lens.to(index_dtype),
                topk=topk,
                depth=depth,
                num_draft_tokens=n,
                mask_mode=mode,
            )
            assert_outputs_equal(got, want, f"B={B} n={n} topk={topk} depth={depth}")


def test_hand_worked_example():
    """topk=2, depth=3: candidates 0,1 (level 1); rows 1,2 hold the children of 0,1 (flat 2..5);
    the step-2 frontier is {3, 4}, whose children fill rows 3,4 (flat 6..9)."""
    parent_list = torch.tensor([[-1, 0, 1, 3, 4]])
    selected = torch.tensor([[0, 1, 3, 4, 6, 9]])  # slots 1..6
    mask, pos, idx, nxt, sib = build_tree_ref(
        parent_list, selected, torch.tensor([10]), topk=2, depth=3, num_draft_tokens=7
    )
    # 0, 1 -> root; 3 (row 1) -> parent_list[1]=0 -> slot 1; 4 (row 2) -> 1 -> slot 2;
    # 6 (row 3) -> 3 -> slot 3; 9 (row 4) -> 4 -> slot 4. Parents: [-1, 0, 0, 1, 2, 3, 4].
    assert pos.tolist() == [10, 11, 11, 12, 12, 13, 13]
    assert nxt.tolist() == [[1, 3, 4, 5, 6, -1, -1]]
    assert sib.tolist() == [[-1, 2, -1, -1, -1, -1, -1]]
    assert idx.tolist() == [list(range(7))]
    rows = [[j for j in range(7) if mask[0, i, j]] for i in range(7)]
    assert rows == [[0], [0, 1], [0, 2], [0, 1, 3], [0, 2, 4], [0, 1, 3, 5], [0, 2, 4, 6]]


def test_depth_one_accepts_sglangs_empty_parent_list():
    gen = torch.Generator().manual_seed(3)
    draft = simulate_eagle2(2, 4, 5, 1, gen)
    seq = torch.tensor([3, 4])
    want = build_tree_ref(draft.parent_list, draft.selected_index, seq, topk=5, depth=1, num_draft_tokens=4)
    # SGLang's torch.empty(bs, 0) is float32 in many versions: nothing in it is read
    for empty in (draft.parent_list[:, :0], torch.empty(2, 0)):
        for backend in ["torch"] + backends_for(OP, torch.device("cpu")):
            got = run_with_backend(
                backend, build_tree, empty, draft.selected_index, seq, topk=5, depth=1, num_draft_tokens=4
            )
            assert_outputs_equal(got, want, backend)
            # ... and through the SGLang drop-in, which SGLang calls with it at speculative_num_steps=1
            mask = torch.empty(2 * 4 * 4, dtype=torch.bool)
            positions = torch.empty(2 * 4, dtype=torch.int64)
            retrive = torch.full((3, 2, 4), -1, dtype=torch.int64)
            args = (empty, draft.selected_index, seq, mask, positions, *retrive, 5, 1, 4, 1)
            run_with_backend(backend, sglang_build_tree_kernel_efficient, *args)
            assert_outputs_equal((mask.view(2, 4, 4), *retrive), (want[0], *want[2:]), backend)


# --------------------------------------------------------------------------------------------------
# Every backend against the reference
# --------------------------------------------------------------------------------------------------
def _fuzz_backend(
    backend: str, device: torch.device, num_trees: int, seed: int, limits: dict, all_modes: bool
):
    gen = torch.Generator().manual_seed(seed)
    trees = case = 0
    dtypes = (torch.int32, torch.int64)
    while trees < num_trees:
        draft, seq_lens, topk, depth, n = random_case(gen, **limits)
        sel_dtype, par_dtype, seq_dtype = (dtypes[int(x)] for x in torch.randint(0, 2, (3,), generator=gen))
        args = (
            draft.parent_list.to(device, par_dtype),
            draft.selected_index.to(device, sel_dtype),
            seq_lens.to(device, seq_dtype),
        )
        modes = [m for m in MODES if not (m == "qlen_bits_u8" and n > 32)]
        if not all_modes:
            modes = [modes[case % len(modes)]]
        for mode in modes:
            kw = dict(topk=topk, depth=depth, num_draft_tokens=n, mask_mode=mode)
            want = build_tree_ref(*(a.cpu() for a in args), **kw)
            got = run_with_backend(backend, build_tree, *args, **kw)
            assert_outputs_equal(got, want, f"{backend} case={case} mode={mode} {kw} B={seq_lens.numel()}")
        trees += seq_lens.numel()
        case += 1
    return trees


def test_backends_match_reference_fuzzed(device):
    backends = backends_for(OP, device)
    assert backends, "no accelerated backend reachable; the extension or triton is missing"
    for backend in backends:
        interpreted = backend == "triton" and device.type == "cpu"
        limits = (
            dict(max_topk=4, max_depth=4, max_n=24)
            if interpreted
            else dict(max_topk=8, max_depth=7, max_n=80)
        )
        trees = _fuzz_backend(backend, device, 400, seed=5, limits=limits, all_modes=not interpreted)
        assert trees >= 400


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_backends_large_trees(backend):
    """Paper-sized trees (60 tokens, depth 6, k = 10) and the largest supported n."""
    if backend not in backends_for(OP, torch.device("cpu")):
        pytest.skip(f"backend {backend} unavailable on CPU")
    gen = torch.Generator().manual_seed(2)
    cases = [(2, 60, 10, 6, "qlen_bool"), (1, 60, 10, 6, "qlen_bits_i32"), (1, 33, 4, 5, "full")]
    if backend == "cpp":
        cases.append((1, 1024, 12, 9, "qlen_bits_i32"))
    else:  # n > 64: binary-search parent lookup and several row tiles
        cases += [(1, 100, 6, 5, "full"), (1, 70, 5, 4, "qlen_bits_i32")]
    for B, n, topk, depth, mode in cases:
        draft = simulate_eagle2(B, n, topk, depth, gen)
        seq = torch.randint(0, 50, (B,), generator=gen)
        kw = dict(topk=topk, depth=depth, num_draft_tokens=n, mask_mode=mode)
        want = build_tree_ref(draft.parent_list, draft.selected_index, seq, **kw)
        got = run_with_backend(backend, build_tree, draft.parent_list, draft.selected_index, seq, **kw)
        assert_outputs_equal(got, want, f"{backend} {kw}")


def test_preallocated_out_and_full_prefix_untouched(device):
    gen = torch.Generator().manual_seed(4)
    draft = simulate_eagle2(3, 9, 3, 4, gen)
    seq = torch.tensor([2, 0, 5])
    n = 9
    kw = dict(topk=3, depth=4, num_draft_tokens=n, mask_mode="full")
    want = build_tree_ref(draft.parent_list, draft.selected_index, seq, **kw)
    tree_cols = bt._full_mask_tree_index(seq, n).view(-1)
    prefix = torch.ones(want[0].numel(), dtype=torch.bool)
    prefix[tree_cols] = False
    for backend in ["torch"] + backends_for(OP, device):
        out = bt._allocate_outputs(draft.selected_index.to(device), seq.to(device), n, bt.FULL)
        out[0].copy_(torch.arange(out[0].numel()) % 3 == 0)  # a pattern the op must leave alone
        pattern = out[0].clone()
        for t in out[1:]:
            t.fill_(77)
        got = run_with_backend(
            backend, build_tree, draft.parent_list.to(device), draft.selected_index.to(device), seq.to(device),
            out=out, **kw
        )  # fmt: skip
        assert all(g is o for g, o in zip(got, out))
        assert torch.equal(got[0].cpu()[prefix], pattern.cpu()[prefix]), backend
        assert torch.equal(got[0].cpu()[tree_cols], want[0][tree_cols]), backend
        assert_outputs_equal(got[1:], want[1:], backend)


# --------------------------------------------------------------------------------------------------
# SGLang drop-in
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tree_mask_mode,n,packed_dtype",
    [
        (0, 12, None),
        (1, 12, None),
        (2, 7, torch.uint8),
        (2, 12, torch.int16),
        (2, 30, torch.int32),
        (2, 30, torch.uint8),
    ],
)
def test_sglang_drop_in_matches_build_tree(tree_mask_mode, n, packed_dtype):
    """SGLang's buffers and calls; on the accelerated backends with the sizes as numpy integers (a
    config's values), which the drop-in refused as "must be an int" while sgl-kernel's op takes them."""
    gen = torch.Generator().manual_seed(n + tree_mask_mode)
    B, topk, depth = 3, 4, 4
    draft = simulate_eagle2(B, n, topk, depth, gen)
    seq = torch.tensor([4, 1, 6])
    mode = {0: "full", 1: "qlen_bool", 2: "qlen_bits_u8"}[tree_mask_mode]
    want = build_tree_ref(
        draft.parent_list,
        draft.selected_index,
        seq,
        topk=topk,
        depth=depth,
        num_draft_tokens=n,
        mask_mode=mode,
    )
    for backend in ["torch"] + backends_for(OP, torch.device("cpu")):
        # SGLang's buffers: flat masks, flat positions, retrive_* pre-filled with -1 (we overwrite all).
        if tree_mask_mode == 0:
            tree_mask = torch.ones(int(seq.sum()) * n + B * n * n, dtype=torch.bool)
        elif tree_mask_mode == 1:
            tree_mask = torch.ones(B * n * n, dtype=torch.bool)
        else:
            nbytes = 1 if n <= 8 else (2 if n <= 16 else 4)
            count = B * n * (nbytes if packed_dtype == torch.uint8 else 1)
            tree_mask = torch.zeros(count, dtype=packed_dtype)
        positions = torch.empty(B * n, dtype=torch.int64)
        retrive = torch.full((3, B, n), -1, dtype=torch.int64)
        sizes = (topk, depth, n) if backend == "torch" else (np.int64(topk), np.int32(depth), np.int64(n))
        args = (draft.parent_list, draft.selected_index, seq, tree_mask, positions, *retrive, *sizes)
        if tree_mask_mode == 0:  # the older 11-argument form means FULL_MASK
            assert run_with_backend(backend, sglang_build_tree_kernel_efficient, *args) is None
        else:
            run_with_backend(backend, sglang_build_tree_kernel_efficient, *args, tree_mask_mode)
        got_mask = (
            tree_mask.view(torch.uint8).view(B, n, -1)
            if tree_mask_mode == 2
            else tree_mask.view(want[0].shape)
        )
        assert_outputs_equal((got_mask, positions, *retrive), want, backend)


def test_sglang_drop_in_rejects_bad_mode_and_mask():
    draft = simulate_eagle2(1, 5, 2, 3, torch.Generator().manual_seed(0))
    seq = torch.tensor([3])
    outs = (torch.empty(5), torch.empty(5, dtype=torch.int64), *torch.empty(3, 1, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="tree_mask_mode"):
        sglang_build_tree_kernel_efficient(draft.parent_list, draft.selected_index, seq, *outs, 2, 3, 5, 7)
    with pytest.raises(ValueError, match="QLEN_ONLY_BITPACKING"):
        wrong = (torch.zeros(5, dtype=torch.int32), *outs[1:])
        sglang_build_tree_kernel_efficient(draft.parent_list, draft.selected_index, seq, *wrong, 2, 3, 5, 2)


# --------------------------------------------------------------------------------------------------
# Malformed input
# --------------------------------------------------------------------------------------------------
def _valid_case():
    """A depth-3, topk-2 tree in which slot 4 (candidate 6) hangs below slot 3 (candidate 3)."""
    return dict(
        parent_list=torch.tensor([[-1, 0, 1, 3, 4], [-1, 0, 1, 2, 5]]),
        selected_index=torch.tensor([[0, 1, 3, 6], [0, 1, 2, 4]]),
        seq_lens=torch.tensor([5, 2]),
    )


def _nan_scores_case():
    """Real NaN draft scores: topk ranks NaN highest, so NaN grandchildren get selected while their
    parent (a weak step-2 frontier node) is not."""
    gen = torch.Generator().manual_seed(0)
    topk, depth, n = 3, 3, 5
    draft = simulate_eagle2(1, n, topk, depth, gen)
    scores = draft.scores.clone()
    row_base = 1 + topk  # rows of the step-2 children
    weakest = min(range(topk), key=lambda j: scores[0, draft.parent_list[0, row_base + j]])
    first_child = (row_base + weakest) * topk
    scores[0, first_child : first_child + topk] = float("nan")
    selected = scores.topk(n - 1, dim=1).indices.sort(dim=1).values
    assert int(draft.parent_list[0, row_base + weakest]) not in selected[0].tolist()
    return (
        dict(parent_list=draft.parent_list, selected_index=selected, seq_lens=torch.tensor([7])),
        topk,
        depth,
        n,
    )


def _mutated(kind):
    case, topk, depth, n = _valid_case(), 2, 3, 5
    if kind == "nan":
        case, topk, depth, n = _nan_scores_case()
    elif kind == "not_selected":
        case["parent_list"][0, 3] = 2  # candidate 2 is not selected in sequence 0
    elif kind == "unsorted":
        case["selected_index"][1] = torch.tensor([0, 2, 1, 4])
    elif kind == "duplicate":
        case["selected_index"][1] = torch.tensor([0, 1, 1, 4])
    elif kind == "out_of_range":
        case["selected_index"][0, 3] = 10  # topk + (depth-1)*topk^2 = 10 candidates
    elif kind == "negative":
        case["selected_index"][0, 0] = -1
    elif kind == "late_parent":
        case["parent_list"][0, 3] = 6  # row 3 (candidates 6, 7) claims candidate 6 as parent: a cycle
    elif kind == "too_deep":
        # Chain 9 (row 4) -> 7 (row 3) -> 5 (row 2) -> 3 (row 1) -> root: depth 4 > 3.
        case["parent_list"][1] = torch.tensor([-1, 1, 3, 5, 7])
        case["selected_index"][1] = torch.tensor([1, 3, 5, 7])
        case["selected_index"] = torch.cat([case["selected_index"], torch.tensor([[8], [9]])], 1)
        case["selected_index"][0] = torch.tensor([0, 1, 3, 6, 7])
        n = 6
    elif kind == "negative_seq_len":
        case["seq_lens"][1] = -3
    return case, topk, depth, n


MALFORMED = {
    "nan": "is not among the selected nodes",
    "not_selected": "is not among the selected nodes",
    "unsorted": "strictly increasing",
    "duplicate": "strictly increasing",
    "out_of_range": "out of range",
    "negative": "out of range",
    "late_parent": "does not precede it",
    "too_deep": "deeper than depth=3",
    "negative_seq_len": "must be >= 0",
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_tree_raises_on_cpu(kind):
    case, topk, depth, n = _mutated(kind)
    for backend in ["torch"] + backends_for(OP, torch.device("cpu")):
        for mode in ("qlen_bool", "full"):
            with pytest.raises(ValueError, match=MALFORMED[kind]):
                run_with_backend(
                    backend, build_tree, **case, topk=topk, depth=depth, num_draft_tokens=n, mask_mode=mode
                )


def test_valid_case_is_valid():
    case = _valid_case()
    for backend in ["torch"] + backends_for(OP, torch.device("cpu")):
        out = run_with_backend(backend, build_tree, **case, topk=2, depth=3, num_draft_tokens=5)
        assert out[1].tolist() == [5, 6, 6, 7, 8, 2, 3, 3, 4, 4]


def lenient_oracle(case, topk, depth, n, mode_bits=None):
    """What the GPU kernels write for a malformed tree: slots whose ancestry is broken (or all slots
    of a sequence whose selected_index is bad) get position -1, no links, mask = root + self."""
    size = topk + (depth - 1) * topk * topk
    positions, nxt, sib, rows = [], [], [], []
    for b, sel in enumerate(case["selected_index"].tolist()):
        L = int(case["seq_lens"][b])
        seq_ok = L >= 0 and all(0 <= v < size for v in sel) and all(x < y for x, y in zip(sel, sel[1:]))
        parent = [-1] * n
        for i in range(1, n):
            row = sel[i - 1] // topk if seq_ok else 0
            u = int(case["parent_list"][b, row]) if row else -1
            if row == 0:
                parent[i] = 0
            elif u in sel and u < row * topk:
                parent[i] = sel.index(u) + 1
        depth_of, valid = [0] * n, [seq_ok] * n
        for i in range(1, n):
            at, hops = i, 0
            while seq_ok and at > 0 and parent[at] >= 0 and hops < depth:
                at, hops = parent[at], hops + 1
            valid[i] = seq_ok and at == 0
            depth_of[i] = hops
        first, next_sib, last = [-1] * n, [-1] * n, {}
        for i in range(1, n):
            if valid[i]:
                if parent[i] in last:
                    next_sib[last[parent[i]]] = i
                else:
                    first[parent[i]] = i
                last[parent[i]] = i
        for i in range(n):
            bits, at = 1 | (1 << i), i
            while valid[i] and at > 0:
                at = parent[at]
                bits |= 1 << at
            rows.append(bits)
        positions += [L + depth_of[i] if valid[i] else -1 for i in range(n)]
        nxt.append(first)
        sib.append(next_sib)
    return rows, torch.tensor(positions), torch.tensor(nxt), torch.tensor(sib)


def _unchecked_kernel(backend, parent_list, selected_index, seq_lens, outputs, topk, depth, n, mode):
    """The Triton or CUDA kernel itself, without the op body's value checks (which run on CPU
    tensors, and on CUDA only in debug mode): what a CUDA call without debug checks reaches."""
    if backend == "triton":
        bt._build_tree_triton(parent_list, selected_index, seq_lens, outputs, topk, depth, n, mode)
    else:
        eagle_kernels._ext.op(OP)(parent_list, selected_index, seq_lens, *outputs, topk, depth, n, mode)


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_device_kernels_flag_malformed_trees(device, kind):
    """Without host checks, the Triton and CUDA kernels terminate, stay in bounds and flag the
    broken slots with positions == -1 (the kernels are called without the op body's checks)."""
    case, topk, depth, n = _mutated(kind)
    rows, positions, nxt, sib = lenient_oracle(case, topk, depth, n)
    assert bool((positions == -1).any()), "the case must break something"
    B = case["seq_lens"].numel()
    for backend in backends_for(OP, device, exclude=("cpp",)):
        dev_case = {k: v.to(device) for k, v in case.items()}
        out = bt._allocate_outputs(dev_case["selected_index"], dev_case["seq_lens"], n, bt.QLEN_BOOL)
        _unchecked_kernel(backend, *dev_case.values(), out, topk, depth, n, bt.QLEN_BOOL)
        mask = encode_mask(rows, n, [0] * B, "qlen_bool")
        assert torch.equal(out[0].cpu(), mask), backend
        assert torch.equal(out[1].cpu(), positions), backend
        assert torch.equal(out[3].cpu(), nxt) and torch.equal(out[4].cpu(), sib), backend


def test_device_kernels_never_write_outside_a_short_full_mask(device):
    """A full mask smaller than sum(seq_lens)*n + B*n*n: rows that do not fit are not written."""
    case, topk, depth, n = _mutated("valid")
    for backend in backends_for(OP, device, exclude=("cpp",)):
        dev_case = {k: v.to(device) for k, v in case.items()}
        guard = torch.zeros(200, dtype=torch.bool, device=device)
        # Sequence 0 owns 5 rows of 5+5 columns, sequence 1 5 rows of 2+5: 85 elements; give 84.
        short = guard[:84]
        out = bt._allocate_outputs(dev_case["selected_index"], dev_case["seq_lens"], n, bt.QLEN_BOOL)
        _unchecked_kernel(backend, *dev_case.values(), (short, *out[1:]), topk, depth, n, bt.FULL)
        assert not bool(guard[short.numel() :].any()), backend
        assert out[1].view(2, n)[1].tolist() == [-1] * n and out[1].view(2, n)[0].tolist() == [5, 6, 6, 7, 8]


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (
            lambda a: a.update(selected_index=a["selected_index"][:, :3]),
            ValueError,
            "selected_index must have shape",
        ),
        (lambda a: a.update(parent_list=a["parent_list"][:, :4]), ValueError, "parent_list must have shape"),
        (lambda a: a.update(seq_lens=a["seq_lens"][:1]), ValueError, "seq_lens must have shape"),
        (
            lambda a: a.update(selected_index=a["selected_index"].float()),
            TypeError,
            "selected_index must have dtype",
        ),
        (lambda a: a.update(seq_lens=a["seq_lens"].float()), TypeError, "seq_lens must have dtype"),
        (lambda a: a.update(mask_mode="bits"), ValueError, "mask_mode must be one of"),
        (lambda a: a.update(topk=0), ValueError, "topk must be an int >= 1"),
        (lambda a: a.update(num_draft_tokens=12), ValueError, "exceeds the 10 candidates"),
    ],
)
def test_bad_arguments_raise(mutate, error, match):
    args = _valid_case() | dict(topk=2, depth=3, num_draft_tokens=5, mask_mode="qlen_bool")
    mutate(args)
    for backend in ["torch"] + backends_for(OP, torch.device("cpu")):
        with pytest.raises(error, match=match):
            run_with_backend(backend, build_tree, **args)


def test_u8_bits_limited_to_32_slots():
    gen = torch.Generator().manual_seed(1)
    draft = simulate_eagle2(1, 33, 4, 4, gen)
    with pytest.raises(ValueError, match="num_draft_tokens=33 > 32"):
        build_tree(
            draft.parent_list,
            draft.selected_index,
            torch.tensor([0]),
            topk=4,
            depth=4,
            num_draft_tokens=33,
            mask_mode="qlen_bits_u8",
        )


def test_bad_out_raises():
    case = _valid_case()
    kw = dict(topk=2, depth=3, num_draft_tokens=5, mask_mode="qlen_bool")
    good = build_tree(**case, **kw)
    with pytest.raises(ValueError, match="tree_mask must have 50 elements"):
        build_tree(**case, **kw, out=(good[0][:1], *good[1:]))
    with pytest.raises(TypeError, match="retrive_index must have dtype"):
        build_tree(**case, **kw, out=(*good[:2], good[2].int(), *good[3:]))
    short_full = (torch.ones(3, dtype=torch.bool), *good[1:])
    for backend in ["torch"] + backends_for(OP, torch.device("cpu")):
        with pytest.raises(ValueError, match="mask mode full needs at least 85"):
            run_with_backend(backend, build_tree, **case, **(kw | {"mask_mode": "full"}), out=short_full)


def test_full_mode_writes_into_a_larger_buffer_and_leaves_its_tail_alone():
    """SGLang hands build_tree its worst-case CUDA-graph mask buffer (larger than this batch needs)."""
    case = _valid_case()
    kw = dict(topk=2, depth=3, num_draft_tokens=5, mask_mode="full")
    want = build_tree(**case, **kw)  # 85 elements
    for backend in ["torch"] + backends_for(OP, torch.device("cpu")):
        big = torch.ones(85 + 20, dtype=torch.bool)
        big[85:] = torch.arange(20) % 3 == 0  # a pattern the tree must not touch
        tail = big[85:].clone()
        out = (big, *(torch.empty_like(t) for t in want[1:]))
        run_with_backend(backend, build_tree, **case, **kw, out=out)
        assert torch.equal(big[:85], want[0]), backend
        assert torch.equal(big[85:], tail), backend
        assert all(torch.equal(g, w) for g, w in zip(out[1:], want[1:])), backend


# --------------------------------------------------------------------------------------------------
# torch.library and torch.compile
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [bt.FULL, bt.QLEN_BITS_I32])
def test_opcheck(mode):
    case = _valid_case()
    out = bt._allocate_outputs(case["selected_index"], case["seq_lens"], 5, mode)
    torch.library.opcheck(torch.ops.eagle.build_tree.default, (*case.values(), *out, 2, 3, 5, mode))


def test_torch_compile_matches_eager():
    gen = torch.Generator().manual_seed(9)
    draft = simulate_eagle2(2, 10, 3, 4, gen)
    seq = torch.tensor([3, 8])

    def step(parent_list, selected, seq_lens):
        mask, pos, idx, nxt, sib = build_tree(
            parent_list, selected, seq_lens, topk=3, depth=4, num_draft_tokens=10, mask_mode="qlen_bits_i32"
        )
        return mask.sum(), pos + 1, nxt * sib

    want = step(draft.parent_list, draft.selected_index, seq)
    got = torch.compile(step, fullgraph=True)(draft.parent_list, draft.selected_index, seq)  # no graph break
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.extension
def test_default_backends():
    assert eagle_kernels.select_backend(OP, torch.device("cpu")) == "cpp"


# --------------------------------------------------------------------------------------------------
# Static trees
# --------------------------------------------------------------------------------------------------
MC_SIM_PARENTS = [-1, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5, 6, 6, 7, 7, 8, 13, 13, 13, 21, 21]


def test_mc_sim_7b_63_layout():
    tree = build_static_tree(MC_SIM_7B_63)
    assert tree.num_draft_tokens == 26 and tree.max_depth == 5 and tree.topk == 4
    assert tree.parent.tolist() == MC_SIM_PARENTS
    assert torch.bincount(tree.depth).tolist() == [1, 4, 8, 8, 3, 2]
    assert tree.rank[1:].tolist() == [p[-1] for p in MC_SIM_7B_63]
    # Independent construction of the retrive arrays and mask from the parent array.
    ref = trees_from_parents([MC_SIM_PARENTS])
    assert torch.equal(tree.retrive_next_token, ref.retrive_next_token[0])
    assert torch.equal(tree.retrive_next_sibling, ref.retrive_next_sibling[0])
    assert torch.equal(tree.mask, ref.mask[0] | (torch.arange(26)[None, :] == 0))
    assert torch.equal(tree.depth, ref.depth[0])
    assert tree.expand_slots.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 13, 21]
    assert [tree.expanded_at_depth(d).tolist() for d in range(5)] == [
        [0],
        [1, 2, 3, 4],
        [5, 6, 7, 8],
        [13],
        [21],
    ]


def test_static_tree_gathers_each_slot_from_its_parents_topk_row():
    tree = build_static_tree(MC_SIM_7B_63, topk=10)
    B = 2
    table = torch.randint(0, 32000, (B, len(tree.expand_slots), 10))
    roots = torch.tensor([5, 6])
    tokens = tree.gather_tokens(roots, table)
    assert tokens.shape == (B, 26) and tokens[:, 0].tolist() == [5, 6]
    rows = {int(s): k for k, s in enumerate(tree.expand_slots)}
    for i, path in enumerate(tree.paths, start=1):
        assert torch.equal(tokens[:, i], table[:, rows[int(tree.parent[i])], path[-1]])
    index, nxt, sib = tree.batched(B, dtype=torch.int32)
    assert index.tolist() == [list(range(26)), list(range(26, 52))] and nxt.dtype == torch.int32
    assert torch.equal(tree.positions(torch.tensor([10, 0])), torch.cat([tree.depth + 10, tree.depth]))


def test_static_tree_sorts_paths_and_accepts_any_order():
    shuffled = list(reversed(MC_SIM_7B_63))
    assert build_static_tree(shuffled).parent.tolist() == MC_SIM_PARENTS
    chain = build_static_tree([[0], [0, 0], [0, 0, 0]])
    assert chain.parent.tolist() == [-1, 0, 1, 2] and chain.topk == 1
    assert build_static_tree([]).num_draft_tokens == 1


def test_static_trees_compare_hash_and_print_by_their_paths_and_topk():
    """Two builds of one tree are equal (it was a RuntimeError: tensor fields compared elementwise)
    and hash alike; the repr names the tree instead of dumping its tensors."""
    a, b = build_static_tree(MC_SIM_7B_63), build_static_tree(list(reversed(MC_SIM_7B_63)))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != build_static_tree(MC_SIM_7B_63, topk=10) and a != build_static_tree(MC_SIM_7B_63[:4])
    assert a != "static" and a != MC_SIM_7B_63
    text = repr(a)
    assert text.startswith("StaticTree(num_draft_tokens=26, max_depth=5, topk=4, paths=((0,), (1,),")
    assert "tensor" not in text and len(text) < 400


@pytest.mark.parametrize(
    "paths,topk,error,match",
    [
        ([[0], [1, 0], [0, 0]], None, ValueError, "not prefix-closed"),
        ([[0], [-1]], None, ValueError, "negative rank"),
        ([[0], [0, 3]], 3, ValueError, "rank 3 >= topk=3"),
        ([[0], [0]], None, ValueError, "more than once"),
        ([[0], []], None, ValueError, "non-empty"),
        ([[0], [0.5]], None, TypeError, "non-int rank"),
        ([[0], "1"], None, TypeError, "sequence of ints"),
        ([[0]], 0, ValueError, "topk must be"),
    ],
)
def test_static_tree_rejects_bad_paths(paths, topk, error, match):
    with pytest.raises(error, match=match):
        build_static_tree(paths, topk=topk)


# --------------------------------------------------------------------------------------------------
# Host fast path: cached argument checks, direct eager calls (issue 4)
# --------------------------------------------------------------------------------------------------
def test_bad_arguments_raise_after_the_same_call_passed():
    """Cached checks must not let a different (bad) signature through; failures are never cached."""
    case = _valid_case()
    kw = dict(topk=2, depth=3, num_draft_tokens=5, mask_mode="qlen_bool")
    good = build_tree(**case, **kw)
    build_tree(**case, **kw, out=good)
    build_tree(**case, **kw, out=good)  # served by the signature caches
    for _ in range(2):
        with pytest.raises(TypeError, match="seq_lens must have dtype"):
            build_tree(**(case | {"seq_lens": case["seq_lens"].float()}), **kw)
        with pytest.raises(ValueError, match="topk must be an int >= 1"):
            build_tree(**case, **(kw | {"topk": 0}))
        with pytest.raises(ValueError, match="positions must be contiguous"):
            strided = torch.empty(good[1].numel() * 2, dtype=torch.int64)[::2]
            build_tree(**case, **kw, out=(good[0], strided, *good[2:]))
        with pytest.raises(ValueError, match="out must hold 5 tensors"):
            build_tree(**case, **kw, out=good[:4])


def test_eager_fast_path_matches_registered_op():
    case = _valid_case()
    kw = dict(topk=2, depth=3, num_draft_tokens=5, mask_mode="qlen_bool")
    fast = build_tree(**case, **kw)
    registered = tuple(torch.empty_like(t).fill_(7) for t in fast)
    torch.ops.eagle.build_tree(*case.values(), *registered, 2, 3, 5, bt.MASK_MODES["qlen_bool"])
    for got, want in zip(fast, registered):
        assert torch.equal(got, want)


def test_forced_backend_still_applies_after_cached_calls(monkeypatch):
    case = _valid_case()
    kw = dict(topk=2, depth=3, num_draft_tokens=5, mask_mode="qlen_bool")
    want = build_tree(**case, **kw)
    calls = []
    real = bt._build_tree_into_ref
    monkeypatch.setattr(bt, "_build_tree_into_ref", lambda *a: calls.append(1) or real(*a))
    with eagle_kernels.use_backend("torch"):
        got = build_tree(**case, **kw)
    assert calls == [1]
    monkeypatch.setenv("EAGLE_KERNELS_BACKEND", "torch")
    got_env = build_tree(**case, **kw)
    assert calls == [1, 1]
    for a, b, c in zip(got, got_env, want):
        assert torch.equal(a, c) and torch.equal(b, c)
    monkeypatch.setenv("EAGLE_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' was forced but"):
        build_tree(**case, **kw)


@pytest.mark.parametrize("n", [5, 12, 20, 32])
def test_qlen_bits_u8_masks_feed_tree_attention(n):
    """build_tree packs uint8 rows into SGLang's 1 / 2 / 4-byte words; tree_attention takes them as
    they come (it required exactly ceil(n/8) bytes, so 17 <= n <= 24 failed) and gives the result of
    the bool mask."""
    gen = torch.Generator().manual_seed(n)
    topk, depth = 4, 5
    draft = simulate_eagle2(2, n, topk, depth, gen)
    seq = torch.tensor([3, 7])
    kw = dict(topk=topk, depth=depth, num_draft_tokens=n)
    bits = build_tree(draft.parent_list, draft.selected_index, seq, mask_mode="qlen_bits_u8", **kw)[0]
    dense = build_tree(draft.parent_list, draft.selected_index, seq, mask_mode="qlen_bool", **kw)[0]
    assert bits.dtype == torch.uint8 and bits.shape[2] in (1, 2, 4)
    q = torch.randn(2, n, 4, 16, generator=gen)
    k, v = torch.randn(2, 2, 48, 16, generator=gen), torch.randn(2, 2, 48, 16, generator=gen)
    lens = seq.to(torch.int32)
    want = eagle_kernels.tree_attention(q, k, v, lens, dense.view(2, n, n))
    torch.testing.assert_close(eagle_kernels.tree_attention(q, k, v, lens, bits), want, rtol=0, atol=0)
    direct = torch.ops.eagle.tree_attention(q, k, v, lens, bits, 16**-0.5)  # what serving stacks call
    torch.testing.assert_close(direct, want, rtol=0, atol=0)
