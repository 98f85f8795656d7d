"""speculative="auto": the phase policy (eagle.adaptive) and the decoder's plain steps between rounds."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import torch

import eagle
import eagle.speculate as speculate
from eagle.adaptive import PLAIN, SPECULATE, AutoSpeculation
from eagle.models.generate_plain import generate_plain
from eagle.speculate import SamplingParams
from eagle.tree import TreeConfig
from tests.eagle.conftest import (
    build_hf_target,
    eagle2_state,
    eagle3_state,
    head_config,
    save_hf_target,
    write_head,
)
from tests.eagle.test_plain_step import gp as generate_plain_module

SMALL = dict(vocab_size=24, max_position_embeddings=256)
GREEDY = SamplingParams()
TREE = TreeConfig(depth=4, topk=3, total_tokens=10)


# ---------------------------------------------------------------------------------------------------
# The policy alone, with made-up timings
# ---------------------------------------------------------------------------------------------------
def drive(policy: AutoSpeculation, forwards: int, speculate_s: float, plain_s: float, tokens_per_round=3):
    """Run ``forwards`` forwards with fixed costs; returns the modes chosen, in order."""
    modes = []
    for _ in range(forwards):
        mode = policy.next_mode()
        modes.append(mode)
        if mode == SPECULATE:
            policy.record(tokens_per_round, speculate_s)
        else:
            policy.record(1, plain_s)
    return modes


def runs(modes: list[str]) -> list[tuple[str, int]]:
    return [(m, len(list(g))) for m, g in itertools.groupby(modes)]


def test_a_faster_speculation_is_kept_with_a_short_plain_measurement_now_and_then():
    policy = AutoSpeculation(probe_rounds=4, plain_probe_steps=2, recheck_rounds=16, warmup=1)
    modes = drive(policy, 60, speculate_s=2.0, plain_s=1.0)  # 1.5 tokens/s against 1
    # 5 rounds (1 untimed), a measurement of 3 steps (1 untimed), then 16 rounds between measurements
    assert runs(modes)[:5] == [(SPECULATE, 5), (PLAIN, 3), (SPECULATE, 16), (PLAIN, 2), (SPECULATE, 16)]
    assert policy.plain_runs == 0
    assert policy.speculate_speed == pytest.approx(1.5) and policy.plain_speed == pytest.approx(1.0)


def test_a_slower_speculation_gives_way_to_plain_runs_that_double_up_to_the_limit():
    policy = AutoSpeculation(probe_rounds=2, plain_probe_steps=1, min_plain_run=4, max_plain_run=16, warmup=0)
    modes = drive(policy, 120, speculate_s=4.0, plain_s=1.0)  # 0.75 tokens/s against 1
    assert runs(modes)[:10] == [
        (SPECULATE, 2),
        (PLAIN, 1 + 4),  # the measurement, then the first run at once
        (SPECULATE, 2),
        (PLAIN, 8),
        (SPECULATE, 2),
        (PLAIN, 16),
        (SPECULATE, 2),
        (PLAIN, 16),  # capped at max_plain_run
        (SPECULATE, 2),
        (PLAIN, 16),
    ]
    assert modes.count(PLAIN) > 0.8 * len(modes)


def test_each_phase_speculation_wins_halves_the_next_plain_run():
    policy = AutoSpeculation(probe_rounds=2, plain_probe_steps=1, min_plain_run=4, warmup=0, decay=0.0)
    drive(policy, 2 + 5 + 2 + 8, speculate_s=4.0, plain_s=1.0)  # two lost probes: the next run is 16
    assert policy.next_mode() == SPECULATE
    drive(policy, 2, speculate_s=1.0, plain_s=1.0)  # the probe wins (3 tokens/s): keep speculating
    modes = drive(policy, 2 + 8 + 2, speculate_s=4.0, plain_s=1.0)  # then loses: a run of 8, not 16
    assert runs(modes) == [(SPECULATE, 2), (PLAIN, 8), (SPECULATE, 2)]
    assert drive(policy, 16, speculate_s=4.0, plain_s=1.0) == [PLAIN] * 16  # that probe lost: 8 -> 16


def test_winning_phases_do_not_shorten_plain_runs_below_the_minimum():
    policy = AutoSpeculation(probe_rounds=2, plain_probe_steps=1, min_plain_run=4, warmup=0, decay=0.0)
    drive(policy, 2 + 1 + 2 * 5, speculate_s=1.0, plain_s=1.0)  # measured, then five winning phases
    modes = drive(policy, 2 + 4 + 2, speculate_s=4.0, plain_s=1.0)
    assert runs(modes) == [(SPECULATE, 2), (PLAIN, 4), (SPECULATE, 2)]


def test_near_parity_the_mode_stays_as_it_is():
    """A band of +-margin around parity: speculating 3% slower stays speculating; after a plain run, a
    probe 3% faster does not win speculation back."""
    policy = AutoSpeculation(probe_rounds=2, plain_probe_steps=1, min_plain_run=4, warmup=0, margin=0.05)
    modes = drive(policy, 40, speculate_s=3 / 0.97, plain_s=1.0)  # 0.97 tokens/s against 1
    assert modes.count(PLAIN) == 1  # the measurement only
    policy = AutoSpeculation(probe_rounds=2, plain_probe_steps=1, min_plain_run=4, warmup=0, decay=0.0)
    drive(policy, 2 + 5, speculate_s=4.0, plain_s=1.0)  # lost: a run of 4 follows the measurement
    modes = drive(policy, 2 + 8 + 2, speculate_s=3 / 1.03, plain_s=1.0)  # the probe: 1.03 tokens/s
    assert runs(modes) == [(SPECULATE, 2), (PLAIN, 8), (SPECULATE, 2)]
    modes = drive(policy, 16 + 2, speculate_s=3 / 1.2, plain_s=1.0)  # 1.2: wins it back
    assert runs(modes) == [(PLAIN, 16), (SPECULATE, 2)] and policy.next_mode() == SPECULATE


def test_warmup_forwards_are_not_timed():
    policy = AutoSpeculation(probe_rounds=2, plain_probe_steps=1, warmup=1)
    policy.record(3, 100.0)  # a first round that compiled kernels
    policy.record(3, 1.0)
    policy.record(3, 1.0)
    assert policy.speculate_speed == pytest.approx(3.0)
    assert policy.next_mode() == PLAIN  # measuring: 1 untimed step, then 1 timed
    policy.record(1, 50.0)
    assert policy.plain_speed is None
    policy.record(1, 0.5)
    assert policy.plain_speed == pytest.approx(2.0)
    assert policy.next_mode() == SPECULATE  # 3 tokens/s beat 2
    policy.resume()  # a later run of the same decoder: warm, so its first round counts
    policy.record(3, 30.0)
    assert policy.speculate_speed < 1.0 and policy.rounds == 1


def test_speeds_are_kept_per_batch_size_class():
    """A run's last forwards, with fewer rows left, do not move the full batch's speeds."""
    policy = AutoSpeculation(probe_rounds=100, plain_probe_steps=100, warmup=0)
    for _ in range(3):
        policy.record(48, 16.0, rows=16)  # 3 tokens/s with 16 rows
    assert policy.speculate_speed == pytest.approx(3.0)
    for _ in range(5):
        policy.record(2, 10.0, rows=2)  # 0.2 tokens/s with 2 rows left
    assert policy.speculate_speed == pytest.approx(0.2)
    policy.record(27, 9.0, rows=9)  # 9..16 rows: the same class as 16
    summary = policy.summary()
    assert policy.speculate_speed == summary["speculate_tokens_per_s"] == summary["by_rows"][16]["speculate"]
    assert 3.0 - 1e-9 <= policy.speculate_speed <= 3.0 + 1e-9
    assert summary["by_rows"][2]["speculate"] == pytest.approx(0.2)
    assert summary["plain_tokens_per_s"] is None


def test_recent_forwards_weigh_most():
    policy = AutoSpeculation(probe_rounds=100, warmup=0, decay=0.5)
    for _ in range(20):
        policy.record(1, 1.0)  # 1 token/s
    for _ in range(20):
        policy.record(4, 1.0)  # then 4 tokens/s
    assert policy.speculate_speed == pytest.approx(4.0, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(probe_rounds=0), "probe_rounds"),
        (dict(plain_probe_steps=0), "plain_probe_steps"),
        (dict(min_plain_run=8, max_plain_run=4), "max_plain_run"),
        (dict(decay=1.0), "decay"),
        (dict(warmup=-1), "warmup"),
        (dict(margin=1.0), "margin"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoSpeculation(**kwargs)


@pytest.mark.parametrize("args", [(1, float("nan")), (-1, 1.0), (1, 1.0, 0)])
def test_bad_records_are_refused(args):
    with pytest.raises(ValueError, match="record"):
        AutoSpeculation().record(*args)


def _into_a_plain_run(policy: AutoSpeculation) -> None:
    """Rounds at 0.75 tokens/s against plain steps at 1: on to the first plain run (after the measuring
    steps)."""
    while not (policy.next_mode() == PLAIN and policy.plain_runs == 1):
        policy.record(3, 4.0) if policy.next_mode() == SPECULATE else policy.record(1, 1.0)


def test_plain_forwards_ahead_is_the_rest_of_a_timed_plain_phase():
    policy = AutoSpeculation(probe_rounds=2, plain_probe_steps=3, min_plain_run=8, warmup=1)
    assert policy.plain_forwards_ahead() == 0  # rounds first
    policy.record(3, 4.0)
    policy.record(3, 4.0)
    policy.record(3, 4.0)
    assert policy.next_mode() == PLAIN
    assert policy.plain_forwards_ahead() == 1  # its first plain step is left untimed: alone
    policy.record(1, 100.0)
    assert policy.plain_forwards_ahead() == 3  # the measuring steps
    policy.record(3, 3.0, forwards=3)
    assert policy.plain_speed == pytest.approx(1.0)  # the untimed step's 100 s left out
    assert policy.next_mode() == PLAIN and policy.plain_runs == 1
    assert policy.plain_forwards_ahead() == 8
    policy.record(5, 5.0, forwards=5)
    assert policy.plain_forwards_ahead() == 3 and policy.plain_steps == 9


@pytest.mark.parametrize("decay", [0.9, 0.0])
def test_plain_steps_recorded_at_once_count_as_as_many_equal_steps(decay):
    """``record(..., forwards=n)`` leaves the policy as n records of an equal share each: the same
    speeds, counts and later choices."""
    one, chunked = (AutoSpeculation(probe_rounds=2, plain_probe_steps=1, decay=decay) for _ in range(2))
    for policy in (one, chunked):
        _into_a_plain_run(policy)
    n = one.plain_forwards_ahead()
    assert n == chunked.plain_forwards_ahead() == one.min_plain_run
    for _ in range(n):
        one.record(1, 0.5)
    chunked.record(n, 0.5 * n, forwards=n)
    assert chunked.plain_speed == pytest.approx(one.plain_speed, rel=1e-12)
    assert chunked.plain_steps == one.plain_steps and chunked.next_mode() == one.next_mode() == SPECULATE
    assert drive(chunked, 40, 4.0, 1.0) == drive(one, 40, 4.0, 1.0)


def test_more_plain_steps_at_once_than_the_phase_holds_end_it():
    """A policy shared by runs in several threads (each given it as auto=...) may have moved on between
    a run's plain_forwards_ahead() and its record: the record ends the phase instead of raising in
    the middle of a generation."""
    policy = AutoSpeculation(probe_rounds=2, plain_probe_steps=1)
    _into_a_plain_run(policy)
    ahead, steps = policy.plain_forwards_ahead(), policy.plain_steps
    policy.record(ahead + 3, 1.0, forwards=ahead + 3)
    assert policy.next_mode() == SPECULATE and policy.plain_steps == steps + ahead + 3
    with pytest.raises(ValueError, match="forwards >= 1"):
        policy.record(0, 1.0, forwards=0)
    # a chunk recorded once the phase is a round's: plain steps still, not a round of 300 tokens
    speculate_speed, rounds, phase = policy.speculate_speed, policy.rounds, policy._phase
    policy.record(300, 30.0, forwards=300)
    assert policy.speculate_speed == speculate_speed and policy.rounds == rounds
    assert policy.plain_steps == steps + ahead + 3 + 300 and policy._phase is phase and phase.done == 0
    assert policy.plain_speed == pytest.approx(10.0, rel=0.01)  # 300 tokens in 30 s, the history decayed


# ---------------------------------------------------------------------------------------------------
# The decoder: plain steps between rounds
# ---------------------------------------------------------------------------------------------------
class Scripted(AutoSpeculation):
    """A policy that follows a fixed cycle of modes (no timing); a run of "p"s may run as one chunk."""

    def __init__(self, script: str) -> None:
        super().__init__()
        self._script = [PLAIN if c == "p" else SPECULATE for c in script]
        self._at = 0
        self.seen: list[str] = []
        self.chunks: list[int] = []  # forwards recorded at once, in order

    def next_mode(self) -> str:
        return self._script[self._at % len(self._script)]

    def plain_forwards_ahead(self) -> int:
        if SPECULATE not in self._script:
            return 10**6
        n = 0
        while self._script[(self._at + n) % len(self._script)] == PLAIN:
            n += 1
        return n

    def record(self, tokens: int, seconds: float, rows: int = 1, forwards: int = 1) -> None:
        mode = self.next_mode()
        assert forwards == 1 or forwards <= self.plain_forwards_ahead()
        self.seen.extend([mode] * forwards)
        self.chunks.append(forwards)
        if mode == SPECULATE:
            self.rounds += 1
        else:
            self.plain_steps += forwards
        self._at += forwards


def _make_pair(root, seed: int, kind: str):
    hf = build_hf_target("llama", seed=seed, **SMALL)
    target_dir = save_hf_target(hf, root / f"target{seed}")
    cfg = json.loads((target_dir / "config.json").read_text()) | {"head_dim": hf.config.head_dim}
    if kind == "eagle2":
        state = eagle2_state(cfg, bias=True, embed=hf.model.embed_tokens.weight.detach(), seed=seed + 7)
        head_cfg = head_config(cfg, bias=True)
    else:  # a reduced draft vocabulary: the catch-up's root logits are over it
        used = sorted(list(range(0, cfg["vocab_size"], 2)) + [1])
        state = eagle3_state(cfg, prefix="layers.0.", embed=None, draft_vocab=used, seed=seed + 7)
        head_cfg = head_config(cfg, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=len(used))
    head_dir = write_head(root / f"{kind}{seed}", head_cfg, state, fmt="safetensors", dtype=torch.float32)
    return eagle.load(str(target_dir), str(head_dir), dtype=torch.float64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive_pairs")
    return {"eagle2": _make_pair(root, 0, "eagle2"), "eagle3": _make_pair(root, 2, "eagle3")}


PROMPTS = [[1, 5, 9, 2], [3, 3, 7, 11, 4, 8, 2], [6]]


def _run(model, prompts, n, policy, sampling=GREEDY, eos=(), seed=0, tree=TREE, chunk=1):
    decoder = model._decoder(tree, len(prompts))
    tokens = [[] for _ in prompts]
    emissions = decoder.run(
        prompts, n, sampling, eos_token_ids=eos, seed=seed, auto=policy, plain_chunk=chunk
    )
    for emission in emissions:
        for row, new in zip(emission.rows, emission.tokens):
            tokens[row].extend(new)
    return tokens, decoder


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
@pytest.mark.parametrize("script", ["p", "sp", "sppps", "spppppppp", "pps", "ppppppppppppps"])
@pytest.mark.parametrize("chunk", [1, 64])  # plain steps one emission each, or a chunk of them
def test_greedy_tokens_are_plain_decodings_whatever_the_modes(models, kind, script, chunk, monkeypatch):
    monkeypatch.setattr(speculate, "_CATCH_UP_ROWS", 5)  # long plain runs catch up in several forwards
    model = models[kind]
    plain = generate_plain(model.target, PROMPTS, 40)
    policy = Scripted(script)
    tokens, _ = _run(model, PROMPTS, 40, policy, chunk=chunk)
    assert tokens == plain
    if "p" in script:
        assert PLAIN in policy.seen
    if "s" in script:
        assert SPECULATE in policy.seen


@pytest.mark.parametrize("script", ["sppppp", "p" * 16 + "s"])  # the second: before the draft's prefill
@pytest.mark.parametrize("chunk", [1, 64])  # plain steps one emission each, or a chunk of them
def test_rows_that_finish_during_a_plain_run_leave_with_their_backlog(models, script, chunk):
    model = models["eagle2"]
    plain = generate_plain(model.target, PROMPTS, 30)
    # each row stops at a token it emits at a different step
    stop = {plain[0][7], plain[1][12]} - set(plain[2][:20])
    expect = []
    for row in plain:
        cut = next((i for i, t in enumerate(row) if t in stop), None)
        expect.append(row if cut is None else row[: cut + 1])
    tokens, _ = _run(model, PROMPTS, 30, Scripted(script), eos=sorted(stop), chunk=chunk)
    assert tokens == expect


def _one_row_stops_early(model, n: int):
    """8 prompts and a stop token that exactly one of their rows emits, early (searched over seeded
    prompt sets): ``(prompts, stop, that row's cut)``."""
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(1, 24, (3 + i % 4,), generator=g).tolist() for i in range(8)]
        plain = generate_plain(model.target, prompts, n)
        for stop in range(24):
            rows = [r for r, row in enumerate(plain) if stop in row]
            if len(rows) == 1 and plain[rows[0]].index(stop) < n // 3:
                return prompts, plain, stop, rows[0]
    pytest.fail("no prompt set with a token only one row emits early")


@pytest.mark.parametrize("script", ["p" * 12 + "s", "spppps"])
@pytest.mark.parametrize("chunk", [1, 64])  # plain steps one emission each, or a chunk of them
def test_a_row_frozen_while_the_drafts_prefill_waits(models, script, chunk, monkeypatch):
    """8 rows, one finishing early: it waits frozen (fewer than a quarter are done), through the draft's
    catch-up (with "p...": its prefill too) and the rounds after it; every row's tokens stay plain
    decoding's."""
    model = models["eagle2"]
    prompts, plain, stop, row = _one_row_stops_early(model, 30)
    expect = [r[: r.index(stop) + 1] if i == row else r for i, r in enumerate(plain)]
    frozen_while_pending = []
    real_of = speculate._Frozen.of.__func__

    def spy(cls, s, rows):
        frozen_while_pending.append(s.pending_draft is not None)
        return real_of(cls, s, rows)

    monkeypatch.setattr(speculate._Frozen, "of", classmethod(spy))
    tokens, _ = _run(model, prompts, 30, Scripted(script), eos=[stop], chunk=chunk)
    assert tokens == expect
    assert len(frozen_while_pending) == 1  # the row froze once, and stayed in the batch
    assert frozen_while_pending[0] or script[0] != "p"  # "p...": before the draft's prefill ran


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 5)])
@pytest.mark.parametrize("chunk", [1, 64])  # plain steps one emission each, or a chunk of them
def test_sampled_plain_steps_draw_as_plain_decoding_does(models, temperature, top_k, kind, chunk):
    """All plain steps: each row's stream gives the tokens plain sampling gives with the same seed.
    EAGLE-3 heads take the Python plain step (EAGLE-1/2 ones the C++ one on CPU), whose draw counter
    no test covered: the same uniform reused for every step still gave tokens."""
    model = models[kind]
    plain = generate_plain(model.target, PROMPTS, 25, temperature=temperature, top_k=top_k, seed=123)
    tokens, _ = _run(
        model, PROMPTS, 25, Scripted("p"), SamplingParams(temperature, top_k), seed=123, chunk=chunk
    )
    assert tokens == plain


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
@pytest.mark.parametrize("script", ["sppppppp", "ppppppps"])  # the second: the draft's prefill waits too
@pytest.mark.parametrize("chunk", [256, 3])
def test_the_draft_catches_up_on_the_positions_plain_steps_committed(
    models, kind, script, chunk, monkeypatch
):
    """After plain steps and the catch-up (in forwards of ``chunk`` positions), the draft's root state
    is what a draft prefill over the whole sequence (target features of every position, each with the
    token after it) gives at its end."""
    monkeypatch.setattr(speculate, "_CATCH_UP_ROWS", chunk)
    model = models[kind]
    decoder = model._decoder(TREE, 1)
    states = []
    plain_step = decoder._plain_step
    decoder._plain_step = lambda s, sampling: (states.append(s), plain_step(s, sampling))[1]
    prompt = PROMPTS[1]
    gen = decoder.run([prompt], 60, SamplingParams(), auto=Scripted(script))
    emitted = []
    plain_steps = script.index("s") if script[0] == "p" else 7
    for i, emission in enumerate(gen):
        emitted.extend(emission.tokens[0])
        if i == script.index("p") + plain_steps:  # the prefill (0), a round or not, the plain steps
            break
    del decoder._plain_step
    state = states[-1]
    assert len(state.backlog) == plain_steps
    assert (state.pending_draft is not None) == (script[0] == "p")
    with torch.inference_mode():
        decoder._catch_up(state)
    assert not state.backlog
    seq = prompt + emitted  # the root (last token) has no feature yet
    target, head = model.target, model.head
    with torch.inference_mode():
        cache = target.new_cache(1, len(seq) + 1)
        out = target(torch.tensor([seq[:-1]]), cache, feature_layers=head.feature_layers)
        features = head.target_features(out)
        d_cache = head.new_cache(1, len(seq) + 1)
        last = torch.tensor([[len(seq) - 2]])
        ref = head(features, torch.tensor([seq[1:]]), d_cache, logits_index=last)
    assert int(state.draft_cache.seqlens[0]) == int(state.target_cache.seqlens[0]) == len(seq) - 1
    torch.testing.assert_close(state.root_logits[0], ref.logits[0, 0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state.root_hidden[0], ref.hidden[0, -1], rtol=1e-9, atol=1e-9)
    gen.close()


def test_a_plain_phase_runs_in_chunks_that_stop_at_the_nearest_budget(models, monkeypatch):
    """Plain steps back to back (``plain_chunk``): one emission per chunk, the same tokens and per-forward
    accept lengths as one step at a time, and no chunk runs past the budget of a row still running
    (rows are at different lengths after a round)."""
    model = models["eagle2"]
    script = "s" + "p" * 11
    plain = generate_plain(model.target, PROMPTS, 20)
    one_by_one, one_decoder = _run(model, PROMPTS, 20, Scripted(script))
    one_accepts = {r: list(a) for r, a in one_decoder._accept_lengths.items()}
    decoder = model._decoder(TREE, len(PROMPTS))
    real = decoder._plain_steps
    bounds = []  # (steps asked for, the least room of a running row)

    def spy(s, sampling, steps, stop, running, seconds=None):
        bounds.append((steps, min(20 - s.emitted[i] for i in running)))
        return real(s, sampling, steps, stop, running, seconds)

    monkeypatch.setattr(decoder, "_plain_steps", spy)
    policy = Scripted(script)
    tokens, _ = _run(model, PROMPTS, 20, policy, chunk=6)
    assert tokens == one_by_one == plain
    assert decoder._accept_lengths == one_accepts
    assert max(policy.chunks) == 6 and all(steps <= room for steps, room in bounds)
    assert any(steps == room < 6 for steps, room in bounds)  # a budget cut one short


def test_a_chunk_of_plain_steps_ends_after_the_step_that_emits_an_eos(models):
    """A chunk ends with the step whose token is an EOS: no step past it (on CUDA too: reading a step
    behind, as tried first, waited for the current step all the same, and computed one past the EOS,
    whose NaN logits then raised though plain decoding never computes them)."""
    model = models["eagle2"]
    prompt = PROMPTS[1]
    plain = generate_plain(model.target, [prompt], 30)[0]
    at = next(i for i in range(4, 30) if plain[i] not in plain[:i])  # a token's first appearance
    policy = Scripted("p")
    tokens, _ = _run(model, [prompt], 30, policy, eos=[plain[at]], chunk=64)
    assert tokens == [plain[: at + 1]]
    assert policy.chunks == [at]  # the prefill emitted token 0; the chunk, tokens 1..at


def _clock_of_plain_steps(monkeypatch, decoder, step_seconds: float) -> None:
    """The host clock stands still except in plain steps, each of which takes ``step_seconds``."""
    clock = [0.0]
    real = decoder._plain_step

    def timed(s, sampling):
        clock[0] += step_seconds
        return real(s, sampling)

    monkeypatch.setattr(decoder, "_plain_step", timed)
    monkeypatch.setattr(speculate.time, "perf_counter", lambda: clock[0])


def test_a_chunk_of_plain_steps_ends_once_it_has_run_plain_chunk_seconds(models, monkeypatch):
    model = models["eagle2"]
    plain = generate_plain(model.target, PROMPTS, 20)
    decoder = model._decoder(TREE, len(PROMPTS))
    _clock_of_plain_steps(monkeypatch, decoder, 0.02)
    policy = Scripted("p")
    tokens = [[] for _ in PROMPTS]
    for e in decoder.run(PROMPTS, 20, GREEDY, auto=policy, plain_chunk=64, plain_chunk_seconds=0.05):
        for row, new in zip(e.rows, e.tokens):
            tokens[row].extend(new)
    assert tokens == plain
    assert policy.chunks == [3] * 6 + [1]  # 0.06 s >= 0.05 s after 3 steps; 19 tokens after the prefill
    with pytest.raises(ValueError, match="plain_chunk_seconds must be > 0"):
        next(decoder.run(PROMPTS, 4, GREEDY, auto=True, plain_chunk_seconds=0.0))


def test_stream_auto_emits_plain_steps_in_chunks_of_about_50_ms(models, monkeypatch):
    """stream(speculative="auto"): plain steps come in lists of up to ~STREAM_CHUNK_SECONDS of steps (a
    reader still gets tokens ~20 times a second; one emission per step cost 5-12% on a CPU)."""
    from eagle.api import STREAM_CHUNK_SECONDS

    model = models["eagle2"]
    prompt = PROMPTS[1]
    plain = generate_plain(model.target, [prompt], 30)[0]
    decoder = model._decoder(TREE, 1)
    key = (1, GREEDY.as_key())
    decoder._auto_policies[key] = Scripted("p")  # the policy stream carries on with
    _clock_of_plain_steps(monkeypatch, decoder, STREAM_CHUNK_SECONDS / 4.5)
    try:
        chunks = list(model.stream(prompt, 30, speculative="auto", tree=TREE))
    finally:
        decoder._auto_policies.pop(key, None)
    assert [t for chunk in chunks for t in chunk] == plain
    assert [len(chunk) for chunk in chunks] == [1] + [5] * 5 + [4]  # the prefill's token, then chunks


class _ModesOnly(AutoSpeculation):
    """A policy written before plain chunks: its own modes (4 rounds, then a plain step and a round,
    and so on) on top of the base class's bookkeeping, whose phases the records drive on their own
    (after 4 rounds: 2 plain steps measuring plain decoding's speed)."""

    def __init__(self) -> None:
        super().__init__(warmup=0)
        self.modes = itertools.chain([SPECULATE] * 4, itertools.cycle([PLAIN, SPECULATE]))
        self.mode = next(self.modes)

    def next_mode(self) -> str:
        return self.mode

    def record(self, tokens: int, seconds: float, rows: int = 1) -> None:  # (no forwards)
        super().record(tokens, seconds, rows)
        self.mode = next(self.modes)


class _OwnModes(_ModesOnly):
    def record(self, tokens: int, seconds: float, rows: int = 1, forwards: int = 1) -> None:
        assert forwards == 1, "a chunk of plain steps sized by phases this policy does not follow"
        super().record(tokens, seconds, rows)


@pytest.mark.parametrize("policy", [_ModesOnly, _OwnModes])
def test_policies_written_before_chunks_run_one_plain_step_per_emission(models, policy):
    """A subclass whose record takes no ``forwards``, or that chooses its own modes without saying how
    many plain steps are ahead: with plain_chunk > 1, one step per emission as before (not a
    TypeError, nor chunks sized by the base class's phases, which it does not drive)."""
    model = models["eagle2"]
    plain = generate_plain(model.target, PROMPTS, 40)
    decoder = model._decoder(TREE, len(PROMPTS))
    tokens = [[] for _ in PROMPTS]
    for emission in decoder.run(PROMPTS, 40, GREEDY, auto=policy(), plain_chunk=64):
        for row, new in zip(emission.rows, emission.tokens):
            tokens[row].extend(new)
    assert tokens == plain
    assert speculate._takes_plain_chunks(Scripted("p")) and speculate._takes_plain_chunks(AutoSpeculation())
    assert not speculate._takes_plain_chunks(policy())


def test_generate_auto_runs_a_plain_phase_as_one_chunk(models):
    model = models["eagle2"]
    plain = model.generate(PROMPTS, 30, speculative=False)
    decoder = model._decoder(TREE, len(PROMPTS))
    policy = Scripted("ss" + "p" * 9)
    key = (len(PROMPTS), GREEDY.as_key())
    decoder._auto_policies[key] = policy  # the policy generate carries on with
    try:
        result = model.generate(PROMPTS, 30, speculative="auto", tree=TREE)
    finally:
        decoder._auto_policies.pop(key, None)  # (put back by the run: the module's other tests time theirs)
    assert result.tokens == plain.tokens
    assert policy.chunks[:4] == [1, 1, 9, 1]
    assert result.speculation["plain_steps"] == policy.seen.count(PLAIN)


class _NanAfter:
    """The target, whose logits turn NaN from its ``n``-th call on."""

    def __init__(self, target, n: int) -> None:
        self._target, self._left = target, n

    def __getattr__(self, name):
        return getattr(self._target, name)

    def __call__(self, *args, **kwargs):
        out = self._target(*args, **kwargs)
        self._left -= 1
        if self._left <= 0:
            out.logits[:, -1, 3] = float("nan")
        return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("chunk", [1, 64])  # plain steps one emission each, or a chunk of them
def test_nan_logits_in_a_plain_step_raise(models, temperature, chunk):
    decoder = models["eagle2"]._decoder(TREE, 2)
    decoder.target = _NanAfter(decoder.target, 4)  # the prefill, then plain steps (from Python)
    previous = generate_plain_module.set_cpu_decode_step(False)
    try:
        with pytest.raises(FloatingPointError, match="NaN"):
            list(
                decoder.run(
                    PROMPTS[:2], 10, SamplingParams(temperature), auto=Scripted("p"), plain_chunk=chunk
                )
            )
    finally:
        decoder.target = decoder.target._target
        generate_plain_module.set_cpu_decode_step(previous)


class _PoisonAfterPrefill(Scripted):
    """Plain steps only; before the first, a NaN goes into the target's lm_head (restored by the test)."""

    def __init__(self, target) -> None:
        super().__init__("p")
        self._target, self.saved = target, None

    def next_mode(self) -> str:
        if self.saved is None:
            self.saved = self._target.lm_head_weight[5].clone()
            with torch.no_grad():
                self._target.lm_head_weight[5, 0] = float("nan")
        return super().next_mode()


@pytest.mark.extension
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("chunk", [1, 64])  # plain steps one emission each, or a chunk of them
def test_nan_logits_in_a_one_call_plain_step_raise(models, temperature, chunk):
    model = models["eagle2"]
    decoder = model._decoder(TREE, 2)
    policy = _PoisonAfterPrefill(model.target)
    calls = []
    real = decoder._cpu_plain_step

    def spy(s, sampling):
        calls.append(decoder._cpu_plain_step_args(s, sampling) is not None)  # the one-call step applies
        return real(s, sampling)

    decoder._cpu_plain_step = spy
    try:
        with pytest.raises(FloatingPointError, match="NaN"):
            list(decoder.run(PROMPTS[:2], 10, SamplingParams(temperature), auto=policy, plain_chunk=chunk))
    finally:
        del decoder._cpu_plain_step
        with torch.no_grad():
            model.target.lm_head_weight[5] = policy.saved
    assert calls == [True]  # the first plain step raised


@pytest.mark.parametrize("tree", ["chain", "static"])
@pytest.mark.parametrize("chunk", [1, 64])  # plain steps one emission each, or a chunk of them
def test_chain_and_static_trees_take_plain_steps_too(models, tree, chunk):
    model = models["eagle2"]
    plain = generate_plain(model.target, PROMPTS, 30)
    tokens, _ = _run(model, PROMPTS, 30, Scripted("spppps"), tree=model._tree(tree), chunk=chunk)
    assert tokens == plain


def test_generate_auto_reports_its_choices_and_keeps_greedy_tokens(models):
    model = models["eagle2"]
    plain = model.generate(PROMPTS, 50, speculative=False)
    auto = model.generate(PROMPTS, 50, speculative="auto", tree=TREE)
    assert auto.tokens == plain.tokens
    info = auto.speculation
    assert info["rounds"] + info["plain_steps"] == max(len(a) for a in auto.accept_lengths)
    assert info["rounds"] >= 1 and info["speculate_tokens_per_s"] > 0
    assert plain.speculation is None
    streamed = [t for chunk in model.stream(PROMPTS[0], 50, speculative="auto", tree=TREE) for t in chunk]
    assert streamed == plain.tokens[0]


def test_a_decoder_carries_its_policy_over_to_the_next_run_of_the_same_kind(models):
    decoder = models["eagle2"]._decoder(TREE, 2)
    list(decoder.run(PROMPTS[:2], 12, GREEDY, auto=True))
    first = decoder.last_auto
    assert first.rounds + first.plain_steps > 0
    phase, speed = first.next_mode(), first.speculate_speed
    list(decoder.run(PROMPTS[1:], 1, GREEDY, auto=True))  # the prefill only: no forward of either mode
    assert decoder.last_auto is first and first.rounds == first.plain_steps == 0
    assert first.next_mode() == phase and first.speculate_speed == speed
    list(decoder.run(PROMPTS[:2], 4, SamplingParams(temperature=1.0), auto=True))
    assert decoder.last_auto is not first
    own = AutoSpeculation()
    list(decoder.run(PROMPTS[:2], 4, GREEDY, auto=own))
    assert decoder.last_auto is own


def test_two_runs_at_once_on_one_decoder_keep_their_own_policy_and_record(models):
    """A run still open (a stream, or another thread's call) keeps its policy and accept lengths: a
    run of the same kind started meanwhile gets a fresh policy, not the open run's (whose counts and
    speeds would mix), and each run's emissions carry its own record; the policy that ends last is
    the one the next run carries on with."""
    decoder = models["eagle2"]._decoder(TREE, 2)
    list(decoder.run(PROMPTS[:2], 12, GREEDY, auto=True))
    kept = decoder.last_auto
    open_run = decoder.run(PROMPTS[:2], 12, GREEDY, auto=True)
    first = next(open_run)
    assert first.auto is kept
    other = list(decoder.run(PROMPTS[1:3], 12, GREEDY, auto=True))
    assert other[-1].auto is not kept and other[-1].accept_lengths is not first.accept_lengths
    assert kept.rounds == kept.plain_steps == 0  # the other run's forwards were not counted here
    rest = list(open_run)
    assert all(e.auto is kept and e.accept_lengths is first.accept_lengths for e in rest)
    assert kept.rounds + kept.plain_steps == len(rest)
    assert [sum(first.accept_lengths[b]) for b in range(2)] == [11, 11]
    list(decoder.run(PROMPTS[:2], 4, GREEDY, auto=True))
    assert decoder.last_auto is kept  # (it ended last)


@pytest.mark.parametrize("value", ["yes", 1.0, None, "AUTO"])
def test_a_bad_speculative_value_is_named(models, value):
    with pytest.raises(ValueError, match="speculative must be True, False or 'auto'"):
        models["eagle2"].generate(PROMPTS, 4, speculative=value)


def test_auto_refuses_cuda_graphs(models):
    with pytest.raises(ValueError, match="cuda_graph"):
        models["eagle2"].generate(PROMPTS, 4, speculative="auto", cuda_graph=True)


def test_charged_catch_up_time_slows_plain_decodings_measured_speed():
    policy = AutoSpeculation(warmup=0, plain_probe_steps=1)
    for _ in range(4):
        policy.record(3, 0.3)  # speculation: 10 tokens/s
    policy.record(1, 0.05)  # the measuring plain step: 20 tokens/s
    assert policy.plain_speed == pytest.approx(20.0)
    policy.charge_plain(0.05)
    assert policy.plain_speed == pytest.approx(10.0)
    policy.charge_plain(1.0, rows=16)  # another batch size class: this one's speed is untouched
    assert policy.plain_speed == pytest.approx(10.0)
    for bad in ((-1.0, 1), (float("nan"), 1), (0.1, 0)):
        with pytest.raises(ValueError, match="charge_plain"):
            policy.charge_plain(*bad)


class _Recording(Scripted):
    def __init__(self, script: str) -> None:
        super().__init__(script)
        self.records: list[tuple[str, float]] = []
        self.charges: list[float] = []

    def record(self, tokens: int, seconds: float, rows: int = 1, forwards: int = 1) -> None:
        self.records.append((self.next_mode(), seconds))
        super().record(tokens, seconds, rows, forwards)

    def charge_plain(self, seconds: float, rows: int = 1) -> None:
        self.charges.append(seconds)


def test_the_drafts_catch_up_is_charged_to_plain_steps_not_to_the_next_round(models):
    """The backlog's catch-up (slowed here to 0.2 s) is charged to plain decoding; the round after it
    is timed without it; the deferred prefill of the prompts (no plain steps before) stays the
    round's."""
    model = models["eagle2"]
    decoder = model._decoder(TREE, 1)
    real = decoder._catch_up

    def slow_catch_up(s):
        had_backlog = bool(s.backlog)
        seconds = real(s)
        if had_backlog:
            time.sleep(0.2)
            return seconds + 0.2
        assert seconds == 0.0
        return seconds

    decoder._catch_up = slow_catch_up
    try:
        policy = _Recording("sppps")
        list(decoder.run(PROMPTS[:1], 12, SamplingParams(), auto=policy))
    finally:
        del decoder._catch_up
    assert len(policy.charges) >= 1 and all(c >= 0.2 for c in policy.charges)
    after_plain = [i for i, (mode, _) in enumerate(policy.records) if mode == SPECULATE and i > 0]
    assert after_plain and all(policy.records[i][1] < 0.2 for i in after_plain)
