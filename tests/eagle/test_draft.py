"""EAGLE-1/2/3 draft heads: every official file format vs an independent float64 oracle, tree blocks,
fit/key errors, save -> load round trips, fresh heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from eagle.models import Eagle2Head, Eagle3Head, load_draft, load_target, random_draft, save_draft
from eagle.models import draft as draft_module
from tests.eagle.conftest import eagle2_state, eagle3_state, head_config, write_head

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def target(tiny_checkpoints):
    return load_target(tiny_checkpoints.target, dtype=torch.float64)


@pytest.fixture(scope="module")
def target_config(tiny_checkpoints) -> dict:
    return json.loads((tiny_checkpoints.target / "config.json").read_text()) | {"head_dim": 16}


# --------------------------------------------------------------------------------------------------
# Oracle: the official head written out with transformers' RMSNorm and RoPE, float64 attention
# --------------------------------------------------------------------------------------------------
def _norm(weight: torch.Tensor, eps: float):
    norm = LlamaRMSNorm(weight.numel(), eps=eps).double()
    norm.weight.data = weight.double()
    return norm


def _layer(x: torch.Tensor, resid: torch.Tensor, st: dict, p: str, cfg: dict, positions, visible):
    """resid + attn(x) then the MLP block, over one full sequence ``[S, *]`` with mask ``visible [S, S]``."""
    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    S = x.shape[0]
    q = (x @ st[p + "self_attn.q_proj.weight"].T).view(S, heads, hd).transpose(0, 1)[None]
    k = (x @ st[p + "self_attn.k_proj.weight"].T).view(S, kv, hd).transpose(0, 1)[None]
    v = (x @ st[p + "self_attn.v_proj.weight"].T).view(S, kv, hd).transpose(0, 1)[None]
    rope_cfg = LlamaConfig(hidden_size=cfg["hidden_size"], num_attention_heads=heads, head_dim=hd)
    cos, sin = LlamaRotaryEmbedding(rope_cfg)(q, positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
    scores = (q @ k.transpose(-1, -2)) * hd**-0.5
    attn = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v
    h = resid + attn[0].transpose(0, 1).reshape(S, heads * hd) @ st[p + "self_attn.o_proj.weight"].T
    m = _norm(st[p + "post_attention_layernorm.weight"], cfg["rms_norm_eps"])(h)
    gate, up = m @ st[p + "mlp.gate_proj.weight"].T, m @ st[p + "mlp.up_proj.weight"].T
    return h + (torch.nn.functional.silu(gate) * up) @ st[p + "mlp.down_proj.weight"].T


@torch.no_grad()
def eagle2_oracle(st, cfg, embed, lm_head, features, tokens, positions, visible):
    x = torch.cat([embed[tokens], features], -1) @ st["fc.weight"].T
    if "fc.bias" in st:
        x = x + st["fc.bias"]
    h = _layer(x, x, st, "layers.0.", cfg, positions, visible)
    return h, h @ lm_head.T


@torch.no_grad()
def eagle3_oracle(st, cfg, embed, hidden, tokens, positions, visible, p="midlayer."):
    eps = cfg["rms_norm_eps"]
    x = torch.cat(
        [
            _norm(st[p + "input_layernorm.weight"], eps)(embed[tokens]),
            _norm(st[p + "hidden_norm.weight"], eps)(hidden),
        ],
        -1,
    )
    h = _layer(x, hidden, st, p, cfg, positions, visible)
    return h, _norm(st["norm.weight"], eps)(h) @ st["lm_head.weight"].T


def prefix_then_tree(P: int, parents: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-sequence visibility for a causal prefix of P rows followed by a tree block, the tree's
    own mask, and the positions (prefix: 0..P-1; tree nodes: P + depth)."""
    n = len(parents)
    tree = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            tree[i, j] = True
            j = parents[j]
    visible = torch.zeros(P + n, P + n, dtype=torch.bool)
    visible[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
    visible[P:, :P] = True
    visible[P:, P:] = tree
    positions = torch.cat([torch.arange(P), P + tree.sum(1) - 1])
    return visible, tree, positions


PARENTS = [-1, 0, 0, 1, 1, 2, 4]


def run_head(head, hidden_rows, tokens, P: int, tree: torch.Tensor, positions: torch.Tensor):
    """Prefix block (causal) then the tree block, through the head's own cache; rows concatenated."""
    cache = head.new_cache(1, 32)
    first = head(hidden_rows[None, :P], tokens[None, :P], cache)
    cache.advance(P)
    second = head(
        hidden_rows[None, P:], tokens[None, P:], cache, positions=positions[None, P:], tree_mask=tree[None]
    )
    return torch.cat([first.hidden[0], second.hidden[0]]), torch.cat([first.logits[0], second.logits[0]])


# --------------------------------------------------------------------------------------------------
# EAGLE-1/2 formats
# --------------------------------------------------------------------------------------------------
EAGLE2_FORMATS = {
    # name: (config "bias" key: absent / True / False, fc.bias in file, file format, file dtype)
    "eagle1-bias-absent-bin-fp32": (None, True, "bin", torch.float32),
    "llama3-bias-false-bin-fp16": (False, False, "bin", torch.float16),
    "bias-true-safetensors-fp16": (True, True, "safetensors", torch.float16),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("fmt", list(EAGLE2_FORMATS))
def test_eagle2_head_formats_match_oracle(tmp_path, tiny_checkpoints, target, target_config, fmt, dtype):
    bias_key, has_bias, file_fmt, file_dtype = EAGLE2_FORMATS[fmt]
    embed = target.embed_tokens.weight.detach()
    state = eagle2_state(target_config, bias=has_bias, embed=embed)
    extra = {} if bias_key is None else {"bias": bias_key}
    path = write_head(
        tmp_path / "head", head_config(target_config, **extra), state, fmt=file_fmt, dtype=file_dtype
    )
    head = load_draft(
        path, target if dtype == torch.float64 else load_target(tiny_checkpoints.target, dtype=dtype)
    )
    assert isinstance(head, Eagle2Head) and head.kind == "eagle2" and head.dtype == dtype
    assert (head.fc.bias is not None) == has_bias and head.feature_layers is None

    st = {k: v.to(file_dtype).double() for k, v in state.items()}  # what the file holds
    P = 6
    visible, tree, positions = prefix_then_tree(P, PARENTS)
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(P + len(PARENTS), 64, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 101, (P + len(PARENTS),), generator=gen)
    ref_h, ref_logits = eagle2_oracle(
        st,
        target_config,
        st["embed_tokens.weight"],
        target.lm_head_weight,
        features,
        tokens,
        positions,
        visible,
    )
    h, logits = run_head(head, features.to(dtype), tokens, P, tree, positions)
    assert rel_err(h, ref_h) < TOL[dtype]
    assert rel_err(logits, ref_logits) < TOL[dtype]


def test_eagle2_features_come_from_target(tiny_checkpoints, target):
    head = load_draft(tiny_checkpoints.eagle2, target)
    ids = torch.randint(0, 101, (2, 5))
    out = target(ids, target.new_cache(2, 5))
    assert head.target_features(out) is out.hidden
    cache = head.new_cache(2, 8)
    assert cache.kv.shape == (1, 2, 2, 2, 8, 16)
    d = head(out.hidden[:, :4], ids[:, 1:], cache, logits_index=torch.tensor([[3], [0]]))
    assert d.logits.shape == (2, 1, 101) and d.hidden.shape == (2, 4, 64)
    assert cache.seqlens.tolist() == [0, 0]


# --------------------------------------------------------------------------------------------------
# EAGLE-3 formats
# --------------------------------------------------------------------------------------------------
DRAFT_VOCAB = sorted(torch.randperm(101, generator=torch.Generator().manual_seed(7))[:40].tolist())
EAGLE3_FORMATS = {
    # name: (key prefix, embedding in file, draft vocabulary, file format, file dtype)
    "midlayer-noembed-fullvocab-bin-fp16": ("midlayer.", False, None, "bin", torch.float16),
    "layers0-embed-draftvocab-safetensors-fp32": (
        "layers.0.",
        True,
        DRAFT_VOCAB,
        "safetensors",
        torch.float32,
    ),
    "midlayer-embed-draftvocab-safetensors-fp16": (
        "midlayer.",
        True,
        DRAFT_VOCAB,
        "safetensors",
        torch.float16,
    ),
}


@pytest.mark.parametrize("fmt", list(EAGLE3_FORMATS))
def test_eagle3_head_formats_match_oracle(tmp_path, target, target_config, fmt):
    prefix, with_embed, vocab, file_fmt, file_dtype = EAGLE3_FORMATS[fmt]
    gen = torch.Generator().manual_seed(1)
    own_embed = torch.randn(101, 64, generator=gen, dtype=torch.float64) if with_embed else None
    state = eagle3_state(target_config, prefix=prefix, embed=own_embed, draft_vocab=vocab)
    Vd = len(vocab) if vocab else 101
    cfg = head_config(target_config, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=Vd)
    head = load_draft(write_head(tmp_path / "head", cfg, state, fmt=file_fmt, dtype=file_dtype), target)
    assert isinstance(head, Eagle3Head) and head.kind == "eagle3"
    assert head.draft_vocab_size == Vd and head.owns_embedding == with_embed
    assert head.feature_layers == (2, 2, 1)

    st = {k: (v.to(file_dtype).double() if v.is_floating_point() else v) for k, v in state.items()}
    st = {k.replace("layers.0.", "midlayer."): v for k, v in st.items()}
    embed = st["embed_tokens.weight"] if with_embed else target.embed_tokens.weight.detach()

    # first step: target features -> fc; then a tree block fed with the head's own hidden states
    P = 5
    ids = torch.randint(0, 101, (1, P + 1), generator=gen)
    out = target(ids[:, :P], target.new_cache(1, P), feature_layers=head.feature_layers)
    g = head.target_features(out)[0]
    ref_g = torch.cat(out.layer_hidden, -1)[0] @ st["fc.weight"].T
    assert rel_err(g, ref_g) < 1e-12
    visible, tree, positions = prefix_then_tree(P, PARENTS)
    own = torch.randn(len(PARENTS), 64, generator=gen, dtype=torch.float64)
    hidden = torch.cat([ref_g, own])
    tokens = torch.cat([ids[0, 1:], torch.randint(0, 101, (len(PARENTS),), generator=gen)])
    ref_h, ref_logits = eagle3_oracle(st, target_config, embed, hidden, tokens, positions, visible)
    h, logits = run_head(head, hidden, tokens, P, tree, positions)
    assert rel_err(h, ref_h) < 1e-12
    assert rel_err(logits, ref_logits) < 1e-12
    draft_ids = torch.arange(Vd)
    expected = torch.tensor(vocab) if vocab else draft_ids
    assert torch.equal(head.to_target_ids(draft_ids), expected)


# --------------------------------------------------------------------------------------------------
# Heads that do not fit, and bad key sets
# --------------------------------------------------------------------------------------------------
def _write_eagle2(tmp_path: Path, target_config: dict, name: str, *, cfg_extra=None, state_edit=None) -> Path:
    state = eagle2_state(target_config, bias=True, embed=None)
    if state_edit:
        state = state_edit(state)
    return write_head(tmp_path / name, head_config(target_config, **(cfg_extra or {})), state)


def test_mismatched_eagle2_heads_are_refused(tmp_path, target, target_config):
    cases = [
        (dict(cfg_extra={"hidden_size": 32, "head_dim": 8}), "hidden_size 32 != target's 64"),
        (dict(cfg_extra={"vocab_size": 100}), "vocab_size 100 != target's 101"),
        (
            dict(cfg_extra={"num_attention_heads": 8}),
            r"wrong shapes \[layers.0.self_attn.q_proj.weight: \[64, 64\] \(expected \[128, 64\]\)",
        ),
        (dict(cfg_extra={"bias": False}), r"unexpected keys \[fc.bias\]"),
        (
            dict(state_edit=lambda s: {k: v for k, v in s.items() if k != "fc.bias"}),
            r"missing keys \[fc.bias\]",
        ),
        (
            dict(state_edit=lambda s: s | {"layers.0.input_layernorm.weight": torch.ones(64)}),
            r"unexpected keys \[layers.0.input_layernorm",
        ),
        (dict(cfg_extra={"num_hidden_layers": 2}), "num_hidden_layers=2"),
        (  # (it failed as "lacks required key(s)" when the nested config held them)
            dict(cfg_extra={"speculators_model_type": "eagle3", "transformer_layer_config": {}}),
            r"a vLLM 'speculators' config .* which this loader does not read",
        ),
        (
            dict(cfg_extra={"rope_scaling": {"type": "yarn", "factor": 2.0}}),
            r"draft .*/h\d+: config.json: .*rope_type='yarn'",
        ),
        (
            dict(cfg_extra={"num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 8}),
            r"draft .*/config.json: head_dim=8 is outside",
        ),
        (
            dict(
                state_edit=lambda s: {k: v for k, v in s.items() if k != "layers.0.self_attn.q_proj.weight"}
            ),
            r"missing keys \[layers.0.self_attn.q_proj.weight\]",
        ),
    ]
    for i, (kwargs, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            load_draft(_write_eagle2(tmp_path, target_config, f"h{i}", **kwargs), target)


def test_an_eagle2_head_holding_exactly_its_targets_embedding_shares_the_targets_tensor(
    tmp_path, tiny_checkpoints, target, target_config, monkeypatch
):
    """Official EAGLE-1/2 heads store the target's frozen embedding (1 GB for Llama-3-8B in bf16). A
    file that holds the target's values (in the head's dtype) is not kept a second time: the head
    reads the target's tensor, and still saves the official layout with the embedding. A copy that
    differs in one value, or only by its lower precision, is the head's own and is used as stored."""
    target16 = load_target(tiny_checkpoints.target, dtype=torch.float16)
    embed = target16.embed_tokens.weight.detach()
    exact = _write_eagle2(
        tmp_path, target_config, "exact", state_edit=lambda s: s | {"embed_tokens.weight": embed}
    )
    checked = []  # (the equal copy needs no other check: a 1B model's took 7 s more to load)
    real_check_weights = draft_module._check_weights
    monkeypatch.setattr(
        draft_module, "_check_weights", lambda st, d: checked.append(set(st)) or real_check_weights(st, d)
    )
    head = load_draft(exact, target16)
    assert not head.owns_embedding and "embed_tokens.weight" not in checked[-1]
    assert head.embed_weight.data_ptr() == embed.data_ptr()
    saved = load_file(save_draft(head, tmp_path / "resaved") / "model.safetensors")
    assert torch.equal(saved["embed_tokens.weight"], embed)

    nudged = embed.clone()
    nudged[3, 5] = torch.nextafter(nudged[3, 5], torch.tensor(1.0, dtype=nudged.dtype))
    own = _write_eagle2(
        tmp_path, target_config, "own", state_edit=lambda s: s | {"embed_tokens.weight": nudged}
    )
    head = load_draft(own, target16)
    assert head.owns_embedding and torch.equal(head.embed_weight, nudged)
    assert "embed_tokens.weight" in checked[-1]
    head = load_draft(exact, target)  # the float64 target's values, rounded to float16 in the file
    assert head.owns_embedding and torch.equal(head.embed_weight, embed.double())


def test_a_head_with_another_targets_embedding_or_corrupt_weights_is_refused(tmp_path, target, target_config):
    """An EAGLE-1/2 head stores its target's frozen embedding: another target's (same shape) means a
    head for another model, which would draft nothing useful with no message. NaN / inf weights
    likewise; integer (quantised) weights would be cast, not dequantised."""
    own = target.embed_tokens.weight.detach().double()
    ok = _write_eagle2(tmp_path, target_config, "ok", state_edit=lambda s: s | {"embed_tokens.weight": own})
    assert load_draft(ok, target).owns_embedding
    rounded = own.to(torch.bfloat16).double()  # a copy stored at lower precision is the same embedding
    assert load_draft(
        _write_eagle2(
            tmp_path, target_config, "bf16", state_edit=lambda s: s | {"embed_tokens.weight": rounded}
        ),
        target,
    ).owns_embedding
    other = torch.randn(101, 64, dtype=torch.float64) * own.std()
    cases = [
        (
            {"embed_tokens.weight": other},
            "embed_tokens differs from the target's .*trained for another target",
        ),
        ({"fc.weight": torch.full((64, 128), float("nan"))}, "head weight fc.weight holds NaN or inf"),
        ({"fc.bias": torch.full((64,), float("inf"))}, "head weight fc.bias holds NaN or inf"),
        ({"fc.weight": torch.zeros(64, 128, dtype=torch.int8)}, "fc.weight has dtype torch.int8; quantised"),
    ]
    for i, (edit, message) in enumerate(cases):
        path = _write_eagle2(tmp_path, target_config, f"bad{i}", state_edit=lambda s, e=edit: s | e)
        with pytest.raises(ValueError, match=message):
            load_draft(path, target)
    # float8 passes is_floating_point, and torch.isfinite is not implemented for it (write_head casts
    # every float to fp16, so the file is rewritten here)
    path = _write_eagle2(tmp_path, target_config, "fp8")
    state = torch.load(path / "pytorch_model.bin")
    torch.save(state | {"fc.weight": state["fc.weight"].to(torch.float8_e4m3fn)}, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="fc.weight has dtype torch.float8_e4m3fn; quantised"):
        load_draft(path, target)


def test_heads_with_dynamic_rope_rescaling_within_the_targets_context_are_refused(
    tmp_path, target, target_config
):
    """A head's positions follow the target's sequence (up to its max_position_embeddings, 512 here),
    not the head's own limit: a 'dynamic' (NTK) RoPE rescales past its start, which is not computed
    here, so a head whose rescaling starts within the target's context loaded and drafted with other
    frequencies than transformers and the reference code give it, with no message."""
    dynamic = {"rope_scaling": {"type": "dynamic", "factor": 2.0}}
    for name, extra in [
        ("short", dynamic | {"max_position_embeddings": 64}),
        (
            "original",
            {
                "rope_scaling": dynamic["rope_scaling"] | {"original_max_position_embeddings": 256},
                "max_position_embeddings": 256,
            },
        ),
        (
            "new-key",
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 64},
        ),
    ]:
        with pytest.raises(
            ValueError,
            match=r"'dynamic' \(NTK\), rescaled past position (64|256), .* up to max_position_embeddings=512",
        ):
            load_draft(_write_eagle2(tmp_path, target_config, name, cfg_extra=extra), target)
    for name, extra in [
        ("long", dynamic | {"max_position_embeddings": 512}),
        (
            "long-original",
            {"rope_scaling": dynamic["rope_scaling"] | {"original_max_position_embeddings": 4096}},
        ),
    ]:
        assert (
            load_draft(
                _write_eagle2(tmp_path, target_config, name, cfg_extra=extra), target
            ).config.rope_scaling
            is None
        )


def test_eagle3_heads_read_the_feature_layers_their_config_names(tmp_path, target, target_config):
    """ModelOpt / speculators / vLLM heads pin their feature layers with eagle_aux_hidden_state_layer_ids
    at the top level (id j: the input of layer j, as vLLM reads it), SpecForge's under eagle_config (id
    j: the output of layer j, the input of j + 1, as SGLang reads it: they were read one layer early);
    a head trained on other layers drafts nothing useful if read with the default ones. A saved head
    writes both, which must agree. Variant keys this head does not compute are refused by name."""
    state = eagle3_state(target_config, prefix="midlayer.", embed=None, draft_vocab=None)
    base = head_config(target_config, architectures=["LlamaForCausalLMEagle3"])

    def load(name, **extra):
        return load_draft(write_head(tmp_path / name, base | extra, state), target)

    assert load("default").feature_layers == (2, 2, 1)  # (2, L // 2, L - 3) of the 4-layer target
    assert load("top", eagle_aux_hidden_state_layer_ids=[0, 1, 3]).feature_layers == (0, 1, 3)
    nested = {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 2]}}
    assert load("nested", **nested).feature_layers == (2, 3, 3)
    spec_forge_default = {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 4 // 2 - 1, 4 - 4]}}
    assert load("specforge", **spec_forge_default).feature_layers == (2, 2, 1)  # = the official layers
    both = {
        "eagle_aux_hidden_state_layer_ids": [0, 1, 3],
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [-1, 0, 2]},
    }
    assert load("both", **both).feature_layers == (0, 1, 3)
    for name, extra, message in [
        (
            "range",
            {"eagle_aux_hidden_state_layer_ids": [0, 1, 4]},
            r"must be layers of the target, in \[0, 4\)",
        ),
        (
            "nested-range",
            {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]}},
            r"inputs of layers \[2, 3, 4\], which must be layers of the target",
        ),
        (
            "disagree",
            {
                "eagle_aux_hidden_state_layer_ids": [0, 1, 3],
                "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 3]},
            },
            "name different layers",
        ),
        ("count", {"eagle_aux_hidden_state_layer_ids": [0, 1]}, "must be 3 integers"),
        ("variant", {"norm_before_residual": True}, r"sets \['norm_before_residual'\]: an EAGLE-3 variant"),
        # vLLM / SGLang feed such a head the target's last hidden state, without fc
        ("no-aux", {"eagle_config": {"use_aux_hidden_state": False}}, r"use_aux_hidden_state=False"),
        ("no-aux-top", {"use_aux_hidden_state": False}, r"use_aux_hidden_state=False"),
    ]:
        with pytest.raises(ValueError, match=message):
            load(name, **extra)
    assert load("off", norm_before_residual=False).feature_layers == (2, 2, 1)
    assert load("aux", eagle_config={"use_aux_hidden_state": True}).feature_layers == (2, 2, 1)
    saved = save_draft(load("again", eagle_aux_hidden_state_layer_ids=[0, 1, 3]), tmp_path / "saved")
    assert load_draft(saved, target).feature_layers == (0, 1, 3)
    written = json.loads((saved / "config.json").read_text())
    assert written["eagle_aux_hidden_state_layer_ids"] == [0, 1, 3]
    assert written["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [-1, 0, 2]  # what SGLang reads


def test_eagle3_heads_with_their_own_feature_layers_fit_a_three_layer_target(
    tmp_path, tiny_checkpoints, target_config
):
    """The default layers (2, L // 2, L - 3) need 4 target layers; a head naming its own did not get
    past that check, whose message spoke of the default layers."""
    from tests.eagle.conftest import build_hf_target, save_hf_target

    small = {
        k: target_config[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
    }
    three = load_target(
        save_hf_target(build_hf_target("llama", 0, num_hidden_layers=3, **small), tmp_path / "t3"),
        dtype=torch.float64,
    )
    state = eagle3_state(target_config, prefix="midlayer.", embed=None, draft_vocab=None)
    base = head_config(target_config, architectures=["LlamaForCausalLMEagle3"])
    with pytest.raises(
        ValueError, match=r"needs a target with >= 4 layers \(features of 2, L//2, L-3\), got 3"
    ):
        load_draft(write_head(tmp_path / "default", base, state), three)
    own = load_draft(
        write_head(tmp_path / "own", base | {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}, state), three
    )
    assert own.feature_layers == (0, 1, 2)
    with pytest.raises(ValueError, match=r"must be layers of the target, in \[0, 3\)"):
        load_draft(
            write_head(tmp_path / "past", base | {"eagle_aux_hidden_state_layer_ids": [0, 1, 3]}, state),
            three,
        )


def test_mismatched_eagle3_heads_are_refused(tmp_path, target, target_config):
    cfg = head_config(target_config, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=40)

    def write(name, state, config=cfg):
        return write_head(tmp_path / name, config, state)

    good = eagle3_state(target_config, prefix="midlayer.", embed=None, draft_vocab=DRAFT_VOCAB)
    # every refusal names the head's directory (the target loaded fine): these said only what was wrong
    with pytest.raises(ValueError, match=r"^draft .*/a: EAGLE-3 checkpoint: missing keys \[d2t, t2d\]"):
        load_draft(write("a", {k: v for k, v in good.items() if k not in ("d2t", "t2d")}), target)
    with pytest.raises(ValueError, match="^draft .*/b: t2d does not mark"):
        load_draft(write("b", good | {"t2d": torch.ones(101, dtype=torch.bool)}), target)
    shifted = good | {"d2t": good["d2t"] + 200}
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        load_draft(write("c", shifted), target)
    with pytest.raises(ValueError, match=r"lm_head.weight: \[40, 64\] \(expected \[101, 64\]\)"):
        load_draft(write("d", good, cfg | {"draft_vocab_size": 101}), target)
    for bad in (0, -5, 102, "40", 40.0):  # 0 fell back to lm_head's rows; -5 failed as a shape
        with pytest.raises(
            ValueError, match=rf"draft_vocab_size must be an integer in \[1, vocab_size=101\], got {bad!r}"
        ):
            load_draft(write(f"vocab{bad}", good, cfg | {"draft_vocab_size": bad}), target)
    mixed = good | {"layers.0.hidden_norm.weight": good.pop("midlayer.hidden_norm.weight")}
    with pytest.raises(ValueError, match="mixes"):
        load_draft(write("e", mixed), target)
    with pytest.raises(ValueError, match=r"fc.weight: \[64, 128\]"):
        load_draft(write("f", good | {"fc.weight": torch.zeros(64, 128)}), target)
    with pytest.raises(ValueError, match="not an EAGLE"):
        load_draft(write("g", {"foo.weight": torch.zeros(3)}), target)


def test_a_full_vocabulary_eagle3_head_ignores_a_placeholder_t2d(tmp_path, target, target_config):
    """With draft_vocab_size == vocab_size the reference code (ea_model.py) deletes d2t and t2d and
    uses ids as they are: a head whose file carries a placeholder t2d (all False) beside the identity
    d2t (all 0) was refused ("t2d does not mark ..."). A d2t that is not the identity is still refused
    (a full vocabulary mapped to strictly increasing ids can only be the identity)."""
    full = head_config(target_config, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=101)
    state = eagle3_state(target_config, prefix="midlayer.", embed=None, draft_vocab=None)
    placeholder = state | {"t2d": torch.zeros(101, dtype=torch.bool)}
    head = load_draft(write_head(tmp_path / "placeholder", full, placeholder), target)
    reference = load_draft(write_head(tmp_path / "identity", full, state), target)
    assert torch.equal(head.t2d, torch.ones(101, dtype=torch.bool)) and not head.d2t.any()
    assert torch.equal(head.to_target_ids(torch.tensor([0, 57, 100])), torch.tensor([0, 57, 100]))
    assert head.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(head.state_dict()[key], value), key
    not_identity = placeholder | {
        "d2t": torch.zeros(101, dtype=torch.int64).index_fill_(0, torch.tensor([100]), -1)
    }
    with pytest.raises(ValueError, match="strictly increasing target ids"):
        load_draft(write_head(tmp_path / "not-identity", full, not_identity), target)


# --------------------------------------------------------------------------------------------------
# Save -> load round trips and fresh heads
# --------------------------------------------------------------------------------------------------
def _assert_same_head(a, b):
    # (an EAGLE-1/2 head owns its embedding or reads the target's equal one: compared below)
    sa, sb = ({k: v for k, v in h.state_dict().items() if k != "embed_tokens.weight"} for h in (a, b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.embed_weight, b.embed_weight)


@pytest.mark.parametrize("name", ["eagle2", "eagle3-draftvocab-ownembed"])
def test_save_load_round_trip_is_exact(tmp_path, tiny_checkpoints, target, target_config, name):
    if name == "eagle2":
        head = load_draft(tiny_checkpoints.eagle2, target)
        original_keys = set(torch.load(tiny_checkpoints.eagle2 / "pytorch_model.bin", weights_only=True))
    else:
        state = eagle3_state(
            target_config,
            prefix="midlayer.",
            embed=torch.randn(101, 64, dtype=torch.float64),
            draft_vocab=DRAFT_VOCAB,
        )
        cfg = head_config(target_config, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=40)
        head = load_draft(write_head(tmp_path / "src", cfg, state, dtype=torch.float64), target)
        original_keys = set(state)
    out = save_draft(head, tmp_path / "saved", also_bin=True)
    assert set(load_file(str(out / "model.safetensors")).keys()) == original_keys
    assert set(torch.load(out / "pytorch_model.bin", weights_only=True).keys()) == original_keys
    _assert_same_head(head, load_draft(out, target))
    (out / "model.safetensors").unlink()  # the .bin alone loads too
    _assert_same_head(head, load_draft(out, target))
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["model_type"] == "llama"
    assert ("bias" in config) == (name == "eagle2") and ("draft_vocab_size" in config) == (name != "eagle2")


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_random_draft_trains_saves_and_reloads(tmp_path, target, kind):
    vocab = DRAFT_VOCAB if kind == "eagle3" else None
    head = random_draft(target, kind, draft_vocab=vocab, seed=3)
    assert head.training and head.kind == kind and head.dtype == torch.float64
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable and not any("embed" in n for n in trainable)
    if kind == "eagle3":
        assert head.draft_vocab_size == 40 and not head.owns_embedding
        assert torch.equal(head.to_target_ids(torch.arange(40)), torch.tensor(DRAFT_VOCAB))
    else:
        assert torch.equal(head.embed_weight, target.embed_tokens.weight)
    again = random_draft(target, kind, draft_vocab=vocab, seed=3)
    _assert_same_head(head, again)
    _assert_same_head(head, load_draft(save_draft(head, tmp_path / kind), target))
    with pytest.raises(ValueError, match="kind"):
        random_draft(target, "medusa")
    with pytest.raises(ValueError, match="draft_vocab"):
        random_draft(target, "eagle3", draft_vocab=[5, 3, 200])


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_a_head_in_another_dtype_copies_what_it_shares(tiny_checkpoints, target, kind):
    """A float32 head for the float64 target: its own float32 copies of the target's embedding and
    (EAGLE-1/2) lm_head, the target's tensors untouched, and the same outputs as the float64 head
    up to float32 rounding."""
    path = getattr(tiny_checkpoints, kind)
    head = load_draft(path, target, dtype=torch.float32)
    same = load_draft(path, target)
    assert head.dtype == torch.float32 and target.dtype == torch.float64
    assert head.embed_weight.dtype == torch.float32
    assert target.embed_tokens.weight.dtype == torch.float64 and target.lm_head_weight.dtype == torch.float64
    if kind == "eagle2":
        assert head.lm_head_weight.dtype == torch.float32
        assert head.lm_head_weight.data_ptr() != target.lm_head_weight.data_ptr()
        assert same.lm_head_weight.data_ptr() == target.lm_head_weight.data_ptr(), "same dtype: shared"
    H = target.config.hidden_size
    ids = torch.tensor([[1, 2, 3]])
    feats = torch.randn(1, 3, H, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if kind == "eagle3":
        feats = torch.randn(1, 3, 3 * H, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        feats_f32 = head.project_features(*feats.float().chunk(3, dim=-1))
        feats_f64 = same.project_features(*feats.chunk(3, dim=-1))
    else:
        feats_f32, feats_f64 = feats.float(), feats
    got = head(feats_f32, ids, head.new_cache(1, 4))
    want = same(feats_f64, ids, same.new_cache(1, 4))
    assert got.logits.dtype == torch.float32
    assert rel_err(got.logits, want.logits) < 1e-4


def test_draft_inputs_are_validated(tiny_checkpoints, target):
    head = load_draft(tiny_checkpoints.eagle2, target)
    cache = head.new_cache(1, 4)
    with pytest.raises(ValueError, match="hidden must be"):
        head(torch.zeros(1, 2, 32, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.int64), cache)
    with pytest.raises(TypeError, match="must be torch.float64"):
        head(torch.zeros(1, 2, 64), torch.zeros(1, 2, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="overflow"):
        head(torch.zeros(1, 5, 64, dtype=torch.float64), torch.zeros(1, 5, dtype=torch.int64), cache)
    with pytest.raises(TypeError, match="dtype must be one of"):
        load_draft(tiny_checkpoints.eagle2, target, dtype=torch.int64)
    with pytest.raises(ValueError, match="must be on the target's device"):
        load_draft(tiny_checkpoints.eagle2, target, device="meta")
    with pytest.raises(ValueError, match="not allocated for this draft head"):
        head(
            torch.zeros(1, 2, 64, dtype=torch.float64),
            torch.zeros(1, 2, dtype=torch.int64),
            target.new_cache(1, 4),
        )


# --------------------------------------------------------------------------------------------------
# Layouts that other trainers and converters write
# --------------------------------------------------------------------------------------------------
def test_eagle3_vocab_maps_in_other_layouts_load_the_same_head(tmp_path, target, target_config):
    """int32 d2t, uint8 t2d, no t2d (vLLM and SGLang read d2t only) and a config without
    draft_vocab_size (taken from lm_head's rows) were refused with dtype or shape errors."""
    cfg = head_config(target_config, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=40)
    good = eagle3_state(target_config, prefix="midlayer.", embed=None, draft_vocab=DRAFT_VOCAB)
    want = load_draft(write_head(tmp_path / "good", cfg, good), target)
    without_size = {k: v for k, v in cfg.items() if k != "draft_vocab_size"}
    variants = {
        "d2t_int32": (cfg, good | {"d2t": good["d2t"].int()}),
        "t2d_uint8": (cfg, good | {"t2d": good["t2d"].to(torch.uint8)}),
        "no_t2d": (cfg, {k: v for k, v in good.items() if k != "t2d"}),
        "no_draft_vocab_size": (without_size, good),
    }
    for name, (config, state) in variants.items():
        head = load_draft(write_head(tmp_path / name, config, state), target)
        assert head.draft_vocab_size == 40, name
        _assert_same_head(head, want)
    with pytest.raises(ValueError, match="t2d without d2t"):
        load_draft(
            write_head(tmp_path / "t2d_only", cfg, {k: v for k, v in good.items() if k != "d2t"}), target
        )
    with pytest.raises(TypeError, match="t2d must be bool"):
        bad_t2d = good | {"t2d": good["t2d"].to(torch.uint8) * 2}
        load_draft(write_head(tmp_path / "t2d_two", cfg, bad_t2d), target)


@pytest.mark.parametrize("prefix", ["module.", "model.", "ea_layer."])
def test_eagle2_heads_saved_with_a_wrapper_prefix_or_rotary_buffers_load(
    tmp_path, target, target_config, prefix
):
    cfg = head_config(target_config)
    state = eagle2_state(target_config, bias=True, embed=None)
    want = load_draft(write_head(tmp_path / "plain", cfg, state), target)
    wrapped = {prefix + k: v for k, v in state.items()}
    wrapped[prefix + "layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    _assert_same_head(load_draft(write_head(tmp_path / "wrapped", cfg, wrapped), target), want)


def test_a_head_directory_without_config_json_says_so(tmp_path, target, target_config):
    directory = write_head(
        tmp_path / "h", head_config(target_config), eagle2_state(target_config, bias=True, embed=None)
    )
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"draft .*/h: no config.json"):
        load_draft(directory, target)


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
@pytest.mark.parametrize(
    "scaling, written",
    [
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            None,
        ),
        ({"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
    ],
    ids=["llama3", "linear"],
)
def test_a_new_heads_rope_scaling_is_one_the_reference_code_reads(
    make_target, tmp_path, kind, scaling, written
):
    """The reference EAGLE code's config takes rope_scaling only as exactly {"type", "factor"} of type
    linear or dynamic: heads made here for a Llama-3.1 target exported {"rope_type": "llama3", ...} and
    loaded nowhere but here, SGLang and vLLM. They now carry no scaling (as the official Llama-3.1
    heads), and linear scaling is written in the two-key form; both load back as they were."""
    from eagle.models.config import LinearRopeScaling

    _, path = make_target("llama", rope_scaling=scaling, rope_theta=500000.0, num_hidden_layers=4)
    target = load_target(path, dtype=torch.float32)
    head = random_draft(target, kind)
    assert head.config.rope_scaling == (LinearRopeScaling(4.0) if written else None)
    saved = save_draft(head, tmp_path / kind)
    rope = json.loads((saved / "config.json").read_text()).get("rope_scaling")
    assert rope == written
    assert rope is None or (set(rope) == {"type", "factor"} and rope["type"] in ("linear", "dynamic"))
    assert load_draft(saved, target).config.rope_scaling == head.config.rope_scaling
