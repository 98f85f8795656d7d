"""bench/utils.py pieces that run without a GPU."""

import pytest

from bench import utils


def test_l2_flush_kind_reads_the_environment(monkeypatch):
    monkeypatch.delenv(utils.L2_FLUSH_ENV, raising=False)
    assert utils.l2_flush_kind() == "read"
    monkeypatch.setenv(utils.L2_FLUSH_ENV, "write")
    assert utils.l2_flush_kind() == "write"
    monkeypatch.setenv(utils.L2_FLUSH_ENV, "")
    assert utils.l2_flush_kind() == "read"
    monkeypatch.setenv(utils.L2_FLUSH_ENV, "evict")
    with pytest.raises(ValueError, match="EAGLE_BENCH_L2_FLUSH='evict': expected one of"):
        utils.l2_flush_kind()
