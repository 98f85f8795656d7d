"""Target features for EAGLE draft-head training, streamed to disk in safetensors shards.

The target runs (no gradients) over token sequences of ``seq_len`` tokens and its features are
stored beside the tokens. A sequence comes from one of two sources:

* ``corpus``: a window of a token file (a 1-D integer ``.npy``, e.g. the pretraining ``train.npy``);
* ``generate``: the first ``prompt_len`` tokens of such a window, continued by the target itself
  (greedy, or sampled with ``temperature``) up to ``seq_len`` tokens. EAGLE allows training on the
  target's own continuations; it matches the token distribution the head sees when decoding.

Windows are the non-overlapping ``seq_len`` slices of the token file, visited in an order fixed by
``seed``; sequence ``i`` of a run is a pure function of the run's settings and ``i``, so an
interrupted dump resumes by skipping the shards already on disk.

Directory layout::

    meta.json                  settings, the target's summary, shard list (written first, then updated)
    shard_00000.safetensors    input_ids  int32 [N, S]        token ids
                               hidden     fp16/bf16 [N, S, H] the target's final-norm features
                               loss_mask  uint8 [N, S]        1 where the feature is a training target
                               layer_hidden fp16/bf16 [N, K, S, H]  (only with feature_layers: the
                                          hidden states entering those target layers, e.g. EAGLE-3's)

Command line::

    python -m eagle.train.features --target DIR --tokens TRAIN.npy --out DIR \\
        [--source corpus|generate] [--seq-len 256] [--max-tokens 2000000] [--prompt-len 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eagle._args import checked_device, positive_int
from eagle.models import LlamaModel, generate_plain, load_target

META_NAME = "meta.json"
FORMAT = "eagle-features-v1"
SOURCES = ("corpus", "generate")
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Settings that change what a shard holds: a resumed dump must agree on all of them.
PLAN_KEYS = (
    "source",
    "seq_len",
    "prompt_len",
    "temperature",
    "seed",
    "shard_sequences",
    "batch_size",
    "dtype",
    "feature_layers",
    "mask_prompt",
    "tokens_len",
    "tokens_sha256",
)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


# --------------------------------------------------------------------------------------------------
# Token source
# --------------------------------------------------------------------------------------------------
def load_token_file(path: str | Path) -> np.ndarray:
    """A 1-D integer token array (memory-mapped) from a ``.npy`` file, or from ``DIR/train.npy``."""
    path = Path(path)
    if path.is_dir():
        path = path / "train.npy"
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise ValueError(f"token file {str(path)!r} is not a readable .npy array: {e}") from e
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"token file {str(path)!r} must hold a 1-D integer array, got {tokens.dtype} {tokens.shape}"
        )
    return tokens


def check_token_range(tokens: np.ndarray, vocab_size: int, what: str = "token file") -> None:
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"{what} holds ids in [{int(tokens.min())}, {int(tokens.max())}], outside the target's "
            f"vocabulary [0, {vocab_size}): was it tokenised for another model?"
        )


def window_order(num_windows: int, seed: int) -> np.ndarray:
    """The order in which the ``seq_len`` windows of the token file become sequences."""
    return np.random.default_rng([seed, 0x5EED]).permutation(num_windows)


# --------------------------------------------------------------------------------------------------
# The plan (what meta.json records)
# --------------------------------------------------------------------------------------------------
@dataclass
class FeaturePlan:
    """Settings of a feature dump; with the token file they determine every shard's contents."""

    source: str = "corpus"
    seq_len: int = 256
    prompt_len: int = 32
    temperature: float = 0.0
    seed: int = 0
    shard_sequences: int = 256
    batch_size: int = 8
    dtype: str = "float16"
    feature_layers: list[int] | None = None
    mask_prompt: bool = False
    max_tokens: int = 2_000_000
    tokens_len: int = 0
    # the token file's contents: a resumed dump over another file of the same length mixed two corpora
    tokens_sha256: str | None = None

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (a feature and its successor), got {self.seq_len}")
        if self.source == "generate" and not 1 <= self.prompt_len < self.seq_len:
            raise ValueError(f"prompt_len must be in [1, seq_len={self.seq_len}), got {self.prompt_len}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.shard_sequences < 1 or self.batch_size < 1:
            raise ValueError("shard_sequences and batch_size must be >= 1")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens={self.max_tokens} is less than one sequence of {self.seq_len}")

    @property
    def num_windows(self) -> int:
        return self.tokens_len // self.seq_len

    @property
    def num_sequences(self) -> int:
        """Sequences in the dump: the token budget, capped by the windows of the token file."""
        return min(self.max_tokens // self.seq_len, self.num_windows)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_sequences / self.shard_sequences)

    def shard_range(self, shard: int) -> range:
        start = shard * self.shard_sequences
        return range(start, min(start + self.shard_sequences, self.num_sequences))


FINGERPRINT_PROJECTIONS = 4


def lm_head_fingerprint(weight: torch.Tensor) -> list[float]:
    """``[norm, p_1..p_4]``: the Frobenius norm of ``weight [V, H]`` and its bilinear projections
    ``r_i^T W c_i`` on fixed random sign vectors. Different matrices differ by about the norm;
    rounding the same matrix to bf16 moves them by well under 1% of it."""
    W = weight.detach().to("cpu", torch.float64)
    gen = torch.Generator().manual_seed(0xE461E)
    rows = torch.randint(0, 2, (FINGERPRINT_PROJECTIONS, W.shape[0]), generator=gen).double() * 2 - 1
    cols = torch.randint(0, 2, (FINGERPRINT_PROJECTIONS, W.shape[1]), generator=gen).double() * 2 - 1
    projections = (rows * (W @ cols.T).T).sum(-1) / math.sqrt(W.numel())
    return [float(W.norm() / math.sqrt(W.numel())), *projections.tolist()]


def target_summary(target: LlamaModel) -> dict:
    """What a feature directory records about its target, to reject features of another model."""
    cfg = target.config
    return {
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "num_layers": cfg.num_layers,
        "lm_head_fingerprint": lm_head_fingerprint(target.lm_head_weight),
    }


def check_target_matches(recorded: dict, target: LlamaModel, where: str) -> None:
    """Raise ValueError when ``target`` is not the model whose summary ``recorded`` holds (the
    same weights loaded in another dtype or on another device match)."""
    actual = target_summary(target)
    for key in ("hidden_size", "vocab_size", "num_layers"):
        if recorded.get(key) != actual[key]:
            raise ValueError(
                f"{where} was computed by a different target: {key}={recorded.get(key)} there, "
                f"{actual[key]} for this target"
            )
    ref, got = recorded.get("lm_head_fingerprint"), actual["lm_head_fingerprint"]
    scale = got[0]
    if ref is None or len(ref) != len(got) or any(abs(a - b) > 1e-2 * scale for a, b in zip(ref, got)):
        raise ValueError(
            f"{where} was computed by a different target (lm_head fingerprints differ: "
            f"{[round(v, 5) for v in ref or []]} there, {[round(v, 5) for v in got]} here)"
        )


# --------------------------------------------------------------------------------------------------
# Computing features
# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def target_features(
    target: LlamaModel, input_ids: torch.Tensor, feature_layers: Sequence[int] | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The target's final-norm features ``[B, S, H]`` (and the hidden states entering
    ``feature_layers``) for ``input_ids [B, S]``, by one causal prefill on a fresh cache."""
    B, S = input_ids.shape
    cache = target.new_cache(B, S)
    out = target(input_ids, cache, compute_logits=False, feature_layers=feature_layers)
    return out.hidden, out.layer_hidden


def sequence_tokens(
    plan: FeaturePlan,
    tokens: np.ndarray,
    order: np.ndarray,
    indices: range,
    target: LlamaModel,
    generator: torch.Generator,
) -> torch.Tensor:
    """``[len(indices), seq_len]`` int64 token ids of the given sequences."""
    S = plan.seq_len
    starts = order[np.asarray(indices)] * S
    if plan.source == "corpus":
        rows = np.stack([tokens[s : s + S] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows).to(target.device)
    P = plan.prompt_len
    prompts = [tokens[s : s + P].astype(np.int64).tolist() for s in starts]
    new = generate_plain(target, prompts, S - P, temperature=plan.temperature, generator=generator)
    rows = [p + n for p, n in zip(prompts, new)]
    return torch.tensor(rows, dtype=torch.int64, device=target.device)


def shard_tensors(
    plan: FeaturePlan, tokens: np.ndarray, order: np.ndarray, shard: int, target: LlamaModel
) -> dict[str, torch.Tensor]:
    """Everything shard ``shard`` holds, computed batch by batch (deterministic: the sampling
    generator is seeded by ``(seed, shard)``)."""
    storage = STORAGE_DTYPES[plan.dtype]
    generator = torch.Generator(device=target.device).manual_seed(plan.seed * 1_000_003 + shard)
    seqs = plan.shard_range(shard)
    n, S, H = len(seqs), plan.seq_len, target.config.hidden_size
    # Filled in place batch by batch: a list of batches then torch.cat held the shard twice.
    out = {
        "input_ids": torch.empty(n, S, dtype=torch.int32),
        "hidden": torch.empty(n, S, H, dtype=storage),
    }
    if plan.feature_layers:
        out["layer_hidden"] = torch.empty(n, len(plan.feature_layers), S, H, dtype=storage)
    for lo in range(seqs.start, seqs.stop, plan.batch_size):
        batch = range(lo, min(lo + plan.batch_size, seqs.stop))
        rows = slice(lo - seqs.start, lo - seqs.start + len(batch))
        batch_ids = sequence_tokens(plan, tokens, order, batch, target, generator)
        h, layer_h = target_features(target, batch_ids, plan.feature_layers)
        out["input_ids"][rows] = batch_ids.to(torch.int32).cpu()
        out["hidden"][rows] = _finite_in_storage(h, storage, "hidden", shard, batch)
        if layer_h is not None:
            stacked = torch.stack(layer_h, dim=1)
            out["layer_hidden"][rows] = _finite_in_storage(stacked, storage, "layer_hidden", shard, batch)
    mask = torch.ones_like(out["input_ids"], dtype=torch.uint8)
    if plan.source == "generate" and plan.mask_prompt:
        mask[:, : plan.prompt_len] = 0
    out["loss_mask"] = mask
    return out


def _finite_in_storage(
    x: torch.Tensor, storage: torch.dtype, name: str, shard: int, batch: range
) -> torch.Tensor:
    """``x`` cast to the storage dtype, on the CPU; refuses NaN/inf (from the target, or an overflow
    of the cast: fp16 stops at 65504), which would make every training step that reads it NaN."""
    stored = x.to(storage).cpu()
    if not torch.isfinite(stored).all():
        where = "the target's output" if not torch.isfinite(x).all() else f"the cast to {storage}"
        raise ValueError(
            f"shard {shard}, sequences {batch.start}..{batch.stop - 1}: {name} has NaN or inf values "
            f"(from {where}); check the target, or store features in another --dtype"
        )
    return stored


# --------------------------------------------------------------------------------------------------
# Writing (atomic, with clear errors on a full disk)
# --------------------------------------------------------------------------------------------------
def _disk_error(e: OSError, path: Path) -> OSError:
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    hint = " (the disk is full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return OSError(
        e.errno, f"writing {str(path)!r} failed{hint}: {e.strerror or e}; {free / 2**20:.1f} MiB free there"
    )


def write_atomically(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and rename the result to ``path``; an OSError (full disk, read-only
    directory) is re-raised naming the file and the free space, and leaves no partial file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _disk_error(e, path) from e


def save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))


def write_meta(out_dir: Path, meta: dict) -> None:
    write_atomically(out_dir / META_NAME, lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))


def estimated_bytes(plan: FeaturePlan, hidden_size: int, shards: int) -> int:
    per_token = hidden_size * (1 + len(plan.feature_layers or ())) * STORAGE_DTYPES[plan.dtype].itemsize + 5
    return shards * plan.shard_sequences * plan.seq_len * per_token


def _check_free_space(out_dir: Path, need: int) -> None:
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise OSError(
            errno.ENOSPC,
            f"the feature dump needs about {need / 2**20:.1f} MiB but {str(out_dir)!r} has "
            f"{free / 2**20:.1f} MiB free; lower --max-tokens or use another --out",
        )


def _tokens_sha256(tokens: np.ndarray) -> str:
    """SHA-256 of the token ids as int64, read in chunks (the file is memory-mapped)."""
    digest = hashlib.sha256()
    for start in range(0, len(tokens), 1 << 20):
        digest.update(np.ascontiguousarray(tokens[start : start + (1 << 20)], dtype=np.int64).tobytes())
    return digest.hexdigest()


def _resumed_meta(out_dir: Path, meta: dict, target: LlamaModel) -> dict:
    """``meta`` when the existing meta.json of ``out_dir`` has the same plan and target (else ValueError)."""
    old = read_meta(out_dir)
    check_target_matches(old["target"], target, f"{str(out_dir)!r}")
    differs = {
        k: (old["plan"].get(k), meta["plan"][k])
        for k in PLAN_KEYS
        if old["plan"].get(k) != meta["plan"][k]
        and (k != "tokens_sha256" or k in old["plan"])  # (older dumps)
    }
    if differs:
        what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in ((k, *v) for k, v in differs.items()))
        raise ValueError(
            f"{str(out_dir)!r} already holds features with other settings ({what}); "
            "use a fresh --out or the same settings to resume"
        )
    return meta


def _shard_rows(path: Path) -> int | None:
    """Sequences a stored shard holds (None: no readable shard there)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice("input_ids").get_shape()[0])
    except (SafetensorError, OSError, KeyError):
        return None


def dump_features(
    target: LlamaModel,
    tokens: np.ndarray,
    out_dir: str | Path,
    plan: FeaturePlan,
    *,
    target_path: str | None = None,
    progress: bool = True,
) -> dict:
    """Compute and store the features of ``plan`` (see the module docstring); returns meta.json's dict.

    Shards already present in ``out_dir`` (from an interrupted run with the same settings) are kept.
    Raises ValueError for a token file shorter than one sequence or with ids outside the target's
    vocabulary, or an ``out_dir`` holding features of other settings; OSError naming the file and the
    free space when the disk is (or would become) full.
    """
    plan = dataclasses.replace(plan, tokens_len=int(len(tokens)), tokens_sha256=_tokens_sha256(tokens))
    if plan.feature_layers is not None:
        plan.feature_layers = [int(i) for i in plan.feature_layers]
    plan.validate()
    limit = target.config.max_position_embeddings
    if plan.seq_len > limit:
        raise ValueError(
            f"seq_len={plan.seq_len} exceeds the target's max_position_embeddings={limit}: the head would "
            "train on positions the target never decodes at"
        )
    if plan.num_windows == 0:
        raise ValueError(f"token file holds {len(tokens)} tokens, fewer than one sequence of {plan.seq_len}")
    check_token_range(tokens, target.config.vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "target": target_summary(target),
        "target_path": target_path,
        "plan": dataclasses.asdict(plan),
        "num_sequences": plan.num_sequences,
        "shards": [shard_name(i) for i in range(plan.num_shards)],
    }
    if (out_dir / META_NAME).exists():
        meta = _resumed_meta(out_dir, meta, target)
    # a shard is kept only when it holds the rows this plan puts in it: a dump resumed with a larger
    # max_tokens grows the last shard of the earlier one (kept, it would have been short)
    todo = [
        i for i in range(plan.num_shards) if _shard_rows(out_dir / shard_name(i)) != len(plan.shard_range(i))
    ]
    _check_free_space(out_dir, estimated_bytes(plan, target.config.hidden_size, len(todo)))
    write_meta(out_dir, meta)
    order = window_order(plan.num_windows, plan.seed)
    bar = _progress(plan, len(todo), progress)
    for shard in todo:
        save_shard(out_dir / shard_name(shard), shard_tensors(plan, tokens, order, shard, target))
        if bar is not None:
            bar.update(len(plan.shard_range(shard)) * plan.seq_len)
    if bar is not None:
        bar.close()
    return meta


def _progress(plan: FeaturePlan, shards: int, enabled: bool):
    if not enabled or shards == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=plan.num_sequences * plan.seq_len, unit="tok", unit_scale=True, desc="features")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a feature directory; clear errors for a missing, empty or foreign directory."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"feature directory {str(data_dir)!r} does not exist")
    path = data_dir / META_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(data_dir)!r} holds no features ({META_NAME} is missing); "
            "create them with `python -m eagle.train.features`"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is unreadable: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a feature directory of format {FORMAT!r}")
    return meta


class FeatureData:
    """Random access to the sequences of a complete feature directory.

    ``data[indices]`` returns a dict of tensors for those sequences, in that order:
    ``input_ids`` int64 ``[n, S]``, ``hidden`` ``[n, S, H]`` and (when stored) ``layer_hidden``
    ``[n, K, S, H]`` in ``dtype``, ``loss_mask`` float32 ``[n, S]``. Shards are memory-mapped.
    """

    def __init__(self, data_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        from safetensors import SafetensorError, safe_open

        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir)
        self.plan = FeaturePlan(**self.meta["plan"])
        self.dtype = dtype
        missing = [s for s in self.meta["shards"] if not (self.dir / s).is_file()]
        if missing:
            raise ValueError(
                f"{str(self.dir)!r} is incomplete: {len(missing)} of {len(self.meta['shards'])} shards missing "
                f"(first {missing[0]}); rerun the feature dump with the same settings to finish it"
            )
        if self.meta["num_sequences"] == 0:
            raise ValueError(f"{str(self.dir)!r} holds no sequences")
        self._files = []
        for index, name in enumerate(self.meta["shards"]):
            try:
                self._files.append(safe_open(str(self.dir / name), framework="pt"))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"feature shard {str(self.dir / name)!r} is unreadable: {e}") from e
            want = len(self.plan.shard_range(index))
            rows = self._files[-1].get_slice("input_ids").get_shape()[0]
            if rows != want:
                raise ValueError(
                    f"feature shard {str(self.dir / name)!r} holds {rows} sequences where meta.json plans {want}; "
                    "rerun the feature dump with the same settings to rewrite it"
                )
        self.keys = set(self._files[0].keys())

    def __len__(self) -> int:
        return self.meta["num_sequences"]

    @property
    def seq_len(self) -> int:
        return self.plan.seq_len

    @property
    def hidden_size(self) -> int:
        return self.meta["target"]["hidden_size"]

    def token_ids(self, indices: Sequence[int]) -> torch.Tensor:
        """int64 ``[n, S]``: the ``input_ids`` of those sequences alone (no features read)."""
        return self._read(indices, ("input_ids",))["input_ids"].long()

    def _read(self, indices: Sequence[int], keys) -> dict[str, torch.Tensor]:
        """The stored tensors ``keys`` of those sequences, in that order, as stored."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"sequence indices {bad[:5]} outside [0, {len(self)})")
        per = self.plan.shard_sequences
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for i in indices:
            f = self._files[i // per]
            j = i % per
            for k in keys:
                rows[k].append(f.get_slice(k)[j : j + 1])
        return {k: torch.cat(v) for k, v in rows.items()}

    def __getitem__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        out = self._read(indices, self.keys)
        out["input_ids"] = out["input_ids"].long()
        out["loss_mask"] = out["loss_mask"].float()
        for k in ("hidden", "layer_hidden"):
            if k in out:
                out[k] = out[k].to(self.dtype)
        return out


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eagle train features",
        description="Dump a target's features over token sequences for EAGLE draft-head training.",
    )
    p.add_argument("--target", required=True, help="target checkpoint directory (Hugging Face layout)")
    p.add_argument(
        "--tokens", required=True, help="1-D integer .npy token file, or a directory with train.npy"
    )
    p.add_argument("--out", required=True, help="output feature directory (resumes when it exists)")
    p.add_argument(
        "--source", choices=SOURCES, default="corpus", help="corpus windows or target continuations"
    )
    p.add_argument("--seq-len", type=int, default=256)
    # (None: not given; --source corpus refuses them, generate takes the defaults in _GENERATE_DEFAULTS)
    p.add_argument(
        "--prompt-len", type=int, default=None, help="generate: corpus tokens before the continuation (32)"
    )
    p.add_argument("--temperature", type=float, default=None, help="generate: 0 = greedy (the default)")
    p.add_argument(
        "--mask-prompt", action="store_true", default=None, help="generate: no loss on the prompt's features"
    )
    p.add_argument("--max-tokens", type=int, default=2_000_000, help="token budget of the dump")
    p.add_argument("--shard-sequences", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="sequences per target forward")
    p.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float16", help="storage dtype")
    p.add_argument("--target-dtype", default="float32", help="dtype the target runs in")
    p.add_argument("--device", type=checked_device, default="cpu")
    p.add_argument("--eagle3", action="store_true", help="also store the EAGLE-3 layer inputs (2, L//2, L-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    p.add_argument("--quiet", action="store_true")
    return p


_GENERATE_DEFAULTS = {"prompt_len": 32, "temperature": 0.0, "mask_prompt": False}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = [name for name in _GENERATE_DEFAULTS if getattr(args, name) is not None]
    if args.source == "corpus" and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        print(
            f"eagle.train.features: error: {flags} apply to --source generate only (corpus windows have no "
            "prompt and are not sampled)",
            file=sys.stderr,
        )
        return 2
    for name, default in _GENERATE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        target = load_target(args.target, dtype=args.target_dtype, device=args.device)
        tokens = load_token_file(args.tokens)
        if args.eagle3 and target.config.num_layers < 4:
            raise ValueError(
                f"EAGLE-3 features (layers 2, L//2, L-3) need a target with >= 4 layers, got {target.config.num_layers}"
            )
        plan = FeaturePlan(
            source=args.source,
            seq_len=args.seq_len,
            prompt_len=args.prompt_len,
            temperature=args.temperature,
            seed=args.seed,
            shard_sequences=args.shard_sequences,
            batch_size=args.batch,
            dtype=args.dtype,
            feature_layers=list(target.config.eagle3_feature_layers) if args.eagle3 else None,
            mask_prompt=args.mask_prompt,
            max_tokens=args.max_tokens,
        )
        meta = dump_features(
            target, tokens, args.out, plan, target_path=str(args.target), progress=not args.quiet
        )
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:  # (TypeError: a --target-dtype)
        print(f"eagle.train.features: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(
            f"{meta['num_sequences']} sequences x {plan.seq_len} tokens in {len(meta['shards'])} shards at {args.out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
