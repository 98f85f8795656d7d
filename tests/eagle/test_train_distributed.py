"""DDP head training: ``torchrun --nproc_per_node=2`` on CPU (gloo) computes the single-process run.

Each process takes half of every global batch and DDP averages the gradients; the loss is normalised
by the global row count, so after a few steps the weights equal those of one process training on
the whole batch up to float rounding (the order of the gradient sums differs)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

from eagle.models import load_target
from eagle.train import features as feat
from eagle.train import head as th
from tests.eagle.conftest import build_hf_target, save_hf_target

STEPS, BATCH = 3, 4


def _vary_loss_masks(data_dir):
    """Mask a random suffix of each sequence: the processes then hold different numbers of loss rows,
    which only a loss normalised by the global row count averages correctly (Adam hides a mere scale
    error, not a wrong weighting of the processes)."""
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(2)
    for name in feat.read_meta(data_dir)["shards"]:
        tensors = load_file(str(data_dir / name))
        for row in tensors["loss_mask"]:
            row[int(rng.integers(2, row.numel())) :] = 0
        save_file(tensors, str(data_dir / name))


# One launch, with two unrolled steps: step 0 is the one-step recipe, step 1 adds the [steps, 4] metric
# reduction and the per-step loss masks over ragged rows (two launches doubled the time and the exposure
# to a rare gloo abort at process exit seen once in CI).
UNROLL = 2


def test_two_cpu_processes_match_one(tmp_path):
    unroll = UNROLL
    target_dir = save_hf_target(
        build_hf_target("llama", seed=0, vocab_size=64, num_hidden_layers=2), tmp_path / "t"
    )
    target = load_target(target_dir)
    tokens = np.random.default_rng(1).integers(0, 64, 2000).astype(np.uint16)
    plan = feat.FeaturePlan(seq_len=24, shard_sequences=8, batch_size=8, max_tokens=16 * 24)
    feat.dump_features(target, tokens, tmp_path / "f", plan, progress=False)
    _vary_loss_masks(tmp_path / "f")

    common = [
        "--batch",
        str(BATCH),
        "--max-steps",
        str(STEPS),
        "--warmup",
        "1",
        "--lr",
        "3e-3",
        "--tau-prompts",
        "0",
        "--no-bf16",
        "--unroll-steps",
        str(unroll),
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "eagle.train.head", "--target", str(target_dir), "--data", str(tmp_path / "f")]
    cmd += ["--out", str(tmp_path / "ddp"), "--threads", "1", "--quiet", *common]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    cfg = th.HeadTrainConfig(
        batch_size=BATCH,
        max_steps=STEPS,
        warmup_steps=1,
        lr=3e-3,
        tau_prompts=0,
        autocast_bf16=False,
        unroll_steps=unroll,
    )
    th.train_head(target, feat.FeatureData(tmp_path / "f"), tmp_path / "single", cfg, progress=False)

    ddp = torch.load(tmp_path / "ddp" / th.STATE_NAME, weights_only=False)
    single = torch.load(tmp_path / "single" / th.STATE_NAME, weights_only=False)
    assert ddp["step"] == single["step"] == STEPS
    # Tolerance: Adam divides by sqrt(v), which magnifies the rounding of near-zero gradient entries;
    # 2e-5 is still ~500x below the distance each weight moved (lr 3e-3 x 3 steps), which a wrong
    # weighting of the processes' gradients would change at first order.
    initial = th.make_head(target, cfg, None).state_dict()
    for name, weight in single["head"].items():
        torch.testing.assert_close(
            ddp["head"][name], weight, rtol=1e-5, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
        if name != "embed_tokens.weight":  # the weights did move: the comparison is not vacuous
            assert not torch.equal(weight, initial[name]), name


def test_shutdown_frees_the_ddp_wrapper_before_destroying_the_group(tmp_path):
    """The first DDP wrapper of a process stays referenced from a cycle (its __init__ frame), so only
    a garbage collection frees it; shutdown must run one while the group still exists. The test makes
    the cycle itself, as this process may not be holding its first wrapper."""
    import gc
    import weakref

    import torch.distributed as dist

    from eagle.train.distributed import DistContext, shutdown, wrap_module

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    ctx = DistContext(rank=0, world_size=2)  # a distributed run as far as shutdown can tell
    freed_with_group = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        model = wrap_module(torch.nn.Linear(4, 4), ctx)
        model(torch.randn(2, 4)).sum().backward()
        model.__dict__["cycle"] = model
        weakref.finalize(model, lambda: freed_with_group.append(dist.is_initialized()))
        del model
        assert freed_with_group == []  # held by the cycle
        shutdown(ctx)
        assert freed_with_group == [True] and not dist.is_initialized()
    finally:
        if was_enabled:
            gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
