"""The bundled tiny-code pair: lossless greedy against Hugging Face generate (float64), real acceptance."""

from __future__ import annotations

import pytest
import torch

import eagle
from eagle.api import ASSETS, BUNDLED
from tests.eagle.helpers import call_from_threads

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\nclass Config:\n    def __init__(self, path):\n"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def pair():
    return eagle.load("tiny-code", dtype=torch.float64)


@pytest.fixture(scope="module")
def hf_continuations(pair):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(ASSETS / BUNDLED / "target"), dtype=torch.float64).eval()
    out = []
    for text in PROMPTS:
        ids = pair.tokenizer(text, add_special_tokens=False)["input_ids"]
        gen = hf.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        out.append(gen[0, len(ids) :].tolist())
    return out


@pytest.mark.parametrize("tree", ["dynamic", "static", "chain"])
def test_greedy_equals_hf_generate(pair, hf_continuations, tree):
    # eos_token_id=[] : generate exactly NEW_TOKENS like HF above (no stop at <|endoftext|>)
    res = pair.generate(PROMPTS, NEW_TOKENS, tree=tree, eos_token_id=[])
    assert res.tokens == hf_continuations
    assert res.texts == [pair.tokenizer.decode(t, skip_special_tokens=True) for t in hf_continuations]
    # A trained head: most forwards accept more than the bonus token. "dynamic" sizes its tree from
    # timed forwards, so on a loaded machine it may pick a small one: a lower bar there.
    assert res.mean_accept_length > (1.6 if tree == "dynamic" else 2.0)


def test_generate_prints_code(pair):
    res = pair.generate(["def fibonacci(n):"], 32)
    assert res.texts is not None and len(res.tokens[0]) > 0
    assert any(word in res.texts[0] for word in ("return", "if", "def", "=", "("))


@pytest.mark.parametrize("modules", [False, True], ids=["cpp-ops", "modules"])
@pytest.mark.parametrize("tree", ["dynamic", "chain"])
def test_a_bfloat16_head_for_the_float32_target_changes_no_token(tree, modules):
    """``draft_dtype``: the head drafts in bfloat16 (AMX tiles on this CPU path), the float32 target
    verifies, so the tokens are plain float32 decoding's, and the head still gets drafts accepted.
    ``modules``: the C++ layer op and draft loop off, i.e. the Python path a GPU runs."""
    from eagle.models.draft import set_cpu_draft_loop
    from eagle.models.llama import set_cpu_fast_path

    model = eagle.load("tiny-code", dtype=torch.float32, draft_dtype=torch.bfloat16)
    assert model.head.dtype == torch.bfloat16 and model.target.dtype == torch.float32
    fast, loop = set_cpu_fast_path(not modules), set_cpu_draft_loop(not modules)
    try:
        res = model.generate(PROMPTS, NEW_TOKENS, tree=tree, eos_token_id=[])
        plain = model.generate(PROMPTS, NEW_TOKENS, speculative=False, eos_token_id=[])
    finally:
        set_cpu_fast_path(fast)
        set_cpu_draft_loop(loop)
    assert res.tokens == plain.tokens
    # float32 head on these prompts: 2.30 (dynamic) / 2.19 (chain); bfloat16: 2.19 / 2.00
    assert res.mean_accept_length > 1.6


def test_the_bundled_head_ships_its_measured_acceptance(pair):
    """eagle/assets/tiny-code/draft/acceptance.json (`eagle calibrate --write`) is the dynamic tree's
    prior: greedy acceptance near the generic 0.75, sampled far lower."""
    from eagle import autotree
    from eagle.acceptance import AcceptanceFit
    from eagle.speculate import SamplingParams

    acc = pair.pair_acceptance
    assert acc is not None and acc.sampled is not None
    assert 0.6 < acc.greedy.accept_rate < 0.9 and 0.2 < acc.sampled.accept_rate < 0.5
    assert (
        pair.prior_acceptance() == acc.greedy != AcceptanceFit(autotree.ACCEPT_RATE, autotree.WIDENING_GAIN)
    )
    assert pair.prior_acceptance(SamplingParams(temperature=1.0)) == acc.sampled
    assert (
        pair.prior_acceptance(1.0) == acc.sampled and pair.prior_acceptance(0) == acc.greedy
    )  # a temperature
    with pytest.raises(TypeError, match="eagle.SamplingParams or a temperature, got str"):
        pair.prior_acceptance("greedy")


def test_one_model_serves_calls_from_several_threads_at_once():
    """A server's worker threads share one loaded model: each call, run while the others run, gives
    the tokens it gives alone (greedy with the dynamic tree, which refits between calls; sampled
    with a seed and a fixed tree; speculative="auto"; plain sampled decoding; a batch of two). The
    C++ ops run without the GIL, so the calls really overlap."""
    model = eagle.load("tiny-code", dtype=torch.float32)
    calls = [
        lambda: model.generate(PROMPTS[:1], 16, eos_token_id=[]),
        lambda: model.generate(
            PROMPTS, 16, eos_token_id=[], tree=eagle.TreeConfig(3, 4, 12), temperature=1.0, seed=5
        ),
        lambda: model.generate(PROMPTS[1:], 16, eos_token_id=[], speculative="auto"),
        lambda: model.generate(PROMPTS, 16, eos_token_id=[], speculative=False, temperature=1.0, seed=7),
    ]
    alone = [call().tokens for call in calls]
    results = call_from_threads(calls, threads=3, repeats=3)
    for (_, _, j), result in results.items():
        assert result.tokens == alone[j], j
        # each call's own record: its rows' forwards after the prefill emitted the rest of its tokens
        assert [sum(a) + 1 for a in result.accept_lengths] == [len(t) for t in result.tokens]
        if result.speculation is not None:  # auto: its rounds and plain steps are those forwards
            counts = result.speculation["rounds"] + result.speculation["plain_steps"]
            assert counts == len(result.accept_lengths[0])


CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


def test_a_conversation_prompt_goes_through_the_chat_template():
    """Official EAGLE heads are for chat models, trained on chat-formatted prompts: a prompt may be a
    conversation (a list of role / content messages), encoded by the tokenizer's chat template with
    the assistant's turn opened, in generate and stream alike; misuse is named."""
    model = eagle.load("tiny-code", dtype=torch.float32)
    model.tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": "def fibonacci(n):"}]
    text = "### user:\ndef fibonacci(n):\n### assistant:\n"
    want = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    res = model.generate([messages, PROMPTS[0]], 12, eos_token_id=[])
    assert res.tokens == model.generate([want, PROMPTS[0]], 12, eos_token_id=[]).tokens
    assert [t for chunk in model.stream(messages, 12, eos_token_id=[]) for t in chunk] == res.tokens[0]
    with pytest.raises(
        TypeError, match=r"a conversation \(a list of messages\) is one prompt, pass \[messages\]"
    ):
        model.generate(messages, 4)
    with pytest.raises(ValueError, match="prompt 0: message 0 needs a 'role'"):
        model.generate([[{"content": "x"}]], 4)
    model.tokenizer.chat_template = None
    with pytest.raises(
        ValueError, match="the prompt is a conversation, and this checkpoint's tokenizer has no chat"
    ):
        model.stream(messages, 4)
