from __future__ import annotations

import random
import sys

import pytest
import torch

import eagle_kernels
from eagle_kernels import verify_tree_greedy, verify_tree_greedy_ref
from eagle_kernels.verify_tree_greedy import sglang_verify_tree_greedy
from tests.kernels.helpers import backends_for, run_with_backend
from tests.kernels.random_trees import random_parents

OP = "verify_tree_greedy"


# --------------------------------------------------------------------------------------------------
# Cases: random trees with an explicit (possibly shuffled) sibling order, and an oracle over them
# --------------------------------------------------------------------------------------------------
class Case:
    """One batch of trees kept as plain Python lists (for the oracle) and as op inputs."""

    def __init__(self, parents, children, rows, cand, target, steps, index_dtype, token_dtype):
        self.parents, self.children, self.rows = parents, children, rows
        self.cand, self.target, self.steps = cand, target, steps
        B, n = len(parents), len(parents[0])
        first = [[-1] * n for _ in range(B)]
        sibling = [[-1] * n for _ in range(B)]
        for b in range(B):
            for p, kids in enumerate(children[b]):
                if kids:
                    first[b][p] = kids[0]
                for left, right in zip(kids, kids[1:]):
                    sibling[b][left] = right
        target_by_row = [[0] * n for _ in range(B)]
        for b in range(B):
            for s in range(n):
                target_by_row[b][rows[b][s] - b * n] = target[b][s]
        self.inputs = (
            torch.tensor(cand, dtype=token_dtype),
            torch.tensor(rows, dtype=index_dtype),
            torch.tensor(first, dtype=index_dtype),
            torch.tensor(sibling, dtype=index_dtype),
            torch.tensor(target_by_row, dtype=token_dtype),
        )


def make_case(
    B,
    n,
    max_depth,
    vocab,
    steps,
    seed,
    *,
    p_match=0.6,
    shuffle=False,
    permute_rows=False,
    index_dtype=torch.int64,
    token_dtype=torch.int64,
) -> Case:
    """``target[b][s]`` equals the token of one of ``s``'s children with probability ``p_match`` (so
    long paths occur); a small vocabulary makes siblings share tokens (first-in-order rule)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    parents, children, rows, cand, target = [], [], [], [], []
    for b in range(B):
        par = random_parents(n, max_depth, gen)
        kids = [[c for c in range(n) if par[c] == p] for p in range(n)]
        if shuffle:
            for k in kids:
                rng.shuffle(k)
        perm = list(range(n))
        if permute_rows:
            rng.shuffle(perm)
        tok = [rng.randrange(vocab) for _ in range(n)]
        tgt = [
            tok[rng.choice(kids[s])] if kids[s] and rng.random() < p_match else rng.randrange(vocab)
            for s in range(n)
        ]
        parents.append(par)
        children.append(kids)
        rows.append([b * n + perm[s] for s in range(n)])
        cand.append(tok)
        target.append(tgt)
    return Case(parents, children, rows, cand, target, steps, index_dtype, token_dtype)


def oracle(case: Case):
    """Plain Python walk: at each node try its children in order, accept the first whose token is
    the target at the node; the bonus is the target at the last accepted node."""
    B, n = len(case.parents), len(case.parents[0])
    predicts = [0] * (B * n)
    accept_index = [[-1] * case.steps for _ in range(B)]
    accept_num = [0] * B
    for b in range(B):
        cur = 0
        path = [0]
        while len(path) < case.steps:
            nxt = next((c for c in case.children[b][cur] if case.cand[b][c] == case.target[b][cur]), None)
            if nxt is None:
                break
            predicts[case.rows[b][cur]] = case.cand[b][nxt]
            path.append(nxt)
            cur = nxt
        predicts[case.rows[b][cur]] = case.target[b][cur]
        for j, s in enumerate(path):
            accept_index[b][j] = case.rows[b][s]
        accept_num[b] = len(path) - 1
    return (
        torch.tensor(predicts, dtype=torch.int32),
        torch.tensor(accept_index, dtype=torch.int32),
        torch.tensor(accept_num, dtype=torch.int32),
    )


def assert_same(got, want, msg=""):
    for name, g, w in zip(("predicts", "accept_index", "accept_token_num"), got, want):
        assert g.dtype == torch.int32, f"{name} dtype {g.dtype} {msg}"
        assert torch.equal(g.cpu(), w.cpu()), f"{name} differs {msg}\n got={g.tolist()}\nwant={w.tolist()}"


def assert_invariants(case: Case, out):
    """Accepted prefix contiguous (each slot a child of the previous), -1 after, counts add up,
    predicts set exactly on the accepted rows, and the walk stopped for a reason."""
    predicts, accept_index, accept_num = (t.cpu() for t in out)
    B, n = len(case.parents), len(case.parents[0])
    slot_of_row = {case.rows[b][s]: (b, s) for b in range(B) for s in range(n)}
    on_path = set()
    for b in range(B):
        k = int(accept_num[b])
        row = accept_index[b].tolist()
        assert 0 <= k < case.steps
        assert all(r >= 0 for r in row[: k + 1]) and all(r == -1 for r in row[k + 1 :])
        slots = [slot_of_row[r][1] for r in row[: k + 1]]
        assert slots[0] == 0
        for prev, s in zip(slots, slots[1:]):
            assert case.parents[b][s] == prev
            assert case.cand[b][s] == case.target[b][prev]
            assert int(predicts[case.rows[b][prev]]) == case.cand[b][s]
        last = slots[-1]
        assert int(predicts[case.rows[b][last]]) == case.target[b][last]
        if k < case.steps - 1:  # stopped early: no child of the last node matches
            assert all(case.cand[b][c] != case.target[b][last] for c in case.children[b][last])
        on_path.update(case.rows[b][s] for s in slots)
    off_path = [r for r in range(B * n) if r not in on_path]
    assert all(int(predicts[r]) == 0 for r in off_path)


def run(backend, case: Case, device: torch.device | str = "cpu"):
    inputs = tuple(t.to(device) for t in case.inputs)
    return run_with_backend(backend, verify_tree_greedy, *inputs, num_spec_steps=case.steps)


ALL_BACKENDS = ["torch"] + backends_for(OP, torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------------
def test_hand_built_tree():
    """root(0) -> [1, 2, 3]; 1 -> [4, 5]; 2 -> [6]; 4 -> [7]; sibling 2 shares token 11 with 1."""
    parents = [-1, 0, 0, 0, 1, 1, 2, 4]
    children = [[1, 2, 3], [4, 5], [6], [], [7], [], [], []]
    cand = [5, 11, 11, 12, 20, 21, 30, 40]
    target = [11, 21, 99, 0, 40, 9, 0, 77]
    case = Case([parents], [children], [list(range(8))], [cand], [target], 4, torch.int64, torch.int64)
    want = (
        torch.tensor([11, 21, 0, 0, 0, 9, 0, 0], dtype=torch.int32),  # slot 5 is a leaf: bonus 9
        torch.tensor([[0, 1, 5, -1]], dtype=torch.int32),
        torch.tensor([2], dtype=torch.int32),
    )
    assert_same(oracle(case), want)
    for backend in ALL_BACKENDS:
        assert_same(run(backend, case), want, backend)


@pytest.mark.parametrize("steps", [1, 2, 3, 9])
def test_step_limit_bounds_the_walk(steps):
    """A chain whose every draft matches: exactly num_spec_steps - 1 drafts are accepted."""
    n = 6
    parents = [-1, 0, 1, 2, 3, 4]
    children = [[1], [2], [3], [4], [5], []]
    cand = [1, 2, 3, 4, 5, 6]
    target = [2, 3, 4, 5, 6, 7]
    case = Case([parents], [children], [list(range(n))], [cand], [target], steps, torch.int32, torch.int32)
    want = oracle(case)
    assert int(want[2][0]) == min(steps - 1, n - 1)
    for backend in ALL_BACKENDS:
        assert_same(run(backend, case), want, f"{backend} steps={steps}")


def test_reference_matches_oracle_fuzzed():
    for seed in range(150):
        rng = random.Random(seed)
        case = make_case(
            B=rng.randint(1, 6),
            n=rng.randint(1, 40),
            max_depth=rng.randint(1, 10),
            vocab=rng.choice([2, 3, 50, 32000]),
            steps=rng.randint(1, 12),
            seed=seed,
            p_match=rng.choice([0.3, 0.8, 1.0]),
            shuffle=seed % 2 == 1,
            permute_rows=seed % 3 == 0,
            index_dtype=rng.choice([torch.int32, torch.int64]),
            token_dtype=rng.choice([torch.int32, torch.int64]),
        )
        assert_same(verify_tree_greedy_ref(*case.inputs, case.steps), oracle(case), f"seed={seed}")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_backends_match_reference_fuzzed(device, index_dtype):
    """>= 400 random trees per backend, both index dtypes across the two parametrisations (every
    backend of the test device: CUDA and Triton kernels on a GPU)."""
    backends = backends_for(OP, device)
    assert backends, "no accelerated backend reachable; the extension or triton is missing"
    trees = 0
    for seed in range(40):
        rng = random.Random(1000 + seed)
        case = make_case(
            B=rng.randint(3, 8),
            n=rng.choice([1, 2, 5, 8, 17, 33, 64]),
            max_depth=rng.randint(1, 12),
            vocab=rng.choice([2, 4, 1000]),
            steps=rng.randint(1, 8),
            seed=1000 + seed,
            p_match=rng.choice([0.5, 0.9, 1.0]),
            shuffle=seed % 2 == 0,
            permute_rows=seed % 4 == 1,
            index_dtype=index_dtype,
            token_dtype=rng.choice([torch.int32, torch.int64]),
        )
        trees += len(case.parents)
        want = verify_tree_greedy_ref(*case.inputs, case.steps)
        assert_same(want, oracle(case), f"ref seed={seed}")
        for backend in backends:
            got = run(backend, case, device)
            assert_same(got, want, f"{backend} seed={seed}")
            assert_invariants(case, got)
    assert trees >= 200


def test_long_paths_occur():
    """The fuzzing really exercises deep acceptance (guards against a generator that never matches)."""
    case = make_case(B=32, n=40, max_depth=8, vocab=1000, steps=9, seed=5, p_match=1.0)
    num = oracle(case)[2]
    assert int(num.max()) >= 6 and float(num.float().mean()) > 2


def test_large_tree_all_backends(device):
    case = make_case(B=3, n=300, max_depth=20, vocab=3, steps=21, seed=9, p_match=0.9, shuffle=True)
    want = oracle(case)
    for backend in ["torch", *backends_for(OP, device)]:
        assert_same(run(backend, case, device), want, backend)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _chain_inputs():
    """Two sequences, n = 5: root -> 1 -> 2, root's second child 3, 3 -> 4."""
    parents = [-1, 0, 1, 0, 3]
    children = [[1, 3], [2], [], [4], []]
    case = Case(
        [parents] * 2,
        [children] * 2,
        [list(range(5)), list(range(5, 10))],
        [[1, 2, 3, 4, 5]] * 2,
        [[2, 3, 0, 0, 0]] * 2,
        4,
        torch.int64,
        torch.int64,
    )
    return [t.clone() for t in case.inputs]


def _set(i, index, value):
    def mutate(args):
        args[i][index] = value

    return mutate


@pytest.mark.parametrize(
    "mutate,match",
    [
        (_set(2, (0, 1), 5), "retrive_next_token is out of range"),
        (_set(3, (1, 1), -2), "retrive_next_sibling is out of range"),
        (_set(1, (1, 0), 0), "retrive_index is out of range"),
        (_set(1, (0, 2), 1), "distinct rows"),
        (_set(2, (0, 2), 1), "cycle"),  # 2 -> 1 -> 2
        (_set(2, (0, 2), 2), "cycle"),  # self loop
        (_set(2, (0, 4), 0), "cycle"),  # back to the root
        (_set(3, (0, 1), 4), "cycle"),  # 4 reachable twice: shared node
        (_set(3, (0, 0), 2), "root"),
        (_set(4, (1, 3), -1), "target_predict is out of range"),
        (_set(4, (1, 3), 2**31), "target_predict is out of range"),
    ],
)
def test_bad_tree_values_raise(mutate, match):
    args = _chain_inputs()
    mutate(args)
    for backend in ALL_BACKENDS:
        with pytest.raises(ValueError, match=match):
            run_with_backend(backend, verify_tree_greedy, *args, num_spec_steps=4)


def test_unreachable_cycle_is_detected():
    """Slots 3 and 4 point at each other and are not reachable from the root."""
    args = _chain_inputs()
    args[2][0, 0] = 1
    args[3][0, 1] = -1
    args[2][0, 3] = 4
    args[2][0, 4] = 3
    for backend in ALL_BACKENDS:
        with pytest.raises(ValueError, match="cycle"):
            run_with_backend(backend, verify_tree_greedy, *args, num_spec_steps=4)


def _tree_arrays(B: int, children: list[list[int]]):
    """Inputs for B copies of the tree with these child lists (in sibling order), every target
    matching the first child, so every path is accepted as far as it goes."""
    n = len(children)
    first, sibling = [-1] * n, [-1] * n
    for p, kids in enumerate(children):
        if kids:
            first[p] = kids[0]
        for left, right in zip(kids, kids[1:]):
            sibling[left] = right
    cand = list(range(n))
    target = [kids[-1] if kids else 0 for kids in children]  # the last sibling: after the longest scan
    rows = [[b * n + s for s in range(n)] for b in range(B)]
    return [
        torch.tensor([cand] * B),
        torch.tensor(rows),
        torch.tensor([first] * B),
        torch.tensor([sibling] * B),
        torch.tensor([target] * B),
    ]


@pytest.mark.parametrize("sibling_count", [2, 9])
def test_a_child_before_its_parent_is_refused(sibling_count):
    """SGLang's trees put every child after its parent, so an accepted path lists increasing slots,
    which compact_kv_cache's in-place moves rely on (a path going back a slot would have the CUDA
    kernel overwrite a row before reading it). A child reached at the end of a long sibling chain
    must be found too (the check resolves parents by pointer doubling)."""
    n = sibling_count + 3
    # root's children: slots 1 .. sibling_count; slot 1's child is the last slot; the last sibling
    # (slot sibling_count) has child sibling_count + 1, which is moved before it below
    kids = [list(range(1, sibling_count + 1))] + [[] for _ in range(n - 1)]
    kids[1] = [n - 1]
    kids[sibling_count] = [sibling_count + 1]
    ok = _tree_arrays(2, kids)
    for backend in ALL_BACKENDS:
        run_with_backend(backend, verify_tree_greedy, *ok, num_spec_steps=3)
    # swap slots sibling_count and sibling_count + 1: the child now comes before its parent
    a, c = sibling_count, sibling_count + 1
    swap = {a: c, c: a}
    moved = [[swap.get(k, k) for k in kids[swap.get(p, p)]] for p in range(n)]
    bad = _tree_arrays(2, moved)
    for backend in ALL_BACKENDS:
        with pytest.raises(ValueError, match=f"slot {a} of sequence 0 is a child of slot {c}"):
            run_with_backend(backend, verify_tree_greedy, *bad, num_spec_steps=3)
    # siblings in descending slots are fine: only parent-before-child is required
    backwards = [list(reversed(k)) for k in kids]
    for backend in ALL_BACKENDS:
        run_with_backend(backend, verify_tree_greedy, *_tree_arrays(2, backwards), num_spec_steps=3)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), ValueError, "candidates must have 2 dimensions"),
        (lambda a: a.__setitem__(1, a[1][:, :4]), ValueError, "retrive_index must have shape"),
        (lambda a: a.__setitem__(2, a[2].float()), TypeError, "retrive_next_token must have dtype"),
        (lambda a: a.__setitem__(3, a[3].int()), TypeError, "dtypes must match"),
        (lambda a: a.__setitem__(4, a[4][:1]), ValueError, "target_predict must have shape"),
        (lambda a: a.__setitem__(0, a[0][:, :0]), ValueError, "must have shape"),
    ],
)
def test_bad_shapes_and_dtypes_raise(mutate, exc, match):
    args = _chain_inputs()
    mutate(args)
    with pytest.raises(exc, match=match):
        verify_tree_greedy(*args, num_spec_steps=4)


def test_more_tree_slots_than_the_triton_walk_can_order_raise_there_only():
    """The Triton walk orders children by the int32 key rank * next_pow2(n) + slot: past 2**15 slots
    it wrapped negative and read before the inputs, on a valid tree too; the Triton launcher now
    refuses such trees (the CUDA kernel stops at 2048 and names the Triton backend), while the C++
    backend and the reference take them."""
    n = 2**15 + 1
    index = torch.arange(n)[None]
    args = (index, index, torch.full((1, n), -1), torch.full((1, n), -1), index)
    for backend in [b for b in ALL_BACKENDS if b != "triton"]:
        out = run_with_backend(backend, verify_tree_greedy, *args, num_spec_steps=2)
        assert out[2].tolist() == [0], backend
    if "triton" in ALL_BACKENDS:
        with pytest.raises(ValueError, match=r"the Triton kernel takes trees of at most 32768 slots"):
            run_with_backend("triton", verify_tree_greedy, *args, num_spec_steps=2)


def test_trees_past_the_cuda_kernels_limit_are_dispatched_away_from_it(monkeypatch, device):
    """The CUDA kernel (first choice on CUDA tensors) holds at most 2048 slots; a larger tree raised
    there ("use the Triton backend") although the Triton kernel takes it. Default dispatch now asks
    for the extension only when the tree fits, and a tree past it still verifies on the device."""
    module = sys.modules["eagle_kernels.verify_tree_greedy"]  # (the package's name is the function)

    asked = []
    real = module.select_backend

    def recording(op, device, *, prefer_cuda_ext=None):
        asked.append(prefer_cuda_ext)
        return real(op, device, prefer_cuda_ext=prefer_cuda_ext)

    monkeypatch.setattr(module, "select_backend", recording)
    for n, prefer in ((2048, None), (2049, False)):
        case = make_case(B=1, n=n, max_depth=12, vocab=3, steps=13, seed=n, p_match=0.9, shuffle=True)
        asked.clear()
        inputs = tuple(t.to(device) for t in case.inputs)
        assert_same(verify_tree_greedy(*inputs, num_spec_steps=case.steps), oracle(case), f"n={n}")
        assert asked == [prefer], n


@pytest.mark.parametrize("steps", [0, -1, 2.0, True])
def test_bad_num_spec_steps_raises(steps):
    with pytest.raises(ValueError, match="num_spec_steps"):
        verify_tree_greedy(*_chain_inputs(), num_spec_steps=steps)


# --------------------------------------------------------------------------------------------------
# Registration, compile, drop-in
# --------------------------------------------------------------------------------------------------
def test_opcheck():
    case = make_case(B=3, n=9, max_depth=4, vocab=3, steps=5, seed=3, p_match=0.9)
    torch.library.opcheck(torch.ops.eagle.verify_tree_greedy.default, (*case.inputs, case.steps))


def test_torch_compile():
    case = make_case(B=4, n=12, max_depth=5, vocab=3, steps=6, seed=4, p_match=0.9)

    def step(*args):
        predicts, accept_index, num = verify_tree_greedy(*args, num_spec_steps=6)
        return predicts, accept_index, num + 1

    want = step(*case.inputs)
    got = torch.compile(step, fullgraph=True)(*case.inputs)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("with_stream,extra_predicts", [(False, 0), (True, 1)])
def test_sglang_drop_in_matches_functional_op(with_stream, extra_predicts):
    """SGLang allocates predicts with B*n + 1 entries (eagle_info: predict_shape[-1] += 1)."""
    case = make_case(B=5, n=16, max_depth=6, vocab=4, steps=6, seed=11, p_match=0.9, shuffle=True)
    B, n = case.inputs[0].shape
    want_predicts, want_index, want_num = verify_tree_greedy(*case.inputs, num_spec_steps=6)
    for backend in ALL_BACKENDS:
        predicts = torch.full((B * n + extra_predicts,), -7, dtype=torch.int32)
        accept_index = torch.full((B, 6), -1, dtype=torch.int32)
        accept_num = torch.full((B,), 99, dtype=torch.int32)
        extra = (0,) if with_stream else ()
        with eagle_kernels.use_backend(backend):
            sglang_verify_tree_greedy(predicts, accept_index, accept_num, *case.inputs, *extra)
        on_path = torch.zeros(B * n + extra_predicts, dtype=torch.bool)
        on_path[want_index[want_index >= 0].long()] = True
        assert torch.equal(predicts[on_path], want_predicts[on_path[: B * n]]), backend
        assert bool((predicts[~on_path] == -7).all()), f"{backend}: rows off the path must be left alone"
        assert torch.equal(accept_index, want_index) and torch.equal(accept_num, want_num), backend


def test_sglang_drop_in_rejects_wrong_output_shape():
    args = _chain_inputs()
    with pytest.raises(ValueError, match="accept_token_num must have shape"):
        sglang_verify_tree_greedy(
            torch.zeros(10, dtype=torch.int32),
            torch.full((2, 4), -1, dtype=torch.int32),
            torch.zeros(3, dtype=torch.int32),
            *args,
        )


def test_sglang_drop_in_rejects_a_short_predicts():
    args = _chain_inputs()
    B, n = args[0].shape
    with pytest.raises(ValueError, match=f"predicts must have at least B\\*n={B * n} entries"):
        sglang_verify_tree_greedy(
            torch.zeros(B * n - 1, dtype=torch.int32),
            torch.full((B, 4), -1, dtype=torch.int32),
            torch.zeros(B, dtype=torch.int32),
            *args,
        )


def test_sglang_drop_in_rejects_wrong_output_dtype():
    args = _chain_inputs()
    with pytest.raises(TypeError, match="predicts must have dtype"):
        sglang_verify_tree_greedy(
            torch.zeros(10, dtype=torch.int64),
            torch.full((2, 4), -1, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32),
            *args,
        )


@pytest.mark.extension
def test_default_cpu_backend_is_cpp():
    assert eagle_kernels.select_backend(OP, torch.device("cpu")) == "cpp"


# --------------------------------------------------------------------------------------------------
# Host fast path: cached argument checks and backend choice (issue 4)
# --------------------------------------------------------------------------------------------------
def test_bad_input_raises_after_the_same_shapes_passed():
    """A cached signature must not let a different (bad) signature through, and a failure is never
    cached: the same clear error comes back on every call."""
    args = _chain_inputs()
    verify_tree_greedy(*args, num_spec_steps=4)
    verify_tree_greedy(*args, num_spec_steps=4)  # served by the signature cache
    bad = [*args[:2], args[2].float(), *args[3:]]
    for _ in range(2):
        with pytest.raises(TypeError, match="retrive_next_token must have dtype"):
            verify_tree_greedy(*bad, num_spec_steps=4)
    for steps in (0, True, 4.0):
        with pytest.raises(ValueError, match="num_spec_steps"):
            verify_tree_greedy(*args, num_spec_steps=steps)
    # Values are never cached: the same signature with a cycle still raises on CPU.
    cyclic = [t.clone() for t in args]
    cyclic[2][0, 2] = 1
    with pytest.raises(ValueError, match="cycle"):
        verify_tree_greedy(*cyclic, num_spec_steps=4)


def test_eager_fast_path_matches_registered_op():
    args = _chain_inputs()
    fast = verify_tree_greedy(*args, num_spec_steps=4)
    registered = torch.ops.eagle.verify_tree_greedy(*args, 4)
    for got, want in zip(fast, registered):
        assert torch.equal(got, want)


def test_forced_backend_wins_over_cached_choice(monkeypatch):
    """The backend choice is cached, but use_backend and EAGLE_KERNELS_BACKEND still take effect on
    the next call, in both directions."""
    module = sys.modules["eagle_kernels.verify_tree_greedy"]  # the package exports the function
    cpu = torch.device("cpu")
    calls = []
    real_ref = module.verify_tree_greedy_ref
    monkeypatch.setattr(module, "verify_tree_greedy_ref", lambda *a: calls.append(1) or real_ref(*a))
    monkeypatch.delenv("EAGLE_KERNELS_BACKEND", raising=False)
    args = _chain_inputs()
    default = eagle_kernels.select_backend(OP, cpu)
    verify_tree_greedy(*args, num_spec_steps=4)
    assert calls == [] or default == "torch"
    calls.clear()
    with eagle_kernels.use_backend("torch"):
        assert eagle_kernels.select_backend(OP, cpu) == "torch"
        verify_tree_greedy(*args, num_spec_steps=4)
    assert calls == [1]
    assert eagle_kernels.select_backend(OP, cpu) == default
    monkeypatch.setenv("EAGLE_KERNELS_BACKEND", "torch")
    assert eagle_kernels.select_backend(OP, cpu) == "torch"
    verify_tree_greedy(*args, num_spec_steps=4)
    assert calls == [1, 1]
    monkeypatch.setenv("EAGLE_KERNELS_BACKEND", "bogus")
    for _ in range(2):
        with pytest.raises(ValueError, match="EAGLE_KERNELS_BACKEND='bogus'"):
            eagle_kernels.select_backend(OP, cpu)
    monkeypatch.setenv("EAGLE_KERNELS_BACKEND", "cuda")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="backend 'cuda' was forced but"):
            verify_tree_greedy(*args, num_spec_steps=4)
    monkeypatch.setenv("EAGLE_KERNELS_BACKEND", "auto")
    assert eagle_kernels.select_backend(OP, cpu) == default


def test_debug_flag_is_read_on_every_call(monkeypatch):
    from eagle_kernels._backend import debug_checks_enabled

    monkeypatch.setenv("EAGLE_KERNELS_DEBUG", "1")
    assert debug_checks_enabled()
    monkeypatch.setenv("EAGLE_KERNELS_DEBUG", "0")
    assert not debug_checks_enabled()
    monkeypatch.delenv("EAGLE_KERNELS_DEBUG")
    assert not debug_checks_enabled()
