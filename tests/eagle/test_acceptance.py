"""A pair's measured acceptance (eagle/acceptance.py): acceptance.json, the prior tree="dynamic" starts
from, its measurement, and `eagle calibrate`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import eagle
from eagle import acceptance, autotree
from eagle.acceptance import AcceptanceFit, PairAcceptance
from eagle.api import _resolve_bundled
from eagle.cli import main as cli_main
from eagle.speculate import SamplingParams


def _write(directory, payload) -> None:
    (directory / acceptance.FILENAME).write_text(payload if isinstance(payload, str) else json.dumps(payload))


VALID = {
    "format": acceptance.FORMAT,
    "greedy": {"accept_rate": 0.7, "gain": 0.2},
    "sampled": {"accept_rate": 0.3, "gain": 0.4, "temperature": 1.0},
    "measured": {"note": "hand-written"},
}


def test_read_returns_none_without_a_file(tmp_path):
    assert acceptance.read_pair_acceptance(tmp_path) is None


def test_write_then_read_round_trips(tmp_path):
    pair = PairAcceptance(AcceptanceFit(0.71, 0.15), AcceptanceFit(0.33, 0.27), 0.8)
    path = acceptance.write_pair_acceptance(tmp_path, pair, {"prompts": 3})
    assert path.name == acceptance.FILENAME and json.loads(path.read_text())["measured"] == {"prompts": 3}
    assert acceptance.read_pair_acceptance(tmp_path) == pair
    greedy_only = PairAcceptance(AcceptanceFit(0.6, 0.1))
    acceptance.write_pair_acceptance(tmp_path, greedy_only, {})
    assert acceptance.read_pair_acceptance(tmp_path) == greedy_only


@pytest.mark.parametrize(
    "payload, message",
    [
        ("{not json", "is not valid JSON"),
        ([1, 2], '"format" must be'),
        ({**VALID, "format": "eagle-acceptance/0"}, '"format" must be "eagle-acceptance/1"'),
        ({"format": acceptance.FORMAT}, 'lacks "greedy"'),
        ({**VALID, "greedy": {"accept_rate": 0.7}}, "greedy lacks gain"),
        ({**VALID, "greedy": 0.7}, "greedy must be an object"),
        (
            {**VALID, "greedy": {"accept_rate": 1.5, "gain": 0.2}},
            r"greedy: accept_rate must be in \[0.02, 0.98\]",
        ),
        (
            {**VALID, "greedy": {"accept_rate": 0.7, "gain": float("nan")}},
            "greedy: gain must be a finite number",
        ),
        ({**VALID, "greedy": {"accept_rate": "0.7", "gain": 0.2}}, "accept_rate must be a finite number"),
        ({**VALID, "sampled": {"accept_rate": 0.3, "gain": -0.1}}, r"sampled: gain must be in \[0.0, 2.0\]"),
        ({**VALID, "sampled": {"accept_rate": 0.3, "gain": 0.1, "temperature": 0}}, "sampled.temperature"),
    ],
)
def test_a_corrupt_file_names_itself_and_the_problem(tmp_path, payload, message):
    _write(tmp_path, payload)
    with pytest.raises(ValueError, match=message) as err:
        acceptance.read_pair_acceptance(tmp_path)
    assert str(tmp_path / acceptance.FILENAME) in str(err.value)


@pytest.mark.parametrize("temperature", [0.0, 200.0, float("nan")])
def test_a_temperature_the_reader_refuses_is_never_written_or_measured(
    tmp_path, tiny_checkpoints, temperature
):
    """`eagle calibrate --temperature 200` wrote a file that then made the head unloadable, and
    --temperature 0 stored the greedy fit labelled as T = 1's (`sampled_temperature or 1.0`): the
    temperature is checked before measuring, by the PairAcceptance written, and by the CLI."""
    with pytest.raises(ValueError, match="sampled_temperature must be"):
        PairAcceptance(AcceptanceFit(0.7, 0.2), AcceptanceFit(0.3, 0.2), temperature)
    model = eagle.load(str(tiny_checkpoints.target), str(tiny_checkpoints.eagle2), dtype=torch.float32)
    with pytest.raises(ValueError, match="the sampled runs' temperature must be"):
        acceptance.measure_pair_acceptance(model, [[1, 2, 3]], 6, sampled_temperature=temperature)
    with pytest.raises(SystemExit):
        cli_main(["calibrate", "--draft", str(tmp_path), "--temperature", str(temperature)])
    assert acceptance.read_pair_acceptance(tmp_path) is None


def test_sampled_runs_interpolate_between_greedy_and_sampled():
    pair = PairAcceptance(AcceptanceFit(0.8, 0.1), AcceptanceFit(0.4, 0.3), 1.0)
    assert pair.for_temperature(0.0) == pair.greedy
    half = pair.for_temperature(0.5)
    assert half.accept_rate == pytest.approx(0.6) and half.gain == pytest.approx(0.2)
    assert pair.for_temperature(1.0) == pair.for_temperature(3.0) == pair.sampled
    assert PairAcceptance(AcceptanceFit(0.8, 0.1)).for_temperature(1.0) == AcceptanceFit(0.8, 0.1)


@pytest.mark.parametrize("depth, width", [(3, 8), (5, 16), (2, 12)])
@pytest.mark.parametrize("gain", [0.0, 0.17, 0.6])
def test_fit_gain_inverts_the_acceptance_model(depth, width, gain):
    tau = autotree.expected_tau(depth, width, 0.6, gain)
    assert acceptance.fit_gain(depth, width, tau, 0.6) == pytest.approx(gain, abs=1e-12)
    assert autotree.fit_accept_rate(depth, width, tau, gain) == pytest.approx(0.6, abs=1e-6)
    with pytest.raises(ValueError, match="is a chain"):
        acceptance.fit_gain(depth, depth + 1, tau, 0.6)


@pytest.fixture
def head_with_acceptance(tiny_checkpoints, tmp_path):
    head_dir = tmp_path / "head"
    shutil.copytree(tiny_checkpoints.eagle2, head_dir)
    _write(head_dir, VALID)
    return head_dir


def test_load_reads_the_heads_file_and_dynamic_trees_start_from_it(
    tiny_checkpoints, head_with_acceptance, monkeypatch
):
    model = eagle.load(str(tiny_checkpoints.target), str(head_with_acceptance), dtype=torch.float32)
    assert model.pair_acceptance == acceptance.read_pair_acceptance(head_with_acceptance)
    plain = eagle.load(str(tiny_checkpoints.target), str(tiny_checkpoints.eagle2), dtype=torch.float32)
    assert plain.pair_acceptance is None
    assert plain.prior_acceptance() == AcceptanceFit(autotree.ACCEPT_RATE, autotree.WIDENING_GAIN)

    chosen = []
    real = autotree.choose_tree

    def spy(target, batch_size, head=None, **kw):
        chosen.append((kw["accept_rate"], kw["gain"]))
        return real(target, batch_size, head, **kw)

    monkeypatch.setattr(eagle.api, "choose_tree", spy)
    model._tree("dynamic", 1, SamplingParams())
    model._tree("dynamic", 1, SamplingParams(temperature=0.5))
    model._tree("dynamic", 1, SamplingParams(temperature=2.0))
    assert chosen[0] == (0.7, 0.2)
    assert chosen[1] == (pytest.approx(0.5), pytest.approx(0.3))
    assert chosen[2] == (0.3, 0.4)
    # a run's refit replaces the rate, fitted with the pair's gain, which stays
    tree = autotree.tree_for(3, 8)
    tau = autotree.expected_tau(tree.depth, tree.total_tokens, 0.55, 0.2)
    model._learn_acceptance(SamplingParams(), tree, [[tau] * 40])
    assert model.accept_rates[SamplingParams()] == pytest.approx(0.55, abs=1e-4)
    model._tree("dynamic", 1, SamplingParams())
    assert chosen[-1] == (pytest.approx(0.55, abs=1e-4), 0.2)


def test_a_corrupt_file_fails_the_load(tiny_checkpoints, head_with_acceptance):
    _write(head_with_acceptance, {**VALID, "greedy": {"accept_rate": 7, "gain": 0.2}})
    with pytest.raises(ValueError, match="acceptance.json: greedy: accept_rate must be in"):
        eagle.load(str(tiny_checkpoints.target), str(head_with_acceptance), dtype=torch.float32)


def test_measure_fits_chains_and_trees_of_a_pair(tiny_checkpoints):
    model = eagle.load(str(tiny_checkpoints.target), str(tiny_checkpoints.eagle2), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    V = model.target.config.vocab_size
    prompts = [torch.randint(0, V, (12,), generator=gen).tolist() for _ in range(2)]
    pair, record = acceptance.measure_pair_acceptance(model, prompts, new_tokens=6)
    for fit in (pair.greedy, pair.sampled):
        assert autotree.MIN_ACCEPT_RATE <= fit.accept_rate <= autotree.MAX_ACCEPT_RATE
        assert 0.0 <= fit.gain <= acceptance.MAX_GAIN
    assert set(record["greedy"]["chains"]) == {"chain-3", "chain-5"} and len(record["greedy"]["trees"]) == 2
    for fit, rec in ((pair.greedy, record["greedy"]), (pair.sampled, record["sampled"])):
        # the fits are the means over the measured chains, then over the trees at that rate
        rates = [autotree.fit_accept_rate(d, d + 1, rec["chains"][f"chain-{d}"]) for d in (3, 5)]
        assert fit.accept_rate == pytest.approx(sum(rates) / 2)
        gains = []
        for label, tau in rec["trees"].items():
            depth, _, total = (int(x) for x in label.split("/"))
            gains.append(acceptance.fit_gain(depth, total, tau, fit.accept_rate))
        assert fit.gain == pytest.approx(sum(gains) / 2)
    assert record["sampled"]["temperature"] == 1.0 and record["prompts"] == 2
    greedy_only, rec = acceptance.measure_pair_acceptance(model, prompts, 6, sampled_temperature=None)
    assert greedy_only.sampled is None and rec["sampled"] is None
    with pytest.raises(ValueError, match="at least one prompt"):
        acceptance.measure_fit(model, [], 0.0)
    with pytest.raises(ValueError, match="no speculative round ran with new_tokens=1"):
        acceptance.measure_fit(model, prompts, 0.0, new_tokens=1)
    no_head = eagle.load(str(tiny_checkpoints.target), dtype=torch.float32)
    with pytest.raises(ValueError, match="measuring acceptance needs a draft head"):
        acceptance.measure_pair_acceptance(no_head, prompts)


def test_fit_gain_is_clamped_to_its_range():
    assert acceptance.fit_gain(3, 16, 1e6, 0.6) == acceptance.MAX_GAIN  # a tau no gain explains
    assert acceptance.fit_gain(3, 16, 0.5, 0.6) == 0.0  # below the chain's own tau
    with pytest.raises(ValueError, match="is a chain"):
        acceptance.fit_gain(3, 4, 3.0, 0.6)


def test_cli_calibrate_writes_what_load_then_reads(tmp_path, capsys):
    head_dir = tmp_path / "draft"
    shutil.copytree(_resolve_bundled("tiny-code", "draft"), head_dir)
    (head_dir / acceptance.FILENAME).unlink(missing_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "def fib(n):\n    "}) + "\n" + json.dumps({"prompt": "import os\n"})
    )
    argv = [
        "calibrate",
        "--draft",
        str(head_dir),
        "--prompts",
        str(prompts),
        "--new-tokens",
        "8",
        "--threads",
        "1",
    ]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "greedy: per-token acceptance" in out
        and "T = 1: per-token acceptance" in out
        and "not written" in out
    )
    assert not (head_dir / acceptance.FILENAME).exists()
    assert cli_main([*argv, "--write", "--greedy-only"]) == 0
    assert f"wrote {head_dir / acceptance.FILENAME}" in capsys.readouterr().out
    written = acceptance.read_pair_acceptance(head_dir)
    assert written is not None and written.sampled is None
    assert eagle.load("tiny-code", str(head_dir)).pair_acceptance == written
    bundled_argv = [a for a in argv if a not in ("--draft", str(head_dir))]
    assert cli_main([*bundled_argv, "--write"]) == 2  # the installed package's own head
    assert "--write would replace the bundled head's acceptance.json" in capsys.readouterr().err


def test_cli_calibrate_chat_measures_on_prompts_through_the_chat_template(tmp_path, capsys, monkeypatch):
    """--chat: a chat model's pair is calibrated on the prompts its head was trained on (each text one
    user message through the tokenizer's chat template), as eagle bench --chat measures it."""
    target = tmp_path / "target"
    shutil.copytree(_resolve_bundled("tiny-code", "target"), target)
    config_file = target / "tokenizer_config.json"
    template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant>"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"chat_template": template}))
    head = str(_resolve_bundled("tiny-code", "draft"))
    prompts = tmp_path / "mt.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "turns": ["Sort a list.", "Faster."]}) + "\n")
    seen = []
    real = acceptance.measure_pair_acceptance
    monkeypatch.setattr(
        acceptance, "measure_pair_acceptance", lambda m, p, *a: seen.append(p) or real(m, p, *a)
    )
    argv = ["calibrate", "--target", str(target), "--draft", head, "--prompts", str(prompts)]
    argv += ["--new-tokens", "8", "--greedy-only", "--threads", "1"]
    assert cli_main([*argv, "--chat"]) == 0
    assert cli_main(argv) == 0
    tokenizer = eagle.load(str(target), head).tokenizer
    templated = tokenizer("<user> Sort a list.\n<assistant>", add_special_tokens=False)["input_ids"]
    assert seen == [[templated], [tokenizer("Sort a list.")["input_ids"]]]
    assert cli_main(argv[:5] + ["--chat"]) == 2  # the default prompts: code, not conversations
    assert "--chat sends --prompts texts through the chat template" in capsys.readouterr().err
