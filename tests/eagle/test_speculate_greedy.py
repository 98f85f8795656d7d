"""Lossless greedy EAGLE: token-for-token equal to Hugging Face greedy generate (float64, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import eagle
import eagle_kernels
from eagle.tree import TreeConfig
from tests.eagle.conftest import (
    build_hf_target,
    eagle2_state,
    eagle3_state,
    head_config,
    save_hf_target,
    write_head,
)

# A small vocabulary makes random drafts agree with the target often, so long accepted paths occur.
SMALL = dict(vocab_size=24, max_position_embeddings=256)
TREES = {
    "dynamic-small": TreeConfig(depth=4, topk=4, total_tokens=12),
    "dynamic-paper": TreeConfig(depth=6, topk=10, total_tokens=60),
    "chain": "chain",
    "static": "static",
}


def _make_pair(root, seed: int, kind: str, draft_dtype=None, **overrides):
    hf, target_dir, head_dir = _save_pair(root, seed, kind, **overrides)
    return hf, eagle.load(str(target_dir), str(head_dir), dtype=torch.float64, draft_dtype=draft_dtype)


def _save_pair(root, seed: int, kind: str, **overrides):
    """(HF target, its directory, an EAGLE-2 or EAGLE-3 head's directory) under ``root``."""
    hf = build_hf_target("llama", seed=seed, **(SMALL | overrides))
    target_dir = save_hf_target(hf, root / f"target{seed}")
    cfg = json.loads((target_dir / "config.json").read_text()) | {"head_dim": hf.config.head_dim}
    if kind == "eagle2":
        state = eagle2_state(
            cfg, bias=seed % 2 == 0, embed=hf.model.embed_tokens.weight.detach(), seed=seed + 7
        )
        head_cfg = head_config(cfg, bias=seed % 2 == 0)
    else:
        used = list(range(0, cfg["vocab_size"], 2)) + [1]  # a reduced draft vocabulary exercises d2t
        state = eagle3_state(cfg, prefix="layers.0.", embed=None, draft_vocab=sorted(used), seed=seed + 7)
        head_cfg = head_config(cfg, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=len(used))
    head_dir = write_head(root / f"{kind}{seed}", head_cfg, state, fmt="safetensors", dtype=torch.float32)
    return hf, target_dir, head_dir


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("greedy_pairs")
    return {
        "eagle2-s0": _make_pair(root, 0, "eagle2"),
        "eagle2-s1-mha": _make_pair(root, 1, "eagle2", num_key_value_heads=4),
        "eagle3-s2": _make_pair(root, 2, "eagle3"),
    }


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()


PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [7], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9]]


@pytest.mark.parametrize("tree", list(TREES), ids=list(TREES))
@pytest.mark.parametrize("pair", ["eagle2-s0", "eagle2-s1-mha", "eagle3-s2"])
def test_greedy_equals_hf_generate_ragged_batch(pairs, pair, tree):
    hf, model = pairs[pair]
    n = 30
    res = model.generate(PROMPTS, n, tree=TREES[tree])
    for prompt, got in zip(PROMPTS, res.tokens):
        assert got == hf_greedy(hf, prompt, n)
    assert all(len(t) == n for t in res.tokens)
    assert res.target_forwards == sum(len(a) for a in res.accept_lengths)
    # Every token after the first comes from a target forward of the decode phase.
    assert [sum(a) for a in res.accept_lengths] == [n - 1] * len(PROMPTS)
    assert res.mean_accept_length == pytest.approx(len(PROMPTS) * (n - 1) / res.target_forwards)


@pytest.fixture(scope="module")
def mixed_pairs(tmp_path_factory):
    """float64 targets with float32 heads (``draft_dtype``)."""
    root = tmp_path_factory.mktemp("mixed_pairs")
    return {
        kind: _make_pair(root, seed, kind, draft_dtype=torch.float32)
        for seed, kind in ((3, "eagle2"), (4, "eagle3"))
    }


@pytest.mark.parametrize("tree", ["dynamic-small", "chain", "static"])
@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_a_head_in_another_dtype_leaves_the_output_unchanged(mixed_pairs, kind, tree):
    """The head only proposes; the float64 target verifies: token for token HF's greedy output."""
    hf, model = mixed_pairs[kind]
    assert model.head.dtype == torch.float32 and model.target.dtype == torch.float64
    n = 24
    res = model.generate(PROMPTS, n, tree=TREES[tree])
    for prompt, got in zip(PROMPTS, res.tokens):
        assert got == hf_greedy(hf, prompt, n)
    assert res.mean_accept_length > 1.0, "the float32 head still drafts tokens that get accepted"


def test_batch_equals_each_alone(pairs):
    _, model = pairs["eagle2-s0"]
    together = model.generate(PROMPTS, 20).tokens
    alone = [model.generate([p], 20).tokens[0] for p in PROMPTS]
    assert together == alone


def test_speculative_false_is_plain_decoding(pairs):
    hf, model = pairs["eagle2-s0"]
    res = model.generate(PROMPTS[:1], 12, speculative=False)
    assert res.tokens[0] == hf_greedy(hf, PROMPTS[0], 12)
    assert res.accept_lengths == [[1] * 11]


def test_long_accepted_paths_happen(pairs):
    """The small vocabulary must produce multi-token acceptances, or the tests above prove little."""
    _, model = pairs["eagle2-s0"]
    res = model.generate(PROMPTS, 40, tree=TREES["dynamic-paper"])
    assert max(max(a) for a in res.accept_lengths) >= 3
    assert res.mean_accept_length > 1.2


def test_eos_stops_and_is_included(pairs):
    hf, model = pairs["eagle2-s0"]
    ref = hf_greedy(hf, PROMPTS[0], 30)
    eos = ref[10]
    first = ref.index(eos)
    res = model.generate([PROMPTS[0], PROMPTS[1]], 30, eos_token_id=eos)
    assert res.tokens[0] == ref[: first + 1]
    ref1 = hf_greedy(hf, PROMPTS[1], 30)
    cut = ref1.index(eos) + 1 if eos in ref1 else 30
    assert res.tokens[1] == ref1[:cut]


def test_stream_yields_the_same_tokens(pairs):
    _, model = pairs["eagle2-s0"]
    chunks = list(model.stream(PROMPTS[0], 25))
    assert [t for c in chunks for t in c] == model.generate([PROMPTS[0]], 25).tokens[0]
    assert len(chunks) >= 2


def test_stream_without_speculation(pairs):
    """stream(speculative=False): one token per chunk, the same tokens as generate(speculative=False)
    greedy and sampled, stopping after an EOS; it needs no draft head."""
    hf, model = pairs["eagle2-s0"]
    p = PROMPTS[0]
    chunks = list(model.stream(p, 20, speculative=False))
    assert [len(c) for c in chunks] == [1] * 20
    assert (
        [c[0] for c in chunks] == model.generate([p], 20, speculative=False).tokens[0] == hf_greedy(hf, p, 20)
    )
    kw = dict(temperature=1.0, seed=5, speculative=False)
    assert [t for c in model.stream(p, 16, **kw) for t in c] == model.generate([p], 16, **kw).tokens[0]
    eos = chunks[6][0]
    expected = model.generate([p], 20, speculative=False, eos_token_id=eos).tokens[0]
    assert [c[0] for c in model.stream(p, 20, speculative=False, eos_token_id=eos)] == expected
    assert expected[-1] == eos and len(expected) <= 7
    headless = eagle.EagleModel(model.target, None)
    assert list(headless.stream(p, 5, speculative=False)) == chunks[:5]
    with pytest.raises(ValueError, match="needs a draft head"):
        next(headless.stream(p, 5))


def test_max_new_tokens_one(pairs):
    hf, model = pairs["eagle2-s0"]
    assert model.generate(PROMPTS, 1).tokens == [hf_greedy(hf, p, 1) for p in PROMPTS]


@pytest.mark.parametrize(
    "prompts,kwargs,error,match",
    [
        ([[]], {}, ValueError, "prompt 0 is empty"),
        ([[1, 2, 999]], {}, ValueError, "outside the vocabulary"),
        ([[1, 2, 24]], {}, ValueError, r"outside the vocabulary \[0, 24\): \[24\]"),  # = vocab_size
        ([[1, 2]], {"max_new_tokens": 10_000}, ValueError, "max_position_embeddings"),
        ([[1, 2]], {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ([[1, 2]], {"tree": "bushy"}, ValueError, "tree must be"),
        ([[1, 2]], {"temperature": -1.0}, ValueError, "temperature"),
        ([[1, 2]], {"top_p": 0.0}, ValueError, "top_p"),
        ([1, 2], {}, TypeError, "list of prompts"),
        (["hello"], {}, ValueError, "tokenizer"),
        # ids that are not integers are refused, never truncated
        ([[1, 2.7]], {}, TypeError, r"holds 2\.7 \(float\); token ids must be integers"),
        ([[1, True]], {}, TypeError, "token ids must be integers"),
        ([[[1, 2]]], {}, TypeError, "token ids must be integers"),
        (torch.tensor([1, 2]), {}, TypeError, "not a single prompt"),
        (torch.tensor([[1.0, 2.0]]), {}, TypeError, "token ids must be integers"),
        (5, {}, TypeError, "got int"),
        ([[1, 2]], {"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an int"),
        ([[1, 2]], {"max_new_tokens": True}, TypeError, "max_new_tokens must be an int"),
        ([[1, 2]], {"eos_token_id": 1.5}, TypeError, "eos_token_id must be an int or a list of ints"),
        ([[1, 2]], {"eos_token_id": [3, None]}, TypeError, "eos_token_id must be an int or a list"),
        ([[1, 2]], {"eos_token_id": [3, 999]}, ValueError, "outside the vocabulary"),
        ([], {}, ValueError, "prompts is empty"),
        (
            [torch.tensor([[1, 2]])],
            {},
            ValueError,
            r"prompt 0 must be a 1-D sequence of token ids, got shape \(1, 2\)",
        ),
        ([None], {}, TypeError, "prompt 0 must be a string or a sequence of token ids, got NoneType"),
        (
            [[1, 2]],
            {"speculative": "auto", "cuda_graph": True},
            ValueError,
            "does not run with cuda_graph=True",
        ),
    ],
)
def test_bad_input(pairs, prompts, kwargs, error, match):
    _, model = pairs["eagle2-s0"]
    with pytest.raises(error, match=match):
        model.generate(prompts, **({"max_new_tokens": 5} | kwargs))


LOW_LEVEL_BAD_INPUT = [
    ({"eos_token_id": "12"}, TypeError, "eos_token_id.? must be an int or a list of ints"),  # was digits 1, 2
    ({"eos_token_id": [3.9]}, TypeError, "must be an int or a list of ints"),  # was cut to 3
    ({"eos_token_id": [3, 999]}, ValueError, r"outside the vocabulary \[0, 24\)"),  # never matched
    ({"prompts": [[5.9, 6.2]]}, TypeError, r"prompt 0 holds 5\.9 \(float\); token ids must be integers"),
    ({"prompts": [5, 6]}, TypeError, "not a single prompt"),
    ({"prompts": "abc"}, TypeError, "list of token-id lists, got str"),
    ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an integer"),
]


@pytest.mark.parametrize("kwargs,error,match", LOW_LEVEL_BAD_INPUT)
def test_low_level_loops_refuse_what_generate_refuses(pairs, kwargs, error, match):
    """generate_plain and SpeculativeDecoder.run (the loops under generate) took a string of stop ids as
    its digits and cut float ids and budgets to integers, without a word."""
    from eagle.models.generate_plain import generate_plain
    from eagle.speculate import SamplingParams, SpeculativeDecoder

    _, model = pairs["eagle2-s0"]
    args = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, "eos_token_id": None} | kwargs
    with pytest.raises(error, match=match):
        generate_plain(
            model.target, args["prompts"], args["max_new_tokens"], eos_token_id=args["eos_token_id"]
        )
    decoder = SpeculativeDecoder(model.target, model.head, TreeConfig(depth=2, topk=2, total_tokens=4))
    eos = () if args["eos_token_id"] is None else args["eos_token_id"]
    with pytest.raises(error, match=match):
        next(decoder.run(args["prompts"], args["max_new_tokens"], SamplingParams(), eos_token_ids=eos))


def test_a_numpy_batch_of_ragged_id_lists_is_a_batch(pairs):
    """A 1-D numpy object array holds one prompt per entry; it was refused as 'a single prompt'."""
    import numpy as np

    _, model = pairs["eagle2-s0"]
    want = model.generate([[1, 2, 3], [4, 5]], 4).tokens
    assert model.generate(np.array([[1, 2, 3], [4, 5]], dtype=object), 4).tokens == want


def test_generate_takes_a_tokenizers_output_unpacked_as_transformers_does(pairs):
    """``m.generate(**tokenizer(texts, padding=True))``: input_ids= and attention_mask= as keywords."""
    _, model = pairs["eagle2-s0"]
    rows = [[5, 6, 7, 8], [9, 10]]
    want = model.generate(rows, 5).tokens
    encoded = {
        "input_ids": torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]]),
        "attention_mask": torch.tensor([[1] * 4, [0, 0, 1, 1]]),
    }
    assert model.generate(**encoded, max_new_tokens=5).tokens == want
    assert model.generate(input_ids=rows, max_new_tokens=5).tokens == want
    with pytest.raises(TypeError, match="needs prompts"):
        model.generate(max_new_tokens=5)
    with pytest.raises(TypeError, match="both prompts and input_ids"):
        model.generate(rows, 5, input_ids=rows)


def test_a_padded_batch_with_its_attention_mask_decodes_its_rows_unpadded(pairs):
    """A tokenizer's padded output (left or right padding) gives each row's tokens unpadded: the pad
    ids are dropped, as transformers' generate ignores them; a BatchEncoding-like mapping too."""
    _, model = pairs["eagle2-s0"]
    rows = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    want = model.generate(rows, 6).tokens
    right = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0], [11, 12, 13, 0]])
    right_mask = (torch.arange(4) < torch.tensor([[4], [2], [3]])).long()
    left = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10], [0, 11, 12, 13]])
    left_mask = right_mask.flip(1)
    assert model.generate(right, 6, attention_mask=right_mask).tokens == want
    assert model.generate(left.numpy(), 6, attention_mask=left_mask.bool().numpy()).tokens == want
    mapping = {"input_ids": left, "attention_mask": left_mask}
    assert model.generate(mapping, 6).tokens == want
    assert (
        model.generate(right.tolist(), 6, speculative=False, attention_mask=right_mask.tolist()).tokens
        == want
    )
    assert model.generate(right, 6, attention_mask=right_mask.float()).tokens == want  # 0. / 1. too
    # a tokenizer's unpadded output: ragged rows, every mask row all ones
    assert (
        model.generate({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}, 6).tokens == want
    )
    bad = [
        (dict(prompts=right, attention_mask=right_mask[:, :3]), ValueError, "must have its length 4, got 3"),
        (dict(prompts=right, attention_mask=right_mask[:2]), ValueError, "a row per prompt"),
        (
            dict(prompts=torch.tensor([5, 6]), attention_mask=torch.tensor([1, 1])),
            ValueError,
            "a single prompt: pass a batch of one",
        ),
        (dict(prompts=right, attention_mask=right_mask * 2), ValueError, "must hold 0 and 1"),
        (dict(prompts=right, attention_mask=right_mask * 0), ValueError, "prompt 0 is all padding"),
        (
            dict(prompts=right, attention_mask=torch.tensor([[1, 0, 1, 1]] * 3)),
            ValueError,
            "padding between its tokens",
        ),
        (dict(prompts=mapping, attention_mask=left_mask), ValueError, "given twice"),
        (dict(prompts={"ids": left}), TypeError, "without 'input_ids'"),
        (
            dict(prompts=[[1, 2], [3]], attention_mask=[[1, 1], [1, 1]]),
            ValueError,
            "must have its length 1, got 2",
        ),
        (dict(prompts=right.float(), attention_mask=right_mask), TypeError, "token ids must be integers"),
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            model.generate(max_new_tokens=3, **kwargs)


def test_low_level_loops_take_stop_ids_as_a_set_or_a_tensor(pairs):
    from eagle.models.generate_plain import generate_plain

    _, model = pairs["eagle2-s0"]
    free = generate_plain(model.target, [[1, 2, 3]], 12)[0]
    stop = free[3]
    want = free[: free.index(stop) + 1]
    for eos in (stop, {stop}, [stop], torch.tensor([stop]), [torch.tensor(stop)]):
        assert generate_plain(model.target, [[1, 2, 3]], 12, eos_token_id=eos)[0] == want


def test_low_level_loops_take_a_numpy_batch_of_ragged_id_lists(pairs):
    import numpy as np

    from eagle.models.generate_plain import generate_plain

    _, model = pairs["eagle2-s0"]
    want = generate_plain(model.target, [[1, 2, 3], [4, 5]], 5)
    assert generate_plain(model.target, np.array([[1, 2, 3], [4, 5]], dtype=object), 5) == want


def test_a_refused_stop_id_keeps_the_kept_buffers_and_the_global_generator(pairs):
    """The stop ids are checked before a plain run takes its kept buffers (with reuse_buffers /
    cuda_graph) or draws a seed: a refused call lost the kept cache and graph, and moved the caller's
    generator."""
    import importlib

    from eagle.speculate import SamplingParams, SpeculativeDecoder

    gp = importlib.import_module("eagle.models.generate_plain")  # (the package exports the function)

    _, model = pairs["eagle2-s0"]
    list(gp.plain_decode_steps(model.target, [[1, 2, 3]], 4, reuse_buffers=True))
    kept = len(gp._pool_of(model.target)._entries)
    assert kept >= 1
    before = torch.get_rng_state()
    for bad in ("12", [2.0], [999]):
        with pytest.raises((TypeError, ValueError)):
            list(gp.plain_decode_steps(model.target, [[1, 2, 3]], 4, reuse_buffers=True, eos_token_id=bad))
        with pytest.raises((TypeError, ValueError)):
            list(gp.plain_decode_steps(model.target, [[1, 2, 3]], 4, temperature=1.0, eos_token_id=bad))
        decoder = SpeculativeDecoder(model.target, model.head, TreeConfig(depth=2, topk=2, total_tokens=4))
        with pytest.raises((TypeError, ValueError)):
            next(decoder.run([[1, 2, 3]], 4, SamplingParams(temperature=1.0), eos_token_ids=bad))
    for bad in (dict(seed=-1), dict(seed="x"), dict(top_p=2.0), dict(temperature=float("nan"))):
        sampled = {"temperature": 1.0} | bad  # (a bad seed or filter was refused after the take and draw)
        with pytest.raises((TypeError, ValueError)):
            list(gp.plain_decode_steps(model.target, [[1, 2, 3]], 4, reuse_buffers=True, **sampled))
    decoder = SpeculativeDecoder(model.target, model.head, TreeConfig(depth=2, topk=2, total_tokens=4))
    with pytest.raises(ValueError, match="seed"):
        next(decoder.run([[1, 2, 3]], 4, SamplingParams(temperature=1.0), seed=-1))
    with pytest.raises(TypeError, match="must be an int or a list of ints"):
        gp.generate_plain(model.target, [[1, 2, 3]], 4, eos_token_id=[torch.tensor(True)])
    assert len(gp._pool_of(model.target)._entries) == kept
    assert torch.equal(torch.get_rng_state(), before)


def test_stream_refuses_unknown_arguments(pairs):
    _, model = pairs["eagle2-s0"]
    with pytest.raises(TypeError, match=r"unexpected arguments: \['bogus'\]"):
        model.stream([1, 2], 4, bogus=1)


def test_streams_bad_prompts_get_messages_about_one_prompt(pairs):
    """stream() takes one prompt; its errors came from generate()'s checks, which told a caller passing
    an int to pass "not a single prompt" and spoke of "prompt 0"."""
    _, model = pairs["eagle2-s0"]
    one = r"stream\(\) takes one prompt: a str, a 1-D sequence of token ids or a conversation"
    for bad, error, message in [
        (5, TypeError, one + ", got int"),
        ([[1, 2], [3]], TypeError, one + r", not a list of prompts \(generate\(\) takes a batch\)"),
        ([torch.tensor([1, 2])], TypeError, "not a list of prompts"),
        (torch.tensor([[1, 2]]), TypeError, one + r", got an array of shape \(1, 2\)"),
        ([], ValueError, "^the prompt is empty$"),
        ([1, 2.5], TypeError, r"^the prompt holds 2\.5 \(float\); token ids must be integers"),
        ([1, 24], ValueError, r"^the prompt holds token ids outside the vocabulary \[0, 24\)"),
    ]:
        with pytest.raises(error, match=message):
            model.stream(bad, 3)
    assert sum(model.stream(torch.tensor([3, 1, 4]), 3), []) == model.generate([[3, 1, 4]], 3).tokens[0]


def test_speculation_without_a_head_names_the_mode_asked_for(pairs, tmp_path):
    hf, _ = pairs["eagle2-s0"]
    plain = eagle.load(str(save_hf_target(hf, tmp_path / "target")), dtype=torch.float64)
    for speculative in (True, "auto"):
        with pytest.raises(ValueError, match=rf"^speculative={speculative!r} needs a draft head"):
            plain.generate([[1, 2]], 3, speculative=speculative)
        with pytest.raises(ValueError, match=rf"^speculative={speculative!r} needs a draft head"):
            plain.stream([1, 2], 3, speculative=speculative)


def test_a_seeded_sampled_auto_call_warns_that_it_does_not_repeat(pairs):
    """speculative="auto" picks plain steps or rounds by the clock and they draw differently, so a seed
    does not make a sampled call repeat; the docstrings said so, the call did not."""
    _, model = pairs["eagle2-s0"]
    for call in (model.generate, lambda p, n, **kw: list(model.stream(p[0], n, **kw))):
        with pytest.warns(UserWarning, match="a seeded sampled call does not repeat") as caught:
            call([[1, 2]], 3, speculative="auto", temperature=1.0, seed=4)
        assert caught[0].filename == __file__  # pointing at the caller
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate([[1, 2]], 3, speculative="auto", seed=4)  # greedy: it repeats
        model.generate([[1, 2]], 3, speculative="auto", temperature=1.0)  # no seed: nothing promised
        model.generate([[1, 2]], 3, speculative=True, temperature=1.0, seed=4)


@pytest.mark.parametrize("speculative", [True, False], ids=["eagle", "plain"])
def test_bad_input_is_checked_before_anything_runs(pairs, speculative):
    _, model = pairs["eagle2-s0"]
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        model.generate([[1, 2]], 3.0, speculative=speculative)
    with pytest.raises(TypeError, match="token ids must be integers"):
        model.generate([[1.0, 2.0]], 3, speculative=speculative)


def test_integer_ids_of_other_types_are_accepted(pairs):
    np = pytest.importorskip("numpy")
    _, model = pairs["eagle2-s0"]
    want = model.generate([[3, 1, 4], [7, 2]], 4).tokens
    assert model.generate([np.array([3, 1, 4]), torch.tensor([7, 2])], 4).tokens == want
    assert model.generate([[np.int64(3), 1, torch.tensor(4)], (7, 2)], 4).tokens == want
    assert model.generate(torch.tensor([[3, 1, 4]]), 4).tokens == want[:1]
    # numpy integers for the lengths and stop ids as well, as for the ids and the seed
    want = model.generate([[3, 1, 4]], 4, eos_token_id=[5, 6]).tokens
    assert model.generate([[3, 1, 4]], np.int64(4), eos_token_id=np.array([5, 6])).tokens == want
    assert model.generate([[3, 1, 4]], 4, eos_token_id=np.int32(5)).tokens == (
        model.generate([[3, 1, 4]], 4, eos_token_id=5).tokens
    )
    with pytest.raises(TypeError, match="eos_token_id must be an int"):
        model.generate([[3, 1, 4]], 4, eos_token_id=np.array([5.0]))


@pytest.mark.parametrize("speculative", [True, False], ids=["eagle", "plain"])
def test_stream_checks_the_length_when_called(pairs, speculative):
    """Not at the first next(): the CLI echoes the prompt between the two."""
    _, model = pairs["eagle2-s0"]
    prompt = [1] * (SMALL["max_position_embeddings"] - 3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.stream(prompt, 4, speculative=speculative)
    assert len(list(model.stream(prompt, 3, speculative=speculative, eos_token_id=[]))) >= 1


def test_cpu_0_is_the_cpu():
    model = eagle.load("tiny-code", device="cpu:0")
    assert model.generate(["def f("], 2).tokens == eagle.load("tiny-code").generate(["def f("], 2).tokens
    from eagle.models import load_draft

    load_draft(eagle.api._resolve_bundled("tiny-code", "draft"), model.target, device="cpu:0")  # directly
    with pytest.raises(ValueError, match="the CPU is 'cpu'"):
        eagle.load("tiny-code", device="cpu:1")


def test_plain_decoding_takes_numpy_stop_ids(pairs):
    np = pytest.importorskip("numpy")
    from eagle.models import generate_plain

    target = pairs["eagle2-s0"][1].target
    want = generate_plain(target, [[3, 1, 4]], 6, eos_token_id=[5, 6])
    assert generate_plain(target, [[3, 1, 4]], 6, eos_token_id=np.array([5, 6])) == want
    assert generate_plain(target, [[3, 1, 4]], 6, eos_token_id=np.int64(5)) == (
        generate_plain(target, [[3, 1, 4]], 6, eos_token_id=5)
    )


def test_load_names_a_bad_device_or_dtype(pairs):
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda'"):
        eagle.load("tiny-code", device="tpu")
    with pytest.raises(TypeError, match="dtype must be one of"):
        eagle.load("tiny-code", dtype="fp33")
    with pytest.raises(TypeError, match="draft_dtype: dtype must be one of"):
        eagle.load("tiny-code", draft_dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            eagle.load("tiny-code", device="cuda")


@pytest.mark.parametrize("target, draft", [(None, None), (3, None), (b"tiny-code", None), ("tiny-code", 5)])
def test_load_names_a_target_or_draft_that_is_not_a_path(target, draft):
    """None, a number or bytes used to fail deep in pathlib ("expected str, bytes or os.PathLike ...")."""
    name = "draft" if draft is not None else "target"
    with pytest.raises(TypeError, match=f"load: {name} must be a str or os.PathLike"):
        eagle.load(target, draft)


def test_generation_config_eos_is_the_default_stop(tmp_path):
    """transformers' generate stops on generation_config.json's eos (chat checkpoints list their
    end-of-turn token only there); so does generate without eos_token_id."""
    hf = build_hf_target("llama", seed=0, **SMALL)
    target_dir = save_hf_target(hf, tmp_path / "t")
    model = eagle.load(str(target_dir), None, dtype=torch.float64)
    free = model.generate([[3, 1, 4]], 12, speculative=False).tokens[0]
    stop = free[4]
    unused = next(t for t in range(SMALL["vocab_size"]) if t not in free)  # a list of two, one never hit
    cfg = (
        json.loads((target_dir / "generation_config.json").read_text())
        if (target_dir / "generation_config.json").exists()
        else {}
    )
    (target_dir / "generation_config.json").write_text(json.dumps(cfg | {"eos_token_id": [unused, stop]}))
    model = eagle.load(str(target_dir), None, dtype=torch.float64)
    stopped = model.generate([[3, 1, 4]], 12, speculative=False).tokens[0]
    assert stopped == free[: free.index(stop) + 1]
    assert len(stopped) < len(free)
    # an explicit eos_token_id still wins
    assert model.generate([[3, 1, 4]], 12, speculative=False, eos_token_id=[]).tokens[0] == free


def test_a_bad_eos_in_the_checkpoints_files_is_named_there(tmp_path):
    """The caller passed no eos_token_id, yet the error said "eos_token_id holds ids outside the
    vocabulary" without naming the file the id came from or how to get past it."""
    hf = build_hf_target("llama", seed=0, **SMALL)
    target_dir = save_hf_target(hf, tmp_path / "t")
    V = SMALL["vocab_size"]
    (target_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 500}))
    model = eagle.load(str(target_dir), None, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=rf"the target's generation_config.json eos_token_id holds ids outside the vocabulary "
        rf"\[0, {V}\): \[500\] \(pass eos_token_id= to override it\)",
    ):
        model.generate([[3, 1, 4]], 4, speculative=False)
    assert (
        len(model.generate([[3, 1, 4]], 4, speculative=False, eos_token_id=[]).tokens[0]) == 4
    )  # the way past it
    (target_dir / "generation_config.json").unlink()
    config = json.loads((target_dir / "config.json").read_text())
    (target_dir / "config.json").write_text(json.dumps(config | {"eos_token_id": "2"}))
    model = eagle.load(str(target_dir), None, dtype=torch.float64)
    with pytest.raises(
        TypeError, match=r"the target's config.json eos_token_id must be an int or a list of ints"
    ):
        model.generate([[3, 1, 4]], 4, speculative=False)


@pytest.mark.parametrize(
    "generation_config", [None, {}, {"eos_token_id": None}], ids=["no-file", "no-key", "null"]
)
def test_config_eos_applies_only_without_a_generation_config(tmp_path, generation_config):
    """As transformers' generate: config.json's eos is the stop id only when the checkpoint has no
    generation_config.json; a file without an eos (fine-tunes often ship only sampling keys) stops
    on nothing."""
    from transformers import AutoModelForCausalLM

    hf = build_hf_target("llama", seed=0, **SMALL)
    target_dir = save_hf_target(hf, tmp_path / "t")
    free = (
        eagle.load(str(target_dir), None, dtype=torch.float64)
        .generate([[3, 1, 4]], 12, speculative=False, eos_token_id=[])
        .tokens[0]
    )
    config = json.loads((target_dir / "config.json").read_text())
    (target_dir / "config.json").write_text(json.dumps(config | {"eos_token_id": free[4]}))
    (target_dir / "generation_config.json").unlink(missing_ok=True)
    if generation_config is not None:
        (target_dir / "generation_config.json").write_text(json.dumps(generation_config))
    hf = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float64).eval()
    want = hf.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=12, do_sample=False, pad_token_id=0)[
        0, 3:
    ].tolist()
    got = (
        eagle.load(str(target_dir), None, dtype=torch.float64)
        .generate([[3, 1, 4]], 12, speculative=False)
        .tokens[0]
    )
    assert got == want
    assert len(got) == (5 if generation_config is None else 12)


def test_plain_sampling_gives_each_row_its_own_stream(pairs):
    """speculative=False with a seed: a row's tokens depend on the seed, its index and its prompt
    only, as in the speculative loop (one shared generator made rows depend on their neighbours)."""
    _, model = pairs["eagle2-s0"]
    p, q = PROMPTS[0], PROMPTS[2]
    kw = dict(temperature=1.0, seed=11, speculative=False)
    together = model.generate([p, p, q], 16, **kw).tokens
    assert model.generate([p], 16, **kw).tokens[0] == together[0]
    assert model.generate([p, p], 16, **kw).tokens == together[:2]
    assert together[0] != together[1]  # same prompt, independent streams
    assert model.generate([p, p, q], 16, **kw).tokens == together  # reproducible


@pytest.mark.parametrize(
    ("weight", "dtype"),
    [
        ("lm_head", torch.float64),
        ("q_proj", torch.float64),
        ("q_proj", torch.float32),
        ("q_proj", torch.bfloat16),
    ],
)
def test_nan_logits_raise(pairs, tmp_path, weight, dtype):
    """A NaN weight must end the call, not decode other text: in the lm_head it reaches the logits
    directly; in a query projection it reaches them through tree_attention, whose C++ CPU kernel once
    turned a row of only NaN scores into zeros (float32, bfloat16: the default CPU path)."""
    bad = build_hf_target("llama", seed=0, **SMALL)
    with torch.no_grad():
        if weight == "lm_head":
            bad.lm_head.weight[3, 0] = float("nan")
        else:
            bad.model.layers[1].self_attn.q_proj.weight[0, 3] = float("nan")
    target_dir = save_hf_target(bad, tmp_path / "nan_target")
    model = eagle.load(str(target_dir), str(pairs["eagle2-s0"][1].head.checkpoint_dir), dtype=dtype)
    with pytest.raises(FloatingPointError, match="NaN"):
        model.generate([[1, 2, 3]], 5)
    with pytest.raises(FloatingPointError, match="NaN"):  # plain decoding too, not garbage tokens
        model.generate([[1, 2, 3]], 5, speculative=False)
    with pytest.raises(FloatingPointError, match="NaN"):  # streamed: raised before a token is yielded
        next(model.stream([1, 2, 3], 5, speculative=False))


@pytest.mark.parametrize("tree", ["chain", "dynamic-small"])
def test_a_request_up_to_the_position_limit_runs(pairs, tree):
    """prompt + max_new_tokens == max_position_embeddings: allowed as in plain decoding (tree rows
    past the limit only hold tokens beyond the budget) and still equal to HF."""
    hf, model = pairs["eagle2-s0"]
    prompt = PROMPTS[0]
    n = SMALL["max_position_embeddings"] - len(prompt)
    got = model.generate([prompt], n, tree=TREES[tree]).tokens[0]
    assert got == model.generate([prompt], n, speculative=False).tokens[0] == hf_greedy(hf, prompt, n)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate([prompt], n + 1, tree=TREES[tree])


def test_plain_decoding_refuses_an_over_long_request(pairs):
    _, model = pairs["eagle2-s0"]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate([[1, 2]], 10_000, speculative=False)


def test_a_tree_shallower_than_its_depth_runs(pairs):
    """total_tokens < depth + 1 is a valid TreeConfig: the loop drafts only the levels n slots can hold."""
    hf, model = pairs["eagle2-s0"]
    res = model.generate(PROMPTS[:1], 16, tree=TreeConfig(depth=6, topk=3, total_tokens=4))
    assert res.tokens[0] == hf_greedy(hf, PROMPTS[0], 16)
    assert max(res.accept_lengths[0]) <= 4


def test_accept_lengths_count_emitted_tokens(pairs):
    _, model = pairs["eagle2-s0"]
    for n in (2, 3, 17):
        res = model.generate(PROMPTS, n, tree=TREES["dynamic-paper"])
        # the first token comes from the prefill; each later forward's count is what it emitted
        assert [sum(a) + 1 for a in res.accept_lengths] == [len(t) for t in res.tokens]


def test_a_stream_does_not_change_a_later_result(pairs):
    _, model = pairs["eagle2-s0"]
    stream = model.stream(PROMPTS[0], 25)
    next(stream)
    res = model.generate(PROMPTS[1:2], 20)
    before = [list(a) for a in res.accept_lengths]
    rest = list(stream)
    assert rest and res.accept_lengths == before


def test_head_for_another_target_is_refused(pairs, tmp_path):
    hf = build_hf_target(
        "llama", seed=5, **(SMALL | {"hidden_size": 32, "intermediate_size": 48, "head_dim": 16})
    )
    target_dir = save_hf_target(hf, tmp_path / "other")
    head_dir = tmp_path / "head"
    eagle.models.save_draft(pairs["eagle2-s0"][1].head, head_dir)
    with pytest.raises(ValueError, match="hidden"):
        eagle.load(str(target_dir), str(head_dir), dtype=torch.float64)


@pytest.mark.parametrize("head_dim", [8, 264])
def test_a_head_size_the_kernels_do_not_take_is_refused_at_load(tmp_path, head_dim):
    """Not at the first generate (plain decoding included), where the kernels would refuse it."""
    hf = build_hf_target("llama", seed=5, **(SMALL | {"head_dim": head_dim}))
    target_dir = save_hf_target(hf, tmp_path / "t")
    with pytest.raises(ValueError, match=f"head_dim={head_dim} is outside the 16..256"):
        eagle.load(str(target_dir), dtype=torch.float64)


def test_a_corrupt_target_embedding_is_not_blamed_on_its_head(tmp_path):
    from safetensors.torch import load_file, save_file

    _, target_dir, head_dir = _save_pair(tmp_path, 0, "eagle2")  # an EAGLE-2 head storing the embedding
    eagle.load(str(target_dir), str(head_dir), dtype=torch.float64)  # the pair is sound
    (weights,) = target_dir.glob("*.safetensors")
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[key][2, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="the target's embed_tokens holds NaN or inf"):
        eagle.load(str(target_dir), str(head_dir), dtype=torch.float64)


def test_a_head_passed_as_the_target_is_named_as_a_head(tmp_path):
    _, _, head_dir = _save_pair(tmp_path, 0, "eagle2")
    with pytest.raises(
        ValueError, match="is an EAGLE draft head .*, not a target model: pass it as the draft"
    ):
        eagle.load(str(head_dir), dtype=torch.float64)


def test_static_tree_is_mc_sim_7b_63(pairs):
    _, model = pairs["eagle2-s0"]
    decoder = model._decoder("static")
    assert decoder.num_tokens == len(eagle_kernels.MC_SIM_7B_63) + 1 == 26
    assert decoder.depth == 5


def test_missing_bundled_part_is_named(monkeypatch, tmp_path):
    import eagle.api

    (tmp_path / "tiny-code" / "target").mkdir(parents=True)
    (tmp_path / "tiny-code" / "target" / "config.json").write_text("{}")
    monkeypatch.setattr(eagle.api, "ASSETS", tmp_path)
    with pytest.raises(FileNotFoundError, match="'tiny-code' draft"):
        eagle.load("tiny-code")


def test_a_sliding_window_checkpoint_speculates_up_to_its_window(tmp_path):
    """The window bounds what emitted tokens attend to (prompt + max_new_tokens), as for plain
    decoding: the cache's extra room for a draft tree (and the tree probe's cache) is not refused,
    and a request past the window is, by name."""
    window = 32
    hf = build_hf_target("mistral", seed=3, **(SMALL | {"sliding_window": window}))
    target_dir = save_hf_target(hf, tmp_path / "mistral")
    cfg = json.loads((target_dir / "config.json").read_text()) | {"head_dim": hf.config.head_dim}
    state = eagle2_state(cfg, bias=False, embed=hf.model.embed_tokens.weight.detach(), seed=5)
    head_dir = write_head(
        tmp_path / "head", head_config(cfg, bias=False), state, fmt="safetensors", dtype=torch.float32
    )
    model = eagle.load(str(target_dir), str(head_dir), dtype=torch.float64)
    prompt = PROMPTS[0]
    n = window - len(prompt)
    want = hf_greedy(hf, prompt, n)
    for tree in (TREES["dynamic-paper"], "dynamic", "chain"):
        assert model.generate([prompt], n, tree=tree).tokens[0] == want, tree
    assert model.generate([prompt], n, speculative=False).tokens[0] == want
    for speculative in (True, False):
        with pytest.raises(
            ValueError, match=r"prompt \+ max_new_tokens \(33\) exceeds the checkpoint's sliding_window=32"
        ):
            model.generate([prompt], n + 1, speculative=speculative)


def test_a_paused_stream_leaves_the_callers_grad_mode_alone(pairs):
    """A `with torch.inference_mode()` inside the stream's generator stayed on in the caller while it
    was paused (tensors made between reads were inference tensors), and two interleaved streams left
    the process in inference mode for good."""
    _, model = pairs["eagle2-s0"]
    a, b = model.stream(PROMPTS[0], 12), model.stream(PROMPTS[1], 12)
    next(a)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    next(b)
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()  # an inference-mode tensor would refuse this
    assert torch.equal(x.grad, torch.full((2,), 2.0))
    list(a), list(b)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert [t for c in model.stream(PROMPTS[0], 12) for t in c] == model.generate([PROMPTS[0]], 12).tokens[0]


@pytest.mark.parametrize("pair", ["eagle2-s0", "eagle3-s2"])
def test_a_one_path_static_tree_drafts_what_the_chain_drafts(pairs, monkeypatch, pair):
    """The static tree's levels and the dynamic tree's are drafted by separate code, each computing the
    draft's positions and ancestor masks its own way; a position one off (the draft's RoPE) only lowers
    acceptance, which no output shows. A static tree of one path must feed the draft exactly what the
    chain (a dynamic tree of top-k 1) feeds it, round after round: the same positions, tokens and
    visibility, hence the same drafts (the Python drafting of both is compared; on CPU the dynamic
    tree's own C++ path is held to it by the fast-path tests)."""
    from eagle import speculate
    from eagle.models.draft import set_cpu_round
    from eagle.models.llama import set_cpu_fast_path

    _, model = pairs[pair]
    fed: dict[str, list] = {"static": [], "chain": []}
    real = speculate.SpeculativeDecoder._tree_forward

    def recording(self, s, hidden, tokens, positions, mask, past):
        fed[kind].append((positions.tolist(), tokens.tolist(), mask.tolist(), past))
        return real(self, s, hidden, tokens, positions, mask, past)

    monkeypatch.setattr(speculate.SpeculativeDecoder, "_tree_forward", recording)
    one_path = eagle_kernels.build_static_tree([[0] * d for d in range(1, 5)])
    previous = (set_cpu_fast_path(False), set_cpu_round(False))
    try:
        results = {}
        for kind, tree in (("static", one_path), ("chain", TreeConfig.chain(4))):
            results[kind] = model.generate(PROMPTS, 12, tree=tree)
    finally:
        set_cpu_fast_path(previous[0])
        set_cpu_round(previous[1])
    assert len(fed["static"]) >= 3 * len(results["static"].accept_lengths[0])
    assert fed["static"] == fed["chain"]
    assert results["static"].accept_lengths == results["chain"].accept_lengths


@pytest.mark.parametrize("pair", ["eagle2-s0", "eagle3-s2"])
def test_a_tree_shallower_than_its_depth_drafts_only_the_levels_it_holds(pairs, pair):
    """TreeConfig(depth=5, total_tokens=3) holds at most 2 levels below the root: drafting 5 sized the
    verification's accepted path wider than the tree, which the sampling op refuses."""
    hf, model = pairs[pair]
    tree = TreeConfig(depth=5, topk=2, total_tokens=3)
    greedy = model.generate(PROMPTS, 10, tree=tree)
    assert greedy.tokens == [hf_greedy(hf, p, 10) for p in PROMPTS]
    assert max(max(a) for a in greedy.accept_lengths) <= 3
    sampled = model.generate(PROMPTS, 10, tree=tree, temperature=1.0, seed=2)
    assert [len(t) for t in sampled.tokens] == [10] * len(PROMPTS)


def test_stream_takes_a_tokenizers_output_and_an_attention_mask(pairs):
    """stream(**tokenizer(text, return_tensors="pt")) as generate(**...) works: input_ids= and an
    attention_mask, as a batch of one row or a single 1-D row, padded on either side (session 34 left
    stream() without them)."""
    _, model = pairs["eagle2-s0"]
    want = model.generate([[5, 6, 7, 8]], 6).tokens[0]

    def streamed(*args, **kwargs):
        return sum(model.stream(*args, **kwargs), [])

    assert (
        streamed(input_ids=torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.ones(1, 4), max_new_tokens=6)
        == want
    )
    assert (
        streamed(
            **{
                "input_ids": torch.tensor([[0, 0, 5, 6, 7, 8]]),
                "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1]]),
            },
            max_new_tokens=6,
        )
        == want
    )
    assert streamed({"input_ids": [5, 6, 7, 8, 0], "attention_mask": [1, 1, 1, 1, 0]}, 6) == want
    assert streamed([5, 6, 7, 8, 0], 6, attention_mask=[1, 1, 1, 1, 0]) == want
    assert streamed(input_ids=[5, 6, 7, 8], max_new_tokens=6) == want
    # transformers' batched form without a mask (return_attention_mask=False), found in review
    assert streamed(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6) == want
    assert streamed(input_ids=[[5, 6, 7, 8]], max_new_tokens=6) == want
    assert streamed({"input_ids": np.array([[5, 6, 7, 8]])}, 6) == want
    for kwargs, error, match in [
        (
            dict(input_ids=torch.tensor([[5, 6], [7, 8]]), attention_mask=torch.ones(2, 2)),
            TypeError,
            "a batch of 2 rows",
        ),
        (dict(prompt=[5, 6], input_ids=[5, 6]), TypeError, r"stream\(\) got both a prompt and input_ids="),
        (dict(), TypeError, r"stream\(\) needs a prompt"),
        (
            dict(prompt={"input_ids": [5, 6], "attention_mask": [1, 1]}, attention_mask=[1, 1]),
            ValueError,
            "given twice",
        ),
        (dict(prompt=[5, 6, 0], attention_mask=[1, 0, 1]), ValueError, "padding between its tokens"),
        (dict(prompt={"ids": [5]}), TypeError, "without 'input_ids'"),
        (dict(input_ids=[[5, 6], [7, 8]]), TypeError, "a batch of 2 rows"),
        (
            dict(prompt="def f():", attention_mask=[1, 1]),
            TypeError,
            "a str or a conversation is passed as the prompt",
        ),
        # a bool among list ids: refused as the unmasked route refuses it, not read as 1 (found in review)
        (
            dict(prompt=[5, True], attention_mask=[1, 1]),
            TypeError,
            r"prompt 0 holds True \(bool\); token ids",
        ),
    ]:
        with pytest.raises(error, match=match):
            model.stream(**kwargs)


def test_generate_refuses_a_bool_among_masked_list_ids(pairs):
    """generate()'s mask route turned [5, True] into [5, 1] (a tensor conversion); the unmasked route
    refuses bools: both refuse them now (found in review)."""
    _, model = pairs["eagle2-s0"]
    with pytest.raises(TypeError, match=r"prompt 1 holds True \(bool\); token ids must be integers"):
        model.generate([[5, 6], [7, True]], 3, attention_mask=[[1, 1], [1, 1]])
    with pytest.raises(TypeError, match=r"prompt 1 holds True \(bool\)"):
        model.generate([[5, 6], [7, True]], 3)
