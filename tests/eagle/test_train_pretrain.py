"""Tests of the tiny-code target pipeline: corpus, tokenizer, token memmaps, training, resume, export.

All on a small synthetic corpus in ``tmp_path`` with a two-layer model, so the file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal

import numpy as np
import pytest
import torch

from eagle.train import pretrain
from eagle.train.corpus import collect_sources, is_validation_path, split_sources
from eagle.train.pretrain import ModelConfig, TrainConfig
from eagle.train.tokenizer import ENDOFTEXT, encode_documents, load_tokenizer, save_tokenizer, train_tokenizer

VOCAB = 320
VAL_FRACTION = 0.25
TINY_MODEL = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)


def _module_text(i: int) -> str:
    return (
        f'"""Synthetic module {i}: ünïcode, tabs\tand  double  spaces."""\n\n'
        f"import os\n\n\n"
        f"def function_{i}(value, scale={i}):\n"
        f"    if value > {i % 7}:\n"
        f"        return value * scale + {i}\n"
        f"    return [x for x in range(value)]\n\n\n"
        f"class Widget{i}:\n"
        f"    def __init__(self, name='w{i}'):\n"
        f"        self.name = name\n"
        f"        self.path = os.path.join('a', str({i}))\n"
    )


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")
    for i in range(40):
        sub = root / ("pkg" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        (sub / f"mod_{i}.py").write_text(_module_text(i), encoding="utf-8")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third_party.py").write_text("x = 1\n")
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (root / "empty.py").write_text("   \n")
    (root / "notes.txt").write_text("not python\n")
    return root


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory, corpus_root):
    out = tmp_path_factory.mktemp("work")
    pretrain.prepare_data(out, corpus_root, vocab_size=VOCAB, val_fraction=VAL_FRACTION, model_max_length=32)
    return out


def _train_cfg(**overrides) -> TrainConfig:
    base = dict(
        seq_len=32,
        batch_size=8,
        max_tokens=8 * 32 * 12,
        lr=1e-2,
        min_lr=1e-3,
        warmup_tokens=8 * 32 * 2,
        log_every_steps=4,
        eval_every_tokens=10**12,
        checkpoint_every_s=1e9,
        eval_tokens=4096,
        num_threads=1,
    )
    base.update(overrides)
    return TrainConfig(**base)


def _fresh_copy_of_data(src, dst):
    dst.mkdir()
    for name in ("train.npy", "val.npy", pretrain.META_NAME):
        (dst / name).write_bytes((src / name).read_bytes())
    (dst / "tokenizer").mkdir()
    for f in (src / "tokenizer").iterdir():
        (dst / "tokenizer" / f.name).write_bytes(f.read_bytes())
    return dst


# ------------------------------------------------------------------------------------------ corpus


def test_corpus_skips_third_party_non_utf8_empty_and_non_python(corpus_root):
    paths = {s.relpath for s in collect_sources(corpus_root)}
    assert len(paths) == 40
    assert "pkg/mod_0.py" in paths and "mod_1.py" in paths
    assert not {"site-packages/third_party.py", "latin1.py", "empty.py", "notes.txt"} & paths


def test_split_is_by_file_deterministic_and_disjoint(corpus_root):
    sources = collect_sources(corpus_root)
    train, val = split_sources(sources, VAL_FRACTION)
    assert {s.relpath for s in train}.isdisjoint(s.relpath for s in val)
    assert len(train) + len(val) == len(sources) and val
    assert [s.relpath for s in val] == [
        s.relpath for s in sources if is_validation_path(s.relpath, VAL_FRACTION)
    ]
    assert [s.relpath for s in split_sources(collect_sources(corpus_root), VAL_FRACTION)[1]] == [
        s.relpath for s in val
    ]


def test_empty_or_missing_corpus_raises_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        collect_sources(tmp_path / "missing")
    (tmp_path / "only_bad.py").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="no readable, non-empty UTF-8"):
        collect_sources(tmp_path)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([], VOCAB)
    with pytest.raises(ValueError, match="at least"):
        train_tokenizer(["x = 1"], 100)


# --------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_exactly_and_loads_with_autotokenizer(corpus_root, tmp_path):
    from transformers import AutoTokenizer

    train, val = split_sources(collect_sources(corpus_root), VAL_FRACTION)
    tokenizer = train_tokenizer([s.text for s in train], VOCAB)
    assert tokenizer.get_vocab_size() == VOCAB
    assert tokenizer.token_to_id(ENDOFTEXT) == 0
    unseen = "def ñ(x):\n\treturn x  ** 2  # 😀 unseen bytes\r\n    pass\n"
    for text in [s.text for s in val] + [unseen]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode(val[0].text).ids) < len(val[0].text.encode())  # merges were learned

    save_tokenizer(tokenizer, tmp_path, model_max_length=32)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == ENDOFTEXT and hf.eos_token_id == 0 and hf.bos_token_id == 0
    ids = hf(unseen, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode(unseen, add_special_tokens=False).ids
    assert hf.decode(ids) == unseen
    assert load_tokenizer(tmp_path).get_vocab_size() == VOCAB


# ------------------------------------------------------------------------------------------ memmap


def test_prepare_data_writes_uint16_memmaps_of_eos_separated_files(work_dir, corpus_root):
    meta = json.loads((work_dir / pretrain.META_NAME).read_text())
    tokenizer = load_tokenizer(work_dir / "tokenizer")
    train, val = split_sources(collect_sources(corpus_root), VAL_FRACTION)
    for split, sources in (("train", train), ("val", val)):
        tokens = pretrain.load_split(work_dir, split)
        assert tokens.dtype == np.uint16 and isinstance(tokens, np.memmap)
        expected = [t for doc in encode_documents(tokenizer, [s.text for s in sources]) for t in [0, *doc]]
        assert tokens.tolist() == expected
        assert meta[split]["tokens"] == len(expected) and meta[split]["files"] == len(sources)
    assert meta["val_files"] == [s.relpath for s in val]
    # a second call reuses the preparation instead of redoing it
    assert pretrain.prepare_data(work_dir, corpus_root, vocab_size=VOCAB, val_fraction=VAL_FRACTION) == meta


def test_batches_are_a_pure_function_of_seed_and_step(work_dir):
    tokens = pretrain.load_split(work_dir, "train")
    a = pretrain.batch_for_step(tokens, 5, 4, 32, seed=1)
    assert a.shape == (4, 33) and a.dtype == torch.int64
    assert torch.equal(a, pretrain.batch_for_step(tokens, 5, 4, 32, seed=1))
    assert not torch.equal(a, pretrain.batch_for_step(tokens, 6, 4, 32, seed=1))
    start = next(i for i in range(len(tokens)) if np.array_equal(tokens[i : i + 33], a[0].numpy()))
    assert start >= 0
    with pytest.raises(ValueError, match="shorter than one window"):
        pretrain.batch_for_step(tokens[:10], 0, 1, 32, seed=1)


def test_learning_rate_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(seq_len=10, batch_size=1, max_tokens=1000, warmup_tokens=100, lr=1.0, min_lr=0.1)
    assert pretrain.learning_rate(0, cfg) == pytest.approx(0.1)
    assert pretrain.learning_rate(9, cfg) == pytest.approx(1.0)
    assert pretrain.learning_rate(10 + 45, cfg) == pytest.approx(0.55)
    assert pretrain.learning_rate(100, cfg) == pytest.approx(0.1)
    assert pretrain.learning_rate(500, cfg) == pytest.approx(0.1)
    rewarmed = pretrain.learning_rate(60, dataclasses.replace(cfg, rewarm_steps=10), rewarm_from=60)
    assert rewarmed == pytest.approx(pretrain.learning_rate(60, cfg) / 10)


# ---------------------------------------------------------------------------------------- training


def test_a_few_training_steps_reduce_validation_loss(work_dir, tmp_path):
    out = _fresh_copy_of_data(work_dir, tmp_path / "run")
    val_tokens = pretrain.load_split(out, "val")
    initial = pretrain.evaluate(pretrain.build_model(TINY_MODEL, 1234), val_tokens, 32, 4096, True)
    assert initial == pytest.approx(math.log(VOCAB), rel=0.05)
    pretrain.train(out, TINY_MODEL, _train_cfg(max_tokens=8 * 32 * 40), quiet=True)
    records = [json.loads(line) for line in (out / pretrain.METRICS_NAME).read_text().splitlines()]
    final_val = [r["val_loss"] for r in records if r["kind"] == "val"][-1]
    assert final_val < initial - 1.0
    train_losses = [r["train_loss"] for r in records if r["kind"] == "train"]
    assert train_losses[-1] < train_losses[0]
    assert all(r["tokens_per_s"] > 0 for r in records if r["kind"] == "train")


def test_checkpoint_then_resume_continues_bit_identically(work_dir, tmp_path):
    straight = _fresh_copy_of_data(work_dir, tmp_path / "straight")
    pieces = _fresh_copy_of_data(work_dir, tmp_path / "pieces")
    pretrain.train(straight, TINY_MODEL, _train_cfg(), quiet=True)
    pretrain.train(pieces, TINY_MODEL, _train_cfg(stop_after_steps=5), quiet=True)
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain.train(pieces, TINY_MODEL, _train_cfg(), quiet=True)
    state = pretrain.train(pieces, None, _train_cfg(), resume=True, quiet=True)
    assert state.step == _train_cfg().total_steps

    a = pretrain.load_checkpoint(straight / pretrain.CHECKPOINT_NAME)
    b = pretrain.load_checkpoint(pieces / pretrain.CHECKPOINT_NAME)
    assert a["run_state"]["step"] == b["run_state"]["step"] == 12
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_a_resumed_run_keeps_its_fitted_schedule_and_refits_an_interrupted_probe(work_dir, tmp_path, capsys):
    """fit_schedule_s shrinks max_tokens once; a resume given the same --max-tokens used to restore the
    unfitted length (the learning rate jumped back up), and a run stopped during the probe never
    fitted at all."""
    big = 8 * 32 * 100_000
    cfg = _train_cfg(max_tokens=big, warmup_tokens=8 * 32 * 40, fit_schedule_s=1.0)
    fitted = _fresh_copy_of_data(work_dir, tmp_path / "fitted")
    state = pretrain.train(fitted, TINY_MODEL, dataclasses.replace(cfg, stop_after_steps=15), quiet=True)
    steps = state.fitted_max_tokens // cfg.tokens_per_step
    assert state.fitted_max_tokens is not None and steps < big // cfg.tokens_per_step
    capsys.readouterr()
    pretrain.train(fitted, None, dataclasses.replace(cfg, stop_after_steps=1), resume=True)
    assert f"start at step 15/{steps} " in capsys.readouterr().out

    interrupted = _fresh_copy_of_data(work_dir, tmp_path / "interrupted")
    state = pretrain.train(interrupted, TINY_MODEL, dataclasses.replace(cfg, stop_after_steps=5), quiet=True)
    assert state.step == 5 and state.fitted_max_tokens is None  # stopped inside the probe (steps 3-13)
    state = pretrain.train(
        interrupted, None, dataclasses.replace(cfg, stop_after_steps=11), resume=True, quiet=True
    )
    assert state.fitted_max_tokens is not None and state.fitted_max_tokens < big  # probed over steps 5-15


def test_evaluations_fall_on_the_same_steps_whether_or_not_a_run_was_resumed(work_dir, tmp_path):
    cfg = _train_cfg(max_tokens=8 * 32 * 40, eval_every_tokens=8 * 32 * 7)
    straight = _fresh_copy_of_data(work_dir, tmp_path / "straight")
    pieces = _fresh_copy_of_data(work_dir, tmp_path / "pieces")
    a = pretrain.train(straight, TINY_MODEL, cfg, quiet=True)
    pretrain.train(pieces, TINY_MODEL, dataclasses.replace(cfg, stop_after_steps=13), quiet=True)
    b = pretrain.train(pieces, None, cfg, resume=True, quiet=True)
    assert [h["step"] for h in a.history] == [h["step"] for h in b.history]


@pytest.mark.parametrize(
    "field, value",
    [("batch_size", 0), ("seq_len", 0), ("max_tokens", -1), ("lr", 0.0), ("stop_after_steps", 0)],
)
def test_bad_training_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        _train_cfg(**{field: value})


# ------------------------------------------------------------------------------------------ export
# ------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def exported(work_dir, tmp_path_factory):
    out = _fresh_copy_of_data(work_dir, tmp_path_factory.mktemp("exp") / "run")
    pretrain.train(out, TINY_MODEL, _train_cfg(max_tokens=8 * 32 * 20, stop_after_steps=10), quiet=True)
    export_dir = tmp_path_factory.mktemp("exp") / "target"
    record = pretrain.export(out, export_dir)
    return out, export_dir, record


def test_export_loads_with_transformers_auto_classes(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, export_dir, record = exported
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "MODEL_CARD.md",
    ):
        assert (export_dir / name).is_file(), name
    assert record["in_progress"] and record["step"] == 10 and record["tokens_seen"] == 10 * 8 * 32
    assert abs(record["val_loss_exported"] - record["val_loss_fp32_checkpoint"]) < 2e-3

    model = AutoModelForCausalLM.from_pretrained(str(export_dir))
    assert model.config.num_hidden_layers == 2 and model.dtype == torch.float16
    model = model.float()
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    reference = pretrain.build_model(TINY_MODEL, 0)
    reference.load_state_dict(pretrain.load_checkpoint(out / pretrain.CHECKPOINT_NAME)["model"])
    ids = tokenizer("def function_3(value):\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=2e-2, rtol=0)
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)
    card = (export_dir / "MODEL_CARD.md").read_text()
    assert "Training in progress" in card and f"{record['val_loss_exported']:.4f}" in card


def test_resume_from_export_restarts_with_fresh_optimizer(exported, work_dir, tmp_path):
    _, export_dir, record = exported
    out = _fresh_copy_of_data(work_dir, tmp_path / "fresh_machine")
    cfg = _train_cfg(max_tokens=8 * 32 * 20, rewarm_steps=3)
    state = pretrain.train(out, None, cfg, resume=True, init_from=export_dir, quiet=True)
    assert state.rewarm_from == record["step"] and state.step == cfg.total_steps
    assert state.tokens_seen == cfg.total_steps * cfg.tokens_per_step
    assert state.init_from == str(export_dir)


def test_cli_resume_on_a_fresh_machine_starts_from_the_export(exported, corpus_root, tmp_path):
    _, export_dir, record = exported
    out = tmp_path / "fresh"
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        args = [
            "--out",
            str(out),
            "--resume",
            "--init-from",
            str(export_dir),
            "--corpus-root",
            str(corpus_root),
        ]
        args += ["--val-fraction", str(VAL_FRACTION), "--max-tokens", str(8 * 32 * 14), "--seq-len", "32"]
        args += ["--batch-size", "8", "--threads", "1", "--warmup-tokens", "512", "--eval-tokens", "1024"]
        assert pretrain.main(args) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert (out / "tokenizer" / "tokenizer.json").read_text() == (export_dir / "tokenizer.json").read_text()
    state = pretrain.load_checkpoint(out / pretrain.CHECKPOINT_NAME)["run_state"]
    assert state["step"] == 14 and state["rewarm_from"] == record["step"]
