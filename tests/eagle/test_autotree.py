from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from eagle import autotree
from eagle.models import load_draft, load_target
from eagle.tree import TreeConfig


@pytest.mark.parametrize("width", [8, 12, 16, 24, 32, 48, 64])
def test_tree_for_width_is_valid_and_verifies_width_tokens(width):
    tree = autotree.tree_for_width(width)
    assert isinstance(tree, TreeConfig) and tree.total_tokens == width and 2 <= tree.topk <= 10


@pytest.mark.parametrize(
    ("depth", "width", "expected"),
    [
        (6, 24, (6, 4, 24)),  # k = round(24 / 6)
        (3, 12, (3, 4, 12)),
        (3, 4, (3, 1, 4)),  # width = depth + 1: a chain
        (4, 9, (4, 2, 9)),  # round(2.25) = 2
        (3, 64, (3, 10, 64)),  # round(21.3) capped at 10
        (6, 8, (6, 2, 8)),  # round(1.3) raised to 2
        (3, 5, (3, 2, 5)),
    ],
)
def test_tree_for_sizes_the_expansion_width_from_width_per_level(depth, width, expected):
    tree = autotree.tree_for(depth, width)
    assert (tree.depth, tree.topk, tree.total_tokens) == expected


def test_choice_minimises_cost_per_expected_token(monkeypatch):
    # Linear cost (a CPU): the cheapest per expected token under the gain model is a small tree.
    monkeypatch.setattr(autotree, "time_verify", lambda t, b, widths: {w: 1.0 + 0.2 * w for w in widths})
    monkeypatch.setattr(autotree, "_TIMINGS", {})
    target = type("T", (), {"device": torch.device("cpu")})()
    small = autotree.choose_tree(target, 1)
    # Flat cost (a GPU below saturation): the biggest tree wins.
    monkeypatch.setattr(autotree, "time_verify", lambda t, b, widths: dict.fromkeys(widths, 1.0))
    big = autotree.choose_tree(target, 2)
    assert small.total_tokens < big.total_tokens == max(autotree.WIDTHS["cpu"])


def test_timings_are_cached_per_model_and_batch(tiny_checkpoints, monkeypatch):
    target = load_target(str(tiny_checkpoints.target), dtype=torch.float32)
    monkeypatch.setattr(autotree, "_TIMINGS", {})
    calls = []
    real = autotree.time_verify
    monkeypatch.setattr(autotree, "time_verify", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    first = autotree.choose_tree(target, 1)
    n = len(calls)
    assert autotree.choose_tree(target, 1) == first and len(calls) == n
    autotree.choose_tree(target, 3)
    assert len(calls) == 2 * n
    autotree.choose_tree(target, 1, accept_rate=0.4)  # another rate: a new choice from the same timings
    assert len(calls) == 2 * n


def test_probe_times_every_width_once_per_round_and_keeps_the_quickest(monkeypatch):
    """A busy spell over calls 6-9: timing each width in turn (its warm-up, then its 4 timed calls)
    would give it all of width 2's samples; interleaved, alternating the order, every width keeps a
    quiet one."""
    from types import SimpleNamespace

    clock = {"now": 0.0, "calls": 0}
    monkeypatch.setattr(autotree, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    order = []

    def call(width):
        def run():
            order.append(width)
            busy = 6 <= clock["calls"] < 10
            clock["now"] += width * (10.0 if busy else 1.0)
            clock["calls"] += 1

        return run

    rounds = 4
    best = autotree._interleaved_best({w: call(w) for w in (1, 2, 3)}, torch.device("cpu"), rounds, math.inf)
    assert order == [1, 2, 3] + [1, 2, 3, 3, 2, 1] * (rounds // 2)
    assert best == {1: 1.0, 2: 2.0, 3: 3.0}


def test_a_probe_of_slow_forwards_runs_the_rounds_its_time_budget_holds(monkeypatch):
    """The untimed warm-up round (here 6 s of fake time) sets how many timed rounds fit in the budget:
    a big model's first dynamic-tree call timed 5 rounds of forwards that take ~1 s each on a CPU."""
    from types import SimpleNamespace

    clock = {"now": 0.0}
    monkeypatch.setattr(autotree, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    order = []

    def call(width):
        return lambda: order.append(width) or clock.__setitem__("now", clock["now"] + width)

    calls = {w: call(w) for w in (1, 2, 3)}
    for budget, timed_rounds in ((13.0, 2), (5.0, 1), (1000.0, 5)):
        order.clear()
        best = autotree._interleaved_best(calls, torch.device("cpu"), 5, budget)
        assert len(order) == 3 * (1 + timed_rounds) and best == {1: 1.0, 2: 2.0, 3: 3.0}


def test_lower_envelope_takes_a_narrower_width_as_no_slower_than_a_wider_one():
    assert autotree.lower_envelope({8: 2.0, 4: 1.0, 6: 3.0, 12: 2.5}) == {4: 1.0, 6: 2.0, 8: 2.0, 12: 2.5}
    rising = {1: 0.1, 2: 0.2, 5: 0.7}
    assert autotree.lower_envelope(rising) == rising


def test_real_probe_times_every_width_and_level_in_one_cache(tiny_checkpoints):
    from eagle.models import load_draft

    target = load_target(str(tiny_checkpoints.target), dtype=torch.float32)
    head = load_draft(str(tiny_checkpoints.eagle2), target, dtype=torch.float32)
    verify = autotree.time_verify(target, 2, (4, 6, 8), rounds=2)
    level = autotree.time_draft_levels(head, 2, (2, 3), rounds=2)
    assert list(verify) == [4, 6, 8] and list(level) == [2, 3]
    assert all(0 < v < 10 for v in [*verify.values(), *level.values()])


@pytest.mark.parametrize("depth, width", [(1, 2), (3, 4), (3, 12), (5, 6), (6, 60)])
@pytest.mark.parametrize("rate", [0.1, 0.45, 0.66, 0.9])
def test_fit_accept_rate_inverts_the_acceptance_model(depth, width, rate):
    tau = autotree.expected_tau(depth, width, rate)
    assert autotree.fit_accept_rate(depth, width, tau) == pytest.approx(rate, abs=1e-6)


def test_fit_accept_rate_clamps_and_refuses_nonsense():
    assert autotree.fit_accept_rate(3, 12, 0.5) == autotree.MIN_ACCEPT_RATE  # below a's lowest model tau
    assert autotree.fit_accept_rate(3, 4, 100.0) == autotree.MAX_ACCEPT_RATE
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau must be a positive number"):
            autotree.fit_accept_rate(3, 4, bad)


def test_a_lower_acceptance_picks_a_smaller_tree(monkeypatch):
    # A CPU-like cost: verifying grows with the width, each draft level costs a tenth of a forward.
    monkeypatch.setattr(autotree, "time_verify", lambda t, b, widths: {w: 1.0 + 0.05 * w for w in widths})
    monkeypatch.setattr(autotree, "_TIMINGS", {})
    target = type("T", (), {"device": torch.device("cpu")})()
    trees = [autotree.choose_tree(target, 1, accept_rate=a) for a in (0.9, 0.66, 0.3)]
    sizes = [(t.depth, t.total_tokens) for t in trees]
    assert sizes[0] >= sizes[1] >= sizes[2] and sizes[0] != sizes[2], sizes
    with pytest.raises(ValueError, match="accept_rate must be in"):
        autotree.choose_tree(target, 1, accept_rate=1.5)


@pytest.mark.parametrize("depth", [3, 5])
@pytest.mark.parametrize("rate", [0.35, 0.75])
def test_widening_gains_less_with_each_doubling(depth, rate):
    """A chain's tau is the geometric sum exactly; widening it gains WIDENING_GAIN * sqrt(doublings),
    so each doubling of the width adds less than the one before (measured on the bundled pair:
    bench/bench_accept_model.py; a fixed gain per doubling overrated wide trees)."""
    chain = sum(rate**i for i in range(depth + 1))
    assert autotree.expected_tau(depth, depth + 1, rate) == pytest.approx(chain, rel=1e-12)
    taus = [autotree.expected_tau(depth, (depth + 1) * 2**k, rate) for k in range(5)]
    gains = [b - a for a, b in zip(taus, taus[1:])]
    assert all(g > 0 for g in gains) and all(b < a for a, b in zip(gains, gains[1:])), gains
    four = autotree.expected_tau(depth, 4 * (depth + 1), rate)
    assert four == pytest.approx(chain * (1 + autotree.WIDENING_GAIN * 2**0.5), rel=1e-12)


def test_timings_of_a_freed_model_are_not_reused_by_a_new_one_at_its_address(monkeypatch):
    """The cache is keyed by id(): a model created after another was freed may get the same id."""
    monkeypatch.setattr(autotree, "_TIMINGS", {})
    cost = {"per_width": 0.2}
    monkeypatch.setattr(
        autotree, "time_verify", lambda t, b, widths: {w: 1.0 + cost["per_width"] * w for w in widths}
    )
    Target = type("T", (), {"device": torch.device("cpu")})
    old = Target()
    small = autotree.choose_tree(old, 1)
    key = next(iter(autotree._TIMINGS))
    del old
    new = Target()
    # what an address reuse looks like: the new model's key equals the freed one's
    autotree._TIMINGS[(id(new), *key[1:])] = autotree._TIMINGS.pop(key)
    cost["per_width"] = 0.0  # the new model's verify cost is flat: the biggest tree wins
    assert autotree.choose_tree(new, 1).total_tokens == max(autotree.WIDTHS["cpu"]) > small.total_tokens


# --------------------------------------------------------------------------------------------------
# The timings on disk
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def disk_cache(tmp_path, monkeypatch):
    """The probe's timings cached in a file of tmp_path, the in-process cache empty, and a counter of
    the target's verify probes."""
    path = tmp_path / "timings.json"
    monkeypatch.setenv(autotree.CACHE_ENV, str(path))
    monkeypatch.setattr(autotree, "_TIMINGS", {})
    probes = []
    real = autotree.time_verify
    monkeypatch.setattr(autotree, "time_verify", lambda *a, **k: probes.append(a[1]) or real(*a, **k))
    return path, probes


def _a_new_process(monkeypatch):
    monkeypatch.setattr(autotree, "_TIMINGS", {})  # what another process starts with


def test_a_second_process_takes_the_saved_timings_and_the_same_tree(
    tiny_checkpoints, disk_cache, monkeypatch
):
    path, probes = disk_cache
    target = load_target(str(tiny_checkpoints.target), dtype=torch.float32)
    head = load_draft(str(tiny_checkpoints.eagle2), target, dtype=torch.float32)
    first = autotree.choose_tree(target, 1, head)
    assert probes == [1] and path.exists()
    saved = autotree._TIMINGS.copy()
    _a_new_process(monkeypatch)
    assert autotree.choose_tree(target, 1, head) == first and probes == [1]
    assert [v[2:] for v in autotree._TIMINGS.values()] == [v[2:] for v in saved.values()]  # the same numbers
    autotree.choose_tree(target, 2, head)  # another batch size: timed and added
    assert probes == [1, 2]
    assert len(json.loads(path.read_text())["entries"]) == 2


@pytest.mark.parametrize(
    "change",
    ["threads", "switch", "dtype", "head", "expired", "source"],
)
def test_what_moves_the_timings_is_timed_again(tiny_checkpoints, disk_cache, monkeypatch, change):
    path, probes = disk_cache
    target = load_target(str(tiny_checkpoints.target), dtype=torch.float32)
    head = load_draft(str(tiny_checkpoints.eagle2), target, dtype=torch.float32)
    autotree.choose_tree(target, 1, head)
    before = len(probes)
    _a_new_process(monkeypatch)
    if change == "threads":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    elif change == "switch":
        monkeypatch.setenv("EAGLE_CPU_AMX_PV", "0")
    elif change == "dtype":
        target = load_target(str(tiny_checkpoints.target), dtype=torch.bfloat16)
        head = load_draft(str(tiny_checkpoints.eagle2), target, dtype=torch.bfloat16)
    elif change == "head":
        head = None
    elif change == "source":  # edited code or a rebuilt extension
        monkeypatch.setattr(autotree, "_source_stamp", lambda: "another build")
    else:
        monkeypatch.setattr(autotree, "CACHE_MAX_AGE_S", -1.0)
    autotree.choose_tree(target, 1, head)
    assert len(probes) > before, change


def test_other_eagle_variables_are_not_part_of_the_key(tiny_checkpoints, disk_cache, monkeypatch):
    """`make run` passes its prompt as EAGLE_RUN_PROMPT: each prompt was a new key (a new probe) and its
    text was written to the file."""
    path, probes = disk_cache
    target = load_target(str(tiny_checkpoints.target), dtype=torch.float32)
    monkeypatch.setenv("EAGLE_RUN_PROMPT", "my secret prompt")
    autotree.choose_tree(target, 1)
    before = len(probes)
    _a_new_process(monkeypatch)
    monkeypatch.setenv("EAGLE_RUN_PROMPT", "another prompt")
    monkeypatch.setenv("EAGLE_TEST_THREADS", "3")
    autotree.choose_tree(target, 1)
    assert len(probes) == before
    assert "secret" not in path.read_text()


def test_a_malformed_cache_of_this_format_is_timed_over_and_rewritten(tiny_checkpoints, disk_cache):
    path, probes = disk_cache
    path.write_text('{"format": 1, "entries": []}')
    target = load_target(str(tiny_checkpoints.target), dtype=torch.float32)
    autotree.choose_tree(target, 1)
    assert probes == [1, 1]  # (without a head a draft level is costed from a 1-token verify)
    assert len(json.loads(path.read_text())["entries"]) == 1


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "entries": {}}', "some notes of mine\n"])
def test_a_file_that_is_not_this_formats_cache_is_left_alone(tiny_checkpoints, disk_cache, content):
    """Another program's file (a path set by mistake) or a newer version's cache is not overwritten."""
    path, probes = disk_cache
    path.write_text(content)
    target = load_target(str(tiny_checkpoints.target), dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="is not a timing cache of this version; it is left alone"):
        autotree.choose_tree(target, 1)
    assert probes == [1, 1] and path.read_text() == content


def test_implausible_saved_numbers_are_not_used(tiny_checkpoints, disk_cache, monkeypatch):
    path, probes = disk_cache
    target = load_target(str(tiny_checkpoints.target), dtype=torch.float32)
    autotree.choose_tree(target, 1)
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    entry["verify"]["4"] = -1.0
    path.write_text(json.dumps(data))
    _a_new_process(monkeypatch)
    autotree.choose_tree(target, 1)
    assert len(probes) == 4  # timed again


def test_an_unwritable_cache_warns_and_decoding_goes_on(tiny_checkpoints, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(autotree.CACHE_ENV, str(blocker / "timings.json"))  # its parent is a file
    monkeypatch.setattr(autotree, "_TIMINGS", {})
    target = load_target(str(tiny_checkpoints.target), dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="could not save the dynamic tree's timings"):
        tree = autotree.choose_tree(target, 1)
    assert tree.total_tokens >= 1


@pytest.mark.parametrize("value", ["0", "off", "false", "no", "none", "Disable"])
def test_the_cache_can_be_turned_off(value, monkeypatch, tmp_path):
    monkeypatch.setenv(autotree.CACHE_ENV, value)
    assert autotree.timing_cache_path() is None
    monkeypatch.setenv(autotree.CACHE_ENV, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotree.timing_cache_path() == tmp_path / "eagle" / "autotree_timings.json"


def test_no_home_directory_means_no_cache_not_an_error(monkeypatch):
    """HOME unset under a uid without a passwd entry (a container): Path.home() raises, and generation
    failed with it although the cache is only a saving."""
    monkeypatch.delenv(autotree.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(autotree.Path, "home", staticmethod(no_home))
    assert autotree.timing_cache_path() is None


def test_the_saved_file_is_readable_by_others(tiny_checkpoints, disk_cache):
    path, _ = disk_cache
    autotree.choose_tree(load_target(str(tiny_checkpoints.target), dtype=torch.float32), 1)
    assert path.stat().st_mode & 0o777 == 0o644


def test_two_saves_at_once_keep_both_entries(tmp_path, monkeypatch):
    """Two processes (here threads: flock excludes separate opens of the lock file) saving at once: the
    first one's read-modify-write holds the lock, so the second reads the file with the first's entry
    and keeps it. Without the lock the second's write from its stale read lost the first's entry."""
    import threading

    path = tmp_path / "timings.json"
    first_read = threading.Event()
    real_read = autotree._read_entries

    def slow_first_read(p):
        entries = real_read(p)
        if not first_read.is_set():
            first_read.set()
            time.sleep(0.3)  # the other save starts while this one is between its read and its write
        return entries

    monkeypatch.setattr(autotree, "_read_entries", slow_first_read)
    key = {"host": "h", "batch": 1}
    first = threading.Thread(target=autotree._save_timings, args=(path, key, {1: 1.0}, {1: 2.0}))
    first.start()
    assert first_read.wait(5)
    autotree._save_timings(path, {**key, "batch": 2}, {1: 3.0}, {1: 4.0})
    first.join()
    entries = json.loads(path.read_text())["entries"]
    assert sorted(e["key"]["batch"] for e in entries.values()) == [1, 2]
    assert (tmp_path / "timings.json.lock").exists()


def test_a_lock_held_too_long_warns_and_the_save_goes_on(tmp_path, monkeypatch):
    """A process that holds the lock and never lets go (stopped): the save waits LOCK_WAIT_S, says so,
    and writes unlocked (found in review: it waited 10 s in silence)."""
    import fcntl

    path = tmp_path / "timings.json"
    holder = os.open(tmp_path / "timings.json.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(holder, fcntl.LOCK_EX)
    monkeypatch.setattr(autotree, "LOCK_WAIT_S", 0.2)
    try:
        with pytest.warns(RuntimeWarning, match=r"has held .*timings.json.lock for 0 s"):
            autotree._save_timings(path, {"host": "h"}, {1: 1.0}, {1: 2.0})
    finally:
        os.close(holder)
    assert len(json.loads(path.read_text())["entries"]) == 1
