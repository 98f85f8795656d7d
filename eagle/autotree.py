"""Pick the dynamic tree's shape for this model pair, device and batch size from measured times.

A bigger tree raises tau (tokens per target forward) with diminishing returns, while every draft
level and the verify forward cost time: on a GPU the verify forward is flat until the device
saturates; on a CPU it grows with the width (small GEMMs are compute-bound there) and each draft level
costs a fixed overhead. EAGLE's reference code times target forwards of a few widths and divides each
time by a fixed gain. We time the target's verify forward at several widths ``W`` and, when the head
is given, one draft level at the expansion widths we may use, then pick the (depth, width) that
minimises

    (t_verify(W) + depth * t_level(k) + t_update) / tau(depth, W)

with the expected acceptance model ``tau(d, W) = chain(d) * (1 + WIDENING_GAIN * sqrt(log2(W / (d + 1))))``:
``chain(d) = 1 + a + ... + a^d`` is a chain's expected accepted length with per-token acceptance
``a``, and widening the tree beyond a chain's ``d + 1`` tokens adds a share that grows with the
square root of the doublings: each doubling gains less than the one before (the candidates it adds
are the draft's less likely ones). Measured on the tiny-code pair (``bench/bench_accept_model.py``,
``bench/results/accept_model_tiny-code.json``: chains of depth 3 and 5, trees of 8-60 tokens, T = 0
and 1) this fits tau within 3.4% rms at T = 0 (6.6% at T = 1) with one gain, where a fixed gain
per doubling (this module's model before) fits within 5.3% (8.3%) at best and, with the 0.15 it
used, overrated wide trees by up to 24% (depth 3, 60 tokens; at T = 0). ``a`` starts
at ``ACCEPT_RATE`` (trained EAGLE heads at T = 0); :class:`eagle.api.EagleModel` refits it from the
tau its runs measure (:func:`fit_accept_rate`), per sampling setting, since a pair's acceptance
(and a sampled run's, far lower) is not known in advance. The timings are cached per (model, head,
device, batch); the choice is recomputed from them for each acceptance rate.

The timings also persist across processes, in a JSON file (:func:`timing_cache_path`; default
``~/.cache/eagle/autotree_timings.json``, ``EAGLE_AUTOTREE_CACHE=0`` turns it off, a path moves it),
keyed by everything that moves them: the host and its CPU or GPU, intra-op threads, the batch, the
models' classes, configurations, dtypes and sizes, the torch and Triton versions, the size and time of
every source and extension file of both packages (edited code is a new key) and the switches that move
the kernels (``EAGLE_KERNELS_*``, ``EAGLE_CPU_*``, ``EAGLE_DEBUG``, ...; not a prompt or a build
option). An entry older than :data:`CACHE_MAX_AGE_S` is probed again. A file that is not such a cache
(another program's, a newer version's) is left alone, with a warning. So only a machine's first process pays the probe (the bundled pair's first call on a CPU core took
0.22 s with it and 0.03 s after it, ad hoc; a bigger model's up to the probe's 2 s budget), and the dynamic tree, with
the draws of a seeded sampled call, repeats from one process to the next on that machine.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import socket
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from eagle.models.cuda_graph import synchronize_stream
from eagle.tree import TreeConfig

WIDTHS = {"cpu": (4, 5, 6, 8, 12, 16, 24, 32), "cuda": (8, 16, 24, 32, 48, 64)}
# Depths 1-2 were tried as candidates (session 18) for the low acceptance of sampled runs: on a Zen 4
# core with the bundled pair they won there (2/2/5 ~15% faster than 3/2/5 at T = 1, though both lost
# to plain decoding) but were also chosen at T = 0, where 3/2/5 is 5-8% faster than 2/2/5 (one process,
# alternating); a draft level timed through the Python module costs more than in the C++ round, which
# tips the choice to shallow trees. Left out until draft levels are timed as the round runs them.
DEPTHS = (3, 4, 5, 6)
# tau / chain - 1 = WIDENING_GAIN * sqrt(log2(W / (d + 1))): the tiny-code pair fits 0.168 at T = 0 and
# 0.25 at T = 1 (bench/results/accept_model_tiny-code.json)
WIDENING_GAIN = 0.17
ACCEPT_RATE = 0.75  # per-token acceptance of trained EAGLE heads (EAGLE paper: alpha ~0.7-0.8)
PREFIX = 128
ROUNDS = 5  # timed rounds of the probe, each calling every candidate width once
# Fewer timed rounds where ROUNDS would take longer than this many seconds (estimated from the probe's
# untimed warm-up round; at least one): a 1B-parameter model's forwards on a CPU take 0.1-1 s each,
# and 5 rounds of 8 widths made its first dynamic-tree call wait ~10 s before decoding
PROBE_BUDGET_S = 2.0
# (id(target), id(head), device, batch, fraction) -> (weakrefs to the target and head, verify and level
# timings); the weakrefs tell a model apart from a later one that got the same id after the first was freed
_TIMINGS: dict[tuple, tuple[weakref.ref, weakref.ref | None, dict[int, float], dict[int, float]]] = {}

CACHE_ENV = "EAGLE_AUTOTREE_CACHE"
CACHE_MAX_AGE_S = 7 * 24 * 3600  # a week: a machine's load, driver or firmware may have moved since
CACHE_MAX_ENTRIES = 64  # the most recently saved are kept
CACHE_FORMAT = 1


def tree_for_width(width: int) -> TreeConfig:
    """A depth-6 dynamic tree verifying ``width`` tokens, expansion width about width / 6 (2..10)."""
    return tree_for(6, width)


def tree_for(depth: int, width: int) -> TreeConfig:
    """A dynamic tree of ``depth`` levels verifying ``width`` tokens (a chain when ``width == depth + 1``).

    Expansion width ``k = round(width / depth)`` (2..10), so that the rerank has about one level's worth of
    candidates per verified token to choose from."""
    if width <= depth + 1:
        return TreeConfig.chain(depth)
    topk = max(2, min(10, round(width / depth)))
    most = 1 + topk + (depth - 1) * topk * topk
    return TreeConfig(depth=depth, topk=topk, total_tokens=min(width, most))


def widening_share(depth: int, width: int) -> float:
    """``sqrt(log2(W / (d + 1)))``: the factor of the widening gain in :func:`expected_tau` (0 for a chain)."""
    return math.sqrt(math.log2(max(width, depth + 1) / (depth + 1)))


def expected_tau(
    depth: int, width: int, accept_rate: float = ACCEPT_RATE, gain: float = WIDENING_GAIN
) -> float:
    """The acceptance model of the module docstring (``gain``: the pair's widening gain, when measured:
    :mod:`eagle.acceptance`)."""
    chain = sum(accept_rate**i for i in range(depth + 1))
    return chain * (1.0 + gain * widening_share(depth, width))


MIN_ACCEPT_RATE, MAX_ACCEPT_RATE = 0.02, 0.98


def fit_accept_rate(depth: int, width: int, tau: float, gain: float = WIDENING_GAIN) -> float:
    """The per-token acceptance ``a`` for which :func:`expected_tau` of a tree of ``depth`` levels and
    ``width`` tokens (widening gain ``gain``) is ``tau`` (a measured tokens-per-forward), clamped to
    [0.02, 0.98]; the model is increasing in ``a``, so bisection finds it."""
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive number, got {tau}")
    lo, hi = MIN_ACCEPT_RATE, MAX_ACCEPT_RATE
    if expected_tau(depth, width, lo, gain) >= tau:
        return lo
    if expected_tau(depth, width, hi, gain) <= tau:
        return hi
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if expected_tau(depth, width, mid, gain) < tau:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _sync(device: torch.device) -> None:
    synchronize_stream(device)  # (this thread's stream: the device may be capturing for another)


def _interleaved_best(
    calls: dict[int, Callable[[], object]],
    device: torch.device,
    rounds: int = ROUNDS,
    budget_s: float = PROBE_BUDGET_S,
) -> dict[int, float]:
    """The quickest of ``rounds`` timed calls of each of ``calls`` (key -> zero-argument function),
    after one untimed warm-up round; each round calls every function once, in turn, in the keys' order
    on even rounds and the reverse on odd ones (so that no key always follows the same one). Fewer
    rounds (at least one) where ``rounds`` warm-up rounds would take over ``budget_s`` seconds.

    Timed one after another (best of 3 each, the probe before session 20), the first candidate of
    each kind ran slow on a quiet machine: the 1-row draft level 11-14% above the 2-row one and the
    4-token verify 8-14% above the 6-token one (medians of 12 processes, two runs), where interleaved
    the 1-row level is 10% below and the 4-token verify 4% below; that told against chains and the
    narrowest trees, and a busy spell could take all of one candidate's samples. Interleaved,
    neither happens. What this does not fix: the machine's speed, and the verify's against a draft
    level's, drifts over seconds on a shared 2-core machine, so the tree still differs from one
    process to the next there about as often as before (near-ties under the acceptance model;
    ``bench/results/autotree_stability_cpu_bfloat16*.json``).
    """
    _sync(device)
    started = time.perf_counter()
    for fn in calls.values():
        fn()
    _sync(device)
    warm_up = time.perf_counter() - started
    if warm_up * rounds > budget_s:
        rounds = max(1, int(budget_s / warm_up))
    best = dict.fromkeys(calls, math.inf)
    order = list(calls)
    for r in range(rounds):
        for key in order if r % 2 == 0 else order[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            calls[key]()
            _sync(device)
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def lower_envelope(times: dict[int, float]) -> dict[int, float]:
    """``t(n) = min over n' >= n of times[n']``: a call over ``n`` rows or candidates taken as no
    slower than one over more. This assumes the cost does not fall as the width grows, which held on
    the CPUs measured (there a narrower width timed slower than a wider one was timed in a busy
    moment: noise only adds time); a GPU's kernel choice may break it, so the probe applies it on CPU
    only."""
    out, floor = {}, math.inf
    for n in sorted(times, reverse=True):
        floor = min(floor, times[n])
        out[n] = floor
    return {n: out[n] for n in sorted(out)}


def _smoothed(times: dict[int, float], device: torch.device) -> dict[int, float]:
    return lower_envelope(times) if device.type == "cpu" else times


def _verify_call(target, cache, batch_size: int, width: int):
    """A zero-argument function running the target's verify forward over ``width`` tree tokens per
    sequence after a ``PREFIX``-token committed prefix, in ``cache`` (not advanced: every call writes
    the same positions)."""
    device = target.device
    ids = torch.zeros(batch_size, width, dtype=torch.int64, device=device)
    mask = torch.ones(width, width, dtype=torch.bool, device=device).tril().expand(batch_size, width, width)
    positions = cache.seqlens.long()[:, None] + torch.arange(width, device=device)
    return lambda: target(ids, cache, positions=positions, tree_mask=mask, compute_logits=True)


def _draft_level_call(head, cache, batch_size: int, rows: int):
    """A zero-argument function running one draft level over ``rows`` tree rows per sequence: head
    forward, log-softmax, top-k."""
    device = head.device
    hidden = torch.zeros(batch_size, rows, head.config.hidden_size, dtype=head.dtype, device=device)
    ids = torch.zeros(batch_size, rows, dtype=torch.int64, device=device)
    mask = torch.eye(rows, dtype=torch.bool, device=device).expand(batch_size, rows, rows)
    positions = cache.seqlens.long()[:, None].expand(batch_size, rows)
    index = torch.arange(rows, device=device).expand(batch_size, rows)

    def level():
        out = head(hidden, ids, cache, positions=positions, tree_mask=mask, logits_index=index)
        torch.log_softmax(out.logits.float(), dim=-1).topk(min(rows, out.logits.shape[-1]), dim=-1)

    return level


def _prefixed_cache(model, batch_size: int, rows: int):
    """A cache of ``model`` whose ``batch_size`` sequences hold ``PREFIX`` committed positions, with
    room for ``rows`` more (the widest call timed in it; + 1 spare, as a round's cache keeps)."""
    cache = model.new_cache(batch_size, PREFIX + rows + 1, attended_len=0)  # timed, never emitted
    cache.advance(PREFIX)
    return cache


@torch.inference_mode()
def time_verify(
    target, batch_size: int, widths, rounds: int = ROUNDS, *, raw: bool = False
) -> dict[int, float]:
    """Seconds of the target's verify forward at each of ``widths`` tree tokens per sequence
    (interleaved best of ``rounds``; on CPU then :func:`lower_envelope`, unless ``raw``)."""
    cache = _prefixed_cache(target, batch_size, max(widths))
    calls = {w: _verify_call(target, cache, batch_size, w) for w in sorted(widths)}
    best = _interleaved_best(calls, target.device, rounds)
    return best if raw else _smoothed(best, target.device)


@torch.inference_mode()
def time_draft_levels(
    head, batch_size: int, rows, rounds: int = ROUNDS, *, raw: bool = False
) -> dict[int, float]:
    """Seconds of one draft level at each of ``rows`` expansion widths (as :func:`time_verify`)."""
    cache = _prefixed_cache(head, batch_size, max(rows))
    calls = {k: _draft_level_call(head, cache, batch_size, k) for k in sorted(rows)}
    best = _interleaved_best(calls, head.device, rounds)
    return best if raw else _smoothed(best, head.device)


def choose_tree(
    target,
    batch_size: int,
    head=None,
    draft_cost_fraction: float = 0.1,
    accept_rate: float = ACCEPT_RATE,
    gain: float = WIDENING_GAIN,
) -> TreeConfig:
    """The dynamic tree for ``target`` (and ``head``) at ``batch_size``, from timed forwards (timed
    once per model, head, device and batch size) and the acceptance model at ``accept_rate`` and
    widening ``gain``.

    Without ``head`` a draft level is assumed to cost ``draft_cost_fraction`` of a one-token target
    forward.
    """
    if not MIN_ACCEPT_RATE <= accept_rate <= MAX_ACCEPT_RATE:
        raise ValueError(f"accept_rate must be in [{MIN_ACCEPT_RATE}, {MAX_ACCEPT_RATE}], got {accept_rate}")
    verify, level = _timings(target, batch_size, head, draft_cost_fraction)
    return choose_from_timings(verify, level, accept_rate, gain)


def choose_from_timings(
    verify: dict[int, float],
    level: dict[int, float],
    accept_rate: float = ACCEPT_RATE,
    gain: float = WIDENING_GAIN,
) -> TreeConfig:
    """The (depth, width) tree minimising the module docstring's cost per expected token, from
    ``verify`` (seconds per verify width) and ``level`` (seconds of a draft level per expansion width;
    it must hold every ``tree_for(d, w).topk`` of the candidates)."""
    candidates = {(d, w): tree_for(d, w) for d in DEPTHS for w in verify if w >= d + 1}

    def cost_per_token(dw: tuple[int, int]) -> float:
        d, w = dw
        tree = candidates[dw]
        # depth levels of k rows, plus the draft update over up to d + 1 accepted rows (~ one level)
        draft = (d + 1) * level[tree.topk]
        return (verify[w] + draft) / expected_tau(d, tree.total_tokens, accept_rate, gain)

    return candidates[min(candidates, key=cost_per_token)]


def level_rows(widths) -> set[int]:
    """The expansion widths of every candidate tree over ``widths``."""
    return {tree_for(d, w).topk for d in DEPTHS for w in widths if w >= d + 1}


def _timings(target, batch_size: int, head, draft_cost_fraction: float):
    """``(verify seconds per width, draft level seconds per expansion width)``, cached in memory and on
    disk (:func:`timing_cache_path`)."""
    device = target.device
    key = (id(target), id(head), str(device), batch_size, None if head is not None else draft_cost_fraction)
    hit = _TIMINGS.get(key)
    if hit is not None and hit[0]() is target and (hit[1] is None or hit[1]() is head):
        return hit[2], hit[3]
    widths = WIDTHS.get(device.type, WIDTHS["cuda"])
    rows = level_rows(widths)
    path = timing_cache_path()
    fingerprint = _fingerprint(target, batch_size, head, draft_cost_fraction) if path is not None else None
    saved = _load_timings(path, fingerprint, widths, rows) if path is not None else None
    if saved is not None:
        verify, level = saved
    else:
        verify = time_verify(target, batch_size, widths)
        if head is not None:
            level = time_draft_levels(head, batch_size, rows)
        else:
            one = time_verify(target, batch_size, [1])[1]
            level = {k: draft_cost_fraction * one for k in rows}
        if path is not None:
            _save_timings(path, fingerprint, verify, level)
    for stale in [k for k, v in _TIMINGS.items() if v[0]() is None or (v[1] is not None and v[1]() is None)]:
        del _TIMINGS[stale]
    _TIMINGS[key] = (weakref.ref(target), None if head is None else weakref.ref(head), verify, level)
    return verify, level


# --------------------------------------------------------------------------------------------------
# The timings on disk
# --------------------------------------------------------------------------------------------------
def timing_cache_path() -> Path | None:
    """The file the probe's timings persist in, or None when ``EAGLE_AUTOTREE_CACHE`` is ``0`` (or
    ``off`` / ``false`` / ``no`` / ``none`` / ``disable``), or when no home directory can be found.
    Another value is the file's path; unset (or ``1``), the default
    ``$XDG_CACHE_HOME/eagle/autotree_timings.json`` (``~/.cache/...`` without ``XDG_CACHE_HOME``)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in _OFF:
        return None
    try:
        if value and value.lower() not in ("1", "on", "true", "yes"):
            return Path(value).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    except RuntimeError:  # no HOME and no passwd entry (a container's arbitrary uid): no cache
        return None
    return Path(base) / "eagle" / "autotree_timings.json"


_OFF = ("0", "off", "false", "no", "none", "disable", "disabled")
# The environment switches that can move the timed forwards (the kernels' and the CPU paths'); other
# EAGLE_* variables (a prompt, build options, test settings) are not part of the key.
_SPEED_SWITCH_PREFIXES = ("EAGLE_KERNELS_", "EAGLE_CPU_")
_SPEED_SWITCHES = ("EAGLE_DEBUG", "EAGLE_VERIFY_TREE_GREEDY_MAX_N")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{device.type} {models[0] if models else ''}".strip()
    except OSError:
        import platform

        return f"{device.type} {platform.processor()}".strip()


def _model_fingerprint(model) -> dict:
    """What of a model moves its forwards' times: class, architecture, dtype, device and size."""
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": repr(getattr(model, "config", None)),
        "draft_vocab_size": getattr(model, "draft_vocab_size", None),
        "dtype": str(getattr(model, "dtype", None)),
        "device": str(model.device),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


@functools.lru_cache(maxsize=1)
def _source_stamp() -> str:
    """A digest of the size and modification time of every source and extension file of ``eagle`` and
    ``eagle_kernels`` (their versions do not move between commits): edited code or a rebuilt extension
    is a new key. Once per process."""
    import eagle_kernels

    digest = hashlib.sha256()
    for package in (Path(__file__).parent, Path(eagle_kernels.__file__).parent):
        for path in sorted(package.rglob("*")):
            if path.suffix in (".py", ".so", ".pyd"):
                stat = path.stat()
                digest.update(
                    f"{path.relative_to(package.parent)}:{stat.st_size}:{stat.st_mtime_ns};".encode()
                )
    return digest.hexdigest()[:32]


def _fingerprint(target, batch_size: int, head, draft_cost_fraction: float) -> dict:
    """Everything the probe's timings depend on, as JSON-able values (the disk cache's key)."""
    import eagle_kernels

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = target.device
    return {
        "format": CACHE_FORMAT,
        "host": socket.gethostname(),
        "device": _device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch": batch_size,
        "target": _model_fingerprint(target),
        "head": None if head is None else _model_fingerprint(head),
        "draft_cost_fraction": None if head is not None else draft_cost_fraction,
        "probe": {
            "widths": list(WIDTHS.get(device.type, WIDTHS["cuda"])),
            "rounds": ROUNDS,
            "prefix": PREFIX,
        },
        "versions": {
            "eagle_kernels": eagle_kernels.__version__,
            "torch": torch.__version__,
            "triton": triton_version,
            "source": _source_stamp(),
        },
        "env": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(_SPEED_SWITCH_PREFIXES) or k in _SPEED_SWITCHES
        },
    }


def _digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _read_entries(path: Path) -> dict | None:
    """The file's entries (digest -> entry): none for an absent, unreadable or empty file, or one of
    this format whose entries are malformed; None for a file that is not this format's (another
    program's, a newer version's, or not JSON), which is then left alone."""
    try:
        text = path.read_text()
    except OSError:  # absent, or unreadable: the write will tell
        return {}
    except UnicodeDecodeError:
        return None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return None
    return data["entries"] if isinstance(data.get("entries"), dict) else {}


def _seconds(raw, keys) -> dict[int, float] | None:
    """``{int(k): seconds}`` for exactly ``keys``, each finite and positive, else None."""
    if not isinstance(raw, dict):
        return None
    try:
        out = {int(k): float(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        return None
    if set(out) != set(keys) or not all(math.isfinite(v) and v > 0 for v in out.values()):
        return None
    return out


def _load_timings(
    path: Path, fingerprint: dict, widths, rows
) -> tuple[dict[int, float], dict[int, float]] | None:
    """The saved ``(verify, level)`` timings of ``fingerprint``, if saved within the age limit."""
    entry = (_read_entries(path) or {}).get(_digest(fingerprint))
    if not isinstance(entry, dict) or entry.get("key") != fingerprint:
        return None
    saved = entry.get("saved")
    if not isinstance(saved, (int, float)) or not 0 <= time.time() - saved <= CACHE_MAX_AGE_S:
        return None
    verify, level = _seconds(entry.get("verify"), widths), _seconds(entry.get("level"), rows)
    if verify is None or level is None:
        return None
    return verify, level


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an advisory lock on ``<path>.lock`` (``flock``, POSIX) while the block runs, so that two
    processes saving at once do not both read the old file and each write it without the other's
    entry. Best effort: where locking is unavailable (no ``fcntl``, a read-only directory, a file
    system without flock) or another process holds the lock past :data:`LOCK_WAIT_S`, the block runs
    unlocked, and the worst case is that entry lost (a later process probes again). The lock file
    stays (removing it would race with a process opening it)."""
    fd = None
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:  # another user's lock file (0644): flock needs no write access locally
            fd = os.open(lock, os.O_RDONLY)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    warnings.warn(
                        f"eagle: another process has held {lock} for {LOCK_WAIT_S:.0f} s (stopped?); the "
                        "dynamic tree's timings are saved without it",
                        RuntimeWarning,
                        stacklevel=6,
                    )
                    break
                time.sleep(0.01)
    except (ImportError, OSError):
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # (releases the lock)


LOCK_WAIT_S = 10.0  # how long a save waits for another process's save before going on unlocked


def _save_timings(path: Path, fingerprint: dict, verify: dict[int, float], level: dict[int, float]) -> None:
    """Add this probe's timings to the file (written whole to a temporary file, then renamed over it,
    so a reader never sees half of it), dropping expired entries and the oldest past
    :data:`CACHE_MAX_ENTRIES`. A file that cannot be written, or that is not a timing cache of this
    format (it is not overwritten), costs a warning, not the call. The read, merge and write hold
    :func:`_exclusive`'s lock, so processes saving at once keep each other's entries."""
    with _exclusive(path):
        _merge_and_write(path, fingerprint, verify, level)


def _merge_and_write(
    path: Path, fingerprint: dict, verify: dict[int, float], level: dict[int, float]
) -> None:
    """:func:`_save_timings`'s body: read the entries, add this one, write the file."""
    now = time.time()
    existing = _read_entries(path)
    if existing is None:
        warnings.warn(
            f"eagle: {path} is not a timing cache of this version; it is left alone and the dynamic tree's "
            f"timings are not saved (delete it, or point {CACHE_ENV} elsewhere)",
            RuntimeWarning,
            stacklevel=5,
        )
        return
    entries = {
        digest: entry
        for digest, entry in existing.items()
        if isinstance(entry, dict)
        and isinstance(entry.get("saved"), (int, float))
        and 0 <= now - entry["saved"] <= CACHE_MAX_AGE_S
    }
    entries[_digest(fingerprint)] = {
        "key": fingerprint,
        "saved": now,
        "verify": {str(k): v for k, v in verify.items()},
        "level": {str(k): v for k, v in level.items()},
    }
    newest = sorted(entries, key=lambda d: entries[d]["saved"])[-CACHE_MAX_ENTRIES:]
    payload = {"format": CACHE_FORMAT, "entries": {d: entries[d] for d in newest}}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False
        ) as f:
            tmp = f.name
            json.dump(payload, f)
        os.chmod(tmp, 0o644)  # (a temporary file is private; the cache need not be)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        warnings.warn(
            f"eagle: could not save the dynamic tree's timings to {path} ({err}); the next process will "
            f"time the models again (set {CACHE_ENV}=0 to stop trying, or a writable path)",
            RuntimeWarning,
            stacklevel=5,
        )
