"""warp_logits: C++ (CPU) / Triton (CUDA) vs the PyTorch (sort-based) reference.

pytest bench/bench_warp_logits.py --benchmark-only --benchmark-group-by=param:shape,param:params

R rows of V logits (R = B * n: the B=16, n=64 tree verification of the >= 10x target is R=1024).
Parameter sets, the same for every row:
  typical  temperature 0.7, top_k 50, top_p 0.9, min_p 0.05
  top_p    temperature 0.8, top_k 0 (off), top_p 0.95, min_p 0 (off): no top-k pre-filter, so the
           top-p cut has to be found over the whole vocabulary
Logits are N(0, 3^2): a flatter distribution than a trained LM's, which makes top-p keep many tokens.
GB/s and roofline fractions count one read of the logits and one write of the probabilities, for
the eager time and, on CUDA, the kernel-only time (``kernel_us``: CUDA-graph replays, ``bench/utils.py``).
"""

from __future__ import annotations

import pytest
import torch

import eagle_kernels
from bench.utils import record_bandwidth, record_kernel_time, synchronized
from eagle_kernels._backend import available_backends

OP = "warp_logits"
SHAPES = {f"R{R}-V{V}": (R, V) for V in (32000, 128256) for R in (1, 64, 1024)}
PARAMS = {"typical": (0.7, 50, 0.9, 0.05), "top_p": (0.8, 0, 0.95, 0.0)}


def backends(device: torch.device) -> list[str]:
    return [b for b in available_backends(OP, device) if not (b == "triton" and device.type == "cpu")]


@pytest.mark.parametrize("params", list(PARAMS))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_warp_logits(benchmark, bench_device, shape, params, backend):
    # (no reference check here, unlike the other ops' benchmarks: on random logits a top-p cut can
    # fall within rounding of a token, where backends may keep it or not; tests/kernels/test_warp_logits.py
    # checks every backend on cases kept clear of such cuts)
    if backend not in backends(bench_device):
        pytest.skip(f"{backend} not available on {bench_device.type}")
    R, V = SHAPES[shape]
    if bench_device.type == "cpu" and backend == "torch" and R * V > 1024 * 32000:
        pytest.skip("the sort-based reference on this many CPU elements takes too long to be useful")
    if bench_device.type == "cpu" and params == "top_p" and shape != "R1024-V32000":
        pytest.skip("CPU: the top-p-only set is measured at the headline shape only")
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(R, V, generator=gen) * 3).to(bench_device)
    temperature, top_k, top_p, min_p = PARAMS[params]
    call = lambda: eagle_kernels.warp_logits(logits, temperature, top_k, top_p, min_p)  # noqa: E731
    fn = synchronized(call, bench_device)
    moved = 2 * R * V * 4  # read logits, write probabilities once
    with eagle_kernels.use_backend(backend):
        if bench_device.type == "cpu" and R * V >= 64 * 32000:
            benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
        else:
            benchmark(fn)
        record_bandwidth(benchmark, moved, bench_device)
        record_kernel_time(benchmark, call, moved, bench_device)
