"""Speculate or decode plainly, chosen between rounds from measured speed (``speculative="auto"``).

Speculation pays when a round's tokens per second beat a plain step's. It does not when acceptance is
low (sampling at T = 1 from a small pair) or when a verify forward of ``B x n`` tree rows costs far
more than a step of ``B`` rows (large batches on a compute-bound device such as a CPU). Then EAGLE is
slower than the plain decoding it is meant to accelerate.

:class:`AutoSpeculation` runs the decoding loop in phases: a few speculative rounds, or a run of plain
steps. It times each phase on the wall clock (the loop's host synchronisation included: one per
round, and per plain step or chunk of plain steps, see :meth:`AutoSpeculation.plain_forwards_ahead`)
and chooses the next phase from the latest speed of each mode:

* each mode's speed is a running ratio of tokens to seconds over its forwards, both sums decayed by
  ``decay`` per forward (about the last ``1 / (1 - decay)`` forwards count): one round's acceptance
  swings widely;
* speeds are kept per batch size class (active rows rounded up to a power of two): tokens per second
  grow with the rows, and a run's last forwards, after some rows reached their budget or EOS, run
  fewer rows; those must not be compared with forwards of the full batch;
* the policy's first ``warmup`` forwards of each mode are not timed (first calls at new shapes are slow);
* a decoder keeps its policy per batch size and sampling parameters, so that its next run goes on
  from there (:meth:`AutoSpeculation.resume`) instead of probing from scratch;
* it starts speculating; after the first ``probe_rounds`` rounds it measures ``plain_probe_steps`` plain
  steps, and measures them again after every ``recheck_rounds`` speculative rounds;
* while speculation is not slower than plain decoding by more than ``margin`` it keeps speculating,
  deciding again every ``probe_rounds`` rounds (acceptance moves with the text);
* when it is, a run of ``plain_run`` plain steps follows, then ``probe_rounds`` speculative rounds test
  it again: to win, they must beat plain decoding by ``margin`` (a band around parity, so that noise
  near it does not flip the mode back and forth);
* each probe that loses doubles the next run (``min_plain_run`` up to ``max_plain_run``), so a pair
  that never pays costs one probe per ~1000 steps once it has lost a few (a probe is not free: the
  draft catches up on every position it skipped, then the rounds run at the losing speed); the
  catch-up's time is charged to plain decoding (:meth:`AutoSpeculation.charge_plain`), whose steps
  left the positions, not to the probe's rounds, which would otherwise lose the more the longer the
  plain run before them was; each phase
  that speculation wins halves it (where the two modes are close, noisy probes win now and then). A
  change for the better (text the draft predicts well) is therefore noticed within a plain run, up to
  ``max_plain_run`` steps later.

Greedy tokens do not depend on the choice: each is the target's argmax either way (the package keeps
a verified tree row equal to the same token decoded alone). Sampled tokens are exact samples of the
target's (warped) distribution either way, but which ones are drawn depends on the choice, and so on
the machine's speed: a seeded sampled run is reproducible with ``speculative=True`` (or ``False``) and
an explicit tree, not with ``"auto"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPECULATE = "speculate"
PLAIN = "plain"


@dataclass
class _Phase:
    mode: str
    length: int  # forwards (rounds or steps) in the phase
    measuring: bool = False  # a short plain phase that only measures plain decoding's speed
    probe: bool = False  # speculative rounds after a plain run, testing speculation again
    done: int = 0


@dataclass
class AutoSpeculation:
    """Chooses speculative rounds or plain steps, phase by phase (see the module docstring).

    Use: ``mode = policy.next_mode()``, run one forward of that mode over ``rows`` sequences, then
    ``policy.record(tokens_emitted, seconds, rows)``; or, in a plain phase, up to
    ``policy.plain_forwards_ahead()`` plain steps back to back, then one ``record(..., forwards=n)``."""

    probe_rounds: int = 4
    plain_probe_steps: int = 2
    min_plain_run: int = 8
    max_plain_run: int = 1024
    recheck_rounds: int = 128
    decay: float = 0.9
    margin: float = 0.05  # speculation gives way below (1 - margin) x plain, wins back above (1 + margin) x
    warmup: int = 1  # first forwards of each mode left out of its speed (first calls of new shapes)
    # forwards of each mode so far, and how many phases switched to a plain run
    rounds: int = 0
    plain_steps: int = 0
    plain_runs: int = 0
    _phase: _Phase = field(init=False)
    _plain_run: int = field(init=False)
    _rounds_since_measure: int = field(init=False, default=0)
    _untimed: dict[str, int] = field(init=False)  # forwards of each mode still to leave untimed
    # batch size class -> mode -> decayed [tokens, seconds] sums of its forwards
    _sums: dict[int, dict[str, list[float]]] = field(init=False, default_factory=dict)
    _rows_class: int = field(init=False, default=1)  # that of the latest forward

    def __post_init__(self) -> None:
        for name in ("probe_rounds", "plain_probe_steps", "min_plain_run", "recheck_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"AutoSpeculation.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"AutoSpeculation.warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"AutoSpeculation.margin must be in [0, 1), got {self.margin}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"AutoSpeculation.decay must be in [0, 1), got {self.decay}")
        if self.max_plain_run < self.min_plain_run:
            raise ValueError(
                f"AutoSpeculation.max_plain_run ({self.max_plain_run}) must be >= min_plain_run "
                f"({self.min_plain_run})"
            )
        self._plain_run = self.min_plain_run
        self._untimed = {SPECULATE: self.warmup, PLAIN: self.warmup}
        self._phase = _Phase(SPECULATE, self.probe_rounds + self.warmup)

    def next_mode(self) -> str:
        """:data:`SPECULATE` or :data:`PLAIN` for the next forward."""
        return self._phase.mode

    def plain_forwards_ahead(self) -> int:
        """How many plain steps may run back to back from here, recorded as one batch (``record(...,
        forwards=n)``) with nothing changing the choice in between: the rest of the current plain
        phase, 1 while the first plain forwards are left untimed, 0 when the next forward is a round."""
        phase = self._phase
        if phase.mode != PLAIN:
            return 0
        if self._untimed[PLAIN]:
            return 1
        return phase.length - phase.done

    def record(self, tokens: int, seconds: float, rows: int = 1, forwards: int = 1) -> None:
        """The forward just run over ``rows`` sequences emitted ``tokens`` tokens in ``seconds``; or
        ``forwards`` plain steps run back to back did, together (up to :meth:`plain_forwards_ahead`),
        counted as that many forwards of equal share."""
        if tokens < 0 or not seconds >= 0 or rows < 1 or forwards < 1:
            raise ValueError(
                "record: tokens >= 0, seconds >= 0, rows >= 1 and forwards >= 1 needed, got "
                f"{tokens}, {seconds}, {rows}, {forwards}"
            )
        phase = self._phase
        # Several forwards at once are plain steps whatever the phase, and more of them than
        # plain_forwards_ahead() ends a plain phase: a policy shared by runs in several threads
        # (passed to each as auto=...) may have moved on meanwhile. Counted into the speculative
        # phase's sums, a long chunk would replace speculation's measured speed with plain's.
        mode = PLAIN if forwards > 1 else phase.mode
        if mode == phase.mode:
            phase.done += forwards
        if mode == SPECULATE:
            self.rounds += 1
        else:
            self.plain_steps += forwards
        self._rows_class = 1 << (rows - 1).bit_length()
        sums = self._class_sums()[mode]
        if self._untimed[mode]:
            self._untimed[mode] -= 1
        else:
            # as `forwards` records of tokens / forwards and seconds / forwards each, one after another
            decayed = self.decay**forwards
            share = sum(self.decay**i for i in range(forwards)) / forwards
            sums[0] = decayed * sums[0] + share * tokens
            sums[1] = decayed * sums[1] + share * seconds
        if phase.done >= phase.length:
            self._phase = self._after(phase)

    def charge_plain(self, seconds: float, rows: int = 1) -> None:
        """Add ``seconds`` to plain decoding's time (no tokens) at ``rows``' batch size class: the
        draft's catch-up on the positions a plain run committed, paid before the next round. It is a
        cost of decoding plainly when speculation follows; timed into the round it preceded, it made
        the probe after a long plain run look slow (the catch-up grows with the run), so auto stayed
        plain where speculation won."""
        if not seconds >= 0 or rows < 1:
            raise ValueError(f"charge_plain: seconds >= 0 and rows >= 1 needed, got {seconds}, {rows}")
        rows_class = 1 << (rows - 1).bit_length()
        sums = self._sums.get(rows_class)
        if sums is None:
            sums = self._sums[rows_class] = {SPECULATE: [0.0, 0.0], PLAIN: [0.0, 0.0]}
        sums[PLAIN][1] += seconds

    def _class_sums(self) -> dict[str, list[float]]:
        sums = self._sums.get(self._rows_class)
        if sums is None:
            sums = self._sums[self._rows_class] = {SPECULATE: [0.0, 0.0], PLAIN: [0.0, 0.0]}
        return sums

    def _speed(self, mode: str, rows_class: int | None = None) -> float | None:
        sums = self._class_sums() if rows_class is None else self._sums[rows_class]
        tokens, seconds = sums[mode]
        if seconds > 0:
            return tokens / seconds
        return float("inf") if tokens > 0 else None

    @property
    def speculate_speed(self) -> float | None:
        """Tokens per second (all rows) of speculative rounds at the latest forward's batch size class,
        recent ones weighted most; None before the first."""
        return self._speed(SPECULATE)

    @property
    def plain_speed(self) -> float | None:
        """Tokens per second (all rows) of plain steps at the latest forward's batch size class, recent
        ones weighted most; None before the first."""
        return self._speed(PLAIN)

    def _after(self, phase: _Phase) -> _Phase:
        if phase.mode == SPECULATE:
            speed = self.speculate_speed
            self._rounds_since_measure += phase.done
            if self.plain_speed is None or self._rounds_since_measure >= self.recheck_rounds:
                return _Phase(PLAIN, self.plain_probe_steps + self._untimed[PLAIN], measuring=True)
            # a hysteresis band of +-margin around parity: noise near it does not flip the mode
            bar = self.plain_speed * ((1 + self.margin) if phase.probe else (1 - self.margin))
            if speed is not None and speed < bar:
                return self._plain_run_phase()
            # halved, not reset: where the two modes are close, noisy probes win now and then
            self._plain_run = max(self.min_plain_run, self._plain_run // 2)
            return _Phase(SPECULATE, self.probe_rounds)
        self._rounds_since_measure = 0
        spec, plain = self.speculate_speed, self.plain_speed
        if phase.measuring:
            if spec is not None and plain is not None and spec < plain * (1 - self.margin):
                return self._plain_run_phase()
            return _Phase(SPECULATE, self.probe_rounds)
        return _Phase(SPECULATE, self.probe_rounds, probe=True)

    def _plain_run_phase(self) -> _Phase:
        length = self._plain_run
        self._plain_run = min(2 * self._plain_run, self.max_plain_run)
        self.plain_runs += 1
        return _Phase(PLAIN, length)

    def resume(self) -> AutoSpeculation:
        """Carry on in a new run of the same batch size and sampling: the speeds, the current phase
        and the plain-run length stay (a decoder reused across calls does not probe from scratch, and
        its forwards are warm); the counts start from zero."""
        self.rounds = self.plain_steps = self.plain_runs = 0
        return self

    def summary(self) -> dict:
        """Counts of this run, and the speeds (tokens/s) measured for the largest batch size class
        (the full batch) and for each class (``by_rows``: rows rounded up to a power of two)."""
        by_rows = {
            rows: {"speculate": self._speed(SPECULATE, rows), "plain": self._speed(PLAIN, rows)}
            for rows in sorted(self._sums)
        }
        full = by_rows[max(by_rows)] if by_rows else {"speculate": None, "plain": None}
        return {
            "rounds": self.rounds,
            "plain_steps": self.plain_steps,
            "plain_runs": self.plain_runs,
            "speculate_tokens_per_s": full["speculate"],
            "plain_tokens_per_s": full["plain"],
            "by_rows": by_rows,
        }
