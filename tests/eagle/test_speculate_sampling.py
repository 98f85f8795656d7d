"""Lossless sampling: EAGLE's emitted tokens follow the warped target distribution exactly.

The joint distribution of the first three new tokens is enumerated exactly from the target (float64,
Hugging Face's own warpers) and compared with thousands of EAGLE samples by a chi-square test with
fixed seeds. All samples of one call share a prompt, so a sampler that reused random numbers across
rows would produce identical rows and fail.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import eagle
from eagle.tree import TreeConfig
from tests.eagle.conftest import build_hf_target, eagle2_state, head_config, save_hf_target, write_head

V = 6
PROMPT = [1, 4, 2]
NUM_TOKENS = 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling_pair")
    hf = build_hf_target("llama", seed=3, vocab_size=V, max_position_embeddings=128)
    # Flatter logits than the random init so every warper has work to do.
    with torch.no_grad():
        hf.lm_head.weight.mul_(0.35)
    target_dir = save_hf_target(hf, root / "target")
    cfg = json.loads((target_dir / "config.json").read_text()) | {"head_dim": hf.config.head_dim}
    state = eagle2_state(cfg, bias=True, embed=hf.model.embed_tokens.weight.detach(), seed=11)
    head_dir = write_head(root / "head", head_config(cfg), state, fmt="safetensors", dtype=torch.float32)
    return hf, eagle.load(str(target_dir), str(head_dir), dtype=torch.float64), (target_dir, head_dir)


@pytest.fixture(scope="module")
def mixed_pair(pair):
    """The same target (float64) with its head in float32 (``draft_dtype``)."""
    hf, _, (target_dir, head_dir) = pair
    return hf, eagle.load(str(target_dir), str(head_dir), dtype=torch.float64, draft_dtype=torch.float32)


def warpers(temperature, top_k, top_p, min_p) -> LogitsProcessorList:
    procs = [TemperatureLogitsWarper(temperature)]
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(TopPLogitsWarper(top_p))
    if min_p > 0:
        procs.append(MinPLogitsWarper(min_p))
    return LogitsProcessorList(procs)


def exact_joint(hf, params, prompt: list[int] = PROMPT) -> np.ndarray:
    """P(t1, t2, t3) under the warped target after ``prompt``, by enumerating every continuation."""
    proc = warpers(*params)
    joint = np.ones([V] * NUM_TOKENS)
    for depth in range(NUM_TOKENS):
        for prefix in itertools.product(range(V), repeat=depth):
            ids = torch.tensor([prompt + list(prefix)])
            with torch.no_grad():
                logits = hf(ids).logits[:, -1].double()
            probs = torch.softmax(proc(ids, logits), -1)[0].numpy()
            joint[prefix] *= probs.reshape([V] + [1] * (NUM_TOKENS - depth - 1))
    return joint


def chi_square_pvalue(counts: np.ndarray, expected_p: np.ndarray) -> float:
    n = counts.sum()
    exp = expected_p.ravel() * n
    obs = counts.ravel().astype(float)
    assert obs[exp == 0].sum() == 0, "a token sequence with probability 0 was emitted"
    small = exp < 5
    exp_m = np.append(exp[~small & (exp > 0)], exp[small].sum())
    obs_m = np.append(obs[~small & (exp > 0)], obs[small].sum())
    if exp_m[-1] == 0:
        exp_m, obs_m = exp_m[:-1], obs_m[:-1]
    return stats.chisquare(obs_m, exp_m * obs_m.sum() / exp_m.sum()).pvalue


def sample_counts(model, params, tree, batch: int, calls: int, speculative: bool = True) -> np.ndarray:
    temperature, top_k, top_p, min_p = params
    counts = np.zeros([V] * NUM_TOKENS, dtype=np.int64)
    for call in range(calls):
        res = model.generate(
            [PROMPT] * batch,
            NUM_TOKENS,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            tree=tree,
            seed=1000 + call,
            speculative=speculative,
        )
        for toks in res.tokens:
            assert len(toks) == NUM_TOKENS
            counts[tuple(toks)] += 1
    return counts


CASES = [
    # (temperature, top_k, top_p, min_p), tree, batch, calls
    pytest.param((1.0, 0, 1.0, 0.0), TreeConfig(depth=3, topk=3, total_tokens=8), 400, 10, id="T1-dynamic"),
    pytest.param((0.7, 3, 1.0, 0.0), "chain", 400, 10, id="T0.7-topk3-chain"),
    pytest.param((1.3, 0, 0.8, 0.0), "static", 400, 10, id="T1.3-topp0.8-static"),
    pytest.param(
        (1.0, 0, 1.0, 0.15), TreeConfig(depth=2, topk=2, total_tokens=5), 250, 16, id="minp0.15-dynamic"
    ),
]


@pytest.mark.parametrize("params,tree,batch,calls", CASES)
def test_joint_distribution_matches_target(pair, params, tree, batch, calls):
    hf, model, _ = pair
    expected = exact_joint(hf, params)
    counts = sample_counts(model, params, tree, batch, calls)
    p = chi_square_pvalue(counts, expected)
    assert p > 1e-3, f"chi-square p={p:.2e}: EAGLE samples do not follow the target distribution"


PROMPTS = [PROMPT, [3, 0, 5, 5, 1], [2]]  # ragged: padded prefill, rows at other lengths


@pytest.mark.parametrize(
    "script", ["s", "ps", "sp", "p"], ids=["rounds", "plain-then-round", "round-then-plain", "plain-chunks"]
)
def test_rows_with_their_own_prompts_and_modes_follow_their_own_distributions(pair, script):
    """A batch mixing three prompts of different lengths (the other tests repeat one prompt), and
    speculative="auto"'s mix of plain steps and rounds (scripted; "p": the two tokens after the prefill
    from one chunk of plain steps): each row's first three tokens follow the warped target after its
    own prompt."""
    from eagle.speculate import SamplingParams
    from tests.eagle.test_adaptive import Scripted

    hf, model, _ = pair
    params = (0.9, 0, 0.95, 0.0)
    rows = PROMPTS * 100
    decoder = model._decoder(TreeConfig(depth=3, topk=2, total_tokens=6), len(rows))
    counts = [np.zeros([V] * NUM_TOKENS, dtype=np.int64) for _ in PROMPTS]
    for call in range(30):
        tokens = [[] for _ in rows]
        for e in decoder.run(
            rows, NUM_TOKENS, SamplingParams(0.9, 0, 0.95, 0.0), seed=7000 + call, auto=Scripted(script),
            plain_chunk=NUM_TOKENS,
        ):  # fmt: skip
            for row, new in zip(e.rows, e.tokens):
                tokens[row].extend(new)
        for i, toks in enumerate(tokens):
            counts[i % len(PROMPTS)][tuple(toks)] += 1
    for prompt, observed in zip(PROMPTS, counts):
        p = chi_square_pvalue(observed, exact_joint(hf, params, prompt))
        assert p > 1e-3, f"prompt {prompt}: chi-square p={p:.2e}, not the target's distribution"


@pytest.mark.parametrize(
    "params", [(0.7, 3, 0.8, 0.0), (1.0, 0, 1.0, 0.15)], ids=["topk3-topp0.8", "minp0.15"]
)
def test_plain_sampling_through_the_api_applies_every_filter(pair, params):
    """generate(speculative=False) hands its filters to plain decoding: a top_k dropped on the way
    sampled the unfiltered distribution and no test saw it (they compared plain decoding with itself)."""
    hf, model, _ = pair
    counts = sample_counts(model, params, "dynamic", 400, 10, speculative=False)
    p = chi_square_pvalue(counts, exact_joint(hf, params))
    assert p > 1e-3, f"chi-square p={p:.2e}: plain samples do not follow the filtered target distribution"
    greedy = model.generate([PROMPT], 8, speculative=False).tokens[0]
    streamed = model.stream(PROMPT, 8, speculative=False, temperature=1.0, top_k=1, seed=3)
    assert sum(streamed, []) == greedy  # top_k=1 sampling is greedy, on the streaming path too


def test_a_head_in_another_dtype_keeps_sampling_lossless(mixed_pair):
    """The float32 head drafts, the float64 target accepts or resamples: still the target's law."""
    hf, model = mixed_pair
    assert model.head.dtype == torch.float32 and model.target.dtype == torch.float64
    params, tree = (1.0, 0, 1.0, 0.0), TreeConfig(depth=3, topk=3, total_tokens=8)
    p = chi_square_pvalue(sample_counts(model, params, tree, 400, 10), exact_joint(hf, params))
    assert p > 1e-3, f"chi-square p={p:.2e}: EAGLE samples do not follow the target distribution"


def test_chi_square_detects_a_wrong_distribution(pair):
    """Negative control: the same machinery rejects samples of the untempered target when the
    expected distribution is the tempered one."""
    hf, model, _ = pair
    expected = exact_joint(hf, (0.6, 0, 1.0, 0.0))
    counts = sample_counts(model, (1.0, 0, 1.0, 0.0), TreeConfig(depth=3, topk=3, total_tokens=8), 400, 10)
    assert chi_square_pvalue(counts, expected) < 1e-6


def test_seeded_sampling_is_reproducible_and_rows_differ(pair):
    _, model, _ = pair
    a = model.generate([PROMPT] * 8, 6, temperature=1.0, seed=5).tokens
    b = model.generate([PROMPT] * 8, 6, temperature=1.0, seed=5).tokens
    assert a == b
    assert len({tuple(t) for t in a}) > 1, "rows of one batch drew the same random numbers"


def test_greedy_calls_and_loading_leave_torchs_global_generator_alone(pair):
    """Greedy speculative decoding drew an unused seed from torch's global generator (plain greedy did
    not), and loading a head consumed it for a random init that its weights then overwrote: a user's
    next torch.rand changed."""
    _, model, (target_dir, head_dir) = pair
    before = torch.get_rng_state()
    model.generate([PROMPT], 5, tree="chain")
    model.generate([PROMPT], 5, speculative="auto")
    list(model.stream(PROMPT, 5, tree="chain"))
    eagle.load(str(target_dir), str(head_dir), dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), before)


def test_an_unseeded_stream_draws_its_seed_when_called(pair):
    """As generate: torch.manual_seed before stream() fixes the sample, whatever runs before next()."""
    _, model, _ = pair
    for speculative in (True, False):
        runs = []
        for touch in (False, True):
            torch.manual_seed(7)
            stream = model.stream(PROMPT, 8, temperature=1.0, tree="chain", speculative=speculative)
            if touch:
                torch.rand(3)
            runs.append(sum(stream, []))
        assert runs[0] == runs[1], speculative


def test_sampling_arguments_take_numpy_and_0d_tensor_scalars_and_refuse_the_rest(pair):
    """A numpy or 0-d tensor scalar is the number it holds (it once reached the dynamic tree's
    acceptance check, or a kernel's tensor check, with a message about something else); other types,
    and seeds that would be truncated or wrapped into another stream, are refused by name."""
    _, model, _ = pair
    want = model.generate([PROMPT], 6, temperature=0.7, top_k=5, seed=2).tokens
    assert (
        model.generate([PROMPT], 6, temperature=np.float32(0.7), top_k=np.int64(5), seed=np.int64(2)).tokens
        == want
    )
    assert (
        model.generate(
            [PROMPT], 6, temperature=torch.tensor(0.7, dtype=torch.float64), top_k=5, seed=2
        ).tokens
        == want
    )
    # a top_k past int64 (or past any vocabulary) keeps every token, as in transformers; it overflowed
    for speculative in (True, False):  # (the two draw their numbers differently: compared per mode)
        everything = model.generate([PROMPT], 6, temperature=0.7, seed=2, speculative=speculative).tokens
        for huge in (2**63, 10**30):
            got = model.generate([PROMPT], 6, temperature=0.7, top_k=huge, seed=2, speculative=speculative)
            assert got.tokens == everything
        off = model.generate([PROMPT], 6, temperature=0.7, top_k=-1, seed=2, speculative=speculative)
        assert off.tokens == everything  # vLLM's and SGLang's "off"
    refused = [
        (dict(temperature="0.7"), TypeError, "temperature must be a real number"),
        (dict(temperature=torch.tensor([0.7, 0.0])), TypeError, "temperature must be a real number"),
        (dict(temperature=0.7, top_k=2.5), TypeError, "top_k must be an integer"),
        (dict(temperature=0.7, top_k=-2), ValueError, "top_k must be >= 0, or -1"),
        (dict(temperature=0.7, top_p=None), TypeError, "top_p must be a real number"),
        (dict(temperature=0.7, seed=1.9), TypeError, "seed must be an integer"),
        (dict(temperature=0.7, seed=True), TypeError, "seed must be an integer"),
        (dict(temperature=0.7, seed=-1), ValueError, r"seed must be in \[0, 2\*\*63 - 1\]"),
        (dict(temperature=0.7, seed=2**63), ValueError, r"seed must be in \[0, 2\*\*63 - 1\]"),
        # values the float32 warpers cannot take are refused at the call, by name
        (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
        (dict(temperature=1e39), ValueError, "temperature=1e\\+39 overflows float32"),
        (
            dict(temperature=1e-300),
            ValueError,
            "temperature=1e-300 rounds to 0 in float32.*pass 0 for greedy",
        ),
        (dict(temperature=0.7, top_p=1e-50), ValueError, "top_p=1e-50 rounds to 0 in float32"),
    ]
    for kwargs, error, message in refused:
        for speculative in (True, False):
            with pytest.raises(error, match=message):
                model.generate([PROMPT], 4, speculative=speculative, **kwargs)
        with pytest.raises(error, match=message):  # at the call, before the first next()
            model.stream(PROMPT, 4, **kwargs)
    for speculative in (True, False):  # plain decoding does not use the tree, but a typo is still one
        with pytest.raises(ValueError, match="tree must be 'dynamic', 'static', 'chain'"):
            model.generate([PROMPT], 4, tree="dynamc", speculative=speculative)
        with pytest.raises(TypeError, match="cuda_graph must be True or False"):
            model.generate([PROMPT], 4, cuda_graph="yes", speculative=speculative)
    with pytest.raises(ValueError, match="tree must be"):
        model.stream(PROMPT, 4, tree="dynamc", speculative=False)
    with pytest.raises(TypeError, match="prompt 0 is bytes"):
        model.generate([b"\x01\x02"], 4)
