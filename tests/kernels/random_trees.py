"""Random draft trees in SGLang's layout, for fuzzing the tree ops.

A tree of ``n`` slots has slot 0 as the root; every other slot ``i`` has a parent ``< i`` (the
level order EAGLE-2 trees have), and siblings are ordered by slot. From the parent array follow the
``retrive_*`` arrays, depths and the ancestor mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Trees:
    parents: torch.Tensor  # [B, n] int64, -1 for the root
    depth: torch.Tensor  # [B, n] int64, 0 for the root
    retrive_index: torch.Tensor  # [B, n]
    retrive_next_token: torch.Tensor  # [B, n], first child slot or -1
    retrive_next_sibling: torch.Tensor  # [B, n], next sibling slot or -1
    mask: torch.Tensor  # [B, n, n] bool, [b, i, j] true when j is i or an ancestor of i

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())


def random_parents(n: int, max_depth: int, gen: torch.Generator) -> list[int]:
    """Parent of each slot (root: -1), each parent earlier than its child, depth <= max_depth."""
    parents, depth = [-1], [0]
    for _ in range(1, n):
        allowed = [p for p in range(len(parents)) if depth[p] < max_depth]
        p = allowed[int(torch.randint(0, len(allowed), (1,), generator=gen))]
        parents.append(p)
        depth.append(depth[p] + 1)
    return parents


def trees_from_parents(parent_lists: list[list[int]], index_dtype=torch.int64) -> Trees:
    B, n = len(parent_lists), len(parent_lists[0])
    parents = torch.tensor(parent_lists, dtype=torch.int64)
    depth = torch.zeros(B, n, dtype=torch.int64)
    next_token = torch.full((B, n), -1, dtype=torch.int64)
    next_sibling = torch.full((B, n), -1, dtype=torch.int64)
    mask = torch.zeros(B, n, n, dtype=torch.bool)
    for b, plist in enumerate(parent_lists):
        last_child: dict[int, int] = {}
        for i in range(n):
            mask[b, i, i] = True
            p = plist[i]
            if p < 0:
                continue
            depth[b, i] = depth[b, p] + 1
            mask[b, i] |= mask[b, p]
            if p in last_child:
                next_sibling[b, last_child[p]] = i
            else:
                next_token[b, p] = i
            last_child[p] = i
    retrive_index = torch.arange(B * n, dtype=torch.int64).view(B, n)
    return Trees(
        parents=parents,
        depth=depth,
        retrive_index=retrive_index.to(index_dtype),
        retrive_next_token=next_token.to(index_dtype),
        retrive_next_sibling=next_sibling.to(index_dtype),
        mask=mask,
    )


def random_trees(B: int, n: int, max_depth: int, seed: int, index_dtype=torch.int64) -> Trees:
    gen = torch.Generator().manual_seed(seed)
    return trees_from_parents([random_parents(n, max_depth, gen) for _ in range(B)], index_dtype)
