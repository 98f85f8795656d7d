"""A draft head's measured acceptance with its target, stored beside the head (``acceptance.json``).

``tree="dynamic"`` sizes its tree with an acceptance model (:mod:`eagle.autotree`): a per-token
acceptance rate ``a`` and a widening gain ``g``. Without a measurement it assumes ``a = 0.75`` (trained
EAGLE heads at T = 0) and the bundled pair's ``g``; :class:`eagle.api.EagleModel` refits ``a`` from the
tau of its own runs, but only from a call's second run on, so a one-call process (``eagle generate``)
and every first sampled call chose with the greedy prior (the bundled pair accepts ~0.33 per token at
T = 1, not 0.75). :func:`measure_pair_acceptance` measures both on prompts (chains give ``a``, a tree
of the same depths gives ``g``), at T = 0 and at T = 1; ``eagle calibrate --write`` stores them in the
head's directory, and :func:`eagle.api.load` reads them as the pair's prior.

File format (JSON)::

    {"format": "eagle-acceptance/1",
     "greedy": {"accept_rate": 0.767, "gain": 0.17},
     "sampled": {"accept_rate": 0.336, "gain": 0.25, "temperature": 1.0},    # optional
     "measured": {...}}                                                        # free-form record

A sampled run at temperature ``T`` uses ``greedy + (sampled - greedy) * min(T / temperature, 1)`` of
each (acceptance falls as sampling spreads; top-k / top-p filters raise it again, which the refit of
later runs picks up).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eagle import autotree
from eagle.tree import TreeConfig

FILENAME = "acceptance.json"
FORMAT = "eagle-acceptance/1"
CHAIN_DEPTHS = (3, 5)  # chains measured for the acceptance rate; the same depths' trees for the gain
TREE_WIDTH = 16  # tokens of the measured trees (eagle.autotree.tree_for(depth, TREE_WIDTH))
MAX_GAIN = 2.0


# The sampled fit's temperature: a measurement at T = 0 would be greedy; past 100 the text is noise.
SAMPLED_TEMPERATURE_RANGE = (1e-3, 100.0)


@dataclass(frozen=True)
class AcceptanceFit:
    """``a`` and ``g`` of :func:`eagle.autotree.expected_tau` for one sampling setting."""

    accept_rate: float
    gain: float

    def __post_init__(self) -> None:
        _check_number("accept_rate", self.accept_rate, autotree.MIN_ACCEPT_RATE, autotree.MAX_ACCEPT_RATE)
        _check_number("gain", self.gain, 0.0, MAX_GAIN)


@dataclass(frozen=True)
class PairAcceptance:
    """A pair's measured acceptance: greedy, and (optionally) sampled at ``sampled_temperature``."""

    greedy: AcceptanceFit
    sampled: AcceptanceFit | None = None
    sampled_temperature: float = 1.0

    def __post_init__(self) -> None:  # (what read_pair_acceptance takes: never write what it refuses)
        _check_number("sampled_temperature", self.sampled_temperature, *SAMPLED_TEMPERATURE_RANGE)

    def for_temperature(self, temperature: float) -> AcceptanceFit:
        """The fit a run at ``temperature`` starts from (see the module docstring)."""
        if temperature <= 0 or self.sampled is None:
            return self.greedy
        w = min(temperature / self.sampled_temperature, 1.0)
        g, s = self.greedy, self.sampled
        return AcceptanceFit(
            g.accept_rate + (s.accept_rate - g.accept_rate) * w, g.gain + (s.gain - g.gain) * w
        )


def _check_number(name: str, value, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def _fit_from(entry, where: str) -> AcceptanceFit:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object with accept_rate and gain, got {entry!r}")
    missing = [k for k in ("accept_rate", "gain") if k not in entry]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    try:
        return AcceptanceFit(entry["accept_rate"], entry["gain"])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def read_pair_acceptance(directory: str | Path) -> PairAcceptance | None:
    """The ``acceptance.json`` of a head's directory, or None when it has none.

    Raises ValueError naming the file and the problem when it is not valid JSON of this format."""
    path = Path(directory) / FILENAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f'{path}: "format" must be "{FORMAT}", got {got!r}')
    if "greedy" not in raw:
        raise ValueError(f'{path} lacks "greedy"')
    greedy = _fit_from(raw["greedy"], f"{path}: greedy")
    sampled, temperature = None, 1.0
    if raw.get("sampled") is not None:
        sampled = _fit_from(raw["sampled"], f"{path}: sampled")
        temperature = raw["sampled"].get("temperature", 1.0)
        try:
            _check_number("sampled.temperature", temperature, *SAMPLED_TEMPERATURE_RANGE)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return PairAcceptance(greedy, sampled, float(temperature))


def write_pair_acceptance(directory: str | Path, acceptance: PairAcceptance, measured: dict) -> Path:
    """Write ``acceptance.json`` into ``directory`` (``measured``: how it was measured, stored as is)."""
    payload = {
        "format": FORMAT,
        "greedy": {"accept_rate": acceptance.greedy.accept_rate, "gain": acceptance.greedy.gain},
        "sampled": None
        if acceptance.sampled is None
        else {
            "accept_rate": acceptance.sampled.accept_rate,
            "gain": acceptance.sampled.gain,
            "temperature": acceptance.sampled_temperature,
        },
        "measured": measured,
    }
    path = Path(directory) / FILENAME
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def measure_tau(model, prompts: Sequence[Sequence[int]], tree, temperature: float, new_tokens: int) -> float:
    """Mean accepted tokens per target forward of ``model`` with ``tree`` over ``prompts`` (token-id
    lists), one prompt per call, no EOS stop; sampled calls are seeded 0, 1, ... by prompt."""
    lengths: list[int] = []
    for i, prompt in enumerate(prompts):
        res = model.generate(
            [list(prompt)], new_tokens, temperature=temperature, tree=tree, eos_token_id=[], seed=i
        )
        lengths.extend(res.accept_lengths[0])
    if not lengths:
        raise ValueError(
            f"no speculative round ran with new_tokens={new_tokens}: measuring needs more tokens"
        )
    return sum(lengths) / len(lengths)


def fit_gain(depth: int, width: int, tau: float, accept_rate: float) -> float:
    """The ``g`` for which :func:`eagle.autotree.expected_tau` of the tree is ``tau``, clamped to
    [0, MAX_GAIN]."""
    chain = sum(accept_rate**i for i in range(depth + 1))
    share = autotree.widening_share(depth, width)
    if share <= 0:
        raise ValueError(f"a tree of depth {depth} and width {width} is a chain: it has no widening gain")
    return min(max((tau / chain - 1.0) / share, 0.0), MAX_GAIN)


def measure_fit(
    model, prompts: Sequence[Sequence[int]], temperature: float, new_tokens: int = 128
) -> tuple[AcceptanceFit, dict]:
    """``a`` from chains of :data:`CHAIN_DEPTHS` (mean of their fits), then ``g`` from the trees
    ``tree_for(d, TREE_WIDTH)`` of the same depths (mean), each over ``prompts`` one at a time."""
    if not prompts:
        raise ValueError("measuring acceptance needs at least one prompt")
    record: dict = {"temperature": temperature, "chains": {}, "trees": {}}
    rates = []
    for d in CHAIN_DEPTHS:
        tau = measure_tau(model, prompts, TreeConfig.chain(d), temperature, new_tokens)
        rates.append(autotree.fit_accept_rate(d, d + 1, tau))
        record["chains"][f"chain-{d}"] = tau
    a = sum(rates) / len(rates)
    gains = []
    for d in CHAIN_DEPTHS:
        tree = autotree.tree_for(d, TREE_WIDTH)
        tau = measure_tau(model, prompts, tree, temperature, new_tokens)
        gains.append(fit_gain(d, tree.total_tokens, tau, a))
        record["trees"][f"{tree.depth}/{tree.topk}/{tree.total_tokens}"] = tau
    fit = AcceptanceFit(a, sum(gains) / len(gains))
    record.update(accept_rate=fit.accept_rate, gain=fit.gain)
    return fit, record


def measure_pair_acceptance(
    model, prompts: Sequence[Sequence[int]], new_tokens: int = 128, sampled_temperature: float | None = 1.0
) -> tuple[PairAcceptance, dict]:
    """The pair's :class:`PairAcceptance` on ``prompts`` (token-id lists): greedy, and sampled at
    ``sampled_temperature`` (None: greedy only; sampled runs use seeds 0, 1, ...). Returns it and a
    record of the measured taus."""
    if model.head is None:
        raise ValueError("measuring acceptance needs a draft head (this model decodes plainly)")
    if sampled_temperature is not None:  # (0 would store the greedy fit as T = 1's; before measuring)
        _check_number("the sampled runs' temperature", sampled_temperature, *SAMPLED_TEMPERATURE_RANGE)
    greedy, greedy_record = measure_fit(model, prompts, 0.0, new_tokens)
    sampled, sampled_record = None, None
    if sampled_temperature is not None:
        sampled, sampled_record = measure_fit(model, prompts, sampled_temperature, new_tokens)
    record = {
        "prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": new_tokens,
        "dtype": str(model.target.dtype).removeprefix("torch."),
        "greedy": greedy_record,
        "sampled": sampled_record,
    }
    return PairAcceptance(
        greedy, sampled, 1.0 if sampled_temperature is None else sampled_temperature
    ), record
