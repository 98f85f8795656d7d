"""Checkpoint files: locate a checkpoint directory, read and write state dicts, check key sets.

Readable layouts (the first one present wins): ``model.safetensors``, ``model.safetensors.index.json``
(shards), ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` (shards). ``.bin`` files are read
with ``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


_ALIASES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` etc., or their names (also fp32, fp64, bf16, fp16); anything else is a TypeError."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        dtype = DTYPES.get(_ALIASES.get(name, name), dtype)
    if dtype not in DTYPES.values():
        raise TypeError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
    return dtype


def resolve_checkpoint(path: str | Path) -> Path:
    """A local checkpoint directory, or a Hugging Face hub id downloaded (config + weights only)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint directory holding config.json")
    name = str(path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"no checkpoint directory at {path} (and it is not a hub id 'owner/name')")
    try:
        return _download_from_hub(name)
    except Exception as exc:  # noqa: BLE001 - hub errors (offline, no such repo, ...) of many kinds
        raise FileNotFoundError(
            f"no checkpoint directory at {path}, and the hub could not provide {name!r} "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _download_from_hub(name: str) -> Path:
    """Config and weights of hub repo ``name``: the first layout of :data:`WEIGHT_FILES` the repo
    has, and of a sharded one only the shards its index names (a repo often holds several copies:
    safetensors and .bin shards, Mistral's consolidated.safetensors, an original/ folder)."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    files = set(HfApi().list_repo_files(name))
    layout = next((w for w in WEIGHT_FILES if w in files), None)
    if layout is None:
        raise FileNotFoundError(f"hub repo {name} has none of the weight files {list(WEIGHT_FILES)}")
    patterns = ["config.json", "generation_config.json", layout]
    if layout.endswith(".index.json"):
        weight_map = read_json(Path(hf_hub_download(name, layout))).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{name}/{layout} has no 'weight_map'")
        patterns += sorted(set(weight_map.values()))
    return Path(snapshot_download(name, allow_patterns=patterns))


def read_state_dict(directory: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in ``directory``, on CPU, in the file's dtypes; or, with ``dtype``,
    its float16 / bfloat16 / float32 / float64 tensors converted to ``dtype`` as each file is read
    (other dtypes are left for the caller to refuse), every tensor in memory of its own. safetensors
    reads tensors as views of the file mapped into memory: a model keeping them would change its
    weights when the checkpoint is rewritten in place, or crash (SIGBUS) when the file gets shorter."""
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            if name.endswith(".index.json"):
                return _read_sharded(path, dtype)
            return _read_file(path, dtype)
    raise FileNotFoundError(f"{directory} holds none of the weight files {list(WEIGHT_FILES)}")


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is not one (a truncated or
    hand-edited config)."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _refuse_placeholder(path: Path) -> None:
    """An empty file or a Git LFS pointer where the weights should be: each reader's own error is
    misleading (safetensors: "header too large"; torch: a suggestion to turn weights_only off)."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): an interrupted download or copy?")
    if size < 1024 and path.read_bytes().startswith(b"version https://git-lfs"):
        raise ValueError(
            f"{path} is a Git LFS pointer, not the weights: run `git lfs pull` in its repository "
            "(or download the file itself)"
        )


def _in_own_memory(state: dict[str, torch.Tensor], dtype: torch.dtype | None, mapped: bool) -> dict:
    """``state``'s tensors converted to ``dtype`` (compute dtypes only), or copied where they are
    ``mapped`` views of a file; one at a time, each view dropped once converted (peak: one tensor)."""
    if dtype is None:
        return state
    out = {}
    for key in list(state):
        value = state.pop(key)
        if value.dtype in DTYPES.values() and value.dtype != dtype:
            out[key] = value.to(dtype)
        else:
            out[key] = value.clone() if mapped else value
    return out


def _read_file(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    _refuse_placeholder(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError (or OSError)
            raise ValueError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
            ) from exc
        return _in_own_memory(state, dtype, mapped=True)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:  # OSError: a truncated zip
        raise ValueError(f"{path} could not be read as a PyTorch weights file: {exc}") from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    others = [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others:  # e.g. a training script's step counter saved beside the weights
        raise ValueError(f"{path} holds entries that are not tensors: {abbreviate(others)}")
    return _in_own_memory(dict(state), dtype, mapped=False)


def _read_sharded(index_path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} has no 'weight_map'")
    bad = [f"{k!r}: {v!r}" for k, v in weight_map.items() if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(
            f"{index_path}: 'weight_map' must map tensor names to shard file names, got {abbreviate(bad)}"
        )
    state: dict[str, torch.Tensor] = {}
    shard_of: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        path = index_path.parent / shard
        if not path.is_file():
            raise FileNotFoundError(f"shard {shard} listed in {index_path.name} is missing")
        part = _read_file(path, dtype)
        # a tensor in two shards: equal copies are harmless (transformers loads them), but of two
        # different ones which is right is not knowable (a stale copy beside the real one decoded zeros)
        twice = [
            f"{k} ({shard_of[k]} and {shard})" for k in part if k in shard_of and not _same(state[k], part[k])
        ]
        if twice:
            raise ValueError(
                f"{index_path.parent}: tensors stored differently in two shards: {abbreviate(twice)}"
            )
        shard_of.update(dict.fromkeys(part, shard))
        state.update(part)
    # An index may list a tied lm_head no shard holds, and a shard may hold an unlisted buffer
    # (rotary_emb.inv_freq); transformers loads both. The key check of the model that reads the
    # state names any tensor that is really missing or unexpected.
    return state


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def write_state_dict(directory: Path, state: Mapping[str, torch.Tensor], *, also_bin: bool = False) -> None:
    """Write ``model.safetensors`` (and ``pytorch_model.bin`` when ``also_bin``) into ``directory``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(plain, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if also_bin:
        torch.save(plain, directory / "pytorch_model.bin")


def check_keys(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    optional: Iterable[str] = (),
) -> None:
    """Raise ValueError listing missing, unexpected and wrongly shaped tensors of ``state``.

    ``expected`` maps every key to its shape; keys in ``optional`` may be absent.
    """
    optional = set(optional)
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {list(state[k].shape)} (expected {list(shape)})"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {abbreviate(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {abbreviate(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes {abbreviate(shapes)}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def abbreviate(items: list[str], limit: int = 12) -> str:
    """The first ``limit`` items of a list for an error message, and how many more there are."""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more
