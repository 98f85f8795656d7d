"""Model runtime: Llama-family targets on an in-place KV cache, and EAGLE-1/2/3 draft heads.

Entry points::

    from eagle.models import load_target, load_draft, random_draft, save_draft, generate_plain

    target = load_target("path/or/hub-id", dtype=torch.float32, device="cpu")   # LlamaModel
    head = load_draft("eagle-head-dir", target)        # Eagle2Head or Eagle3Head (detected)
    head = random_draft(target, kind="eagle3")         # fresh head for training
    save_draft(head, "out-dir")                        # official layout (config.json + model.safetensors)

    cache = target.new_cache(batch_size, max_seq_len)  # KVCache: kv [L, 2, B, Hkv, S_max, D], seqlens [B]
    out = target(input_ids, cache, positions=None, tree_mask=None,
                 logits_index=None, feature_layers=head.feature_layers)
    cache.advance(n)                                   # forwards never advance seqlens themselves
    out.hidden, out.logits, out.layer_hidden           # features, logits, EAGLE-3 layer inputs

    draft_cache = head.new_cache(batch_size, max_seq_len)
    d = head(head.target_features(out), next_tokens, draft_cache, positions=..., tree_mask=...)
    d.hidden, d.logits, head.to_target_ids(draft_ids)

    generate_plain(target, prompts, max_new_tokens, temperature=0.0)   # the vanilla baseline

Forwards take a block ``[B, T]`` (prefill, one decode token, or a draft tree with its mask) and write
the block's K/V at ``cache.seqlens[b] + i``; see :class:`KVCache` for the commit protocol and the
overflow check.
"""

from __future__ import annotations

from eagle.models.config import LinearRopeScaling, Llama3RopeScaling, ModelConfig
from eagle.models.draft import (
    DraftHead,
    DraftOutput,
    Eagle2Head,
    Eagle3Head,
    load_draft,
    random_draft,
    save_draft,
)
from eagle.models.generate_plain import generate_plain
from eagle.models.kv_cache import KVCache
from eagle.models.llama import LlamaModel, ModelOutput, load_target

__all__ = [
    "DraftHead",
    "DraftOutput",
    "Eagle2Head",
    "Eagle3Head",
    "KVCache",
    "LinearRopeScaling",
    "Llama3RopeScaling",
    "LlamaModel",
    "ModelConfig",
    "ModelOutput",
    "generate_plain",
    "load_draft",
    "load_target",
    "random_draft",
    "save_draft",
]
