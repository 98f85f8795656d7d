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


# Launch keywords that are compile options, not kernel arguments.
_COMPILE_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")


def require_jit_specialisation() -> None:
    """Skip unless this Triton exposes the JIT's specialisation (Triton >= 3.6), which
    :func:`compile_like_jit` mirrors."""
    import triton.runtime.jit

    if not hasattr(triton.runtime.jit, "native_specialize_impl"):
        pytest.skip("compile_like_jit reads the JIT's specialisation from Triton >= 3.6")


def compile_like_jit(kernel, args, kwargs, arch: int = 90):
    """Compile one launch for sm_<arch> ahead of time (no GPU needed; run without TRITON_INTERPRET)
    with the specialisation Triton's JIT would give these arguments: ints and pointers divisible by
    16 marked so, ints equal to 1 made constants, except the kernel's ``do_not_specialize`` ones."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    options = {k: kwargs[k] for k in _COMPILE_OPTIONS if k in kwargs}
    constexprs = {k: v for k, v in kwargs.items() if k not in options}
    names = kernel.arg_names
    params = {p.name: p for p in kernel.params}
    runtime_names = [n for n in names if n not in constexprs]
    assert len(runtime_names) == len(args), (runtime_names, len(args))
    signature = dict.fromkeys(constexprs, "constexpr")
    attrs = {}
    for name, value in zip(runtime_names, args):
        param = params[name]
        specialize, align = not param.do_not_specialize, not param.do_not_specialize_on_alignment
        ty, spec = native_specialize_impl(BaseBackend, value, False, specialize, align)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = spec
        elif spec == "D":
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    signature = {n: signature[n] for n in names}
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch
    (the kernel, its arguments and keywords) instead of running it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record_tree_attention_launches(q, k, v, seqlens, mask, config, block_table=None, **scales) -> list[tuple]:
    """(kernel, args, keyword args) of every launch tree_attention's Triton launcher makes for these
    CPU tensors under ``config`` (a LaunchConfig), with the dot precision a CUDA launch uses (the
    interpreter's bf16 workaround is CPU-only); with ``block_table``, paged caches; ``scales``:
    ``k_scale`` / ``v_scale`` of 8-bit caches."""
    import importlib

    ta = importlib.import_module("eagle_kernels.tree_attention")  # (the package re-exports the function)
    launches = []
    original = ta._launch
    ta._launch = lambda kernel, grid, *args, **kw: launches.append((kernel, args, kw))
    try:
        ta._tree_attention_triton(q, k, v, seqlens, mask, 0.1, config, block_table=block_table, **scales)
    finally:
        ta._launch = original
    for _, _, kw in launches:
        if "FP32_DOT" in kw:
            kw["FP32_DOT"] = q.dtype == torch.float32
    return launches


def run_without_interpreter(code: str, stderr_tail: int = 3000) -> None:
    """Run ``code`` (ahead-of-time Triton compiles) in a subprocess from the repository root without
    ``TRITON_INTERPRET``; skip where this Triton has no ptxas, else assert it exits 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    err = res.stderr.lower()
    if res.returncode != 0 and "ptxas" in err and ("not found" in err or "cannot find" in err):
        pytest.skip(f"this triton install cannot compile for CUDA: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-stderr_tail:]
