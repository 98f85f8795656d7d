"""bench/utils.py pieces that run without a GPU."""

from pathlib import Path

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


def test_machine_info_names_this_repositorys_commit_from_any_directory(tmp_path, monkeypatch):
    """git ran in the caller's directory: from elsewhere a result file recorded no commit, or another
    repository's. It also records the tracked files that differ from the commit, and torch's threads."""
    import subprocess

    import torch

    root = Path(utils.__file__).resolve().parents[1]
    want = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
    if want.returncode != 0:
        pytest.skip("not a git checkout (an unpacked sdist): no commit to compare with")
    monkeypatch.chdir(tmp_path)
    info = utils.machine_info()
    assert info["commit"] == want.stdout.strip() and info["commit"]
    assert isinstance(info["uncommitted_tracked_files"], list)
    assert all(
        not name.startswith(" ") and (root / name).exists() for name in info["uncommitted_tracked_files"]
    )
    assert info["torch_threads"] == torch.get_num_threads()


@pytest.mark.extension
def test_check_against_reference_runs_both_backends_and_fails_on_a_difference():
    import torch

    import eagle_kernels

    seen = []

    def call():  # what the op "returns" under the reference, then under the backend
        seen.append(eagle_kernels.select_backend("verify_tree_greedy", torch.device("cpu")))
        return outputs[len(seen) - 1]

    outputs = [
        (torch.tensor([1, 2]), torch.tensor([0.5])),
        (torch.tensor([1, 2]), torch.tensor([0.5 + 1e-7])),
    ]
    got = utils.check_against_reference(call, "cpp")
    assert torch.equal(got[0], torch.tensor([1, 2])) and seen == ["torch", "cpp"]
    for wrong in ((torch.tensor([1, 3]), torch.tensor([0.5])), (torch.tensor([1, 2]), torch.tensor([0.51]))):
        seen.clear()
        outputs = [(torch.tensor([1, 2]), torch.tensor([0.5])), wrong]
        with pytest.raises(AssertionError):
            utils.check_against_reference(call, "cpp")
    resets = []
    seen.clear()
    outputs = [torch.tensor([1]), torch.tensor([1])]
    utils.check_against_reference(call, "cpp", reset=lambda: resets.append(1))
    assert resets == [1, 1]
