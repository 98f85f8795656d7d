"""On CPU a target forward over a block of tokens gives each position, bit for bit, the logits that plain
one-token decoding gives it: every CPU kernel on the path (the packed linears, tree attention, norms
and elementwise loops) computes a row on its own, whatever the rows beside it, and the attention's
softmax depends only on the sequence of keys a row sees, not on their cache positions. So a verified
chain or tree yields the greedy tokens of plain decoding in float32 and bfloat16 too, not only where
ties cannot hide (float64, whose linears go to MKL: bit-exact only up to exact ties). Blocks of more than 12 tokens once took another attention kernel, and the
online softmax summed by cache position (a tree token's ancestors sit at other positions than in plain
decoding).

The vocabulary here is a multiple of 16 so that the float32 lm_head is packed in panels, as real
vocabularies are (32000, 128256, 151936); an unpacked float32 weight goes to MKL beyond 16 rows."""

from __future__ import annotations

import pytest
import torch

from eagle.models import load_target
from eagle.models.cpu_packed import packed_weight
from eagle.models.llama import set_cpu_fast_path
from eagle_kernels import _ext

pytestmark = pytest.mark.skipif(not _ext.has_op("tree_attention"), reason="the C++ extension is not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("fast_path", [True, False], ids=["cpp-layers", "python-modules"])
def test_block_logits_equal_decoding_steps(make_target, dtype, fast_path):
    _, directory = make_target("llama", seed=3, vocab_size=112)
    _assert_block_equals_steps(load_target(directory, dtype=dtype), fast_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("fast_path", [True, False], ids=["cpp-layers", "python-modules"])
def test_weights_changed_in_place_still_give_blocks_their_decoding_steps_logits(
    make_target, dtype, fast_path
):
    """Weights updated in place (``load_state_dict``, a rollback writing back the same values, an edit)
    are packed again at their next use. They used to leave the packed kernels for good: a float32
    linear of more than 16 rows then went to MKL, a verified row no longer equalled its decoding step
    bit for bit, and greedy EAGLE could flip a near-tie against plain decoding."""
    _, directory = make_target("llama", seed=3, vocab_size=112)
    target = load_target(directory, dtype=dtype)
    weights = [m.weight for m in target.modules() if isinstance(m, torch.nn.Linear)] + [target.lm_head_weight]
    assert all(packed_weight(w) is not w for w in weights)
    with torch.no_grad():
        target.load_state_dict(target.state_dict())  # the same values, copied in: every version moves
        target.lm_head_weight.mul_(1.5)
    _assert_block_equals_steps(target, fast_path)
    assert all(packed_weight(w) is not w for w in weights)


def _assert_block_equals_steps(target, fast_path: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    prompt, block = (
        torch.randint(0, 112, (2, 23), generator=gen),
        torch.randint(0, 112, (2, 40), generator=gen),
    )
    T = block.shape[1]
    previous = set_cpu_fast_path(fast_path)
    try:
        with torch.inference_mode():
            stepped, blocked = target.new_cache(2, 80), target.new_cache(2, 80)
            for cache in (stepped, blocked):
                target(prompt, cache)
                cache.advance(prompt.shape[1])
            steps = []
            for t in range(T):
                steps.append(target(block[:, t : t + 1], stepped).logits[:, 0])
                stepped.advance(1)
            mask = torch.tril(torch.ones(T, T, dtype=torch.bool)).expand(2, T, T)
            logits = target(block, blocked, tree_mask=mask).logits
    finally:
        set_cpu_fast_path(previous)
    for t in range(T):
        assert torch.equal(logits[:, t], steps[t]), f"block position {t} differs from its decoding step"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_tree_logits_equal_decoding_each_path(make_target, dtype):
    """A verified tree (tokens at the block's slots, positions by depth, an ancestor mask) gives each
    slot the logits that decoding its path one token at a time gives the slot's token."""
    _, directory = make_target("llama", seed=4, vocab_size=112)
    target = load_target(directory, dtype=dtype)
    gen = torch.Generator().manual_seed(6)
    T = 24
    parents = [-1] + [int(torch.randint(max(0, i - 6), i, (1,), generator=gen)) for i in range(1, T)]
    mask = torch.zeros(1, T, T, dtype=torch.bool)
    depth = [0] * T
    for i, p in enumerate(parents):
        mask[0, i, i] = True
        if p >= 0:
            mask[0, i] |= mask[0, p]
            depth[i] = depth[p] + 1
    prompt, tokens = (
        torch.randint(0, 112, (1, 30), generator=gen),
        torch.randint(0, 112, (1, T), generator=gen),
    )
    with torch.inference_mode():
        cache = target.new_cache(1, 64)
        target(prompt, cache)
        cache.advance(prompt.shape[1])
        positions = torch.tensor(depth)[None] + prompt.shape[1]
        tree = target(tokens, cache, positions=positions, tree_mask=mask).logits
        for i in range(T):
            path = tokens[:, mask[0, i]]  # the slot's ancestors and itself, root first
            decoded = target.new_cache(1, 64)
            target(prompt, decoded)
            decoded.advance(prompt.shape[1])
            for j in range(path.shape[1]):
                step = target(path[:, j : j + 1], decoded).logits[:, 0]
                decoded.advance(1)
            assert torch.equal(tree[:, i], step), (
                f"tree slot {i} (depth {depth[i]}) differs from decoding its path"
            )
