"""Counter-based random numbers: one independent, reproducible stream per batch row, no host sync.

Uniform ``u[b, j]`` of draw ``counter[b]`` is a pure function of ``(row_seed[b], counter[b], j)``:
splitmix64 hashing in wrapping int64 tensor arithmetic. A row's numbers therefore do not depend on
the batch it is in, on other rows finishing early, or on the device, and rows never share numbers.
"""

from __future__ import annotations

import torch

from eagle._args import as_number
from eagle_kernels import _ext

# splitmix64 constants as signed int64 (two's complement of the usual unsigned values).
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic), elementwise."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


MAX_SEED = (1 << 63) - 1


def check_seed(seed) -> None:
    """A user seed must be None or an integer in [0, 2**63 - 1]: a float, a bool or a larger or
    negative integer would be truncated or wrapped into another seed's stream without a word."""
    if seed is None:
        return
    if not 0 <= as_number("seed", seed, integral=True, hint=" (or None)") <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")


def draw_seed() -> int:
    """A run's seed when the caller gave none: drawn from torch's global generator (so that
    ``torch.manual_seed`` makes unseeded runs repeat)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def row_seeds(seed: int, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 ``[B]``: the seed of each row's stream, derived from one user seed (checked by
    :func:`check_seed`)."""
    check_seed(seed)
    rows = torch.arange(batch_size, dtype=torch.int64, device=device)
    return splitmix64(splitmix64(torch.full_like(rows, int(seed))) + rows)


_CPU_OPS = True
_CPP_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the C++ ops read


def set_cpu_ops(enabled: bool) -> bool:
    """Use the C++ versions of :func:`uniforms` and :func:`inverse_cdf` on CPU tensors (default; the
    same values either way) or the tensor ops; returns the previous setting (for benchmarks)."""
    global _CPU_OPS
    previous, _CPU_OPS = _CPU_OPS, bool(enabled)
    return previous


def _in_cpp(op: str, *tensors: torch.Tensor) -> bool:
    """Whether ``eagle_C::<op>`` (csrc/cpu/rng.cpp: the same arithmetic in loops, the same bits) takes
    these tensors: plain CPU tensors outside tracing, the extension built."""
    return (
        _CPU_OPS
        and all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors)
        and _ext.has_op(op)
        and not torch.compiler.is_compiling()
    )


def uniforms(seeds: torch.Tensor, counter: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
    """Uniforms in [0, 1), ``[B, n]``, for draw ``counter`` (int64 ``[B]``) of each row's stream.

    float32 values use the top 24 bits of the hash, float64 the top 53, so 1.0 is never produced.
    """
    if isinstance(n, int) and n < 0:
        raise ValueError(f"uniforms: n must be >= 0, got {n}")
    if (
        type(n) is int
        and _in_cpp("uniforms", seeds, counter)
        and seeds.dtype == torch.int64
        and counter.dtype in (torch.int32, torch.int64)
        and dtype in (torch.float32, torch.float64)
        and seeds.dim() == 1
        and tuple(counter.shape) == tuple(seeds.shape)
    ):
        return torch.ops.eagle_C.uniforms(seeds, counter, n, dtype)
    base = splitmix64(seeds ^ splitmix64(counter.to(torch.int64)))
    cols = torch.arange(1, n + 1, dtype=torch.int64, device=seeds.device)
    bits = splitmix64(base[:, None] + cols[None, :] * _GOLDEN)
    mantissa = 53 if dtype == torch.float64 else 24
    return _shr(bits, 64 - mantissa).to(dtype) * (2.0**-mantissa)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample one token per row of ``probs [R, V]`` (unnormalised is fine) with uniforms ``u [R]``:
    the first index whose cumulative mass exceeds ``u * total`` (float64 sums). int64 ``[R]``."""
    if (
        _in_cpp("inverse_cdf", probs, u)
        and probs.dim() == 2
        and probs.shape[-1] >= 1
        and u.shape == probs.shape[:1]
        and probs.dtype in _CPP_FLOATS
        and u.dtype in _CPP_FLOATS
    ):
        return torch.ops.eagle_C.inverse_cdf(probs, u)
    cdf = probs.double().cumsum(-1)
    target = u.double()[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]
    return idx.clamp(max=probs.shape[-1] - 1)
