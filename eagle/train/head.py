"""Training an EAGLE-1/2 or EAGLE-3 draft head on dumped target features (the recipes of DESIGN §5).

For a stored sequence of tokens ``x_0..x_{S-1}`` with target features ``f_0..f_{S-1}``, row ``t``
feeds the head ``(f_t + noise, x_{t+1})`` and its output must predict ``f_{t+1}``::

    pred = head(f[:, :-1] + U(-noise, noise), x[:, 1:])          # causal over the sequence
    loss = v_weight * SmoothL1(pred, f[:, 1:])                    # mean over H, masked mean over rows
         + p_weight * CE(softmax(lm_head(f[:, 1:])), lm_head(pred))   # soft labels: the target's own

With ``unroll_steps = n > 1`` (``--unroll-steps``: the "training-time test" of EAGLE-3, also HASS)
the head is also run as it drafts: step ``k`` feeds row ``t`` the head's own step ``k - 1`` output
at row ``t - 1`` instead of ``f_t`` and attends to the context a depth-``k + 1`` tree node sees
(:func:`unrolled_training_forward`); each step adds the loss above, its sums over its own rows divided
by step 0's row count (a step has fewer rows: none within ``k`` of a sequence's or loss span's start)
and weighted ``unroll_weight ** k``.
Deeper draft levels then see at training the kind of input they get when drafting, which the
one-step recipe never shows them.

EAGLE-3 (``kind="eagle3"``, ``--eagle3``; features dumped with ``--eagle3``): row ``t`` feeds the head
``fc(cat(h_low, h_mid, h_high))`` of the hidden states entering target layers (2, L//2, L-3) at row
``t`` (plus noise on each) and ``x_{t+1}``; its draft-vocabulary logits ``lm_head(norm(h))`` are trained
by the cross-entropy against the target's next-token distribution restricted to the draft vocabulary
(the ``draft_vocab_size`` most frequent tokens of the training data, ``d2t``/``t2d``), with no feature
loss; unrolled steps (EAGLE-3's training-time test) feed the head's own output hidden state, and the
objective is ``sum_k unroll_weight ** k * CE_k``. The embedding stays the target's (shared, frozen).

AdamW (0.9, 0.95), linear warm-up then cosine decay, gradient-norm clipping. The embedding and the
lm_head are the target's and stay frozen (the head holds a frozen copy of the embedding and shares
the target's lm_head tensor). Validation after every epoch: feature loss, top-1 agreement of the
head's next-token argmax with the target's, and tau from actually decoding held-out prompts with
EAGLE (:class:`eagle.api.EagleModel`).

The head's own forward runs on ``eagle_kernels`` custom ops that have no autograd formula, so
training uses :func:`training_forward`: the same computation in plain differentiable torch ops
(causal ``scaled_dot_product_attention`` instead of ``tree_attention`` over a cache). The tests
check that it equals the inference forward.

Determinism: the data order of an epoch is a function of ``(seed, epoch)``, the noise of a sequence
a function of ``(seed, step, sequence index)`` and the learning rate a function of the step, so a
run resumed from ``training_state.pt`` continues exactly as if it had not stopped, and N processes
under ``torchrun`` (each taking ``batch / N`` sequences of the same global batch, DDP averaging the
gradients, the loss normalised by the global count of rows) compute the single-process update.

Output directory::

    config.json, model.safetensors   the head in the official EAGLE layout (eagle.models.load_draft)
    training_state.pt                weights (exact), optimizer, step, config, metrics history
    metrics.jsonl                    one JSON record per log interval and per validation

Command line (``torchrun --nproc_per_node=N -m eagle.train.head ...`` for DDP)::

    python -m eagle.train.head --target DIR --data FEATURES --out DIR [--epochs 4 --lr 1e-3 --batch 8]
    python -m eagle.train.head ... --resume          # continue an interrupted run
    python -m eagle.train.head ... --measure         # steps/s with and without bf16 autocast
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eagle._args import checked_device, positive_int
from eagle.models import DraftHead, LlamaModel, load_draft, load_target, random_draft, save_draft
from eagle.models.llama import apply_rope, rope_cos_sin
from eagle.train.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown,
    wrap_module,
)
from eagle.train.features import FeatureData, check_target_matches, write_atomically
from eagle.tree import TreeConfig

STATE_NAME = "training_state.pt"
METRICS_NAME = "metrics.jsonl"
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class HeadTrainConfig:
    """Settings of a head-training run. ``batch_size`` is global (all processes together)."""

    epochs: int = 4
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    betas: tuple[float, float] = (0.9, 0.95)
    noise: float = 0.1
    v_weight: float = 1.0
    p_weight: float = 0.1
    bias: bool = True
    seed: int = 0
    autocast_bf16: bool = True  # measured faster on the 2-core CPU (--measure); exact resume either way
    val_fraction: float = 0.05
    val_max_sequences: int = 64
    tau_prompts: int = 4
    tau_prompt_len: int = 32
    tau_new_tokens: int = 64
    tau_tree: tuple[int, int, int] = (5, 8, 32)  # depth, topk, total_tokens
    save_every_steps: int = 500
    log_every_steps: int = 10
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total
    save_dtype: str = "float32"
    # Training-time test (EAGLE-3, HASS): the head also learns from its own drafted features, unrolled
    # over this many draft levels; step k's loss is weighted unroll_weight ** k. 1: EAGLE-1/2's recipe.
    unroll_steps: int = 1
    unroll_weight: float = 0.8
    # "eagle3": an EAGLE-3 head (fc over three target layers' hidden states, its own norm and lm_head
    # over a draft vocabulary); its loss is the token cross-entropy alone (see the module docstring).
    kind: str = "eagle2"
    draft_vocab_size: int = 0  # EAGLE-3: the training data's most frequent tokens; 0: every token

    def validate(self) -> None:
        if self.kind not in ("eagle2", "eagle3"):
            raise ValueError(f"kind must be 'eagle2' or 'eagle3', got {self.kind!r}")
        if self.draft_vocab_size < 0 or (self.draft_vocab_size and self.kind != "eagle3"):
            raise ValueError(
                f"draft_vocab_size (EAGLE-3 only) must be >= 0 (0: the whole vocabulary), got "
                f"{self.draft_vocab_size} for a {self.kind} head"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        # Comparisons are written so that NaN fails them; inf is refused by name.
        if not (0 < self.lr < math.inf and 0 <= self.min_lr_ratio <= 1 and self.warmup_steps >= 0):
            raise ValueError(
                f"need 0 < lr < inf, 0 <= min_lr_ratio <= 1 and warmup_steps >= 0, got {self.lr}, "
                f"{self.min_lr_ratio}, {self.warmup_steps}"
            )
        if not (0 <= self.noise < math.inf and 0 < self.grad_clip < math.inf):
            raise ValueError(
                f"need 0 <= noise < inf and 0 < grad_clip < inf, got {self.noise}, {self.grad_clip}"
            )
        for name in ("weight_decay", "v_weight", "p_weight"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)}")
        if self.v_weight == 0 and self.p_weight == 0:
            raise ValueError("v_weight and p_weight are both 0: nothing would be trained")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {sorted(SAVE_DTYPES)}, got {self.save_dtype!r}")
        if self.unroll_steps < 1 or not 0 < self.unroll_weight < math.inf:
            raise ValueError(
                f"need unroll_steps >= 1 and unroll_weight > 0, got {self.unroll_steps}, {self.unroll_weight}"
            )
        TreeConfig(*self.tau_tree)
        for name in (
            "tau_prompt_len",
            "tau_new_tokens",
            "save_every_steps",
            "log_every_steps",
            "val_max_sequences",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tau_prompts < 0:
            raise ValueError(f"tau_prompts must be >= 0 (0: no tau measurement), got {self.tau_prompts}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or unset), got {self.max_steps}")


EAGLE3_UNROLL_STEPS = 7  # the command line's default with --eagle3: EAGLE-3's reference unrolls 7 steps

# Fields a resumed run takes from the command line; everything else comes from the checkpoint, so
# that the continuation is exact.
RUN_CONTROL_FIELDS = ("max_steps", "save_every_steps", "log_every_steps", "val_max_sequences", "tau_prompts")


def learning_rate(step: int, cfg: HeadTrainConfig, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------
# The differentiable forward and the loss
# --------------------------------------------------------------------------------------------------
def training_forward(
    head: DraftHead, features: torch.Tensor | Sequence[torch.Tensor], next_tokens: torch.Tensor
) -> torch.Tensor:
    """The head over whole sequences in differentiable torch ops.

    ``features [B, T, H]`` (``f_t``; EAGLE-3: the three feature layers' hidden states, a 3-tuple),
    ``next_tokens`` int ``[B, T]`` (``x_{t+1}``) -> the head's output ``[B, T, H]``; row ``t`` has
    position ``t`` and sees rows ``<= t``. Numerically the head's inference forward on a fresh cache
    (``head(features, next_tokens, head.new_cache(B, T))``; EAGLE-3: of ``head.project_features``).
    """
    return unrolled_training_forward(head, features, next_tokens, steps=1)[0]


def unrolled_training_forward(
    head: DraftHead, features: torch.Tensor | Sequence[torch.Tensor], next_tokens: torch.Tensor, steps: int
) -> torch.Tensor:
    """The head unrolled over ``steps`` draft levels, as it runs when it drafts (training-time test).

    ``features``: EAGLE-1/2, ``[B, T, H]`` (``f_t``); EAGLE-3, the three ``[B, T, H]`` hidden states
    of row ``t`` entering the target's feature layers (``head.feature_layers``). ``next_tokens`` int
    ``[B, T]`` (``x_{t+1}``) -> ``[steps, B, T, H]``, the head's output hidden states (EAGLE-3: before
    its final norm, as :class:`~eagle.models.draft.DraftOutput.hidden`).
    Step 0 is :func:`training_forward`. At step ``k >= 1`` row ``t`` is fed the head's own step
    ``k - 1`` output at row ``t - 1`` instead of the target's features, and
    attends to what a depth-``k + 1`` tree node attends to when drafting: the step-0 rows ``<= t - k``
    (the committed context, fed with target features) and, of each step ``j`` in ``1..k``, the one row
    ``t - k + j`` (the node's ancestors in the tree, then itself). Rows ``t < k`` have no such context;
    their outputs are meaningless and get no loss (:func:`unrolled_loss_masks`). Every step predicts
    ``x_{t+2}`` (EAGLE-1/2 also ``f_{t+1}``): the same targets as step 0, from a drafted input.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if head.kind == "eagle3":
        if isinstance(features, torch.Tensor) or len(features) != 3:
            raise ValueError("an EAGLE-3 head trains on the three feature layers' hidden states (a 3-tuple)")
        layer = head.midlayer
        # fc over the three (plain torch: differentiable); later steps feed the head's own output
        fed = F.linear(torch.cat(tuple(features), dim=-1), head.fc.weight, head.fc.bias)
    elif head.kind == "eagle2":
        layer, fed = head.layers[0], features
    else:
        raise ValueError(f"training_forward implements EAGLE-1/2 and EAGLE-3 heads, got a {head.kind} head")
    B, T, _ = fed.shape
    attn = layer.self_attn
    inv_freq = head._inv_freq.to(fed.device)
    emb = F.embedding(next_tokens, head.embed_weight)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    outputs = []
    for k in range(steps):
        if head.kind == "eagle3":  # Eagle3Layer: attention over cat(norm(emb), norm(h)), residual h
            residual = fed
            x = layer.attention_input(emb, fed)
        else:  # EAGLE-1/2: fc over cat(emb, feature), then a decoder layer without input norm
            residual = x = F.linear(torch.cat((emb, fed), dim=-1), head.fc.weight, head.fc.bias)
        q, key, value = _rotated_qkv(attn, x, inv_freq)
        keys.append(key)
        values.append(value)
        if k == 0:
            out = F.scaled_dot_product_attention(
                q, key, value, is_causal=True, enable_gqa=q.shape[1] != key.shape[1]
            )
        else:
            # K/V repeated per query head: with a mask, SDPA's GQA mode would leave CUDA only the math
            # kernel (scores [B, Hq, T, (k + 1) T] materialised); repeated, the memory-efficient one runs.
            group = q.shape[1] // key.shape[1]
            out = F.scaled_dot_product_attention(
                q,
                torch.cat(keys, 2).repeat_interleave(group, 1),
                torch.cat(values, 2).repeat_interleave(group, 1),
                attn_mask=unrolled_attention_mask(T, k, x.device),
            )
        h = residual + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        outputs.append(h)
        fed = F.pad(h[:, :-1], (0, 0, 1, 0))  # row t is fed the prediction made at row t - 1
    return torch.stack(outputs)


def unrolled_attention_mask(T: int, step: int, device=None) -> torch.Tensor:
    """Bool ``[T, (step + 1) * T]``: which keys row ``t`` of unrolled step ``step`` sees (True: visible).

    Keys are the ``step + 1`` blocks of ``T`` rows of steps ``0..step``: step 0's rows ``<= t - step``,
    and of each step ``j >= 1`` only row ``t - step + j`` (the diagonal shifted by ``step - j``).
    """
    t = torch.arange(T, device=device)[:, None]
    s = torch.arange(T, device=device)[None, :]
    blocks = [s <= t - step] + [s == t - step + j for j in range(1, step + 1)]
    return torch.cat(blocks, 1)


def unrolled_loss_masks(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Float ``[steps, B, T]``: the rows of each unrolled step that get a loss. Step ``k``'s row ``t``
    counts when rows ``t - k .. t`` all do in ``mask [B, T]`` (its whole drafted chain is real)."""
    masks = [mask]
    for _ in range(1, steps):
        masks.append(masks[-1] * F.pad(masks[-1][:, :-1], (1, 0)))
    return torch.stack(masks)


def _rotated_qkv(attn: nn.Module, x: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``q [B, Hq, T, D]``, ``k``, ``v [B, Hkv, T, D]`` of ``x [B, T, H]`` at positions ``0..T-1``."""
    B, T, _ = x.shape
    Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = attn.qkv_proj(x).view(B, T, -1, D)
    qk, v = qkv[:, :, : Hq + Hkv], qkv[:, :, Hq + Hkv :]
    if attn.q_norm is not None:
        qk = torch.cat((attn.q_norm(qk[:, :, :Hq]), attn.k_norm(qk[:, :, Hq:])), dim=2)
    positions = torch.arange(T, device=x.device).expand(B, T)
    cos, sin = rope_cos_sin(inv_freq, positions, qk.dtype)
    qk = apply_rope(qk, cos, sin)
    return qk[:, :, :Hq].transpose(1, 2), qk[:, :, Hq:].transpose(1, 2), v.transpose(1, 2)


class _TrainingModule(nn.Module):
    """The head behind a module boundary, so DistributedDataParallel can hook its gradients."""

    def __init__(self, head: DraftHead, steps: int = 1) -> None:
        super().__init__()
        self.head = head
        self.steps = steps

    def forward(self, features: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        return unrolled_training_forward(self.head, features, next_tokens, self.steps)


@dataclass
class LossSums:
    """Sums over the masked rows of a batch (divide by ``rows`` for means; the token loss by
    ``p_rows``: EAGLE-3 leaves out the rows whose target token its draft vocabulary lacks)."""

    v: torch.Tensor
    p: torch.Tensor
    correct: torch.Tensor
    rows: torch.Tensor
    p_rows: torch.Tensor | None = None  # None: ``rows``

    def as_tensor(self) -> torch.Tensor:
        p_rows = self.rows if self.p_rows is None else self.p_rows
        return torch.stack([self.v.detach(), self.p.detach(), self.correct, self.rows, p_rows]).double()


def target_distribution(
    target_features: torch.Tensor, lm_head: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's next-token probabilities float32 ``[B, T, V]`` and argmax int64 ``[B, T]`` at
    ``target_features [B, T, H]`` (no gradient)."""
    with torch.no_grad():
        logits = _target_logits(target_features, lm_head)
        return logits.softmax(-1), logits.argmax(-1)


def _target_logits(target_features: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """The target's logits float32 ``[B, T, V]``, in float32 even under bf16 autocast: rounded to
    bf16, 0.8% of the label argmaxes flipped on the bundled target."""
    with torch.autocast(target_features.device.type, enabled=False):
        return F.linear(target_features.float(), lm_head.float())


def loss_sums(
    pred: torch.Tensor,
    target_features: torch.Tensor,
    mask: torch.Tensor,
    lm_head: torch.Tensor,
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossSums:
    """Masked sums of the feature loss, the soft-label cross-entropy and the top-1 agreement.

    ``pred``, ``target_features``: ``[B, T, H]``; ``mask`` float ``[B, T]``; ``lm_head [V, H]``;
    ``targets``: :func:`target_distribution` of ``target_features`` when already computed.
    """
    target_probs, target_top1 = targets or target_distribution(target_features, lm_head)
    logp = F.linear(pred, lm_head).float().log_softmax(-1)
    v = F.smooth_l1_loss(pred.float(), target_features.float(), reduction="none").mean(-1)
    p = -(target_probs * logp).sum(-1)
    agree = (logp.argmax(-1) == target_top1).float()
    return LossSums((v * mask).sum(), (p * mask).sum(), (agree * mask).sum().detach(), mask.sum())


def unrolled_loss_sums(
    preds: torch.Tensor, target_features: torch.Tensor, mask: torch.Tensor, lm_head: torch.Tensor
) -> list[LossSums]:
    """:func:`loss_sums` of each step of :func:`unrolled_training_forward` (``preds [steps, B, T, H]``),
    each over its own rows (:func:`unrolled_loss_masks`); the targets are the same for every step."""
    targets = target_distribution(target_features, lm_head)  # once: every step's backward keeps it
    masks = unrolled_loss_masks(mask, preds.shape[0])
    return [loss_sums(p, target_features, m, lm_head, targets) for p, m in zip(preds, masks)]


def eagle3_unrolled_loss_sums(
    preds: torch.Tensor,
    target_features: torch.Tensor,
    mask: torch.Tensor,
    head: DraftHead,
    lm_head: torch.Tensor,
) -> list[LossSums]:
    """Per unrolled step, EAGLE-3's loss sums: the cross-entropy of the head's draft-vocabulary
    distribution (``head.lm_head(head.norm(pred))``) against the target's next-token distribution
    restricted to the draft vocabulary and renormalised (``softmax(lm_head(f_{t+1})[t2d])``), and
    the top-1 agreement in target ids. The cross-entropy leaves out the rows whose target argmax the
    draft vocabulary lacks (the reference's position mask, on the predicted row only; ``p_rows``
    counts the others); the agreement counts every row (such a row is never accepted). No feature
    loss (``v`` is 0). ``preds [steps, B, T, H]``,
    ``target_features [B, T, H]`` (the target's final features ``f_{t+1}``), ``mask`` float ``[B, T]``,
    ``lm_head [V, H]`` (the target's)."""
    with torch.no_grad():
        logits = _target_logits(target_features, lm_head)
        target_top1 = logits.argmax(-1)
        target_probs = logits[..., head.t2d].softmax(-1)  # draft ids are t2d's target ids, in order
        # As the reference: a row whose target token (argmax) is not in the draft vocabulary, which
        # the head can never propose, gets no loss; only the predicted row's own token counts (the
        # chain's inputs are the data's tokens, in the vocabulary or not).
        in_vocab = head.t2d[target_top1].to(mask.dtype)
    sums = []
    for pred, m in zip(preds, unrolled_loss_masks(mask, preds.shape[0])):
        logp = head.lm_head(head.norm(pred)).float().log_softmax(-1)
        p = -(target_probs * logp).sum(-1)
        agree = (head.to_target_ids(logp.argmax(-1)) == target_top1).float()
        zero = p.new_zeros(())
        trained = m * in_vocab
        sums.append(LossSums(zero, (p * trained).sum(), (agree * m).sum().detach(), m.sum(), trained.sum()))
    return sums


def head_loss_sums(
    head: DraftHead,
    preds: torch.Tensor,
    target_features: torch.Tensor,
    mask: torch.Tensor,
    lm_head: torch.Tensor,
) -> list[LossSums]:
    """The loss sums of the head's kind (``lm_head``: the target's)."""
    if head.kind == "eagle3":
        return eagle3_unrolled_loss_sums(preds, target_features, mask, head, lm_head)
    return unrolled_loss_sums(preds, target_features, mask, lm_head)


def stack_sums(per_step: list[LossSums]) -> torch.Tensor:
    """float64 ``[steps, 5]``: each step's (v, p, correct, rows, p_rows) sums, detached."""
    return torch.stack([s.as_tensor() for s in per_step])


def unrolled_objective(v: torch.Tensor, p: torch.Tensor, cfg: HeadTrainConfig) -> torch.Tensor:
    """The loss sum training minimises, from the steps' feature and token loss sums ``v``, ``p [steps]``:
    ``sum_k unroll_weight ** k * (v_weight * v[k] + p_weight * p[k])``."""
    weights = cfg.unroll_weight ** torch.arange(len(v), dtype=v.dtype, device=v.device)
    if cfg.kind == "eagle3":  # EAGLE-3: the cross-entropy alone, sum_k 0.8^k CE_k
        return (weights * p).sum()
    return (weights * (cfg.v_weight * v + cfg.p_weight * p)).sum()


def uniform_noise(
    sequences: Sequence[int], step: int, seed: int, shape: tuple[int, int], scale: float, device
) -> torch.Tensor:
    """``U(-scale, scale)`` noise ``[len(sequences), *shape]``; each sequence's rows depend only on
    ``(seed, step, sequence index)``, not on which process or batch position draws them."""
    gen = torch.Generator(device=device)
    rows = []
    for index in sequences:
        gen.manual_seed((seed * 1_000_003 + step) * 1_000_033 + int(index))
        rows.append(torch.rand(shape, generator=gen, device=device))
    return (torch.stack(rows) * 2.0 - 1.0) * scale


def split_batch(batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, ...]:
    """Inputs ``(f_t, x_{t+1})``, targets ``f_{t+1}`` and their mask, from stored sequences."""
    hidden = batch["hidden"].to(device)
    ids = batch["input_ids"].to(device)
    mask = batch["loss_mask"].to(device)
    return hidden[:, :-1], ids[:, 1:], hidden[:, 1:], mask[:, 1:]


def head_inputs(batch: dict[str, torch.Tensor], device, kind: str):
    """:func:`split_batch`, with EAGLE-3's input the three stored layer hidden states of rows
    ``0..S-2`` (a 3-tuple of ``[n, S-1, H]``) instead of ``f_t``."""
    f_in, tok, f_tgt, mask = split_batch(batch, device)
    if kind == "eagle3":
        layers = batch["layer_hidden"].to(device)[:, :, :-1]
        f_in = tuple(layers[:, j] for j in range(layers.shape[1]))
    return f_in, tok, f_tgt, mask


def with_noise(f_in, sequences, step: int, cfg: HeadTrainConfig, device):
    """``f_in`` plus :func:`uniform_noise` (EAGLE-3: on each of its three inputs, drawn apart)."""
    if cfg.noise <= 0:
        return f_in
    if isinstance(f_in, torch.Tensor):
        return f_in + uniform_noise(sequences, step, cfg.seed, f_in.shape[1:], cfg.noise, device)
    return tuple(
        x + uniform_noise(sequences, step, cfg.seed + 7919 * (j + 1), x.shape[1:], cfg.noise, device)
        for j, x in enumerate(f_in)
    )


def draft_vocab_from_data(data: FeatureData, indices: np.ndarray, size: int, vocab_size: int) -> torch.Tensor:
    """int64 ``[size]``, ascending: the ``size`` most frequent target ids in the sequences
    ``indices`` (EAGLE-3's draft vocabulary; ties go to the lower id)."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"draft_vocab_size must be in [1, vocab_size={vocab_size}], got {size}")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for lo in range(0, len(indices), 256):
        ids = data.token_ids(indices[lo : lo + 256]).numpy().ravel()  # (not the features: GBs at scale)
        counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    order = np.argsort(-counts, kind="stable")[:size]
    return torch.from_numpy(np.sort(order))


def fresh_draft_vocab(
    cfg: HeadTrainConfig, data: FeatureData, indices: np.ndarray, target: LlamaModel
) -> torch.Tensor | None:
    """The draft vocabulary of a fresh EAGLE-3 head (:func:`draft_vocab_from_data` over ``indices``);
    None for EAGLE-1/2 or the whole vocabulary."""
    if cfg.kind != "eagle3" or not cfg.draft_vocab_size:
        return None
    return draft_vocab_from_data(data, indices, cfg.draft_vocab_size, target.config.vocab_size)


def check_eagle3_data(data: FeatureData, layers: Sequence[int]) -> None:
    """EAGLE-3 trains on the hidden states entering the target layers ``layers`` (the head's: by
    default (2, L//2, L-3)): the feature dump must have stored those (``--eagle3``)."""
    want = list(layers)
    have = data.plan.feature_layers
    if "layer_hidden" not in data.keys or list(have or []) != want:
        raise ValueError(
            f"an EAGLE-3 head trains on the hidden states entering target layers {want}; "
            f"{str(data.dir)!r} stores {have or 'none'}: dump the features with --eagle3"
        )


# --------------------------------------------------------------------------------------------------
# Data split and order
# --------------------------------------------------------------------------------------------------
def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sequence indices: a seeded shuffle, the last ``val_fraction`` held out."""
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(f"{n} sequences leave none for training with val_fraction={val_fraction}")
    order = np.random.default_rng([seed, 0xDA7A]).permutation(n)
    return np.sort(order[: n - n_val]), np.sort(order[n - n_val :])


def epoch_order(train: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(train)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(
    head: DraftHead,
    data: FeatureData,
    indices: np.ndarray,
    cfg: HeadTrainConfig,
    lm_head: torch.Tensor | None = None,
) -> dict:
    """Feature loss (EAGLE-1/2), soft cross-entropy and top-1 agreement on held-out sequences (no
    noise). ``lm_head``: the target's (an EAGLE-1/2 head shares it; an EAGLE-3 head needs it given)."""
    if lm_head is None:
        if head.kind == "eagle3":
            raise ValueError("validating an EAGLE-3 head needs the target's lm_head")
        lm_head = head.lm_head_weight
    total = torch.zeros(cfg.unroll_steps, 5, dtype=torch.float64)
    indices = indices[: cfg.val_max_sequences]
    for lo in range(0, len(indices), cfg.batch_size):
        f_in, tok, f_tgt, mask = head_inputs(data[indices[lo : lo + cfg.batch_size]], head.device, head.kind)
        with _autocast(head.device, cfg.autocast_bf16):
            preds = unrolled_training_forward(head, f_in, tok, cfg.unroll_steps)
            sums = head_loss_sums(head, preds, f_tgt, mask, lm_head)
            total += stack_sums(sums).cpu()
    return {f"val_{k}": v for k, v in step_metrics(total, head.kind).items()}


def step_metrics(total: torch.Tensor, kind: str = "eagle2") -> dict:
    """Means of step 0's sums ``total [steps, 5]`` (v, p, correct, rows, p_rows), plus the feature
    loss, token loss and top-1 agreement of every unrolled step when there are several."""
    rows = total[:, 3].clamp(min=1.0)
    p_rows = total[:, 4].clamp(min=1.0)
    record = {
        "v_loss": (total[0, 0] / rows[0]).item(),
        "p_loss": (total[0, 1] / p_rows[0]).item(),
        "top1": (total[0, 2] / rows[0]).item(),
    }
    if total.shape[0] > 1:
        record["v_loss_by_step"] = (total[:, 0] / rows).tolist()
        record["p_loss_by_step"] = (total[:, 1] / p_rows).tolist()
        record["top1_by_step"] = (total[:, 2] / rows).tolist()
    if kind == "eagle3":  # no feature loss
        record = {k: v for k, v in record.items() if not k.startswith("v_loss")}
    return record


@torch.no_grad()
def measure_tau(target: LlamaModel, head: DraftHead, prompts: list[list[int]], cfg: HeadTrainConfig) -> float:
    """Mean accepted length of greedy EAGLE decoding of ``prompts`` (dynamic tree ``cfg.tau_tree``)."""
    from eagle.api import EagleModel

    tree = TreeConfig(*cfg.tau_tree)
    result = EagleModel(target, head).generate(prompts, cfg.tau_new_tokens, tree=tree, eos_token_id=[])
    return result.mean_accept_length


def tau_prompts(
    data: FeatureData, indices: np.ndarray, cfg: HeadTrainConfig, target: LlamaModel
) -> list[list[int]]:
    """The first ``tau_prompt_len`` tokens of the first ``tau_prompts`` held-out sequences."""
    if cfg.tau_prompts == 0 or len(indices) == 0:
        return []
    length = min(cfg.tau_prompt_len, data.seq_len)
    need = length + cfg.tau_new_tokens + cfg.tau_tree[2]
    if need > target.config.max_position_embeddings:
        raise ValueError(
            f"tau measurement needs {need} positions (prompt {length} + {cfg.tau_new_tokens} new + tree "
            f"{cfg.tau_tree[2]}) but the target has max_position_embeddings={target.config.max_position_embeddings}"
        )
    ids = data[indices[: cfg.tau_prompts]]["input_ids"][:, :length]
    return ids.tolist()


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def save_head(head: DraftHead, out_dir: Path, dtype: torch.dtype) -> None:
    """The official layout (config.json + model.safetensors) in ``dtype``, each file replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    to_save = head if head.dtype == dtype else copy.deepcopy(head).to(dtype)
    try:
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".head-") as tmp:
            save_draft(to_save, tmp)
            mode = 0o666 & ~_umask()
            for name in os.listdir(tmp):
                os.chmod(Path(tmp) / name, mode)  # temporary files are private; the head is not
                os.replace(Path(tmp) / name, out_dir / name)
    except OSError as e:
        raise OSError(e.errno, f"saving the head to {str(out_dir)!r} failed: {e.strerror or e}") from e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_state(path: Path, state: dict) -> None:
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def _data_fingerprint(data: FeatureData) -> dict:
    return {"target": data.meta["target"], "plan": data.meta["plan"], "num_sequences": len(data)}


@dataclass
class RunState:
    step: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)


def _append_metrics(out_dir: Path, record: dict) -> None:
    try:
        with open(out_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise OSError(e.errno, f"writing {str(out_dir / METRICS_NAME)!r} failed: {e.strerror or e}") from e


# --------------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------------
def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def make_optimizer(head: DraftHead, cfg: HeadTrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable weights (weight decay on matrices only)."""
    params = [p for p in head.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, foreach=True)


def make_head(
    target: LlamaModel,
    cfg: HeadTrainConfig,
    init_head: str | Path | None,
    draft_vocab: torch.Tensor | None = None,
) -> DraftHead:
    """A fresh head of ``cfg.kind`` for ``target`` (``random_draft``; EAGLE-3 over ``draft_vocab``,
    sorted target ids, default all), or ``init_head`` made trainable."""
    if init_head is None:
        if cfg.kind == "eagle3":
            head = random_draft(target, kind="eagle3", draft_vocab=draft_vocab, seed=cfg.seed)
        else:
            head = random_draft(target, kind="eagle2", bias=cfg.bias, seed=cfg.seed)
    else:
        head = load_draft(init_head, target, dtype=target.dtype, device=target.device)
        if head.kind != cfg.kind:
            raise ValueError(
                f"{init_head} is an {head.kind} head, and this run trains {cfg.kind} heads "
                f"({'--eagle3' if head.kind == 'eagle3' else 'without --eagle3'} trains that kind)"
            )
        if head.kind == "eagle2" and head.embed_tokens is None:
            # A head file may leave the embedding out (it is the target's). The trainer's state and the
            # saved head always carry one, as random_draft's do, so resuming rebuilds the same module.
            weight = target.embed_tokens.weight.detach().to(head.dtype).clone()
            head.embed_tokens = torch.nn.Embedding.from_pretrained(weight, freeze=True)
        head.train().requires_grad_(True)
    if head.embed_tokens is not None:  # (an EAGLE-3 head shares the target's, a plain tensor)
        head.embed_tokens.requires_grad_(False)
    return head


# A head's files: a new run refuses an output directory that holds one without a training state.
HEAD_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")


def _check_fresh_out_dir(out_dir: Path, init_head: str | Path | None) -> None:
    """A new run must not overwrite a head that is already in ``out_dir``. A metrics log without a
    head or a training state is what a run interrupted before its first checkpoint leaves: it starts
    again from step 0, so its records are dropped."""
    if init_head is not None and out_dir.exists() and out_dir.resolve() == Path(init_head).resolve():
        raise ValueError(f"--out {str(out_dir)!r} is the --init-head directory; write the new head elsewhere")
    present = [name for name in HEAD_FILES if (out_dir / name).exists()]
    if present:
        raise ValueError(
            f"{str(out_dir)!r} already holds {', '.join(present)} (and no training state to resume); "
            "use an empty or new --out"
        )


def _truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop the records an interrupted run logged after its last checkpoint (``step``): the resumed
    run logs those steps again."""
    path = out_dir / METRICS_NAME
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [
        line for line in lines if (record := _json_record(line)) is not None and record.get("step", 0) <= step
    ]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))


def _json_record(line: str) -> dict | None:
    """A metrics line, or None for one an interruption cut off mid-write (or a blank one)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _check_resume_settings(cfg: HeadTrainConfig, saved: dict, explicit: Collection[str]) -> None:
    """Refuse settings given on purpose that a resume would replace by the checkpoint's."""
    # A setting missing from the saved config (a run from before it existed) had its default.
    defaults = {f.name: f.default for f in dataclasses.fields(HeadTrainConfig)}
    runs = {name: saved.get(name, defaults.get(name)) for name in explicit}
    ignored = [
        f"{name}={getattr(cfg, name)!r} (the run has {runs[name]!r})"
        for name in explicit
        if name in defaults
        and name not in RUN_CONTROL_FIELDS
        and (tuple(runs[name]) if isinstance(runs[name], list) else runs[name]) != getattr(cfg, name)
    ]
    if ignored:
        raise ValueError(
            "--resume continues with the run's own settings; these given ones differ: "
            + ", ".join(sorted(ignored))
            + " (drop them, or start a new --out with --init-head)"
        )


def _resolve_config(cfg: HeadTrainConfig, saved: dict) -> HeadTrainConfig:
    fields = {f.name for f in dataclasses.fields(HeadTrainConfig)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k in fields}
    values |= {k: getattr(cfg, k) for k in RUN_CONTROL_FIELDS}
    return HeadTrainConfig(**values)


def train_head(
    target: LlamaModel,
    data: FeatureData,
    out_dir: str | Path,
    cfg: HeadTrainConfig | None = None,
    *,
    resume: bool = False,
    init_head: str | Path | None = None,
    ctx: DistContext | None = None,
    progress: bool = True,
    explicit: Collection[str] = (),
) -> dict:
    """Train a head on ``data`` and save it to ``out_dir``; returns the last metrics record.

    ``resume``: continue from ``out_dir/training_state.pt`` (its config wins, except the
    run-control fields :data:`RUN_CONTROL_FIELDS`; a fresh start when there is none); without it, an
    ``out_dir`` that already holds a run is an error. ``init_head``: start from an existing head of
    ``cfg.kind`` instead of a random one.
    ``ctx``: the process group (see :mod:`eagle.train.distributed`); rank 0 writes every file.
    ``explicit``: the fields of ``cfg`` the caller set on purpose (the command line's given flags): a
    resume refuses any that differs from the checkpoint's (other than run-control), since the
    checkpoint's would silently win.
    Raises ValueError when the features were computed by another target or the run's data changed.
    """
    cfg = cfg or HeadTrainConfig()
    ctx = ctx or DistContext(device=target.device)
    out_dir = Path(out_dir)
    check_target_matches(data.meta["target"], target, f"feature directory {str(data.dir)!r}")
    state_path = out_dir / STATE_NAME
    saved = None
    if state_path.is_file():
        if not resume:
            raise ValueError(
                f"{str(out_dir)!r} already holds a training run; pass --resume or use another --out"
            )
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if saved["data"] != _data_fingerprint(data):
            raise ValueError(
                f"cannot resume {str(out_dir)!r}: its feature data differs from {str(data.dir)!r}"
            )
        _check_resume_settings(cfg, saved["config"], explicit)
        cfg = _resolve_config(cfg, saved["config"])
    cfg.validate()
    if cfg.unroll_steps > data.seq_len - 1:
        raise ValueError(
            f"unroll_steps={cfg.unroll_steps} leaves its last steps no rows in sequences of {data.seq_len} "
            f"tokens; use at most {data.seq_len - 1}"
        )
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {ctx.world_size} processes")
    if (
        cfg.kind == "eagle3" and init_head is None and saved is None
    ):  # (a fresh head reads the default layers)
        check_eagle3_data(data, target.config.eagle3_feature_layers)
    train_idx, val_idx = split_indices(len(data), cfg.val_fraction, cfg.seed)
    steps_per_epoch = len(train_idx) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_idx)} training sequences are fewer than one batch of {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch

    if saved is None:  # every rank checks (and refuses) alike
        _check_fresh_out_dir(out_dir, init_head)
    # A resumed run rebuilds its head from the head saved with its state (same layout: bias, own
    # embedding), then takes the exact weights from the state.
    resumed_head = out_dir if saved is not None and (out_dir / "config.json").is_file() else None
    start = resumed_head or init_head
    draft_vocab = None if start else fresh_draft_vocab(cfg, data, train_idx, target)
    head = make_head(target, cfg, start, draft_vocab)
    if head.kind == "eagle3":  # an init head may name other layers (eagle_aux_hidden_state_layer_ids)
        check_eagle3_data(data, head.feature_layers)
        full = head.draft_vocab_size == target.config.vocab_size
        if cfg.draft_vocab_size and cfg.draft_vocab_size != head.draft_vocab_size:
            raise ValueError(
                f"draft_vocab_size={cfg.draft_vocab_size}, but the head to continue has "
                f"{head.draft_vocab_size} draft tokens (its d2t); drop --draft-vocab-size"
            )
        cfg = dataclasses.replace(cfg, draft_vocab_size=0 if full else head.draft_vocab_size)
    has_bias = head.fc.bias is not None
    if cfg.kind == "eagle2" and has_bias != cfg.bias:
        # A resumed head's layout wins (a run started before this rule may have saved bias=false with
        # a biased --init-head head); only a fresh --init-head start refuses a contradicting flag.
        if resumed_head is None and init_head is not None and "bias" in explicit:
            raise ValueError(
                f"--no-bias was {'given' if not cfg.bias else 'not given'}, but the --init-head head "
                f"{'has' if has_bias else 'has no'} fc.bias"
            )
        cfg = dataclasses.replace(cfg, bias=has_bias)  # the head's layout is what gets trained and saved
    optimizer = make_optimizer(head, cfg)
    run = RunState()
    if saved is not None:
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        run = RunState(saved["step"], saved["train_seconds"], saved["history"])
        if run.step >= min(total_steps, cfg.max_steps or total_steps) and ctx.is_main:
            print(
                f"[eagle.train.head] {str(out_dir)!r} finished its {cfg.epochs} epochs ({run.step} steps): "
                "nothing to train (to train further, start a new --out with --init-head)",
                file=sys.stderr,
                flush=True,
            )
    model = wrap_module(_TrainingModule(head, cfg.unroll_steps), ctx)
    prompts = tau_prompts(data, val_idx, cfg, target)
    trainer = _Trainer(target, head, model, optimizer, data, out_dir, cfg, ctx, run, total_steps)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(out_dir, run.step)  # (step 0 for a fresh start: an earlier try's records)
    last = trainer.run(train_idx, val_idx, steps_per_epoch, prompts, progress)
    return last


class _Trainer:
    """State of one training run (see :func:`train_head`)."""

    def __init__(self, target, head, model, optimizer, data, out_dir, cfg, ctx, run, total_steps) -> None:
        self.target, self.head, self.model, self.optimizer = target, head, model, optimizer
        self.data, self.out_dir, self.cfg, self.ctx, self.run_state = data, out_dir, cfg, ctx, run
        self.total_steps = total_steps
        self.params = [p for p in head.parameters() if p.requires_grad]

    def step(self, sequences: np.ndarray) -> torch.Tensor:
        """One optimizer step on this process's ``sequences``; returns the global loss sums."""
        cfg, ctx, step = self.cfg, self.ctx, self.run_state.step
        f_in, tok, f_tgt, mask = head_inputs(self.data[sequences], ctx.device, cfg.kind)
        rows = all_reduce_sum(mask.sum().double().reshape(1), ctx).clamp(min=1.0)
        f_in = with_noise(f_in, sequences, step, cfg, ctx.device)
        lr = learning_rate(step, cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with _autocast(ctx.device, cfg.autocast_bf16):
            preds = self.model(f_in, tok)
            per_step = head_loss_sums(self.head, preds, f_tgt, mask, self.target.lm_head_weight)
        loss = unrolled_objective(
            torch.stack([s.v for s in per_step]), torch.stack([s.p for s in per_step]), cfg
        )
        # Normalised by the global row count (of step 0); DDP averages over ranks, hence world_size.
        loss = loss * (ctx.world_size / rows.to(loss.dtype))
        sums = all_reduce_sum(stack_sums(per_step), ctx)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        # One host sync per training step (not the decoding hot path). Both values are equal on every
        # rank (all-reduced sums; DDP-averaged gradients), so all ranks stop together.
        if not (torch.isfinite(sums).all() and torch.isfinite(grad_norm)):
            raise FloatingPointError(
                f"step {step}: the loss or its gradient is not finite (gradient norm {grad_norm.item()}); "
                f"the head was not updated and the last checkpoint in {str(self.out_dir)!r} is kept. "
                "Non-finite features in the data, or a learning rate too high for them, cause this"
            )
        self.optimizer.step()
        return sums

    def run(self, train_idx, val_idx, steps_per_epoch, prompts, progress) -> dict:
        cfg, ctx, run = self.cfg, self.ctx, self.run_state
        stop = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        per_rank = cfg.batch_size // ctx.world_size
        tokens_per_step = cfg.batch_size * (self.data.seq_len - 1)
        bar = _bar(run.step, self.total_steps, progress and ctx.is_main)
        window = torch.zeros(cfg.unroll_steps, 5, dtype=torch.float64)
        window_start, window_steps, last = time.perf_counter(), 0, {}
        while run.step < stop:
            epoch, b = divmod(run.step, steps_per_epoch)
            batch = epoch_order(train_idx, cfg.seed, epoch)[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            t0 = time.perf_counter()
            window += self.step(batch[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]).cpu()
            run.train_seconds += time.perf_counter() - t0
            run.step += 1
            window_steps += 1  # counted: a resumed run's first window can be shorter than the interval
            if run.step % cfg.log_every_steps == 0 or run.step == stop:
                elapsed = time.perf_counter() - window_start
                last = self._log(window, epoch, tokens_per_step * window_steps / max(elapsed, 1e-9), bar)
                window, window_start, window_steps = torch.zeros_like(window), time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            end_of_epoch = run.step % steps_per_epoch == 0
            if end_of_epoch:
                last = self._validate(val_idx, prompts, epoch) or last
            if end_of_epoch or run.step % cfg.save_every_steps == 0 or run.step == stop:
                self._save()
        if bar is not None:
            bar.close()
        return last

    def _log(self, window: torch.Tensor, epoch: int, tok_per_s: float, bar) -> dict:
        record = {
            "step": self.run_state.step,
            "epoch": epoch,
            "lr": learning_rate(self.run_state.step - 1, self.cfg, self.total_steps),
        } | step_metrics(window, self.cfg.kind)
        record["tokens_per_s"] = tok_per_s
        if len(window) > 1:  # the objective optimised (record["loss"] below is step 0's)
            objective = unrolled_objective(window[:, 0], window[:, 1], self.cfg)
            record["loss_unrolled"] = (objective / window[0, 3].clamp(min=1.0)).item()
        if self.cfg.kind == "eagle3":  # the cross-entropy alone
            record["loss"] = record["p_loss"]
        else:
            record["loss"] = self.cfg.v_weight * record["v_loss"] + self.cfg.p_weight * record["p_loss"]
        if self.ctx.is_main:
            _append_metrics(self.out_dir, record)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", top1=f"{record['top1']:.3f}", tok_s=f"{tok_per_s:.0f}"
                )
        return record

    def _validate(self, val_idx: np.ndarray, prompts: list[list[int]], epoch: int) -> dict | None:
        record = None
        if self.ctx.is_main and len(val_idx):
            record = {"step": self.run_state.step, "epoch": epoch} | validate(
                self.head, self.data, val_idx, self.cfg, self.target.lm_head_weight
            )
            if prompts:
                record["tau"] = measure_tau(self.target, self.head, prompts, self.cfg)
            self.run_state.history.append(record)
            _append_metrics(self.out_dir, record)
            shown = ", ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}=[{', '.join(f'{x:.4f}' for x in v)}]"
                for k, v in record.items()
                if isinstance(v, (float, list))
            )
            print(f"[eagle.train.head] epoch {epoch + 1}: {shown}", file=sys.stderr, flush=True)
        barrier(self.ctx)
        return record

    def _save(self) -> None:
        bad = [name for name, p in self.head.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # the step's check makes this unreachable; a NaN head must never replace a good one
            raise FloatingPointError(f"not saving a head with non-finite weights in {', '.join(bad)}")
        if self.ctx.is_main:
            save_head(self.head, self.out_dir, SAVE_DTYPES[self.cfg.save_dtype])
            state = {
                "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.run_state.step,
                "train_seconds": self.run_state.train_seconds,
                "history": self.run_state.history,
                "config": dataclasses.asdict(self.cfg),
                "data": _data_fingerprint(self.data),
            }
            save_state(self.out_dir / STATE_NAME, state)
        barrier(self.ctx)


def _bar(initial: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="head", dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# Throughput measurement (fp32 vs bf16 autocast)
# --------------------------------------------------------------------------------------------------
MEASURED_VARIANTS = (("float32", False), ("bf16_autocast", True))


def measure_throughput(
    target: LlamaModel, data: FeatureData, cfg: HeadTrainConfig, steps: int = 4, rounds: int = 5
) -> dict[str, float]:
    """Median training tokens/s with and without bf16 autocast on this machine (nothing is saved).

    The variants alternate, ``steps`` optimizer steps each per round after one warm-up step, so
    that a load that drifts during the measurement affects both alike.
    """
    if cfg.kind == "eagle3":
        check_eagle3_data(data, target.config.eagle3_feature_layers)
    draft_vocab = fresh_draft_vocab(cfg, data, np.arange(len(data)), target)
    trainers = {}
    for name, autocast in MEASURED_VARIANTS:
        run_cfg = dataclasses.replace(cfg, autocast_bf16=autocast, val_fraction=0.0)
        head = make_head(target, run_cfg, None, draft_vocab)
        trainers[name] = _Trainer(
            target, head, _TrainingModule(head, run_cfg.unroll_steps), make_optimizer(head, run_cfg), data, Path("."),
            run_cfg, DistContext(device=target.device), RunState(), (rounds * steps + 1),
        )  # fmt: skip
    batch = np.arange(min(cfg.batch_size, len(data)))
    tokens = steps * len(batch) * (data.seq_len - 1)
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    for trainer in trainers.values():
        trainer.step(batch)  # warm-up
    for _ in range(rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(steps):
                trainer.step(batch)
                trainer.run_state.step += 1
            rates[name].append(tokens / (time.perf_counter() - start))
    return {name: float(np.median(r)) for name, r in rates.items()}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = HeadTrainConfig()
    p = argparse.ArgumentParser(
        prog="eagle train head",
        description="Train an EAGLE-1/2 (or, --eagle3, EAGLE-3) draft head on dumped target features "
        "(torchrun for DDP).",
    )
    p.add_argument("--target", required=True, help="target checkpoint directory")
    p.add_argument(
        "--data",
        required=True,
        help="feature directory from `eagle train features` (python -m eagle.train.features)",
    )
    p.add_argument("--out", required=True, help="output directory of the head and its training state")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch", type=int, default=d.batch_size, help="global batch (sequences per step)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup", type=int, default=d.warmup_steps, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm")
    p.add_argument(
        "--noise",
        type=float,
        default=None,
        help=f"half-width of the uniform feature noise (default {d.noise}; with --eagle3 0, as EAGLE-3's reference)",
    )
    p.add_argument("--p-weight", type=float, default=d.p_weight, help="weight of the token cross-entropy")
    p.add_argument("--no-bias", action="store_true", help="fc without bias (the LLaMA-3 heads' layout)")
    p.add_argument(
        "--eagle3",
        action="store_true",
        help="train an EAGLE-3 head (needs features dumped with --eagle3; token cross-entropy only)",
    )
    p.add_argument(
        "--draft-vocab-size",
        type=int,
        default=d.draft_vocab_size,
        help="EAGLE-3: the draft vocabulary, the training data's N most frequent tokens (0: all)",
    )
    p.add_argument(
        "--unroll-steps",
        type=int,
        default=None,
        help="training-time test: also train on the head's own drafted features, this many draft levels "
        f"(default {d.unroll_steps}; with --eagle3 {EAGLE3_UNROLL_STEPS}, as EAGLE-3's reference)",
    )
    p.add_argument(
        "--unroll-weight",
        type=float,
        default=d.unroll_weight,
        help="loss weight ratio between unrolled steps",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=d.autocast_bf16,
        help="bf16 autocast for forward and loss (--no-bf16: float32 throughout)",
    )
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument(
        "--tau-prompts", type=int, default=d.tau_prompts, help="held-out prompts decoded per epoch"
    )
    p.add_argument("--tau-new-tokens", type=int, default=d.tau_new_tokens)
    p.add_argument("--save-every", type=int, default=d.save_every_steps, help="checkpoint every N steps")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps in total (checkpointed)")
    p.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default=d.save_dtype)
    p.add_argument(
        "--init-head", default=None, help="start from this head (of the kind trained) instead of a random one"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--device", type=checked_device, default="cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads per process")
    p.add_argument("--measure", action="store_true", help="print tokens/s with and without bf16 autocast")
    p.add_argument("--quiet", action="store_true")
    return p


# command-line option (dest) -> HeadTrainConfig field, where the names differ
_FLAG_FIELDS = {
    "batch": "batch_size",
    "warmup": "warmup_steps",
    "no_bias": "bias",
    "bf16": "autocast_bf16",
    "save_every": "save_every_steps",
    "eagle3": "kind",
}


def explicit_fields(argv: Sequence[str] | None) -> set[str]:
    """The HeadTrainConfig fields whose options ``argv`` gives (parsed again with every default
    replaced by a marker, so a flag given with its default value counts as given)."""
    marker = object()
    p = build_parser()
    p.set_defaults(**{a.dest: marker for a in p._actions if a.dest != "help"})
    given = {k for k, v in vars(p.parse_args(argv)).items() if v is not marker}
    fields = {f.name for f in dataclasses.fields(HeadTrainConfig)}
    return {_FLAG_FIELDS.get(k, k) for k in given} & fields


def config_from_args(args: argparse.Namespace) -> HeadTrainConfig:
    return HeadTrainConfig(
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        p_weight=args.p_weight,
        bias=not args.no_bias,
        kind="eagle3" if args.eagle3 else "eagle2",
        draft_vocab_size=args.draft_vocab_size,
        noise=args.noise if args.noise is not None else (0.0 if args.eagle3 else HeadTrainConfig.noise),
        unroll_steps=args.unroll_steps
        if args.unroll_steps is not None
        else (EAGLE3_UNROLL_STEPS if args.eagle3 else HeadTrainConfig.unroll_steps),
        seed=args.seed,
        unroll_weight=args.unroll_weight,
        autocast_bf16=args.bf16,
        val_fraction=args.val_fraction,
        tau_prompts=args.tau_prompts,
        tau_new_tokens=args.tau_new_tokens,
        save_every_steps=args.save_every,
        max_steps=args.max_steps,
        save_dtype=args.save_dtype,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    try:
        given = explicit_fields(argv if argv is not None else sys.argv[1:])
        if args.eagle3 and given & {"bias", "p_weight", "v_weight"}:
            raise ValueError(
                f"{sorted(given & {'bias', 'p_weight', 'v_weight'})} do not apply to EAGLE-3 heads (no fc "
                "bias, no feature loss: the token cross-entropy alone)"
            )
        # Before the target and the features load. A resume takes its kind from the checkpoint, so
        # --draft-vocab-size without --eagle3 is judged there (against the run's own settings).
        (dataclasses.replace(cfg, draft_vocab_size=0) if args.resume else cfg).validate()
    except ValueError as e:
        print(f"eagle.train.head: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ctx = init_distributed(args.device)
    except ValueError as e:
        print(f"eagle.train.head: error: {e}", file=sys.stderr)
        return 2
    try:
        target = load_target(args.target, dtype=torch.float32, device=ctx.device)
        data = FeatureData(args.data)
        if args.measure:
            for name, rate in measure_throughput(target, data, cfg).items():
                print(f"{name:>14}: {rate:,.0f} training tokens/s")
            return 0
        last = train_head(
            target, data, args.out, cfg, resume=args.resume, init_head=args.init_head, ctx=ctx,
            progress=not args.quiet, explicit=explicit_fields(argv if argv is not None else sys.argv[1:]),
        )  # fmt: skip
    except (ValueError, FileNotFoundError, OSError, FloatingPointError) as e:
        print(f"eagle.train.head: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown(ctx)
    if ctx.is_main and not args.quiet:
        print(json.dumps(last))
    return 0


if __name__ == "__main__":
    sys.exit(main())
