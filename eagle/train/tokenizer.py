"""Byte-level BPE tokenizer of the ``tiny-code`` target, trained on the training split only.

Byte-level (the GPT-2 scheme: every byte has a token, so any text round-trips exactly), no
normaliser, no prefix space, one special token ``<|endoftext|>`` that serves as BOS, EOS and the
separator between files. Saved in the Hugging Face layout (``tokenizer.json`` +
``tokenizer_config.json``) so that ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT,)
DEFAULT_VOCAB_SIZE = 2048
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the 256 byte symbols must all fit


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (special tokens included) on ``texts``.

    ``<|endoftext|>`` gets id 0. Raises ``ValueError`` for a vocabulary too small to hold every
    byte, or when ``texts`` is empty.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + specials), got {vocab_size}"
        )
    texts = list(texts)
    if not any(texts):
        raise ValueError("cannot train a tokenizer on an empty corpus (no non-empty text)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path | str, model_max_length: int) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``out_dir``.

    ``clean_up_tokenization_spaces`` is off: its English-text clean-up (``" ." -> "."``) would
    corrupt code on decode.
    """
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf_tokenizer.save_pretrained(str(out_dir))
    make_tokenizer_config_portable(out_dir / "tokenizer_config.json")
    return out_dir


def make_tokenizer_config_portable(config_path: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast`` in ``tokenizer_config.json``.

    transformers 5 writes its new class name, which transformers 4.x cannot resolve; the classic
    name loads the same ``tokenizer.json`` on both.
    """
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load a ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {str(path)!r}")
    return Tokenizer.from_file(str(path))


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (batched, no special tokens added)."""
    return [enc.ids for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def bytes_per_token(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """UTF-8 bytes per token over ``texts``: converts nats/token into bits/byte."""
    n_tokens = sum(len(ids) for ids in encode_documents(tokenizer, texts))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if n_tokens == 0:
        raise ValueError("texts encode to zero tokens")
    return n_bytes / n_tokens
