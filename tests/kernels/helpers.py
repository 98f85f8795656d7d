"""Helpers shared by kernel tests: backend parametrisation and tolerances (DESIGN §6)."""

from __future__ import annotations

import pytest
import torch

import eagle_kernels
from eagle_kernels._backend import available_backends

# float32 within 1e-5 relative; low precision judged against PyTorch's own error (see assert_close_lowp).
FP32_RTOL = 1e-5


def backends_for(op: str, device: torch.device, *, exclude: tuple[str, ...] = ()) -> list[str]:
    """Backends (other than the reference) that can run ``op`` on ``device`` in this process."""
    return [b for b in available_backends(op, device) if b != "torch" and b not in exclude]


def run_with_backend(backend: str, fn, *args, **kwargs):
    with eagle_kernels.use_backend(backend):
        return fn(*args, **kwargs)


def assert_close_lowp(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, factor: float = 2.0):
    """``out`` (low precision) must be within ``factor`` x the max error that PyTorch's own
    low-precision computation ``torch_lowp`` makes against the float64 reference ``ref64``."""
    torch_err = (torch_lowp.double() - ref64).abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    floor = 1e-6 * max(1.0, ref64.abs().max().item())
    assert err <= factor * torch_err + floor, f"max error {err:.3g} > {factor} x torch's {torch_err:.3g}"


def param_backends(op: str):
    """pytest params for every backend of ``op`` on CPU, with a skip reason when unavailable."""
    cpu = torch.device("cpu")
    avail = available_backends(op, cpu)
    params = []
    for b in ("cpp", "triton"):
        marks = () if b in avail else pytest.mark.skip(reason=f"backend {b} unavailable for {op} on CPU")
        params.append(pytest.param(b, marks=marks, id=b))
    return params
