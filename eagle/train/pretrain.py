"""Resumable CPU pretraining of the ``tiny-code`` target: a Llama trained from scratch on the stdlib.

Pipeline (all state lives in a work directory ``--out``, outside the repository):

1. :func:`prepare_data` collects the corpus (:mod:`eagle.train.corpus`), trains or reuses the
   byte-level BPE (:mod:`eagle.train.tokenizer`) and tokenises both splits once into ``uint16``
   memmaps ``train.bin`` / ``val.bin`` (each file preceded by ``<|endoftext|>``).
2. :func:`train` runs AdamW (0.9, 0.95) with linear warm-up and cosine decay to ``min_lr`` at
   ``max_tokens``, weight decay on matrices only, gradient clipping, optional bf16 autocast and
   ``torch.compile``. The batch of step ``s`` is a pure function of ``(seed, s)``, and the learning
   rate a pure function of ``s``, so a checkpoint (model + optimizer + step + RNG) resumes the run
   bit-exactly. Checkpoints are written atomically every ``checkpoint_every_s`` seconds, on SIGTERM /
   SIGINT, and at the end; train/val loss and tokens/s go to ``metrics.jsonl``.
3. :func:`export` writes the checkpoint in Hugging Face layout (fp16 ``model.safetensors``,
   ``config.json``, tokenizer files, ``training_state.json``, ``MODEL_CARD.md``).

Resuming on a machine where the work directory was lost: ``--resume`` with no checkpoint falls back
to ``--init-from`` (default: the exported ``eagle/assets/tiny-code/target``): its weights, tokenizer
and token count, a fresh optimizer and a short re-warm-up of ``rewarm_steps`` steps.

Command line::

    python -m eagle.train.pretrain --out /root/eagle-work/tiny-code-target --max-tokens 40000000 [--resume]
    python -m eagle.train.pretrain --out DIR --export eagle/assets/tiny-code/target
    python -m eagle.train.pretrain --out DIR --measure   # tokens/s of the config alternatives
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eagle.train.corpus import DEFAULT_VAL_FRACTION, collect_sources, corpus_bytes, split_sources
from eagle.train.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    ENDOFTEXT,
    encode_documents,
    load_tokenizer,
    make_tokenizer_config_portable,
    save_tokenizer,
    train_tokenizer,
)

DEFAULT_WORK_DIR = Path("/root/eagle-work/tiny-code-target")
DEFAULT_EXPORT_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-code" / "target"
CHECKPOINT_NAME = "ckpt.pt"
BEST_NAME = "best.pt"  # weights (and progress) at the lowest in-training validation loss
METRICS_NAME = "metrics.jsonl"
META_NAME = "data_meta.json"
TRAINING_STATE_NAME = "training_state.json"
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Shape of the Llama target (everything else is the Hugging Face Llama default)."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0

    def to_llama_config(self, bos_token_id: int = 0, eos_token_id: int = 0):
        from transformers import LlamaConfig

        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.hidden_size // self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
            use_cache=True,
        )


@dataclass
class TrainConfig:
    """Optimisation and run-control settings. Token counts are in training tokens (batch * seq_len)."""

    seq_len: int = 512
    batch_size: int = 16
    max_tokens: int = 40_000_000
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_tokens: int = 500_000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 1234
    autocast_bf16: bool = True
    compile: bool = False
    num_threads: int = 2
    checkpoint_every_s: float = 600.0
    eval_every_tokens: int = 1_000_000  # by training progress: wall time is meaningless on a loaded box
    eval_tokens: int = 65_536  # the export evaluates the whole validation split
    log_every_steps: int = 10
    rewarm_steps: int = 50
    stop_after_steps: int | None = None  # stop early (checkpointed), e.g. to simulate an interruption
    time_limit_s: float | None = None
    # Size the cosine schedule to this many seconds of training: the run measures its tokens/s over
    # steps [fit_probe_start, fit_probe_end) (inside the warm-up, so no step before the fit depends
    # on the schedule's length) and sets max_tokens (never above the given max_tokens).
    fit_schedule_s: float | None = None
    fit_probe_start: int = 3
    fit_probe_end: int = 13
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in (
            "seq_len", "batch_size", "max_tokens", "num_threads", "eval_every_tokens", "eval_tokens",
            "log_every_steps",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {value!r}")
        if self.warmup_tokens < 0 or not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(
                f"TrainConfig: needs warmup_tokens >= 0 and 0 <= min_lr <= lr, lr > 0; got warmup_tokens="
                f"{self.warmup_tokens}, lr={self.lr}, min_lr={self.min_lr}"
            )
        for name in ("stop_after_steps", "time_limit_s", "fit_schedule_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"TrainConfig: {name} must be > 0 (or unset), got {value!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        return max(1, self.max_tokens // self.tokens_per_step)

    @property
    def warmup_steps(self) -> int:
        return max(1, self.warmup_tokens // self.tokens_per_step)


# Fields of TrainConfig that a resumed run takes from the command line instead of the checkpoint.
RUN_CONTROL_FIELDS = (
    "max_tokens",
    "compile",
    "num_threads",
    "checkpoint_every_s",
    "eval_every_tokens",
    "eval_tokens",
    "log_every_steps",
    "stop_after_steps",
    "time_limit_s",
    "fit_schedule_s",
    "device",
)


def learning_rate(step: int, cfg: TrainConfig, rewarm_from: int | None = None) -> float:
    """Linear warm-up to ``lr``, cosine to ``min_lr`` at ``total_steps``, constant after.

    ``rewarm_from`` (a run re-initialised from exported weights with a fresh optimizer) scales the
    rate linearly up from zero over ``rewarm_steps`` steps after that step.
    """
    if step < cfg.warmup_steps:
        rate = cfg.lr * (step + 1) / cfg.warmup_steps
    else:
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        rate = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    if rewarm_from is not None and step - rewarm_from < cfg.rewarm_steps:
        rate *= (step - rewarm_from + 1) / cfg.rewarm_steps
    return rate


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _write_tokens(path: Path, documents: list[list[int]], eos_id: int) -> int:
    """Write ``<eos> doc0 <eos> doc1 ...`` as uint16 to ``path`` (atomically). Returns the token count."""
    total = sum(len(d) + 1 for d in documents)
    tmp = path.with_suffix(".tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(total,))
    pos = 0
    for doc in documents:
        out[pos] = eos_id
        out[pos + 1 : pos + 1 + len(doc)] = np.asarray(doc, dtype=np.uint16)
        pos += len(doc) + 1
    out.flush()
    del out
    os.replace(tmp, path)
    return total


def prepare_data(
    out_dir: Path | str,
    corpus_root: Path | str | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    tokenizer_from: Path | str | None = None,
    model_max_length: int = 512,
) -> dict:
    """Tokenise the corpus once into ``out_dir/{train,val}.npy`` (uint16) and return the metadata.

    Reuses an existing preparation in ``out_dir``. The tokenizer is copied from ``tokenizer_from``
    when given (so that a resumed model keeps its vocabulary), otherwise trained on the training
    split. Raises ``ValueError`` for an empty corpus or a vocabulary that does not fit uint16.
    """
    out_dir = Path(out_dir)
    meta_path = out_dir / META_NAME
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    train_sources, val_sources = split_sources(collect_sources(corpus_root), val_fraction)
    tok_dir = out_dir / "tokenizer"
    if tokenizer_from is not None:
        tokenizer = load_tokenizer(tokenizer_from)
    else:
        tokenizer = train_tokenizer((s.text for s in train_sources), vocab_size)
    save_tokenizer(tokenizer, tok_dir, model_max_length)
    vocab = tokenizer.get_vocab_size()
    if vocab > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocabulary of {vocab} tokens does not fit the uint16 token files")
    eos_id = tokenizer.token_to_id(ENDOFTEXT)
    if eos_id is None:
        raise ValueError(f"tokenizer has no {ENDOFTEXT!r} token")
    meta = {"vocab_size": vocab, "eos_id": eos_id, "val_fraction": val_fraction}
    for split, sources in (("train", train_sources), ("val", val_sources)):
        docs = encode_documents(tokenizer, [s.text for s in sources])
        n_tokens = _write_tokens(out_dir / f"{split}.npy", docs, eos_id)
        n_bytes = corpus_bytes(sources)
        meta[split] = {
            "files": len(sources),
            "bytes": n_bytes,
            "tokens": n_tokens,
            "bytes_per_token": n_bytes / (n_tokens - len(sources)),
        }
    meta["val_files"] = [s.relpath for s in val_sources]
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def load_split(out_dir: Path | str, split: str) -> np.ndarray:
    """The token memmap of ``split`` (``"train"`` or ``"val"``)."""
    return np.load(Path(out_dir) / f"{split}.npy", mmap_mode="r")


def batch_for_step(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """The ``[batch_size, seq_len + 1]`` int64 windows of training step ``step``.

    Random window starts drawn from a generator seeded with ``(seed, step)`` alone, so any step's
    batch can be recomputed after a restart without saving a data cursor.
    """
    if len(tokens) < seq_len + 2:
        raise ValueError(f"token file of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(windows)


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> Iterator[torch.Tensor]:
    """Consecutive non-overlapping ``[1, seq_len + 1]`` windows covering the first ``max_tokens``."""
    limit = min(len(tokens), max_tokens + 1)
    for start in range(0, limit - seq_len - 1 + 1, seq_len):
        yield torch.from_numpy(tokens[start : start + seq_len + 1].astype(np.int64))[None]


# --------------------------------------------------------------------------------------------------
# Model, loss, evaluation
# --------------------------------------------------------------------------------------------------


def build_model(model_cfg: ModelConfig, seed: int, eos_id: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = model_cfg.to_llama_config(bos_token_id=eos_id, eos_token_id=eos_id)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def next_token_loss(model, windows: torch.Tensor, autocast_bf16: bool) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of predicting ``windows[:, 1:]`` from ``windows[:, :-1]``.

    ``windows``: int64 ``[B, S + 1]``, moved to the model's device here.
    """
    device = next(model.parameters()).device
    windows = windows.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        logits = model(input_ids=windows[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def evaluate(
    model, tokens: np.ndarray, seq_len: int, max_tokens: int, autocast_bf16: bool, batch: int = 8
) -> float:
    """Mean validation loss in nats/token over the first ``max_tokens`` tokens of ``tokens``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    windows = list(eval_windows(tokens, seq_len, max_tokens))
    if not windows:
        raise ValueError(
            f"validation split ({len(tokens)} tokens) is shorter than one window of {seq_len + 1}"
        )
    for i in range(0, len(windows), batch):
        chunk = torch.cat(windows[i : i + batch])
        n = chunk[:, 1:].numel()
        total += next_token_loss(model, chunk, autocast_bf16).item() * n
        count += n
    model.train(was_training)
    return total / count


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, foreach=True)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary file, fsync, then an atomic rename: never a half-written file."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _config_from_dict(cls, values: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: (tuple(v) if k == "betas" else v) for k, v in values.items() if k in names}
    return cls(**values)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@dataclass
class RunState:
    """Progress counters that travel in the checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    rewarm_from: int | None = None
    init_from: str | None = None
    history: list = field(default_factory=list)
    best_val_loss: float | None = None
    hardware: str | None = None  # what the latest run trained on
    train_command: str | None = None  # the command line of the latest run
    # fit_schedule_s: the schedule's length once fitted (a resumed run keeps it, not --max-tokens)
    fitted_max_tokens: int | None = None


def _init_from_export(model, export_dir: Path) -> RunState:
    """Load exported fp16 weights into ``model`` (fp32) and continue the token count they record."""
    from safetensors.torch import load_file

    weights = load_file(str(export_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise ValueError(f"exported weights in {export_dir} do not match the model: {missing} {unexpected}")
    info = json.loads((export_dir / TRAINING_STATE_NAME).read_text())
    return RunState(
        step=info["step"],
        tokens_seen=info["tokens_seen"],
        train_seconds=info["train_seconds"],
        rewarm_from=info["step"],
        init_from=str(export_dir),
        history=info.get("history", []),
    )


# --------------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM/SIGINT so the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.raised = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True


def _append_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / METRICS_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(
    out_dir: Path | str,
    model_cfg: ModelConfig | None = None,
    cfg: TrainConfig | None = None,
    resume: bool = False,
    init_from: Path | str | None = None,
    install_signal_handlers: bool = False,
    quiet: bool = False,
    command: str | None = None,
) -> RunState:
    """Train (or resume training of) the target in ``out_dir``; returns the final progress counters.

    ``prepare_data(out_dir)`` must have run. With ``resume`` and a checkpoint in ``out_dir`` the
    run continues exactly where it stopped; its stored model config is used, its stored training
    config too except for run-control fields given in ``cfg`` (``max_tokens``, time limits, ...).
    With ``resume`` and no checkpoint, weights come from ``init_from`` (an export) when given.
    """
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / META_NAME).read_text())
    ckpt_path = out_dir / CHECKPOINT_NAME
    checkpoint = load_checkpoint(ckpt_path) if resume and ckpt_path.is_file() else None
    if not resume and ckpt_path.is_file():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or use a fresh --out")
    if checkpoint is not None:
        model_cfg = _config_from_dict(ModelConfig, checkpoint["model_config"])
    elif resume and init_from is not None:
        exported = json.loads((Path(init_from) / TRAINING_STATE_NAME).read_text())
        model_cfg = _config_from_dict(ModelConfig, exported["model_config"])
    model_cfg = model_cfg or ModelConfig(vocab_size=meta["vocab_size"])
    cfg = cfg or TrainConfig()
    if checkpoint is not None:
        stored = _config_from_dict(TrainConfig, checkpoint["train_config"])
        cfg = dataclasses.replace(stored, **{name: getattr(cfg, name) for name in RUN_CONTROL_FIELDS})
    if model_cfg.vocab_size != meta["vocab_size"]:
        raise ValueError(f"model vocab {model_cfg.vocab_size} != tokenizer vocab {meta['vocab_size']}")
    torch.set_num_threads(cfg.num_threads)
    device = torch.device(cfg.device)

    model = build_model(model_cfg, cfg.seed, meta["eos_id"]).to(device)
    optimizer = make_optimizer(model, cfg)
    state = RunState()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = RunState(**checkpoint["run_state"])
        torch.set_rng_state(checkpoint["torch_rng"])
    elif resume and init_from is not None:
        state = _init_from_export(model, Path(init_from))
    state.train_command = command or state.train_command
    state.hardware = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cfg.num_threads} CPU threads"
    )
    # fit_schedule_s: fitted once, by a probe of (fit_probe_end - fit_probe_start) steps from step
    # fit_probe_start, or from the step a run interrupted during its probe resumes at; a resumed run
    # keeps the fitted length (--max-tokens given again would otherwise restore the unfitted one)
    fit_pending = cfg.fit_schedule_s is not None and state.fitted_max_tokens is None
    if cfg.fit_schedule_s is not None and state.fitted_max_tokens is not None:
        cfg = dataclasses.replace(cfg, max_tokens=min(cfg.max_tokens, state.fitted_max_tokens))
    probe_start = max(cfg.fit_probe_start, state.step)
    probe_end = probe_start + (cfg.fit_probe_end - cfg.fit_probe_start)
    if fit_pending and probe_end > cfg.warmup_steps:
        raise ValueError(
            f"fit_schedule_s needs the throughput probe (steps {probe_start}..{probe_end}) "
            f"inside the warm-up ({cfg.warmup_steps} steps): raise --warmup-tokens"
        )
    prior_seconds = state.train_seconds  # spent by earlier runs, counted against fit_schedule_s
    model.train()
    step_fn = torch.compile(model) if cfg.compile else model

    train_tokens = load_split(out_dir, "train")
    val_tokens = load_split(out_dir, "val")
    bytes_per_token = meta["val"]["bytes_per_token"]
    stop = _StopFlag()
    if install_signal_handlers:
        stop.install()

    def checkpoint_now() -> None:
        save_checkpoint(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "run_state": dataclasses.asdict(state),
                "model_config": dataclasses.asdict(model_cfg),
                "train_config": dataclasses.asdict(cfg),
                "torch_rng": torch.get_rng_state(),
            },
        )

    def log(msg: str) -> None:
        if not quiet:
            print(time.strftime("%H:%M:%S"), msg, flush=True)

    def run_eval() -> None:
        t0 = time.time()
        val = evaluate(model, val_tokens, cfg.seq_len, cfg.eval_tokens, cfg.autocast_bf16)
        record = {
            "kind": "val",
            "step": state.step,
            "tokens_seen": state.tokens_seen,
            "train_seconds": round(state.train_seconds, 1),
            "val_loss": val,
            "val_bits_per_byte": val / LN2 / bytes_per_token,
            "eval_seconds": round(time.time() - t0, 1),
        }
        state.history.append({k: record[k] for k in ("step", "tokens_seen", "train_seconds", "val_loss")})
        _append_metrics(out_dir, record)
        if state.best_val_loss is None or val < state.best_val_loss:
            state.best_val_loss = val
            save_checkpoint(
                out_dir / BEST_NAME,
                {
                    "model": model.state_dict(),
                    "run_state": dataclasses.asdict(state),
                    "model_config": dataclasses.asdict(model_cfg),
                    "train_config": dataclasses.asdict(cfg),
                },
            )
        log(
            f"step {state.step} tokens {state.tokens_seen:,} val {val:.4f} nats/tok {record['val_bits_per_byte']:.4f} bpb"
        )

    start_wall = time.time()
    last_ckpt = time.time()
    # evaluations at multiples of eval_every_tokens, wherever a run was resumed
    last_eval_tokens = state.tokens_seen - state.tokens_seen % cfg.eval_every_tokens
    interval_loss, interval_steps, interval_t0 = 0.0, 0, time.time()
    steps_this_run = 0
    log(
        f"start at step {state.step}/{cfg.total_steps} ({state.tokens_seen:,} tokens), {model.num_parameters():,} params"
    )
    probe_t0 = None
    while state.step < cfg.total_steps:
        if fit_pending and state.step == probe_start:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            probe_t0 = time.time()
        if fit_pending and state.step == probe_end:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rate = (probe_end - probe_start) * cfg.tokens_per_step / (time.time() - probe_t0)
            remaining = cfg.fit_schedule_s - prior_seconds - (time.time() - start_wall)
            fitted = state.tokens_seen + int(rate * max(0.0, remaining))
            cfg = dataclasses.replace(cfg, max_tokens=min(cfg.max_tokens, fitted))
            state.fitted_max_tokens = cfg.max_tokens
            fit_pending = False
            log(
                f"schedule fitted to {cfg.fit_schedule_s:.0f} s at {rate:,.0f} tok/s: max_tokens {cfg.max_tokens:,}"
            )
        t_step = time.time()
        lr = learning_rate(state.step, cfg, state.rewarm_from)
        for group in optimizer.param_groups:
            group["lr"] = lr
        windows = batch_for_step(train_tokens, state.step, cfg.batch_size, cfg.seq_len, cfg.seed)
        loss = next_token_loss(step_fn, windows, cfg.autocast_bf16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        state.step += 1
        state.tokens_seen += cfg.tokens_per_step
        state.train_seconds += time.time() - t_step
        steps_this_run += 1
        # Accumulated on the device: one host synchronisation per log interval, not per step.
        interval_loss = interval_loss + loss.detach()
        interval_steps += 1

        if interval_steps >= cfg.log_every_steps:
            interval_loss = float(interval_loss)
            if not math.isfinite(interval_loss):
                raise FloatingPointError(f"non-finite training loss {interval_loss} before step {state.step}")
            elapsed = time.time() - interval_t0
            record = {
                "kind": "train",
                "step": state.step,
                "tokens_seen": state.tokens_seen,
                "lr": lr,
                "train_loss": interval_loss / interval_steps,
                "tokens_per_s": interval_steps * cfg.tokens_per_step / elapsed,
            }
            _append_metrics(out_dir, record)
            log(
                f"step {state.step} loss {record['train_loss']:.4f} lr {lr:.2e} {record['tokens_per_s']:.0f} tok/s"
            )
            interval_loss, interval_steps, interval_t0 = 0.0, 0, time.time()

        if state.tokens_seen - last_eval_tokens >= cfg.eval_every_tokens:
            run_eval()
            last_eval_tokens = state.tokens_seen - state.tokens_seen % cfg.eval_every_tokens
        if time.time() - last_ckpt >= cfg.checkpoint_every_s:
            checkpoint_now()
            last_ckpt = time.time()
            log(f"checkpoint at step {state.step}")
        out_of_time = cfg.time_limit_s is not None and time.time() - start_wall >= cfg.time_limit_s
        stopped_early = cfg.stop_after_steps is not None and steps_this_run >= cfg.stop_after_steps
        if stop.raised or out_of_time or stopped_early:
            break

    stopped_early = cfg.stop_after_steps is not None and steps_this_run >= cfg.stop_after_steps
    if not (stop.raised or stopped_early):
        run_eval()
    checkpoint_now()
    log(f"stopped at step {state.step}, checkpoint written")
    return state


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _export_weights(model, export_dir: Path, dtype: torch.dtype) -> None:
    half = model.to(dtype)
    for name, tensor in half.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"weight {name} overflows {dtype}")
    half.config.dtype = str(dtype).removeprefix("torch.")
    half.save_pretrained(str(export_dir), safe_serialization=True)
    model.float()


def export(
    out_dir: Path | str,
    export_dir: Path | str = DEFAULT_EXPORT_DIR,
    dtype: torch.dtype = torch.float16,
    eval_tokens: int | None = None,
    in_progress: bool = True,
    command: str | None = None,
    from_best: bool = False,
) -> dict:
    """Write the checkpoint of ``out_dir`` to ``export_dir`` in Hugging Face layout.

    ``from_best``: export the weights of the lowest in-training validation loss (``best.pt``)
    instead of the latest checkpoint (a multi-epoch run can overfit the small corpus late).

    Also evaluates the validation loss of the fp32 checkpoint and of the exported half-precision
    weights loaded back in fp32 (they must agree within rounding noise), and writes
    ``training_state.json`` (so ``--resume`` can restart from the export) and ``MODEL_CARD.md``.
    Returns the training-state record.
    """
    from transformers import AutoModelForCausalLM

    out_dir, export_dir = Path(out_dir), Path(export_dir)
    checkpoint = load_checkpoint(out_dir / (BEST_NAME if from_best else CHECKPOINT_NAME))
    meta = json.loads((out_dir / META_NAME).read_text())
    model_cfg = _config_from_dict(ModelConfig, checkpoint["model_config"])
    train_cfg = _config_from_dict(TrainConfig, checkpoint["train_config"])
    run_state = checkpoint["run_state"]
    model = build_model(model_cfg, 0, meta["eos_id"])
    model.load_state_dict(checkpoint["model"])
    val_tokens = load_split(out_dir, "val")
    eval_tokens = eval_tokens or len(val_tokens)
    val_fp32 = evaluate(model, val_tokens, train_cfg.seq_len, eval_tokens, autocast_bf16=False)

    tmp_dir = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    _export_weights(model, tmp_dir, dtype)
    for name in os.listdir(out_dir / "tokenizer"):
        shutil.copy(out_dir / "tokenizer" / name, tmp_dir / name)
    make_tokenizer_config_portable(tmp_dir / "tokenizer_config.json")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_dir), dtype=torch.float32)
    val_half = evaluate(reloaded, val_tokens, train_cfg.seq_len, eval_tokens, autocast_bf16=False)
    bpt = meta["val"]["bytes_per_token"]
    record = {
        "step": run_state["step"],
        "tokens_seen": run_state["tokens_seen"],
        "train_seconds": run_state["train_seconds"],
        "max_tokens": train_cfg.max_tokens,
        "in_progress": in_progress and run_state["step"] < train_cfg.total_steps,
        "val_loss_fp32_checkpoint": val_fp32,
        "val_loss_exported": val_half,
        "val_bits_per_byte": val_half / LN2 / bpt,
        "val_tokens_evaluated": eval_tokens,
        "exported_dtype": str(dtype).removeprefix("torch."),
        "n_params": model.num_parameters(),
        "model_config": checkpoint["model_config"],
        "train_config": checkpoint["train_config"],
        "data": {k: meta[k] for k in ("vocab_size", "train", "val", "val_fraction")},
        "history": run_state["history"],
        "hardware": run_state.get("hardware"),
        "train_command": run_state.get("train_command"),
    }
    record["greedy_samples"] = greedy_continuations(tmp_dir)
    (tmp_dir / TRAINING_STATE_NAME).write_text(json.dumps(record, indent=1))
    (tmp_dir / "MODEL_CARD.md").write_text(model_card(record, command, name=export_dir.name))
    if export_dir.exists():
        shutil.rmtree(export_dir)
    os.replace(tmp_dir, export_dir)
    return record


SAMPLE_PROMPTS = (
    "def fibonacci(n):\n",
    "import os\n\n\ndef read_lines(path):\n",
    "class Stack:\n    def __init__(self):\n",
)


@torch.no_grad()
def greedy_continuations(
    model_dir: Path | str, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 48
) -> list[dict]:
    """Greedy continuations of ``prompts`` by the exported model (loaded in fp32 by the Auto classes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
        samples.append({"prompt": prompt, "continuation": tokenizer.decode(out[0, ids.shape[1] :])})
    return samples


ROLES = {
    "target": "bundled as the target model of `eagle`'s offline examples and CPU benchmarks",
    "assistant": "the small assistant model of the Hugging Face assisted-generation peer in `eagle bench`",
}


def model_card(record: dict, command: str | None, name: str = "target") -> str:
    """The MODEL_CARD.md text for an export record (numbers only from the record)."""
    m, t, d = record["model_config"], record["train_config"], record["data"]
    status = (
        f"**Training in progress**: {record['tokens_seen']:,} of the planned {record['max_tokens']:,} tokens."
        if record["in_progress"]
        else f"Training finished after {record['tokens_seen']:,} tokens."
    )
    curve = "\n".join(
        f"| {h['step']} | {h['tokens_seen']:,} | {h['train_seconds'] / 60:.1f} | {h['val_loss']:.3f} |"
        for h in record["history"]
    )
    samples = "\n".join(
        f"```python\n{s['prompt']}{s['continuation']}\n```" for s in record.get("greedy_samples", [])
    )
    flags = " --compile" if t["compile"] else ""
    return f"""# tiny-code {name}

A small Llama-architecture language model of Python code, trained from scratch on the Python
standard library, {ROLES.get(name, "trained with `eagle.train.pretrain`")}.

{status}

## Architecture
LlamaForCausalLM, {m["num_hidden_layers"]} layers, hidden {m["hidden_size"]}, SwiGLU MLP {m["intermediate_size"]},
{m["num_attention_heads"]} query heads / {m["num_key_value_heads"]} KV heads of dim {m["hidden_size"] // m["num_attention_heads"]},
RoPE theta {m["rope_theta"]:g}, context {m["max_position_embeddings"]}, vocabulary {m["vocab_size"]}, untied
embedding and LM head; {record["n_params"]:,} parameters, stored in {record["exported_dtype"]}.

## Data and tokenizer
Every `.py` file of the training machine's CPython standard library (`sysconfig` stdlib path), minus
site-packages, generated tables (`pydoc_data/topics.py`, `encodings` code pages, `_sysconfigdata*`),
malformed test inputs (`data/`, `badsyntax*` ...), non-UTF-8 files and files over 256 KiB. Held out
by file: {d["val_fraction"]:.0%} by SHA-256 of the relative path ({d["val"]["files"]} files,
{d["val"]["bytes"]:,} bytes, {d["val"]["tokens"]:,} tokens); training split {d["train"]["files"]} files,
{d["train"]["bytes"]:,} bytes, {d["train"]["tokens"]:,} tokens. Byte-level BPE ({d["vocab_size"]} tokens, HF
`tokenizers`, trained on the training split), {d["val"]["bytes_per_token"]:.3f} bytes/token on the
validation split; `<|endoftext|>` (id 0) is BOS/EOS and separates files.

## Training
AdamW betas {tuple(t["betas"])}, peak LR {t["lr"]:g}, linear warm-up {t["warmup_tokens"]:,} tokens, cosine to
{t["min_lr"]:g} at {t["max_tokens"]:,} tokens, weight decay {t["weight_decay"]} (matrices), grad clip
{t["grad_clip"]}, batch {t["batch_size"]} x {t["seq_len"]} tokens of random windows, bf16 autocast:
{t["autocast_bf16"]}, torch.compile: {t["compile"]}, on {record.get("hardware") or "CPU"}.

## Results (validation split, {record["val_tokens_evaluated"]:,} tokens)
- tokens seen: {record["tokens_seen"]:,} ({record["step"]:,} steps), training time
  {record["train_seconds"] / 60:.1f} minutes on {record.get("hardware") or "CPU"}
- validation loss: {record["val_loss_exported"]:.4f} nats/token ({record["val_bits_per_byte"]:.4f} bits/byte)
  with the exported {record["exported_dtype"]} weights loaded in fp32; the fp32 checkpoint gives
  {record["val_loss_fp32_checkpoint"]:.4f}

Curve: in-training evaluations on the first {t["eval_tokens"]:,} validation tokens with bf16 autocast
(minutes = time spent in training steps). The export holds the weights of the lowest in-training validation
loss when it was made with `--from-best` (later evaluations show the small corpus being overfitted).

| step | tokens seen | minutes | val loss (nats/token) |
|---:|---:|---:|---:|
{curve}

## Greedy continuations (48 new tokens, exported weights)
{samples}

## Reproduce / continue
```bash
# the whole pair in one command (tokenizer, this target, the draft head, held-out tau; minutes on a GPU):
eagle train tiny-code --work /root/eagle-work/tiny-code --device cuda --install eagle/assets/tiny-code
# this target alone, as it was trained (WORK: a work directory outside the repository):
{record.get("train_command") or f"python -m eagle.train.pretrain --out WORK --max-tokens {t['max_tokens']}{flags}"}
# continue: from the work dir's checkpoint, or, if it is gone, from these exported weights
# (fresh optimizer, {t["rewarm_steps"]}-step re-warm-up):
python -m eagle.train.pretrain --out WORK --max-tokens {t["max_tokens"]}{flags} --resume
# export the best-validation weights here:
python -m eagle.train.pretrain --out WORK --export eagle/assets/tiny-code/target --from-best --finished
```
{f"This export was written by: `{command}`" if command else ""}
"""


# --------------------------------------------------------------------------------------------------
# Throughput measurement (config selection)
# --------------------------------------------------------------------------------------------------


class _ThroughputProbe:
    """One config's model + optimizer, timed on random tokens (forward + backward + AdamW step)."""

    def __init__(
        self, model_cfg: ModelConfig, batch_size: int, seq_len: int, autocast_bf16: bool, compile: bool
    ):
        cfg = TrainConfig(
            seq_len=seq_len, batch_size=batch_size, autocast_bf16=autocast_bf16, compile=compile
        )
        self.model = build_model(model_cfg, 0)
        self.optimizer = make_optimizer(self.model, cfg)
        self.step_fn = torch.compile(self.model) if compile else self.model
        self.windows = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len + 1))
        self.autocast_bf16 = autocast_bf16
        self.step()  # warm-up (and compilation)

    def step(self) -> None:
        loss = next_token_loss(self.step_fn, self.windows, self.autocast_bf16)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def tokens_per_s(self, steps: int) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second of this process over all its threads)."""
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        tokens = steps * self.windows[:, 1:].numel()
        return tokens / (time.perf_counter() - wall0), tokens / (time.process_time() - cpu0)


_H192 = {"hidden_size": 192, "intermediate_size": 512, "num_attention_heads": 3, "num_key_value_heads": 1}
_H128 = {"hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 2, "num_key_value_heads": 1}
_H320 = {"hidden_size": 320, "intermediate_size": 864, "num_attention_heads": 5, "num_key_value_heads": 1}
MEASURE_GRID = (
    # (label, ModelConfig overrides, seq_len, bf16, compile)
    ("h256 L12 fp32", {}, 512, False, False),
    ("h256 L12 bf16", {}, 512, True, False),
    ("h256 L12 bf16 compile", {}, 512, True, True),
    ("h256 L12 fp32 compile", {}, 512, False, True),
    ("h128 L12 bf16", _H128, 512, True, False),
    ("h192 L12 bf16", _H192, 512, True, False),
    ("h320 L12 bf16", _H320, 512, True, False),
    ("h256 L12 bf16 ctx256", {}, 256, True, False),
)


def run_measurements(
    vocab_size: int, batch_tokens: int, labels: list[str] | None, rounds: int = 3
) -> list[dict]:
    """Tokens/s of the ``MEASURE_GRID`` configs, interleaved over ``rounds`` rounds.

    The machine is shared, so each config's best round (the least disturbed one) is reported, and
    also tokens per CPU-second of this process: under background load that is the robust figure
    (``cpu_tokens_per_s * threads`` estimates the unloaded tokens/s when threads scale perfectly).
    Interleaving exposes every config to the same background load.
    """
    torch.set_num_threads(2)
    probes = {}
    for label, overrides, seq_len, bf16, comp in MEASURE_GRID:
        if not labels or label in labels:
            model_cfg = ModelConfig(
                vocab_size=vocab_size, **{"max_position_embeddings": seq_len, **overrides}
            )
            probes[label] = _ThroughputProbe(model_cfg, batch_tokens // seq_len, seq_len, bf16, comp)
    samples = {label: [] for label in probes}
    for _ in range(rounds):
        for label, probe in probes.items():
            samples[label].append(probe.tokens_per_s(steps=2))
    results = []
    for label, probe in probes.items():
        results.append(
            {
                "config": label,
                "params": probe.model.num_parameters(),
                "best_wall_tokens_per_s": round(max(wall for wall, _ in samples[label])),
                "best_cpu_tokens_per_s": round(max(cpu for _, cpu in samples[label])),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eagle train target", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_WORK_DIR, help="work directory (outside the repo)")
    p.add_argument("--max-tokens", type=int, default=TrainConfig.max_tokens, help="cosine schedule end")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out (or --init-from)")
    p.add_argument(
        "--init-from",
        type=Path,
        default=DEFAULT_EXPORT_DIR,
        help="export used by --resume without a checkpoint",
    )
    p.add_argument("--corpus-root", type=Path, default=None, help="default: this Python's stdlib")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, help="held-out share of files")
    p.add_argument("--hidden-size", type=int, default=ModelConfig.hidden_size)
    p.add_argument("--intermediate-size", type=int, default=ModelConfig.intermediate_size)
    p.add_argument("--layers", type=int, default=ModelConfig.num_hidden_layers)
    p.add_argument("--heads", type=int, default=ModelConfig.num_attention_heads)
    p.add_argument("--kv-heads", type=int, default=ModelConfig.num_key_value_heads)
    p.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--min-lr", type=float, default=TrainConfig.min_lr)
    p.add_argument("--warmup-tokens", type=int, default=TrainConfig.warmup_tokens)
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=TrainConfig.num_threads)
    p.add_argument("--checkpoint-every-s", type=float, default=TrainConfig.checkpoint_every_s)
    p.add_argument("--eval-every-tokens", type=int, default=TrainConfig.eval_every_tokens)
    p.add_argument(
        "--eval-tokens", type=int, default=TrainConfig.eval_tokens, help="validation tokens per eval"
    )
    p.add_argument("--time-limit-s", type=float, default=None)
    p.add_argument(
        "--fit-schedule-s",
        type=float,
        default=None,
        help="size the cosine schedule to this many seconds (measured tokens/s; at most --max-tokens)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on either)")
    p.add_argument(
        "--export", type=Path, default=None, metavar="DIR", help="export the checkpoint to DIR and exit"
    )
    p.add_argument("--export-dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--finished", action="store_true", help="with --export: do not mark the model in progress")
    p.add_argument("--from-best", action="store_true", help="with --export: the best-validation weights")
    p.add_argument("--measure", nargs="*", default=None, metavar="LABEL", help="measure tokens/s and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure is not None:
        run_measurements(args.vocab_size, args.seq_len * args.batch_size, args.measure)
        return 0
    if args.export is not None:
        record = export(
            args.out,
            args.export,
            getattr(torch, args.export_dtype),
            in_progress=not args.finished,
            from_best=args.from_best,
            command="python -m eagle.train.pretrain " + " ".join(sys.argv[1:]) if argv is None else None,
        )
        print(json.dumps({k: v for k, v in record.items() if k not in ("history", "data")}, indent=1))
        return 0

    resuming_from_export = args.resume and not (args.out / CHECKPOINT_NAME).is_file()
    init_from = args.init_from if resuming_from_export else None
    if resuming_from_export and not (args.init_from / TRAINING_STATE_NAME).is_file():
        raise SystemExit(f"--resume: no checkpoint in {args.out} and no export in {args.init_from}")
    cfg = TrainConfig(  # checked before the tokenizer and token files are built
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_tokens=args.warmup_tokens,
        autocast_bf16=not args.no_bf16,
        compile=args.compile,
        num_threads=args.threads,
        checkpoint_every_s=args.checkpoint_every_s,
        eval_every_tokens=args.eval_every_tokens,
        eval_tokens=args.eval_tokens,
        time_limit_s=args.time_limit_s,
        fit_schedule_s=args.fit_schedule_s,
        device=args.device,
    )
    meta = prepare_data(
        args.out,
        args.corpus_root,
        args.vocab_size,
        args.val_fraction,
        tokenizer_from=init_from,
        model_max_length=args.seq_len,
    )
    model_cfg = ModelConfig(
        vocab_size=meta["vocab_size"],
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,
    )
    train(
        args.out,
        model_cfg,
        cfg,
        resume=args.resume,
        init_from=init_from,
        install_signal_handlers=True,
        command="python -m eagle.train.pretrain " + " ".join(sys.argv[1:]) if argv is None else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
