"""EAGLE draft heads: EAGLE-1/2 (one layer over ``fc(cat(embed, feature))``) and EAGLE-3.

Both heads run on their own single-layer :class:`~eagle.models.kv_cache.KVCache` (same in-place
layout as the target's) and take a block of ``T`` rows with explicit positions and an optional tree
mask, so one forward drafts a whole tree level.

EAGLE-1/2 (DESIGN §5)::

    x = fc(cat(embed(token_{t+1}), feature_t))          # eagle_kernels.fused_draft_input
    h = x + attn(x)                                      # no input_layernorm
    h = h + mlp(post_attention_layernorm(h))             # no final norm
    logits = target.lm_head(h)                           # target vocabulary

EAGLE-3::

    g = fc(cat(h_low, h_mid, h_high))                    # eagle_kernels.fused_eagle3_input, first step only
    x = cat(input_layernorm(embed(token)), hidden_norm(g))
    h = g + attn(x);  h = h + mlp(post_attention_layernorm(h))   # h is fed back for deeper steps
    logits = lm_head(norm(h))                            # draft vocabulary; target id = id + d2t[id]

Checkpoints use the official layouts (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``,
plain keys, see DESIGN §5); the format is detected from the keys, ``midlayer.`` and ``layers.0.``
prefixes are both accepted for EAGLE-3, and :func:`save_draft` writes the official layout back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import eagle_kernels
from eagle.models.config import LinearRopeScaling, ModelConfig, dynamic_rope_start
from eagle.models.cpu_packed import Linear, invalidate_cpu_caches, linear, pack_module_linears, packed_weight
from eagle.models.kv_cache import KVCache
from eagle.models.llama import (
    MLP,
    Attention,
    BlockContext,
    FastPathWeights,
    LlamaModel,
    ModelOutput,
    RMSNorm,
    block_context,
    check_head_dim_supported,
    check_token_ids,
    cpu_fast_path_ok,
    fuse_layer_tensors,
    hf_layer_shapes,
    layer_weights,
    rope_inv_freq,
    rope_tables,
    run_layers_cpu,
    split_layer_tensors,
    value_checks_enabled,
)
from eagle.models.weights import (
    DTYPES,
    check_keys,
    read_json,
    read_state_dict,
    resolve_checkpoint,
    resolve_dtype,
    write_state_dict,
)
from eagle_kernels import _ext

DRAFT_KINDS = ("eagle2", "eagle3")
EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"


@dataclasses.dataclass
class DraftOutput:
    """Result of a draft forward.

    hidden : ``[B, T, H]`` the draft's output hidden state, fed back as the next step's input
        (EAGLE-1/2: the predicted feature; EAGLE-3: the pre-norm hidden state).
    logits : ``[B, T or K, V]`` over the target vocabulary (EAGLE-1/2) or ``[..., Vd]`` over the
        draft vocabulary (EAGLE-3; map ids with :meth:`DraftHead.to_target_ids`); None if skipped.
    """

    hidden: torch.Tensor
    logits: torch.Tensor | None


class DraftHead(nn.Module):
    """Common interface of the two head kinds (see the module docstring)."""

    kind: str

    def __init__(self, cfg: ModelConfig, embed_weight: torch.Tensor | None) -> None:
        super().__init__()
        self.config = cfg
        # The embedding is a frozen copy of the target's: owned when the checkpoint carries one,
        # otherwise the target's tensor is shared (and not saved by EAGLE-3).
        if embed_weight is None:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size).requires_grad_(False)
            self._shared_embed = None
        else:
            self.embed_tokens = None
            self._shared_embed = embed_weight.detach()  # a plain tensor: not a parameter of the head
        self._inv_freq = rope_inv_freq(cfg)
        self._fast_weights = FastPathWeights()

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.embed_tokens is not None else self._shared_embed

    @property
    def owns_embedding(self) -> bool:
        return self.embed_tokens is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def feature_layers(self) -> tuple[int, ...] | None:
        """Target layers whose inputs this head needs (pass as ``feature_layers`` to the target)."""
        return None

    def new_cache(self, batch_size: int, max_seq_len: int, *, attended_len: int | None = None) -> KVCache:
        """The head's own single-layer cache, in its dtype and on its device (``attended_len``: as
        :meth:`eagle.models.llama.LlamaModel.new_cache`'s; a head has no sliding window)."""
        cfg = self.config
        return KVCache(
            1, batch_size, cfg.num_kv_heads, max_seq_len, cfg.head_dim, dtype=self.dtype, device=self.device
        )

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids -> target ids (identity for EAGLE-1/2)."""
        return draft_ids

    def _context(
        self,
        hidden: torch.Tensor,
        token_ids: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None,
        tree_mask: torch.Tensor | None,
        past: int = 0,
        *,
        check_id_values: bool = True,
    ) -> BlockContext:
        cfg = self.config
        check_token_ids(
            "token_ids", token_ids, cfg.vocab_size, cache.batch_size, cache.device, values=check_id_values
        )
        B, T = token_ids.shape
        if not isinstance(hidden, torch.Tensor) or tuple(hidden.shape) != (B, T, cfg.hidden_size):
            got = list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"hidden must be [B, T, H] = [{B}, {T}, {cfg.hidden_size}], got {got}")
        if hidden.dtype != self.dtype or cache.kv.dtype != self.dtype:
            raise TypeError(f"hidden ({hidden.dtype}) and the cache ({cache.kv.dtype}) must be {self.dtype}")
        if (
            cache.kv.shape[0] != 1
            or cache.kv.shape[3] != cfg.num_kv_heads
            or cache.kv.shape[5] != cfg.head_dim
        ):
            raise ValueError("cache was not allocated for this draft head (use head.new_cache)")
        return block_context(
            cache, T, self._inv_freq_on(cache.device), self.dtype, positions, tree_mask, past
        )

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """The RoPE inverse frequencies on ``device`` (moved there once)."""
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a plain tensor (a Parameter detached; same storage)."""
    return t.detach() if isinstance(t, nn.Parameter) else t


def _rows(hidden: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``hidden [B, T, H]`` at block positions ``index [B, K]`` (all rows when None)."""
    if index is None:
        return hidden
    B, T, H = hidden.shape
    if index.dim() != 2 or index.shape[0] != B or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"logits_index must be an int tensor [{B}, K], got {index.dtype} {list(index.shape)}"
        )
    if value_checks_enabled(hidden.device) and bool(((index < 0) | (index >= T)).any()):
        raise ValueError(f"logits_index holds positions outside the block [0, {T})")
    return hidden.gather(1, index.long()[..., None].expand(B, index.shape[1], H))


# --------------------------------------------------------------------------------------------------
# EAGLE-1/2
# --------------------------------------------------------------------------------------------------
class Eagle2Layer(nn.Module):
    """A Llama decoder layer without ``input_layernorm``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: BlockContext):
        h = x + self.self_attn(x, k_cache, v_cache, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle2Head(DraftHead):
    """EAGLE-1/2 draft head; ``lm_head_weight`` is the target's output projection ``[V, H]``."""

    kind = "eagle2"

    def __init__(
        self, cfg: ModelConfig, lm_head_weight: torch.Tensor, embed_weight: torch.Tensor | None = None
    ) -> None:
        super().__init__(cfg, embed_weight)
        self.fc = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=bool(cfg.extra.get("bias", True)))
        self.layers = nn.ModuleList([Eagle2Layer(cfg)])
        self.lm_head_weight = lm_head_weight.detach()  # the target's (a copy in another dtype), never saved

    def target_features(self, target_out: ModelOutput) -> torch.Tensor:
        """The first step's input: the target's final hidden states (after its last norm), in the
        head's dtype (a head may run in another dtype than its target: see :func:`load_draft`)."""
        return target_out.hidden.to(self.dtype)

    def _cpu_op_weights(self, x, op: str) -> list[torch.Tensor | None] | None:
        """The layer's weight list for the C++ op ``op`` when the CPU fast path applies to ``x``
        (a plain CPU tensor, no autograd, the op built), else None."""
        if not (isinstance(x, torch.Tensor) and _ext.has_op(op)):
            return None
        layer, fc = self.layers[0], self.fc
        weights, for_op = self._fast_weights.get(lambda: layer_weights(layer))
        return for_op if cpu_fast_path_ok(x, [*weights, fc.weight, fc.bias, self.embed_weight]) else None

    def forward(
        self,
        hidden: torch.Tensor,
        token_ids: torch.Tensor,
        cache: KVCache,
        *,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        compute_logits: bool = True,
        past: int = 0,
    ) -> DraftOutput:
        """Run one block of draft rows; writes their K/V at ``cache.seqlens[b] + i`` (not advanced).

        Parameters
        ----------
        hidden : ``[B, T, H]``, the head's dtype
            Features: the target's features ``f_t`` or the head's own previous outputs.
        token_ids : int ``[B, T]``
            The token one step ahead of each feature (row t pairs ``f_t`` with ``x_{t+1}``).
        cache : KVCache
            From :meth:`new_cache`.
        positions, tree_mask, logits_index, compute_logits
            As in :meth:`eagle.models.llama.LlamaModel.forward` (positions default to
            ``seqlens[b] + i``; EAGLE-1/2 gives row t the position t).
        past : int
            Continue a tree block: the first ``past`` block rows were written by earlier calls; these
            ``T`` rows go after them and ``tree_mask`` is ``[B, T, past + T]`` (see
            :func:`eagle.models.llama.block_context`).
        """
        for_op = self._cpu_op_weights(hidden, "eagle2_head")
        fast = for_op is not None
        fc = self.fc
        # The fast path's C++ fused_draft_input checks the ids' range itself.
        ctx = self._context(hidden, token_ids, cache, positions, tree_mask, past, check_id_values=not fast)
        if fast:
            # One C++ call: the fused input, the layer and the lm_head, each the kernel the modules'
            # path runs (the Python between them cost as much as the layer at decode sizes).
            cfg = self.config
            outs = torch.ops.eagle_C.eagle2_head(
                hidden,
                token_ids,
                _plain(self.embed_weight),
                _plain(fc.weight),
                _plain(fc.bias),
                for_op,
                cache.kv,
                *ctx.op_args(cfg),
                packed_weight(self.lm_head_weight) if compute_logits else None,
                logits_index,
            )
            return DraftOutput(hidden=outs[0], logits=outs[1] if compute_logits else None)
        x = eagle_kernels.fused_draft_input(hidden, token_ids, self.embed_weight, fc.weight, fc.bias)
        h = self.layers[0](x, *cache.layer(0), ctx)
        logits = linear(_rows(h, logits_index), self.lm_head_weight) if compute_logits else None
        return DraftOutput(hidden=h, logits=logits)

    def cpu_dynamic_tree(
        self,
        root_logits: torch.Tensor,
        root_hidden: torch.Tensor,
        root: torch.Tensor,
        cache: KVCache,
        target_seqlens: torch.Tensor,
        *,
        topk: int,
        depth: int,
        num_tokens: int,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        """The whole EAGLE-2 dynamic draft tree in one C++ call (``eagle_C::eagle2_draft_dynamic``,
        csrc/cpu/draft_tree.cpp): the same ATen calls as ``SpeculativeDecoder._draft_dynamic``'s Python
        loop, so the same tree. Returns ``(candidates [b, n], (tree_mask, positions, retrive_index,
        retrive_next_token, retrive_next_sibling))``, or None where it does not apply (not the CPU
        fast path, autograd, the extension missing, or switched off by :func:`set_cpu_draft_loop`).

        ``root_logits [b, V]``, ``root_hidden [b, H]``, ``root [b]``: the draft's output at the last
        committed position and the last committed token; ``cache``: the draft's cache (its committed
        lengths); ``target_seqlens [b]``: the target's committed lengths (the tree's positions)."""
        for_op = self._cpu_op_weights(root_hidden, "eagle2_draft_dynamic") if _CPU_DRAFT_LOOP else None
        if for_op is None:
            return None
        doubled, signs = rope_tables(self._inv_freq_on(cache.device))
        cfg, fc = self.config, self.fc
        outs = torch.ops.eagle_C.eagle2_draft_dynamic(
            root_logits,
            root_hidden,
            root,
            cache.seqlens,
            target_seqlens,
            _plain(self.embed_weight),
            _plain(fc.weight),
            _plain(fc.bias),
            for_op,
            cache.kv,
            doubled,
            signs,
            packed_weight(self.lm_head_weight),
            topk,
            depth,
            num_tokens,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.rms_norm_eps,
        )
        return outs[0], tuple(outs[1:])

    def cpu_round_weights(self, root_hidden: torch.Tensor, sampled: bool = False):
        """The head's arguments of ``eagle_C::eagle2_round_greedy`` (``sampled``:
        ``eagle2_round_sampled``; the draft and update parts of a round in one call with the target's
        forward: ``SpeculativeDecoder._cpu_round``), or None where the C++ draft loop or update does
        not apply (as :meth:`cpu_dynamic_tree` and :meth:`cpu_verify_update` decide)."""
        op = "eagle2_round_sampled" if sampled else "eagle2_round_greedy"
        if not (_CPU_ROUND and _CPU_DRAFT_LOOP and _CPU_VERIFY_UPDATE and _ext.has_op(op)):
            return None
        for_op = self._cpu_op_weights(root_hidden, "eagle2_verify_update")
        if for_op is None:
            return None
        doubled, signs = rope_tables(self._inv_freq_on(root_hidden.device))
        cfg, fc = self.config, self.fc
        return (
            _plain(self.embed_weight),
            _plain(fc.weight),
            _plain(fc.bias),
            for_op,
            doubled,
            signs,
            packed_weight(self.lm_head_weight),
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.rms_norm_eps,
        )

    def cpu_verify_update(
        self,
        logits: torch.Tensor,
        target_hidden: torch.Tensor,
        candidates: torch.Tensor,
        tree: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        target_cache: KVCache,
        cache: KVCache,
        num_spec_steps: int,
        sampled: tuple[torch.Tensor, ...] | None = None,
        live: torch.Tensor | None = None,
    ) -> list[torch.Tensor | None] | None:
        """The rest of a greedy round after the verify forward in one C++ call
        (``eagle_C::eagle2_verify_update``, csrc/cpu/draft_tree.cpp): the greedy pick, the tree walk,
        the target cache's compaction and this head's forward over the accepted tokens, with the same
        ops and arguments as ``SpeculativeDecoder._round`` and ``_update_draft`` make them, so the same
        bits. Returns ``[new_tokens, counts, new target lengths, root, root_hidden, root_logits,
        nonfinite_from]`` (``nonfinite_from``: int64 ``[b]``, the first position of each row's accepted
        path whose row of the logits holds NaN/inf, ``num_spec_steps`` where none, as
        :func:`eagle.models.generate_plain.first_nonfinite_accepted_row` gives it; None where no row of
        the logits does; the caller decides whether such a token is emitted), or None where it does not
        apply (see :meth:`cpu_dynamic_tree`; also off with the C++ draft loop).

        ``logits [b, n, V]``, ``target_hidden [b, n, H]``: the verify forward's; ``tree``:
        ``(retrive_index, retrive_next_token, retrive_next_sibling)``; ``cache``: this head's cache,
        with room for ``num_spec_steps`` rows (the caller checks); neither cache's lengths are
        advanced here.

        ``sampled``: a sampled round instead (``eagle_C::eagle2_verify_update_sampled``, the ops of
        ``SpeculativeDecoder._round``'s sampled branch: NaN/inf check, ``warp_logits``, the round's
        uniforms from :mod:`eagle.rng`, ``tree_speculative_sampling``, then the same commit), given as
        ``(temperature, top_k, top_p, min_p, seeds, draws)``: the warper's per-row parameters
        (``[b * n]`` float32 / int64 / float32 / float32) and each row's RNG seed and draw counter
        (int64 ``[b]``; ``draws`` is advanced in place). The result then has an eighth entry, the
        sampling op's status words (None when every one is 0; nothing else is written otherwise).
        ``live``: bool ``[b]`` or None; NaN/inf on the accepted path of a row that is not live (a
        finished row the batch still computes) does not count."""
        on = _CPU_DRAFT_LOOP and _CPU_VERIFY_UPDATE
        for_op = self._cpu_op_weights(target_hidden, "eagle2_verify_update") if on else None
        if for_op is None:  # (_cpu_op_weights checked the device and tracing)
            return None
        if sampled is not None and not _ext.has_op("eagle2_verify_update_sampled"):
            return None
        doubled, signs = rope_tables(self._inv_freq_on(cache.device))
        cfg, fc = self.config, self.fc
        if sampled is None:
            op, head_args = torch.ops.eagle_C.eagle2_verify_update, (logits, target_hidden, candidates, *tree)
        else:
            op = torch.ops.eagle_C.eagle2_verify_update_sampled
            head_args = (logits, target_hidden, candidates, *tree, *sampled)
        return op(
            *head_args,
            target_cache.kv,
            target_cache.seqlens,
            num_spec_steps,
            _plain(self.embed_weight),
            _plain(fc.weight),
            _plain(fc.bias),
            for_op,
            cache.kv,
            cache.seqlens,
            doubled,
            signs,
            packed_weight(self.lm_head_weight),
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.rms_norm_eps,
            live=live,
        )


_CPU_DRAFT_LOOP = os.environ.get("EAGLE_CPU_DRAFT_LOOP", "1") != "0"
_CPU_VERIFY_UPDATE = True
_CPU_ROUND = True


def cpu_draft_loop_status() -> str:
    """Which loop drafts EAGLE-2 dynamic trees on CPU (EAGLE-1/2 heads), in words (``eagle info``)."""
    if not _ext.has_op("eagle2_draft_dynamic"):
        return f"Python (the C++ extension lacks eagle_C::eagle2_draft_dynamic: {_ext.STATUS.reason})"
    if not _CPU_DRAFT_LOOP:
        return "Python (the C++ loop is switched off: EAGLE_CPU_DRAFT_LOOP=0 or set_cpu_draft_loop(False))"
    if not _CPU_VERIFY_UPDATE or not _ext.has_op("eagle2_verify_update"):
        return "C++, one call per round (eagle_C::eagle2_draft_dynamic); the round's rest in Python"
    if not _ext.has_op("eagle2_verify_update_sampled"):
        return (
            "C++, one call per round (eagle_C::eagle2_draft_dynamic), and one for the greedy round's rest "
            "after the verify forward (eagle_C::eagle2_verify_update); the sampled round's rest in Python"
        )
    status = (
        "C++, one call per round (eagle_C::eagle2_draft_dynamic), and one for the round's rest after the "
        "verify forward (eagle_C::eagle2_verify_update, greedy; eagle2_verify_update_sampled, sampled)"
    )
    if _CPU_ROUND and _ext.has_op("eagle2_round_greedy"):
        status += "; a round's three calls in one (eagle_C::eagle2_round_greedy"
        status += (
            ", eagle2_round_sampled)" if _ext.has_op("eagle2_round_sampled") else "; sampled: three calls)"
        )
    return status


def set_cpu_verify_update(enabled: bool) -> bool:
    """Turn the one-call rest of a round, greedy or sampled (:meth:`Eagle2Head.cpu_verify_update`), on
    or off (the Python path makes the same ops: same tokens, caches, RNG counters and states); returns
    the previous setting.
    ``EAGLE_CPU_DRAFT_LOOP=0`` / :func:`set_cpu_draft_loop` turn it off too."""
    global _CPU_VERIFY_UPDATE
    previous, _CPU_VERIFY_UPDATE = _CPU_VERIFY_UPDATE, bool(enabled)
    invalidate_cpu_caches()
    return previous


def set_cpu_round(enabled: bool) -> bool:
    """Turn the one-call round (draft tree, target forward and the rest in
    ``eagle_C::eagle2_round_greedy`` / ``eagle2_round_sampled``: ``SpeculativeDecoder._cpu_round``)
    on or off; off, the same
    three C++ calls are made from Python (same tokens, caches and states). Returns the previous
    setting. The C++ draft loop and one-call rest must be on for it to apply."""
    global _CPU_ROUND
    previous, _CPU_ROUND = _CPU_ROUND, bool(enabled)
    invalidate_cpu_caches()
    return previous


def set_cpu_draft_loop(enabled: bool) -> bool:
    """Turn the C++ dynamic draft loop (:meth:`Eagle2Head.cpu_dynamic_tree`) on or off; the trees
    are identical either way. Returns the previous setting; ``EAGLE_CPU_DRAFT_LOOP=0`` starts it off."""
    global _CPU_DRAFT_LOOP
    previous, _CPU_DRAFT_LOOP = _CPU_DRAFT_LOOP, bool(enabled)
    invalidate_cpu_caches()
    return previous


# --------------------------------------------------------------------------------------------------
# EAGLE-3
# --------------------------------------------------------------------------------------------------
class Eagle3Layer(nn.Module):
    """The EAGLE-3 midlayer: attention over ``cat(input_layernorm(emb), hidden_norm(h))`` (width 2H)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, in_features=2 * cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        emb: torch.Tensor,
        h: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: BlockContext,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.attention_input(emb, h), k_cache, v_cache, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))

    def attention_input(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``cat(input_layernorm(emb), hidden_norm(h))``: ``2 x [B, T, H] -> [B, T, 2H]``."""
        return torch.cat((self.input_layernorm(emb), self.hidden_norm(h)), dim=-1)


class Eagle3Head(DraftHead):
    """EAGLE-3 draft head with its own norm and lm_head over ``draft_vocab_size`` tokens."""

    kind = "eagle3"

    def __init__(
        self, cfg: ModelConfig, target_num_layers: int, embed_weight: torch.Tensor | None = None
    ) -> None:
        super().__init__(cfg, embed_weight)
        H, draft_vocab = cfg.hidden_size, int(cfg.extra.get("draft_vocab_size") or cfg.vocab_size)
        self.fc = Linear(3 * H, H, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.lm_head = Linear(H, draft_vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.int64))
        self.register_buffer("t2d", torch.ones(cfg.vocab_size, dtype=torch.bool))
        self._feature_layers = eagle3_feature_layers(cfg, target_num_layers)

    @property
    def draft_vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def feature_layers(self) -> tuple[int, int, int]:
        return self._feature_layers

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def target_features(self, target_out: ModelOutput) -> torch.Tensor:
        """The first step's input: ``fc`` over the target's hidden states entering layers
        (2, L//2, L-3) (run the target with ``feature_layers=head.feature_layers``)."""
        if target_out.layer_hidden is None or len(target_out.layer_hidden) != 3:
            raise ValueError("EAGLE-3 needs the target run with feature_layers=head.feature_layers")
        return self.project_features(*(h.to(self.dtype) for h in target_out.layer_hidden))

    def project_features(
        self, h_low: torch.Tensor, h_mid: torch.Tensor, h_high: torch.Tensor
    ) -> torch.Tensor:
        """``fc(cat(h_low, h_mid, h_high))``: ``3 x [B, T, H] -> [B, T, H]``."""
        return eagle_kernels.fused_eagle3_input(h_low, h_mid, h_high, self.fc.weight, self.fc.bias)

    def forward(
        self,
        hidden: torch.Tensor,
        token_ids: torch.Tensor,
        cache: KVCache,
        *,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        compute_logits: bool = True,
        past: int = 0,
    ) -> DraftOutput:
        """Run one block of draft rows (see :meth:`Eagle2Head.forward`).

        ``hidden [B, T, H]``: :meth:`target_features` for rows fed by the target, or the head's own
        previous ``DraftOutput.hidden`` for deeper draft steps. ``token_ids`` are target-vocabulary
        ids (embedded with the target's embedding). Logits are over the draft vocabulary.
        """
        ctx = self._context(hidden, token_ids, cache, positions, tree_mask, past)
        emb = F.embedding(token_ids, self.embed_weight)
        layer = self.midlayer
        weights, for_op = self._fast_weights.get(lambda: layer_weights(layer))
        if cpu_fast_path_ok(hidden, weights):
            attn_input = layer.attention_input(emb, hidden)
            h = run_layers_cpu(hidden, for_op, cache.kv, ctx, self.config, attn_input=attn_input)[0]
        else:
            h = layer(emb, hidden, *cache.layer(0), ctx)
        logits = self.lm_head(self.norm(_rows(h, logits_index))) if compute_logits else None
        return DraftOutput(hidden=h, logits=logits)


# --------------------------------------------------------------------------------------------------
# Official checkpoint format
# --------------------------------------------------------------------------------------------------
def draft_config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """Parse an EAGLE head's config.json (LlamaConfig-like, plus ``bias``/``draft_vocab_size``)."""
    if "transformer_layer_config" in raw or "speculators_model_type" in raw:
        raise ValueError(
            "draft config: a vLLM 'speculators' config (its Llama settings nested under "
            "transformer_layer_config), which this loader does not read; it reads the official EAGLE / "
            "SpecForge layout, a LlamaConfig at the top level"
        )
    cfg = ModelConfig.from_dict(raw, family="llama")
    if cfg.num_layers != 1:
        raise ValueError(f"draft config: num_hidden_layers={cfg.num_layers}; EAGLE heads here have exactly 1")
    target_hidden = raw.get("target_hidden_size")
    if target_hidden is not None and int(target_hidden) != cfg.hidden_size:
        raise ValueError(
            f"draft config: target_hidden_size={target_hidden} != hidden_size={cfg.hidden_size} is not supported"
        )
    draft_vocab = raw.get("draft_vocab_size")
    if draft_vocab is not None and (
        not isinstance(draft_vocab, int)
        or isinstance(draft_vocab, bool)
        or not 1 <= draft_vocab <= cfg.vocab_size
    ):  # 0 fell back to the lm_head's rows, a negative one failed as a shape "expected [-5, H]"
        raise ValueError(
            f"draft config: draft_vocab_size must be an integer in [1, vocab_size={cfg.vocab_size}], got {draft_vocab!r}"
        )
    # EAGLE heads name their q/k/v bias `qkv_bias` (Qwen2 heads), never `attention_bias`.
    return dataclasses.replace(cfg, qkv_bias=bool(raw.get("qkv_bias", False)), o_bias=False, mlp_bias=False)


# EAGLE-3 variants of other trainers that compute something else than this head; refused when set
_UNSUPPORTED_EAGLE3_KEYS = ("norm_before_residual", "norm_before_fc", "use_aux_hidden_state_fc_bias")


_LAYER_IDS = "eagle_aux_hidden_state_layer_ids"


def _layer_ids(ids, where: str) -> list[int]:
    if (
        not isinstance(ids, (list, tuple))
        or len(ids) != 3
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    ):
        raise ValueError(f"draft config: {where} must be 3 integers, got {ids!r}")
    return list(ids)


def _explicit_feature_layers(cfg: ModelConfig) -> tuple[int, ...] | None:
    """The target layers the head config names, as inputs of layers (None when it names none).

    Two conventions share the key ``eagle_aux_hidden_state_layer_ids``: at the top level (vLLM,
    speculators, ModelOpt) id j is the hidden state entering layer j; under ``eagle_config``
    (SpecForge's heads, read by SGLang, which captures the input of layer id + 1) id j is the output
    of layer j, the state entering layer j + 1."""
    top = cfg.extra.get(_LAYER_IDS)
    nested = _nested_eagle_config(cfg).get(_LAYER_IDS)
    if top is not None:
        top = _layer_ids(top, _LAYER_IDS)
    if nested is not None:
        nested = [i + 1 for i in _layer_ids(nested, f"eagle_config.{_LAYER_IDS}")]
    if top is not None and nested is not None and top != nested:
        raise ValueError(
            f"draft config: {_LAYER_IDS} {top} (inputs of layers, vLLM's convention) and eagle_config."
            f"{_LAYER_IDS} {[i - 1 for i in nested]} (outputs of layers, SGLang's) name different layers"
        )
    ids = top if top is not None else nested
    return None if ids is None else tuple(ids)


def eagle3_feature_layers(cfg: ModelConfig, target_num_layers: int) -> tuple[int, int, int]:
    """The target layers whose input features an EAGLE-3 head reads: the official (2, L // 2, L - 3),
    or the layers its config names (:func:`_explicit_feature_layers`: the top-level
    ``eagle_aux_hidden_state_layer_ids`` as vLLM reads it, or ``eagle_config``'s as SGLang does)."""
    L = target_num_layers
    ids = _explicit_feature_layers(cfg)
    if ids is None:
        return (2, L // 2, L - 3)
    if not all(0 <= i < L for i in ids):
        raise ValueError(
            f"draft config: {_LAYER_IDS} name the inputs of layers {list(ids)}, which must be layers of "
            f"the target, in [0, {L}) (under eagle_config an id j is layer j's output: the input of j + 1)"
        )
    return ids


def _nested_eagle_config(cfg: ModelConfig) -> dict:
    """The ``eagle_config`` dict some trainers nest their EAGLE-3 settings in (empty without one)."""
    nested = cfg.extra.get("eagle_config")
    return nested if isinstance(nested, dict) else {}


def _check_eagle3_variant(cfg: ModelConfig) -> None:
    nested = _nested_eagle_config(cfg)
    set_keys = [k for k in _UNSUPPORTED_EAGLE3_KEYS if cfg.extra.get(k) or nested.get(k)]
    # use_aux_hidden_state false: the head reads the target's last hidden state, without fc (vLLM,
    # SGLang), "like EAGLE-1"; here it would read three layers through fc instead
    aux = nested.get("use_aux_hidden_state", cfg.extra.get("use_aux_hidden_state", True))
    if aux is not True:
        set_keys.append(f"use_aux_hidden_state={aux!r}")
    if set_keys:
        raise ValueError(
            f"draft config sets {set_keys}: an EAGLE-3 variant this package does not compute "
            "(its head would load and draft wrongly, lowering acceptance with no message)"
        )


def _check_dynamic_rope_fits(raw: dict[str, Any], target: LlamaModel) -> None:
    """A head's positions follow the target's sequence, not the head's own max_position_embeddings
    (the target's limit is the one this runtime enforces). A 'dynamic' RoPE rescales past its start,
    which this runtime does not compute, so a head whose start lies within the target's context
    would draft with other frequencies than it was trained with, silently."""
    start = dynamic_rope_start(raw)
    limit = target.config.max_position_embeddings
    if start is not None and start < limit:
        raise ValueError(
            f"its RoPE is 'dynamic' (NTK), rescaled past position {start}, but the "
            f"target runs sequences up to max_position_embeddings={limit}; dynamic rescaling is not "
            "computed here (a head whose rescaling starts at or past the target's limit is supported)"
        )


def _check_weights(state: dict[str, torch.Tensor], directory) -> None:
    """Every weight a float tensor of finite values (d2t / t2d: the vocabulary maps, integer / bool):
    a NaN or inf in a head still gives the target's tokens (it verifies each one) but drafts nothing
    useful, with no message; an integer (quantised) weight would be cast, not dequantised."""
    for key, value in state.items():
        if key in ("d2t", "t2d"):
            continue
        if value.dtype not in DTYPES.values():  # (float8 is floating point, and isfinite fails on it)
            raise ValueError(
                f"{directory}: head weight {key} has dtype {value.dtype}; quantised heads are not supported"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"{directory}: head weight {key} holds NaN or inf values (a corrupt checkpoint?)"
            )


# A head's stored embedding against its target's: relative (Frobenius) difference above which it is taken
# for another target's. The copies of one embedding differ by storage rounding only (bf16: <= 2^-8
# relative per value); another model's embedding differs by ~sqrt(2) (two unrelated matrices).
EMBEDDING_MISMATCH = 0.05


def _holds_target_embedding(state: dict[str, torch.Tensor], target: LlamaModel, dtype: torch.dtype) -> bool:
    """Whether an EAGLE-1/2 head file's ``embed_tokens.weight`` holds the target's embedding values in
    the head's ``dtype`` (the usual case: a copy in the target's dtype). The head then shares the
    target's tensor and computes exactly what its own copy would give, without keeping it twice (1 GB
    for Llama-3-8B's 128k x 4096 in bf16), and the copy needs no other check: equal values are the
    target's (a NaN never equals anything)."""
    embed, ref = state.get("embed_tokens.weight"), target.embed_tokens.weight
    if embed is None or embed.shape != ref.shape or embed.dtype not in DTYPES.values():
        return False  # (missing, misshapen or quantised: the checks below say so)
    return all(torch.equal(a, b) for a, b in _row_chunks(embed, ref, dtype))


def _row_chunks(embed: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    """``(embed rows, ref rows)`` 8192 rows at a time, on CPU in ``dtype``: a 128k x 4096 table is 2 GB
    in float32, so the two tables are compared a slice at a time."""
    for start in range(0, ref.shape[0], 8192):
        rows = slice(start, start + 8192)
        yield embed[rows].to(device="cpu", dtype=dtype), ref[rows].detach().to(device="cpu", dtype=dtype)


def _check_embedding_matches(embed: torch.Tensor, target: LlamaModel, directory) -> None:
    """An EAGLE-1/2 head that stores the embedding it was trained with (EAGLE's training freezes its
    target's) must hold this target's: a head trained for another model of the same shape (e.g. a
    Vicuna head on Llama 2) would load and run with an acceptance near zero and no message. (EAGLE-3
    trainers may train the draft's embedding, so an EAGLE-3 head's own embedding is taken as is.)"""
    ref = target.embed_tokens.weight
    if embed.shape != ref.shape:
        return  # refused by the key check, with the shapes named
    diff = ref_norm = 0.0
    for a, b in _row_chunks(embed, ref, torch.float32):
        diff += float((a - b).square().sum())
        ref_norm += float(b.square().sum())
    if not math.isfinite(ref_norm):  # (else read as a mismatch and blamed on a correct head)
        raise ValueError("the target's embed_tokens holds NaN or inf values: check the target checkpoint")
    relative = (diff / ref_norm) ** 0.5 if ref_norm > 0 else (0.0 if diff == 0 else float("inf"))
    if relative > EMBEDDING_MISMATCH:
        raise ValueError(
            f"{directory}: the head's embed_tokens differs from the target's (relative difference "
            f"{relative:.3f}); this head was trained for another target"
        )


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """``"eagle3"`` or ``"eagle2"`` from the key names. A head that has EAGLE-1/2's ``fc`` or layer
    keys but lacks others is EAGLE-1/2, so that the key check names what is missing."""
    if (
        "d2t" in state
        or any(k.startswith("midlayer.") for k in state)
        or "layers.0.hidden_norm.weight" in state
    ):
        return "eagle3"
    if "fc.weight" in state or any(k.startswith("layers.0.") for k in state):
        return "eagle2"
    raise ValueError(f"not an EAGLE-1/2/3 head: no fc/layer keys among {sorted(state)[:8]}")


# Prefixes some trainers' saves put on every key of a head (DDP's module., a wrapper's model., the
# reference code's ea_layer.); rotary inverse frequencies are buffers some saves include.
_WRAPPER_PREFIXES = ("module.", "model.", "ea_layer.")


def _plain_head_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head's tensors under the official names: without ``rotary_emb.inv_freq`` buffers and
    without one wrapper prefix shared by every key."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _eagle2_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    H = cfg.hidden_size
    shapes = {"embed_tokens.weight": (cfg.vocab_size, H), "fc.weight": (H, 2 * H)}
    if cfg.extra.get("bias", True):
        shapes["fc.bias"] = (H,)
    layer = hf_layer_shapes(cfg, "layers.0.")
    del layer["layers.0.input_layernorm.weight"]
    return shapes | layer


def _eagle3_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    H, V = cfg.hidden_size, cfg.vocab_size
    Vd = int(cfg.extra.get("draft_vocab_size") or V)
    shapes = {
        "embed_tokens.weight": (V, H),
        "fc.weight": (H, 3 * H),
        "midlayer.hidden_norm.weight": (H,),
        "norm.weight": (H,),
        "lm_head.weight": (Vd, H),
        "d2t": (Vd,),
        "t2d": (V,),
    }
    return shapes | hf_layer_shapes(cfg, "midlayer.", in_features=2 * H)


def _check_fits_target(cfg: ModelConfig, target: LlamaModel, kind: str) -> None:
    t = target.config
    if cfg.hidden_size != t.hidden_size:
        raise ValueError(
            f"{kind} head does not fit the target: hidden_size {cfg.hidden_size} != target's {t.hidden_size}"
        )
    if cfg.vocab_size != t.vocab_size:
        raise ValueError(
            f"{kind} head does not fit the target: vocab_size {cfg.vocab_size} != target's {t.vocab_size}"
        )
    if kind == "eagle3" and t.num_layers < 4 and _explicit_feature_layers(cfg) is None:
        raise ValueError(
            f"an EAGLE-3 head needs a target with >= 4 layers (features of 2, L//2, L-3), got {t.num_layers}"
        )


def _normalised_vocab_map(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """``d2t`` as int64 and ``t2d`` as bool, whatever integer dtypes the file used; ``t2d`` derived
    from ``d2t`` when the file has only ``d2t`` (vLLM's and SGLang's loaders read only that)."""
    d2t, t2d = state["d2t"], state.get("t2d")
    if d2t.dtype.is_floating_point or d2t.dtype == torch.bool:
        raise TypeError(f"d2t must hold integers, got {d2t.dtype}")
    d2t = d2t.to(torch.int64)
    if t2d is None:  # (out-of-range targets are left out here and refused by _check_vocab_map)
        targets = torch.arange(d2t.numel()) + d2t.cpu()
        t2d = torch.zeros(vocab_size, dtype=torch.bool)
        t2d[targets[(targets >= 0) & (targets < vocab_size)]] = True
    elif t2d.dtype != torch.bool:
        if t2d.dtype.is_floating_point or bool(((t2d != 0) & (t2d != 1)).any()):
            raise TypeError(f"t2d must be bool (or 0/1 integers), got {t2d.dtype}")
        t2d = t2d.to(torch.bool)
    return state | {"d2t": d2t, "t2d": t2d}


def _check_vocab_map(d2t: torch.Tensor, t2d: torch.Tensor, vocab_size: int) -> None:
    if d2t.dtype != torch.int64 or t2d.dtype != torch.bool:
        raise TypeError(f"d2t must be int64 and t2d bool, got {d2t.dtype} and {t2d.dtype}")
    targets = torch.arange(d2t.numel()) + d2t.cpu()
    if bool(((targets < 0) | (targets >= vocab_size)).any()):
        raise ValueError(f"d2t maps draft ids outside the target vocabulary [0, {vocab_size})")
    if targets.numel() > 1 and not bool((targets[1:] > targets[:-1]).all()):
        raise ValueError("d2t must map draft ids to strictly increasing target ids")
    derived = torch.zeros(vocab_size, dtype=torch.bool)
    derived[targets] = True
    if not torch.equal(derived, t2d.cpu()):
        raise ValueError("t2d does not mark exactly the target ids that d2t maps to")


def _eagle3_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Official EAGLE-3 keys (either prefix) checked and converted to this module's names."""
    if any(k.startswith("layers.0.") for k in state):
        if any(k.startswith("midlayer.") for k in state):
            raise ValueError("EAGLE-3 checkpoint mixes 'midlayer.' and 'layers.0.' keys")
        state = {
            ("midlayer." + k.removeprefix("layers.0.") if k.startswith("layers.0.") else k): v
            for k, v in state.items()
        }
    if "t2d" in state and "d2t" not in state:
        raise ValueError("EAGLE-3 checkpoint: t2d without d2t (the draft-to-target map)")
    if "d2t" in state:
        state = _normalised_vocab_map(state, cfg.vocab_size)
    vocab_map_optional = (
        ["d2t", "t2d"] if int(cfg.extra.get("draft_vocab_size") or cfg.vocab_size) == cfg.vocab_size else []
    )
    check_keys(
        state,
        _eagle3_shapes(cfg),
        what="EAGLE-3 checkpoint",
        optional=["embed_tokens.weight", *vocab_map_optional],
    )
    full_vocab = bool(vocab_map_optional)
    if "d2t" in state and full_vocab and not bool(state["d2t"].any()):
        # A full draft vocabulary maps each id to itself (d2t all 0): the reference code (ea_model.py)
        # then deletes both buffers, so a file's placeholder t2d (e.g. all False) is not read either.
        state = state | {"t2d": torch.ones(cfg.vocab_size, dtype=torch.bool)}
    if "d2t" in state:
        _check_vocab_map(state["d2t"], state["t2d"], cfg.vocab_size)
    else:  # full draft vocabulary: the identity map
        state |= {
            "d2t": torch.zeros(cfg.vocab_size, dtype=torch.int64),
            "t2d": torch.ones(cfg.vocab_size, dtype=torch.bool),
        }
    return state | fuse_layer_tensors(state, "midlayer.")


def _with_draft_vocab_size(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> ModelConfig:
    """An EAGLE-3 config without ``draft_vocab_size`` takes it from ``lm_head.weight``'s rows (a
    reduced draft vocabulary whose config omits the key)."""
    lm_head = state.get("lm_head.weight")
    if cfg.extra.get("draft_vocab_size") or lm_head is None or lm_head.dim() != 2:
        return cfg
    return dataclasses.replace(cfg, extra=cfg.extra | {"draft_vocab_size": int(lm_head.shape[0])})


def _with_index(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current device>`` and ``cpu:0`` -> ``cpu`` (what CPU tensors report), so
    that equal devices compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        return torch.device("cpu")
    return device


def load_draft(
    path: str | Path,
    target: LlamaModel,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> DraftHead:
    """Load an official EAGLE-1/2 or EAGLE-3 head for ``target`` (format detected from the keys).

    ``path``: directory (or hub id) with config.json + model.safetensors or pytorch_model.bin.
    ``device`` must be the target's (the default). ``dtype``: the head's floating dtype, the target's by
    default. Another one is allowed because the head only proposes tokens and the target verifies them,
    so the output does not change (acceptance may, slightly): a bfloat16 head for a float32 target
    drafts from half the bytes (on CPU with AMX tiles). The head then keeps its own copies of the
    target's embedding / lm_head in its dtype instead of sharing them, and takes the target's features
    converted to it (:meth:`DraftHead.target_features`). An EAGLE-1/2 head file's embedding (the
    target's, frozen in training) is checked against the target's and, when it holds the same values
    in the head's dtype, not loaded: the head reads the target's tensor.
    Raises ValueError when the head does not fit the target (hidden size, vocabulary, layer count) or
    keys are missing, unexpected or misshapen; TypeError for a dtype that is not a supported float.
    Returns the head in eval mode with gradients disabled.
    """
    dtype = resolve_dtype(dtype or target.dtype)
    device = _with_index(torch.device(device or target.device))
    if device != _with_index(target.device):
        raise ValueError(
            f"the head reads the target's features, so it must be on the target's device "
            f"({target.device}); got {device}"
        )
    directory = resolve_checkpoint(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"draft {directory}: no config.json (an EAGLE head holds config.json and weights)"
        )
    try:
        head = _load_head_files(directory, target, dtype, device)
    except (ValueError, TypeError) as exc:  # (the target loaded: say which head is wrong)
        if type(exc) not in (ValueError, TypeError) or str(directory) in str(exc):
            raise
        raise type(exc)(f"draft {directory}: {exc}") from exc
    head.checkpoint_dir = directory  # where eagle.api.load looks for the pair's acceptance.json
    return head


def _load_head_files(
    directory: Path, target: LlamaModel, dtype: torch.dtype, device: torch.device
) -> DraftHead:
    """:func:`load_draft`'s reading, checking and building of the head in ``directory``."""
    raw_config = read_json(directory / "config.json")
    cfg = draft_config_from_dict(raw_config)
    _check_dynamic_rope_fits(raw_config, target)  # (load_draft names the directory)
    state = _plain_head_keys(read_state_dict(directory))
    kind = detect_format(state)
    if kind == "eagle3":
        cfg = _with_draft_vocab_size(cfg, state)
    _check_fits_target(cfg, target, kind)
    check_head_dim_supported(cfg, f"draft {directory}/config.json")
    if kind == "eagle2" and _holds_target_embedding(state, target, dtype):
        state = {k: v for k, v in state.items() if k != "embed_tokens.weight"}  # the head shares the target's
    _check_weights(state, directory)
    if kind == "eagle3":
        _check_eagle3_variant(cfg)
        eagle3_feature_layers(cfg, target.config.num_layers)  # checked before the head is built
    if kind == "eagle2" and "embed_tokens.weight" in state:  # (its shape is checked below)
        _check_embedding_matches(state["embed_tokens.weight"], target, directory)
    if kind == "eagle2":
        check_keys(state, _eagle2_shapes(cfg), what="EAGLE-1/2 checkpoint", optional=["embed_tokens.weight"])
        state = state | fuse_layer_tensors(state, "layers.0.")
    else:
        state = _eagle3_state(state, cfg)
    # (the modules' random initialisation, overwritten below, must not move the caller's generator)
    with torch.random.fork_rng(devices=[]):
        head = _build_head(kind, cfg, target, owns_embedding="embed_tokens.weight" in state, dtype=dtype)
    head = _load_into(head, state, dtype, device).eval().requires_grad_(False)
    # CPU only; an EAGLE-1/2 head that shares the target's lm_head shares its packed copy too
    pack_module_linears(head, extra=[getattr(head, "lm_head_weight", None)])
    return head


def _build_head(
    kind: str, cfg: ModelConfig, target: LlamaModel, *, owns_embedding: bool, dtype: torch.dtype
) -> DraftHead:
    """The head's modules; the target's embedding (unless the checkpoint has its own) and, for
    EAGLE-1/2, its lm_head are shared, or copied into ``dtype`` when the head runs in another one."""

    def in_head_dtype(weight: torch.Tensor) -> torch.Tensor:
        return weight if weight.dtype == dtype else weight.detach().to(dtype)

    shared = None if owns_embedding else in_head_dtype(target.embed_tokens.weight)
    if kind == "eagle2":
        return Eagle2Head(cfg, in_head_dtype(target.lm_head_weight), embed_weight=shared)
    return Eagle3Head(cfg, target.config.num_layers, embed_weight=shared)


def _load_into(head: DraftHead, state: dict[str, torch.Tensor], dtype, device) -> DraftHead:
    dtype = resolve_dtype(dtype)
    state = {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
        for k, v in state.items()
    }
    head.to(device=device, dtype=dtype)
    head.load_state_dict(state, strict=True)
    if head.embed_tokens is not None:
        head.embed_tokens.requires_grad_(False)
    return head


def official_state_dict(head: DraftHead) -> dict[str, torch.Tensor]:
    """The head's tensors under the official key names (``midlayer.`` for EAGLE-3)."""
    state = dict(head.state_dict())
    prefix = "layers.0." if head.kind == "eagle2" else "midlayer."
    state |= split_layer_tensors(state, prefix, head.config)
    if head.kind == "eagle2" and "embed_tokens.weight" not in state:
        state["embed_tokens.weight"] = head.embed_weight  # the official EAGLE-1/2 layout always has it
    return state


def official_config(head: DraftHead) -> dict[str, Any]:
    """config.json contents readable by the reference EAGLE code, SGLang and vLLM."""
    cfg = head.config
    out = cfg.to_hf_dict() | {
        "model_type": "llama",
        "num_hidden_layers": 1,
        "torch_dtype": str(head.dtype).removeprefix("torch."),
    }
    if cfg.qkv_bias:
        out["qkv_bias"] = True
    if head.kind == "eagle2":
        out |= {"architectures": ["LlamaForCausalLM"], "bias": head.fc.bias is not None}
    else:
        out |= {
            "architectures": [EAGLE3_ARCHITECTURE],
            "draft_vocab_size": head.draft_vocab_size,
            # read back by load_draft and by vLLM (inputs of layers), and under eagle_config by
            # SGLang (outputs of layers: one less); the reference code takes the default layers
            "eagle_aux_hidden_state_layer_ids": list(head.feature_layers),
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in head.feature_layers]},
        }
    return out


def save_draft(head: DraftHead, directory: str | Path, *, also_bin: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (and ``pytorch_model.bin`` when ``also_bin``)
    in the official layout; :func:`load_draft` reads it back exactly."""
    directory = Path(directory)
    write_state_dict(directory, official_state_dict(head), also_bin=also_bin)
    (directory / "config.json").write_text(json.dumps(official_config(head), indent=2) + "\n")
    return directory


# --------------------------------------------------------------------------------------------------
# Fresh heads for training
# --------------------------------------------------------------------------------------------------
def random_draft(
    target: LlamaModel,
    kind: str = "eagle2",
    *,
    draft_vocab: torch.Tensor | None = None,
    bias: bool = True,
    seed: int = 0,
    init_std: float = 0.02,
) -> DraftHead:
    """A randomly initialised head shaped for ``target`` (its hidden size, heads, head_dim,
    intermediate size, RMSNorm eps and RoPE), in the target's dtype and on its device.

    ``kind``: ``"eagle2"`` (EAGLE-1/2; ``bias`` sets ``fc.bias``) or ``"eagle3"``. ``draft_vocab``:
    EAGLE-3 only, sorted distinct target ids forming the draft vocabulary (default: all of them).
    Linear weights ~ N(0, init_std), biases 0, norms 1 (the transformers initialisation); EAGLE-1/2
    gets a copy of the target's embedding, EAGLE-3 shares it. Returned in train mode with every
    weight except the embedding trainable.
    """
    if kind not in DRAFT_KINDS:
        raise ValueError(f"kind must be one of {DRAFT_KINDS}, got {kind!r}")
    t = target.config
    extra: dict[str, Any] = {"bias": bias} if kind == "eagle2" else {}
    vocab_map = None
    if kind == "eagle3":
        vocab_map = _vocab_map(draft_vocab, t.vocab_size)
        extra["draft_vocab_size"] = vocab_map[0].numel()
    # The reference EAGLE code's config takes only linear / dynamic RoPE scaling: heads of Llama-3.1
    # targets (Llama-3 scaling) carry none there, and so do the heads made here, or they would load
    # in no loader but this one's and SGLang's / vLLM's.
    scaling = t.rope_scaling if isinstance(t.rope_scaling, LinearRopeScaling) else None
    cfg = dataclasses.replace(
        t,
        family="llama",
        num_layers=1,
        rope_scaling=scaling,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        qk_norm=False,
        tie_word_embeddings=False,
        sliding_window=None,
        extra=extra,
    )
    generator = torch.Generator().manual_seed(seed)
    if kind == "eagle2":
        head: DraftHead = Eagle2Head(cfg, target.lm_head_weight)
        head.embed_tokens.weight.data.copy_(target.embed_tokens.weight.detach().cpu())
    else:
        head = Eagle3Head(cfg, t.num_layers, embed_weight=target.embed_tokens.weight)
        head.d2t.copy_(vocab_map[0])
        head.t2d.copy_(vocab_map[1])
    _init_weights(head, generator, init_std)
    head.to(device=target.device, dtype=target.dtype)
    return head.train()


def _vocab_map(draft_vocab: torch.Tensor | None, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if draft_vocab is None:
        used = torch.arange(vocab_size)
    else:
        used = torch.as_tensor(draft_vocab, dtype=torch.int64).cpu()
        if used.dim() != 1 or used.numel() == 0:
            raise ValueError("draft_vocab must be a non-empty 1-D list of target ids")
    d2t = used - torch.arange(used.numel())
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    if bool(((used < 0) | (used >= vocab_size)).any()):
        raise ValueError(f"draft_vocab holds ids outside [0, {vocab_size})")
    t2d[used] = True
    _check_vocab_map(d2t, t2d, vocab_size)
    return d2t, t2d


def _init_weights(head: DraftHead, generator: torch.Generator, std: float) -> None:
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
