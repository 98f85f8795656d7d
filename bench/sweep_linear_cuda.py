"""The tiny-code target's linears on a CUDA GPU at the row counts of a decode step and a verify tree:
which float32 GEMM path is fastest, beside bfloat16 for scale.

    python bench/sweep_linear_cuda.py                 # on a CUDA machine: table + JSON
    python bench/sweep_linear_cuda.py --dry-run       # anywhere: the shapes and variants only

Why: a profiled H100 round of the bundled pair (bench/results/gpu_2026-11-26e_NVIDIA-H100.md) spent
half its device time in cuBLAS float32 GEMMs of ~60 rows, run as SIMT kernels on a handful of SMs at
23-30 us each, against 3 us for the same linears at 1 row. Variants, all exact float32 (no TF32) but the
last two:

* ``F.linear``: what the runtime calls, weight ``[N, K]``;
* ``mm(x, W^T contiguous)``: the weight stored transposed ``[K, N]``, another cuBLAS layout;
* ``cublaslt``: ``F.linear`` with ``torch.backends.cuda.preferred_blas_library("cublaslt")``;
* ``tf32``: ``F.linear`` with TF32 allowed (not exact: for scale only);
* ``bf16``: ``F.linear`` in bfloat16 (another dtype: for scale only).

Kernel-only times from ``bench.utils.measure_cuda_kernel_time`` (CUDA graphs, L2 flushed).
Writes ``bench/results/linear_cuda_<GPU>.json``.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (N, K) of a tiny-code layer (hidden 256, intermediate 768; qkv fused: 4+2+2 heads of 64 = 512) and
# of its lm_head (vocabulary 2048).
SHAPES = [(512, 256), (256, 256), (1536, 256), (256, 768), (2048, 256)]
ROWS = [1, 8, 16, 32, 48, 60, 64, 128]
VARIANTS = ["F.linear", "mm(x, W^T contiguous)", "cublaslt", "tf32", "bf16"]


@contextmanager
def _blas(library: str | None = None, tf32: bool = False):
    """Run with a preferred BLAS library and/or TF32 allowed, restoring both after."""
    old_lib = torch.backends.cuda.preferred_blas_library()
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        if library is not None:
            torch.backends.cuda.preferred_blas_library(library)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(old_lib)
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


def variant_call(name: str, x: torch.Tensor, w: torch.Tensor):
    """A zero-argument function running ``name`` on x [M, K] and w [N, K] (float32), and the context
    it must run (and be captured) in."""
    if name == "mm(x, W^T contiguous)":
        wt = w.t().contiguous()
        return (lambda: torch.mm(x, wt)), _blas()
    if name == "cublaslt":
        return (lambda: F.linear(x, w)), _blas("cublaslt")
    if name == "tf32":
        return (lambda: F.linear(x, w)), _blas(tf32=True)
    if name == "bf16":
        xb, wb = x.bfloat16(), w.bfloat16()
        return (lambda: F.linear(xb, wb)), _blas()
    return (lambda: F.linear(x, w)), _blas()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--rows", nargs="+", type=int, default=ROWS)
    args = p.parse_args(argv)
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            raise SystemExit("no CUDA device: use --dry-run")
        for N, K in SHAPES:
            print(f"{N}x{K}: rows {args.rows}; variants {VARIANTS}")
        return 0

    from bench.utils import device_file_tag, measure_cuda_kernel_time, save_json

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    print(f"{'shape':>10s} {'M':>4s} " + " ".join(f"{v:>22s}" for v in VARIANTS) + "   (us)")
    for N, K in SHAPES:
        w = torch.randn(N, K, generator=gen, device=device)
        for M in args.rows:
            x = torch.randn(M, K, generator=gen, device=device)
            row = {"N": N, "K": K, "M": M}
            for name in VARIANTS:
                fn, context = variant_call(name, x, w)
                with context:
                    fn()
                    row[name] = measure_cuda_kernel_time(fn).us
            results.append(row)
            print(f"{N:>5d}x{K:<4d} {M:>4d} " + " ".join(f"{row[v]:22.2f}" for v in VARIANTS), flush=True)
    path = save_json(f"linear_cuda_{device_file_tag(device)}.json", {"results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
