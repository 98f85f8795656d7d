"""chain_speculative_sampling (vLLM's flattened layout): C++ (CPU) / CUDA / Triton vs the PyTorch reference.

    pytest bench/bench_chain_speculative_sampling.py --benchmark-only --benchmark-group-by=param:shape

``test_chain_speculative_sampling`` times the public op per backend (validation included) with one-hot
drafts (``draft_probs=None``, what n-gram / top-1 drafters pass), ``test_..._draft_probs`` with draft
distributions. On CUDA extra_info adds the kernel-only time (``kernel_us``, CUDA-graph replays:
``bench/utils.py``) next to the eager figures, each with GB/s and the roofline fraction of
:func:`chain_bytes` (the traffic the call's outcome requires: a whole row per rejected request).

Chains: ``k`` drafts per request (vLLM's ``num_speculative_tokens``), each the best token of its target
row. Target rows are softmaxes of ``7 * randn`` (about 0.57 of a row's mass on its best token), so with
one-hot drafts about 1 of 5 drafts is accepted and most requests end in a recovered token: the
residual sampling, which reads a whole row, is what the one-hot figures time. Each draft row is its
target row sharpened or flattened (a drafter that mostly agrees with the target): at B 64, k 5 about
3.5 of 5 drafts are accepted and 28 of 64 requests reject one, so both paths run. ``extra_info`` has
``mean_emitted`` and ``rejected_requests``. Position ``t``'s row is a copy of row ``t % 64`` of a
``[64, V]`` pool.
"""

from __future__ import annotations

import pytest
import torch

import eagle_kernels
from bench.utils import check_against_reference, record_kernel_time, synchronized
from eagle_kernels._backend import available_backends

OP = "chain_speculative_sampling"
POOL = 64
SHAPES = {f"B{B}-k{k}-V{V}": (B, k, V) for V in (32000, 128256) for k in (1, 5) for B in (1, 8, 64)}


def make_inputs(B: int, k: int, V: int, device: torch.device, *, draft: bool = False, seed: int = 0):
    """``[draft_token_ids, cu_num_draft_tokens, draft_probs or None, target_probs, bonus, u, uf]``."""
    gen = torch.Generator().manual_seed(seed)
    T = B * k
    pool = torch.softmax(torch.randn(POOL, V, generator=gen) * 7, -1)
    rows = torch.arange(T) % POOL
    target = pool[rows]  # [T, V], contiguous
    drafts = pool.argmax(-1)[rows]
    cu = torch.arange(1, B + 1, dtype=torch.int64) * k
    bonus = torch.randint(0, V, (B,), generator=gen)
    q = None
    if draft:  # the target's logits, sharpened or flattened per row: q agrees with p on the best token
        logits = torch.log(pool)
        scale = 0.5 + torch.rand(POOL, 1, generator=gen)  # 0.5x .. 1.5x
        q = torch.softmax(logits * scale, -1)[rows]
    u, uf = torch.rand(T, generator=gen), torch.rand(B, generator=gen)
    return [None if t is None else t.to(device) for t in (drafts, cu, q, target, bonus, u, uf)]


def chain_bytes(B: int, k: int, V: int, rejected: int, *, draft: bool = False) -> int:
    """The traffic one call cannot avoid, given its outcome: a whole float32 target row (and draft row)
    for each of the ``rejected`` requests, whose recovered token is drawn from it; one probability
    (two with draft rows), the draft id and the uniform at every position; per request the cumulative
    count, the bonus id, the final uniform and the int32 output row."""
    T = B * k
    probs = 2 if draft else 1
    return rejected * V * 4 * probs + T * (4 * probs + 8 + 4) + B * (8 + 8 + 4 + 4 * (k + 1))


def backends(device: torch.device) -> list[str]:
    return [b for b in available_backends(OP, device) if not (b == "triton" and device.type == "cpu")]


def _time(benchmark, device: torch.device, shape: str, backend: str, *, draft: bool) -> None:
    if backend not in backends(device):
        pytest.skip(f"{backend} not available on {device.type}")
    B, k, V = SHAPES[shape]
    inputs = make_inputs(B, k, V, device, draft=draft)
    call = lambda: eagle_kernels.chain_speculative_sampling(*inputs, max_spec_len=k)  # noqa: E731
    fn = synchronized(call, device)
    check_against_reference(call, backend)
    with eagle_kernels.use_backend(backend):
        emitted = (fn() >= 0).sum(-1)
        rejected = int((emitted < k + 1).sum())  # all k drafts accepted: k + 1 tokens with the bonus
        benchmark(fn)
        benchmark.extra_info["mean_emitted"] = float(emitted.float().mean())
        benchmark.extra_info["rejected_requests"] = rejected
        record_kernel_time(benchmark, call, chain_bytes(B, k, V, rejected, draft=draft), device)


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda", "triton"])
def test_chain_speculative_sampling(benchmark, bench_device, shape, backend):
    _time(benchmark, bench_device, shape, backend, draft=False)


@pytest.mark.parametrize("shape", ["B8-k5-V32000", "B64-k5-V32000"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda", "triton"])
def test_chain_speculative_sampling_draft_probs(benchmark, bench_device, shape, backend):
    _time(benchmark, bench_device, shape, backend, draft=True)
