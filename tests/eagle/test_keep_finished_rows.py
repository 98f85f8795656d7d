"""Rows that finish early under CUDA graphs are kept in the batch, frozen, instead of dropped (a smaller
batch would be a new batch state: an eager round and a new capture). Checked on CPU, where the mode is
switched on by hand: a frozen row's cache stops growing, nothing more is emitted for it, and every row's
tokens and accept lengths equal those of the dropping mode."""

from __future__ import annotations

import pytest
import torch

import eagle
from eagle import speculate
from eagle.models.generate_plain import generate_plain
from eagle.speculate import SamplingParams, SpeculativeDecoder
from eagle.tree import TreeConfig

PROMPTS = ["def add(a, b):\n", "import sys\n\n", "class Queue:\n    def __init__(self):\n"]


@pytest.fixture(scope="module")
def pair():
    return eagle.load("tiny-code", dtype=torch.float32)


def _run(pair, keep: bool, sampling, eos, n=24):
    decoder = SpeculativeDecoder(pair.target, pair.head, TreeConfig(depth=3, topk=4, total_tokens=10))
    decoder.keep_finished_rows = keep
    ids = [pair.tokenizer.encode(p) for p in PROMPTS]
    tokens, widths = [[] for _ in ids], []
    for e in decoder.run(ids, n, sampling, eos_token_ids=eos, seed=11):
        widths.append(len(e.rows))
        for row, new in zip(e.rows, e.tokens):
            tokens[row].extend(new)
    return tokens, widths, decoder.accept_lengths()


def _early_eos(pair, sampling) -> list[int]:
    """A token that ends row 0 after a few tokens while the other rows run on."""
    tokens, _, _ = _run(pair, False, sampling, [])
    for t in tokens[0][2:]:
        if all(t not in row[:8] for row in tokens[1:]):
            return [t]
    pytest.fail("no token ends row 0 early and leaves the others running: the test needs a new EOS choice")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_frozen_rows_give_the_tokens_of_dropped_rows(pair, temperature, monkeypatch):
    sampling = SamplingParams(temperature)
    eos = _early_eos(pair, sampling)
    held = []
    real_hold = speculate._Frozen.hold

    def spy(self, s):
        real_hold(self, s)
        held.append(
            (
                tuple(self.rows),
                s.target_cache.seqlens[self.index].tolist(),
                s.draft_cache.seqlens[self.index].tolist(),
            )
        )

    monkeypatch.setattr(speculate._Frozen, "hold", spy)
    dropped = _run(pair, False, sampling, eos)
    monkeypatch.setattr(SpeculativeDecoder, "_drop_finished", lambda *a: pytest.fail("a row was dropped"))
    kept = _run(pair, True, sampling, eos)
    assert kept[0] == dropped[0] and kept[2] == dropped[2]  # tokens, accept lengths per row
    assert kept[0][0][-1] == eos[0] and len(kept[0][0]) < 24
    assert kept[1] == dropped[1] and min(kept[1]) < len(PROMPTS)  # emissions leave finished rows out
    assert held, "no round ran with a frozen row"
    first = {}
    for rows, target_lengths, draft_lengths in held:  # a frozen row's committed lengths never move
        for r, t, d in zip(rows, target_lengths, draft_lengths):
            assert first.setdefault(r, (t, d)) == (t, d)


def test_eager_rows_wait_frozen_until_a_quarter_of_the_batch_can_be_dropped(pair, monkeypatch):
    """Without CUDA graphs a finished row is frozen until a quarter of the batch is finished, then the
    finished rows are dropped together (each drop copies both caches); the tokens stay the same."""
    # 18 distinct rows (identical ones would finish together), finishing at different rounds
    prompts = [pair.tokenizer.encode(f"# case {i}\n{p}") for i in range(6) for p in PROMPTS]
    tree = TreeConfig(depth=3, topk=4, total_tokens=10)
    widths, frozen_counts = [], []
    real_round = SpeculativeDecoder._round

    def spy(self, s, sampling):
        widths.append(s.root.shape[0])
        return real_round(self, s, sampling)

    real_of = speculate._Frozen.of.__func__

    def spy_of(cls, s, rows):
        frozen_counts.append((len(s.emitted), len(rows)))
        return real_of(cls, s, rows)

    monkeypatch.setattr(SpeculativeDecoder, "_round", spy)
    monkeypatch.setattr(speculate._Frozen, "of", classmethod(spy_of))
    outputs = {}
    for keep in (False, True):
        decoder = SpeculativeDecoder(pair.target, pair.head, tree)
        decoder.keep_finished_rows = keep
        widths.clear()
        frozen_counts.clear()
        tokens = [[] for _ in prompts]
        for e in decoder.run(prompts, 40, SamplingParams(), seed=3):
            for row, new in zip(e.rows, e.tokens):
                tokens[row].extend(new)
        outputs[keep] = tokens
        if not keep:
            assert frozen_counts, "no row waited frozen"
            assert all(4 * n < rows for rows, n in frozen_counts)  # frozen only below a quarter
            assert min(widths) < len(prompts), "no row was dropped"
            assert all(w == len(prompts) or 4 * (len(prompts) - w) >= len(prompts) for w in widths)
    assert outputs[False] == outputs[True]


@pytest.mark.parametrize("keep", [False, True])
def test_rows_frozen_at_their_budget_leave_room_for_the_next_rounds(pair, keep):
    """Rows of the longest prompt length that reach their budget first may have committed tokens past
    it (accepted, not emitted); frozen there, the next round's tree would overflow the caches, which
    hold prompt + budget + one tree. Frozen rows are held at length 0 instead."""
    text = pair.tokenizer.encode("".join(f"# case {i}\n{p}" for i in range(6) for p in PROMPTS))
    prompts = [text[i : i + 16] for i in range(0, 16 * 12, 16)]  # 12 distinct rows of equal length
    # a chain: its caches have the least room past the budget (one tree of depth + 1 rows)
    decoder = SpeculativeDecoder(pair.target, pair.head, TreeConfig.chain(5))
    decoder.keep_finished_rows = keep
    tokens = [[] for _ in prompts]
    for e in decoder.run(prompts, 30, SamplingParams(), seed=3):
        for row, new in zip(e.rows, e.tokens):
            tokens[row].extend(new)
    assert tokens == generate_plain(pair.target, prompts, 30)


def test_keep_finished_rows_is_the_cuda_graph_default(pair):
    tree = TreeConfig(depth=3, topk=4, total_tokens=10)
    assert SpeculativeDecoder(pair.target, pair.head, tree).keep_finished_rows is False


def test_read_back_in_one_copy_equals_separate_reads():
    """The GPU's single device-to-host copy of a round's results (tokens, counts, row ids, NaN flag,
    the first NaN/inf position of each row's accepted path) unpacks to what separate reads give."""
    from eagle.speculate import _Batch

    s = _Batch.__new__(_Batch)
    s.rows = torch.tensor([4, 0, 7])
    s.nonfinite = torch.tensor(False)
    new_tokens = torch.tensor([[5, 6, 0], [9, 0, 0], [1, 2, 3]])
    counts = torch.tensor([2, 1, 3])
    for nonfinite_from in (None, torch.tensor([3, 0, 2])):
        separate = SpeculativeDecoder._read_back(s, new_tokens, counts, False, nonfinite_from)
        assert SpeculativeDecoder._read_back(s, new_tokens, counts, True, nonfinite_from) == separate
        expected = None if nonfinite_from is None else [3, 0, 2]
        assert separate == ([4, 0, 7], new_tokens.tolist(), [2, 1, 3], False, expected)
    s.nonfinite = torch.tensor(True)
    assert SpeculativeDecoder._read_back(s, new_tokens, counts, one_copy=True)[3] is True
    s.nonfinite = None
    assert SpeculativeDecoder._read_back(s, new_tokens, counts, one_copy=True)[3] is False
