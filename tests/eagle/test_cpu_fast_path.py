"""The CPU fast path (``eagle_C::llama_layers``) is bit-identical to the Python modules.

Every forward the runtime makes is run twice, through the C++ layer op and through the reference
modules (``set_cpu_fast_path(False)``), and the hidden states, logits, captured features and the
whole KV cache must be ``torch.equal``: target prefill (ragged), decode T=1 and tree blocks; draft
prefill and tree levels continued with ``past > 0``; float32, float64 and bfloat16 (with packed weights); batch 1 and ragged batch 3.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from eagle import speculate
from eagle.api import EagleModel
from eagle.models import load_target
from eagle.models.cpu_packed import pack_module_linears
from eagle.models.draft import (
    Eagle2Head,
    Eagle2Layer,
    Eagle3Head,
    Eagle3Layer,
    random_draft,
    set_cpu_draft_loop,
    set_cpu_round,
    set_cpu_verify_update,
)
from eagle.models.llama import (
    LlamaModel,
    cpu_fast_path_ok,
    layer_weights,
    set_cpu_fast_path,
)
from eagle.tree import TreeConfig
from eagle_kernels import _ext
from eagle_kernels.tree_speculative_sampling import raise_on_status
from tests.eagle.conftest import LLAMA3_ROPE

pytestmark = pytest.mark.skipif(
    not _ext.has_op("llama_layers"), reason="the C++ extension with llama_layers is not built"
)

# bfloat16: the linear weights are packed copies (AMX tiles or oneDNN) on both paths (eagle/models/cpu_packed.py)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "bf16"]
TARGET_CASES = {
    "llama-gqa-llama3rope": ("llama", dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama-mha-tied-biases": (
        "llama",
        dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ),
    "qwen2-qkv-bias": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-qknorm": ("qwen3", dict(attention_bias=True)),
}
LENGTHS = {1: [9], 3: [9, 6, 4]}


@pytest.fixture
def fast_path():
    """Restores the global switch whatever a test does with it."""
    previous = set_cpu_fast_path(True)
    yield
    set_cpu_fast_path(previous)


def random_tree_mask(B: int, T: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, T, width]`` bool; the new rows (the last T columns) see themselves."""
    mask = torch.rand(B, T, width, generator=gen) < 0.5
    mask[:, :, width - T :] |= torch.eye(T, dtype=torch.bool)
    return mask


def run_both(fn, monkeypatch, reference_cls, method: str = "forward"):
    """``fn()`` on the fast path (the reference module method made to fail, so the fast path is
    proven taken) and on the reference path; returns both results."""
    set_cpu_fast_path(True)
    with monkeypatch.context() as m:
        m.setattr(reference_cls, method, _must_not_run)
        fast = fn()
    set_cpu_fast_path(False)
    ref = fn()
    set_cpu_fast_path(True)
    return fast, ref


def _must_not_run(*args, **kwargs):
    raise AssertionError("the reference path ran although the CPU fast path should have")


def assert_all_equal(fast: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(fast) == len(ref)
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a, b), f"output {i} differs: max abs diff {(a - b).abs().max().item()}"


# --------------------------------------------------------------------------------------------------
# Target
# --------------------------------------------------------------------------------------------------
def target_forwards(model: LlamaModel, B: int) -> list[torch.Tensor]:
    """Ragged prefill (all logits, captured features), decode T=1, a tree block; outputs + cache."""
    gen = torch.Generator().manual_seed(3)
    V, L = model.config.vocab_size, model.config.num_layers
    lengths = torch.tensor(LENGTHS[B])
    cache = model.new_cache(B, 40)
    outs = []
    with torch.inference_mode():
        ids = torch.randint(0, V, (B, int(lengths.max())), generator=gen)
        o = model(ids, cache, feature_layers=[0, 2, L])
        outs += [o.hidden, o.logits, *o.layer_hidden]
        cache.advance(lengths)
        o = model(torch.randint(0, V, (B, 1), generator=gen), cache)
        outs += [o.hidden, o.logits]
        cache.advance(1)
        T = 6
        mask = random_tree_mask(B, T, T, gen)
        positions = cache.seqlens.long()[:, None] + mask.sum(-1) - 1
        index = torch.randint(0, T, (B, 2), generator=gen)
        o = model(
            torch.randint(0, V, (B, T), generator=gen),
            cache,
            positions=positions,
            tree_mask=mask,
            logits_index=index,
        )
        outs += [o.hidden, o.logits, cache.kv.clone(), cache.seqlens.clone()]
    return outs


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(TARGET_CASES))
def test_target_bit_identical(make_target, monkeypatch, fast_path, case, dtype, B):
    family, overrides = TARGET_CASES[case]
    _, path = make_target(family, **overrides)
    model = load_target(path, dtype=dtype)
    fast, ref = run_both(lambda: target_forwards(model, B), monkeypatch, LlamaModel, "_run_layers")
    assert_all_equal(fast, ref)


# --------------------------------------------------------------------------------------------------
# Draft heads
# --------------------------------------------------------------------------------------------------
def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every floating parameter ~ U(0.5, 1.5) * sign-free noise: norms and biases away from 1 and 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.copy_(
                    (torch.rand(p.shape, generator=gen, dtype=torch.float64) - 0.5) * 0.3 + (p.dim() == 1)
                )


def make_head(target: LlamaModel, kind: str, *, bias: bool, qkv_bias: bool):
    head = random_draft(target, kind, bias=bias)
    if qkv_bias:  # a Qwen2-style head with q/k/v biases, built like random_draft builds it
        cfg = dataclasses.replace(head.config, qkv_bias=True)
        head = Eagle2Head(cfg, target.lm_head_weight).to(dtype=target.dtype)
    randomise(head, seed=5)
    head = head.eval().requires_grad_(False)
    pack_module_linears(head, extra=[getattr(head, "lm_head_weight", None)])  # as load_draft does
    return head


def draft_forwards(head, B: int) -> list[torch.Tensor]:
    """Draft prefill over the target features, then a tree grown level by level (past > 0)."""
    gen = torch.Generator().manual_seed(4)
    cfg = head.config
    H, V = cfg.hidden_size, cfg.vocab_size
    lengths = torch.tensor(LENGTHS[B])
    cache = head.new_cache(B, 40)
    outs = []
    with torch.inference_mode():
        n = int(lengths.max())
        hidden = torch.randn(B, n, H, generator=gen, dtype=head.dtype)
        o = head(hidden, torch.randint(0, V, (B, n), generator=gen), cache)
        outs += [o.hidden, o.logits]
        cache.advance(lengths)
        past = 0
        for T in (1, 3, 4):  # tree levels: each continues the block written by the earlier ones
            mask = random_tree_mask(B, T, past + T, gen)
            positions = cache.seqlens.long()[:, None] + past + torch.zeros(B, T, dtype=torch.int64)
            index = torch.randint(0, T, (B, 1), generator=gen)
            o = head(
                o.hidden[:, -1:].expand(B, T, H).contiguous(),
                torch.randint(0, V, (B, T), generator=gen),
                cache,
                positions=positions,
                tree_mask=mask,
                logits_index=index,
                past=past,
            )
            outs += [o.hidden, o.logits]
            past += T
        outs += [cache.kv.clone()]
    return outs


DRAFT_CASES = {
    "eagle2-fc-bias": ("eagle2", dict(bias=True, qkv_bias=False)),
    "eagle2-no-bias": ("eagle2", dict(bias=False, qkv_bias=False)),
    "eagle2-qkv-bias": ("eagle2", dict(bias=True, qkv_bias=True)),
    "eagle3": ("eagle3", dict(bias=False, qkv_bias=False)),
}


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(DRAFT_CASES))
def test_draft_bit_identical(make_target, monkeypatch, fast_path, case, dtype, B):
    kind, options = DRAFT_CASES[case]
    _, path = make_target("llama", num_key_value_heads=2)
    target = load_target(path, dtype=dtype)
    head = make_head(target, kind, **options)
    layer_cls = Eagle2Layer if kind == "eagle2" else Eagle3Layer
    fast, ref = run_both(lambda: draft_forwards(head, B), monkeypatch, layer_cls)
    assert_all_equal(fast, ref)


# --------------------------------------------------------------------------------------------------
# The C++ dynamic draft loop (eagle_C::eagle2_draft_dynamic)
# --------------------------------------------------------------------------------------------------
DRAFT_TREES = {
    "3/4/12": TreeConfig(3, 4, 12),
    "6/10/60": TreeConfig(6, 10, 60),
    "chain5": TreeConfig.chain(5),
    "2/3/4": TreeConfig(2, 3, 4),
}


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tree", list(DRAFT_TREES))
def test_cpp_draft_loop_builds_the_python_loops_tree(make_target, monkeypatch, fast_path, tree, dtype, B):
    """The same tokens and accept lengths (so the same trees) with the C++ loop as with the Python
    loop, greedy and sampled; and the C++ loop is what runs when it is on."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=dtype)
    model = EagleModel(target, make_head(target, "eagle2", bias=True, qkv_bias=False))
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [7], [2, 7, 1, 8, 2, 8, 1]][:B]

    def run():
        greedy = model.generate(prompts, 24, tree=DRAFT_TREES[tree])
        sampled = model.generate(prompts, 24, tree=DRAFT_TREES[tree], temperature=1.0, seed=5)
        return greedy.tokens, greedy.accept_lengths, sampled.tokens, sampled.accept_lengths

    previous = set_cpu_draft_loop(True)
    try:
        with monkeypatch.context() as m:
            m.setattr(speculate, "expand_level", _must_not_run)
            m.setattr(speculate, "expand_root", _must_not_run)
            fast = run()
        set_cpu_draft_loop(False)
        ref = run()
    finally:
        set_cpu_draft_loop(previous)
    assert fast == ref
    assert max(max(row) for row in fast[1]) > 1  # some drafts were accepted: the trees mattered


ROUND_SAMPLING = {
    "greedy": speculate.SamplingParams(temperature=0.0),
    "t1": speculate.SamplingParams(temperature=1.0),
    "warped": speculate.SamplingParams(temperature=0.7, top_k=9, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("sampling", list(ROUND_SAMPLING))
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tree", ["3/4/12", "6/10/60", "chain5", "static"])
def test_cpp_verify_update_equals_the_python_round(
    make_target, monkeypatch, fast_path, tree, dtype, B, sampling
):
    """Rounds whose rest after the verify forward is one C++ call (eagle2_verify_update greedy,
    eagle2_verify_update_sampled sampled) emit the same tokens with the same accept lengths as the
    Python path, and leave both caches, the root state and the RNG counters bit-identical; and the
    C++ call is what runs when it is on."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=dtype)
    model = EagleModel(target, make_head(target, "eagle2", bias=True, qkv_bias=False))
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [7], [2, 7, 1, 8, 2, 8, 1]][:B]
    shape = "static" if tree == "static" else DRAFT_TREES[tree]

    def run():
        decoder = speculate.SpeculativeDecoder(target, model.head, model._tree(shape, B))
        tokens = []
        for emission in decoder.run(prompts, 24, ROUND_SAMPLING[sampling], seed=3):
            tokens.append(emission.tokens)
        state = decoder._last_state
        return tokens, decoder._accept_lengths, state

    previous = set_cpu_verify_update(True)
    try:
        with monkeypatch.context() as m:
            m.setattr(speculate.SpeculativeDecoder, "_update_draft", _must_not_run)
            m.setattr(speculate.SpeculativeDecoder, "_last_state", None, raising=False)
            fast = run_keeping_state(run, m)
        set_cpu_verify_update(False)
        with monkeypatch.context() as m:
            ref = run_keeping_state(run, m)
    finally:
        set_cpu_verify_update(previous)
    assert fast[:2] == ref[:2]
    assert max(max(row) for row in fast[1].values()) > 1  # some drafts were accepted
    for name in ("root", "root_hidden", "root_logits", "seeds", "draws"):
        assert torch.equal(getattr(fast[2], name), getattr(ref[2], name)), name
    for cache in ("target_cache", "draft_cache"):
        a, b = getattr(fast[2], cache), getattr(ref[2], cache)
        assert torch.equal(a.seqlens, b.seqlens) and a.length_bound == b.length_bound, cache
        for row in range(a.batch_size):  # the committed part of each row (beyond it: scratch)
            n = int(a.seqlens[row])
            assert torch.equal(a.kv[:, :, row, :, :n], b.kv[:, :, row, :, :n]), f"{cache} row {row}"


def test_first_nonfinite_accepted_row_looks_at_the_accepted_path_only():
    """Rows are flat rows of b * n; -1 past accept_num; a row gives its position on the accepted path
    (steps where none, or where the sequence is not live); on CPU a clear one-pass flag is trusted."""
    from eagle.models.generate_plain import first_nonfinite_accepted_row

    logits = torch.randn(2, 4, 5)
    accept_index = torch.tensor([[0, 2, -1], [4, 5, 7]], dtype=torch.int32)  # flat rows of 2 * 4
    accept_num = torch.tensor([1, 2], dtype=torch.int32)
    flag = torch.tensor(True)

    def first(rows: list[int], live=None) -> list[int]:
        lg = logits.clone()
        lg.view(8, 5)[rows, 3] = float("nan")
        return first_nonfinite_accepted_row(lg, accept_index, accept_num, flag, live).tolist()

    # sequence 0's path: rows 0, 2; sequence 1's: rows 4, 5, 7
    assert [first([row]) for row in range(8)] == [
        [0, 3],
        [3, 3],
        [1, 3],
        [3, 3],
        [3, 0],
        [3, 1],
        [3, 3],
        [3, 2],
    ]
    assert first([2, 0, 7, 5]) == [0, 1]  # the first one
    assert first([0, 5], live=torch.tensor([False, True])) == [3, 1]
    assert first_nonfinite_accepted_row(logits, accept_index, accept_num, None).tolist() == [3, 3]
    lg = logits.clone()
    lg[0, 0, 0] = float("inf")
    assert first_nonfinite_accepted_row(lg, accept_index, accept_num, torch.tensor(False)) is None  # trusted
    out = torch.full((2,), -1, dtype=torch.int64)
    first_nonfinite_accepted_row(lg, accept_index, accept_num, None, out=out)
    assert out.tolist() == [0, 3]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "t1"])
@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
@pytest.mark.parametrize("verify_update", ["cpp", "python"])
def test_nan_logits_in_a_rejected_draft_tokens_row_do_not_stop_decoding(
    make_target, monkeypatch, fast_path, kind, verify_update, temperature
):
    """A draft token whose own row of the verify's logits is NaN (its embedding, or a float16
    overflow its activations alone reach) is rejected, and plain decoding never computes that row; the
    round raised FloatingPointError all the same (every row was checked). Now only the accepted path's
    rows count: the tokens are those of the clean run, and a NaN on the accepted path still raises."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    model = EagleModel(target, make_head(target, kind, bias=True, qkv_bias=False))
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [7, 2, 7, 1]]

    def generate():
        return model.generate(prompts, 24, temperature=temperature, seed=3).tokens

    clean = generate()
    if temperature == 0.0:
        assert clean == model.generate(prompts, 24, speculative=False).tokens
    # ids no round accepts: the last round may accept drafts past the 24 emitted tokens
    longer = model.generate(prompts, 40, temperature=temperature, seed=3).tokens
    poison = sorted(set(range(48)) - set(sum(longer + prompts, [])))[:24]
    original, poisoned_rows = target.forward, []

    def forward(ids, *args, **kwargs):
        out = original(ids, *args, **kwargs)
        if kwargs.get("tree_mask") is not None and out.logits is not None:  # a verify forward
            hit = torch.isin(ids, torch.tensor(poison))
            out.logits[hit] = float("nan")
            poisoned_rows.append(int(hit.sum()))
        return out

    previous = (set_cpu_round(False), set_cpu_verify_update(verify_update == "cpp"))
    try:
        monkeypatch.setattr(target, "forward", forward)
        assert generate() == clean
        assert sum(poisoned_rows) > 0, "the drafts proposed a poisoned token"
        poison[:] = sorted(set(sum(clean, [])))  # now accepted tokens' rows too
        with pytest.raises(FloatingPointError, match="NaN/inf logits"):
            generate()
    finally:
        set_cpu_round(previous[0])
        set_cpu_verify_update(previous[1])


# Five rows for the frozen-row tests: with an EOS that row 0 alone emits, it finishes first and alone,
# so 1 of 5 rows is frozen (not dropped: fewer than a quarter of the batch).
FIVE_PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [7, 2, 7, 1], [2, 7, 1, 8], [1, 4, 1, 4, 2], [6, 6, 6]]


def _five_rows(model, temperature: float, eos=(), auto=False) -> list[list[int]]:
    """Every token each of :data:`FIVE_PROMPTS` emits, 40 at most, with the 3/4/12 dynamic tree."""
    decoder = speculate.SpeculativeDecoder(model.target, model.head, model._tree(DRAFT_TREES["3/4/12"], 5))
    sampling = speculate.SamplingParams(temperature=temperature)
    tokens = [[] for _ in FIVE_PROMPTS]
    for emission in decoder.run(FIVE_PROMPTS, 40, sampling, eos_token_ids=eos, seed=3, auto=auto):
        for row, new in zip(emission.rows, emission.tokens):
            tokens[row] += new
    return tokens


def _eos_of_row_0_alone(free: list[list[int]]) -> list[int]:
    """An id row 0 emits from its 6th token on that no other row and no prompt holds (as a 1-list)."""
    others = set(sum(free[1:] + FIVE_PROMPTS, []))
    eos = [t for i, t in enumerate(free[0]) if i >= 5 and t not in others and t not in free[0][:i]][:1]
    assert eos, "no token of row 0 is missing from the other rows and the prompts"
    return eos


def _poison_frozen_rows(target, monkeypatch, forwards: str) -> list[int]:
    """Make the logits of the frozen rows (committed length held at 0) NaN in every ``forwards``
    ("verify": tree forwards; "plain": one-token steps) from now on; returns the list that gets
    each such forward's count of frozen rows."""
    original, counts = target.forward, []

    def forward(ids, cache, *args, **kwargs):
        out = original(ids, cache, *args, **kwargs)
        verify = kwargs.get("tree_mask") is not None
        if out.logits is not None and (verify if forwards == "verify" else not verify and ids.shape[1] == 1):
            frozen = cache.seqlens == 0
            out.logits[frozen] = float("nan")
            counts.append(int(frozen.sum()))
        return out

    monkeypatch.setattr(target, "forward", forward)
    return counts


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "t1"])
@pytest.mark.parametrize("rest", ["python", "cpp", "cpp-round"])
def test_nan_logits_of_a_frozen_row_do_not_stop_decoding(
    make_target, monkeypatch, fast_path, rest, temperature
):
    """A row that finished before the others stays in the batch, frozen (its committed length held at
    0, nothing it computes emitted), until a quarter of the batch is done: NaN/inf in its logits, which
    plain decoding never computes, raised FloatingPointError for the whole batch. Now only live rows
    count: the frozen row's verify rows are made NaN in every round and the tokens are the clean
    run's. ``cpp-round``: the round in one C++ call (no Python forward to poison) is given the rows'
    liveness."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=256)
    target = load_target(path, dtype=torch.float32)
    model = EagleModel(target, make_head(target, "eagle2", bias=True, qkv_bias=False))
    previous = (set_cpu_round(rest == "cpp-round"), set_cpu_verify_update(rest != "python"))
    try:
        eos = _eos_of_row_0_alone(_five_rows(model, temperature))
        clean = _five_rows(model, temperature, eos)
        assert len(clean[0]) < 40 and all(len(t) == 40 for t in clean[1:])
        frozen_rows, lives = _poison_frozen_rows(target, monkeypatch, "verify"), []
        if rest == "cpp-round":
            real = (
                torch.ops.eagle_C.eagle2_round_sampled
                if temperature
                else torch.ops.eagle_C.eagle2_round_greedy
            )

            def spy(*args, live=None):
                lives.append(None if live is None else live.clone())
                return real(*args, live=live)

            name = "eagle2_round_sampled" if temperature else "eagle2_round_greedy"
            monkeypatch.setattr(torch.ops.eagle_C, name, spy)
        assert _five_rows(model, temperature, eos) == clean
        if rest == "cpp-round":
            assert lives and all(live is not None for live in lives)
            assert any(live.tolist() == [False, True, True, True, True] for live in lives), (
                "no row was frozen"
            )
        else:
            assert sum(frozen_rows) > 0, "no row was frozen"
    finally:
        set_cpu_round(previous[0])
        set_cpu_verify_update(previous[1])


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "t1"])
@pytest.mark.parametrize(
    "kind, rest",
    [
        ("eagle2", "python"),
        ("eagle2", "cpp"),
        ("eagle2", "cpp-round"),
        ("eagle3", "python"),
        ("eagle2", "auto-cpp-step"),
        ("eagle2", "auto-python-step"),
    ],
)
def test_a_frozen_row_whose_eos_embedding_is_nan_does_not_stop_decoding(
    make_target, monkeypatch, fast_path, kind, rest, temperature
):
    """As above with real NaN, on every path, the one-call C++ round included: the EOS token's
    embedding is NaN, so the row that emitted it, frozen in the batch (1 of 5 rows), computes NaN
    hidden states, logits and draft inputs from then on, and no live row does. The tokens are the
    clean run's (before 424224c: FloatingPointError). ``auto-*``: speculative="auto" alternating plain
    steps (the one-call C++ step or the Python one) with rounds. A frozen row's plain steps feed its
    last accepted token, not the EOS, so with the Python step its plain-step logits are made NaN
    through the forward as well; the C++ step's masking is test_plain_step's
    test_only_live_rows_set_the_nonfinite_flag."""
    from tests.eagle.test_adaptive import Scripted
    from tests.eagle.test_plain_step import gp

    _, path = make_target("llama", num_key_value_heads=2, vocab_size=256)
    target = load_target(path, dtype=torch.float32)
    model = EagleModel(target, make_head(target, kind, bias=True, qkv_bias=False))
    auto = rest.startswith("auto")

    def generate(eos=()):
        policy = Scripted("pps") if auto else False
        tokens = _five_rows(model, temperature, eos, auto=policy)
        assert not policy or policy.seen.count("plain") > 4, "the plain steps did not run"
        return tokens

    previous = (
        set_cpu_round(rest == "cpp-round" or auto),
        set_cpu_verify_update(rest != "python"),
        gp.set_cpu_decode_step(rest != "auto-python-step"),
    )
    try:
        eos = _eos_of_row_0_alone(generate())
        clean = generate(eos)
        assert len(clean[0]) < 40 and all(len(t) == 40 for t in clean[1:])
        with torch.no_grad():
            target.embed_tokens.weight[eos[0]] = float("nan")
        if rest == "auto-python-step":
            poisoned_steps = _poison_frozen_rows(target, monkeypatch, "plain")
        assert generate(eos) == clean
        if rest == "auto-python-step":
            assert sum(poisoned_steps) > 0, "no plain step ran with a frozen row"
    finally:
        set_cpu_round(previous[0])
        set_cpu_verify_update(previous[1])
        gp.set_cpu_decode_step(previous[2])


def _oracle_pair(tmp_path) -> EagleModel:
    """A one-layer target with no attention (o_proj zero: a token's logits depend on it alone, all-ones
    final norm) and an EAGLE-2 head computing the same function (fc keeps the embedding, the target's
    MLP and norm, its lm_head scaled up so both distributions are sharp): the head proposes the
    target's own continuation, every draft is accepted, and a trained head's EOS proposal is too."""
    from tests.eagle.conftest import build_hf_target, save_hf_target

    hf = build_hf_target("llama", 0, num_hidden_layers=1, num_key_value_heads=2, vocab_size=256)
    with torch.no_grad():
        hf.model.layers[0].self_attn.o_proj.weight.zero_()
        hf.model.norm.weight.fill_(1.0)  # the head has no final norm: a positive scale, the same argmax
        hf.lm_head.weight.mul_(20.0)
    target = load_target(save_hf_target(hf, tmp_path / "oracle"), dtype=torch.float32)
    head = random_draft(target, "eagle2", bias=True)
    mine, theirs, H = head.layers[0], target.layers[0], target.config.hidden_size
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, :H] = torch.eye(H)  # cat([embedding, feature]) -> the embedding
        head.fc.bias.zero_()
        mine.self_attn.o_proj.weight.zero_()
        mine.post_attention_layernorm.weight.copy_(theirs.post_attention_layernorm.weight)
        mine.mlp.gate_up_proj.weight.copy_(theirs.mlp.gate_up_proj.weight)
        mine.mlp.down_proj.weight.copy_(theirs.mlp.down_proj.weight)
    head = head.eval().requires_grad_(False)
    pack_module_linears(head, extra=[head.lm_head_weight])  # as load_draft does
    return EagleModel(target, head)


# The prompt's greedy continuation with _oracle_pair is [63, 109, 70, 193, 183, 17, 222, 115, 115, ...]
# (a token's successor depends on it alone): 222 first appears as the 7th token, which a depth-4 round
# emits first after the prefill's token and a round of 5: a draft token that is accepted, and whose own
# row of the verify gives the token after it.
ORACLE_PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
ORACLE_TOKEN = 222


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "t1"])
@pytest.mark.parametrize("rest", ["python", "cpp", "cpp-round"])
@pytest.mark.parametrize("cut", ["eos", "budget", "none"])
def test_nan_logits_of_an_accepted_eos_or_last_in_budget_draft_do_not_stop_decoding(
    tmp_path, monkeypatch, fast_path, cut, rest, temperature
):
    """A draft token accepted as the EOS, or as the last token within the budget, has its own row of
    the verify on the accepted path; that row gives the token after it, which is never emitted and
    which plain decoding never computes. With that token's embedding NaN the row is NaN, and the round
    raised FloatingPointError. Now a round's NaN rows are positions on each row's accepted path, and
    only an emitted token from such a row raises: the tokens are the clean run's, on every path of the
    rest of the round. Without a cut (``none``: no EOS, a longer budget) the token after it is emitted,
    and the run raises."""
    model = _oracle_pair(tmp_path)
    budget = 7 if cut == "budget" else 16
    eos = [ORACLE_TOKEN] if cut == "eos" else []

    def generate() -> list[int]:
        decoder = speculate.SpeculativeDecoder(model.target, model.head, TreeConfig(4, 2, 8))
        sampling = speculate.SamplingParams(temperature=temperature)
        return sum(
            (e.tokens[0] for e in decoder.run([ORACLE_PROMPT], budget, sampling, eos_token_ids=eos, seed=3)),
            [],
        )

    previous = (set_cpu_round(rest == "cpp-round"), set_cpu_verify_update(rest != "python"))
    try:
        clean = generate()
        assert clean[6] == ORACLE_TOKEN and ORACLE_TOKEN not in clean[:6] + ORACLE_PROMPT
        seen = []
        real_emit = speculate.SpeculativeDecoder._emit

        def emit(self, *args, nonfinite_from=None, **kwargs):
            if nonfinite_from is not None:
                seen.extend(nonfinite_from.tolist())
            return real_emit(self, *args, nonfinite_from=nonfinite_from, **kwargs)

        monkeypatch.setattr(speculate.SpeculativeDecoder, "_emit", emit)
        with torch.no_grad():
            model.target.embed_tokens.weight[ORACLE_TOKEN] = float("nan")
        if cut == "none":
            with pytest.raises(FloatingPointError, match="NaN/inf logits"):
                generate()
        else:
            assert len(clean) == 7 and generate() == clean
            if temperature == 0.0:  # and plain decoding's, which never computes the NaN row
                plain = model.generate([ORACLE_PROMPT], budget, speculative=False, eos_token_id=eos or None)
                assert plain.tokens == [clean]
        assert 1 in seen, "the accepted draft's row was not NaN on the accepted path"
    finally:
        set_cpu_round(previous[0])
        set_cpu_verify_update(previous[1])


@pytest.mark.parametrize("sampling", list(ROUND_SAMPLING))
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tree", ["3/4/12", "6/10/60", "chain5"])
def test_cpp_round_equals_its_three_cpp_calls(make_target, monkeypatch, fast_path, tree, dtype, B, sampling):
    """A round in one call (eagle2_round_greedy, or eagle2_round_sampled at T > 0: draft tree, target
    forward, rest) emits the same tokens with the same accept lengths as the draft op, the target's
    forward and the verify-update op called from Python, and leaves both caches, the RNG counters and
    the root state bit-identical; and it is what runs."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=dtype)
    model = EagleModel(target, make_head(target, "eagle2", bias=True, qkv_bias=False))
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [7], [2, 7, 1, 8, 2, 8, 1]][:B]

    def run():
        decoder = speculate.SpeculativeDecoder(target, model.head, model._tree(DRAFT_TREES[tree], B))
        tokens = [emission.tokens for emission in decoder.run(prompts, 24, ROUND_SAMPLING[sampling], seed=3)]
        return tokens, decoder._accept_lengths, decoder._last_state

    with monkeypatch.context() as m:
        m.setattr(speculate.SpeculativeDecoder, "_cpu_verify_update", _must_not_run)
        m.setattr(speculate.SpeculativeDecoder, "_last_state", None, raising=False)
        fused = run_keeping_state(run, m)
    with monkeypatch.context() as m:
        m.setattr(speculate.SpeculativeDecoder, "_cpu_round", lambda self, s, sampling: None)
        m.setattr(speculate.SpeculativeDecoder, "_update_draft", _must_not_run)  # the C++ rest runs
        m.setattr(speculate.SpeculativeDecoder, "_last_state", None, raising=False)
        calls = run_keeping_state(run, m)
    assert fused[:2] == calls[:2]
    assert max(max(row) for row in fused[1].values()) > 1  # some drafts were accepted
    for name in ("root", "root_hidden", "root_logits", "seeds", "draws"):
        assert torch.equal(getattr(fused[2], name), getattr(calls[2], name)), name
    for cache in ("target_cache", "draft_cache"):
        a, b = getattr(fused[2], cache), getattr(calls[2], cache)
        assert torch.equal(a.seqlens, b.seqlens) and a.length_bound == b.length_bound, cache
        for row in range(a.batch_size):
            n = int(a.seqlens[row])
            assert torch.equal(a.kv[:, :, row, :, :n], b.kv[:, :, row, :, :n]), f"{cache} row {row}"


def test_the_one_call_round_follows_a_switch_changed_during_a_generation(make_target, fast_path):
    """The round's call is gathered once per run and reused; a CPU switch changed between two
    emissions of a stream takes effect at the next round (and the tokens do not change)."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    model = EagleModel(target, make_head(target, "eagle2", bias=True, qkv_bias=False))
    decoder = speculate.SpeculativeDecoder(target, model.head, model._tree(DRAFT_TREES["3/4/12"], 1))
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    want = [e.tokens for e in decoder.run(prompt, 24, speculate.SamplingParams(), seed=3)]
    calls = []
    original = speculate.SpeculativeDecoder._cpu_verify_update

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    speculate.SpeculativeDecoder._cpu_verify_update = spy
    previous = set_cpu_round(True)
    try:
        stream = decoder.run(prompt, 24, speculate.SamplingParams(), seed=3)
        got = [next(stream).tokens, next(stream).tokens]  # the prefill's token, one fused round
        assert not calls
        set_cpu_round(False)
        got += [e.tokens for e in stream]
    finally:
        set_cpu_round(previous)
        speculate.SpeculativeDecoder._cpu_verify_update = original
    assert calls  # the rounds after the switch made the three calls
    assert got == want


@pytest.mark.parametrize("sampling", ["greedy", "t1"])
def test_the_one_call_round_drafts_from_the_root_state_plain_steps_left(make_target, fast_path, sampling):
    """speculative="auto": after plain steps the draft catches up and its root state is new tensors;
    the next one-call round drafts from them (same accept lengths and tokens as the three calls)."""
    from eagle.adaptive import PLAIN, SPECULATE, AutoSpeculation

    class Scripted(AutoSpeculation):
        def __init__(self) -> None:
            super().__init__()
            self._modes = iter([SPECULATE, PLAIN, PLAIN, PLAIN] * 20)
            self._next = next(self._modes)

        def next_mode(self) -> str:
            return self._next

        def record(self, tokens: int, seconds: float, rows: int = 1) -> None:
            self._next = next(self._modes)

    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    model = EagleModel(target, make_head(target, "eagle2", bias=True, qkv_bias=False))
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [7, 2]]

    def run():
        decoder = speculate.SpeculativeDecoder(target, model.head, model._tree(DRAFT_TREES["3/4/12"], 2))
        emitted = [
            (e.rows, e.tokens)
            for e in decoder.run(prompts, 40, ROUND_SAMPLING[sampling], seed=3, auto=Scripted())
        ]
        return emitted, decoder._accept_lengths

    fused = run()
    previous = set_cpu_round(False)
    try:
        calls = run()
    finally:
        set_cpu_round(previous)
    assert fused == calls


def test_cpp_verify_update_is_skipped_where_it_does_not_apply(make_target, fast_path):
    """Switched off (either switch), or with the CPU fast path off, the one-call rest declines."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    head = make_head(target, "eagle2", bias=True, qkv_bias=False)
    cache, target_cache = head.new_cache(1, 16), target.new_cache(1, 16)
    n, H = 3, head.config.hidden_size
    tree = (torch.tensor([[0, 1, 2]]), torch.tensor([[1, -1, -1]]), torch.tensor([[-1, 2, -1]]))
    args = (torch.zeros(1, n, 48), torch.zeros(1, n, H), torch.zeros(1, n, dtype=torch.int64), tree)
    with torch.inference_mode():
        assert head.cpu_verify_update(*args, target_cache, cache, 2) is not None
        for switch in (set_cpu_verify_update, set_cpu_draft_loop):
            previous = switch(False)
            try:
                assert head.cpu_verify_update(*args, target_cache, cache, 2) is None
            finally:
                switch(previous)
        set_cpu_fast_path(False)
        assert head.cpu_verify_update(*args, target_cache, cache, 2) is None


def test_cpp_sampled_verify_update_on_nan_logits_and_on_a_bad_tree(make_target, fast_path):
    """The sampled one-call rest: a malformed tree gives the sampling op's status (which the loop raises
    as the Python path does) and neither cache is written; NaN logits give each row's first NaN position
    on the accepted path (the loop raises when a token from there on is emitted, not when the EOS or the
    budget cuts it) and the round is committed as any other."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    head = make_head(target, "eagle2", bias=True, qkv_bias=False)
    cache, target_cache = head.new_cache(1, 16), target.new_cache(1, 16)
    target_cache.advance(4)
    cache.advance(4)
    n, H = 3, head.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, n, 48, generator=gen)
    hidden = torch.randn(1, n, H, generator=gen)
    candidates = torch.tensor([[5, 6, 7]])
    good = (torch.tensor([[0, 1, 2]]), torch.tensor([[1, -1, -1]]), torch.tensor([[-1, 2, -1]]))
    cyclic = (torch.tensor([[0, 1, 2]]), torch.tensor([[1, 0, -1]]), torch.tensor([[-1, 2, -1]]))
    params = speculate.SpeculativeDecoder(target, head, TreeConfig(2, 2, 3))._warp_params(
        n, speculate.SamplingParams(temperature=1.0), torch.device("cpu")
    )
    seeds, draws = torch.tensor([7]), torch.tensor([1])
    kv, draft_kv = target_cache.kv.clone(), cache.kv.clone()

    def call(lg, tree):
        with torch.inference_mode():
            return head.cpu_verify_update(
                lg, hidden, candidates, tree, target_cache, cache, 2, (*params, seeds, draws)
            )

    out = call(logits, cyclic)
    assert out[6] is None and out[0] is None and int(out[7][0]) != 0
    with pytest.raises(ValueError, match="tree_speculative_sampling: sequence 0"):
        raise_on_status("tree_speculative_sampling", out[7])
    assert torch.equal(target_cache.kv, kv) and torch.equal(cache.kv, draft_kv)
    assert int(draws[0]) == 2  # drawn all the same: one draw per sampling call
    out = call(logits.clone().index_fill_(2, torch.tensor([3]), float("nan")), good)
    assert out[6].tolist() == [0] and out[7] is None  # the root's row: the first new token is NaN's
    assert out[0].shape == (1, 2) and int(draws[0]) == 3
    assert not torch.equal(cache.kv, draft_kv)  # committed
    out = call(logits, good)
    assert out[6] is None and out[7] is None and out[0].shape == (1, 2) and int(draws[0]) == 4


def run_keeping_state(run, m):
    """``run()`` with the decoder's last round state kept as ``decoder._last_state`` (the state of the
    final round, before the finished rows are dropped)."""
    original = speculate.SpeculativeDecoder._round

    def keep(self, s, sampling):
        self._last_state = s
        return original(self, s, sampling)

    m.setattr(speculate.SpeculativeDecoder, "_round", keep)
    return run()


def test_cpp_draft_loop_is_skipped_where_it_does_not_apply(make_target, fast_path):
    """Switched off, or with the CPU fast path off, the C++ loop declines (the Python loop runs)."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    head = make_head(target, "eagle2", bias=True, qkv_bias=False)
    cache = head.new_cache(1, 16)
    args = (torch.zeros(1, 48), torch.zeros(1, head.config.hidden_size), torch.zeros(1, dtype=torch.int64))
    kw = dict(topk=2, depth=2, num_tokens=3)
    with torch.inference_mode():
        assert head.cpu_dynamic_tree(*args, cache, cache.seqlens, **kw) is not None
        previous = set_cpu_draft_loop(False)
        try:
            assert head.cpu_dynamic_tree(*args, cache, cache.seqlens, **kw) is None
        finally:
            set_cpu_draft_loop(previous)
        set_cpu_fast_path(False)
        assert head.cpu_dynamic_tree(*args, cache, cache.seqlens, **kw) is None


def test_cpp_draft_loop_refuses_bad_arguments(make_target, fast_path):
    """The C++ draft op names what is wrong: a root that is not token ids, a top-k wider than the
    vocabulary, a tree its top-k and depth cannot fill, draft lengths of the wrong size."""
    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    head = make_head(target, "eagle2", bias=True, qkv_bias=False)
    cache = head.new_cache(1, 16)
    logits, hidden = torch.zeros(1, 48), torch.zeros(1, head.config.hidden_size)
    root = torch.zeros(1, dtype=torch.int64)
    kw = dict(topk=2, depth=2, num_tokens=3)
    with torch.inference_mode():
        with pytest.raises(TypeError, match="root must hold token ids"):
            head.cpu_dynamic_tree(logits, hidden, root.float(), cache, cache.seqlens, **kw)
        with pytest.raises(ValueError, match="topk=49 exceeds the vocabulary"):
            head.cpu_dynamic_tree(logits, hidden, root, cache, cache.seqlens, topk=49, depth=2, num_tokens=3)
        with pytest.raises(ValueError, match="bad tree"):
            head.cpu_dynamic_tree(logits, hidden, root, cache, cache.seqlens, topk=2, depth=2, num_tokens=8)
        with pytest.raises(ValueError, match=r"draft_seqlens must be \[b\]"):
            head.cpu_dynamic_tree(logits, hidden, root, head.new_cache(2, 16), cache.seqlens, **kw)


# --------------------------------------------------------------------------------------------------
# When the fast path is (not) taken, and bad input
# --------------------------------------------------------------------------------------------------
def test_autograd_uses_the_modules(make_target, fast_path):
    """Training (weights requiring grad under grad mode) must record a graph: reference path."""
    _, path = make_target("llama")
    target = load_target(path)
    head = random_draft(target, "eagle2")  # train mode, weights require grad
    weights = layer_weights(head.layers[0])
    x = torch.randn(1, 2, target.config.hidden_size)
    assert not cpu_fast_path_ok(x, weights)
    with torch.no_grad():
        assert cpu_fast_path_ok(x, weights)
    assert not cpu_fast_path_ok(x.requires_grad_(), layer_weights(target.layers[0]))
    set_cpu_fast_path(False)
    assert not cpu_fast_path_ok(x.detach(), layer_weights(target.layers[0]))


def test_trainable_head_records_a_graph(make_target, monkeypatch, fast_path):
    _, path = make_target("llama")
    target = load_target(path)
    head = random_draft(target, "eagle3")
    assert isinstance(head, Eagle3Head)
    monkeypatch.setattr(torch.ops.eagle_C, "llama_layers", _must_not_run, raising=False)
    out = head(torch.randn(1, 3, target.config.hidden_size), torch.tensor([[1, 2, 3]]), head.new_cache(1, 8))
    assert out.hidden.requires_grad and out.logits.requires_grad


def test_op_rejects_bad_weight_lists(make_target, fast_path):
    _, path = make_target("llama")
    model = load_target(path)
    cache = model.new_cache(1, 8)
    op = torch.ops.eagle_C.llama_layers
    x = torch.randn(1, 1, model.config.hidden_size)
    D = model.config.head_dim
    cos = torch.ones(1, 1, 1, D)
    args = (cache.kv, cos, cos, cache.seqlens, None, 0, 4, 2, 1e-5)
    weights = layer_weights(model.layers[0])
    with pytest.raises(ValueError, match="entries per layer"):
        op(x, None, weights[:-1], *args, [])
    with pytest.raises(ValueError, match="lacks required weight"):
        op(x, None, weights[:1] + [None] + weights[2:], *args, [])
    with pytest.raises(ValueError, match="capture index"):
        op(x, None, weights, *args, [5])
    with pytest.raises(ValueError, match="attn_input needs exactly one layer"):
        op(x, x, weights + weights, *args, [])


def test_a_forced_kernel_backend_reaches_the_attention():
    """EAGLE_KERNELS_BACKEND / use_backend force every op's backend: the C++ layer op (which calls the
    C++ attention kernel itself) must then step aside for the modules."""
    import eagle_kernels
    from eagle.models.llama import cpu_fast_path_wanted

    x = torch.zeros(1, 1, 8)
    assert cpu_fast_path_wanted(x) == eagle_kernels._ext.has_op("llama_layers")
    with eagle_kernels.use_backend("torch"):
        assert not cpu_fast_path_wanted(x)
    if eagle_kernels._ext.has_op("llama_layers"):
        with eagle_kernels.use_backend("cpp"):
            assert cpu_fast_path_wanted(x)


# --------------------------------------------------------------------------------------------------
# The cached weight list (FastPathWeights) follows every change of the weights
# --------------------------------------------------------------------------------------------------
def _logits_both_paths(model, ids):
    with torch.inference_mode():
        set_cpu_fast_path(True)
        fast = model(ids, model.new_cache(1, 16)).logits
        set_cpu_fast_path(False)
        ref = model(ids, model.new_cache(1, 16)).logits
        set_cpu_fast_path(True)
    return fast, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cached_weight_list_follows_weight_changes(make_target, fast_path, dtype):
    _, path = make_target("llama")
    model = load_target(path, dtype=dtype)
    ids = torch.arange(1, 8)[None]
    before, _ = _logits_both_paths(model, ids)
    changes = [
        lambda: model.layers[0].mlp.down_proj.weight.mul_(3),  # in place (version counter)
        lambda: setattr(  # a new tensor behind the same Parameter (Module.to does this)
            model.layers[1].self_attn.o_proj.weight, "data", model.layers[1].self_attn.o_proj.weight.data * -1
        ),
        lambda: setattr(
            model.layers[0], "mlp", type(model.layers[0].mlp)(model.config).to(dtype)
        ),  # new module
    ]
    for change in changes:
        with torch.no_grad():
            change()
        fast, ref = _logits_both_paths(model, ids)
        assert torch.equal(fast, ref)
        assert not torch.equal(fast, before)
        before = fast


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
def test_cpu_rms_norm_kernel_matches_torch_to_rounding(dtype):
    """eagle_C::rms_norm (what RMSNorm runs on float32 and half types outside autograd, and the C++
    layer op too) against torch's composition: the same value up to one rounding of the output dtype."""
    from eagle.models.llama import RMSNorm

    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=gen) + 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(3, 5, 96, generator=gen) * 4).to(dtype)
    want = norm.weight * torch.nn.functional.rms_norm(x.float(), (96,), eps=1e-5).to(dtype)
    with torch.inference_mode():
        got = norm(x)
    assert got.dtype == dtype and got.shape == x.shape
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp(min=torch.finfo(dtype).tiny)
    if dtype == torch.float32:
        # No output rounding hides the mean's last bit (double-accumulated here, float32 in torch),
        # nor 1/sqrt against torch's rsqrt: a few float32 ulps.
        assert bool(((got - want).abs() <= 4 * ulp).all())
    else:
        assert bool(((got.float() - want.float()).abs() <= 2 * ulp).all())
        assert (got != want).float().mean() < 0.05  # differences are rare last-bit ones, not a bias
    norm.weight.requires_grad_(True)
    assert torch.equal(norm(x), want)  # autograd: torch's kernel, bit for bit
    with pytest.raises(ValueError, match=r"rms_norm: x must be \[\.\.\., H\] and weight \[H\]"):
        torch.ops.eagle_C.rms_norm(x, norm.weight.detach()[:10], 1e-5)
    with pytest.raises(TypeError, match="must have the same dtype"):
        other = torch.float64 if dtype == torch.float32 else torch.float32
        torch.ops.eagle_C.rms_norm(x.to(other), norm.weight.detach(), 1e-5)


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32, torch.float64],
    ids=["bf16", "fp16", "fp32", "fp64"],
)
def test_cpp_rope_tables_equal_the_python_ones(dtype):
    """eagle_C::rope_cos_sin (what block_context calls on CPU, and the C++ draft loop per level) gives
    eagle.models.llama.rope_cos_sin's tables bit for bit: given positions (int64 and int32, large ones
    whose float32 cast rounds) and the default ones (seqlens + past + t), for a Llama-3 scaled
    inv_freq; negative positions are refused."""
    from eagle.models.config import Llama3RopeScaling, ModelConfig
    from eagle.models.llama import rope_cos_sin, rope_inv_freq, rope_tables

    fields = {f.name for f in dataclasses.fields(Llama3RopeScaling)}
    scaling = Llama3RopeScaling(**{k: v for k, v in LLAMA3_ROPE.items() if k in fields})
    cfg = ModelConfig("llama", 64, 128, 256, 1, 2, 2, 64, rope_theta=500000.0, rope_scaling=scaling)
    inv_freq = rope_inv_freq(cfg)
    doubled, signs = rope_tables(inv_freq)
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 40000, (3, 7), generator=gen)
    positions[0, 0] = 2**24 + 1  # rounds in the float32 cast
    seqlens = torch.tensor([5, 0, 300], dtype=torch.int32)
    for given in (positions, positions.int()):
        got = torch.ops.eagle_C.rope_cos_sin(given, seqlens, 0, 7, doubled, signs, dtype)
        want = rope_cos_sin(inv_freq, given, dtype)
        for g, w in zip(got, want):
            assert g.dtype == dtype and g.shape == (3, 7, 1, 64) and torch.equal(g, w)
    default = seqlens.long()[:, None] + 4 + torch.arange(7)
    for lengths in (seqlens, seqlens.long(), seqlens.short()):
        got = torch.ops.eagle_C.rope_cos_sin(None, lengths, 4, 7, doubled, signs, dtype)
        for g, w in zip(got, rope_cos_sin(inv_freq, default, dtype)):
            assert torch.equal(g, w)
    with pytest.raises(ValueError, match=r"cache_seqlens must be int \[B\]"):
        torch.ops.eagle_C.rope_cos_sin(None, seqlens.float(), 4, 7, doubled, signs, dtype)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        torch.ops.eagle_C.rope_cos_sin(-positions, seqlens, 0, 7, doubled, signs, dtype)
    with pytest.raises(ValueError, match=r"positions must be int \[B, 7\]"):
        torch.ops.eagle_C.rope_cos_sin(positions[:, :3], seqlens, 0, 7, doubled, signs, dtype)


@pytest.mark.parametrize("bad", [-1, 3])
def test_cpp_head_refuses_logits_index_outside_the_block(make_target, monkeypatch, fast_path, bad):
    """The C++ head op (eagle_C::eagle2_head) checks logits_index itself: a position outside the block
    [0, T) is a clear error, not a gather past the rows (the Python check is made to pass here)."""
    from eagle.models import draft as draft_module

    _, path = make_target("llama", num_key_value_heads=2, vocab_size=48)
    target = load_target(path, dtype=torch.float32)
    head = make_head(target, "eagle2", bias=True, qkv_bias=False)
    H = head.config.hidden_size
    cache = head.new_cache(1, 16)
    monkeypatch.setattr(draft_module, "value_checks_enabled", lambda device: False)
    set_cpu_fast_path(True)
    with torch.inference_mode():
        head(
            torch.zeros(1, 3, H),
            torch.zeros(1, 3, dtype=torch.int64),
            cache,
            logits_index=torch.tensor([[2]]),
        )
        with pytest.raises(ValueError, match=r"logits_index holds positions outside the block \[0, 3\)"):
            head(
                torch.zeros(1, 3, H),
                torch.zeros(1, 3, dtype=torch.int64),
                cache,
                logits_index=torch.tensor([[bad]]),
            )


def test_rope_tables_live_as_long_as_their_inv_freq():
    """CUDA graphs captured for a model read its RoPE tables: the cache used to be cleared after 64
    other inv_freq tensors (a process loading many models), freeing tables a kept graph still reads.
    Entries now go exactly when their inv_freq does."""
    import gc

    from eagle.models import llama

    kept = torch.arange(1, 9, dtype=torch.float32)
    doubled, signs = llama.rope_tables(kept)
    for i in range(100):
        llama.rope_tables(torch.full((8,), float(i)))
    again = llama.rope_tables(kept)
    assert again[0] is doubled and again[1] is signs
    key = id(kept)
    del kept, again
    gc.collect()
    assert key not in llama._ROPE_TABLES
