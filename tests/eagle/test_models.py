"""Target runtime vs Hugging Face transformers: parity, ragged batches, cache rules, loading, greedy."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from eagle.models import KVCache, ModelConfig, generate_plain, load_target
from tests.eagle.conftest import LLAMA3_ROPE, build_hf_target

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

# (family, config overrides): every family, GQA and MQA, tied and untied, biases, Llama-3 RoPE scaling.
CASES = {
    "llama-gqa-llama3rope": ("llama", dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama-dynamic-rope": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama-tied-biases": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "mistral-gqa": ("mistral", dict(rope_theta=1e6)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-mqa-qknorm": ("qwen3", dict(num_key_value_heads=1, attention_bias=True)),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def hf_in(hf: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return hf if dtype == torch.float64 else copy.deepcopy(hf).to(dtype)


@torch.no_grad()
def hf_logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return hf(ids).logits


def random_tree_parents(n: int, gen: torch.Generator) -> list[int]:
    """parents[0] = -1 (root); every other node's parent precedes it (the EAGLE slot order)."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]


def tree_mask_and_depth(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.int64)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            j = parents[j]
        depth[i] = mask[i].sum() - 1
    return mask, depth


def path_to(parents: list[int], i: int) -> list[int]:
    path = []
    while i != -1:
        path.append(i)
        i = parents[i]
    return path[::-1]


# --------------------------------------------------------------------------------------------------
# Parity with transformers: prefill, token-by-token decode, tree blocks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(make_target, case, dtype):
    family, overrides = CASES[case]
    hf64, path = make_target(family, **overrides)
    hf = hf_in(hf64, dtype)
    model = load_target(path, dtype=dtype)
    tol = TOL[dtype]
    gen = torch.Generator().manual_seed(1)
    V = model.config.vocab_size

    # prefill: B=2, every position's logits
    ids = torch.randint(0, V, (2, 13), generator=gen)
    cache = model.new_cache(2, 40)
    out = model(ids, cache)
    assert out.logits.shape == (2, 13, V) and out.logits.dtype == dtype
    assert rel_err(out.logits, hf_logits(hf, ids)) < tol

    # token-by-token decode after a 5-token prefill
    seq = torch.randint(0, V, (2, 11), generator=gen)
    cache = model.new_cache(2, 40)
    model(seq[:, :5], cache, compute_logits=False)
    cache.advance(5)
    ref = hf_logits(hf, seq)
    for t in range(5, 11):
        step = model(seq[:, t : t + 1], cache)
        cache.advance(1)
        assert rel_err(step.logits[:, 0], ref[:, t]) < tol, f"decode step {t}"
    assert cache.seqlens.tolist() == [11, 11]

    # tree block after a committed prefix: each node against HF on its root-to-node path
    prefix = torch.randint(0, V, (2, 7), generator=gen)
    cache = model.new_cache(2, 40)
    model(prefix, cache, compute_logits=False)
    cache.advance(7)
    n = 9
    trees = [random_tree_parents(n, gen) for _ in range(2)]
    masks, depths = zip(*(tree_mask_and_depth(p) for p in trees))
    tokens = torch.randint(0, V, (2, n), generator=gen)
    out = model(tokens, cache, positions=7 + torch.stack(depths), tree_mask=torch.stack(masks))
    for b in range(2):
        for i in range(n):
            path_ids = torch.cat([prefix[b], tokens[b, path_to(trees[b], i)]])[None]
            assert rel_err(out.logits[b, i], hf_logits(hf, path_ids)[0, -1]) < tol, f"seq {b} node {i}"


def test_features_and_logits_index(make_target):
    hf, path = make_target("llama")
    model = load_target(path, dtype=torch.float64)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
    cache = model.new_cache(2, 16)
    out = model(ids, cache, feature_layers=(3, 0, 2), logits_index=torch.tensor([[8, 0], [4, 4]]))
    for got, layer in zip(out.layer_hidden, (3, 0, 2)):
        assert rel_err(got, ref.hidden_states[layer]) < 1e-12
    assert rel_err(out.hidden, ref.hidden_states[-1]) < 1e-12
    assert rel_err(out.logits[0], ref.logits[0, [8, 0]]) < 1e-12
    assert rel_err(out.logits[1], ref.logits[1, [4, 4]]) < 1e-12
    assert model.config.eagle3_feature_layers == (2, 2, 1)
    with pytest.raises(ValueError, match="feature_layers"):
        model(ids, cache, feature_layers=(5,))
    with pytest.raises(ValueError, match="logits_index"):
        model(ids, cache, logits_index=torch.tensor([[9], [0]]))


def test_bf16_error_within_twice_torch_own(make_target):
    hf64, path = make_target("llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)
    ids = torch.randint(0, 101, (2, 12))
    ref = hf_logits(hf64, ids)
    torch_bf16 = hf_logits(hf_in(hf64, torch.bfloat16), ids)
    model = load_target(path, dtype="bfloat16")
    ours = model(ids, model.new_cache(2, 12)).logits
    assert ours.dtype == torch.bfloat16
    torch_err = (torch_bf16.double() - ref).abs().max().item()
    assert (ours.double() - ref).abs().max().item() <= 2 * torch_err


# --------------------------------------------------------------------------------------------------
# Ragged batches
# --------------------------------------------------------------------------------------------------
def test_ragged_batch_matches_each_sequence_alone(make_target):
    hf, path = make_target("qwen2")
    model = load_target(path, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    lengths = [3, 9, 6]
    prompts = [torch.randint(0, 101, (n,), generator=gen) for n in lengths]
    steps = torch.randint(0, 101, (3, 4), generator=gen)  # per-sequence decode tokens

    block = torch.zeros(3, 9, dtype=torch.int64)
    for b, p in enumerate(prompts):
        block[b, : len(p)] = p
    cache = model.new_cache(3, 16)
    prefill = model(block, cache)
    cache.advance(torch.tensor(lengths))
    decode = []
    for t in range(4):
        decode.append(model(steps[:, t : t + 1], cache).logits[:, 0])
        cache.advance(1)
    assert cache.seqlens.tolist() == [n + 4 for n in lengths]

    for b, p in enumerate(prompts):
        alone = model.new_cache(1, 16)
        solo = model(p[None], alone)
        alone.advance(len(p))
        assert rel_err(prefill.logits[b, : len(p)], solo.logits[0]) < 1e-12
        full = torch.cat([p, steps[b]])[None]
        ref = hf_logits(hf, full)[0]
        for t in range(4):
            solo_step = model(steps[b : b + 1, t : t + 1], alone).logits[0, 0]
            alone.advance(1)
            assert rel_err(decode[t][b], solo_step) < 1e-12
            assert rel_err(decode[t][b], ref[len(p) + t]) < 1e-12


# --------------------------------------------------------------------------------------------------
# KV cache rules
# --------------------------------------------------------------------------------------------------
def test_cache_overflow_raises_before_writing(tiny_checkpoints):
    model = load_target(tiny_checkpoints.target, dtype=torch.float32)
    cache = model.new_cache(2, 8)
    model(torch.randint(0, 101, (2, 6)), cache, compute_logits=False)
    cache.advance(torch.tensor([6, 4]))
    before = cache.kv.clone()
    with pytest.raises(ValueError, match=r"overflow.*max_seq_len=8.*\[0\]"):
        model(torch.randint(0, 101, (2, 3)), cache)
    assert torch.equal(cache.kv, before)
    assert cache.seqlens.tolist() == [6, 4]
    model(torch.randint(0, 101, (2, 2)), cache)  # exactly fills sequence 0
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        cache.advance(3)
    assert cache.seqlens.tolist() == [6, 4]
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        cache.set_seqlens(torch.tensor([9, 0]))
    with pytest.raises(ValueError, match="must be >= 0"):
        cache.advance(torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="shape"):
        cache.advance(torch.tensor([1, 1, 1]))
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0] and cache.length_bound == 0


def test_cache_layout_and_forward_does_not_advance(tiny_checkpoints):
    model = load_target(tiny_checkpoints.target, dtype=torch.float64)
    cache = model.new_cache(2, 10)
    assert isinstance(cache, KVCache)
    assert cache.kv.shape == (4, 2, 2, 2, 10, 16) and cache.seqlens.dtype == torch.int32
    ids = torch.randint(0, 101, (2, 4))
    model(ids, cache)
    assert cache.seqlens.tolist() == [0, 0]
    # K of layer 0 at position 3 is written in place; the same block again overwrites it identically
    k_before = cache.kv[0, 0, :, :, 3].clone()
    assert k_before.abs().sum() > 0 and cache.kv[:, :, :, :, 4:].abs().sum() == 0
    model(ids, cache)
    assert torch.equal(cache.kv[0, 0, :, :, 3], k_before)


def test_bad_inputs_are_refused(tiny_checkpoints):
    model = load_target(tiny_checkpoints.target, dtype=torch.float32)
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="outside"):
        model(torch.tensor([[1, 101], [0, 0]]), cache)
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(2, 3), cache)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(3, 3, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(2, 3, dtype=torch.int64), cache, positions=torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="tree_mask"):
        model(torch.zeros(2, 3, dtype=torch.int64), cache, tree_mask=torch.ones(2, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="not allocated for this model"):
        model(torch.zeros(2, 3, dtype=torch.int64), KVCache(1, 2, 2, 8, 16))


# --------------------------------------------------------------------------------------------------
# Configs and checkpoint files
# --------------------------------------------------------------------------------------------------
def _config(family: str, **overrides) -> dict:
    return build_hf_target(family, num_hidden_layers=1, **overrides).config.to_dict()


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope_type"),
        (
            dict(
                rope_parameters=None,
                rope_scaling={"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64},
            ),
            "rescales from position 64, below max_position_embeddings",
        ),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 0.5}), "factor >= 1"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(architectures=["GPT2LMHeadModel"]), "architectures"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), "low_freq_factor"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (dict(vocab_size=None), "vocab_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        # a hand-added legacy key beside rope_parameters: transformers would apply it, so it must agree
        (dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), "rope_parameters and rope_scaling"),
        (dict(rope_parameters={"full_attention": {"rope_type": "default"}}), "per-layer-type"),
        (dict(hidden_size="64"), "hidden_size must be a positive integer, got '64'"),
        (dict(num_hidden_layers=True), "num_hidden_layers must be a positive integer"),
        (dict(max_position_embeddings=0), "max_position_embeddings must be a positive integer"),
        (dict(rms_norm_eps="1e-6"), "rms_norm_eps must be a positive number"),
        # RoPE values inside rope_parameters / rope_scaling: these loaded, then gave NaN logits or other
        # tokens with no word about the config
        (
            dict(rope_parameters={"rope_type": "default", "rope_theta": 0}),
            "rope_parameters.rope_theta must be positive",
        ),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": -1e4}), "rope_theta must be positive"),
        (
            dict(rope_parameters={"rope_type": "default", "rope_theta": "10000"}),
            "rope_theta must be a finite number",
        ),
        (
            dict(rope_parameters={"rope_type": "default", "rope_theta": float("inf")}),
            "must be a finite number",
        ),
        (
            dict(rope_parameters=LLAMA3_ROPE | {"factor": -8.0}),
            r"rope_parameters.factor must be >= 1, got -8.0",
        ),
        (dict(rope_parameters=LLAMA3_ROPE | {"factor": "8"}), "factor must be a finite number, got '8'"),
        (
            dict(rope_parameters=LLAMA3_ROPE | {"low_freq_factor": 4.0, "high_freq_factor": 1.0}),
            "high_freq_factor > low_freq_factor",
        ),
        (dict(rope_parameters=LLAMA3_ROPE | {"low_freq_factor": 0.0}), "low_freq_factor must be positive"),
        (
            dict(rope_parameters=LLAMA3_ROPE | {"original_max_position_embeddings": 0}),
            "original_max_position_embeddings must be a positive integer",
        ),
        (dict(rope_parameters=None, rope_scaling="linear"), "rope_scaling must be an object"),
        (
            dict(quantization_config={"quant_method": "compressed-tensors"}),
            "quant_method 'compressed-tensors'",
        ),
    ],
)
def test_unsupported_config_names_the_key(change, key):
    cfg = _config("llama") | {"architectures": ["LlamaForCausalLM"]} | change
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_dict(cfg)


def test_an_eagle_heads_architecture_given_as_the_target_says_so():
    """An EAGLE-3 head's config (LlamaForCausalLMEagle3, as saved here or by SpecForge) passed as the
    target said only "unsupported architectures", while an EAGLE-1/2 head's weights get a hint."""
    for arch in ("LlamaForCausalLMEagle3", "EagleLlamaForCausalLM"):
        with pytest.raises(ValueError, match=r"an EAGLE draft head's: pass it as the draft, with its target"):
            ModelConfig.from_dict(_config("llama") | {"architectures": [arch]})
    with pytest.raises(ValueError, match=r"unsupported architectures=\['GPT2LMHeadModel'\]; supported"):
        ModelConfig.from_dict(_config("llama") | {"architectures": ["GPT2LMHeadModel"]})


def test_config_details_follow_transformers():
    legacy = _config("llama") | {"rope_parameters": None, "rope_theta": 5e5, "rope_scaling": LLAMA3_ROPE}
    new = _config("llama", rope_theta=5e5, rope_scaling=LLAMA3_ROPE)
    assert ModelConfig.from_dict(legacy).rope_scaling == ModelConfig.from_dict(new).rope_scaling
    assert ModelConfig.from_dict(new).rope_theta == 5e5
    whole = _config("llama", rope_scaling=LLAMA3_ROPE | {"original_max_position_embeddings": 64.0})
    assert ModelConfig.from_dict(whole).rope_scaling.original_max_position_embeddings == 64  # as transformers
    both = new | {"rope_scaling": dict(new["rope_parameters"])}  # the same RoPE under both keys: fine
    assert ModelConfig.from_dict(both).rope_scaling == ModelConfig.from_dict(new).rope_scaling
    qwen3 = _config("qwen3")
    del qwen3["head_dim"]
    assert ModelConfig.from_dict(qwen3).head_dim == 128  # Qwen3Config's default, not hidden/heads
    assert (
        ModelConfig.from_dict(_config("qwen2")).qkv_bias
        and not ModelConfig.from_dict(_config("qwen2")).o_bias
    )
    assert ModelConfig.from_dict(_config("qwen3", attention_bias=True)).o_bias
    no_type = {k: v for k, v in _config("mistral").items() if k not in ("architectures", "sliding_window")}
    assert (
        ModelConfig.from_dict(no_type | {"architectures": None}).sliding_window == 4096
    )  # MistralConfig default


def test_sliding_window_only_refused_where_it_takes_effect(make_target):
    hf, path = make_target("mistral", sliding_window=16)
    model = load_target(path)
    assert model.new_cache(1, 16).max_seq_len == 16
    with pytest.raises(ValueError, match="sliding_window=16"):
        model.new_cache(1, 17)
    qwen = _config("qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=0)
    assert ModelConfig.from_dict(qwen).sliding_window == 32
    qwen_off = _config("qwen2", use_sliding_window=False, sliding_window=32)
    assert ModelConfig.from_dict(qwen_off).sliding_window is None


def test_sharded_and_bin_checkpoints_load_identically(make_target, tmp_path):
    hf, path = make_target("llama", save_kwargs=dict(max_shard_size="100KB"))
    assert (path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 101, (1, 6))
    ref = hf_logits(hf, ids)
    sharded = load_target(path, dtype=torch.float64)
    assert rel_err(sharded(ids, sharded.new_cache(1, 6)).logits, ref) < 1e-12
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    from_bin = load_target(bin_dir, dtype=torch.float64)
    assert rel_err(from_bin(ids, from_bin.new_cache(1, 6)).logits, ref) < 1e-12


def test_missing_unexpected_and_misshapen_keys_are_listed(make_target, tmp_path):
    hf, path = make_target("llama", num_hidden_layers=2)
    config = (path / "config.json").read_text()

    def write(state):
        d = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "config.json").write_text(config)
        torch.save(state, d / "pytorch_model.bin")
        return d

    state = dict(hf.state_dict())
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing keys \[model.layers.1.mlp.up_proj.weight\]"):
        load_target(write(missing))
    extra = state | {"model.layers.1.self_attn.q_norm.weight": torch.ones(16)}
    with pytest.raises(ValueError, match=r"unexpected keys \[model.layers.1.self_attn.q_norm.weight\]"):
        load_target(write(extra))
    bad = state | {"model.norm.weight": torch.ones(63)}
    with pytest.raises(ValueError, match=r"model.norm.weight: \[63\] \(expected \[64\]\)"):
        load_target(write(bad))
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at .*nowhere"):
        load_target(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="dtype"):
        load_target(path, dtype=torch.int32)


# --------------------------------------------------------------------------------------------------
# Vanilla generation
# --------------------------------------------------------------------------------------------------
def test_greedy_generation_equals_transformers_generate(make_target):
    hf, path = make_target("llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)
    model = load_target(path, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 101, (n,), generator=gen).tolist() for n in (4, 11, 7)]
    ours = generate_plain(model, prompts, max_new_tokens=10)
    for prompt, got in zip(prompts, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert got == ref[0, len(prompt) :].tolist()
    # eos: each sequence stops right after emitting it
    eos = ours[1][3]
    stopped = generate_plain(model, prompts, max_new_tokens=10, eos_token_id=eos)
    for full, got in zip(ours, stopped):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert got == expected
    with pytest.raises(ValueError, match="at least one token"):
        generate_plain(model, [[1], []], 3)


def test_tiny_checkpoints_fixture_is_consistent(tiny_checkpoints):
    cfg = json.loads((tiny_checkpoints.target / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    model = load_target(tiny_checkpoints.target, dtype=torch.float64)
    ids = torch.randint(0, 101, (1, 5))
    assert (
        rel_err(model(ids, model.new_cache(1, 5)).logits, hf_logits(tiny_checkpoints.hf_target, ids)) < 1e-12
    )


def test_sampled_generation_follows_the_warped_distribution(tiny_checkpoints):
    """First sampled token over many identical prompts vs the exactly enumerated distribution after
    transformers' own warpers (temperature -> top-k -> top-p -> min-p); chi-square, fixed seed."""
    from scipy.stats import chisquare
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    model = load_target(tiny_checkpoints.target, dtype=torch.float32)
    prompt = [5, 17, 3, 88]
    logits = hf_logits(hf_in(tiny_checkpoints.hf_target, torch.float32), torch.tensor([prompt]))[:, -1]
    settings = dict(temperature=0.7, top_k=12, top_p=0.9, min_p=0.02)
    scores = logits
    for warper in (
        TemperatureLogitsWarper(settings["temperature"]),
        TopKLogitsWarper(settings["top_k"]),
        TopPLogitsWarper(settings["top_p"]),
        MinPLogitsWarper(settings["min_p"]),
    ):
        scores = warper(None, scores)
    p = scores.softmax(-1)[0].double()
    n = 3000
    gen = torch.Generator().manual_seed(11)
    samples = generate_plain(model, [prompt] * n, max_new_tokens=2, generator=gen, **settings)
    first = torch.tensor([s[0] for s in samples])
    counts = torch.bincount(first, minlength=p.numel()).double()
    support = p > 0
    assert counts[~support].sum() == 0, "sampled a token the warpers removed"
    assert support.sum() > 3  # the test distribution is not degenerate
    expected = n * p[support] / p[support].sum()
    assert chisquare(counts[support], expected).pvalue > 1e-3
    assert all(len(s) == 2 for s in samples)


def test_corrupt_checkpoint_files_are_named(tiny_checkpoints, tmp_path):
    """A truncated weights file or a broken config.json raises ValueError naming the file, not the
    parser's bare error."""
    import shutil

    from eagle.models import load_draft

    target_dir = shutil.copytree(tiny_checkpoints.target, tmp_path / "target")
    head_dir = shutil.copytree(tiny_checkpoints.eagle2, tmp_path / "head")
    target = load_target(str(target_dir), dtype=torch.float32)

    weights = head_dir / "pytorch_model.bin"  # the fixture's heads are .bin checkpoints
    data = weights.read_bytes()
    for kept in (0.02, 0.1, 0.5, 0.9):  # torch's zip reader fails with OSError, RuntimeError or EOFError
        weights.write_bytes(data[: int(len(data) * kept)])
        with pytest.raises(ValueError, match=f"{weights.name}.*(safetensors|PyTorch weights)"):
            load_draft(str(head_dir), target)

    (head_dir / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_draft(str(head_dir), target)

    target_weights = target_dir / "model.safetensors"
    target_weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_target(str(target_dir))
    (target_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_target(str(target_dir))


def test_a_checkpoint_whose_tokenizer_files_do_not_load_says_so(tiny_checkpoints, tmp_path):
    """Broken tokenizer files used to load as "no tokenizer", and string prompts were then refused
    with "this checkpoint has none"; a checkpoint without tokenizer files still loads without one."""
    import shutil

    import eagle

    target_dir = shutil.copytree(tiny_checkpoints.target, tmp_path / "target")
    assert eagle.load(str(target_dir)).tokenizer is None
    (target_dir / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="its tokenizer files do not load"):
        eagle.load(str(target_dir))


def test_a_hub_checkpoint_downloads_one_weight_layout_and_a_missing_one_names_the_path(monkeypatch, tmp_path):
    """Repos often hold safetensors and .bin shards, or Mistral's consolidated.safetensors beside the
    shards: only the first readable layout, and of a sharded one only the shards its index names,
    are fetched. A name that is neither a directory nor on the hub names the path it was given."""
    import huggingface_hub

    from eagle.models import weights

    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        )
    )
    repo = [
        "config.json",
        "consolidated.safetensors",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model-00001-of-00002.bin",
        "original/consolidated.safetensors",
    ]
    asked = {}

    class Api:
        def list_repo_files(self, name):
            return repo

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda name, filename: str(index))
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda name, allow_patterns: asked.setdefault(name, allow_patterns) and str(tmp_path),
    )
    assert weights.resolve_checkpoint("owner/model") == tmp_path
    assert asked["owner/model"] == [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(Api, "list_repo_files", offline)
    with pytest.raises(
        FileNotFoundError, match="no checkpoint directory at checkpoints/llama-typo, and the hub"
    ):
        weights.resolve_checkpoint("checkpoints/llama-typo")


def test_tied_config_with_a_different_stored_lm_head_uses_it_as_transformers_does(make_target):
    """tie_word_embeddings true, yet lm_head.weight in the file differs from the embedding: the
    embedding used to replace it, silently changing every logit; transformers keeps the stored one."""
    from transformers import AutoModelForCausalLM

    _, path = make_target("llama", tie_word_embeddings=False)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    ids = torch.randint(0, 101, (1, 9))
    with pytest.warns(UserWarning, match="lm_head.weight differs from model.embed_tokens.weight"):
        model = load_target(path, dtype=torch.float64)
    assert not model.config.tie_word_embeddings
    assert rel_err(model(ids, model.new_cache(1, 9)).logits, hf_logits(hf, ids)) < 1e-12


def test_empty_and_git_lfs_pointer_weight_files_are_named(tiny_checkpoints, tmp_path):
    """torch suggested turning weights_only off for an LFS pointer (false and unsafe), safetensors
    said "header too large", and an empty file gave a message ending in a colon."""
    import shutil

    from eagle.models import load_draft

    target = load_target(str(tiny_checkpoints.target), dtype=torch.float32)
    head_dir = shutil.copytree(tiny_checkpoints.eagle2, tmp_path / "head")
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123456\n"
    for name in ("pytorch_model.bin", "model.safetensors"):
        for f in head_dir.glob("pytorch_model.bin"):
            f.unlink()
        weights = head_dir / name
        weights.write_bytes(pointer)
        with pytest.raises(
            ValueError, match=f"{name} is a Git LFS pointer, not the weights: run `git lfs pull`"
        ):
            load_draft(str(head_dir), target)
        weights.write_bytes(b"")
        with pytest.raises(ValueError, match=rf"{name} is empty \(0 bytes\)"):
            load_draft(str(head_dir), target)
        weights.unlink()


def test_a_shard_index_that_lists_a_tied_lm_head_or_misses_a_rotary_buffer_loads(make_target):
    """transformers loads both; the exact set comparison of index and shards refused them."""
    hf, path = make_target("llama", tie_word_embeddings=True, save_kwargs=dict(max_shard_size="100KB"))
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["lm_head.weight"] = first_shard
    index_path.write_text(json.dumps(index))
    ids = torch.randint(0, 101, (1, 6))
    model = load_target(path, dtype=torch.float64)
    assert rel_err(model(ids, model.new_cache(1, 6)).logits, hf_logits(hf, ids)) < 1e-12
    index["weight_map"]["model.layers.0.mlp.up_proj.weight_scale"] = first_shard  # listed, really absent
    index_path.write_text(json.dumps(index))
    load_target(path, dtype=torch.float64)  # nothing reads it: transformers ignores it too


def test_quantised_target_weights_are_refused_by_name(make_target, tmp_path):
    """An int8 (or float8) target loaded with its weights cast, not dequantised: other tokens, no
    message. A head with such weights was already refused."""
    from safetensors.torch import load_file, save_file

    _, path = make_target("llama")
    state = load_file(str(path / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    for dtype in (torch.int8, torch.float8_e4m3fn):
        copy = tmp_path / str(dtype).removeprefix("torch.")
        copy.mkdir()
        (copy / "config.json").write_text((path / "config.json").read_text())
        save_file(state | {key: state[key].to(dtype)}, str(copy / "model.safetensors"))
        with pytest.raises(ValueError, match=rf"weights stored as \[{key} \({dtype}\)\]; quantised targets"):
            load_target(copy, dtype=torch.float32)


def test_weight_files_with_non_tensor_entries_or_a_tensor_in_two_shards_are_refused(make_target, tmp_path):
    """A .bin holding a training counter failed with "'int' object has no attribute ..."; an index
    whose shard names were not strings with a TypeError about paths; and a stale copy of a tensor in
    a second shard was read instead of the one the index names (it decoded zeros)."""
    from safetensors.torch import load_file, save_file

    _, path = make_target("llama", save_kwargs=dict(max_shard_size="100KB"))
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    first, last = path / shards[0], path / shards[-1]
    stale_key = next(iter(load_file(str(first))))
    original_last = load_file(str(last))
    save_file(original_last | {stale_key: torch.zeros_like(load_file(str(first))[stale_key])}, str(last))
    with pytest.raises(ValueError, match=rf"tensors stored differently in two shards: \[{stale_key} \("):
        load_target(path, dtype=torch.float32)
    save_file(original_last | {stale_key: load_file(str(first))[stale_key]}, str(last))
    load_target(path, dtype=torch.float32)  # an equal copy is harmless, as transformers has it
    save_file(original_last, str(last))
    index_path.write_text(json.dumps(index | {"weight_map": index["weight_map"] | {stale_key: 3}}))
    with pytest.raises(ValueError, match="'weight_map' must map tensor names to shard file names"):
        load_target(path, dtype=torch.float32)
    index_path.write_text(json.dumps(index))
    load_target(path, dtype=torch.float32)  # restored: loads

    _, single = make_target("llama")
    state = load_file(str(single / "model.safetensors"))
    (single / "model.safetensors").unlink()
    torch.save(state | {"step": 100, "epoch": 2}, single / "pytorch_model.bin")
    with pytest.raises(
        ValueError, match=r"holds entries that are not tensors: \['step' \(int\), 'epoch' \(int\)\]"
    ):
        load_target(single, dtype=torch.float32)


def test_generation_config_processors_that_are_not_applied_are_warned_about(make_target):
    _, path = make_target("llama")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "repetition_penalty": 1.05}))
    with pytest.warns(UserWarning, match=r"sets \{'repetition_penalty': 1.05\}; this runtime does not apply"):
        ModelConfig.from_json(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "repetition_penalty": 1.0}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelConfig.from_json(path)


def test_a_target_loaded_in_its_files_dtype_owns_its_weights(make_target):
    """safetensors reads tensors as views of the memory-mapped file. A target loaded in the file's own
    dtype kept them: a checkpoint rewritten in place (a re-export, a training run saving over it)
    changed the running model's weights, or crashed it with SIGBUS when the file got shorter."""
    from safetensors.torch import load_file, save

    _, directory = make_target("llama", seed=11)
    file = directory / "model.safetensors"
    stored = load_file(str(file))
    dtype = stored["model.embed_tokens.weight"].dtype
    target = load_target(directory, dtype=dtype)  # the file's dtype: nothing to convert
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        before = target(ids, target.new_cache(1, 8)).logits
    rewritten = save({k: torch.randn_like(v) for k, v in stored.items()}, metadata={"format": "pt"})
    assert len(rewritten) == file.stat().st_size  # the same header: only the values move
    with open(file, "r+b") as f:  # in place, as a writer that does not truncate first
        f.write(rewritten)
    with torch.inference_mode():
        assert torch.equal(target(ids, target.new_cache(1, 8)).logits, before)
