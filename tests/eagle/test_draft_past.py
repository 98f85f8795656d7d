"""A tree block grown level by level (``past``) equals one forward over the whole block."""

from __future__ import annotations

import torch

from eagle.models import load_target, random_draft


def test_block_continued_with_past_equals_whole_block(tiny_checkpoints):
    target = load_target(str(tiny_checkpoints.target), dtype=torch.float64)
    head = random_draft(target)
    B, P, T1, T2, H = 2, 5, 3, 4, target.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    prefix_h = torch.randn(B, P, H, generator=gen, dtype=torch.float64)
    prefix_t = torch.randint(0, target.config.vocab_size, (B, P), generator=gen)
    hidden = torch.randn(B, T1 + T2, H, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, target.config.vocab_size, (B, T1 + T2), generator=gen)
    mask = torch.rand(B, T1 + T2, T1 + T2, generator=gen) < 0.5
    mask = (mask.tril() | torch.eye(T1 + T2, dtype=torch.bool)).contiguous()
    positions = torch.tensor([[7, 7, 8, 8, 9, 9, 10]] * B)

    def run(split: bool):
        cache = head.new_cache(B, 32)
        head(prefix_h, prefix_t, cache)
        cache.advance(P)
        if not split:
            out = head(hidden, tokens, cache, positions=positions, tree_mask=mask)
            return out.hidden[:, T1:], out.logits[:, T1:], cache.kv.clone()
        head(hidden[:, :T1], tokens[:, :T1], cache, positions=positions[:, :T1], tree_mask=mask[:, :T1, :T1])
        out = head(
            hidden[:, T1:],
            tokens[:, T1:],
            cache,
            positions=positions[:, T1:],
            tree_mask=mask[:, T1:],
            past=T1,
        )
        return out.hidden, out.logits, cache.kv.clone()

    whole, split = run(False), run(True)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
