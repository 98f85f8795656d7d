"""Plain decoding's step on CPU in one C++ call (``eagle_C::llama_decode_step``,
csrc/cpu/plain_step.cpp; ``generate_plain._cpu_decode_step``): the same tokens, NaN flag, RNG
counters and cache as the step made from Python, greedy and sampled, in every dtype; it is what runs;
a full cache raises; bad arguments are named."""

from __future__ import annotations

import importlib

import pytest
import torch

import eagle_kernels  # noqa: F401  (loads the extension's ops)
from eagle.models import load_target
from eagle.models.cpu_packed import is_panels, packed_weight
from eagle.models.llama import rope_tables, set_cpu_fast_path
from eagle_kernels import _ext

gp = importlib.import_module(
    "eagle.models.generate_plain"
)  # (eagle.models.generate_plain is also a function)
pytestmark = pytest.mark.skipif(not _ext.has_op("llama_decode_step"), reason="the extension is not built")

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
SAMPLING = {
    "greedy": dict(temperature=0.0),
    "t1": dict(temperature=1.0),
    "warped": dict(temperature=0.7, top_k=9, top_p=0.9, min_p=0.05),
}
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [7], [2, 7, 1, 8, 2, 8, 1]]


@pytest.fixture
def fast_path():
    previous = set_cpu_fast_path(True)
    yield
    set_cpu_fast_path(previous)


def _steps(target, prompts, n, sampling, monkeypatch, one_call: bool):
    calls = []
    real = gp._cpu_decode_step

    def spy(*args, **kwargs):
        step = real(*args, **kwargs)
        calls.append(step is not None)
        return step

    monkeypatch.setattr(gp, "_cpu_decode_step", spy)
    previous = gp.set_cpu_decode_step(one_call)
    try:
        tokens = gp.generate_plain(target, prompts, n, seed=5, **sampling)
    finally:
        gp.set_cpu_decode_step(previous)
    return tokens, calls


@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("B", [1, 3])
def test_one_call_steps_give_the_python_steps_tokens(make_target, monkeypatch, fast_path, dtype, sampling, B):
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=dtype)
    fused, calls = _steps(target, PROMPTS[:B], 20, SAMPLING[sampling], monkeypatch, True)
    assert calls == [True]  # the one-call step ran
    ref, _ = _steps(target, PROMPTS[:B], 20, SAMPLING[sampling], monkeypatch, False)
    assert fused == ref


def _op_args(target, cache, step_input, nonfinite):
    embed, for_op, norm_w, lm_head = target.cpu_forward_weights(step_input)
    doubled, signs = rope_tables(target.inv_freq(step_input.device))
    cfg = target.config
    return (step_input, embed, for_op, cache.kv, cache.seqlens, doubled, signs, cfg.num_heads, cfg.num_kv_heads,
            cfg.rms_norm_eps, norm_w, lm_head, nonfinite)  # fmt: skip


def test_the_op_matches_a_forward_and_an_argmax_and_advances_the_cache(make_target, fast_path):
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    caches = [target.new_cache(2, 8) for _ in range(2)]
    with torch.inference_mode():
        for c in caches:
            target(ids, c)
            c.advance(3)
        step_input, nonfinite = torch.tensor([11, 12]), torch.zeros((), dtype=torch.bool)
        ref = target(step_input[:, None], caches[1])
        want = ref.logits[:, 0].argmax(-1)
        got, hidden = torch.ops.eagle_C.llama_decode_step(*_op_args(target, caches[0], step_input, nonfinite))
    assert torch.equal(got, want) and torch.equal(step_input, want) and not bool(nonfinite)
    assert torch.equal(hidden, ref.hidden)
    assert caches[0].seqlens.tolist() == [4, 4]
    assert torch.equal(caches[0].kv[:, :, :, :, :4], caches[1].kv[:, :, :, :, :4])


def test_a_full_cache_raises_and_is_left_alone(make_target, fast_path):
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    cache = target.new_cache(1, 4)
    cache.advance(4)
    step_input, nonfinite = torch.tensor([1]), torch.zeros((), dtype=torch.bool)
    with torch.inference_mode(), pytest.raises(ValueError, match="KV cache overflow"):
        torch.ops.eagle_C.llama_decode_step(*_op_args(target, cache, step_input, nonfinite))
    assert cache.seqlens.tolist() == [4]


def test_bad_arguments_are_named(make_target, fast_path):
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    cache = target.new_cache(2, 8)
    nonfinite = torch.zeros((), dtype=torch.bool)
    op = torch.ops.eagle_C.llama_decode_step
    with torch.inference_mode():
        with pytest.raises(ValueError, match="step_input must be a contiguous CPU Long tensor"):
            op(*_op_args(target, cache, torch.tensor([1, 2, 3]), nonfinite))
        args = list(_op_args(target, cache, torch.tensor([1, 2]), nonfinite))
        with pytest.raises(ValueError, match="pass all of temperature"):
            op(*args, torch.ones(2))
        args[-1] = torch.zeros(2, dtype=torch.bool)
        with pytest.raises(ValueError, match="nonfinite must be a CPU bool scalar"):
            op(*args)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_in_a_step_raise(make_target, fast_path, temperature):
    """NaN logits from the first step on (the prefill's too: greedy reads its flag at the end), as
    FloatingPointError like every other decoding path (sampled used to raise warp_logits' ValueError)."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    with torch.no_grad():
        target.lm_head_weight[3, 0] = float("nan")
    for one_call in (True, False):
        previous = gp.set_cpu_decode_step(one_call)
        try:
            with pytest.raises(FloatingPointError, match="NaN"):
                gp.generate_plain(target, PROMPTS[:2], 6, temperature=temperature, seed=0)
        finally:
            gp.set_cpu_decode_step(previous)


def test_the_one_call_step_raises_at_the_step_whose_logits_are_nan(make_target, fast_path):
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    steps = gp.plain_decode_steps(target, PROMPTS[:2], 8, temperature=1.0, seed=0)
    next(steps)  # the prefill's token
    next(steps)  # a one-call step
    # the op reads what it was given at the run's start: the packed copy where there is one
    weight = packed_weight(target.lm_head_weight)
    with torch.no_grad():
        if is_panels(weight):  # [N/16, K, 16]: row 3, column 0
            weight[0, 0, 3] = float("nan")
        else:
            weight[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        next(steps)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "t1"])
def test_only_live_rows_set_the_nonfinite_flag(make_target, fast_path, temperature):
    """``live`` (bool [B]): a row that is not live (a finished row a batch still computes, as a frozen
    row of speculative="auto"'s plain steps) may hold NaN logits: the flag stays clear, the live rows'
    tokens are those of a step without the NaN, and the bad row is warped as all-zero logits, not
    refused. Without ``live``, or with the bad row live, the flag is set."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    clean_embed = target.cpu_forward_weights(torch.tensor([0]))[0]
    poisoned_embed = clean_embed.clone()
    poisoned_embed[12] = float("nan")  # row 1's input token: only its logits are NaN

    def step(embed, live):
        cache = target.new_cache(2, 8)
        with torch.inference_mode():
            target(torch.tensor([[5, 6, 7], [8, 9, 10]]), cache)
            cache.advance(3)
            step_input, nonfinite = torch.tensor([11, 12]), torch.zeros((), dtype=torch.bool)
            args = list(_op_args(target, cache, step_input, nonfinite))
            args[1] = embed
            if temperature:
                params = gp.warp_param_tensors(2, temperature, 0, 1.0, 0.0)
                args += [*params, torch.tensor([3, 4]), torch.zeros(2, dtype=torch.int64)]
            token, _ = torch.ops.eagle_C.llama_decode_step(*args, live=live)
        return token, bool(nonfinite)

    clean_token, clean_flag = step(clean_embed, None)
    assert not clean_flag
    token, flag = step(poisoned_embed, torch.tensor([True, False]))
    assert not flag and int(token[0]) == int(clean_token[0])
    assert step(poisoned_embed, None)[1]
    assert step(poisoned_embed, torch.tensor([False, True]))[1]
    with pytest.raises(ValueError, match="live must be a contiguous CPU Bool tensor"):
        step(clean_embed, torch.tensor([1, 0]))


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "t1"])
@pytest.mark.parametrize("one_call", [True, False], ids=["cpp-step", "python-step"])
def test_nan_logits_of_a_row_past_its_eos_do_not_stop_decoding(make_target, fast_path, one_call, temperature):
    """A row that emitted its EOS keeps decoding until every row has (its tokens are cut); NaN/inf in
    its logits, which a batch-1 run never computes, raised FloatingPointError for the whole batch. Here
    the EOS token's embedding is NaN, so exactly the rows past their EOS feed it: the tokens are the
    clean run's. A NaN row before its EOS still raises (test_nan_logits_in_a_step_raise)."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=256)
    target = load_target(path, dtype=torch.float32)
    kw = dict(temperature=temperature, seed=5)
    previous = gp.set_cpu_decode_step(one_call)
    try:
        free = gp.generate_plain(target, PROMPTS, 24, **kw)
        others = set(sum(free[1:] + PROMPTS, []))
        # an EOS that row 0 alone emits, from its 4th token on, and no prompt holds
        eos = [t for i, t in enumerate(free[0]) if i >= 3 and t not in others and t not in free[0][:i]][:1]
        assert eos, "no token of row 0 is missing from the other rows"
        clean = gp.generate_plain(target, PROMPTS, 24, eos_token_id=eos, **kw)
        assert clean[0][-1] == eos[0] and len(clean[0]) < 24 and all(len(r) == 24 for r in clean[1:])
        with torch.no_grad():
            target.embed_tokens.weight[eos[0]] = float("nan")
        assert gp.generate_plain(target, PROMPTS, 24, eos_token_id=eos, **kw) == clean
    finally:
        gp.set_cpu_decode_step(previous)
