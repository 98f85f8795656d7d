"""Buffers kept across runs (what ``cuda_graph=True`` does so that a later call replays the captured
graph without capturing again): a run that reuses an earlier run's KV caches and state tensors gives
exactly the tokens of a run on fresh buffers. Checked here on CPU, where the reuse is switched on by
hand; the graph replay itself is tested in test_speculate_cuda_graph.py (GPU)."""

from __future__ import annotations

import pytest
import torch

import eagle
from eagle.models.generate_plain import _POOLS, plain_decode_steps, release_plain_buffers
from eagle.speculate import SamplingParams, SpeculativeDecoder
from eagle.tree import TreeConfig

SHORT = ["def add(a, b):\n", "import sys\n"]
LONG = ["class Queue:\n    def __init__(self):\n        self.items = []\n", "for i in range(10):\n"]


@pytest.fixture(scope="module")
def pair():
    return eagle.load("tiny-code", dtype=torch.float32)


def _decoder(pair, reuse: bool) -> SpeculativeDecoder:
    d = SpeculativeDecoder(pair.target, pair.head, TreeConfig(depth=3, topk=4, total_tokens=10))
    d._reuse_buffers = reuse
    return d


def _run(decoder, ids, n, sampling, seed=3):
    tokens = [[] for _ in ids]
    for e in decoder.run(ids, n, sampling, seed=seed):
        for row, new in zip(e.rows, e.tokens):
            tokens[row].extend(new)
    return tokens


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculative_runs_on_reused_buffers_equal_fresh_runs(pair, temperature):
    sampling = SamplingParams(temperature)
    reused, fresh = _decoder(pair, True), _decoder(pair, False)
    first_ids = [pair.tokenizer.encode(p) for p in LONG]
    _run(reused, first_ids, 24, sampling)
    (kept,) = reused._pool.values()
    cache = kept.target_cache
    for prompts, n, seed in ((SHORT, 20, 5), (LONG, 16, 9)):  # shorter, then as long: both fit
        ids = [pair.tokenizer.encode(p) for p in prompts]
        assert _run(reused, ids, n, sampling, seed) == _run(fresh, ids, n, sampling, seed)
        (kept,) = reused._pool.values()
        assert kept.target_cache is cache  # the same buffers, not a new allocation
    assert not fresh._pool


def test_speculative_buffers_too_small_are_replaced(pair):
    sampling = SamplingParams()
    reused, fresh = _decoder(pair, True), _decoder(pair, False)
    ids = [pair.tokenizer.encode(p) for p in SHORT]
    _run(reused, ids, 8, sampling)
    small = next(iter(reused._pool.values())).target_cache
    assert small.max_seq_len % 256 == 0  # rounded up so that slightly longer runs fit
    long_run = small.max_seq_len  # more new tokens than the kept cache holds
    assert _run(reused, ids, long_run, sampling) == _run(fresh, ids, long_run, sampling)
    assert next(iter(reused._pool.values())).target_cache.max_seq_len > small.max_seq_len


def test_interleaved_runs_do_not_share_buffers(pair):
    """A stream still running keeps its buffers while another run on the same decoder starts."""
    sampling = SamplingParams()
    reused, fresh = _decoder(pair, True), _decoder(pair, False)
    a_ids = [pair.tokenizer.encode(p) for p in LONG]
    b_ids = [pair.tokenizer.encode(p) for p in SHORT]
    _run(reused, a_ids, 8, sampling)  # leaves buffers in the pool
    a = reused.run(a_ids, 24, sampling, seed=1)
    a_tokens = [[] for _ in a_ids]
    for _ in range(2):
        for row, new in zip(*(lambda e: (e.rows, e.tokens))(next(a))):
            a_tokens[row].extend(new)
    b_tokens = _run(reused, b_ids, 24, sampling)  # starts while `a` holds the pooled buffers
    for e in a:
        for row, new in zip(e.rows, e.tokens):
            a_tokens[row].extend(new)
    assert a_tokens == _run(fresh, a_ids, 24, sampling, seed=1)
    assert b_tokens == _run(fresh, b_ids, 24, sampling)


def test_release_buffers_frees_them(pair):
    d = _decoder(pair, True)
    _run(d, [pair.tokenizer.encode(SHORT[0])], 4, SamplingParams())
    assert d._pool
    d.release_buffers()
    assert not d._pool


def _plain(pair, ids, n, temperature, reuse, seed=4):
    steps = list(
        plain_decode_steps(pair.target, ids, n, temperature=temperature, seed=seed, reuse_buffers=reuse)
    )
    return torch.stack([t for t, _ in steps], 1).tolist()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_plain_runs_on_reused_buffers_equal_fresh_runs(pair, temperature):
    release_plain_buffers(pair.target)
    _plain(pair, [pair.tokenizer.encode(p) for p in LONG], 20, temperature, True)
    (kept,) = _POOLS[pair.target].values()
    for prompts, n, seed in ((SHORT, 12, 2), (LONG, 20, 7)):
        ids = [pair.tokenizer.encode(p) for p in prompts]
        assert _plain(pair, ids, n, temperature, True, seed) == _plain(pair, ids, n, temperature, False, seed)
        assert next(iter(_POOLS[pair.target].values())) is kept
    release_plain_buffers(pair.target)
    assert pair.target not in _POOLS


def test_api_release_buffers(pair):
    m = eagle.EagleModel(pair.target, pair.head, pair.tokenizer)
    d = m._decoder("chain", 1)
    d._reuse_buffers = True
    m.generate(SHORT[:1], 6, tree="chain")
    _plain(pair, [pair.tokenizer.encode(SHORT[0])], 4, 0.0, True)
    assert d._pool and _POOLS.get(pair.target)
    m.release_buffers()
    assert not d._pool and not _POOLS.get(pair.target)


def test_buffer_pool_keeps_the_most_recently_used():
    from eagle.models.cuda_graph import BufferPool

    pool = BufferPool(capacity=2)
    for key in "abc":
        pool.put(key, key.upper())
    assert pool.values() == ["B", "C"]  # "a" was evicted
    assert pool.take("b") == "B" and pool.take("b") is None  # a run owns what it takes
    pool.put("b", "B")
    pool.put("d", "D")
    assert pool.values() == ["B", "D"]  # "c" was the least recently used
    pool.clear()
    assert len(pool) == 0


def test_many_sampling_settings_keep_a_bounded_number_of_buffers(pair):
    d = _decoder(pair, True)
    ids = [pair.tokenizer.encode(SHORT[0])]
    for t in (0.0, 0.5, 0.7, 0.9, 1.1, 1.3):
        _run(d, ids, 4, SamplingParams(t))
    assert len(d._pool) == d._pool.capacity == 4


def test_a_larger_capacity_keeps_every_combination_a_caller_cycles_through(pair):
    """``eagle bench`` runs up to 6 (batch size, sampling) combinations per tree: with the default 4,
    each run would evict the next one's buffers and capture its graph again."""
    m = eagle.EagleModel(pair.target, pair.head, pair.tokenizer)
    d = m._decoder("chain", 1)
    assert m.kept_batch_states == d.kept_batch_states == 4
    m.kept_batch_states = 6
    assert d.kept_batch_states == 6
    assert m._decoder("static", 1).kept_batch_states == 6  # decoders created later follow it
    d._reuse_buffers = True
    ids = [pair.tokenizer.encode(SHORT[0])]
    temperatures = (0.0, 0.5, 0.7, 0.9, 1.1, 1.3)
    for _ in range(2):
        for t in temperatures:
            _run(d, ids, 4, SamplingParams(t))
    assert sorted(key[2].temperature for key in d._pool._entries) == list(temperatures)
    m.kept_batch_states = 2  # fewer: the least recently used go
    assert [key[2].temperature for key in d._pool._entries] == [1.1, 1.3]


def test_the_models_trees_share_one_bounded_pool(pair):
    """Several trees in turn (or a dynamic refit that switches trees) must not keep a set of caches
    each beyond the model's limit: one LRU pool holds every tree's batch states."""
    m = eagle.EagleModel(pair.target, pair.head, pair.tokenizer)
    chain, static = m._decoder("chain", 1), m._decoder("static", 1)
    chain._reuse_buffers = static._reuse_buffers = True  # what cuda_graph=True does, here on CPU
    m.kept_batch_states = 2
    ids = [pair.tokenizer.encode(SHORT[0])]
    _run(chain, ids, 4, SamplingParams())
    _run(static, ids, 4, SamplingParams())
    _run(chain, ids, 4, SamplingParams(0.7))
    kept = list(chain._pool._entries)
    assert chain._pool is static._pool and len(kept) == 2
    mine = chain._pool_owner
    assert [(d is mine, s.temperature) for d, _, s in kept] == [(False, 0.0), (True, 0.7)]
    static.release_buffers()  # a decoder frees its own entries only
    assert [(d is mine, s.temperature) for d, _, s in chain._pool._entries] == [(True, 0.7)]
    # reuse across calls still works with the shared pool
    (kept_chain,) = chain._pool.values()
    _run(chain, ids, 4, SamplingParams(0.7))
    assert chain._pool.values() == [kept_chain]


def test_plain_decoding_follows_the_models_capacity(pair):
    m = eagle.EagleModel(pair.target, pair.head, pair.tokenizer)
    release_plain_buffers(pair.target)
    try:
        m.kept_batch_states = 5
        for t in (0.0, 0.5, 0.7, 0.9, 1.1, 1.3):
            _plain(pair, [pair.tokenizer.encode(SHORT[0])], 3, t, True)
        assert len(_POOLS[pair.target]) == 5
        release_plain_buffers(pair.target)  # freeing the buffers keeps the setting
        for t in (0.0, 0.5, 0.7, 0.9, 1.1, 1.3):
            _plain(pair, [pair.tokenizer.encode(SHORT[0])], 3, t, True)
        assert len(_POOLS[pair.target]) == 5
    finally:
        m.kept_batch_states = 4
        release_plain_buffers(pair.target)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4", None])
def test_kept_batch_states_must_be_a_positive_int(pair, bad):
    m = eagle.EagleModel(pair.target, pair.head, pair.tokenizer)
    with pytest.raises(ValueError, match="kept batch states must be an int >= 1"):
        m.kept_batch_states = bad
    assert m.kept_batch_states == 4


def test_a_dropped_decoder_frees_its_buffers_without_the_garbage_collector(pair):
    """The pool's keys must not hold the decoder (decoder -> pool -> key -> decoder would be a cycle):
    dropping a decoder frees its caches at once, not at the next cyclic collection."""
    import gc
    import weakref

    d = _decoder(pair, True)
    _run(d, [pair.tokenizer.encode(SHORT[0])], 4, SamplingParams())
    (kept,) = d._pool.values()
    cache = weakref.ref(kept.target_cache)
    del kept
    gc.disable()
    try:
        del d
        assert cache() is None
    finally:
        gc.enable()


def test_every_static_tree_call_reuses_one_decoder(pair):
    """tree="static" built a new StaticTree per call, and decoders were keyed by object: each call made
    a new decoder (with CUDA graphs: new caches and a new capture, all kept). Equal trees share one."""
    import eagle_kernels

    m = eagle.EagleModel(pair.target, pair.head, pair.tokenizer)
    for _ in range(3):
        m.generate(SHORT[:1], 4, tree="static")
    m.generate(SHORT[:1], 4, tree=eagle_kernels.build_static_tree(eagle_kernels.MC_SIM_7B_63))
    assert len(m._decoders) == 1
    m.generate(SHORT[:1], 4, tree=eagle_kernels.build_static_tree([(0,), (1,), (0, 0)]))
    assert len(m._decoders) == 2  # another tree, another decoder


def test_greedy_runs_share_buffers_whatever_their_unused_filters(pair):
    """Greedy decoding ignores top-k/top-p/min-p: a greedy call with other filters must replay the
    kept buffers, not allocate and capture again."""
    d = _decoder(pair, True)
    ids = [pair.tokenizer.encode(SHORT[0])]
    _run(d, ids, 4, SamplingParams(0.0, top_k=5))
    (kept,) = d._pool.values()
    _run(d, ids, 4, SamplingParams(0.0, top_p=0.5))
    assert d._pool.values() == [kept]
    release_plain_buffers(pair.target)
    try:
        for top_k in (0, 7):
            list(plain_decode_steps(pair.target, ids, 3, temperature=0.0, top_k=top_k, reuse_buffers=True))
        assert len(_POOLS[pair.target]) == 1
    finally:
        release_plain_buffers(pair.target)


def test_sampled_plain_runs_with_other_filters_get_their_own_buffers(pair):
    """The mirror of the greedy case: a sampled run's filters are part of what a kept buffer set (on
    CUDA, its captured graph) computes, so other top-k / top-p / min-p need other buffers."""
    ids = [pair.tokenizer.encode(SHORT[0])]
    release_plain_buffers(pair.target)
    try:
        for top_k, top_p, min_p in ((0, 1.0, 0.0), (7, 1.0, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.1)):
            steps = plain_decode_steps(
                pair.target,
                ids,
                3,
                temperature=1.0,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                seed=1,
                reuse_buffers=True,
            )
            list(steps)
        assert len(_POOLS[pair.target]) == 4
    finally:
        release_plain_buffers(pair.target)


def test_reused_plain_buffers_start_every_row_live(pair):
    """A kept buffer set remembers which rows finished (hit an EOS) in its last run; a new run on it
    must start with every row live: it stopped after the first token otherwise."""
    ids = [pair.tokenizer.encode(SHORT[0])]
    fresh = _plain(pair, ids, 12, 0.0, False)[0]
    release_plain_buffers(pair.target)
    try:
        first = plain_decode_steps(pair.target, ids, 12, eos_token_id=[fresh[2]], reuse_buffers=True)
        assert len(list(first)) == 3
        second = plain_decode_steps(pair.target, ids, 12, eos_token_id=[fresh[4]], reuse_buffers=True)
        assert [int(t[0]) for t, _ in second] == fresh[:5]
    finally:
        release_plain_buffers(pair.target)
