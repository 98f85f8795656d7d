"""``ModelConfig``: the architecture facts this runtime needs, parsed from a Hugging Face config.json.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` (q/k/v biases) and
``Qwen3ForCausalLM`` (per-head q/k RMSNorm). Keys absent from the file take the default of the
family's transformers config class, so a file means the same here as in transformers. Anything the
runtime cannot reproduce exactly (another activation, another RoPE type, a sliding window that would
take effect) raises a ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

from eagle.models.weights import read_json

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# Defaults of the transformers config classes for the keys read here (transformers 5.x).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": None, "max_position_embeddings": 2048, "sliding_window": None},
    "mistral": {"num_key_value_heads": 8, "max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768, "sliding_window": 4096},
    "qwen3": {"num_key_value_heads": 32, "max_position_embeddings": 32768, "sliding_window": 4096},
}
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1 frequency-dependent RoPE scaling (``"rope_type": "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    """Position interpolation (``"rope_type": "linear"``): every inverse frequency divided by
    ``factor`` (e.g. Vicuna-16k, LongChat)."""

    factor: float


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (target model or draft head).

    ``sliding_window`` is the window the checkpoint would apply (None when it applies none); the
    runtime computes full attention and therefore refuses caches longer than the window.
    ``extra`` keeps the keys this class does not model (``bias``, ``draft_vocab_size``, ...).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | LinearRopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # generation_config.json's eos_token_id (what transformers' generate stops on; chat checkpoints
    # list their end-of-turn token there only), None when the file has none (or null);
    # has_generation_config: whether the checkpoint has that file at all (transformers then takes
    # the file's eos, even none, over config.json's)
    generation_eos_token_id: int | list[int] | None = None
    has_generation_config: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.num_layers < 0:
            raise ValueError(f"config: num_hidden_layers must be >= 0, got {self.num_layers}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def eagle3_feature_layers(self) -> tuple[int, int, int]:
        """Layers whose *input* hidden states feed an EAGLE-3 head: (2, L//2, L-3)."""
        L = self.num_layers
        return (2, L // 2, L - 3)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read ``path`` (a config.json, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        cfg = cls.from_dict(read_json(path))
        generation = path.parent / "generation_config.json"
        if generation.is_file():
            settings = read_json(generation)
            _warn_about_unapplied_processors(settings, generation)
            eos = settings.get("eos_token_id")
            cfg = dataclasses.replace(cfg, generation_eos_token_id=eos, has_generation_config=True)
        return cfg

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, family: str | None = None) -> ModelConfig:
        """Parse a Hugging Face config dict. ``family`` overrides the detection from
        ``architectures``/``model_type`` (draft-head configs name unusual architectures)."""
        family = family or detect_family(cfg)
        missing = [k for k in _REQUIRED_KEYS if cfg.get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks required key(s) {missing}")
        defaults = _FAMILY_DEFAULTS[family]
        _check_value_types(cfg)
        _check_supported(cfg)
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kv_heads = cfg.get("num_key_value_heads", defaults["num_key_value_heads"]) or heads
        theta, scaling = _parse_rope(cfg)
        return cls(
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=_head_dim(cfg, family, hidden, heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            **_biases(cfg, family),
            qk_norm=family == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(
                cfg.get("max_position_embeddings", defaults["max_position_embeddings"])
            ),
            sliding_window=_effective_sliding_window(cfg, family),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            extra=dict(cfg),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as Hugging Face keys, in the legacy ``rope_theta`` / ``rope_scaling`` spelling.
        Linear scaling is written ``{"type": "linear", "factor": f}``, the only form the reference EAGLE
        code's config takes (exactly those two keys; transformers reads it too); Llama-3 scaling in
        transformers' ``rope_type`` form, which the reference EAGLE code cannot represent at all (its
        Llama-3.1 heads carry no scaling: :func:`eagle.models.draft.random_draft` gives heads none)."""
        out: dict[str, Any] = {
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if isinstance(self.rope_scaling, LinearRopeScaling):
            out["rope_scaling"] = {"type": "linear", "factor": self.rope_scaling.factor}
        elif self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return out


# generation_config.json settings that make transformers' generate() change the logits even when
# greedy, with the value at which each does nothing. This runtime does not apply them.
_LOGIT_PROCESSORS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "encoder_repetition_penalty": 1.0,
}


def _warn_about_unapplied_processors(settings: dict[str, Any], path: Path) -> None:
    active = {
        k: settings[k]
        for k, neutral in _LOGIT_PROCESSORS.items()
        if settings.get(k) not in (None, neutral, [])
    }
    if active:
        warnings.warn(
            f"{path} sets {active}; this runtime does not apply them, so its tokens follow the model's "
            "own distribution and can differ from transformers' generate() with that file's defaults",
            stacklevel=3,
        )


_POSITIVE_INT_KEYS = (*_REQUIRED_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings")
_POSITIVE_FLOAT_KEYS = ("rms_norm_eps", "rope_theta")


def _check_value_types(cfg: dict[str, Any]) -> None:
    """Sizes must be JSON integers and eps/theta numbers, as transformers' configs require ("256"
    would otherwise load here and fail later in another library's message)."""
    for key in _POSITIVE_INT_KEYS:
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
    for key in _POSITIVE_FLOAT_KEYS:
        value = cfg.get(key)
        if value is not None and (
            not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0
        ):
            raise ValueError(f"config.json: {key} must be a positive number, got {value!r}")


def _names_a_head(archs: list) -> bool:
    """Architectures EAGLE heads' configs name (LlamaForCausalLMEagle3, EagleLlama..., Eagle3Speculator)."""
    return any(isinstance(a, str) and "eagle" in a.lower() for a in archs)


def detect_family(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if archs:
        head = (
            " (an EAGLE draft head's: pass it as the draft, with its target)" if _names_a_head(archs) else ""
        )
        raise ValueError(
            f"config.json: unsupported architectures={archs}{head}; supported: {sorted(ARCHITECTURES)}"
        )
    model_type = cfg.get("model_type")
    if model_type in _FAMILY_DEFAULTS:
        return model_type
    raise ValueError(
        f"config.json: unsupported model_type={model_type!r} (no architectures key); "
        f"supported: {sorted(_FAMILY_DEFAULTS)}"
    )


def _check_supported(cfg: dict[str, Any]) -> None:
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unnamed") if isinstance(quant, dict) else quant
        raise ValueError(
            f"config.json: a quantised checkpoint (quantization_config, quant_method {method!r}) is not "
            "supported; use the unquantised (float16 / bfloat16 / float32) weights"
        )
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r} is not supported (only 'silu')")
    rope = cfg.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor={partial} is not supported (only 1.0)")


def _head_dim(cfg: dict[str, Any], family: str, hidden: int, heads: int) -> int:
    if cfg.get("head_dim") is not None:
        return int(cfg["head_dim"])
    if family == "qwen3" and "head_dim" not in cfg:
        return 128  # Qwen3Config's default, independent of hidden_size
    if hidden % heads:
        raise ValueError(f"config.json: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    return hidden // heads


def _biases(cfg: dict[str, Any], family: str) -> dict[str, bool]:
    if family == "qwen2":
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False}
    if family == "mistral":
        return {"qkv_bias": False, "o_bias": False, "mlp_bias": False}
    attention_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False)) if family == "llama" else False
    return {"qkv_bias": attention_bias, "o_bias": attention_bias, "mlp_bias": mlp_bias}


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """RoPE base and scaling, from the new ``rope_parameters`` or legacy ``rope_theta``/``rope_scaling``."""
    for name in ("rope_parameters", "rope_scaling"):
        value = cfg.get(name)
        if value is not None and not isinstance(value, dict):
            raise ValueError(
                f'config.json: {name} must be an object such as {{"rope_type": "linear", "factor": 2.0}}, got {value!r}'
            )
    params = dict(cfg.get("rope_parameters") or {})
    key = "rope_parameters"
    legacy = dict(cfg.get("rope_scaling") or {})
    if params and legacy:
        _check_rope_keys_agree(params, legacy)
    if not params and legacy:
        params, key = legacy, "rope_scaling"
    nested = sorted(k for k, v in params.items() if isinstance(v, dict))
    if nested:
        raise ValueError(
            f"config.json: {key} holds per-layer-type settings {nested}; only one RoPE for all layers is supported"
        )
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    where = f"{key}.rope_theta" if "rope_theta" in params else "rope_theta"
    theta = 10000.0 if theta is None else _rope_number(theta, where)
    rope_type = _rope_type(params)
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        factor = params.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor >= 1:
            raise ValueError(f"config.json: {key} of rope_type 'linear' needs a factor >= 1, got {factor!r}")
        return theta, LinearRopeScaling(float(factor))
    if rope_type == "dynamic":
        # Dynamic NTK rescales only past its original context; within it the frequencies are the
        # default ones, and this runtime refuses sequences past max_position_embeddings.
        original = params.get("original_max_position_embeddings")
        if original is not None and original < cfg.get("max_position_embeddings", original):
            raise ValueError(
                f"config.json: {key} of rope_type 'dynamic' rescales from position {original}, below "
                f"max_position_embeddings={cfg['max_position_embeddings']}: not supported"
            )
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"config.json: {key}.rope_type={rope_type!r} is not supported "
            "(only 'default', 'linear', 'dynamic' and 'llama3')"
        )
    if "original_max_position_embeddings" not in params and "max_position_embeddings" in cfg:
        params["original_max_position_embeddings"] = cfg["max_position_embeddings"]
    missing = [k for k in _LLAMA3_KEYS if params.get(k) is None]
    if missing:
        raise ValueError(f"config.json: {key} of rope_type 'llama3' lacks {missing}")
    original = params["original_max_position_embeddings"]
    if isinstance(original, float) and original.is_integer():
        original = int(original)  # 8192.0: transformers takes it too
    if not isinstance(original, int) or isinstance(original, bool) or original < 1:
        raise ValueError(
            f"config.json: {key}.original_max_position_embeddings must be a positive integer, got {original!r}"
        )
    scaling = Llama3RopeScaling(
        factor=_rope_number(params["factor"], f"{key}.factor", at_least=1.0),
        low_freq_factor=_rope_number(params["low_freq_factor"], f"{key}.low_freq_factor"),
        high_freq_factor=_rope_number(params["high_freq_factor"], f"{key}.high_freq_factor"),
        original_max_position_embeddings=original,
    )
    if not scaling.high_freq_factor > scaling.low_freq_factor:
        raise ValueError(
            f"config.json: {key} needs high_freq_factor > low_freq_factor, got "
            f"{scaling.high_freq_factor} and {scaling.low_freq_factor}"
        )
    return theta, scaling


def _rope_number(value: Any, where: str, *, at_least: float | None = None) -> float:
    """A finite JSON number > 0 (>= ``at_least`` when given): a string, 0 or a negative base or factor
    loaded and then gave NaN logits, or different tokens, with no word about the config."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config.json: {where} must be a finite number, got {value!r}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"config.json: {where} must be >= {at_least:g}, got {value!r}")
    if not value > 0:
        raise ValueError(f"config.json: {where} must be positive, got {value!r}")
    return float(value)


def dynamic_rope_start(cfg: dict[str, Any]) -> int | None:
    """For a config.json whose RoPE is 'dynamic' (NTK): the position past which it rescales the
    frequencies (``original_max_position_embeddings``, else ``max_position_embeddings``); None for any
    other RoPE. Within it the frequencies are the default ones, which is all this runtime computes."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or _rope_type(params) != "dynamic":
        return None
    start = params.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return int(start if start is not None else _FAMILY_DEFAULTS["llama"]["max_position_embeddings"])


def _rope_type(params: dict[str, Any]) -> str:
    return params.get("rope_type", params.get("type", "default"))


def _check_rope_keys_agree(params: dict[str, Any], legacy: dict[str, Any]) -> None:
    """A config with both ``rope_parameters`` and the legacy ``rope_scaling`` (e.g. one edited by hand
    to extend the context): Hugging Face takes ``rope_scaling``, this loader reads ``rope_parameters``;
    refused unless they say the same."""
    shared = sorted((set(params) & set(legacy)) - {"type", "rope_type"})
    differ = [k for k in shared if params[k] != legacy[k]]
    if _rope_type(params) != _rope_type(legacy):
        differ.insert(0, "rope_type")
    if differ:
        raise ValueError(
            f"config.json has both rope_parameters and rope_scaling, and they disagree on {differ}; "
            "remove the one that does not apply"
        )


def _effective_sliding_window(cfg: dict[str, Any], family: str) -> int | None:
    """The window transformers would apply to some layer, or None when every layer is full attention."""
    window = cfg.get("sliding_window", _FAMILY_DEFAULTS[family]["sliding_window"])
    if family == "llama" or window is None:
        return None
    if family == "mistral":
        return int(window)
    if not cfg.get("use_sliding_window", False):
        return None
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        first_sliding = int(cfg.get("max_window_layers", 28))
        layer_types = [
            "sliding_attention" if i >= first_sliding else "full" for i in range(cfg["num_hidden_layers"])
        ]
    return int(window) if "sliding_attention" in layer_types else None
