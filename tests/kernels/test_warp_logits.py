from __future__ import annotations

import functools

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import eagle_kernels
from eagle_kernels import warp_logits, warp_logits_ref
from tests.kernels.helpers import backends_for, run_with_backend

OP = "warp_logits"
ALL_BACKENDS = ["torch"] + backends_for(OP, torch.device("cpu"))
RTOL, ATOL = 1e-5, 1e-7


# --------------------------------------------------------------------------------------------------
# Oracle: Hugging Face's own warper classes, one row at a time (as `generate` builds them)
# --------------------------------------------------------------------------------------------------
def hf_warp(logits: torch.Tensor, temperature, top_k, top_p, min_p, *, stable_sort: bool = False):
    """Rows of ``logits [R, V]`` through HF's warpers with that row's parameters, then softmax.
    ``generate`` adds a warper only when it does something (top_k != 0, top_p < 1, min_p set);
    temperature 0 is greedy. ``stable_sort`` runs HF's top-p with a stable torch.sort."""
    rows = []
    for r in range(logits.shape[0]):
        scores = logits[r : r + 1].float()
        t, k, p, m = float(temperature[r]), int(top_k[r]), float(top_p[r]), float(min_p[r])
        if t == 0:
            rows.append(torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).float())
            continue
        warpers = [TemperatureLogitsWarper(t)]
        if k != 0:
            warpers.append(TopKLogitsWarper(k))
        if p < 1:
            warpers.append(TopPLogitsWarper(p))
        if m > 0:
            warpers.append(MinPLogitsWarper(m))
        original_sort = torch.sort
        if stable_sort:
            torch.sort = functools.partial(original_sort, stable=True)
        try:
            for warper in warpers:
                scores = warper(None, scores)
        finally:
            torch.sort = original_sort
        rows.append(scores.softmax(-1))
    return torch.cat(rows)


def assert_probs_equal(got: torch.Tensor, want: torch.Tensor, msg: str = ""):
    """Same kept set (exactly), probabilities within float32 tolerance, rows summing to 1."""
    assert got.dtype == torch.float32 and got.shape == want.shape, msg
    kept_got, kept_want = got > 0, want > 0
    if not torch.equal(kept_got, kept_want):
        rows = (kept_got != kept_want).any(-1).nonzero().flatten().tolist()
        raise AssertionError(f"kept sets differ in rows {rows} {msg}")
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{m} {msg}")
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Random parameters kept clear of rounding-sized ambiguity at the top-p and min-p cuts
# --------------------------------------------------------------------------------------------------
MARGIN = 1e-4


def _clear_of_cuts(scores: torch.Tensor, top_p: float, min_p: float) -> tuple[float, float]:
    """Move top_p / min_p (for one row of already temperature- and top-k-filtered scores) away from
    values where a token's decision would hinge on float rounding. Exact in float64."""
    probs = scores.double().softmax(-1)
    mass_above = probs.sum() - probs.sort().values.cumsum(0)  # descending-rank mass above each token
    while top_p < 1 and bool(((mass_above - top_p).abs() < MARGIN).any()):
        top_p = min(1.0, top_p + 3 * MARGIN)
    descending = probs.sort(descending=True).values
    kept = descending[mass_above.flip(0) < top_p] if top_p < 1 else descending
    ratios = kept[kept < kept[0]] / kept[0]  # tokens tied with the max have ratio 1 exactly
    step = 3 * MARGIN if min_p + 3 * MARGIN <= 1 else -3 * MARGIN
    while min_p > 0 and bool(((ratios - min_p).abs() < MARGIN).any()):
        min_p += step
    return top_p, min_p


def random_params(logits: torch.Tensor, gen: torch.Generator):
    """Per-row parameters covering disabled filters, extreme and typical values."""
    R, V = logits.shape
    choice = lambda options: options[int(torch.randint(0, len(options), (1,), generator=gen))]  # noqa: E731
    temperature, top_k, top_p, min_p = [], [], [], []
    for r in range(R):
        t = choice([0.0, 0.3, 0.7, 1.0, 1.0, 1.7])
        k = choice([0, 0, 1, 2, 5, 40, V, V + 3])
        p = choice([1.0, 1.0, 0.05, 0.5, 0.8, 0.95, 0.999])
        m = choice([0.0, 0.0, 0.02, 0.1, 0.5, 1.0])
        if t > 0:
            scores = logits[r].float() / torch.tensor(t, dtype=torch.float32)
            if 0 < k < V:
                scores = scores.masked_fill(scores < scores.topk(k).values[-1], float("-inf"))
            p, m = _clear_of_cuts(scores[torch.isfinite(scores)], p, m)
        temperature.append(t)
        top_k.append(k)
        top_p.append(p)
        min_p.append(m)
    return (
        torch.tensor(temperature, dtype=torch.float32),
        torch.tensor(top_k, dtype=torch.int64),
        torch.tensor(top_p, dtype=torch.float32),
        torch.tensor(min_p, dtype=torch.float32),
    )


def random_logits(R: int, V: int, gen: torch.Generator) -> torch.Tensor:
    scale = float(torch.empty(1).uniform_(0.5, 8.0, generator=gen))
    return torch.randn(R, V, generator=gen) * scale


# --------------------------------------------------------------------------------------------------
# Reference vs Hugging Face
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [1, 2, 7, 100, 1000, 5000])
def test_reference_matches_hf_fuzzed(V):
    gen = torch.Generator().manual_seed(V)
    for trial in range(4):
        logits = random_logits(12, V, gen)
        params = random_params(logits, gen)
        want = hf_warp(logits, *params)
        assert_probs_equal(warp_logits_ref(logits, *params), want, f"V={V} trial={trial}")


def test_reference_matches_hf_on_ties():
    """Cuts inside groups of equal scores, with HF run on a stable sort (its own sort is unstable,
    so which tied ids survive is otherwise arbitrary; the count and the probabilities are not)."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        V = int(torch.randint(2, 40, (1,), generator=gen))
        logits = torch.randint(-3, 3, (6, V), generator=gen).float() * 0.5  # many ties
        params = random_params(logits, gen)
        got = warp_logits_ref(logits, *params)
        assert_probs_equal(got, hf_warp(logits, *params, stable_sort=True), f"trial={trial}")
        unstable = hf_warp(logits, *params)
        assert torch.equal((got > 0).sum(-1), (unstable > 0).sum(-1))
        torch.testing.assert_close(got.sort(-1).values, unstable.sort(-1).values, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------------
# Backends vs reference
# --------------------------------------------------------------------------------------------------
def _cases():
    """(logits, params) batches: random rows, tie-heavy rows, per-row parameters everywhere."""
    gen = torch.Generator().manual_seed(1234)
    for V in (1, 3, 64, 300, 1000):
        logits = random_logits(8, V, gen)
        yield f"random-V{V}", logits, random_params(logits, gen)
    for V in (5, 40, 130):
        logits = torch.randint(-4, 4, (8, V), generator=gen).float() * 0.75
        yield f"ties-V{V}", logits, random_params(logits, gen)


def test_backends_match_reference(device):
    """Every backend of the test device (the Triton kernel on a GPU) against the reference on CPU."""
    backends = backends_for(OP, device)
    assert backends, "no accelerated backend reachable; the extension or triton is missing"
    for backend in backends:
        for name, logits, params in _cases():
            want = warp_logits_ref(logits, *params)
            got = run_with_backend(backend, warp_logits, logits.to(device), *(p.to(device) for p in params))
            assert_probs_equal(got.cpu(), want, f"{backend} {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_top_k_minus_one_disables_the_filter_as_zero_does(backend):
    """-1 is vLLM's and SGLang's top_k for "off": per row, beside rows with a real top_k."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    want = run_with_backend(backend, warp_logits, logits, 0.9, torch.tensor([0, 5, 0]), 0.8, 0.0)
    got = run_with_backend(backend, warp_logits, logits, 0.9, torch.tensor([-1, 5, -1]), 0.8, 0.0)
    assert torch.equal(got, want)
    everything = run_with_backend(backend, warp_logits, logits, 1.0, 0)
    assert torch.equal(run_with_backend(backend, warp_logits, logits, 1.0, -1), everything)
    assert bool((everything > 0).all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_int32_top_k_gives_the_int64_result(backend):
    """Per-row top_k may be int32 or int64 (DESIGN §6: both index dtypes)."""
    for name, logits, (temperature, top_k, top_p, min_p) in _cases():
        want = warp_logits_ref(logits, temperature, top_k, top_p, min_p)
        got = run_with_backend(backend, warp_logits, logits, temperature, top_k.int(), top_p, min_p)
        assert_probs_equal(got, want, f"{backend} {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_exact_tie_cuts(backend):
    """Uniform rows of a power-of-two length: probabilities and cumulative sums are exact, so the
    cut falls exactly on a tie boundary and HF's `<= 1 - top_p` rule decides (ids kept from the top)."""
    V = 16
    logits = torch.zeros(5, V)
    top_p = torch.tensor([0.5, 0.25, 0.0625, 1.0, 0.3])
    got = run_with_backend(backend, warp_logits, logits, 1.0, 0, top_p, 0.0)
    want = hf_warp(logits, [1.0] * 5, [0] * 5, top_p, [0.0] * 5, stable_sort=True)
    assert_probs_equal(got, want, backend)
    assert (got > 0).sum(-1).tolist() == [8, 4, 1, 16, 5]
    assert bool((got[0, 8:] > 0).all()) and bool((got[0, :8] == 0).all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_tiny_top_p_keeps_the_most_probable_token(backend):
    """top_p = 1e-9 of a flat 5000-token row: the cumulative sum rounds to below 1 - top_p at its last
    (largest) entry, so the rule would remove every token and the row came out NaN; as in HF the most
    probable token is always kept."""
    torch.manual_seed(0)
    logits = torch.randn(4, 5000) * 0.1
    got = run_with_backend(backend, warp_logits, logits, 1.0, 0, 1e-9, 0.0)
    assert torch.equal(got, torch.nn.functional.one_hot(logits.argmax(-1), 5000).float()), backend


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_top_k_keeps_every_tie_and_min_p_one_keeps_all_maxima(backend):
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0], [5.0, 1.0, 5.0, 4.0, 5.0, 0.0, 5.0]])
    got = run_with_backend(
        backend, warp_logits, logits, 1.0, torch.tensor([3, 0]), 1.0, torch.tensor([0.0, 1.0])
    )
    assert (got[0] > 0).tolist() == [False, True, True, True, True, True, False]
    assert (got[1] > 0).tolist() == [True, False, True, False, True, False, True]
    want = hf_warp(logits, [1.0, 1.0], [3, 0], [1.0, 1.0], [0.0, 1.0])
    assert_probs_equal(got, want, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_greedy_rows_and_signed_zero_ties(backend):
    """temperature 0: one-hot at the first maximum; -0.0 and +0.0 are one tied score."""
    logits = torch.tensor([[0.0, 2.0, 2.0, -1.0], [-0.0, 0.0, -0.0, -5.0], [-0.0, 0.0, -0.0, -5.0]])
    temperature = torch.tensor([0.0, 0.0, 1.0])
    got = run_with_backend(backend, warp_logits, logits, temperature, 0, torch.tensor([1.0, 1.0, 0.5]), 0.0)
    assert got[0].tolist() == [0.0, 1.0, 0.0, 0.0] and got[1].tolist() == [1.0, 0.0, 0.0, 0.0]
    want = hf_warp(logits, temperature, [0, 0, 0], [1.0, 1.0, 0.5], [0.0] * 3, stable_sort=True)
    assert_probs_equal(got, want, backend)
    assert (got[2] > 0).tolist() == [False, True, True, False]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_negative_infinity_masks_a_token_as_in_hf(backend):
    """-inf is how serving stacks mask tokens (grammars, bad words, a vocabulary): HF's warpers take
    it (probability 0) and so must every backend; it was refused as "NaN or inf" on CPU (and on CUDA
    in debug mode). Rows keep at least one finite logit; random parameters, ties and greedy rows; a
    large negative logit that the temperature takes to -inf is masked too (as HF's division does)."""
    gen = torch.Generator().manual_seed(7)
    for V in (1, 5, 64, 300):
        for trial in range(3):
            logits = random_logits(8, V, gen)
            if trial == 1:
                logits = torch.randint(-3, 3, (8, V), generator=gen).float() * 0.5  # ties
            masked = torch.rand(8, V, generator=gen) < (0.9 if trial == 2 else 0.4)
            masked[torch.arange(8), torch.arange(8) % V] = False
            logits = logits.masked_fill(masked, float("-inf"))
            params = random_params(logits, gen)
            got = run_with_backend(backend, warp_logits, logits, *params)
            assert_probs_equal(got, hf_warp(logits, *params, stable_sort=True), f"{backend} V={V} {trial}")
            assert bool((got[masked] == 0).all())
    logits = torch.tensor([[-3e38, 1.0, 0.5, float("-inf")]])
    got = run_with_backend(backend, warp_logits, logits, 0.01, 0, 1.0, 0.0)
    assert_probs_equal(got, hf_warp(logits, [0.01], [0], [1.0], [0.0]), backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_shapes_dtypes_and_scalar_parameters(backend):
    """[..., V] input, low-precision logits (computed in float32), a strided row view, and scalar
    parameters equal to the same values given per row."""
    gen = torch.Generator().manual_seed(7)
    logits = random_logits(6, 50, gen)
    params = (0.8, 10, 0.9, 0.05)
    per_row = tuple(
        torch.full((6,), v, dtype=torch.int64 if isinstance(v, int) else torch.float32) for v in params
    )
    want = warp_logits_ref(logits, *per_row)
    got = run_with_backend(backend, warp_logits, logits.view(2, 3, 50), *params)
    assert got.shape == (2, 3, 50)
    assert_probs_equal(got.view(6, 50), want, backend)
    got = run_with_backend(backend, warp_logits, logits.view(2, 3, 50), *(p.view(2, 3) for p in per_row))
    assert_probs_equal(got.view(6, 50), want, backend)
    wide = torch.zeros(6, 80)
    wide[:, :50] = logits
    assert_probs_equal(run_with_backend(backend, warp_logits, wide[:, :50], *params), want, backend)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        got = run_with_backend(backend, warp_logits, low, *params)
        assert_probs_equal(got, warp_logits_ref(low.float(), *per_row), f"{backend} {dtype}")


def test_large_vocab_cpp_matches_reference():
    """Llama-3-sized vocabulary: the C++ selection paths on realistic sizes."""
    if "cpp" not in ALL_BACKENDS:
        pytest.skip("C++ extension not built")
    gen = torch.Generator().manual_seed(3)
    logits = random_logits(8, 128256, gen)
    params = random_params(logits, gen)
    params[0][:] = torch.tensor([0.7, 1.0, 1.3, 0.5, 1.0, 0.9, 2.0, 1.0])
    assert_probs_equal(
        run_with_backend("cpp", warp_logits, logits, *params), warp_logits_ref(logits, *params)
    )


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"logits_value": float("nan")}, r"NaN or \+inf"),
        ({"logits_value": float("inf")}, r"NaN or \+inf"),
        ({"row_value": float("-inf")}, "no finite value"),
        ({"row_value": float("-inf"), "temperature": 0.0}, "no finite value"),
        # every logit finite but below -FLT_MAX * T (a row masked with finfo.min): NaN or zeros, silently
        ({"row_value": -3e38, "temperature": 0.5}, "underflows to -inf for every token"),
        ({"temperature": -0.5}, "temperature must be finite and >= 0"),
        ({"temperature": float("nan")}, "temperature must be finite and >= 0"),
        ({"top_k": -2}, "top_k must be >= 0, or -1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
        ({"min_p": 1.01}, r"min_p must be in \[0, 1\]"),
        ({"logits_value": 3e38, "temperature": 0.01}, "overflows float32"),
    ],
)
def test_bad_values_raise(kwargs, match):
    logits = torch.randn(3, 10)
    if "logits_value" in kwargs:
        logits[1, 4] = kwargs["logits_value"]
    if "row_value" in kwargs:
        logits[1] = kwargs["row_value"]
    per_row = {
        "temperature": torch.ones(3),
        "top_k": torch.zeros(3, dtype=torch.int64),
        "top_p": torch.ones(3),
        "min_p": torch.zeros(3),
    }
    for name, value in kwargs.items():
        if name in per_row:
            per_row[name][1] = value  # only the middle row is bad
    for backend in ALL_BACKENDS:
        with pytest.raises(ValueError, match=match):
            run_with_backend(backend, warp_logits, logits, **per_row)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.randn(2, 5).double(),), TypeError, "logits must have dtype"),
        ((torch.randn(2, 0),), ValueError, "V >= 1"),
        ((torch.randn(2, 5), torch.ones(3)), ValueError, "temperature must be a scalar or have shape"),
        ((torch.randn(2, 5), 1.0, torch.ones(2)), TypeError, "top_k must have dtype"),
        ((torch.randn(2, 5), 1.0, 2.5), TypeError, "top_k must be an int"),
        ((torch.randn(2, 5), 1.0, 0, torch.ones(2, dtype=torch.int64)), TypeError, "top_p must have dtype"),
        ((torch.randn(2, 5), True), TypeError, "temperature must be a number or a tensor"),
    ],
)
def test_bad_arguments_raise(args, exc, match):
    with pytest.raises(exc, match=match):
        warp_logits(*args)


# --------------------------------------------------------------------------------------------------
# Registration and compile
# --------------------------------------------------------------------------------------------------
def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    logits = random_logits(4, 33, gen)
    params = random_params(logits, gen)
    torch.library.opcheck(torch.ops.eagle.warp_logits.default, (logits, *params))


def test_torch_compile():
    gen = torch.Generator().manual_seed(6)
    logits = random_logits(4, 64, gen)
    params = random_params(logits, gen)

    def sample_probs(logits, *params):
        return warp_logits(logits * 1.0, *params).log1p()

    want = sample_probs(logits, *params)
    got = torch.compile(sample_probs, fullgraph=True)(logits, *params)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.extension
def test_default_cpu_backend_is_cpp():
    assert eagle_kernels.select_backend(OP, torch.device("cpu")) == "cpp"


# --------------------------------------------------------------------------------------------------
# Host fast path: reused scalar parameters, direct eager calls (issue 4)
# --------------------------------------------------------------------------------------------------
def test_reused_scalar_parameters_and_fast_path(monkeypatch):
    """Scalar parameters become per-row tensors reused across eager calls: repeated and varied calls
    give what per-row tensors give, -0.0 and 0.0 stay apart, the fast path matches the registered op,
    and a forced backend still applies."""
    import sys

    module = sys.modules["eagle_kernels.warp_logits"]
    gen = torch.Generator().manual_seed(3)
    logits = random_logits(4, 40, gen)
    for params in [(0.8, 10, 0.9, 0.05), (0.8, 10, 0.9, 0.05), (1.3, 0, 0.5, 0.0), (0.0, 3, 1.0, 0.2)]:
        per_row = tuple(
            torch.full((4,), v, dtype=torch.int64 if isinstance(v, int) else torch.float32) for v in params
        )
        want = warp_logits_ref(logits, *per_row)
        assert_probs_equal(warp_logits(logits, *params), want)
        assert torch.equal(warp_logits(logits, *params), torch.ops.eagle.warp_logits(logits, *per_row))
    zero, neg_zero = (
        module._filled(0.0, 4, logits.device, torch.float32),
        module._filled(-0.0, 4, logits.device, torch.float32),
    )
    assert torch.equal(torch.signbit(zero), torch.zeros(4, dtype=torch.bool))
    assert torch.equal(torch.signbit(neg_zero), torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="top_k must be an int"):
        warp_logits(logits, 0.8, 2.0, 0.9, 0.05)
    with pytest.raises(ValueError, match="top_p must be in"):
        warp_logits(logits, 0.8, 10, 1.5, 0.05)
    calls = []
    real = module.warp_logits_ref
    monkeypatch.setattr(module, "warp_logits_ref", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("EAGLE_KERNELS_BACKEND", "torch")
    got = warp_logits(logits, *params)  # the last parameter set of the loop above
    assert calls == [1]
    assert_probs_equal(got, warp_logits_ref(logits, *per_row))


def test_a_cuda_graph_capture_never_gets_a_cached_parameter_tensor(monkeypatch):
    """A captured graph keeps the raw pointers of the parameter tensors it read; the cache is cleared
    when full, so a cached tensor handed to a capture could be freed and its memory reused while a kept
    graph still replays (wrong sampling parameters, no error). A capture gets a fresh tensor, made in
    the graph's private pool. (The CUDA calls are stood in for: there is no GPU here.)"""
    import sys

    module = sys.modules["eagle_kernels.warp_logits"]
    cuda = torch.device("cuda")
    real_full = torch.full
    monkeypatch.setattr(torch, "full", lambda size, value, dtype, device: real_full(size, value, dtype=dtype))
    monkeypatch.setattr(module, "_FILLED", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cached = module._filled(0.7, 3, cuda, torch.float32)
    assert module._filled(0.7, 3, cuda, torch.float32) is cached  # eager calls share it
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    captured = module._filled(0.7, 3, cuda, torch.float32)
    assert captured is not cached and torch.equal(captured, cached)
    assert len(module._FILLED) == 1  # nor is the capture's tensor cached
