"""The C++ ops called directly (``torch.ops.eagle_C.*``, as a serving stack may, without the Python
wrappers' checks) refuse bad input with an exception, never a crash or a silent write. Each case runs
in a subprocess: a regression that segfaults fails its test instead of killing the run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from eagle_kernels import _ext

pytestmark = pytest.mark.skipif(not _ext.STATUS.loaded, reason="the C++ extension is not built")

PRELUDE = """
import torch, eagle_kernels, eagle_kernels._C
E = torch.ops.eagle_C
torch.manual_seed(0)

def layer_weights(H=64, Hq=2, Hkv=1, D=32, inter=64, gate_up_rows=None):
    w = lambda *s: torch.randn(*s) * 0.05
    return [torch.ones(H), w((Hq + 2 * Hkv) * D, H), None, None, None, w(H, Hq * D), None, torch.ones(H),
            w(gate_up_rows or 2 * inter, H), None, w(H, inter), None]

def expect(error, text, fn):
    try:
        fn()
    except error as e:
        assert text in str(e), str(e)
        return
    raise AssertionError(f"no {error.__name__} ({text!r})")
"""


def _run(body: str) -> None:
    code = PRELUDE + textwrap.dedent(body) + "\nprint('OK')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )


def test_compact_kv_cache_refuses_a_tree_larger_than_the_cache():
    """cache_seqlens + num_draft_tokens <= S_max overflowed int64 for a huge num_draft_tokens: the
    check passed and the copy wrote outside the cache (SIGSEGV; SIGABRT through the public wrapper)."""
    _run(
        """
        kv = torch.zeros(1, 2, 1, 1, 8, 4)
        lens = torch.tensor([1], dtype=torch.int32)
        ai = torch.tensor([[0] + [j + 100000 for j in range(1, 64)]])
        an = torch.tensor([63])
        expect(RuntimeError, "exceeds the cache's S_max=8", lambda: E.compact_kv_cache(kv, lens, ai, an, 2**63 - 1))
        expect(ValueError, "exceeds the cache's S_max=8",
               lambda: eagle_kernels.compact_kv_cache(kv, lens, ai, an, num_draft_tokens=2**63 - 1))
        expect(RuntimeError, "at least one column",
               lambda: E.compact_kv_cache(kv, lens, ai[:, :0], torch.tensor([0]), 4))
        """
    )


def test_build_tree_refuses_lengths_that_overflow_the_full_mask_size():
    _run(
        """
        big = 2**63 - 1
        pos = torch.empty(2, dtype=torch.long)
        outs = [torch.empty(2, 1, dtype=torch.long) for _ in range(3)]
        expect(ValueError, "the full-mode tree_mask size overflows int64",
               lambda: E.build_tree(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long),
                                    torch.tensor([big, big]), torch.zeros(0, dtype=torch.bool), pos, *outs, 1, 1, 1, 0))
        """
    )


def test_llama_layers_checks_attn_input_and_the_gate_up_weight_before_writing_the_cache():
    """attn_input's rows are what the layer writes to the cache; its B and T were not checked against
    x's (the cache-fit check used x's): writes past the cache (SIGSEGV) or into other heads' committed
    rows. An odd fused gate_up weight read "up" at the wrong offset."""
    _run(
        """
        B, T, H, D, S = 1, 1, 64, 32, 4
        kv = torch.zeros(1, 2, B, 1, S, D)
        x = torch.randn(B, T, H)
        cos, sin = torch.ones(B, T, 1, D), torch.zeros(B, T, 1, D)
        lens = torch.tensor([3], dtype=torch.int32)
        for bad in (torch.randn(B, 4000, H), torch.randn(2, T, H)):
            expect(ValueError, "attn_input must be [B, T, *] with x's B and T",
                   lambda: E.llama_layers(x, bad, layer_weights(), kv, cos, sin, lens, None, 0, 2, 1, 1e-6, []))
        assert torch.count_nonzero(kv) == 0  # nothing written
        zero = torch.tensor([0], dtype=torch.int32)
        expect(ValueError, "must have an even, positive number of outputs",
               lambda: E.llama_layers(x, None, layer_weights(gate_up_rows=129), kv, cos, sin,
                                      zero, None, 0, 2, 1, 1e-6, []))
        # an MLP of width 0 divided by zero (SIGFPE) after the layer had written the cache
        expect(ValueError, "positive number of outputs (gate, then up), got 0",
               lambda: E.llama_layers(x, None, layer_weights(inter=0), kv, cos, sin, zero, None, 0, 2, 1, 1e-6, []))
        assert torch.count_nonzero(kv) == 0
        """
    )


def test_llama_layers_refuses_rope_tables_of_another_shape():
    """cos / sin were checked by element count only: [T, B, 1, D] tables for B=2, T=3 were read as
    [B, T, 1, D] and the cache was written with other rotations, silently."""
    _run(
        """
        B, T, H, D, S = 2, 3, 64, 32, 8
        kv = torch.zeros(1, 2, B, 1, S, D)
        x = torch.randn(B, T, H)
        lens = torch.zeros(B, dtype=torch.int32)
        for shape in ((T, B, 1, D), (B, T, D), (B, 1, T, D)):
            cos, sin = torch.ones(shape), torch.zeros(shape)
            expect(ValueError, "cos and sin must be [B, T, 1, D] = [2, 3, 1, 32]",
                   lambda: E.llama_layers(x, None, layer_weights(), kv, cos, sin, lens, None, 0, 2, 1, 1e-6, []))
        assert torch.count_nonzero(kv) == 0
        """
    )


def test_a_plain_step_that_raises_commits_nothing():
    """llama_decode_step advanced cache_seqlens before it checked the sampling arguments: a caller
    that caught the error and retried fed the same token at the next position."""
    _run(
        """
        H, D = 64, 32
        embed, lm_head = torch.randn(50, H) * 0.1, torch.randn(50, H) * 0.1
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
        dinv, signs = torch.cat([inv, inv]), torch.cat([-torch.ones(D // 2), torch.ones(D // 2)])
        kv = torch.zeros(1, 2, 1, 1, 16, D)
        step_input, lens, flag = torch.tensor([3]), torch.tensor([4], dtype=torch.int32), torch.tensor(False)
        draws = torch.tensor([0])
        for temperature in (torch.tensor([-1.0]), torch.tensor([1.0, 1.0])):
            expect(ValueError, "temperature", lambda: E.llama_decode_step(
                step_input, embed, layer_weights(), kv, lens, dinv, signs, 2, 1, 1e-6, torch.ones(H), lm_head, flag,
                temperature=temperature, top_k=torch.tensor([0]), top_p=torch.tensor([1.0]),
                min_p=torch.tensor([0.0]), seeds=torch.tensor([1]), draws=draws))
            assert lens.tolist() == [4] and step_input.tolist() == [3] and draws.tolist() == [0]
        """
    )


def test_rms_norm_and_chain_sampling_refuse_wrong_dtypes_and_shapes_by_name():
    _run(
        """
        expect(TypeError, "rms_norm: x must be a floating-point tensor",
               lambda: E.rms_norm(torch.tensor([[3, 4, 100]]), torch.tensor([1, 1, 1]), 1e-6))
        probs = torch.full((2, 4), 0.25)
        ids = torch.tensor([1, 2])
        cu, bonus = torch.tensor([2]), torch.tensor([0])
        u, uf = torch.rand(2), torch.rand(1)
        op = torch.ops.eagle_C.chain_speculative_sampling
        expect(TypeError, "draft_token_ids must be int32 or int64",
               lambda: op(ids.float(), cu, None, probs, bonus, u, uf, 2))
        expect(ValueError, "cu_num_draft_tokens must be [B]", lambda: op(ids, cu[0], None, probs, bonus, u, uf, 2))
        """
    )
