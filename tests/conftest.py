"""Shared test configuration.

* With no GPU, ``TRITON_INTERPRET=1`` is set before anything imports triton, so every Triton kernel
  runs on CPU tensors through the interpreter.
* ``device`` fixture: ``--device`` option, default cuda when available, else cpu.
* ``gpu`` marker: such tests are skipped, with a reason, when no CUDA device is present.
* ``extension`` marker: the test needs the C++ extension; skipped, with a reason, only in a
  pure-Python install asked for with ``EAGLE_SKIP_EXT=1`` (elsewhere a missing extension fails it).
"""

from __future__ import annotations

import os
import shutil


def _has_gpu() -> bool:
    # Decide without initialising CUDA in this process: nvidia-smi present and a device visible.
    # EAGLE_TEST_GPU=1/0 overrides (a VM may expose the GPU under another device node).
    forced = os.environ.get("EAGLE_TEST_GPU", "").lower()
    if forced in ("0", "1"):
        return forced == "1"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return shutil.which("nvidia-smi") is not None and os.path.exists("/dev/nvidia0")


# The dynamic tree's probe timings are not read from or written to the user's cache: a test that times
# the models times them, and leaves nothing behind (tests of the cache set their own path).
os.environ["EAGLE_AUTOTREE_CACHE"] = "0"

HAS_GPU = _has_gpu()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Test tensors are small: one intra-op thread is as fast, and immune to the OpenMP barrier stalls that
# make a 2-thread GEMM take milliseconds when the machine is loaded. EAGLE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("EAGLE_TEST_THREADS", "1")))


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default=None,
        choices=("cpu", "cuda"),
        help="device for kernel tests (default: cuda when a GPU is present, else cpu)",
    )


def pytest_collection_modifyitems(config, items):
    pure_python = os.environ.get("EAGLE_SKIP_EXT") == "1"
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    no_ext = pytest.mark.skip(reason="needs the C++ extension; EAGLE_SKIP_EXT=1 (a pure-Python install)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(no_gpu)
        if "extension" in item.keywords and pure_python:
            item.add_marker(no_ext)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device") or ("cuda" if HAS_GPU else "cpu")
    if name == "cuda" and not HAS_GPU:
        pytest.skip("--device cuda requested but no CUDA GPU is present")
    return torch.device(name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
