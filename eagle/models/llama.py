"""The Llama-family target model on the in-place KV cache (Llama, Mistral, Qwen2, Qwen3).

A forward runs one block of ``T`` tokens per sequence: it writes the block's K/V into the
:class:`~eagle.models.kv_cache.KVCache` at ``seqlens[b] + i`` and attends with
``eagle_kernels.tree_attention`` (committed prefix always visible; causal inside the block, or a
tree mask). One code path serves prefill, single-token decode and tree verification.

Numerics follow Hugging Face transformers exactly (that is what the parity tests check): RMSNorm and
the RoPE cos/sin tables are computed in float32 and cast back to the model dtype, also for float64
models. q/k/v and gate/up projections are fused into one matmul each (gpt-fast style); the
checkpoint's separate tensors are concatenated at load time.

CPU fast path: on CPU tensors without autograd, the decoder layers run as one call of the C++ op
``eagle_C::llama_layers`` (csrc/cpu/llama_layers.cpp), which makes the same ATen calls in the same
order as these modules, so results are bit-identical while the per-op Python overhead disappears.
The modules stay the reference and the fallback (CUDA, autograd, no extension, or
``EAGLE_CPU_FAST_PATH=0`` / :func:`set_cpu_fast_path`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import eagle_kernels
from eagle.models.config import LinearRopeScaling, ModelConfig
from eagle.models.cpu_packed import (
    Linear,
    invalidate_cpu_caches,
    linear,
    needs_autograd,
    pack_module_linears,
    packed_weight,
    packing_generation,
    tensor_version,
)
from eagle.models.kv_cache import KVCache
from eagle.models.weights import (
    DTYPES,
    abbreviate,
    check_keys,
    read_state_dict,
    resolve_checkpoint,
    resolve_dtype,
)
from eagle_kernels import _ext
from eagle_kernels._backend import forced_backend


def value_checks_enabled(device: torch.device) -> bool:
    """Checks that read tensor values: always on CPU, on other devices only with EAGLE_KERNELS_DEBUG=1."""
    return device.type == "cpu" or os.environ.get("EAGLE_KERNELS_DEBUG", "0") == "1"


# --------------------------------------------------------------------------------------------------
# Building blocks (shared with the draft heads)
# --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, the normalisation computed in float32 as transformers does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_rms_norm_ok(x, self.weight):
            # What the C++ layer op calls (csrc/cpu/rms_norm.cpp): on float32 and half types one loop
            # per row instead of torch's ~6-8 ops, whose float32 mean it may differ from in the last bit.
            return torch.ops.eagle_C.rms_norm(x, self.weight, self.eps)
        # torch's fused rms_norm computes x * rsqrt(mean(x^2) + eps) with the same float32 rounding
        # as transformers' composition (bit-identical), in one kernel instead of six.
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def _cpu_rms_norm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The C++ RMSNorm applies: a plain CPU tensor, matching dtypes, no autograd (with the C++ layer
    op on or off: both paths must round alike; the op picks the kernel per dtype)."""
    return (
        x.device.type == "cpu"
        and type(x) is torch.Tensor
        and x.dtype == weight.dtype
        and _ext.has_op("rms_norm")
        and not needs_autograd(x, weight)
        and not torch.compiler.is_compiling()
    )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32), as transformers computes them, including
    Llama-3 frequency-dependent scaling."""
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if isinstance(s, LinearRopeScaling):
        return inv_freq / s.factor
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin ``[B, T, 1, head_dim]`` for ``positions [B, T]`` (computed in float32,
    like transformers). The first half of the sin table is negated so that :func:`apply_rope`
    can rotate with a roll instead of slicing and concatenating."""
    doubled, signs = rope_tables(inv_freq)
    # positions * cat(inv_freq, inv_freq) holds exactly the values of cat(freqs, freqs), and the
    # sign flip is exact: the same numbers as transformers' cos/sin, in fewer ops.
    angles = (positions[..., None].float() * doubled)[:, :, None, :]
    return angles.cos().to(dtype), (angles.sin() * signs).to(dtype)


# id(inv_freq) -> (weakref to it, doubled, signs); an entry lives exactly as long as its inv_freq (its
# model): CUDA graphs captured for the model read these tables, so they must not be dropped before it
_ROPE_TABLES: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor]] = {}


def rope_tables(inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat(inv_freq, inv_freq)`` and the signs ``[-1] * D/2 + [1] * D/2`` (float32, inv_freq's
    device), cached per inv_freq tensor for as long as it lives."""
    key = id(inv_freq)
    hit = _ROPE_TABLES.get(key)
    if hit is not None and hit[0]() is inv_freq:
        return hit[1], hit[2]
    half = inv_freq.shape[-1]
    doubled = torch.cat((inv_freq, inv_freq), dim=-1)
    signs = torch.cat((inv_freq.new_full((half,), -1.0), inv_freq.new_ones(half)))
    _ROPE_TABLES[key] = (weakref.ref(inv_freq), doubled, signs)
    weakref.finalize(inv_freq, _drop_rope_tables, key, _ROPE_TABLES[key][0])
    return doubled, signs


def _drop_rope_tables(key: int, ref: weakref.ref) -> None:
    entry = _ROPE_TABLES.get(key)
    if entry is not None and entry[0] is ref:  # (not a later tensor's entry at the same address)
        del _ROPE_TABLES[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` (non-interleaved halves): ``x * cos + rotate_half(x) * sin``, where
    ``rotate_half(x) * sin == roll(x, D/2) * signed_sin`` exactly (only signs move)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


@dataclasses.dataclass
class BlockContext:
    """Per-forward values every layer shares: RoPE tables, where to write K/V, the mask."""

    cos: torch.Tensor
    sin: torch.Tensor
    seqlens: torch.Tensor  # [B] int32, the committed lengths (not advanced by the forward)
    tree_mask: torch.Tensor | None  # [B, past+T, past+T] over the whole block
    past: int = 0  # block rows already in the cache before this forward's rows (see block_context)
    num_tokens: int = 1  # T, this forward's rows
    num_kv_heads: int = 1
    max_seq_len: int = 0

    def op_args(self, cfg: ModelConfig) -> tuple:
        """The block's arguments of the C++ layer ops (``llama_layers``, ``llama_forward``,
        ``eagle2_head``), in their order: cos, sin, cache_seqlens, tree_mask, past, num_heads,
        num_kv_heads, eps (``cfg``: the model whose layers run)."""
        return (self.cos, self.sin, self.seqlens, self.tree_mask, self.past, cfg.num_heads, cfg.num_kv_heads,
                cfg.rms_norm_eps)  # fmt: skip

    @functools.cached_property
    def kv_rows(self) -> torch.Tensor:
        """``[B*T*Hkv]`` int64: the row of (b, token, kv head) in a ``[B*Hkv*S_max, D]`` view of a
        layer's K (or V) cache, for position ``seqlens[b] + past + t``. The C++ layer op computes
        these itself."""
        slots = _default_positions(self.seqlens, self.past, self.num_tokens)
        B, Hkv, device = slots.shape[0], self.num_kv_heads, slots.device
        heads_of_batch = torch.arange(B, device=device)[:, None, None] * Hkv + torch.arange(
            Hkv, device=device
        )
        return (heads_of_batch * self.max_seq_len + slots[:, :, None]).flatten()


class Attention(nn.Module):
    """GQA self-attention over the in-place cache; ``in_features`` is 2H for the EAGLE-3 midlayer."""

    def __init__(self, cfg: ModelConfig, in_features: int | None = None) -> None:
        super().__init__()
        in_features = in_features or cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(in_features, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, T, Hq, D]``, k and v ``[B, T, Hkv, D]`` of ``x [B, T, in_features]``, RoPE applied
        (``cos``/``signed_sin`` from :func:`rope_cos_sin`). Differentiable; training code that runs
        its own attention over whole sequences can use it."""
        B, T, _ = x.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.qkv_proj(x).view(B, T, Hq + 2 * Hkv, D).split([Hq + Hkv, Hkv], dim=2)
        if self.q_norm is not None:
            q, k = qk.split([Hq, Hkv], dim=2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)
        q, k = apply_rope(qk, cos, signed_sin).split([Hq, Hkv], dim=2)  # q and k rotated together
        return q, k, v

    def forward(
        self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: BlockContext
    ) -> torch.Tensor:
        B, T, _ = x.shape
        D = self.head_dim
        q, k, v = self.project(x, ctx.cos, ctx.sin)
        # The caches are contiguous [B, Hkv, S_max, D] views: one row copy per (token, kv head).
        k_cache.view(-1, D).index_copy_(0, ctx.kv_rows, k.reshape(-1, D))
        v_cache.view(-1, D).index_copy_(0, ctx.kv_rows, v.reshape(-1, D))
        if ctx.past:
            # Earlier block rows are only attended to: their queries are zeros and their outputs dropped.
            q = torch.cat((q.new_zeros(B, ctx.past, *q.shape[2:]), q), dim=1)
        out = eagle_kernels.tree_attention(q, k_cache, v_cache, ctx.seqlens, ctx.tree_mask)
        return self.o_proj(out[:, ctx.past :].reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward with gate and up projections fused into one matmul."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: BlockContext
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), k_cache, v_cache, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


def block_context(
    cache: KVCache,
    num_tokens: int,
    inv_freq: torch.Tensor,
    dtype: torch.dtype,
    positions: torch.Tensor | None,
    tree_mask: torch.Tensor | None,
    past: int = 0,
) -> BlockContext:
    """Check the block fits the cache (before anything is written) and build the shared context.

    ``past > 0`` continues a block whose first ``past`` rows were written by earlier forwards (a
    draft tree grown level by level): this forward's rows go to ``seqlens[b] + past + i`` and
    ``tree_mask`` is ``[B, T, past + T]``, the new rows' visibility over the whole block.
    """
    B, device = cache.batch_size, cache.device
    if past < 0:
        raise ValueError(f"past must be >= 0, got {past}")
    cache.check_room(past + num_tokens)
    # On CPU one C++ call makes the positions and tables (and checks positions >= 0): the same ops
    # from Python cost more than a small model's layer.
    in_cpp = device.type == "cpu" and _ext.has_op("rope_cos_sin") and not torch.compiler.is_compiling()
    if positions is not None:
        _check_positions(positions, B, num_tokens, device, values=not in_cpp)
    width = past + num_tokens
    if tree_mask is not None and tuple(tree_mask.shape) != (B, num_tokens, width):
        raise ValueError(
            f"tree_mask must have shape [{B}, {num_tokens}, {width}], got {list(tree_mask.shape)}"
        )
    if past:
        if tree_mask is None:
            raise ValueError("a block continued with past > 0 needs an explicit tree_mask")
        # Rows of the earlier part only see themselves; their outputs are discarded.
        earlier = torch.eye(past, width, dtype=torch.bool, device=device).expand(B, past, width)
        tree_mask = torch.cat((earlier, tree_mask), dim=1)
    if in_cpp:
        doubled, signs = rope_tables(inv_freq)
        cos, sin = torch.ops.eagle_C.rope_cos_sin(
            positions, cache.seqlens, past, num_tokens, doubled, signs, dtype
        )
    else:
        cos, sin = rope_cos_sin(
            inv_freq,
            _default_positions(cache.seqlens, past, num_tokens) if positions is None else positions,
            dtype,
        )
    return BlockContext(
        cos, sin, cache.seqlens, tree_mask, past, num_tokens, cache.kv.shape[3], cache.max_seq_len
    )


def _default_positions(seqlens: torch.Tensor, past: int, num_tokens: int) -> torch.Tensor:
    """``[B, T]`` int64: ``seqlens[b] + past + t``, where the block's rows go in the cache."""
    return seqlens.long()[:, None] + torch.arange(past, past + num_tokens, device=seqlens.device)


def _check_positions(
    positions: torch.Tensor, B: int, T: int, device: torch.device, *, values: bool = True
) -> None:
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError("positions must be an int32/int64 tensor [B, T]")
    if tuple(positions.shape) != (B, T):
        raise ValueError(f"positions must have shape [{B}, {T}], got {list(positions.shape)}")
    if positions.device != device:
        raise ValueError(f"positions is on {positions.device} but the cache is on {device}")
    if values and value_checks_enabled(device) and bool((positions < 0).any()):
        raise ValueError("positions must be >= 0")


def check_token_ids(
    name: str,
    ids: torch.Tensor,
    vocab_size: int,
    batch_size: int,
    device: torch.device,
    *,
    values: bool = True,
) -> None:
    """Type, shape and device of ``ids [B, T]``; with ``values`` (and value checks enabled on the
    device) also their range."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor [B, T]")
    if ids.dim() != 2 or ids.shape[0] != batch_size or ids.shape[1] == 0:
        raise ValueError(
            f"{name} must have shape [{batch_size}, T>0] (the cache's batch), got {list(ids.shape)}"
        )
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the cache is on {device}")
    if values and value_checks_enabled(device) and bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise ValueError(f"{name} holds ids outside [0, {vocab_size})")


# --------------------------------------------------------------------------------------------------
# CPU fast path: all decoder layers in one C++ op call
# --------------------------------------------------------------------------------------------------
_CPU_FAST_PATH = os.environ.get("EAGLE_CPU_FAST_PATH", "1") != "0"


def set_cpu_fast_path(enabled: bool) -> bool:
    """Turn the C++ layer op on or off for CPU forwards (the results are identical either way);
    returns the previous setting. The environment variable ``EAGLE_CPU_FAST_PATH=0`` starts it off."""
    global _CPU_FAST_PATH
    previous, _CPU_FAST_PATH = _CPU_FAST_PATH, bool(enabled)
    invalidate_cpu_caches()
    return previous


def layer_weights(layer: nn.Module) -> list[torch.Tensor | None]:
    """A decoder layer's tensors in the slot order of ``eagle_C::llama_layers`` (12 per layer; None
    for an absent norm or bias): input norm, qkv weight/bias, q/k norm, o weight/bias, post-attention
    norm, gate_up weight/bias, down weight/bias."""
    attn, mlp = layer.self_attn, layer.mlp
    input_norm = getattr(layer, "input_layernorm", None)
    q_norm, k_norm = attn.q_norm, attn.k_norm
    return [
        None if input_norm is None else input_norm.weight,
        attn.qkv_proj.weight,
        attn.qkv_proj.bias,
        None if q_norm is None else q_norm.weight,
        None if k_norm is None else k_norm.weight,
        attn.o_proj.weight,
        attn.o_proj.bias,
        layer.post_attention_layernorm.weight,
        mlp.gate_up_proj.weight,
        mlp.gate_up_proj.bias,
        mlp.down_proj.weight,
        mlp.down_proj.bias,
    ]


# Bumped whenever any module registers a parameter or a submodule (assignment included), so that a
# cached weight list notices a replaced layer or weight; see FastPathWeights.
_module_generation = 0


def _module_changed(*_args) -> None:
    global _module_generation
    _module_generation += 1


nn.modules.module.register_module_parameter_registration_hook(_module_changed)
nn.modules.module.register_module_module_registration_hook(_module_changed)


class FastPathWeights:
    """A model's flat :func:`layer_weights` list and the list handed to ``eagle_C::llama_layers``
    (packed copies in place of linear weights where :mod:`eagle.models.cpu_packed` made them), kept
    between forwards: gathering them walks every layer's submodules, checking them reads a data
    pointer and a version counter per tensor.

    Rebuilt when any module registered a parameter or submodule since (a replaced layer or weight),
    when weights were packed since, or when any tensor's data pointer or version counter moved
    (``Module.to``, an in-place update: :func:`~eagle.models.cpu_packed.packed_weight` then packs
    the changed weight again).
    """

    def __init__(self) -> None:
        self._dense: list[torch.Tensor | None] | None = None
        self._for_op: list[torch.Tensor | None] = []
        self._generation: tuple[int, int] = (-1, -1)
        self._fingerprint: list[int | None] = []

    @staticmethod
    def _fingerprint_of(dense: list[torch.Tensor | None]) -> list[int | None]:
        present = [w for w in dense if w is not None]
        return [w.data_ptr() for w in present] + [tensor_version(w) for w in present]

    def get(
        self, build: Callable[[], list[torch.Tensor | None]]
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """``(dense, for_op)``; ``build()`` gathers the dense list when the cached one is stale."""
        generation = (_module_generation, packing_generation())
        if (
            self._dense is None
            or generation != self._generation
            or self._fingerprint_of(self._dense) != self._fingerprint
        ):
            self._dense = build()
            self._for_op = [None if w is None else packed_weight(w) for w in self._dense]
            # read again: packed_weight repacks a weight changed in place, which moves the generation
            self._generation = (_module_generation, packing_generation())
            self._fingerprint = self._fingerprint_of(self._dense)
        return self._dense, self._for_op


def cpu_fast_path_wanted(x: torch.Tensor) -> bool:
    """True when layers on ``x`` may run as ``eagle_C::llama_layers``, autograd aside: enabled,
    built, a plain CPU tensor, not traced. Cheap; checked before the weights are gathered."""
    return (
        _CPU_FAST_PATH
        and x.device.type == "cpu"
        and type(x) is torch.Tensor
        and _ext.has_op("llama_layers")
        and not torch.compiler.is_compiling()
        # the op calls the C++ tree_attention kernel itself: a forced other backend (debugging with
        # EAGLE_KERNELS_BACKEND=torch, say) must reach the attention, so the modules run then
        and forced_backend() in (None, "cpp")
    )


def cpu_fast_path_ok(x: torch.Tensor, weights: list[torch.Tensor | None]) -> bool:
    """True when the layers of ``weights`` may run as ``eagle_C::llama_layers`` on ``x``: enabled,
    built, a plain CPU tensor, not traced, and no autograd graph to record."""
    return cpu_fast_path_wanted(x) and not needs_autograd(x, *weights)


def run_layers_cpu(
    x: torch.Tensor,
    weights: list[torch.Tensor | None],
    kv: torch.Tensor,
    ctx: BlockContext,
    cfg: ModelConfig,
    *,
    attn_input: torch.Tensor | None = None,
    capture: Sequence[int] = (),
) -> list[torch.Tensor]:
    """Decoder layers on CPU in one C++ call, bit-identical to calling the layer modules in turn.

    ``x [B, T, H]``: the residual stream entering the first layer; ``weights``: the concatenated
    :func:`layer_weights` of the layers (linear weights may be their packed copies, see
    :class:`FastPathWeights`); ``kv``: the cache tensor ``[L, 2, B, Hkv, S_max, D]`` (layer
    ``i`` of the list uses ``kv[i]``); ``attn_input [B, T, in_features]`` (one layer only) replaces
    the attention input (EAGLE-3). Returns ``[output, *hidden states entering the layers in
    capture]`` (index ``len(layers)`` is the output).
    """
    return torch.ops.eagle_C.llama_layers(
        x,
        attn_input,
        weights,
        kv,
        *ctx.op_args(cfg),
        list(capture),
    )


# --------------------------------------------------------------------------------------------------
# The target model
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelOutput:
    """Result of :meth:`LlamaModel.forward`.

    hidden : ``[B, T, H]`` final hidden states after the last norm (the EAGLE-1/2 features).
    logits : ``[B, T, V]``, ``[B, K, V]`` at ``logits_index``, or None when not requested.
    layer_hidden : hidden states ``[B, T, H]`` entering each requested layer (EAGLE-3 features),
        in the order requested; None when none were requested.
    """

    hidden: torch.Tensor
    logits: torch.Tensor | None
    layer_hidden: tuple[torch.Tensor, ...] | None = None


class LlamaModel(nn.Module):
    """A Llama-family causal LM (see the module docstring). Build with :func:`load_target`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self._inv_freq = rope_inv_freq(cfg)
        self._fast_weights = FastPathWeights()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[V, H]``: the output projection (the embedding when the checkpoint ties them)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq

    def check_generation_length(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ValueError when a prompt of ``prompt_len`` tokens (the longest of a batch) plus
        ``max_new_tokens`` would pass ``max_position_embeddings`` or a sliding window. Every
        decoding path checks this before its first forward."""
        limit = self.config.max_position_embeddings
        if prompt_len + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"max_position_embeddings={limit}"
            )
        self.check_window(prompt_len + max_new_tokens, "prompt + max_new_tokens")

    def check_window(self, length: int, what: str = "max_seq_len") -> None:
        """Raise ValueError when a checkpoint with a sliding window would attend over ``length``
        positions, more than its window: this runtime computes full attention, the same as the window
        only within it. ``what`` names ``length`` in the message."""
        window = self.config.sliding_window
        if window is not None and length > window:
            raise ValueError(
                f"{what} ({length}) exceeds the checkpoint's sliding_window={window}; this runtime "
                "computes full attention, which differs from a sliding window beyond it"
            )

    def new_cache(self, batch_size: int, max_seq_len: int, *, attended_len: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for this model, in its dtype and on its device.

        ``attended_len`` (default ``max_seq_len``): the most positions a token whose output is used
        attends to, checked against a sliding window (:meth:`check_window`). Decoding loops pass
        prompt + max_new_tokens: the slots beyond (a draft tree's, a pooled buffer's rounding) hold
        tokens whose outputs are never emitted."""
        self.check_window(max_seq_len if attended_len is None else attended_len)
        cfg = self.config
        return KVCache(
            cfg.num_layers,
            batch_size,
            cfg.num_kv_heads,
            max_seq_len,
            cfg.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(hidden)``: ``[..., H] -> [..., V]``."""
        return linear(hidden, self.lm_head_weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        *,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        compute_logits: bool = True,
        feature_layers: Sequence[int] | None = None,
    ) -> ModelOutput:
        """Run a block of ``T`` tokens per sequence; write its K/V into ``cache`` in place.

        Parameters
        ----------
        input_ids : int64/int32 ``[B, T]``
            The block (right-padded for ragged prefill: padding after a sequence's last real token
            never influences its real tokens under the causal mask).
        cache : KVCache
            Batch ``B``; the block's K/V is written at ``cache.seqlens[b] + i``. ``cache.seqlens`` is
            NOT advanced: call ``cache.advance(...)`` for what you commit.
        positions : int ``[B, T]``, optional
            RoPE positions; default ``seqlens[b] + i``. Tree blocks pass ``seqlens[b] + depth``.
        tree_mask : bool ``[B, T, T]``, optional
            ``tree_mask[b, i, j]``: block token i sees block token j (the committed prefix is always
            visible). None means causal inside the block (prefill and decode).
        logits_index : int64 ``[B, K]``, optional
            Block positions at which to compute logits (e.g. each sequence's last real token after
            prefill); None computes them at every position.
        compute_logits : bool
            False skips the lm_head entirely (``logits`` is None).
        feature_layers : sequence of int in ``[0, L]``, optional
            Return the hidden states entering these layers (``L`` = the output of the last layer,
            before the final norm); EAGLE-3 uses ``config.eagle3_feature_layers``.

        Returns
        -------
        ModelOutput
        """
        cfg = self.config
        check_token_ids("input_ids", input_ids, cfg.vocab_size, cache.batch_size, cache.device)
        if cache.kv.dtype != self.dtype or cache.kv.shape[0] != cfg.num_layers:
            raise ValueError("cache was not allocated for this model (use model.new_cache)")
        capture = _feature_layer_slots(feature_layers, cfg.num_layers)
        T = input_ids.shape[1]
        ctx = block_context(cache, T, self.inv_freq(cache.device), self.dtype, positions, tree_mask)
        fast = self._cpu_forward(input_ids, cache, ctx, capture, logits_index, compute_logits)
        if fast is not None:
            hidden, logits, captured = fast
        else:
            x = self.embed_tokens(input_ids)
            captured = self._run_layers(x, cache, ctx, capture)
            hidden = self.norm(captured.pop(-1))
            logits = self._logits_at(hidden, logits_index) if compute_logits else None
        layer_hidden = None if feature_layers is None else tuple(captured[i] for i in feature_layers)
        return ModelOutput(hidden=hidden, logits=logits, layer_hidden=layer_hidden)

    def _cpu_forward(
        self, input_ids, cache: KVCache, ctx: BlockContext, capture: set[int], logits_index, compute_logits
    ):
        """The forward after its checks in one C++ call (``eagle_C::llama_forward``: embedding, layers,
        final norm, logits; the same kernels as the modules, so the same bits), or None where the
        CPU fast path does not apply. After a forward's weights stream through the caches each
        Python-level call costs tens of microseconds more than warm; this makes one instead of four.
        Returns ``(hidden, logits or None, {layer: hidden state entering it})``."""
        args = self.cpu_forward_weights(input_ids)
        if args is None:
            return None
        embed, for_op, norm_w, lm_head = args
        if logits_index is not None and compute_logits:
            _check_logits_index(logits_index, input_ids.shape[0])
        slots = sorted(capture)
        hidden, logits, *inputs = torch.ops.eagle_C.llama_forward(
            input_ids,
            embed,
            for_op,
            cache.kv,
            *ctx.op_args(self.config),
            slots,
            norm_w,
            lm_head if compute_logits else None,
            logits_index if compute_logits else None,
        )
        return hidden, (logits if compute_logits else None), dict(zip(slots, inputs))

    def cpu_forward_weights(self, x: torch.Tensor):
        """``(embedding, the layers' weight list for the op, final norm weight, lm_head for the op)``
        for ``eagle_C::llama_forward`` on ``x`` (a plain CPU tensor of this forward, e.g. its input
        ids), or None where the CPU fast path does not apply (autograd, tracing, the op missing)."""
        embed, norm_w = self.embed_tokens.weight, self.norm.weight
        if not (
            cpu_fast_path_wanted(x)
            and embed.device.type == "cpu"
            and _ext.has_op("llama_forward")
            and _cpu_rms_norm_ok(embed.detach(), norm_w)
        ):
            return None
        dense, for_op = self._fast_weights.get(self._layer_weights)
        lm_head = self.lm_head_weight
        if not dense or needs_autograd(embed, norm_w, lm_head, *dense):
            return None
        return embed, for_op, norm_w, packed_weight(lm_head)

    def _layer_weights(self) -> list[torch.Tensor | None]:
        return [w for layer in self.layers for w in layer_weights(layer)]

    def _run_layers(
        self, x: torch.Tensor, cache: KVCache, ctx: BlockContext, capture: set[int]
    ) -> dict[int, torch.Tensor]:
        """The reference path: the layer modules in turn. Returns the hidden states entering the
        layers in ``capture`` (``L`` = the last layer's output) and, under key -1, the output."""
        captured: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if i in capture:
                captured[i] = x
            x = layer(x, *cache.layer(i), ctx)
        if self.config.num_layers in capture:
            captured[self.config.num_layers] = x
        captured[-1] = x
        return captured

    def _logits_at(self, hidden: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if index is None:
            return self.logits(hidden)
        B, T, H = hidden.shape
        _check_logits_index(index, B)
        if value_checks_enabled(hidden.device) and bool(((index < 0) | (index >= T)).any()):
            raise ValueError(f"logits_index holds positions outside the block [0, {T})")
        rows = hidden.gather(1, index.long()[..., None].expand(B, index.shape[1], H))
        return self.logits(rows)


def _check_logits_index(index, B: int) -> None:
    if (
        not isinstance(index, torch.Tensor)
        or index.dim() != 2
        or index.shape[0] != B
        or index.dtype
        not in (
            torch.int32,
            torch.int64,
        )
    ):
        got = (
            f"{index.dtype} {list(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
        )
        raise ValueError(f"logits_index must be an int tensor [{B}, K], got {got}")


def _feature_layer_slots(feature_layers: Sequence[int] | None, num_layers: int) -> set[int]:
    if feature_layers is None:
        return set()
    bad = [i for i in feature_layers if not 0 <= int(i) <= num_layers]
    if bad:
        raise ValueError(f"feature_layers {bad} are outside [0, {num_layers}]")
    return {int(i) for i in feature_layers}


# --------------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints
# --------------------------------------------------------------------------------------------------
def hf_layer_shapes(
    cfg: ModelConfig, prefix: str, in_features: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Shapes of one decoder layer's tensors under Hugging Face names (``prefix`` ends with '.')."""
    H, D = cfg.hidden_size, cfg.head_dim
    in_features = in_features or H
    q, kv, inter = cfg.num_heads * D, cfg.num_kv_heads * D, cfg.intermediate_size
    shapes = {
        f"{prefix}self_attn.q_proj.weight": (q, in_features),
        f"{prefix}self_attn.k_proj.weight": (kv, in_features),
        f"{prefix}self_attn.v_proj.weight": (kv, in_features),
        f"{prefix}self_attn.o_proj.weight": (H, q),
        f"{prefix}mlp.gate_proj.weight": (inter, H),
        f"{prefix}mlp.up_proj.weight": (inter, H),
        f"{prefix}mlp.down_proj.weight": (H, inter),
        f"{prefix}input_layernorm.weight": (H,),
        f"{prefix}post_attention_layernorm.weight": (H,),
    }
    if cfg.qkv_bias:
        shapes |= {f"{prefix}self_attn.q_proj.bias": (q,), f"{prefix}self_attn.k_proj.bias": (kv,)}
        shapes |= {f"{prefix}self_attn.v_proj.bias": (kv,)}
    if cfg.o_bias:
        shapes[f"{prefix}self_attn.o_proj.bias"] = (H,)
    if cfg.mlp_bias:
        shapes |= {f"{prefix}mlp.gate_proj.bias": (inter,), f"{prefix}mlp.up_proj.bias": (inter,)}
        shapes[f"{prefix}mlp.down_proj.bias"] = (H,)
    if cfg.qk_norm:
        shapes |= {f"{prefix}self_attn.q_norm.weight": (D,), f"{prefix}self_attn.k_norm.weight": (D,)}
    return shapes


def fuse_layer_tensors(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Hugging Face layer tensors under ``prefix`` -> this runtime's names (q/k/v and gate/up fused)."""
    out = {}
    attn, mlp = f"{prefix}self_attn.", f"{prefix}mlp."
    for kind in ("weight", "bias"):
        if f"{attn}q_proj.{kind}" in state:
            parts = [state.pop(f"{attn}{p}_proj.{kind}") for p in "qkv"]
            out[f"{attn}qkv_proj.{kind}"] = torch.cat(parts, dim=0)
        if f"{mlp}gate_proj.{kind}" in state:
            parts = [state.pop(f"{mlp}{p}_proj.{kind}") for p in ("gate", "up")]
            out[f"{mlp}gate_up_proj.{kind}"] = torch.cat(parts, dim=0)
    return out


def split_layer_tensors(
    state: dict[str, torch.Tensor], prefix: str, cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`fuse_layer_tensors`: this runtime's fused tensors -> Hugging Face names."""
    out = {}
    attn, mlp = f"{prefix}self_attn.", f"{prefix}mlp."
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for kind in ("weight", "bias"):
        if f"{attn}qkv_proj.{kind}" in state:
            parts = state.pop(f"{attn}qkv_proj.{kind}").split([q, kv, kv], dim=0)
            out |= {f"{attn}{p}_proj.{kind}": t for p, t in zip("qkv", parts)}
        if f"{mlp}gate_up_proj.{kind}" in state:
            parts = state.pop(f"{mlp}gate_up_proj.{kind}").split(cfg.intermediate_size, dim=0)
            out |= {f"{mlp}{p}_proj.{kind}": t for p, t in zip(("gate", "up"), parts)}
    return out


def hf_target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.norm.weight": (cfg.hidden_size,),
    }
    for i in range(cfg.num_layers):
        shapes |= hf_layer_shapes(cfg, f"model.layers.{i}.")
    shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def target_state_from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Check a Hugging Face target state dict against ``cfg`` and convert it to this runtime's names."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if "fc.weight" in state and not any(k.startswith("model.layers.") for k in state):
        raise ValueError(
            "this checkpoint is an EAGLE draft head (fc.weight, no model.layers.*), not a target model: "
            "pass it as the draft (eagle.load(target, draft), --draft) with its target"
        )
    optional = ["lm_head.weight"] if cfg.tie_word_embeddings else []
    check_keys(state, hf_target_shapes(cfg), what="target checkpoint", optional=optional)
    _check_weight_dtypes(state)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    for i in range(cfg.num_layers):
        state |= fuse_layer_tensors(state, f"layers.{i}.")
    return state


def _check_weight_dtypes(state: dict[str, torch.Tensor]) -> None:
    # A weight is stored as one of the compute dtypes: an integer or float8 tensor is quantised (its
    # scales elsewhere, or in another format) and would be cast, not dequantised: wrong tokens, no message.
    odd = [f"{k} ({v.dtype})" for k, v in state.items() if v.dtype not in DTYPES.values()]
    if odd:
        raise ValueError(
            f"target checkpoint: weights stored as {abbreviate(odd)}; quantised targets are not supported "
            "(float16, bfloat16, float32 or float64 weights only)"
        )


def load_target(
    path: str | Path, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu"
) -> LlamaModel:
    """Load a Hugging Face Llama/Mistral/Qwen2/Qwen3 causal LM for this runtime.

    ``path``: a local checkpoint directory (config.json + model.safetensors, sharded safetensors, or
    pytorch_model.bin) or a hub id (downloaded with huggingface_hub). ``dtype``: float32, float64,
    bfloat16 or float16. Missing, unexpected or misshapen tensors raise ValueError listing them.
    Returns the model in eval mode with gradients disabled.
    """
    directory = resolve_checkpoint(path)
    cfg = ModelConfig.from_json(directory)
    check_head_dim_supported(cfg, directory)
    dtype = resolve_dtype(dtype)
    raw = read_state_dict(directory, dtype)  # (converted as read: the file's views are not kept)
    cfg = _untied_if_lm_head_differs(cfg, raw, directory)
    state = target_state_from_hf(raw, cfg)
    del raw  # (the unfused q/k/v and gate/up parts go before the model is built)
    return build_model(cfg, state, dtype, device)


def _untied_if_lm_head_differs(cfg: ModelConfig, state: dict[str, torch.Tensor], where) -> ModelConfig:
    """``tie_word_embeddings`` with an ``lm_head.weight`` in the files that is not the embedding:
    transformers (5.x) keeps the stored lm_head and does not tie, with a warning; so does this loader
    (dropping it changed every logit, silently)."""
    lm_head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if not cfg.tie_word_embeddings or lm_head is None or embed is None or lm_head.shape != embed.shape:
        return cfg
    if torch.equal(lm_head, embed):
        return cfg
    warnings.warn(
        f"{where}: tie_word_embeddings is true but the checkpoint's lm_head.weight differs from "
        "model.embed_tokens.weight; using the stored lm_head untied, as transformers does",
        stacklevel=3,
    )
    return dataclasses.replace(cfg, tie_word_embeddings=False)


def check_head_dim_supported(cfg: ModelConfig, where) -> None:
    """Refuse at load a head size the attention kernels do not take (every generate would fail)."""
    from eagle_kernels.tree_attention import MAX_HEAD_DIM, MIN_HEAD_DIM

    if not MIN_HEAD_DIM <= cfg.head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"{where}: head_dim={cfg.head_dim} is outside the {MIN_HEAD_DIM}..{MAX_HEAD_DIM} the attention "
            "kernels support (head_dim, or hidden_size / num_attention_heads)"
        )


def build_model(
    cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | str, device: torch.device | str
) -> LlamaModel:
    """A :class:`LlamaModel` holding ``state`` (this runtime's names), frozen, in eval mode."""
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model._inv_freq = rope_inv_freq(cfg)
    model.eval().requires_grad_(False)
    pack_module_linears(model, extra=[model.lm_head_weight])  # CPU only (cpu_packed)
    return model
