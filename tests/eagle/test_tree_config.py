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


@pytest.mark.parametrize("spec", ["0/10/60", "6/10/1", "2/2/99", "4/1/9"])
def test_parse_applies_the_size_checks(spec):
    with pytest.raises(ValueError, match="TreeConfig"):
        TreeConfig.parse(spec)
