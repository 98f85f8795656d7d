"""The argument checks' signature cache (eagle_kernels/_checks.py) and torch.compile with a dynamic
batch size: a serving engine compiles its step once and marks the batch dimension dynamic
(``torch._dynamo.mark_dynamic``), so the public functions must not specialise the graph on it."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import eagle_kernels
from eagle_kernels._checks import SignatureCache

V = 11  # vocabulary


def test_signature_cache_skips_a_signature_that_passed_and_never_remembers_a_failure():
    calls = []

    def check(t: torch.Tensor, k: int) -> None:
        calls.append(k)
        if k < 0:
            raise ValueError("k must be >= 0")

    cache = SignatureCache()
    x = torch.zeros(2, 3)
    cache.run(check, x, 1)
    cache.run(check, torch.ones(2, 3), 1)  # the same shape, dtype, device, strides and scalar
    assert calls == [1]
    cache.run(check, torch.zeros(3, 2), 1)
    cache.run(check, x.t(), 1)  # other strides
    assert calls == [1, 1, 1]
    for _ in range(2):
        with pytest.raises(ValueError, match="k must be"):
            cache.run(check, x, -1)
    assert calls == [1, 1, 1, -1, -1] and len(cache) == 3


def _tree_attention(b: int):
    gen = torch.Generator().manual_seed(b)
    q = torch.randn(b, 3, 4, 16, generator=gen)
    kv = torch.randn(2, 2, b, 2, 16, 16, generator=gen)  # [layers, 2, B, Hkv, S, D]
    lengths = torch.arange(2, 2 + b, dtype=torch.int32)
    return (lambda q, k, v, s: eagle_kernels.tree_attention(q, k, v, s)), [q, kv[1, 0], kv[1, 1], lengths]


def _paged_tree_attention(b: int):
    gen = torch.Generator().manual_seed(b)
    q = torch.randn(b, 3, 4, 16, generator=gen)
    pool = torch.randn(2, 12, 4, 2, 16, generator=gen)  # [2, num_blocks, page, Hkv, D]
    table = torch.arange(b * 2, dtype=torch.int32).view(b, 2) % 12
    lengths = torch.arange(2, 2 + b, dtype=torch.int32) % 5
    fn = lambda q, k, v, t, s: eagle_kernels.paged_tree_attention(q, k, v, t, s)  # noqa: E731
    return fn, [q, pool[0], pool[1], table, lengths]


def _paged_compact_kv_cache(b: int):
    pool = torch.randn(2, 2, 12, 4, 1, 8)  # [layers, 2, num_blocks, page, Hkv, D]
    table = torch.arange(b * 2, dtype=torch.int32).view(b, 2) % 12
    accept_index = torch.full((b, 3), -1, dtype=torch.int32)
    accept_index[:, 0] = torch.arange(b, dtype=torch.int32) * 3
    lengths = torch.arange(b, dtype=torch.int32) % 5
    args = [pool, table, lengths, accept_index, torch.zeros(b, dtype=torch.int32)]

    def compact(pool, table, lengths, accept_index, accept_num):
        return eagle_kernels.paged_compact_kv_cache(
            pool, table, lengths, accept_index, accept_num, num_draft_tokens=3
        )

    return compact, args


def _verify_tree_greedy(b: int):
    gen = torch.Generator().manual_seed(b)
    n = 3
    index = torch.arange(b * n).reshape(b, n)
    next_token = torch.tensor([[1, 2, -1]]).expand(b, n).contiguous()
    args = [
        torch.randint(0, V, (b, n), generator=gen),
        index,
        next_token,
        torch.full((b, n), -1),
        torch.randint(0, V, (b, n), generator=gen),
    ]
    return (lambda *a: eagle_kernels.verify_tree_greedy(*a, num_spec_steps=n)), args


def _compact_kv_cache(b: int):
    kv = torch.randn(2, 2, b, 1, 16, 8)
    accept_index = torch.full((b, 3), -1, dtype=torch.int32)
    accept_index[:, 0] = torch.arange(b, dtype=torch.int32) * 3
    args = [kv, torch.arange(b, dtype=torch.int32) + 2, accept_index, torch.zeros(b, dtype=torch.int32)]

    def compact(kv, lengths, accept_index, accept_num):
        return eagle_kernels.compact_kv_cache(kv, lengths, accept_index, accept_num, num_draft_tokens=3)

    return compact, args


def _build_tree(b: int):
    args = [
        torch.tensor([[-1, 0, 1]]).repeat(b, 1),
        torch.tensor([[0, 1, 2]]).repeat(b, 1),
        torch.arange(b) + 3,
    ]
    return (lambda p, s, n: eagle_kernels.build_tree(p, s, n, topk=2, depth=2, num_draft_tokens=4)), args


def _fused_draft_input(b: int):
    gen = torch.Generator().manual_seed(b)
    H = 16
    args = [
        torch.randn(b, H, generator=gen),
        torch.randint(0, V, (b,), generator=gen),
        torch.randn(V, H, generator=gen),
        torch.randn(H, 2 * H, generator=gen),
    ]
    return (lambda *a: eagle_kernels.fused_draft_input(*a)), args


def _fused_eagle3_input(b: int):
    gen = torch.Generator().manual_seed(b)
    H = 16
    args = [torch.randn(b, H, generator=gen) for _ in range(3)] + [torch.randn(H, 3 * H, generator=gen)]
    return (lambda *a: eagle_kernels.fused_eagle3_input(*a)), args


def _warp_logits(b: int):
    gen = torch.Generator().manual_seed(b)
    return (lambda x: eagle_kernels.warp_logits(x, 0.7, 5, 0.9, 0.0)), [torch.randn(b, V, generator=gen)]


OPS = {
    "tree_attention": _tree_attention,
    "verify_tree_greedy": _verify_tree_greedy,
    "compact_kv_cache": _compact_kv_cache,
    "paged_tree_attention": _paged_tree_attention,
    "paged_compact_kv_cache": _paged_compact_kv_cache,
    "build_tree": _build_tree,
    "fused_draft_input": _fused_draft_input,
    "fused_eagle3_input": _fused_eagle3_input,
    "warp_logits": _warp_logits,
}


def _mark_batch_dynamic(args: list, b: int) -> None:
    for t in args:
        if isinstance(t, torch.Tensor) and t.dim() == 6 and t.shape[2] == b:
            torch._dynamo.mark_dynamic(t, 2)  # a [layers, 2, B, Hkv, S, D] cache (not a block pool)
        elif isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b and t.shape[0] != V:
            torch._dynamo.mark_dynamic(t, 0)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return all(_same(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("op", list(OPS))
def test_a_batch_size_marked_dynamic_compiles_once(op):
    """The public function compiled with ``fullgraph=True`` and its batch dimension marked dynamic
    (what vLLM does): one graph serves batch sizes 4, 5 and 6, with the eager results. The argument
    checks' signature cache hashed every size while Dynamo traced, which specialised the graph on
    the batch size: ``mark_dynamic`` raised ConstraintViolationError, and with ``dynamic=True`` each
    batch size compiled its own graph until the recompile limit failed the ninth."""
    torch._dynamo.reset()
    counters.clear()
    fn, _ = OPS[op](4)
    compiled = torch.compile(fn, fullgraph=True)
    for b in (4, 5, 6):
        _, args = OPS[op](b)
        eager = fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        _mark_batch_dynamic(args, b)
        assert _same(compiled(*args), eager), f"batch {b}"
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
