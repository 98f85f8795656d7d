"""chain_speculative_sampling (vLLM's flattened layout): oracle, backends, invariants, bad input and
the statistical losslessness test (one-hot drafts and sampled drafts, with a negative control)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from eagle_kernels import chain_speculative_sampling, chain_speculative_sampling_ref
from tests.kernels.helpers import backends_for, run_with_backend
from tests.kernels.test_tree_speculative_sampling import V_STAT, PrefixModel, _draw, _mass, chi_square_pvalue

tss = importlib.import_module("eagle_kernels.tree_speculative_sampling")
OP = "chain_speculative_sampling"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _small_triton_blocks(monkeypatch):
    monkeypatch.setattr(tss, "TRITON_BLOCK_V", 32)


def make_case(seed: int, *, draft: bool, id_dtype=torch.int64, cu_dtype=torch.int64, bonus_2d=False):
    gen = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 6, (1,), generator=gen))
    V = int(torch.randint(2, 80, (1,), generator=gen))
    max_k = int(torch.randint(1, 7, (1,), generator=gen))
    counts = torch.randint(0, max_k + 1, (B,), generator=gen)
    T = int(counts.sum())
    q = torch.softmax(torch.randn(T, V, generator=gen) * 2, -1) if draft else None
    if draft:
        d = torch.multinomial(q, 1, generator=gen)[:, 0] if T else torch.zeros(0, dtype=torch.int64)
        p = 0.5 * q + 0.5 * torch.softmax(torch.randn(T, V, generator=gen) * 2, -1)
    else:
        d = torch.randint(0, V, (T,), generator=gen)
        logits = torch.randn(T, V, generator=gen) * 2
        logits[torch.arange(T), d] += 2.5 * torch.rand(T, generator=gen)
        p = torch.softmax(logits, -1)
        zero = torch.rand(T, generator=gen) < 0.2  # some drafts with target probability exactly 0
        p[zero, d[zero]] = 0.0
        p = p / p.sum(-1, keepdim=True)
    bonus = torch.randint(0, V, (B, 1) if bonus_2d else (B,), generator=gen)
    u = torch.rand(T, generator=gen)
    uf = torch.rand(B, generator=gen)
    args = [d.to(id_dtype), counts.cumsum(0).to(cu_dtype), q, p.float(), bonus.to(id_dtype), u, uf]
    return args, int(counts.max())


def oracle(d, cu, q, p, bonus, u, uf, max_spec_len):
    """Per request, per position, from the docstring (Python / numpy scalars)."""
    B, V = cu.shape[0], p.shape[1]
    out = torch.full((B, max_spec_len + 1), -1, dtype=torch.int32)
    d, cu, bonus = d.tolist(), cu.tolist(), bonus.reshape(-1).tolist()
    start = 0
    for b in range(B):
        end = cu[b]
        for j, t in enumerate(range(start, end)):
            pd = float(np.float32(p[t, d[t]]))
            qd = 1.0 if q is None else float(np.float32(q[t, d[t]]))
            if float(np.float32(u[t])) * 1.0 * qd < pd:
                out[b, j] = d[t]
                continue
            if q is None:
                masses = [_mass(float(p[t, x])) for x in range(V)]
                masses[d[t]] = 0
            else:
                masses = [int(max(float(p[t, x]) - float(q[t, x]), 0.0) * 2**60) for x in range(V)]
            if sum(masses) == 0:
                masses = [_mass(float(p[t, x])) for x in range(V)]
            out[b, j] = _draw(masses, float(uf[b]))
            break
        else:
            out[b, end - start] = bonus[b]
        start = end
    return out


def _backends(device: torch.device = CPU):
    backends = backends_for(OP, device)
    assert backends, "no accelerated backend reachable; the extension or triton is missing"
    return backends


@pytest.mark.parametrize("draft", [False, True], ids=["one_hot", "draft_probs"])
def test_reference_matches_scalar_oracle(draft):
    for seed in range(40):
        args, k = make_case(seed, draft=draft)
        assert torch.equal(chain_speculative_sampling_ref(*args, max_spec_len=k), oracle(*args, k)), seed


@pytest.mark.parametrize("draft", [False, True], ids=["one_hot", "draft_probs"])
def test_backends_match_reference_fuzzed(device, draft):
    """Every backend of the test device (the Triton kernel on a GPU) against the reference on CPU."""
    for seed in range(40):
        dtypes = (torch.int32, torch.int64)
        args, k = make_case(
            100 + seed,
            draft=draft,
            id_dtype=dtypes[seed % 2],
            cu_dtype=dtypes[seed // 2 % 2],
            bonus_2d=seed % 3 == 0,
        )
        extra = seed % 4  # a wider output than needed is padded
        want = chain_speculative_sampling_ref(*args, max_spec_len=k + extra)
        on_device = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        for backend in _backends(device):
            got = run_with_backend(backend, chain_speculative_sampling, *on_device, max_spec_len=k + extra)
            assert got.dtype == torch.int32
            assert torch.equal(got.cpu(), want), f"{backend} seed {seed}\n{got}\n{want}"


def test_invariants_and_default_width():
    for seed in range(30):
        args, k = make_case(200 + seed, draft=seed % 2 == 1)
        d, cu, _, _, bonus, _, _ = args
        for backend in ["torch", *backends_for(OP, CPU, exclude=("triton",))]:
            out = run_with_backend(backend, chain_speculative_sampling, *args)  # width from cu
            assert out.shape == (cu.shape[0], k + 1)
            start = 0
            for b in range(cu.shape[0]):
                count = int(cu[b]) - start
                row = out[b].tolist()
                emitted = [x for x in row if x != -1]
                assert row[: len(emitted)] == emitted, "-1 only after the emitted tokens"
                assert 1 <= len(emitted) <= count + 1
                assert emitted[:-1] == d[start : start + len(emitted) - 1].tolist(), "accepted drafts first"
                if len(emitted) == count + 1:
                    assert emitted[-1] == int(bonus[b])
                start += count


def test_one_hot_targets_give_the_greedy_path():
    for seed in range(30):
        args, k = make_case(300 + seed, draft=False)
        d, cu, _, _, bonus, u, uf = args
        gen = torch.Generator().manual_seed(seed)
        argmax = torch.where(torch.rand(d.shape[0], generator=gen) < 0.7, d, torch.randint(0, 80, d.shape))
        V = int(max(argmax.max() + 1 if d.numel() else 1, args[3].shape[1]))
        args[3] = torch.nn.functional.one_hot(argmax, V).float()
        args[4] = bonus % V
        want = torch.full((cu.shape[0], k + 1), -1, dtype=torch.int32)
        start = 0
        for b in range(cu.shape[0]):
            end = int(cu[b])
            j = 0
            while start + j < end and int(d[start + j]) == int(argmax[start + j]):
                want[b, j] = int(d[start + j])
                j += 1
            want[b, j] = int(argmax[start + j]) if start + j < end else int(args[4][b])
            start = end
        for backend in ["torch", *_backends()]:
            assert torch.equal(
                run_with_backend(backend, chain_speculative_sampling, *args, max_spec_len=k), want
            )


def test_empty_batches_and_chains():
    p = torch.zeros(0, 7)
    out = chain_speculative_sampling(
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(3, dtype=torch.int64),
        None,
        p,
        torch.tensor([4, 5, 6]),
        torch.zeros(0),
        torch.rand(3),
        max_spec_len=2,
    )
    assert out.tolist() == [[4, -1, -1], [5, -1, -1], [6, -1, -1]]
    empty = chain_speculative_sampling(
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
        None,
        p,
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0),
        torch.zeros(0),
        max_spec_len=3,
    )
    assert empty.shape == (0, 4)


BAD_INPUTS = [
    (lambda a: a.__setitem__(1, torch.tensor([3, 2, 6])), "non-decreasing"),
    (lambda a: a.__setitem__(1, torch.tensor([2, 4, 5])), "ends at"),
    (lambda a: a.__setitem__(1, torch.tensor([3, 4, 6])), "at most max_spec_len"),  # 3 drafts, max 2
    (lambda a: a[0].__setitem__(1, 9), "outside \\[0, vocab_size\\)"),
    (lambda a: a[4].__setitem__(0, -1), "outside \\[0, vocab_size\\)"),
    (lambda a: a[5].__setitem__(2, 1.5), "uniform"),
    (lambda a: a[6].__setitem__(1, -0.5), "uniform"),
    (lambda a: a[3].__setitem__((0, int(a[0][0])), float("nan")), "probability"),
    (lambda a: a[2].__setitem__((1, int(a[0][1])), 0.0), "zero draft probability"),
    (lambda a: a.__setitem__(3, a[3] * 20), "probability of a draft token"),
    (lambda a: a.__setitem__(3, a[3] * 0.5), "sum to 1"),  # the rejected position's row is scanned
    (lambda a: a.__setitem__(3, a[3].double()), "target_probs must have dtype"),
    (lambda a: a.__setitem__(5, a[5][:2]), "uniform_samples must have shape"),
]


@pytest.mark.parametrize("mutate,match", BAD_INPUTS)
def test_bad_input_raises(mutate, match):
    gen = torch.Generator().manual_seed(0)
    V = 9
    q = torch.softmax(torch.randn(6, V, generator=gen), -1)
    p = torch.softmax(torch.randn(6, V, generator=gen), -1)
    args = [torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([2, 4, 6]), q, p, torch.tensor([0, 1, 2])]
    args += [torch.full((6,), 0.999), torch.rand(3, generator=gen)]
    mutate(args)
    for backend in ["torch", *_backends()]:
        with pytest.raises((ValueError, TypeError), match=match):
            run_with_backend(backend, chain_speculative_sampling, *args, max_spec_len=2)


def test_more_drafts_than_max_spec_len_raises():
    p = torch.full((4, 3), 1 / 3)
    args = [torch.tensor([0, 1, 2, 0]), torch.tensor([2, 4]), None, p, torch.tensor([0, 1])]
    with pytest.raises(ValueError, match="at most max_spec_len"):
        chain_speculative_sampling(*args, torch.rand(4), torch.rand(2), max_spec_len=1)


def test_opcheck():
    for draft in (False, True):
        args, k = make_case(7, draft=draft)
        args[4] = args[4].reshape(-1)
        torch.library.opcheck(torch.ops.eagle.chain_speculative_sampling.default, (*args, k))


# --------------------------------------------------------------------------------------------------
# Statistical losslessness (same target "model" and chi-square test as the tree op)
# --------------------------------------------------------------------------------------------------
K_DRAFTS = 2


def chain_round(model: PrefixModel, context: torch.Tensor, sampled: bool, sampler, gen) -> torch.Tensor:
    """One round of K_DRAFTS drafts per request from contexts [N] (empty prefix) or [N, 1]: returns
    the emitted tokens [N, K_DRAFTS + 1] (-1 padded)."""
    N = context.shape[0]
    length0 = 0 if context.dim() == 1 else 1
    code = context[:, 0] if length0 else torch.zeros(N, dtype=torch.int64)
    drafts, p_rows, q_rows = [], [], []
    for j in range(K_DRAFTS):
        q = model.draft[length0 + j][code]
        tok = (
            torch.multinomial(q, 1, generator=gen)[:, 0]
            if sampled
            else model.draft_order[length0 + j][code, 0]
        )
        drafts.append(tok)
        p_rows.append(model.target[length0 + j][code])
        q_rows.append(q)
        code = code * V_STAT + tok
    bonus = torch.multinomial(model.target[length0 + K_DRAFTS][code], 1, generator=gen)[:, 0]
    flat = lambda rows: torch.stack(rows, 1).reshape(N * K_DRAFTS, -1)
    d = torch.stack(drafts, 1).reshape(-1)
    cu = torch.arange(1, N + 1) * K_DRAFTS
    u = torch.rand(N * K_DRAFTS, generator=gen)
    uf = torch.rand(N, generator=gen)
    args = (d, cu, flat(q_rows) if sampled else None, flat(p_rows), bonus, u, uf)
    return sampler(args)


def first_two(model, sampler, sampled, N, seed):
    gen = torch.Generator().manual_seed(seed)
    out = chain_round(model, torch.zeros(N, dtype=torch.int64), sampled, sampler, gen)[:, :2].long().clone()
    need = out[:, 1] < 0
    out[need, 1] = chain_round(model, out[need, :1], sampled, sampler, gen)[:, 0].long()
    return out


def backend_sampler(backend):
    return lambda args: run_with_backend(backend, chain_speculative_sampling, *args, max_spec_len=K_DRAFTS)


def recovers_from_target(sampler):
    """A wrong sampler: the recovered token is drawn from the target row itself (rejected mass kept)."""

    def run(args):
        out = sampler(args)
        _, cu, _, p, bonus, _, uf = args
        n_emitted = (out >= 0).sum(-1)
        rejected = n_emitted <= K_DRAFTS  # the last emitted token is a recovered one
        pos = (n_emitted - 1).clamp(0, K_DRAFTS - 1)
        rows = p[cu - K_DRAFTS + pos].double()
        redraw = (rows.cumsum(-1) <= uf.double()[:, None]).sum(-1).clamp(max=V_STAT - 1)
        out = out.clone()
        out[rejected, pos[rejected]] = redraw[rejected].to(torch.int32)
        return out

    return run


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("sampled", [False, True], ids=["one_hot_drafts", "sampled_drafts"])
def test_emitted_tokens_follow_target_distribution(backend, sampled):
    if backend not in ["torch", *backends_for(OP, CPU)]:
        pytest.skip(f"backend {backend} unavailable")
    model = PrefixModel(seed=3)
    tokens = first_two(model, backend_sampler(backend), sampled, 20000, seed=4)
    pvalue = chi_square_pvalue(tokens, model.joint_first_two())
    assert pvalue > 1e-3, f"emitted tokens do not follow the target (chi-square p = {pvalue:.2e})"


@pytest.mark.parametrize("sampled", [False, True], ids=["one_hot_drafts", "sampled_drafts"])
def test_statistical_test_detects_a_wrong_sampler(sampled):
    model = PrefixModel(seed=3)
    tokens = first_two(model, recovers_from_target(backend_sampler("torch")), sampled, 20000, seed=4)
    pvalue = chi_square_pvalue(tokens, model.joint_first_two())
    assert pvalue < 1e-6, f"the chi-square test failed to detect a biased sampler (p = {pvalue:.2e})"


# --------------------------------------------------------------------------------------------------
# Host fast path: cached argument checks, direct eager calls (issue 4)
# --------------------------------------------------------------------------------------------------
def test_bad_input_raises_after_the_same_signature_passed(monkeypatch):
    args, k = make_case(3, draft=True)
    want = chain_speculative_sampling(*args, max_spec_len=k)
    assert torch.equal(chain_speculative_sampling(*args, max_spec_len=k), want)  # cached checks
    registered, _ = torch.ops.eagle.chain_speculative_sampling(*args, k)
    assert torch.equal(registered, want)
    T, V = args[3].shape
    strided = torch.empty(T, 2 * V)[:, ::2]
    strided.copy_(args[3])  # same shape and values, vocabulary not contiguous
    for _ in range(2):
        with pytest.raises(ValueError, match="contiguous vocabulary dimension"):
            chain_speculative_sampling(*args[:3], strided, *args[4:], max_spec_len=k)
        with pytest.raises(ValueError, match="max_spec_len must be a non-negative int"):
            chain_speculative_sampling(*args, max_spec_len=-1)
    chain = importlib.import_module("eagle_kernels.chain_speculative_sampling")
    calls = []
    real = chain._chain_sampling_torch
    monkeypatch.setattr(chain, "_chain_sampling_torch", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("EAGLE_KERNELS_BACKEND", "torch")
    assert torch.equal(chain_speculative_sampling(*args, max_spec_len=k), want)
    assert calls == [1]


def test_a_draft_of_target_probability_zero_is_rejected_at_u_zero(device):
    """Acceptance is u * q < p: at u = 0 exactly (a float32 uniform is, once in 2**24 draws) a draft
    the target gives probability 0 is still rejected, and the recovered token comes from
    max(p - q, 0), never the draft."""
    args = [
        torch.tensor([0]),  # one request, one draft: token 0
        torch.tensor([1]),
        torch.tensor([[1.0, 0.0, 0.0]]),  # the draft's q
        torch.tensor([[0.0, 1.0, 0.0]]),  # the target's p
        torch.tensor([2]),
        torch.tensor([0.0]),
        torch.tensor([0.5]),
    ]
    args = [a.to(device) for a in args]
    for backend in ["torch", *_backends(device)]:
        out = run_with_backend(backend, chain_speculative_sampling, *args, max_spec_len=1)
        assert out.tolist() == [[1, -1]], backend


def test_float64_uniforms_give_their_float32_roundings_result(device):
    """Newer vLLM draws its coins in float64: they are taken, rounded to float32 (the kernels' precision),
    with the same tokens as the float32 coins on every backend; a coin that rounds up to 1.0 stays
    below 1, and a coin of 1.0 or more is still refused."""
    for seed in range(4):
        args, max_k = make_case(seed, draft=bool(seed % 2))
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        u64 = torch.rand(args[5].shape, dtype=torch.float64, device=device)
        if u64.numel():
            u64[0] = 1 - 2**-30  # rounds to 1.0 in float32
        uf64 = torch.rand(args[6].shape, dtype=torch.float64, device=device)
        want_u = u64.float().clamp(max=1 - 2**-24)
        for backend in _backends(device):
            want = run_with_backend(
                backend, chain_speculative_sampling, *args[:5], want_u, uf64.float(), max_spec_len=max_k
            )
            got = run_with_backend(
                backend, chain_speculative_sampling, *args[:5], u64, uf64, max_spec_len=max_k
            )
            assert torch.equal(got, want), (seed, backend)
    args, max_k = make_case(5, draft=False)
    u64 = args[5].double()
    u64[0] = 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        chain_speculative_sampling(*args[:5], u64, args[6].double(), max_spec_len=max_k)


def test_fake_tensors_get_shapes_and_a_clear_error_without_max_spec_len():
    """Under FakeTensorMode (torch.export's tracing, an engine's meta run) the CPU status check has no
    values to read: it is skipped, and the output has its shape. Without max_spec_len the width is
    data-dependent: a ValueError says to pass it (session 34 left both failing with
    DataDependentOutputException)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for draft in (False, True):
        args, k = make_case(11, draft=draft)
        B = args[1].shape[0]
        with FakeTensorMode() as mode:
            fake = [None if a is None else mode.from_tensor(a) for a in args]
            out = chain_speculative_sampling(*fake, max_spec_len=k)
            assert out.shape == (B, k + 1) and out.dtype == torch.int32
            with pytest.raises(ValueError, match="pass max_spec_len= when tracing with fake tensors"):
                chain_speculative_sampling(*fake)
