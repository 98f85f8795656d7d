from __future__ import annotations

import pytest
import torch

from eagle import autotree
from eagle.models import load_target
from eagle.tree import TreeConfig


@pytest.mark.parametrize("width", [8, 12, 16, 24, 32, 48, 64])
def test_tree_for_width_is_valid_and_verifies_width_tokens(width):
    tree = autotree.tree_for_width(width)
    assert isinstance(tree, TreeConfig) and tree.total_tokens == width and 2 <= tree.topk <= 10


def test_choice_minimises_cost_per_expected_token(monkeypatch):
    # Linear cost (a CPU): the cheapest per expected token under the gain model is a small tree.
    monkeypatch.setattr(autotree, "_time_verify", lambda t, b, w, repeats=3: 1.0 + 0.2 * w)
    monkeypatch.setattr(autotree, "_CACHE", {})
    target = type("T", (), {"device": torch.device("cpu")})()
    small = autotree.choose_tree(target, 1)
    # Flat cost (a GPU below saturation): the biggest tree wins.
    monkeypatch.setattr(autotree, "_time_verify", lambda t, b, w, repeats=3: 1.0)
    big = autotree.choose_tree(target, 2)
    assert small.total_tokens < big.total_tokens == max(autotree.WIDTHS["cpu"])


def test_choice_is_cached_per_model_and_batch(tiny_checkpoints, monkeypatch):
    target = load_target(str(tiny_checkpoints.target), dtype=torch.float32)
    monkeypatch.setattr(autotree, "_CACHE", {})
    calls = []
    real = autotree._time_verify
    monkeypatch.setattr(autotree, "_time_verify", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    first = autotree.choose_tree(target, 1)
    n = len(calls)
    assert autotree.choose_tree(target, 1) == first and len(calls) == n
    autotree.choose_tree(target, 3)
    assert len(calls) == 2 * n
