"""Smoke test of the binary wheel: build it, install it into a fresh venv, call an op from there."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("EAGLE_SKIP_EXT") == "1", reason="pure-Python install requested")
def test_wheel_builds_installs_and_runs(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    import torch

    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    cuda = torch.version.cuda
    label = (
        f"cu{''.join(cuda.split('.')[:2])}torch{torch_mm}"
        if "+cu" in wheels[0].name
        else f"cputorch{torch_mm}"
    )
    assert f"+{label}-" in wheels[0].name, (wheels[0].name, label)

    # A fresh venv that borrows torch & co. from this interpreter but gets its own eagle_kernels.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    py = env_dir / "bin" / "python"
    inst = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheels[0])], capture_output=True, text=True
    )
    assert inst.returncode == 0, inst.stderr
    code = (
        "import torch, eagle_kernels, eagle\n"
        "assert eagle_kernels.__file__.startswith(%r), eagle_kernels.__file__\n"
        "info = eagle_kernels.backend_info()\n"
        "assert info['extension_loaded'], info\n"
        "kv = torch.arange(2 * 2 * 1 * 1 * 6 * 4, dtype=torch.float32).view(2, 2, 1, 1, 6, 4)\n"
        "want = kv[:, :, :, :, 3].clone()\n"
        "new = eagle_kernels.compact_kv_cache(kv, torch.tensor([1], dtype=torch.int32),\n"
        "    torch.tensor([[0, 2]]), torch.tensor([1]), num_draft_tokens=4)\n"
        "assert new.tolist() == [3] and torch.equal(kv[:, :, :, :, 2], want)\n"
        "print('wheel ok', info['cpu_backend'])\n"
    ) % str(env_dir)
    run = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "wheel ok" in run.stdout
