from __future__ import annotations

import json

from eagle.cli import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kernels"]["extension_loaded"] in (True, False)
    assert "compact_kv_cache" in info["kernels"]["cpu_backend"]


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().out
