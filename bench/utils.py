"""Shared helpers for benchmarks: synchronised timing targets, roofline figures, result metadata."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Peak HBM bandwidth (bytes/s) of cards we report on; used for roofline times.
HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def synchronized(fn: Callable, device: torch.device) -> Callable:
    """Wrap ``fn`` so that a pytest-benchmark timing includes the GPU work it launched."""
    if device.type != "cuda":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return out

    return run


def roofline_seconds(bytes_moved: float, device: torch.device) -> float | None:
    """Time to move ``bytes_moved`` at the card's peak HBM bandwidth (None when unknown / CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bw in HBM_BANDWIDTH.items():
        if key in name:
            return bytes_moved / bw
    return None


def record_bandwidth(benchmark, bytes_moved: float, device: torch.device) -> None:
    """Put achieved GB/s and the roofline time into the benchmark's extra_info (printed in JSON)."""
    benchmark.extra_info["bytes_moved"] = bytes_moved
    roof = roofline_seconds(bytes_moved, device)
    if roof is not None:
        benchmark.extra_info["roofline_us"] = roof * 1e6
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        mean = stats.stats.mean
        benchmark.extra_info["GB/s"] = bytes_moved / mean / 1e9
        if roof is not None:
            benchmark.extra_info["fraction_of_roofline"] = roof / mean


def machine_info() -> dict:
    """Machine, versions and commit, stored with every result file."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = None
    info = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def save_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2))
    return path
