"""tree="dynamic" sizes its tree with an acceptance rate refitted from the runs' measured tau, per
sampling setting (eagle.api.EagleModel.accept_rates, eagle.autotree.fit_accept_rate)."""

from __future__ import annotations

import pytest
import torch

import eagle
from eagle import autotree
from eagle.speculate import SamplingParams
from eagle.tree import TreeConfig

PROMPTS = ["def fibonacci(n):\n", "import os\n\nclass Config:\n"]


@pytest.fixture(scope="module")
def model():
    return eagle.load("tiny-code", dtype=torch.float32)


@pytest.fixture
def fixed_timings(monkeypatch):
    """CPU-like timings (verifying grows with the width), so the choice depends on the rate only;
    records the rate of every choice."""
    rates = []
    verify = {w: 1.0 + 0.05 * w for w in autotree.WIDTHS["cpu"]}
    level = {k: 0.1 for k in range(1, 11)}
    monkeypatch.setattr(autotree, "_timings", lambda *a, **k: (verify, level))
    real = autotree.choose_tree

    def spy(*args, accept_rate=autotree.ACCEPT_RATE, **kwargs):
        rates.append(accept_rate)
        return real(*args, accept_rate=accept_rate, **kwargs)

    monkeypatch.setattr(eagle.api, "choose_tree", spy)
    return rates


def fresh(model):
    return eagle.api.EagleModel(model.target, model.head, model.tokenizer)


def test_a_dynamic_run_refits_the_rate_the_next_run_chooses_with(model, fixed_timings):
    m = fresh(model)
    first = m.generate(PROMPTS, 64)
    assert fixed_timings == [autotree.ACCEPT_RATE] and isinstance(first.tree, TreeConfig)
    want = autotree.fit_accept_rate(first.tree.depth, first.tree.total_tokens, first.mean_accept_length)
    assert m.accept_rates == {SamplingParams(): pytest.approx(want)}
    assert abs(want - autotree.ACCEPT_RATE) > eagle.api.ACCEPT_RATE_STEP  # (a trained tiny pair: ~0.6)
    second = m.generate(PROMPTS, 64)
    assert fixed_timings[-1] == pytest.approx(want)
    assert second.tree == autotree.choose_tree(m.target, 2, m.head, accept_rate=want)
    assert second.tokens == m.generate(PROMPTS, 64, speculative=False).tokens  # greedy: unchanged


def test_sampled_settings_keep_their_own_rate(model, fixed_timings):
    m = fresh(model)
    m.generate(PROMPTS, 64, temperature=0.0, top_k=5)  # greedy whatever the filters say
    greedy = m.accept_rates[SamplingParams()]
    m.generate(PROMPTS, 64, temperature=1.0, seed=0)
    rates = m.accept_rates
    assert set(rates) == {SamplingParams(), SamplingParams(temperature=1.0)}
    assert rates[SamplingParams()] == greedy
    assert rates[SamplingParams(temperature=1.0)] < greedy  # sampling accepts less
    m.generate(PROMPTS, 8, temperature=1.0)
    assert fixed_timings[-1] == pytest.approx(rates[SamplingParams(temperature=1.0)])


def test_a_seeded_sampled_call_sizes_its_tree_from_the_prior(model, fixed_timings):
    """The refit would change the tree, and with it the draws, from one call with a seed to the next:
    seeded sampled calls choose from the prior (greedy ones, whose tokens no tree changes, refit)."""
    m = fresh(model)
    first = m.generate(PROMPTS, 32, temperature=1.0, seed=3)
    refit = m.accept_rates[SamplingParams(temperature=1.0)]
    assert abs(refit - autotree.ACCEPT_RATE) > eagle.api.ACCEPT_RATE_STEP  # it would move the tree
    again = m.generate(PROMPTS, 32, temperature=1.0, seed=3)
    assert fixed_timings[-1] == autotree.ACCEPT_RATE and again.tokens == first.tokens
    m.generate(PROMPTS, 32, temperature=1.0)
    assert fixed_timings[-1] == pytest.approx(m.accept_rates[SamplingParams(temperature=1.0)])
    m.generate(PROMPTS, 32, seed=3)
    m.generate(PROMPTS, 32, seed=3)
    assert fixed_timings[-1] == pytest.approx(m.accept_rates[SamplingParams()])


def test_only_long_enough_dynamic_speculative_runs_refit(model, fixed_timings):
    m = fresh(model)
    m.generate(PROMPTS[:1], 6)  # a few forwards: too few to say
    m.generate(PROMPTS, 64, tree="chain")
    m.generate(PROMPTS, 64, tree=TreeConfig(3, 4, 12))
    m.generate(PROMPTS, 64, speculative="auto")  # plain steps would read as rejected drafts
    m.generate(PROMPTS, 64, speculative=False)
    assert m.accept_rates == {}
    list(m.stream(PROMPTS[0], 64))
    assert set(m.accept_rates) == {SamplingParams()}


def test_small_moves_keep_the_tree_and_the_estimate_follows_the_runs(model):
    m = fresh(model)
    tree = TreeConfig(3, 4, 12)
    m._learn_acceptance(SamplingParams(), tree, [[3] * 30])
    base = m.accept_rates[SamplingParams()]
    assert base == pytest.approx(autotree.fit_accept_rate(3, 12, 3.0))
    m._learn_acceptance(SamplingParams(), tree, [[3, 3, 3, 4] * 5])  # tau 3.25: a small move
    a = m._acceptance[SamplingParams()]
    assert a.rate > base and a.used == base
    for _ in range(20):  # a lasting change moves it
        m._learn_acceptance(SamplingParams(), tree, [[1, 2] * 20])
    assert m.accept_rates[SamplingParams()] < base - eagle.api.ACCEPT_RATE_STEP


def test_a_stream_refits_from_its_own_rounds_when_another_run_started_meanwhile(
    model, fixed_timings, monkeypatch
):
    """A stream read to its end refits from its own accept lengths, not from those of a run started on
    the same decoder while it was open (the decoder's accept_lengths() is its latest run's)."""
    m = fresh(model)
    fits = []
    monkeypatch.setattr(m, "_learn_acceptance", lambda sampling, tree, accept: fits.append(accept))
    stream = m.stream(PROMPTS[0], 64)
    chunks = [next(stream)]
    m.generate(PROMPTS[1:], 2)  # the same decoder: dynamic tree, batch 1, greedy
    chunks += list(stream)
    assert len(fits) == 2 and fits[0] != fits[1]
    streamed = fits[1][0]
    assert len(streamed) == len(chunks) - 1 and sum(streamed) == sum(map(len, chunks[1:]))


def test_a_model_keeps_a_bounded_number_of_refits_and_decoders(model, monkeypatch):
    """A server sending another temperature or tree with every request: the refitted acceptances and
    the decoders a model keeps are bounded, and the least recently used go first (the one refitted or
    used again meanwhile stays)."""
    monkeypatch.setattr(eagle.api, "MAX_KEPT_ACCEPTANCES", 4)
    monkeypatch.setattr(eagle.api, "MAX_KEPT_DECODERS", 3)
    m = fresh(model)
    tree, rounds = TreeConfig(3, 2, 6), [[3] * 20]
    for i in range(10):
        m._learn_acceptance(SamplingParams(temperature=0.1 * (i + 1)), tree, rounds)
        m._learn_acceptance(SamplingParams(), tree, rounds)  # greedy, refitted again each time
    kept = set(m.accept_rates)
    assert len(kept) == 4 and SamplingParams() in kept and SamplingParams(temperature=1.0) in kept
    first, released = m._decoder(TreeConfig(2, 2, 4)), []
    for depth in range(3, 9):
        created = m._decoder(TreeConfig(depth, 2, depth + 1))
        monkeypatch.setattr(created, "release_buffers", lambda depth=depth: released.append(depth))
        assert m._decoder(TreeConfig(2, 2, 4)) is first  # used again: kept
    assert len(m._decoders) == 3 and first in m._decoders.values()
    assert released == [3, 4, 5, 6]  # the least recently used, their buffers released as they went
