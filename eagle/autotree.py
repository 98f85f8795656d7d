"""Pick the dynamic tree's size for this model, device and batch size from measured forward times.

A bigger tree raises tau (tokens per target forward) with diminishing returns, while its verify
forward costs more: little on a GPU (flat until the device saturates), roughly linearly on a CPU.
EAGLE's reference code times target forwards of a few widths and divides each time by a fixed gain
(1, 1.05, 1.07, 1.1, 1.13 for 40..60 tokens). We do the same over a wider range with a logarithmic
gain model, ``gain(W) = 1 + GAIN_PER_DOUBLING * log2(W / W_min)``, and pick the width ``W`` that
minimises ``(t_verify(W) + t_draft) / gain(W)``. The result is cached per (model, device, batch).
"""

from __future__ import annotations

import math
import time

import torch

from eagle.tree import TreeConfig

WIDTHS = {"cpu": (8, 12, 16, 24, 32, 48), "cuda": (16, 24, 32, 48, 64)}
GAIN_PER_DOUBLING = 0.22  # EAGLE-2's tau grows ~0.2-0.3 x per doubling of the tree in its ablations
PREFIX = 128
_CACHE: dict[tuple, TreeConfig] = {}


def tree_for_width(width: int) -> TreeConfig:
    """A dynamic tree verifying ``width`` tokens: depth 6, expansion width about width / 4 (2..10)."""
    topk = max(2, min(10, width // 4))
    depth = 6
    most = 1 + topk + (depth - 1) * topk * topk
    return TreeConfig(depth=depth, topk=topk, total_tokens=min(width, most))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _time_verify(target, batch_size: int, width: int, repeats: int = 3) -> float:
    device = target.device
    cache = target.new_cache(batch_size, PREFIX + width + 1)
    cache.advance(PREFIX)
    ids = torch.zeros(batch_size, width, dtype=torch.int64, device=device)
    mask = torch.ones(width, width, dtype=torch.bool, device=device).tril().expand(batch_size, width, width)
    positions = cache.seqlens.long()[:, None] + torch.arange(width, device=device)
    target(ids, cache, positions=positions, tree_mask=mask, compute_logits=True)  # warm-up
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        target(ids, cache, positions=positions, tree_mask=mask, compute_logits=True)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def choose_tree(target, batch_size: int, draft_cost_fraction: float = 0.6) -> TreeConfig:
    """The dynamic tree for ``target`` at ``batch_size``, from timed verify forwards (cached).

    ``draft_cost_fraction``: the drafting time per round relative to a one-token target forward
    (six one-layer draft levels and their lm_head over the vocabulary), added to every width.
    """
    device = target.device
    key = (id(target), str(device), batch_size)
    if key not in _CACHE:
        widths = WIDTHS.get(device.type, WIDTHS["cuda"])
        times = {w: _time_verify(target, batch_size, w) for w in widths}
        draft = draft_cost_fraction * _time_verify(target, batch_size, 1)
        w_min = widths[0]

        def cost_per_token(w: int) -> float:
            return (times[w] + draft) / (1 + GAIN_PER_DOUBLING * math.log2(w / w_min))

        _CACHE[key] = tree_for_width(min(widths, key=cost_per_token))
    return _CACHE[key]
