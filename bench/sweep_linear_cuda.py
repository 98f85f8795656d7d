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
* ``mm(W, x^T)``: the product computed as ``[N, M]`` (cuBLAS sees a tall-and-narrow problem and picks
  other kernels; the caller would read the transposed view);
* ``triton fp32``: a Triton tile kernel with ``tl.dot(..., input_precision="ieee")`` (FMA, no TF32),
  the quickest of a few tile shapes (:data:`TRITON_TILES`; the winner is recorded), its largest
  relative error against a float64 product recorded beside it;
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

from eagle_kernels._triton import tl, triton  # noqa: E402

# (N, K) of a tiny-code layer (hidden 256, intermediate 768; qkv fused: 4+2+2 heads of 64 = 512) and
# of its lm_head (vocabulary 2048).
SHAPES = [(512, 256), (256, 256), (1536, 256), (256, 768), (2048, 256)]
ROWS = [1, 8, 16, 32, 48, 60, 64, 128]
VARIANTS = ["F.linear", "mm(x, W^T contiguous)", "mm(W, x^T)", "cublaslt", "triton fp32", "tf32", "bf16"]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) tried by the "triton fp32" variant; BLOCK_M is cut to the
# rows (at least 16, tl.dot's minimum).
TRITON_TILES = [
    (64, 16, 32, 4),
    (64, 32, 32, 4),
    (32, 32, 32, 4),
    (64, 64, 32, 4),
    (16, 64, 64, 4),
    (32, 16, 64, 2),
]


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


@triton.jit
def _linear_f32_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[M, N] = x[M, K] @ w[N, K]^T, all float32 and contiguous; one program per output tile."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(
            x_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
        )
        b = tl.load(
            w_ptr + rn[None, :] * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0
        )
        acc = tl.dot(a, b, acc, input_precision="ieee")
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_linear_f32(x: torch.Tensor, w: torch.Tensor, tile: tuple[int, int, int, int]):
    """A zero-argument function computing ``x @ w.T`` with :func:`_linear_f32_kernel` at ``tile``."""
    M, K = x.shape
    N = w.shape[0]
    block_m = min(tile[0], max(16, triton.next_power_of_2(M)))
    out = torch.empty(M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, tile[1]))

    def call():
        _linear_f32_kernel[grid](x, w, out, M, N, K, block_m, tile[1], tile[2], num_warps=tile[3])
        return out

    return call


def max_rel_error(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """Largest |got - x @ w.T| over the largest |x @ w.T|, the product taken in float64."""
    want = x.double() @ w.double().t()
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def variant_call(name: str, x: torch.Tensor, w: torch.Tensor):
    """A zero-argument function running ``name`` on x [M, K] and w [N, K] (float32), and the context
    it must run (and be captured) in."""
    if name == "mm(x, W^T contiguous)":
        wt = w.t().contiguous()
        return (lambda: torch.mm(x, wt)), _blas()
    if name == "mm(W, x^T)":
        return (lambda: torch.mm(w, x.t())), _blas()
    if name == "cublaslt":
        return (lambda: F.linear(x, w)), _blas("cublaslt")
    if name == "tf32":
        return (lambda: F.linear(x, w)), _blas(tf32=True)
    if name == "bf16":
        xb, wb = x.bfloat16(), w.bfloat16()
        return (lambda: F.linear(xb, wb)), _blas()
    return (lambda: F.linear(x, w)), _blas()


def time_triton(x: torch.Tensor, w: torch.Tensor, timer) -> dict:
    """The quickest of :data:`TRITON_TILES` for x @ w.T: its time (us), tile and relative error."""
    best = {"triton fp32": float("inf")}
    for tile in TRITON_TILES:
        fn = triton_linear_f32(x, w, tile)
        err = max_rel_error(fn(), x, w)
        us = timer(fn).us
        if us < best["triton fp32"]:
            best = {"triton fp32": us, "triton tile": list(tile), "triton rel err": err}
    return best


def check_triton_interpreted() -> None:
    """--check (CPU, TRITON_INTERPRET=1): every tile of the Triton variant against float64."""
    gen = torch.Generator().manual_seed(0)
    for (N, K), M in ((SHAPES[0], 1), (SHAPES[3], 60), (SHAPES[4], 17)):
        x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
        for tile in TRITON_TILES:
            err = max_rel_error(triton_linear_f32(x, w, tile)(), x, w)
            print(f"{N}x{K} M {M} tile {tile}: max rel err {err:.2e}")
            assert err < 1e-5, (N, K, M, tile, err)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--rows", nargs="+", type=int, default=ROWS)
    p.add_argument(
        "--check", action="store_true", help="check the Triton variant (TRITON_INTERPRET=1 on CPU)"
    )
    args = p.parse_args(argv)
    if args.check:
        check_triton_interpreted()
        return 0
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
                if name == "triton fp32":
                    row.update(time_triton(x, w, measure_cuda_kernel_time))
                    continue
                fn, context = variant_call(name, x, w)
                with context:
                    fn()
                    row[name] = measure_cuda_kernel_time(fn).us
            results.append(row)
            print(f"{N:>5d}x{K:<4d} {M:>4d} " + " ".join(f"{row[v]:22.2f}" for v in VARIANTS), flush=True)
        # after every shape, so that a run cut by its time box keeps what it measured
        path = save_json(f"linear_cuda_{device_file_tag(device)}.json", {"results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
