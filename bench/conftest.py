"""pytest-benchmark configuration for the per-op microbenchmarks.

Run ``pytest bench/ --benchmark-only`` for timings, or ``pytest bench/ --benchmark-disable`` to run
every benchmark once as a smoke test (CI does this). On CPU the C++ kernels are timed against the
PyTorch reference; Triton kernels are timed only on CUDA (the CPU interpreter is not a benchmark).
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
