"""The one-command reproduction of the tiny-code pair, end to end on a synthetic corpus and a tiny model."""

from __future__ import annotations

import json

import pytest

import eagle
from eagle.train import pretrain, tinycode


def _module_text(i: int) -> str:
    body = "\n".join(f"    total += value * {j} + {i}" for j in range(12))
    return (
        f'"""Synthetic module {i}."""\n\nimport os\n\n\n'
        f"def function_{i}(value, scale={i}):\n    total = 0\n{body}\n    return total * scale\n\n\n"
        f"class Widget{i}:\n    def __init__(self, name='w{i}'):\n        self.name = name\n"
        f"        self.path = os.path.join('a', str({i}))\n"
    )


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")
    for i in range(48):
        (root / f"mod_{i}.py").write_text(_module_text(i), encoding="utf-8")
    return root


def _config(work, corpus_root) -> tinycode.TinyCodeConfig:
    return tinycode.TinyCodeConfig(
        work=work,
        corpus_root=corpus_root,
        val_fraction=0.25,
        target=pretrain.ModelConfig(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        batch_size=4,
        seq_len=128,
        lr=3e-3,
        warmup_tokens=1024,
        max_tokens=8192,
        eval_every_tokens=4096,
        feature_tokens=2048,
        feature_seq_len=64,
        head_epochs=1,
        head_batch=4,
        head_tau_new_tokens=16,
        tau_files=2,
        tau_prompt_tokens=16,
        tau_new_tokens=8,
    )


def test_pipeline_builds_a_loadable_pair_and_resumes(tmp_path, corpus_root):
    work = tmp_path / "work"
    summary = tinycode.run(_config(work, corpus_root), install=tmp_path / "assets")

    assert set(summary["stages"]) == {"target", "features", "head", "tau", "acceptance"}
    fits = summary["stages"]["acceptance"]
    assert 0.0 < fits["greedy"]["accept_rate"] < 1.0 and 0.0 < fits["sampled"]["accept_rate"] < 1.0
    assert all(s["seconds"] >= 0 for s in summary["stages"].values())
    assert 1.0 <= summary["stages"]["tau"]["tau"] <= 9.0
    assert summary["stages"]["tau"]["prompts"] == 2
    on_disk = json.loads((work / tinycode.SUMMARY_NAME).read_text())
    assert on_disk["stages"]["tau"] == summary["stages"]["tau"]

    for root in (work / "pair", tmp_path / "assets"):
        model = eagle.load(str(root / "target"), str(root / "draft"))
        assert model.tokenizer is not None
        assert model.pair_acceptance is not None  # acceptance.json, installed with the head
        assert model.pair_acceptance.greedy.accept_rate == fits["greedy"]["accept_rate"]
        res = model.generate(["def f(x):"], 6, tree="chain")
        plain = model.generate(["def f(x):"], 6, speculative=False)
        assert res.tokens == plain.tokens  # lossless greedy
    card = (tmp_path / "assets" / "draft" / "MODEL_CARD.md").read_text()
    assert f"{summary['stages']['tau']['tau']:.2f}" in card
    assert "| 1 |" in card  # the per-epoch table has the epoch row

    # A second run finds every stage done and only rewrites the card.
    again = tinycode.run(_config(work, corpus_root))
    assert again["stages"] == summary["stages"]


def test_head_unroll_steps_reach_the_head_training_and_the_card(tmp_path, corpus_root, monkeypatch):
    seen = []
    monkeypatch.setattr(tinycode.head_mod, "main", lambda argv: seen.append(argv) or 2)
    cfg = tinycode.config_from_args(
        tinycode.build_parser().parse_args(["--work", str(tmp_path), "--head-unroll-steps", "3"])
    )
    assert cfg.head_unroll_steps == 3
    with pytest.raises(RuntimeError, match="head training failed"):
        tinycode.train_draft(cfg)
    argv = seen[0]
    assert argv[argv.index("--unroll-steps") + 1] == "3"
    assert (
        "Training-time test over 3 draft levels" in tinycode._unroll_line(3)
        and tinycode._unroll_line(1) == ""
    )
    # The card describes the head as it trained (a resumed run keeps its checkpoint's settings).
    assert tinycode._trained_unroll_steps([{"val_top1_by_step": [0.5, 0.4, 0.3]}]) == 3
    assert tinycode._trained_unroll_steps([{"val_top1": 0.5}]) == tinycode._trained_unroll_steps([]) == 1


def test_cli_defaults_fit_the_schedule_only_on_cuda(tmp_path):
    parse = tinycode.build_parser().parse_args
    assert tinycode.config_from_args(parse(["--work", str(tmp_path)])).fit_schedule_s is None
    cuda = tinycode.config_from_args(parse(["--work", str(tmp_path), "--device", "cuda"]))
    assert cuda.fit_schedule_s == 90.0
    off = tinycode.config_from_args(
        parse(["--work", str(tmp_path), "--device", "cuda", "--fit-schedule-s", "0"])
    )
    assert off.fit_schedule_s is None


def test_lengths_a_later_stage_would_refuse_are_refused_before_the_target_trains(
    tmp_path, capsys, monkeypatch
):
    """--seq-len 64 trained the whole target first; only the head stage then refused (its tau needs
    more positions), with a traceback."""
    ran = []
    monkeypatch.setattr(tinycode, "run", lambda *a, **k: ran.append(a))
    assert tinycode.main(["--work", str(tmp_path), "--seq-len", "64"]) == 2
    err = capsys.readouterr().err
    assert "eagle train tiny-code: error: --seq-len 64 is the target's max_position_embeddings" in err
    assert (
        "--feature-seq-len needs 256" in err
        and "held-out tau (--tau-prompt-tokens + --tau-new-tokens) needs 256" in err
    )
    assert not ran
    tinycode.config_from_args(tinycode.build_parser().parse_args(["--work", str(tmp_path)])).validate()
