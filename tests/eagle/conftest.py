"""Tiny random checkpoints for the runtime, draft-head and decoding-loop tests.

Targets are built with Hugging Face transformers and written with ``save_pretrained``; EAGLE heads
are written directly with the official key names (DESIGN §5), independently of
``eagle.models.draft.save_draft``. Head dims are 16 (the smallest ``tree_attention`` supports).

Fixtures:

* ``make_target(family, **config)`` -> ``(hf_model, directory)``: a random HF model of a family
  (``llama``, ``mistral``, ``qwen2``, ``qwen3``), float64, saved to a fresh directory.
* ``tiny_checkpoints`` (session): a 4-layer Llama target plus matching random EAGLE-2 and EAGLE-3
  heads on disk (``.target``, ``.eagle2``, ``.eagle3``), for decoding-loop tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
TINY = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def build_hf_target(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random HF causal LM of ``family`` in float64 (norm weights randomised too, so a wrong
    norm cannot hide behind all-ones weights)."""
    config_cls, model_cls = FAMILIES[family]
    kwargs = TINY | overrides
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
    return model.to(torch.float64)


def save_hf_target(model: torch.nn.Module, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


@pytest.fixture
def make_target(tmp_path_factory):
    def make(family: str, seed: int = 0, save_kwargs: dict | None = None, **overrides):
        model = build_hf_target(family, seed, **overrides)
        directory = tmp_path_factory.mktemp(f"{family}_target")
        return model, save_hf_target(model, directory, **(save_kwargs or {}))

    return make


# --------------------------------------------------------------------------------------------------
# Official EAGLE head files, written key by key
# --------------------------------------------------------------------------------------------------
def _randn(gen: torch.Generator, *shape: int, std: float = 0.15) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * std


def _norm(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) + 0.5


def _layer_tensors(
    gen, prefix: str, H: int, in_features: int, heads: int, kv_heads: int, hd: int, inter: int
):
    return {
        f"{prefix}self_attn.q_proj.weight": _randn(gen, heads * hd, in_features),
        f"{prefix}self_attn.k_proj.weight": _randn(gen, kv_heads * hd, in_features),
        f"{prefix}self_attn.v_proj.weight": _randn(gen, kv_heads * hd, in_features),
        f"{prefix}self_attn.o_proj.weight": _randn(gen, H, heads * hd),
        f"{prefix}mlp.gate_proj.weight": _randn(gen, inter, H),
        f"{prefix}mlp.up_proj.weight": _randn(gen, inter, H),
        f"{prefix}mlp.down_proj.weight": _randn(gen, H, inter),
        f"{prefix}post_attention_layernorm.weight": _norm(gen, H),
    }


def head_config(target_config: dict, **extra) -> dict:
    """An EAGLE head config.json in the style of the official ones (LlamaConfig keys, 1 layer)."""
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    cfg = {k: target_config[k] for k in keys}
    cfg |= {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "num_hidden_layers": 1,
        "rms_norm_eps": target_config.get("rms_norm_eps", 1e-6),
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }
    if target_config.get("head_dim"):
        cfg["head_dim"] = target_config["head_dim"]
    return cfg | extra


def eagle2_state(target_config: dict, *, bias: bool, embed: torch.Tensor | None, seed: int = 1) -> dict:
    """Official EAGLE-1/2 tensors (``embed_tokens``, ``fc``, ``layers.0.*`` without input_layernorm)."""
    gen = torch.Generator().manual_seed(seed)
    H = target_config["hidden_size"]
    heads, kv, hd = (
        target_config["num_attention_heads"],
        target_config["num_key_value_heads"],
        target_config["head_dim"],
    )
    state = {"fc.weight": _randn(gen, H, 2 * H)}
    if bias:
        state["fc.bias"] = _randn(gen, H)
    if embed is not None:
        state["embed_tokens.weight"] = embed.clone()
    state |= _layer_tensors(gen, "layers.0.", H, H, heads, kv, hd, target_config["intermediate_size"])
    return state


def eagle3_state(
    target_config: dict,
    *,
    prefix: str,
    embed: torch.Tensor | None,
    draft_vocab: list[int] | None,
    seed: int = 2,
) -> dict:
    """Official EAGLE-3 tensors (``fc [H, 3H]``, ``<prefix>*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``)."""
    gen = torch.Generator().manual_seed(seed)
    H, V = target_config["hidden_size"], target_config["vocab_size"]
    heads, kv, hd = (
        target_config["num_attention_heads"],
        target_config["num_key_value_heads"],
        target_config["head_dim"],
    )
    used = torch.tensor(draft_vocab if draft_vocab is not None else list(range(V)))
    state = {"fc.weight": _randn(gen, H, 3 * H)}
    state |= _layer_tensors(gen, prefix, H, 2 * H, heads, kv, hd, target_config["intermediate_size"])
    state |= {
        f"{prefix}input_layernorm.weight": _norm(gen, H),
        f"{prefix}hidden_norm.weight": _norm(gen, H),
        "norm.weight": _norm(gen, H),
        "lm_head.weight": _randn(gen, used.numel(), H),
        "d2t": used - torch.arange(used.numel()),
        "t2d": torch.zeros(V, dtype=torch.bool).index_fill_(0, used, True),
    }
    if embed is not None:
        state["embed_tokens.weight"] = embed.clone()
    return state


def write_head(directory: Path, config: dict, state: dict, *, fmt: str = "bin", dtype=torch.float16) -> Path:
    """Write ``config.json`` and the tensors as ``pytorch_model.bin`` or ``model.safetensors``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> SimpleNamespace:
    """A 4-layer random Llama target with matching random EAGLE-2 and EAGLE-3 heads, on disk."""
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    target = build_hf_target("llama", seed=0)
    target_dir = save_hf_target(target, root / "target")
    target_config = json.loads((target_dir / "config.json").read_text())
    target_config |= {"head_dim": TINY["head_dim"]}
    embed = target.model.embed_tokens.weight.detach()
    eagle2_dir = write_head(
        root / "eagle2",
        head_config(target_config),
        eagle2_state(target_config, bias=True, embed=embed),
        dtype=torch.float32,
    )
    eagle3_dir = write_head(
        root / "eagle3",
        head_config(
            target_config,
            architectures=["LlamaForCausalLMEagle3"],
            draft_vocab_size=target_config["vocab_size"],
        ),
        eagle3_state(target_config, prefix="midlayer.", embed=None, draft_vocab=None),
        dtype=torch.float32,
    )
    return SimpleNamespace(target=target_dir, eagle2=eagle2_dir, eagle3=eagle3_dir, hf_target=target)
