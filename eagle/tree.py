"""Draft-tree shapes and the EAGLE-2 dynamic expansion, as batched tensor operations.

Vocabulary: a tree has ``total_tokens`` slots; slot 0 is the root (the last emitted token, not yet in
the target's cache) and the other ``total_tokens - 1`` are draft tokens. ``depth`` is the number of
draft levels below the root, i.e. the most draft tokens one round can accept (SGLang's
``speculative_num_steps``). ``topk`` is both the number of children drawn per expanded node and the
number of nodes expanded per level (EAGLE-2's K).

EAGLE-2 expansion (DESIGN §5), per sequence:

* level 1: the root's top-``topk`` draft tokens, scored by their log-probability;
* level i > 1: each of the ``topk`` frontier nodes gets its top-``topk`` children, scored by cumulative
  log-probability; the best ``topk`` of the ``topk**2`` children form the next frontier; all children
  are rerank candidates;
* rerank: the best ``total_tokens - 1`` candidates by score, in level order, always a connected tree.

The candidates are kept in SGLang's numbering so that ``eagle_kernels.build_tree`` turns them into
the tree arrays: the flat score list holds the ``topk`` level-1 candidates, then ``topk**2`` per later
level; ``parent_list`` maps ``candidate_index // topk`` to the flat index of that candidate's parent
(-1 for the root).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eagle._args import as_number
from eagle_kernels.build_tree import MAX_DRAFT_TOKENS


@dataclass(frozen=True)
class TreeConfig:
    """Size of the draft tree of one round.

    depth: draft levels below the root (most drafts one round can accept).
    topk: children per expanded node, and nodes expanded per level.
    total_tokens: tree slots including the root (tokens the target verifies per round).
    """

    depth: int = 6
    topk: int = 10
    total_tokens: int = 60

    def __post_init__(self) -> None:
        for name in ("depth", "topk", "total_tokens"):
            object.__setattr__(
                self, name, as_number(f"TreeConfig: {name}", getattr(self, name), integral=True)
            )
        if self.depth < 1 or self.topk < 1:
            raise ValueError(
                f"TreeConfig: depth and topk must be >= 1, got depth={self.depth}, topk={self.topk}"
            )
        most = 1 + self.topk + (self.depth - 1) * self.topk**2
        if not 2 <= self.total_tokens <= most:
            raise ValueError(
                f"TreeConfig: total_tokens={self.total_tokens} must be in [2, {most}] for depth={self.depth}, "
                f"topk={self.topk} (root + at most topk + (depth-1)*topk^2 candidates)"
            )
        if self.total_tokens > MAX_DRAFT_TOKENS:
            raise ValueError(
                f"TreeConfig: total_tokens={self.total_tokens} exceeds the {MAX_DRAFT_TOKENS} tree slots the "
                "kernels support (eagle_kernels.build_tree.MAX_DRAFT_TOKENS)"
            )
        if self.topk == 1 and self.total_tokens != self.depth + 1:
            raise ValueError(
                f"TreeConfig: a chain (topk=1) of depth {self.depth} has total_tokens={self.depth + 1} "
                f"(depth + 1), got {self.total_tokens}"
            )

    @classmethod
    def chain(cls, depth: int) -> TreeConfig:
        return cls(depth=depth, topk=1, total_tokens=depth + 1)

    @classmethod
    def parse(cls, spec: str) -> TreeConfig:
        """``"depth/topk/total_tokens"`` (e.g. ``"6/10/60"``, EAGLE-2's defaults) as a TreeConfig."""
        parts = spec.split("/")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"a tree spec is depth/topk/total_tokens, e.g. 6/10/60; got {spec!r}")
        depth, topk, total = (int(p) for p in parts)
        return cls(depth=depth, topk=topk, total_tokens=total)

    @property
    def num_candidates(self) -> int:
        """Size of the flat candidate list: topk + (depth - 1) * topk**2."""
        return self.topk + (self.depth - 1) * self.topk**2


@dataclass
class Frontier:
    """State of the dynamic expansion after a level (all tensors on the draft's device)."""

    tokens: torch.Tensor  # [B, k] draft tokens of the frontier nodes (the next draft inputs)
    scores: torch.Tensor  # [B, k] cumulative log-probabilities
    parent_rows: torch.Tensor  # [B, k] which row of the previous draft output each node continues (0..k-1)
    flat_index: torch.Tensor  # [B, k] index of each node in the flat candidate list


def expand_root(
    logprobs: torch.Tensor, topk: int
) -> tuple[Frontier, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Level 1 from the root's draft log-probabilities ``[B, V]``.

    Returns the frontier and this level's (scores ``[B, k]``, tokens ``[B, k]``, parents ``[B, k+1]``)
    to append to the candidate lists; the parents entry is SGLang's ``arange(-1, k)``.
    """
    B = logprobs.shape[0]
    scores, tokens = torch.topk(logprobs, topk, dim=-1)
    index = torch.arange(topk, device=logprobs.device).expand(B, topk)
    parents = torch.arange(-1, topk, device=logprobs.device).expand(B, topk + 1)
    frontier = Frontier(tokens=tokens, scores=scores, parent_rows=torch.zeros_like(index), flat_index=index)
    return frontier, scores, tokens, parents


def expand_level(
    frontier: Frontier, logprobs: torch.Tensor, level: int, topk: int
) -> tuple[Frontier, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Level ``level`` (>= 2) from the frontier's draft log-probabilities ``[B, k, V]``.

    Returns the new frontier and this level's (scores ``[B, k*k]``, tokens ``[B, k*k]``, parents
    ``[B, k]``) for the candidate lists; parents are the flat indices of the new frontier nodes, which
    become parents of the next level's candidates.
    """
    B, k, _ = logprobs.shape
    child_lp, child_tok = torch.topk(logprobs, topk, dim=-1)  # [B, k, k]
    cum = frontier.scores[:, :, None] + child_lp
    flat_scores, flat_tokens = cum.reshape(B, k * topk), child_tok.reshape(B, k * topk)
    best_scores, best = torch.topk(flat_scores, topk, dim=-1)  # [B, k] into the k*k children
    level_offset = topk + (level - 2) * topk * topk
    new = Frontier(
        tokens=flat_tokens.gather(1, best),
        scores=best_scores,
        parent_rows=torch.div(best, topk, rounding_mode="floor"),
        flat_index=best + level_offset,
    )
    return new, flat_scores, flat_tokens, new.flat_index


def select_candidates(
    score_list: list[torch.Tensor],
    token_list: list[torch.Tensor],
    parents_list: list[torch.Tensor],
    num_keep: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global rerank: the best ``num_keep`` candidates, in flat (level) order.

    Returns ``selected_index [B, num_keep]`` (sorted ascending), their ``tokens [B, num_keep]`` and
    ``parent_list [B, topk*(depth-1)+1]`` (the last level's parents are not needed: nothing hangs below it).
    """
    scores = torch.cat(score_list, dim=1)
    tokens = torch.cat(token_list, dim=1)
    # Ties go to the lower flat index (an ancestor): a child scores <= its parent, so with this rule a
    # selected child's parent is always selected too (plain topk may break a tie the other way).
    order = torch.sort(-scores, dim=-1, stable=True).indices
    selected = torch.sort(order[:, :num_keep], dim=-1).values
    # Level 1 contributes k+1 entries and each later level k; the deepest level's nodes have no children.
    topk = token_list[0].shape[1]
    parent_list = torch.cat(parents_list, dim=1)[:, : topk * (len(parents_list) - 1) + 1]
    return selected, tokens.gather(1, selected), parent_list
