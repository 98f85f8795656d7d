"""Smoke test of the binary wheel: build it, install it into a fresh venv, call an op from there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import eagle
import eagle_kernels

ROOT = Path(__file__).resolve().parents[1]


def _source_copy(tmp_path: Path) -> Path:
    """The checkout's tracked files (the sources an sdist or a fresh clone has) in tmp_path: a build
    there shares no build/ directory with this checkout's, which a concurrent test's build uses."""
    copy = tmp_path / "src"
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):  # an unpacked sdist (no .git), or no usable git
        outputs = ("build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o", "_build_info.py", ".git")
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(*outputs))
        return copy
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy


def _build(tmp_path: Path, kind: str, source: Path = ROOT, **env: str) -> Path:
    """``python -m build --<kind> --no-isolation`` of ``source`` into tmp_path; the one artefact."""
    dist = tmp_path / f"dist-{kind}"
    res = subprocess.run(
        [sys.executable, "-m", "build", f"--{kind}", "--no-isolation", "--outdir", str(dist)],
        cwd=source,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    found = list(dist.iterdir())
    assert len(found) == 1, found
    return found[0]


def _metadata(wheel: Path, field: str) -> list[str]:
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    lines = zipfile.ZipFile(wheel).read(meta).decode().splitlines()
    return [line.split(": ", 1)[1] for line in lines if line.startswith(field + ": ")]


def test_both_packages_say_the_distributions_version():
    """setup.py reads the version from eagle_kernels/__init__.py; eagle/__init__.py repeats it (reading it
    from eagle_kernels would import torch on `import eagle`)."""
    assert eagle.__version__ == eagle_kernels.__version__
    out = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "EAGLE_SKIP_EXT": "1", "EAGLE_LOCAL_VERSION": ""}, check=True,
    ).stdout.split()  # fmt: skip
    assert out[-1] == eagle_kernels.__version__, out


def test_sdist_holds_every_source_and_no_build_output(tmp_path):
    """The sdist builds the extension elsewhere: headers and CUDA sources too, the tests; never this
    checkout's compiled library, its build info or a local version label."""
    source = _source_copy(tmp_path)
    (source / "eagle_kernels" / "_build_info.py").write_text("TORCH_VERSION = '0.0'\n")  # a local build's
    (source / "eagle_kernels" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    sdist = _build(tmp_path, "sdist", source)
    assert sdist.name == f"eagle_kernels-{eagle_kernels.__version__}.tar.gz", sdist.name
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in (
        "csrc/cpu/amx_linear.h",
        "csrc/cpu/tree_attention_kernel.h",
        "csrc/cuda/build_tree.cu",
        "csrc/cuda/build_tree.cuh",
        "tests/conftest.py",
        "tests/kernels/helpers.py",
        "bench/utils.py",
        "eagle/assets/tiny-code/draft/config.json",
        "Makefile",
    ):
        assert need in names, need
    assert "eagle_kernels/_build_info.py" not in names
    assert not [n for n in names if n.endswith((".so", ".o")) or n.startswith("bench/results")]


def test_a_pure_python_wheel_carries_no_build_info(tmp_path):
    """EAGLE_SKIP_EXT=1 in a checkout whose extension was built (its _build_info.py is in the tree): the
    wheel must not say an extension was built, or every import would warn that it cannot load."""
    source = _source_copy(tmp_path)
    stale = "TORCH_VERSION = '2.13.0+cpu'\nCUDA_VERSION = None\nWITH_CUDA = False\n"
    (source / "eagle_kernels" / "_build_info.py").write_text(stale)  # left by an extension build
    (source / "build" / "lib" / "eagle_kernels").mkdir(parents=True)
    (source / "build" / "lib" / "eagle_kernels" / "_build_info.py").write_text(
        stale
    )  # and its build/lib copy
    wheel = _build(tmp_path, "wheel", source, EAGLE_SKIP_EXT="1")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "eagle_kernels/_build_info.py" not in names
    assert not [n for n in names if "_C" in n and n.endswith(".so")]
    assert "torch>=2.5" in _metadata(wheel, "Requires-Dist")


@pytest.mark.skipif(os.environ.get("EAGLE_SKIP_EXT") == "1", reason="pure-Python install requested")
def test_wheel_builds_installs_and_runs(tmp_path):
    wheels = [_build(tmp_path, "wheel")]
    import torch

    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    info = zipfile.ZipFile(wheels[0]).read("eagle_kernels/_build_info.py").decode()
    build = {}
    exec(info, build)  # the wheel's record of what it was built with (CUDA: the compiling nvcc's version)
    label = (
        f"cu{''.join(build['CUDA_VERSION'].split('.')[:2])}torch{torch_mm}"
        if build["WITH_CUDA"]
        else f"cputorch{torch_mm}"
    )
    assert f"+{label}-" in wheels[0].name, (wheels[0].name, label)
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert any(n.startswith("eagle_kernels/_C") and n.endswith(".so") for n in names), names
    assert {"eagle_kernels/_build_info.py", "eagle/py.typed", "eagle_kernels/py.typed"} <= set(names)
    # the extension loads only under the torch minor it was built against: the wheel pins it
    major, minor = (int(x) for x in torch_mm.split("."))
    (pin,) = [Requirement(r) for r in _metadata(wheels[0], "Requires-Dist") if Requirement(r).name == "torch"]
    base = torch.__version__.split("+")[0]
    assert pin.specifier.contains(base, prereleases=True), pin
    assert pin.specifier.contains(f"{major}.{minor}.0a0+nv", prereleases=True), pin  # NGC containers
    assert pin.specifier.contains(f"{major}.{minor}.0.dev20261120+cu128", prereleases=True), pin  # nightlies
    assert not pin.specifier.contains(f"{major}.{minor + 1}.0", prereleases=True), pin
    assert not pin.specifier.contains(f"{major}.{minor - 1}.9", prereleases=True), pin

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
        "import eagle_kernels._C as ext\n"  # the wheel's own library, not one found elsewhere
        "assert ext.__file__.startswith(%r), ext.__file__\n"
        "info = eagle_kernels.backend_info()\n"
        "assert info['extension_loaded'], info\n"
        "kv = torch.arange(2 * 2 * 1 * 1 * 6 * 4, dtype=torch.float32).view(2, 2, 1, 1, 6, 4)\n"
        "want = kv[:, :, :, :, 3].clone()\n"
        "new = eagle_kernels.compact_kv_cache(kv, torch.tensor([1], dtype=torch.int32),\n"
        "    torch.tensor([[0, 2]]), torch.tensor([1]), num_draft_tokens=4)\n"
        "assert new.tolist() == [3] and torch.equal(kv[:, :, :, :, 2], want)\n"
        "print('wheel ok', info['cpu_backend'])\n"
    ) % (str(env_dir), str(env_dir))
    run = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "wheel ok" in run.stdout
