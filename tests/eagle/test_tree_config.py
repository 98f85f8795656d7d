"""eagle.TreeConfig: its size checks, and the ``depth/topk/total_tokens`` spec the benchmarks take."""

from __future__ import annotations

import pytest

from eagle import TreeConfig


def test_parse_reads_depth_topk_total():
    assert TreeConfig.parse("6/10/60") == TreeConfig(depth=6, topk=10, total_tokens=60)
    assert TreeConfig.parse(" 4/1/5 ") == TreeConfig.chain(4)


@pytest.mark.parametrize("spec", ["6/10", "6/10/60/1", "a/b/c", "6/-1/60", "", "6.0/10/60"])
def test_parse_rejects_malformed_specs(spec):
    with pytest.raises(ValueError, match="depth/topk/total_tokens"):
        TreeConfig.parse(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0/10/60", "depth and topk must be >= 1"),
        ("6/10/1", r"total_tokens=1 must be in \[2, "),
        ("2/2/99", r"total_tokens=99 must be in \[2, 7\]"),
        (
            "4/1/3",
            r"a chain \(topk=1\) of depth 4 has total_tokens=5 \(depth \+ 1\), got 3",
        ),  # within range, not a chain
    ],
)
def test_parse_applies_the_size_checks(spec, message):
    with pytest.raises(ValueError, match=message):
        TreeConfig.parse(spec)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((3, 2, "6"), TypeError, "total_tokens must be an integer"),
        ((2.5, 1, 3), TypeError, "depth must be an integer"),
        ((True, 1, 2), TypeError, "depth must be an integer"),
        ((2, 2048, 2049), ValueError, "exceeds the 1024 tree slots"),
    ],
)
def test_sizes_must_be_integers_within_the_kernels_limit(args, error, message):
    with pytest.raises(error, match=message):
        TreeConfig(*args)


def test_numpy_integers_become_ints():
    import numpy as np

    tree = TreeConfig(np.int64(3), np.int32(2), 6)
    assert tree == TreeConfig(3, 2, 6) and type(tree.depth) is int and type(tree.topk) is int
