"""The registered ops ``torch.ops.eagle.*`` called directly (a serving engine's op table, or the graph
``torch.compile`` builds from the public functions) check shapes, dtypes and devices themselves, on
every backend. They used to rely on the public function: called directly, the Triton and reference
backends ran on mismatched shapes, which on a GPU reads and writes past the tensors."""

from __future__ import annotations

import pytest
import torch

import eagle_kernels
from tests.kernels.helpers import backends_for, run_with_backend

CPU = torch.device("cpu")
B, N, V = 2, 3, 11  # sequences, tree slots (a chain), vocabulary


def _chain_tree() -> tuple[torch.Tensor, ...]:
    """SGLang's layout of a chain of N slots per sequence: retrive_index, next_token, next_sibling."""
    index = torch.arange(B * N).reshape(B, N)
    next_token = torch.tensor([[1, 2, -1]] * B)
    return index, next_token, torch.full((B, N), -1)


def _verify_args():
    gen = torch.Generator().manual_seed(0)
    candidates = torch.randint(0, V, (B, N), generator=gen)
    target_predict = torch.randint(0, V, (B, N), generator=gen)
    return [candidates, *_chain_tree(), target_predict, N]


def _tree_sampling_args():
    gen = torch.Generator().manual_seed(1)
    candidates = torch.randint(0, V, (B, N), generator=gen)
    probs = torch.softmax(torch.randn(B, N, V, generator=gen), -1)
    u, uf = torch.rand(B, N, generator=gen), torch.rand(B, generator=gen)
    return [candidates, *_chain_tree(), probs, None, u, uf, N, False, 1.0, 1.0]


def _chain_sampling_args():
    gen = torch.Generator().manual_seed(2)
    T = 4  # drafts of both requests, flattened (vLLM's layout): 3 + 1
    drafts = torch.randint(0, V, (T,), generator=gen)
    probs = torch.softmax(torch.randn(T, V, generator=gen), -1)
    bonus = torch.randint(0, V, (B,), generator=gen)
    u, uf = torch.rand(T, generator=gen), torch.rand(B, generator=gen)
    return [drafts, torch.tensor([3, 4]), None, probs, bonus, u, uf, 3]


def _compact_args():
    kv = torch.randn(2, 2, B, 1, 16, 8)
    accept_index = torch.tensor([[0, 1, -1], [3, -1, -1]])
    return [kv, torch.tensor([4, 5], dtype=torch.int32), accept_index, torch.tensor([1, 0]), N]


def _warp_args():
    R = 3
    return [
        torch.randn(R, V),
        torch.ones(R),
        torch.zeros(R, dtype=torch.int64),
        torch.ones(R),
        torch.zeros(R),
    ]


def _build_tree_args():
    topk, depth, n = 2, 2, 4
    parent_list = torch.tensor([[-1, 0, 1]] * B)  # the root, then the first level's two nodes
    selected_index = torch.tensor([[0, 1, 2]] * B)
    seq_lens = torch.tensor([3, 5])
    mask = torch.empty(B, n, n, dtype=torch.bool)
    outputs = [mask, torch.empty(B, n, dtype=torch.int64)] + [
        torch.empty(B, n, dtype=torch.int64) for _ in range(3)
    ]
    return [parent_list, selected_index, seq_lens, *outputs, topk, depth, n, 1]


def _fused_args():
    H = 16
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, H, generator=gen)
    return [hidden, torch.randint(0, V, (5,), generator=gen), torch.randn(V, H), torch.randn(H, 2 * H), None]


def _fused_out_args():
    return [*_fused_args(), torch.empty(5, 16)]


def _eagle3_args():
    h = torch.randn(5, 16)
    return [h, h.clone(), h.clone(), torch.randn(16, 48), None]


def _tree_attention_out_args():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(B, N, 4, 16, generator=gen)
    kv = torch.randn(2, B, 2, 8, 16, generator=gen)
    return [q, kv[0], kv[1], torch.tensor([2, 5], dtype=torch.int32), None, 0.25, torch.empty_like(q)]


def _paged_attention_args():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, N, 4, 16, generator=gen)
    pool = torch.randn(2, 6, 4, 2, 16, generator=gen)  # [2, num_blocks, page, Hkv, D]
    table = torch.tensor([[0, 2], [5, 1]], dtype=torch.int32)
    return [q, pool[0], pool[1], table, torch.tensor([2, 5], dtype=torch.int32), None, 0.25]


def _paged_attention_out_args():
    args = _paged_attention_args()
    return [*args, torch.empty_like(args[0])]


def _paged_compact_args():
    pool = torch.randn(2, 2, 6, 4, 1, 8)  # [layers, 2, num_blocks, page, Hkv, D]
    table = torch.tensor([[0, 2], [5, 1]], dtype=torch.int32)
    accept_index = torch.tensor([[0, 1, -1], [3, -1, -1]])
    return [pool, table, torch.tensor([4, 5], dtype=torch.int32), accept_index, torch.tensor([1, 0]), N]


def _shorter(i: int, dim: int = 0):
    """Mutation: argument ``i`` one element shorter along ``dim``."""
    return lambda args: args.__setitem__(i, args[i].narrow(dim, 0, args[i].shape[dim] - 1))


def _as(i: int, dtype: torch.dtype):
    return lambda args: args.__setitem__(i, args[i].to(dtype))


CASES = [
    ("verify_tree_greedy", _verify_args, _shorter(4, 1), "target_predict must have shape"),
    ("verify_tree_greedy", _verify_args, _shorter(0), "must have shape"),
    ("tree_speculative_sampling", _tree_sampling_args, _shorter(6, 1), "uniform_samples must have shape"),
    ("tree_speculative_sampling", _tree_sampling_args, _shorter(1), "retrive_index must have shape"),
    ("chain_speculative_sampling", _chain_sampling_args, _shorter(4), "bonus_token_ids must have shape"),
    ("chain_speculative_sampling", _chain_sampling_args, _shorter(0), "draft_token_ids must have shape"),
    ("compact_kv_cache", _compact_args, _shorter(1), "cache_seqlens must have shape"),
    ("compact_kv_cache", _compact_args, _shorter(3), "accept_token_num must have shape"),
    ("warp_logits", _warp_args, _shorter(1), "temperature must have shape"),
    ("warp_logits", _warp_args, _as(2, torch.int32), "top_k must have dtype"),
    ("warp_logits", _warp_args, _as(3, torch.float64), "top_p must have dtype"),
    ("build_tree", _build_tree_args, _shorter(2), "seq_lens must have shape"),
    ("build_tree", _build_tree_args, _shorter(5, 1), "retrive_index"),
    ("fused_draft_input", _fused_args, _shorter(1), "token_ids must have shape"),
    ("fused_draft_input_out", _fused_out_args, _shorter(5), "out must have shape"),
    ("fused_eagle3_input", _eagle3_args, _shorter(1), "h_mid must have shape"),
    ("tree_attention_out", _tree_attention_out_args, _shorter(6), "out must have shape"),
    ("tree_attention_out", _tree_attention_out_args, _shorter(3), "cache_seqlens must have shape"),
    ("paged_tree_attention", _paged_attention_args, _shorter(3), "block_table must have shape"),
    ("paged_tree_attention", _paged_attention_args, _shorter(4), "cache_seqlens must have shape"),
    ("paged_tree_attention_out", _paged_attention_out_args, _shorter(7), "out must have shape"),
    ("paged_compact_kv_cache", _paged_compact_args, _shorter(2), "cache_seqlens must have shape"),
    ("paged_compact_kv_cache", _paged_compact_args, _shorter(3), "accept_index must have shape"),
]


def _backends(op: str, device: torch.device = CPU) -> list[str]:
    base = op.removesuffix("_out")
    return ["torch"] + backends_for(base, device)


def _on(device: torch.device, args: list) -> list:
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("op,make,mutate,match", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_registered_op_refuses_mismatched_shapes_on_every_backend(device, op, make, mutate, match):
    """On the test device's backends (``--device cuda``: the CUDA and Triton kernels on a GPU)."""
    fn = getattr(torch.ops.eagle, op)
    for backend in _backends(op, device):
        run_with_backend(backend, fn, *_on(device, make()))  # the valid call runs
        args = _on(device, make())
        mutate(args)
        with pytest.raises((ValueError, TypeError), match=match):
            run_with_backend(backend, fn, *args)


def test_every_registered_op_has_a_case():
    ops = {name for name in dir(torch.ops.eagle) if not name.startswith("_")}
    ops = {op for op in ops if hasattr(getattr(torch.ops.eagle, op), "default")}
    covered = {case[0] for case in CASES} | {"tree_attention"}  # (test_tree_attention's bad-input table)
    missing = ops - covered - {"tree_speculative_sampling_draft_probs", "fused_eagle3_input_out"}
    assert not missing, f"registered ops without a direct-call shape check test: {sorted(missing)}"
    assert eagle_kernels.OPS  # the public op list exists (the names above are its registered forms)


def test_registered_ops_check_values_on_cpu_on_every_backend():
    """Index values too: a direct call on the Triton backend read out of bounds (the interpreter
    segfaulted) because only the public functions checked token ids and tree indices."""
    args = _fused_args()
    args[1] = args[1].clone()
    args[1][2] = V + 5
    for backend in _backends("fused_draft_input"):
        with pytest.raises(ValueError, match=r"token_ids must be in \[0, 11\)"):
            run_with_backend(backend, torch.ops.eagle.fused_draft_input, *args)
    tree = _build_tree_args()
    tree[1] = torch.tensor([[0, 1, 2], [0, 1, 99]])  # a candidate index past topk + (depth-1) * topk^2
    for backend in _backends("build_tree"):
        with pytest.raises(ValueError):
            run_with_backend(backend, torch.ops.eagle.build_tree, *tree)
