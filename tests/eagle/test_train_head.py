"""Tests of the draft-head training pipeline: feature shards, the differentiable forward, the loss,
training, resume, checkpoints and bad input. A 2-layer random Llama (vocab 64, hidden 64) and
sequences of 32 tokens keep the file fast."""

from __future__ import annotations

import dataclasses
import errno
import json
import os

import numpy as np
import pytest
import torch

from eagle.models import load_draft, load_target, random_draft
from eagle.models.draft import official_config
from eagle.models.weights import write_state_dict
from eagle.train import features as feat
from eagle.train import head as th
from tests.eagle.conftest import build_hf_target, save_hf_target

VOCAB, SEQ = 64, 32
TINY = dict(vocab_size=VOCAB, num_hidden_layers=2)


def _cfg(**overrides) -> th.HeadTrainConfig:
    base = dict(
        epochs=2,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        tau_prompts=0,
        tau_prompt_len=8,
        tau_new_tokens=8,
        val_fraction=0.125,
        log_every_steps=2,
        autocast_bf16=False,
    )
    return th.HeadTrainConfig(**(base | overrides))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A target (float64 and float32 loads), a token file and a corpus-feature directory."""
    root = tmp_path_factory.mktemp("train_head")
    hf = build_hf_target("llama", seed=0, **TINY)
    target_dir = save_hf_target(hf, root / "target")
    tokens = np.random.default_rng(0).integers(0, VOCAB, 4000).astype(np.uint16)
    np.save(root / "tokens.npy", tokens)
    target = load_target(target_dir)
    plan = feat.FeaturePlan(seq_len=SEQ, shard_sequences=12, batch_size=8, max_tokens=32 * SEQ)
    feat.dump_features(target, tokens, root / "corpus", plan, progress=False)
    return dict(
        root=root,
        hf=hf,
        target_dir=target_dir,
        tokens=tokens,
        target=target,
        data=feat.FeatureData(root / "corpus"),
    )


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------
def test_corpus_features_are_the_windows_and_the_target_features(setup):
    data, tokens, target = setup["data"], setup["tokens"], setup["target"]
    assert len(data) == 32 and data.meta["shards"] == [feat.shard_name(i) for i in range(3)]
    order = feat.window_order(len(tokens) // SEQ, seed=0)
    idx = [0, 11, 12, 31]
    batch = data[idx]
    windows = np.stack([tokens[order[i] * SEQ : (order[i] + 1) * SEQ] for i in idx]).astype(np.int64)
    assert torch.equal(batch["input_ids"], torch.from_numpy(windows))
    # Independent oracle: Hugging Face's post-norm last hidden state, stored as fp16.
    with torch.no_grad():
        hf_hidden = setup["hf"](batch["input_ids"], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(batch["hidden"], hf_hidden.float().half().float(), rtol=2e-3, atol=2e-3)
    # Reloaded exactly: recomputing with the runtime and rounding to fp16 gives the stored bits.
    own, _ = feat.target_features(target, batch["input_ids"])
    assert torch.equal(batch["hidden"], own.half().float())
    assert torch.equal(batch["loss_mask"], torch.ones(4, SEQ))


def test_generated_features_continue_the_prompt_greedily(setup, tmp_path):
    target64 = load_target(setup["target_dir"], dtype=torch.float64)
    plan = feat.FeaturePlan(
        source="generate",
        seq_len=SEQ,
        prompt_len=8,
        shard_sequences=4,
        batch_size=3,
        max_tokens=6 * SEQ,
        mask_prompt=True,
        dtype="float32",
        feature_layers=[1, 0],
    )
    feat.dump_features(target64, setup["tokens"], tmp_path, plan, progress=False)
    data = feat.FeatureData(tmp_path, dtype=torch.float64)
    batch = data[range(6)]
    ids = batch["input_ids"]
    order = feat.window_order(len(setup["tokens"]) // SEQ, seed=0)
    for i in range(6):
        prompt = torch.from_numpy(setup["tokens"][order[i] * SEQ :][:8].astype(np.int64))
        assert torch.equal(ids[i, :8], prompt)
    with torch.no_grad():
        hf_ids = setup["hf"].generate(
            ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=SEQ - 8, do_sample=False
        )
        hf_out = setup["hf"](ids, output_hidden_states=True)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(
        batch["hidden"], hf_out.hidden_states[-1].float().double(), rtol=1e-5, atol=1e-5
    )
    for k, layer in enumerate([1, 0]):  # the hidden states entering layers 1 and 0, in that order
        torch.testing.assert_close(
            batch["layer_hidden"][:, k], hf_out.hidden_states[layer].float().double(), rtol=1e-5, atol=1e-5
        )
    assert torch.equal(batch["loss_mask"][:, :8], torch.zeros(6, 8))
    assert torch.equal(batch["loss_mask"][:, 8:], torch.ones(6, SEQ - 8))


def test_feature_dump_resumes_by_skipping_finished_shards(setup, tmp_path, monkeypatch):
    plan = feat.FeaturePlan(seq_len=SEQ, shard_sequences=4, batch_size=4, max_tokens=8 * SEQ)
    feat.dump_features(setup["target"], setup["tokens"], tmp_path, plan, progress=False)
    first = (tmp_path / feat.shard_name(0)).read_bytes()
    second = (tmp_path / feat.shard_name(1)).read_bytes()
    os.remove(tmp_path / feat.shard_name(1))
    computed = []
    original = feat.shard_tensors
    monkeypatch.setattr(
        feat, "shard_tensors", lambda p, t, o, s, m: computed.append(s) or original(p, t, o, s, m)
    )
    # A larger budget on resume adds shards; finished ones are skipped.
    feat.dump_features(
        setup["target"],
        setup["tokens"],
        tmp_path,
        dataclasses.replace(plan, max_tokens=12 * SEQ),
        progress=False,
    )
    assert computed == [1, 2]
    assert (tmp_path / feat.shard_name(0)).read_bytes() == first
    assert (tmp_path / feat.shard_name(1)).read_bytes() == second
    assert len(feat.FeatureData(tmp_path)) == 12
    other = load_target(save_hf_target(build_hf_target("llama", seed=7, **TINY), tmp_path / "other"))
    with pytest.raises(ValueError, match="different target"):
        feat.dump_features(other, setup["tokens"], tmp_path, plan, progress=False)
    with pytest.raises(ValueError, match="other settings.*seq_len"):
        feat.dump_features(
            setup["target"],
            setup["tokens"],
            tmp_path,
            feat.FeaturePlan(seq_len=16, shard_sequences=4, batch_size=4, max_tokens=8 * SEQ),
            progress=False,
        )
    # another token file of the same length: it mixed two corpora in one dump (only the length was kept)
    swapped = np.roll(np.asarray(setup["tokens"]), 1)
    with pytest.raises(ValueError, match="other settings.*tokens_sha256"):
        feat.dump_features(setup["target"], swapped, tmp_path, plan, progress=False)
    meta = json.loads((tmp_path / feat.META_NAME).read_text())
    del meta["plan"]["tokens_sha256"]  # a dump from before the hash: it still resumes
    (tmp_path / feat.META_NAME).write_text(json.dumps(meta))
    feat.dump_features(setup["target"], setup["tokens"], tmp_path, plan, progress=False)


def test_a_dump_resumed_with_a_larger_budget_rewrites_the_short_last_shard(setup, tmp_path, monkeypatch):
    """6 sequences in shards of 4 leave a last shard of 2; a resume to 8 plans 4 there: the short
    shard is computed again (kept, FeatureData read rows past its end as empty tensors)."""
    plan = feat.FeaturePlan(seq_len=SEQ, shard_sequences=4, batch_size=4, max_tokens=6 * SEQ)
    feat.dump_features(setup["target"], setup["tokens"], tmp_path, plan, progress=False)
    computed = []
    original = feat.shard_tensors
    monkeypatch.setattr(
        feat, "shard_tensors", lambda p, t, o, s, m: computed.append(s) or original(p, t, o, s, m)
    )
    bigger = dataclasses.replace(plan, max_tokens=8 * SEQ)
    feat.dump_features(setup["target"], setup["tokens"], tmp_path, bigger, progress=False)
    assert computed == [1]
    data = feat.FeatureData(tmp_path)
    assert len(data) == 8 and data[list(range(8))]["input_ids"].shape == (8, SEQ)
    fresh = tmp_path / "fresh"
    feat.dump_features(setup["target"], setup["tokens"], fresh, bigger, progress=False)
    assert torch.equal(feat.FeatureData(fresh)[list(range(8))]["hidden"], data[list(range(8))]["hidden"])
    # a shard whose rows do not match meta.json (written by another plan) is refused by FeatureData
    (tmp_path / feat.shard_name(1)).write_bytes((tmp_path / feat.shard_name(0)).read_bytes())
    meta = json.loads((tmp_path / feat.META_NAME).read_text())
    meta["num_sequences"] = 7
    meta["plan"]["max_tokens"] = 7 * SEQ
    (tmp_path / feat.META_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="holds 4 sequences where meta.json plans 3"):
        feat.FeatureData(tmp_path)


def test_feature_dump_bad_input(setup, tmp_path):
    target, plan = setup["target"], feat.FeaturePlan(seq_len=SEQ, max_tokens=4 * SEQ)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        feat.dump_features(target, np.zeros(SEQ - 1, np.uint16), tmp_path / "a", plan, progress=False)
    with pytest.raises(ValueError, match="outside the target's vocabulary"):
        feat.dump_features(target, np.full(4 * SEQ, VOCAB, np.uint16), tmp_path / "b", plan, progress=False)
    long_plan = feat.FeaturePlan(seq_len=setup["target"].config.max_position_embeddings + 1, max_tokens=10**6)
    with pytest.raises(ValueError, match="exceeds the target's max_position_embeddings"):
        feat.dump_features(target, setup["tokens"], tmp_path / "long", long_plan, progress=False)
    with pytest.raises(ValueError, match="source must be one of"):
        feat.dump_features(
            target, setup["tokens"], tmp_path / "c", feat.FeaturePlan(source="web"), progress=False
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        feat.load_token_file(tmp_path / "missing.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="not a readable .npy"):
        feat.load_token_file(tmp_path / "text.npy")
    np.save(tmp_path / "floats.npy", np.zeros(10))
    with pytest.raises(ValueError, match="1-D integer"):
        feat.load_token_file(tmp_path / "floats.npy")


def test_feature_directory_errors(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        feat.FeatureData(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no features"):
        feat.FeatureData(tmp_path)
    (tmp_path / feat.META_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        feat.FeatureData(tmp_path)
    plan = feat.FeaturePlan(seq_len=SEQ, shard_sequences=4, batch_size=4, max_tokens=8 * SEQ)
    d = tmp_path / "d"
    feat.dump_features(setup["target"], setup["tokens"], d, plan, progress=False)
    (d / feat.shard_name(1)).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        feat.FeatureData(d)
    os.remove(d / feat.shard_name(1))
    with pytest.raises(ValueError, match="incomplete: 1 of 2 shards missing"):
        feat.FeatureData(d)
    with pytest.raises(IndexError, match="outside"):
        setup["data"][[32]]


def test_full_disk_gives_a_clear_error_and_no_partial_file(setup, tmp_path, monkeypatch):
    def no_space(tensors, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    plan = feat.FeaturePlan(seq_len=SEQ, shard_sequences=4, batch_size=4, max_tokens=4 * SEQ)
    with pytest.raises(OSError, match="disk is full") as info:
        feat.dump_features(setup["target"], setup["tokens"], tmp_path, plan, progress=False)
    assert info.value.errno == errno.ENOSPC and feat.shard_name(0) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [feat.META_NAME]
    # Not enough room for the estimated size: refused before any computation.
    monkeypatch.setattr(feat.shutil, "disk_usage", lambda path: _Usage(free=0))
    with pytest.raises(OSError, match="needs about .* MiB"):
        feat.dump_features(setup["target"], setup["tokens"], tmp_path / "x", plan, progress=False)


class _Usage:
    def __init__(self, free):
        self.free = free


# --------------------------------------------------------------------------------------------------
# The differentiable forward and the loss
# --------------------------------------------------------------------------------------------------
# float64 shows the two forwards compute the same function; float32 differs only by the rounding
# of differently ordered sums (the C++ GEMM and attention kernels vs torch's), DESIGN §6's 1e-5.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_training_forward_equals_inference_forward(setup, dtype, tol):
    target = load_target(setup["target_dir"], dtype=dtype)
    head = random_draft(target, "eagle2", init_std=0.2, seed=3)
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 19, 64, generator=gen, dtype=dtype)
    tokens = torch.randint(0, VOCAB, (3, 19), generator=gen)
    pred = th.training_forward(head, features, tokens)
    with torch.no_grad():
        ref = head(features, tokens, head.new_cache(3, 19)).hidden
    assert (pred.detach() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


def _draft_chain(head, features, tokens, t: int, k: int) -> torch.Tensor:
    """The inference head drafting a chain: rows ``0..t-k`` fed the target's features, then rows
    ``t-k+1..t`` each fed the previous row's output (a depth-``k + 1`` node); returns row ``t``'s
    output ``[B, H]``."""
    B = features.shape[0]
    cache = head.new_cache(B, t + 1)
    out = head(features[:, : t - k + 1], tokens[:, : t - k + 1], cache).hidden
    cache.advance(t - k + 1)
    for p in range(t - k + 1, t + 1):
        out = head(out[:, -1:], tokens[:, p : p + 1], cache).hidden
        cache.advance(1)
    return out[:, 0]


def test_unrolled_steps_are_what_the_head_computes_when_it_drafts(setup):
    target = load_target(setup["target_dir"], dtype=torch.float64)
    head = random_draft(target, "eagle2", init_std=0.2, seed=4)
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 11, 64, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (2, 11), generator=gen)
    preds = th.unrolled_training_forward(head, features, tokens, steps=4)
    assert preds.shape == (4, 2, 11, 64)
    torch.testing.assert_close(preds[0], th.training_forward(head, features, tokens), rtol=0, atol=0)
    with torch.no_grad():
        for k in (1, 2, 3):
            for t in (k, k + 2, 10):
                ref = _draft_chain(head, features, tokens, t, k)
                torch.testing.assert_close(preds[k][:, t], ref, rtol=1e-10, atol=1e-10)
        # Not the same as being fed the target's features (the test would pass for a no-op unroll).
        assert (preds[2][:, 10] - preds[0][:, 10]).abs().max() > 1e-3


def test_unrolled_masks():
    m = th.unrolled_attention_mask(4, 2)
    # row t of step 2 sees step 0's rows <= t - 2, step 1's row t - 1 and its own row t
    expect = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0],
            [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
            [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expect)
    loss = th.unrolled_loss_masks(torch.tensor([[1.0, 1, 1, 1, 1], [0, 1, 1, 0, 1]]), 3)
    assert loss.tolist() == [
        [[1, 1, 1, 1, 1], [0, 1, 1, 0, 1]],
        [[0, 1, 1, 1, 1], [0, 0, 1, 0, 0]],
        [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]],
    ]


def test_unrolled_training_improves_the_drafted_steps(setup, tmp_path):
    """Training-time test: the head trained on its own drafted features agrees with the target more
    often at the drafted steps than the same run trained on step 0 only."""
    target, data = setup["target"], setup["data"]
    _, val = th.split_indices(len(data), _cfg().val_fraction, 0)
    cfg3 = _cfg(epochs=8, unroll_steps=3)
    plain = th.train_head(target, data, tmp_path / "plain", _cfg(epochs=8), progress=False)
    unrolled = th.train_head(target, data, tmp_path / "unrolled", cfg3, progress=False)
    assert "val_top1_by_step" not in plain and len(unrolled["val_top1_by_step"]) == 3
    assert unrolled["val_top1_by_step"][0] == unrolled["val_top1"]
    plain_steps = th.validate(load_draft(tmp_path / "plain", target), data, val, cfg3)
    assert plain_steps["val_v_loss"] == pytest.approx(plain["val_v_loss"])
    for k in (1, 2):
        assert unrolled["val_v_loss_by_step"][k] < plain_steps["val_v_loss_by_step"][k]
    records = [
        json.loads(line) for line in (tmp_path / "unrolled" / th.METRICS_NAME).read_text().splitlines()
    ]
    logged = [r for r in records if "v_loss" in r]
    assert logged and all(len(r["top1_by_step"]) == 3 and r["loss_unrolled"] > r["loss"] for r in logged)
    assert _state(tmp_path / "unrolled")["config"]["unroll_steps"] == 3


def test_gradients_reach_every_trainable_weight_and_not_the_embedding(setup):
    head = random_draft(setup["target"], "eagle2", seed=1)
    features, tokens = torch.randn(2, 9, 64), torch.randint(0, VOCAB, (2, 9))
    th.training_forward(head, features, tokens).square().sum().backward()
    for name, p in head.named_parameters():
        if name == "embed_tokens.weight":
            assert not p.requires_grad and p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_sums_match_their_definition():
    gen = torch.Generator().manual_seed(0)
    pred, tgt = (
        torch.randn(2, 5, 8, generator=gen, dtype=torch.float64),
        torch.randn(2, 5, 8, generator=gen, dtype=torch.float64),
    )
    lm_head = torch.randn(11, 8, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.float64)
    sums = th.loss_sums(pred, tgt, mask, lm_head)
    v = p = agree = 0.0
    for b in range(2):
        for t in range(5):
            if not mask[b, t]:
                continue
            d = (pred[b, t] - tgt[b, t]).abs()
            v += torch.where(d < 1, 0.5 * d**2, d - 0.5).mean().item()
            q = torch.softmax(lm_head @ tgt[b, t], 0)
            p -= (q * torch.log(torch.softmax(lm_head @ pred[b, t], 0))).sum().item()
            agree += float((lm_head @ pred[b, t]).argmax() == (lm_head @ tgt[b, t]).argmax())
    assert sums.rows.item() == 7
    assert sums.v.item() == pytest.approx(v, rel=1e-5) and sums.p.item() == pytest.approx(p, rel=1e-5)
    assert sums.correct.item() == agree


def test_noise_is_bounded_and_independent_of_batch_layout():
    a = th.uniform_noise([5, 9], step=3, seed=1, shape=(4, 6), scale=0.1, device="cpu")
    b = th.uniform_noise([9], step=3, seed=1, shape=(4, 6), scale=0.1, device="cpu")
    assert torch.equal(a[1], b[0]) and a.abs().max() <= 0.1 and a.abs().max() > 0.05
    assert not torch.equal(a, th.uniform_noise([5, 9], step=4, seed=1, shape=(4, 6), scale=0.1, device="cpu"))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = th.HeadTrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    rates = [th.learning_rate(s, cfg, total_steps=20) for s in range(21)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(rates[4:], rates[5:])) and rates[20] == pytest.approx(0.1)


# --------------------------------------------------------------------------------------------------
# Training, resume, checkpoints
# --------------------------------------------------------------------------------------------------
def _state(out_dir):
    return torch.load(out_dir / th.STATE_NAME, weights_only=False)


def test_training_reduces_the_loss_and_saves_a_loadable_head(setup, tmp_path):
    target, data = setup["target"], setup["data"]
    cfg = _cfg(epochs=6, tau_prompts=2)
    _, val = th.split_indices(len(data), cfg.val_fraction, cfg.seed)
    before = th.validate(random_draft(target, "eagle2", seed=cfg.seed), data, val, cfg)
    last = th.train_head(target, data, tmp_path, cfg, progress=False)
    assert last["val_v_loss"] < 0.9 * before["val_v_loss"] and last["val_p_loss"] < before["val_p_loss"]
    assert last["tau"] >= 1.0
    records = [json.loads(line) for line in (tmp_path / th.METRICS_NAME).read_text().splitlines()]
    assert sum("val_v_loss" in r for r in records) == 6 and all(
        r["tokens_per_s"] > 0 for r in records if "v_loss" in r
    )
    head = load_draft(tmp_path, target)
    trained = _state(tmp_path)["head"]
    for k, v in head.state_dict().items():
        assert torch.equal(v, trained[k]), k
    features, tokens = data[[0]]["hidden"][:, :-1], data[[0]]["input_ids"][:, 1:]
    torch.testing.assert_close(
        head(features, tokens, head.new_cache(1, SEQ - 1)).hidden,
        th.training_forward(head, features, tokens),
        rtol=1e-6,
        atol=1e-6,
    )


def test_resume_continues_identically(setup, tmp_path):
    target, data = setup["target"], setup["data"]
    th.train_head(target, data, tmp_path / "straight", _cfg(max_steps=9), progress=False)
    th.train_head(target, data, tmp_path / "split", _cfg(max_steps=4), progress=False)
    assert _state(tmp_path / "split")["step"] == 4
    th.train_head(target, data, tmp_path / "split", _cfg(max_steps=9, lr=1.0), resume=True, progress=False)
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert a["step"] == b["step"] == 9 and b["config"]["lr"] == _cfg().lr  # the checkpoint's settings win
    for k in a["head"]:
        assert torch.equal(a["head"][k], b["head"][k]), k
    assert a["history"] == b["history"]


def test_a_checkpoint_from_before_unrolling_resumes_with_one_step():
    saved = dataclasses.asdict(_cfg())
    del saved["unroll_steps"], saved["unroll_weight"]
    resolved = th._resolve_config(_cfg(unroll_steps=3), saved)  # the checkpoint's settings win
    assert resolved.unroll_steps == 1 and resolved.unroll_weight == 0.8


def test_save_dtype_float16(setup, tmp_path):
    th.train_head(
        setup["target"], setup["data"], tmp_path, _cfg(max_steps=1, save_dtype="float16"), progress=False
    )
    head16 = load_draft(tmp_path, load_target(setup["target_dir"], dtype=torch.float16))
    assert head16.dtype == torch.float16
    trained = _state(tmp_path)["head"]
    assert torch.equal(head16.fc.weight, trained["fc.weight"].half())


def test_throughput_measurement_runs_fp32_and_bf16_autocast(setup):
    rates = th.measure_throughput(setup["target"], setup["data"], _cfg(), steps=1, rounds=1)
    assert set(rates) == {"float32", "bf16_autocast"} and all(r > 0 for r in rates.values())


def test_bf16_autocast_training_reduces_the_loss(setup, tmp_path):
    target, data = setup["target"], setup["data"]
    cfg = _cfg(epochs=3, autocast_bf16=True)
    _, val = th.split_indices(len(data), cfg.val_fraction, cfg.seed)
    before = th.validate(random_draft(target, "eagle2", seed=cfg.seed), data, val, cfg)
    last = th.train_head(target, data, tmp_path, cfg, progress=False)
    assert last["val_v_loss"] < before["val_v_loss"]


def test_training_errors(setup, tmp_path):
    target, data = setup["target"], setup["data"]
    other = load_target(save_hf_target(build_hf_target("llama", seed=5, **TINY), tmp_path / "other"))
    with pytest.raises(ValueError, match="different target .*lm_head fingerprints differ"):
        th.train_head(other, data, tmp_path / "o", _cfg(), progress=False)
    wide = load_target(
        save_hf_target(
            build_hf_target("llama", seed=0, vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2),
            tmp_path / "wide",
        )
    )
    with pytest.raises(ValueError, match="different target: hidden_size=64 there, 96"):
        th.train_head(wide, data, tmp_path / "w", _cfg(), progress=False)
    head_dir = tmp_path / "head"
    th.train_head(target, data, head_dir, _cfg(max_steps=1), progress=False)
    with pytest.raises(ValueError, match="does not fit the target: hidden_size"):
        th.make_head(wide, _cfg(), head_dir)
    with pytest.raises(ValueError, match="already holds a training run"):
        th.train_head(target, data, head_dir, _cfg(), progress=False)
    small = tmp_path / "small"
    feat.dump_features(
        target, setup["tokens"], small, feat.FeaturePlan(seq_len=SEQ, max_tokens=8 * SEQ), progress=False
    )
    with pytest.raises(ValueError, match="feature data differs"):
        th.train_head(target, feat.FeatureData(small), head_dir, _cfg(), resume=True, progress=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        th.train_head(target, feat.FeatureData(small), tmp_path / "s", _cfg(batch_size=8), progress=False)
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        th.train_head(target, data, tmp_path / "m", _cfg(), ctx=th.DistContext(world_size=3), progress=False)
    with pytest.raises(ValueError, match="unroll_steps >= 1"):
        th.train_head(target, data, tmp_path / "u", _cfg(unroll_steps=0), progress=False)
    with pytest.raises(ValueError, match="unroll_weight > 0"):
        th.train_head(target, data, tmp_path / "u", _cfg(unroll_weight=float("inf")), progress=False)
    with pytest.raises(ValueError, match=f"unroll_steps={SEQ} leaves its last steps no rows"):
        th.train_head(target, data, tmp_path / "u", _cfg(unroll_steps=SEQ), progress=False)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        th.train_head(target, data, tmp_path / "t", _cfg(tau_prompts=1, tau_new_tokens=600), progress=False)
    for field, value in (
        ("tau_new_tokens", 0),
        ("save_every_steps", 0),
        ("max_steps", 0),
        ("tau_prompts", -1),
        ("log_every_steps", 0),
    ):
        with pytest.raises(ValueError, match=field):
            th.train_head(target, data, tmp_path / "v", _cfg(**{field: value}), progress=False)


def test_a_resume_refuses_given_settings_it_would_ignore_and_says_when_a_run_is_finished(
    setup, tmp_path, capsys
):
    """A resume continues with the run's own settings: a flag given with another value used to be
    dropped silently (and a finished run printed {} and exited 0)."""
    target, data = setup["target"], setup["data"]
    out = tmp_path / "run"
    th.train_head(target, data, out, _cfg(epochs=1), progress=False)
    args = ["--target", str(setup["target_dir"]), "--data", str(data.dir), "--out", str(out), "--resume"]
    assert th.main([*args, "--epochs", "3", "--lr", "0.005", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "these given ones differ: epochs=3 (the run has 1), lr=0.005 (the run has " in err, err
    assert th.main([*args, "--epochs", "1", "--max-steps", "100", "--quiet"]) == 0  # same value; run-control
    assert "finished its 1 epochs" in capsys.readouterr().err
    assert th.explicit_fields(
        ["--target", "t", "--data", "d", "--out", "o", "--batch", "8", "--no-bias"]
    ) == {
        "batch_size",
        "bias",
    }


def test_command_lines(setup, tmp_path, capsys):
    root = setup["root"]
    args = [
        "--target",
        str(setup["target_dir"]),
        "--tokens",
        str(root / "tokens.npy"),
        "--out",
        str(tmp_path / "f"),
    ]
    assert feat.main([*args, "--eagle3", "--quiet"]) == 2
    assert "need a target with >= 4 layers, got 2" in capsys.readouterr().err
    assert (
        feat.main(
            [
                *args,
                "--seq-len",
                "16",
                "--max-tokens",
                "160",
                "--source",
                "generate",
                "--prompt-len",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    data = feat.FeatureData(tmp_path / "f")
    assert len(data) == 10 and data.plan.source == "generate" and data[[0]]["hidden"].shape == (1, 16, 64)
    # generate's settings on corpus windows were recorded in the plan and ignored (then a resume with
    # other, equally meaningless values was refused)
    for flags in (["--temperature", "0.7"], ["--mask-prompt"], ["--prompt-len", "4", "--mask-prompt"]):
        assert feat.main([*args, "--out", str(tmp_path / "c"), *flags, "--quiet"]) == 2
        assert "apply to --source generate only" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    train = [
        "--target",
        str(setup["target_dir"]),
        "--data",
        str(tmp_path / "f"),
        "--out",
        str(tmp_path / "h"),
    ]
    assert th.main([*train, "--batch", "2", "--max-steps", "2", "--tau-prompts", "0", "--quiet"]) == 0
    assert load_draft(tmp_path / "h", setup["target"]).kind == "eagle2"
    assert th.main([*train, "--quiet"]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (
        th.main(["--target", str(setup["target_dir"]), "--data", str(tmp_path), "--out", str(tmp_path / "x")])
        == 2
    )
    assert "holds no features" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Non-finite values, bad settings, init heads and output directories
# --------------------------------------------------------------------------------------------------
def test_a_non_finite_step_stops_training_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    """One inf feature made every later step NaN; the NaN head replaced the good checkpoint and the
    run exited 0."""
    target, data = setup["target"], setup["data"]
    real_split, calls = th.split_batch, []

    def poisoned_at_step_3(batch, device):
        f_in, tok, f_tgt, mask = real_split(batch, device)
        calls.append(1)
        if len(calls) == 4:
            f_in = f_in.clone()
            f_in[0, 0, 0] = float("inf")
        return f_in, tok, f_tgt, mask

    monkeypatch.setattr(th, "split_batch", poisoned_at_step_3)
    with pytest.raises(FloatingPointError, match="step 3: the loss or its gradient is not finite"):
        th.train_head(target, data, tmp_path, _cfg(max_steps=6, save_every_steps=1), progress=False)
    state = _state(tmp_path)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["head"].values())
    head = load_draft(tmp_path, target)
    assert all(torch.isfinite(p).all() for p in head.parameters())


def test_the_feature_dump_refuses_non_finite_features(setup, tmp_path, monkeypatch):
    target, real = setup["target"], feat.target_features
    plan16 = feat.FeaturePlan(seq_len=SEQ, max_tokens=4 * SEQ, dtype="float16")

    def overflowing(target, ids, layers=None):
        hidden, layer_hidden = real(target, ids, layers)
        return hidden * 1e6, layer_hidden  # finite in float32, inf in float16

    monkeypatch.setattr(feat, "target_features", overflowing)
    with pytest.raises(
        ValueError, match=r"shard 0, sequences 0\.\.3: hidden has NaN or inf .*cast to torch.float16"
    ):
        feat.dump_features(target, setup["tokens"], tmp_path / "f16", plan16, progress=False)

    def nan(target, ids, layers=None):
        hidden, layer_hidden = real(target, ids, layers)
        return hidden * float("nan"), layer_hidden

    monkeypatch.setattr(feat, "target_features", nan)
    with pytest.raises(ValueError, match="hidden has NaN or inf values .from the target's output"):
        feat.dump_features(target, setup["tokens"], tmp_path / "nan", plan16, progress=False)


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("grad_clip", float("nan")),
        ("grad_clip", float("inf")),
        ("noise", float("inf")),
        ("noise", float("nan")),
        ("p_weight", -1.0),
        ("v_weight", float("nan")),
        ("weight_decay", -5.0),
        ("betas", (0.9, 1.0)),
    ],
)
def test_settings_that_would_train_a_nan_or_inverted_head_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        _cfg(**{field: value}).validate()


def test_a_run_from_a_bias_free_head_without_its_embedding_resumes(setup, tmp_path):
    """The LLaMA-3 layout: an init head without fc.bias (and without embed_tokens, which load_draft
    allows) crashed, and a run from a bias-free head could not be resumed without --no-bias."""
    target, data = setup["target"], setup["data"]
    init = random_draft(target, "eagle2", bias=False, seed=3)
    init_dir = tmp_path / "init"
    save_head_without_embedding(init, init_dir, target)
    th.train_head(target, data, tmp_path / "straight", _cfg(max_steps=5), init_head=init_dir, progress=False)
    th.train_head(target, data, tmp_path / "split", _cfg(max_steps=2), init_head=init_dir, progress=False)
    assert _state(tmp_path / "split")["config"]["bias"] is False
    th.train_head(target, data, tmp_path / "split", _cfg(max_steps=5), resume=True, progress=False)
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert "fc.bias" not in b["head"] and "embed_tokens.weight" in b["head"]
    for k in a["head"]:
        assert torch.equal(a["head"][k], b["head"][k]), k
    with pytest.raises(ValueError, match="--no-bias was not given, but the --init-head head has no fc.bias"):
        th.train_head(
            target,
            data,
            tmp_path / "c",
            _cfg(max_steps=1),
            init_head=init_dir,
            explicit={"bias"},
            progress=False,
        )


def save_head_without_embedding(head, directory, target):
    """The head in the official layout minus ``embed_tokens.weight`` (which some head files omit)."""
    from eagle.models.draft import official_state_dict

    state = {k: v for k, v in official_state_dict(head).items() if k != "embed_tokens.weight"}
    write_state_dict(directory, state)
    (directory / "config.json").write_text(json.dumps(official_config(head)))
    assert load_draft(directory, target).embed_tokens is None


def test_a_new_run_refuses_an_out_dir_that_holds_a_head(setup, tmp_path):
    target, data = setup["target"], setup["data"]
    head_dir = tmp_path / "downloaded"
    th.save_head(random_draft(target, "eagle2", seed=1), head_dir, torch.float32)
    with pytest.raises(ValueError, match="is the --init-head directory"):
        th.train_head(target, data, head_dir, _cfg(max_steps=1), init_head=head_dir, progress=False)
    with pytest.raises(
        ValueError, match="already holds config.json, model.safetensors .and no training state"
    ):
        th.train_head(target, data, head_dir, _cfg(max_steps=1), progress=False)


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_interrupted_before_its_first_checkpoint_starts_again(setup, tmp_path, resume):
    """It leaves metrics.jsonl and no state (a record every 10 steps, a checkpoint every 500): both a
    rerun and --resume start from step 0 and drop the old records, even a line cut off mid-write."""
    target, data = setup["target"], setup["data"]
    (tmp_path / th.METRICS_NAME).write_text('{"step": 2, "loss": 9.0}\n{"step": 4, "lo')
    th.train_head(target, data, tmp_path, _cfg(max_steps=2), resume=resume, progress=False)
    records = [json.loads(line) for line in (tmp_path / th.METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in records] == [2] and records[0]["loss"] != 9.0


def test_a_resume_drops_the_records_logged_after_the_checkpoint_and_times_its_first_window(
    setup, tmp_path, monkeypatch
):
    """A crash after step 7 of a run checkpointed at step 6 left step 7's record (logged again by the
    resumed run); and the resumed first window (steps 7-8) was timed as a whole interval of 4 steps,
    doubling its tokens/s. A fake clock advances one second per training step."""
    target, data = setup["target"], setup["data"]
    cfg = _cfg(max_steps=10, save_every_steps=6, log_every_steps=4)
    th.train_head(target, data, tmp_path, dataclasses.replace(cfg, max_steps=6), progress=False)
    with open(tmp_path / th.METRICS_NAME, "a") as f:
        f.write(json.dumps({"step": 7, "loss": 1.0}) + '\n{"step": 8, ')  # the crashed run's, cut off
    clock = [0.0]
    real_step = th._Trainer.step

    def one_second_per_step(self, sequences):
        clock[0] += 1.0
        return real_step(self, sequences)

    monkeypatch.setattr(th.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(th._Trainer, "step", one_second_per_step)
    th.train_head(target, data, tmp_path, cfg, resume=True, progress=False)
    records = [json.loads(line) for line in (tmp_path / th.METRICS_NAME).read_text().splitlines()]
    logged = [r for r in records if "v_loss" in r]
    assert [r["step"] for r in logged] == [4, 6, 8, 10]
    assert {"step": 7, "loss": 1.0} not in records
    tokens_per_step = cfg.batch_size * (data.seq_len - 1)
    assert [r["tokens_per_s"] for r in logged[2:]] == pytest.approx([tokens_per_step] * 2)


def test_bad_threads_devices_and_dtypes_are_clean_errors(setup, tmp_path, capsys):
    """--threads -1 ended in torch's RuntimeError, --device meta in a NotImplementedError deep inside
    training, and features' --target-dtype int8 in an uncaught TypeError: each a traceback."""
    head_args = [
        "--target",
        str(setup["target_dir"]),
        "--data",
        str(setup["data"].dir),
        "--out",
        str(tmp_path),
    ]
    for bad in (["--threads", "-1"], ["--threads", "x"], ["--device", "meta"], ["--device", "mps"]):
        with pytest.raises(SystemExit) as exit_:
            th.main([*head_args, *bad, "--quiet"])
        assert exit_.value.code == 2, bad
        assert f"argument {bad[0]}: must be" in capsys.readouterr().err
    feat_args = ["--target", str(setup["target_dir"]), "--tokens", str(setup["root"] / "tokens.npy")]
    with pytest.raises(SystemExit):
        feat.main([*feat_args, "--out", str(tmp_path / "f"), "--threads", "0"])
    assert "argument --threads: must be a positive integer" in capsys.readouterr().err
    assert feat.main([*feat_args, "--out", str(tmp_path / "f"), "--target-dtype", "int8", "--quiet"]) == 2
    assert "eagle.train.features: error: dtype must be one of" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")
def test_device_cuda_without_cuda_is_a_clean_error(setup, tmp_path, capsys):
    args = ["--target", str(setup["target_dir"]), "--data", str(setup["data"].dir), "--out", str(tmp_path)]
    assert th.main([*args, "--device", "cuda", "--quiet"]) == 2
    assert "device 'cuda': this torch sees no CUDA device" in capsys.readouterr().err


def test_a_run_saved_with_a_bias_setting_its_head_contradicts_resumes_with_the_heads_layout(setup, tmp_path):
    """Before the init head's layout set the run's bias, a biased --init-head run with --no-bias saved
    bias=false; resuming it with its original flags must keep working."""
    target, data = setup["target"], setup["data"]
    init = tmp_path / "init"
    th.save_head(random_draft(target, "eagle2", seed=2), init, torch.float32)
    out = tmp_path / "run"
    th.train_head(target, data, out, _cfg(max_steps=2), init_head=init, progress=False)
    state = _state(out)
    state["config"]["bias"] = False  # what the earlier code saved for that run
    torch.save(state, out / th.STATE_NAME)
    cfg = _cfg(max_steps=4, bias=False)
    th.train_head(target, data, out, cfg, resume=True, init_head=init, explicit={"bias"}, progress=False)
    assert _state(out)["step"] == 4 and "fc.bias" in _state(out)["head"]


# --------------------------------------------------------------------------------------------------
# EAGLE-3 heads
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eagle3_setup(tmp_path_factory, setup):
    """A 4-layer target (EAGLE-3 reads layers 2, L//2, L-3) and its features with the layer inputs."""
    root = tmp_path_factory.mktemp("train_eagle3")
    target_dir = save_hf_target(
        build_hf_target("llama", seed=1, vocab_size=VOCAB, num_hidden_layers=4), root / "t"
    )
    target = load_target(target_dir)
    plan = feat.FeaturePlan(
        seq_len=SEQ,
        shard_sequences=12,
        batch_size=8,
        max_tokens=32 * SEQ,
        feature_layers=list(target.config.eagle3_feature_layers),
    )
    feat.dump_features(target, setup["tokens"], root / "features", plan, progress=False)
    return dict(root=root, target_dir=target_dir, target=target, data=feat.FeatureData(root / "features"))


def _layer_features(B, T, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, 64, generator=gen, dtype=dtype) for _ in range(3))


def test_eagle3_training_forward_equals_inference_forward(eagle3_setup):
    target = load_target(eagle3_setup["target_dir"], dtype=torch.float64)
    head = random_draft(target, "eagle3", draft_vocab=torch.arange(0, VOCAB, 2), init_std=0.2, seed=3)
    feats = _layer_features(3, 13, torch.float64, 0)
    tokens = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(1))
    pred = th.training_forward(head, feats, tokens)
    with torch.no_grad():
        ref = head(head.project_features(*feats), tokens, head.new_cache(3, 13)).hidden
    torch.testing.assert_close(pred.detach(), ref, rtol=1e-12, atol=1e-12)


def test_eagle3_unrolled_steps_are_what_the_head_computes_when_it_drafts(eagle3_setup):
    target = load_target(eagle3_setup["target_dir"], dtype=torch.float64)
    head = random_draft(target, "eagle3", init_std=0.2, seed=4)
    feats = _layer_features(2, 11, torch.float64, 2)
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    preds = th.unrolled_training_forward(head, feats, tokens, steps=3)
    with torch.no_grad():
        first = head.project_features(*feats)
        for k in (1, 2):
            for t in (k, k + 3, 10):
                ref = _draft_chain(head, first, tokens, t, k)
                torch.testing.assert_close(preds[k][:, t].detach(), ref, rtol=1e-12, atol=1e-12)


def test_eagle3_loss_is_the_cross_entropy_against_the_targets_draft_vocabulary_distribution(eagle3_setup):
    target = load_target(eagle3_setup["target_dir"], dtype=torch.float64)
    vocab = torch.tensor([1, 4, 5, 9, 20, 33, 63])
    head = random_draft(target, "eagle3", draft_vocab=vocab, init_std=0.2, seed=5)
    gen = torch.Generator().manual_seed(6)
    preds = torch.randn(2, 2, 5, 64, generator=gen, dtype=torch.float64)
    f_next = torch.randn(2, 5, 64, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.float64)
    sums = th.eagle3_unrolled_loss_sums(preds, f_next, mask, head, target.lm_head_weight)
    target_logits = f_next @ target.lm_head_weight.T
    p = (target_logits[..., vocab]).softmax(-1)  # the draft ids' target ids, by d2t's definition
    logq = (head.lm_head(head.norm(preds[0]))).log_softmax(-1)
    # the reference's position mask: rows whose target token the draft vocabulary lacks get no token
    # loss (each step masks its own predicted row only); the agreement counts every row
    kept = torch.isin(target_logits.argmax(-1), vocab).double()
    assert 0 < kept.sum() < kept.numel() and not bool(kept[:, 0].all())  # both kinds of rows
    assert sums[0].rows.item() == 10 and sums[0].p_rows.item() == kept.sum().item()
    assert sums[0].p.item() == pytest.approx(-((p * logq).sum(-1) * kept).sum().item(), rel=1e-6)
    agree = (vocab[logq.argmax(-1)] == target_logits.argmax(-1)).double().sum()
    assert sums[0].correct.item() == agree.item() and sums[0].v.item() == 0.0
    step1 = torch.nn.functional.pad(mask[:, :-1], (1, 0)) * mask  # no row 0: its chain has no context
    assert sums[1].rows.item() == step1.sum().item() == 8
    assert sums[1].p_rows.item() == (step1 * kept).sum().item()


def test_eagle3_training_learns_a_draft_vocabulary_head_that_loads_and_decodes(eagle3_setup, tmp_path):
    target, data = eagle3_setup["target"], eagle3_setup["data"]
    cfg = _cfg(epochs=3, kind="eagle3", draft_vocab_size=40, unroll_steps=2, tau_prompts=2)
    train, val = th.split_indices(len(data), cfg.val_fraction, cfg.seed)
    vocab = th.draft_vocab_from_data(data, train, 40, VOCAB)
    untrained = random_draft(target, "eagle3", draft_vocab=vocab, seed=cfg.seed)
    before = th.validate(untrained, data, val, cfg, target.lm_head_weight)
    last = th.train_head(target, data, tmp_path, cfg, progress=False)
    assert last["val_p_loss"] < before["val_p_loss"] and last["val_top1"] > before["val_top1"]
    head = load_draft(tmp_path, target)
    assert head.kind == "eagle3" and head.draft_vocab_size == 40
    assert torch.equal(head.to_target_ids(torch.arange(40)), vocab)
    counts = np.bincount(data[train]["input_ids"].numpy().ravel(), minlength=VOCAB)
    assert counts[vocab].min() >= np.delete(counts, vocab.numpy()).max()  # the most frequent 40
    import eagle.api

    m = eagle.api.EagleModel(target, head)
    prompts = [data[[0]]["input_ids"][0, :12].tolist()]
    assert m.generate(prompts, 16).tokens == m.generate(prompts, 16, speculative=False).tokens


def test_eagle3_training_resumes_identically_and_refuses_what_it_cannot_train(eagle3_setup, setup, tmp_path):
    target, data = eagle3_setup["target"], eagle3_setup["data"]
    cfg = dict(kind="eagle3", draft_vocab_size=30)
    th.train_head(target, data, tmp_path / "straight", _cfg(max_steps=5, **cfg), progress=False)
    th.train_head(target, data, tmp_path / "split", _cfg(max_steps=2, **cfg), progress=False)
    th.train_head(target, data, tmp_path / "split", _cfg(max_steps=5, **cfg), resume=True, progress=False)
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "split")
    for k in a["head"]:
        assert torch.equal(a["head"][k], b["head"][k]), k
    with pytest.raises(ValueError, match="stores none: dump the features with --eagle3"):
        th.train_head(setup["target"], setup["data"], tmp_path / "x", _cfg(kind="eagle3"), progress=False)
    with pytest.raises(ValueError, match="draft_vocab_size .EAGLE-3 only."):
        _cfg(draft_vocab_size=10).validate()
    with pytest.raises(ValueError, match="is an eagle3 head, and this run trains eagle2 heads"):
        th.make_head(target, _cfg(), tmp_path / "straight")


def test_eagle3_command_line(eagle3_setup, tmp_path):
    args = ["--target", str(eagle3_setup["target_dir"]), "--data", str(eagle3_setup["data"].dir)]
    args += ["--out", str(tmp_path), "--eagle3", "--draft-vocab-size", "24", "--max-steps", "2"]
    assert th.main([*args, "--batch", "4", "--tau-prompts", "0", "--quiet"]) == 0
    assert load_draft(tmp_path, eagle3_setup["target"]).draft_vocab_size == 24


def test_eagle3_command_line_defaults_and_refusals(eagle3_setup, tmp_path, capsys, monkeypatch):
    """--eagle3 unrolls 7 steps and adds no noise by default, as EAGLE-3's reference; flags of the
    EAGLE-1/2 loss are refused; the vocabulary scan reads token ids only (the features are GBs at scale)."""
    parse = th.build_parser().parse_args
    base = ["--target", "t", "--data", "d", "--out", "o"]
    e3 = th.config_from_args(parse([*base, "--eagle3"]))
    assert (e3.kind, e3.unroll_steps, e3.noise) == ("eagle3", 7, 0.0)
    e2 = th.config_from_args(parse(base))
    assert (e2.kind, e2.unroll_steps, e2.noise) == ("eagle2", 1, 0.1)
    assert th.config_from_args(parse([*base, "--eagle3", "--unroll-steps", "2"])).unroll_steps == 2
    assert th.main([*base, "--eagle3", "--no-bias"]) == 2
    assert "['bias'] do not apply to EAGLE-3 heads" in capsys.readouterr().err
    data = eagle3_setup["data"]
    monkeypatch.setattr(type(data), "__getitem__", lambda self, i: pytest.fail("read the features"))
    assert th.draft_vocab_from_data(data, np.arange(len(data)), 8, VOCAB).shape == (8,)


def test_eagle3_init_head_with_other_feature_layers_needs_features_of_those(eagle3_setup, tmp_path):
    target, data = eagle3_setup["target"], eagle3_setup["data"]
    head = random_draft(target, "eagle3", seed=1)
    th.save_head(head, tmp_path / "init", torch.float32)
    config = json.loads((tmp_path / "init" / "config.json").read_text())
    config["eagle_aux_hidden_state_layer_ids"] = [1, 2, 3]
    config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [0, 1, 2]  # SGLang's: outputs of layers
    (tmp_path / "init" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"entering target layers \[1, 2, 3\]; .* stores \[2, 2, 1\]"):
        th.train_head(
            target,
            data,
            tmp_path / "o",
            _cfg(kind="eagle3", max_steps=1),
            init_head=tmp_path / "init",
            progress=False,
        )


def test_label_logits_are_float32_under_bf16_autocast():
    """Rounded to bf16 the labels' argmax flipped on 0.8% of the bundled target's rows."""
    gen = torch.Generator().manual_seed(0)
    features, lm_head = torch.randn(2, 7, 64, generator=gen), torch.randn(300, 64, generator=gen)
    want = (features @ lm_head.T).softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs, top1 = th.target_distribution(features, lm_head)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, want, rtol=1e-5, atol=1e-7)


def test_eagle3_continuing_a_head_keeps_its_vocabulary_and_layers(eagle3_setup, setup, tmp_path):
    """An init head's draft vocabulary is the run's (a contradicting --draft-vocab-size is refused), its
    own feature layers are trained on when the data has them, and a run saved before EAGLE-3 training
    existed (no kind in its config) refuses --eagle3 on resume instead of training it as EAGLE-1/2."""
    target = eagle3_setup["target"]
    head = random_draft(target, "eagle3", draft_vocab=torch.arange(0, VOCAB, 2), seed=1)
    th.save_head(head, tmp_path / "init", torch.float32)
    with pytest.raises(ValueError, match="has 32 draft tokens .its d2t.; drop --draft-vocab-size"):
        th.train_head(
            target, eagle3_setup["data"], tmp_path / "a", _cfg(kind="eagle3", draft_vocab_size=20, max_steps=1),
            init_head=tmp_path / "init", progress=False,
        )  # fmt: skip
    config = json.loads((tmp_path / "init" / "config.json").read_text())
    config["eagle_aux_hidden_state_layer_ids"] = [1, 2, 3]
    config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [0, 1, 2]  # SGLang's: outputs of layers
    (tmp_path / "init" / "config.json").write_text(json.dumps(config))
    plan = feat.FeaturePlan(
        seq_len=SEQ, shard_sequences=12, batch_size=8, max_tokens=16 * SEQ, feature_layers=[1, 2, 3]
    )
    feat.dump_features(target, setup["tokens"], tmp_path / "f123", plan, progress=False)
    th.train_head(
        target, feat.FeatureData(tmp_path / "f123"), tmp_path / "b", _cfg(kind="eagle3", max_steps=1),
        init_head=tmp_path / "init", progress=False,
    )  # fmt: skip
    assert _state(tmp_path / "b")["config"]["draft_vocab_size"] == 32
    assert load_draft(tmp_path / "b", target).feature_layers == (1, 2, 3)
    old = tmp_path / "old"
    th.train_head(setup["target"], setup["data"], old, _cfg(max_steps=1), progress=False)
    state = _state(old)
    del state["config"]["kind"], state["config"]["draft_vocab_size"]
    torch.save(state, old / th.STATE_NAME)
    with pytest.raises(ValueError, match="kind='eagle3' .the run has 'eagle2'."):
        th.train_head(
            setup["target"], setup["data"], old, _cfg(kind="eagle3", max_steps=2), resume=True,
            explicit={"kind"}, progress=False,
        )  # fmt: skip


def test_an_eagle3_run_resumes_from_the_command_line_with_its_flags_or_without(eagle3_setup, tmp_path):
    """--resume takes the kind from the checkpoint: --draft-vocab-size without --eagle3 was refused
    before the checkpoint was read ("EAGLE-3 only")."""
    args = ["--target", str(eagle3_setup["target_dir"]), "--data", str(eagle3_setup["data"].dir)]
    args += ["--out", str(tmp_path), "--batch", "4", "--tau-prompts", "0", "--quiet"]
    assert th.main([*args, "--eagle3", "--draft-vocab-size", "24", "--max-steps", "1"]) == 0
    assert th.main([*args, "--resume", "--draft-vocab-size", "24", "--max-steps", "2"]) == 0
    assert th.main([*args, "--resume", "--max-steps", "3"]) == 0
    state = _state(tmp_path)
    assert state["step"] == 3 and state["config"]["kind"] == "eagle3" and state["config"]["unroll_steps"] == 7


def test_split_batch_masks_the_rows_of_the_targets_it_returns():
    """Row t of the split predicts position t + 1 from (f_t, x_{t+1}): its loss mask is position
    t + 1's. Every stored mask in the other tests is all ones, so a mask shifted the other way
    (position t's: the prompt's last token trained, the padding's first too) passed them."""
    from eagle.train.head import split_batch

    batch = {
        "hidden": torch.arange(8.0).reshape(1, 4, 2),
        "input_ids": torch.tensor([[10, 11, 12, 13]]),
        "loss_mask": torch.tensor([[0.0, 1.0, 1.0, 0.0]]),  # prompt, two answer tokens, padding
    }
    inputs, ids, targets, mask = split_batch(batch, "cpu")
    assert inputs[0, :, 0].tolist() == [0.0, 2.0, 4.0] and targets[0, :, 0].tolist() == [2.0, 4.0, 6.0]
    assert ids.tolist() == [[11, 12, 13]] and mask.tolist() == [[1.0, 1.0, 0.0]]


def test_the_unrolled_objective_weights_step_k_by_unroll_weight_to_the_k():
    """sum_k w**k * (v_weight * v_k + p_weight * p_k) (EAGLE-3: the cross-entropy alone); a weight of
    w**(k+1), or 1 for every step, survived the training tests (mutation testing)."""
    v = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    p = torch.tensor([10.0, 20.0, 40.0], dtype=torch.float64)
    cfg = th.HeadTrainConfig(unroll_steps=3, unroll_weight=0.5, v_weight=1.0, p_weight=0.1)
    assert th.unrolled_objective(v, p, cfg).item() == pytest.approx(2.0 + 0.5 * 4.0 + 0.25 * 8.0)
    eagle3 = dataclasses.replace(cfg, kind="eagle3")
    assert th.unrolled_objective(v, p, eagle3).item() == pytest.approx(10.0 + 0.5 * 20.0 + 0.25 * 40.0)


def test_step_metrics_divide_the_token_loss_by_its_own_rows():
    """The token loss counts rows whose target token is in the draft vocabulary (p_rows, EAGLE-3's
    reduced vocabulary), the feature loss and top-1 all rows; p_loss divided by all rows survived."""
    total = torch.tensor([[6.0, 3.0, 2.0, 4.0, 2.0], [8.0, 6.0, 1.0, 4.0, 3.0]], dtype=torch.float64)
    got = th.step_metrics(total)
    assert (got["v_loss"], got["p_loss"], got["top1"]) == (1.5, 1.5, 0.5)
    assert got["p_loss_by_step"] == [1.5, 2.0] and got["v_loss_by_step"] == [1.5, 2.0]
    assert "v_loss" not in th.step_metrics(total, "eagle3")


def test_a_nonzero_validation_fraction_holds_out_at_least_one_sequence():
    train, val = th.split_indices(3, 0.1, seed=0)  # round(0.3) = 0
    assert len(val) == 1 and sorted([*train, *val]) == [0, 1, 2]
    assert len(th.split_indices(3, 0.0, seed=0)[1]) == 0


def test_eagle3s_three_inputs_get_noise_drawn_apart():
    """EAGLE-3 trains on three target layers' features: each gets its own noise (the same draw on all
    three, a correlated perturbation, survived the training tests); EAGLE-1/2's one input gets the
    draw of cfg.seed, and no noise leaves the inputs as they are."""
    cfg = th.HeadTrainConfig(noise=0.2, seed=5)
    x = torch.zeros(2, 4, 8)
    noisy = th.with_noise((x, x, x), [0, 1], 3, cfg, "cpu")
    deltas = [n - x for n in noisy]
    assert all(0 < d.abs().max() <= 0.2 for d in deltas)
    assert not torch.equal(deltas[0], deltas[1]) and not torch.equal(deltas[1], deltas[2])
    assert not torch.equal(deltas[0], deltas[2])
    assert torch.equal(
        th.with_noise(x, [0, 1], 3, cfg, "cpu") - x, th.uniform_noise([0, 1], 3, 5, (4, 8), 0.2, "cpu")
    )
    assert th.with_noise(x, [0, 1], 3, dataclasses.replace(cfg, noise=0.0), "cpu") is x
