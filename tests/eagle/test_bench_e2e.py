"""The end-to-end benchmark (``eagle.bench``) on a tiny random Llama with a tokenizer, quick settings.

One module-scoped run covers every method at batch 1 and 2, temperature 0 and 1 (float64, so that
the greedy agreement check is exact); the other tests check the pieces around it: prompt files,
the held-out default prompts, the mismatch report and bad input.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from eagle import bench
from eagle.bench import METHODS, BenchConfig, format_table, run_benchmark
from eagle_kernels import _ext
from tests.eagle.conftest import build_hf_target, save_hf_target

BATCHES = (1, 2)
TEMPERATURES = (0.0, 1.0)
NEW_TOKENS = 6


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["def f(x):\n    return x + 1\n", "import os\nclass A:\n    pass\n"] * 10
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> Path:
    """A 4-layer random Llama (HF, float64 weights) with a byte-level BPE tokenizer, on disk."""
    tokenizer = _tokenizer()
    directory = tmp_path_factory.mktemp("bench_target")
    save_hf_target(build_hf_target("llama", seed=0, vocab_size=len(tokenizer)), directory)
    tokenizer.save_pretrained(directory)
    return directory


def _write_jsonl(path: Path, records: list[dict], blank_line: bool = False) -> Path:
    lines = [json.dumps(r) for r in records]
    if blank_line:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(target: Path, tmp: Path, **overrides) -> BenchConfig:
    settings = dict(
        target=str(target),
        batch_sizes=BATCHES,
        temperatures=TEMPERATURES,
        new_tokens=NEW_TOKENS,
        repeats=2,
        out=str(tmp / "out"),
        work_dir=str(tmp / "work"),
        dtype="float64",
        threads=1,
        progress=False,
    )
    return BenchConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def report(tiny_target, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_run")
    prompts_file = _write_jsonl(
        tmp / "prompts.jsonl",
        [
            {"prompt": "def f(x):\n    return x"},
            {"question_id": 81, "category": "coding", "turns": ["import os\nclass A:", "second turn"]},
        ],
        blank_line=True,
    )
    config = _config(
        tiny_target, tmp, prompts=("class A:\n    def f(self):",), prompts_file=str(prompts_file)
    )
    return run_benchmark(config, log=lambda _: None)


def test_every_method_batch_and_temperature_is_reported_with_sane_numbers(report):
    rows = {(r["method"], r["batch"], r["temperature"]): r for r in report.payload["results"]}
    assert set(rows) == {(m, b, t) for m in METHODS for b in BATCHES for t in TEMPERATURES}
    for (method, batch, temp), r in rows.items():
        if batch > 1 and method in ("hf_prompt_lookup", "hf_assisted"):
            assert r["status"] == "skipped" and "batch size 1" in r["reason"]
            continue
        assert r["status"] == "ok", (method, batch, temp)
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["tokens_per_s_best"] >= r["tokens_per_s"] and len(r["tokens_per_s_all_repeats"]) == 2
        assert r["new_tokens_per_repeat"] == NEW_TOKENS * math.ceil(3 / batch) * batch  # 3 prompts
        assert 1.0 <= r["tau"] <= NEW_TOKENS, (method, batch, temp, r["tau"])
        assert ("tree" in r) == method.startswith("eagle_")
        assert r["speedup_vs_vanilla"] == pytest.approx(
            r["tokens_per_s"] / rows["vanilla", batch, temp]["tokens_per_s"]
        )
    for batch in BATCHES:
        for temp in TEMPERATURES:
            assert rows["vanilla", batch, temp]["tau"] == 1.0
            assert rows["hf_generate", batch, temp]["tau"] == 1.0
            auto = rows["eagle_auto", batch, temp]  # speculative="auto": how often it chose plain steps
            assert auto["speculative_rounds"] + auto["plain_steps"] >= 1
            assert auto["plain_step_share"] == auto["plain_steps"] / (
                auto["plain_steps"] + auto["speculative_rounds"]
            )
            assert "plain_step_share" not in rows["eagle_dynamic", batch, temp]
    assert "plain steps" in format_table(report.payload["results"])


def test_greedy_outputs_of_every_method_equal_vanilla(report):
    assert report.greedy_agreement_ok
    for r in report.payload["results"]:
        if r["status"] != "ok" or r["method"] == "vanilla":
            continue
        check = r["greedy_agreement"]
        if r["temperature"] == 0:
            assert check["checked"] and check["ok"], r
            assert check["rows_compared"] == math.ceil(3 / r["batch"]) * r["batch"]
            assert check["repeats_compared"] == 2
        else:
            assert not check["checked"]


def test_json_and_png_are_written_with_machine_and_settings(report, tiny_target):
    saved = json.loads(report.json_path.read_text())
    assert report.json_path.name == f"e2e_{tiny_target.name}_float64_randomdraft.json"  # not the CPU default
    assert {"commit", "torch", "platform", "uncommitted_tracked_files"} <= set(saved["machine"])
    assert {"transformers", "eagle"} <= set(saved["versions"])
    settings = saved["settings"]
    assert settings["random_draft"] is True and "random" in settings["draft"]
    assert len(settings["target_weights_sha256"]) == 16 and settings["draft_weights_sha256"] is None
    assert "derived" in settings["assistant"]["how"] and Path(settings["assistant"]["path"]).is_dir()
    sources = [p["source"] for p in settings["prompts"]]
    assert sources == ["--prompt 1", "prompts.jsonl:1", "prompts.jsonl:3 (question_id 81)"]
    # what each prompt was: its text, and a hash of its token ids (the same text under another
    # tokenizer is another prompt)
    assert [p["text"] for p in settings["prompts"]] == [
        "class A:\n    def f(self):",
        "def f(x):\n    return x",
        "import os\nclass A:",
    ]
    assert all(len(p["ids_sha256"]) == 64 for p in settings["prompts"])
    assert len({p["ids_sha256"] for p in settings["prompts"]}) == 3
    assert (
        settings["prompts_file_sha256"]
        == hashlib.sha256(Path(settings["prompts_file"]).read_bytes()).hexdigest()
    )
    # which kernels ran: the same commit gives other figures without the extension or with a switch set
    kernels = saved["machine"]["kernels"]
    assert (
        kernels["extension_loaded"] is _ext.STATUS.loaded
        and kernels["extension_status"] == _ext.STATUS.reason
    )
    assert all(k.startswith("EAGLE") or k == "TRITON_INTERPRET" for k in kernels["env"])
    assert settings["num_prompts"] == 3 and settings["num_prompts_requested"] is None  # what ran
    assert report.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = bench.format_table(saved["results"])
    assert "skipped: transformers' assisted generation supports batch size 1 only" in table
    assert "MISMATCH" not in table and "ok (3 rows)" in table


def test_prompts_file_reads_both_formats_and_rejects_bad_lines(tmp_path):
    path = _write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "a"}, {"question_id": 1, "turns": ["first", "second"]}],
        blank_line=True,
    )
    assert bench.read_prompts_file(path) == [("p.jsonl:1", "a"), ("p.jsonl:3 (question_id 1)", "first")]
    for content, message in [
        ("", "holds no prompts"),
        ("\n  \n", "holds no prompts"),
        ('{"prompt": "a"}\nnot json\n', "p.jsonl:2: not valid JSON"),
        ('{"text": "a"}\n', "expected"),
        ('{"question_id": 1, "turns": []}\n', "expected"),
        ('{"prompt": ""}\n', "empty"),
    ]:
        (tmp_path / "p.jsonl").write_text(content)
        with pytest.raises(ValueError, match=message):
            bench.read_prompts_file(tmp_path / "p.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bench.read_prompts_file(tmp_path / "missing.jsonl")


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant>"


def test_chat_sends_each_user_prompt_through_the_chat_template(tiny_target, tmp_path):
    """--chat: a chat model's head is measured on the prompts it was trained on (MT-bench, as EAGLE's
    evaluation runs it): each text a user message, the assistant's turn opened, the template's text
    tokenized without added special tokens. The run records it, and the prompts differ from plain text's."""
    target = tmp_path / "chat_target"
    shutil.copytree(tiny_target, target)
    config_file = target / "tokenizer_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"chat_template": CHAT_TEMPLATE}))
    prompts_file = _write_jsonl(
        tmp_path / "mt.jsonl", [{"question_id": 81, "turns": ["Write a poem.", "Shorter."]}]
    )
    config = _config(
        target, tmp_path, methods=("vanilla", "eagle_chain"), batch_sizes=(1,), temperatures=(0.0,),
        repeats=1, prompts=("def f(x):",), prompts_file=str(prompts_file), chat=True, save=False,
    )  # fmt: skip
    results = run_benchmark(config, log=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(target)
    want = [
        tokenizer(f"<user> {text}\n<assistant>", add_special_tokens=False)["input_ids"]
        for text in ("def f(x):", "Write a poem.")
    ]
    assert (
        bench.encode_texts([("a", "def f(x):"), ("b", "Write a poem.")], tokenizer, chat=True)[1].ids
        == want[1]
    )
    settings = results.payload["settings"]
    recorded = settings["prompts"]
    digest = [hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest() for ids in want]
    assert [p["ids_sha256"] for p in recorded] == digest
    assert settings["chat"] is True and "chat template" in settings["prompt_origin"]
    plain = bench.encode_texts([("a", "def f(x):")], tokenizer)[0].ids
    assert plain != want[0]


def test_chat_needs_user_prompts_and_a_chat_template(tiny_target, tmp_path):
    with pytest.raises(ValueError, match="the default prompts are code files, not conversations"):
        run_benchmark(_config(tiny_target, tmp_path, chat=True), log=lambda _: None)
    config = _config(tiny_target, tmp_path, methods=("vanilla",), prompts=("x = 1",), chat=True)
    with pytest.raises(ValueError, match="tokenizer has none .* drop --chat, or add a template"):
        run_benchmark(config, log=lambda _: None)
    models = bench.Models(None, "unused", "bundled", random_draft=False)
    named = BenchConfig(target="tiny-code", prompts=("x",), chat=True)  # (not the plain-text run's file)
    assert bench.default_name(named, models) == "e2e_tiny-code_chat"


def test_default_prompts_are_prefixes_of_heldout_stdlib_files(tiny_target):
    from transformers import AutoTokenizer

    from eagle.train.corpus import is_validation_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    prompts = bench.heldout_prompts(tokenizer, 3, 20)
    assert len(prompts) == 3 and len({p.source for p in prompts}) == 3
    assert all(len(p.ids) == 20 and is_validation_path(p.source) for p in prompts)
    assert prompts == bench.heldout_prompts(tokenizer, 3, 20)  # deterministic
    with pytest.raises(ValueError, match="held-out standard-library files have more than"):
        bench.heldout_prompts(tokenizer, 10_000, 20)


def test_a_greedy_mismatch_is_reported_loudly(tiny_target):
    import eagle

    model = eagle.load(str(tiny_target), dtype=torch.float64)
    models = bench.Models(model, str(tiny_target), "none", random_draft=False)
    prompt = bench.Prompt("p", [5, 6, 7])
    want = model.generate([prompt.ids], 4, speculative=False, eos_token_id=[]).tokens[0]
    got = want[:2] + [(want[2] + 1) % 50] + want[3:]
    cells = [bench.Cell("vanilla", 1, 0.0), bench.Cell("eagle_chain", 1, 0.0)]
    for cell, tokens in zip(cells, (want, got)):
        cell.record([bench.Output([tokens], 3, 3)], 1.0)
    bench.check_greedy_agreement(cells, models, [prompt])
    results = bench.summarize(cells)
    check = results[1]["greedy_agreement"]
    assert check["checked"] and not check["ok"] and check["mismatched_rows"] == 1
    detail = check["mismatches"][0]
    assert detail["first_difference_at"] == 2 and detail["vanilla_token"] == want[2]
    assert detail["vanilla_top2_logit_gap"] > 0 and detail["logit_vanilla_minus_method_token"] > 0
    assert "!!! MISMATCH 1/1 rows (first: p at token 2" in bench.format_table(results)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"methods": ("vanilla", "hf_beam")}, ValueError, r"unknown method\(s\) \['hf_beam'\]"),
        ({"batch_sizes": (1, 0)}, ValueError, "batch sizes must be >= 1"),
        ({"temperatures": (-1.0,)}, ValueError, "temperatures must be finite and >= 0"),
        ({"temperatures": (0.0, math.inf)}, ValueError, "temperatures must be finite and >= 0"),
        (
            {"methods": ("vanilla", "eagle_chain", "vanilla")},
            ValueError,
            r"methods lists \['vanilla'\] more than once",
        ),
        ({"batch_sizes": (1, 4, 1)}, ValueError, r"batch_sizes lists \[1\] more than once"),
        ({"new_tokens": 0}, ValueError, "new_tokens must be >= 1"),
        ({"prompts": ("",)}, ValueError, "empty prompt"),
        ({"dtype": "float99"}, ValueError, "dtype must name a floating dtype"),
        ({"dtype": "int8"}, ValueError, r"dtype must name a floating dtype .*, got 'int8'"),
        ({"draft_dtype": "bf17"}, ValueError, "draft_dtype must name a floating dtype"),
        ({"draft_dtype": "float32"}, ValueError, "draft_dtype=float32 needs a trained head"),
    ],
)
def test_bad_settings_raise_before_anything_runs(tiny_target, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        run_benchmark(_config(tiny_target, tmp_path, **overrides), log=lambda _: None)


def test_empty_prompts_file_and_overlong_prompt_are_refused(tiny_target, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no prompts"):
        run_benchmark(_config(tiny_target, tmp_path, prompts_file=str(empty)), log=lambda _: None)
    config = _config(tiny_target, tmp_path, methods=("vanilla",), prompts=("x = 1\n" * 400,))
    with pytest.raises(ValueError, match="exceeds the target's max_position_embeddings"):
        run_benchmark(config, log=lambda _: None)


def test_cli_options_quick_defaults_and_explicit_overrides(capsys):
    from eagle.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--new-tokens", "5", "--methods", "vanilla"])
    config = bench.config_from_args(args)
    assert config.new_tokens == 5 and config.methods == ("vanilla",) and config.quick
    assert config.repeats == bench.QUICK["repeats"] and config.batch_sizes == bench.QUICK["batch_sizes"]
    full = bench.config_from_args(build_parser().parse_args(["bench"]))
    assert full.new_tokens == 128 and full.batch_sizes == (1, 4, 16) and full.methods == METHODS
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "--methods", "nope"])
    assert exit_info.value.code == 2  # argparse's usage error, not --help's 0
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_bundled_draft_is_picked_up_once_it_exists(tmp_path, monkeypatch):
    (tmp_path / "tiny-code" / "target").mkdir(parents=True)
    (tmp_path / "tiny-code" / "target" / "config.json").write_text("{}")
    monkeypatch.setattr(bench, "ASSETS", tmp_path)
    assert bench.resolve_pair("tiny-code", None) == (str(tmp_path / "tiny-code" / "target"), None)
    (tmp_path / "tiny-code" / "draft").mkdir()
    (tmp_path / "tiny-code" / "draft" / "config.json").write_text("{}")
    assert bench.resolve_pair("tiny-code", None)[1] == str(tmp_path / "tiny-code" / "draft")
    assert bench.resolve_pair("tiny-code", "mine")[1] == "mine"
    assert bench.resolve_pair("other", None) == ("other", None)


@pytest.mark.parametrize(
    "dtype, quick, stem",
    [
        (None, False, "e2e_tiny-code"),
        ("float32", False, "e2e_tiny-code"),  # the CPU default is not named
        ("bfloat16", False, "e2e_tiny-code_bfloat16"),
        ("bfloat16", True, "e2e_tiny-code_bfloat16_quick"),
    ],
)
def test_default_file_name_names_a_non_default_dtype(dtype, quick, stem):
    config = BenchConfig(target="tiny-code", device="cpu", dtype=dtype, quick=quick)
    models = bench.Models(None, "unused", "bundled", random_draft=False)
    assert bench.default_name(config, models) == stem


@pytest.mark.parametrize(
    "dtype, draft_dtype, stem",
    [
        (None, "bfloat16", "e2e_tiny-code_draftbfloat16"),
        ("float32", "float32", "e2e_tiny-code"),  # the head in the target's dtype is not named
        ("bfloat16", "float32", "e2e_tiny-code_bfloat16_draftfloat32"),
    ],
)
def test_default_file_name_names_a_head_in_another_dtype(dtype, draft_dtype, stem):
    config = BenchConfig(target="tiny-code", device="cpu", dtype=dtype, draft_dtype=draft_dtype)
    assert bench.default_name(config, bench.Models(None, "unused", "bundled", random_draft=False)) == stem
    args = ["bench", "--draft-dtype", draft_dtype] + (["--dtype", dtype] if dtype else [])
    from eagle.cli import build_parser

    assert bench.config_from_args(build_parser().parse_args(args)).draft_dtype == draft_dtype


def _greedy_run_and_its_third_logits(tiny_target):
    """The float64 tiny checkpoint's bench models, a prompt, its greedy tokens and the re-run logits at
    their third token (where the tests below make vanilla's and a method's tokens differ)."""
    import eagle

    model = eagle.load(str(tiny_target), dtype=torch.float64)
    models = bench.Models(model, str(tiny_target), "none", random_draft=False)
    prompt = bench.Prompt("p", [5, 6, 7])
    best = model.generate([prompt.ids], 4, speculative=False, eos_token_id=[]).tokens[0]
    return models, prompt, best, bench._next_logits(model.target, prompt.ids + best[:2])


def _summarized_pair(models, prompt, vanilla: list[int], method: list[int]) -> list[dict]:
    """``summarize`` of a vanilla and an eagle_chain cell that produced these tokens, agreement checked."""
    cells = [bench.Cell("vanilla", 1, 0.0), bench.Cell("eagle_chain", 1, 0.0)]
    for cell, tokens in zip(cells, (vanilla, method)):
        cell.record([bench.Output([tokens], 3, 3)], 1.0)
    bench.check_greedy_agreement(cells, models, [prompt])
    return bench.summarize(cells)


def _greedy_after(models, prompt, tokens: list[int]) -> int:
    return int(bench._next_logits(models.eagle.target, prompt.ids + tokens).argmax())


def test_a_rounding_near_tie_is_shown_but_not_a_failure(tiny_target, monkeypatch):
    models, prompt, want, logits = _greedy_run_and_its_third_logits(tiny_target)
    runner_up = int(logits.topk(2).indices[1])
    flipped = want[:2] + [runner_up]
    got = flipped + [_greedy_after(models, prompt, flipped)]  # then greedy on its own text
    # pretend float64 had bfloat16's resolution: the runner-up is then within rounding of the winner
    gap = float(logits[want[2]] - logits[runner_up])
    monkeypatch.setattr(bench, "_ulp", lambda dtype, magnitude: gap)
    rows = _summarized_pair(models, prompt, want, got)
    check = rows[1]["greedy_agreement"]
    assert check["ok"] and check["mismatched_rows"] == 1 and check["near_tie_rows"] == 1
    assert "1 near-tie flip(s)" in bench.format_table(rows)


def test_a_forgiven_flip_does_not_hide_a_later_wrong_token(tiny_target, monkeypatch):
    """Only the first difference was examined: after a near-tie flip, any later token passed. Now the
    method's continuation must stay the target's greedy choice given its own prefix."""
    models, prompt, want, logits = _greedy_run_and_its_third_logits(tiny_target)
    runner_up = int(logits.topk(2).indices[1])
    flipped = want[:2] + [runner_up]
    after = bench._next_logits(models.eagle.target, prompt.ids + flipped)
    worst = int(after.argmin())  # far from the greedy choice after the flip
    gap = float(logits[want[2]] - logits[runner_up])
    assert float(after.max() - after[worst]) > 2 * gap
    monkeypatch.setattr(bench, "_ulp", lambda dtype, magnitude: gap)
    check = _summarized_pair(models, prompt, want, flipped + [worst])[1]["greedy_agreement"]
    assert not check["ok"] and check["near_tie_rows"] == 0
    assert check["mismatches"][0]["later_non_greedy_at"] == 3


def test_two_close_tokens_far_below_the_top_are_no_near_tie(tiny_target, monkeypatch):
    """A pair within 2 ulp of each other but both well below the re-run's best token is not a rounding
    tie of the choice: a real mismatch."""
    models, prompt, best, logits = _greedy_run_and_its_third_logits(tiny_target)
    ranked = logits.sort(descending=True)
    values, ids = ranked.values, ranked.indices
    pair = min(range(2, 20), key=lambda i: float(values[i] - values[i + 1]))  # the closest pair below
    close = float(values[pair] - values[pair + 1])
    assert float(values[0] - values[pair]) > 2 * close  # far below the top, in this model's logits
    monkeypatch.setattr(bench, "_ulp", lambda dtype, magnitude: close)  # the pair is within 1 "ulp"
    vanilla = best[:2] + [int(ids[pair])] + best[3:]
    method = best[:2] + [int(ids[pair + 1])] + best[3:]
    check = _summarized_pair(models, prompt, vanilla, method)[1]["greedy_agreement"]
    assert not check["ok"] and check["near_tie_rows"] == 0


@pytest.mark.parametrize("ulps_apart, near_tie", [(2, True), (3, False)])
def test_a_near_tie_counts_in_either_order(tiny_target, monkeypatch, ulps_apart, near_tie):
    """The re-run forward that describes a mismatch can round the pair the other way than vanilla's
    own decode did (seen on an H200 in bfloat16): vanilla's token then sits below the method's, by
    the same near-tie margin, and that is still a near-tie; farther apart it is a real mismatch."""
    models, prompt, best, logits = _greedy_run_and_its_third_logits(tiny_target)
    runner_up = int(logits.topk(2).indices[1])
    vanilla = best[:2] + [runner_up] + best[3:]  # vanilla "chose" the runner-up of the re-run logits
    gap = float(logits[best[2]] - logits[runner_up])
    monkeypatch.setattr(bench, "_ulp", lambda dtype, magnitude: gap / ulps_apart)
    check = _summarized_pair(models, prompt, vanilla, best)[1]["greedy_agreement"]
    assert check["mismatches"][0]["logit_vanilla_minus_method_token"] == pytest.approx(-gap)
    assert check["ok"] is near_tie and check["near_tie_rows"] == int(near_tie)


def test_paired_speedup_is_the_median_of_each_repeats_own_ratio():
    """A slow spell that hits vanilla's repeats more than the method's moves the ratio of medians,
    not the paired ratio (each repeat runs both, one after the other)."""
    vanilla, eagle = bench.Cell("vanilla", 1, 0.0), bench.Cell("eagle_dynamic", 1, 0.0)
    for v_s, e_s in [(1.0, 0.9), (2.0, 1.9), (2.2, 1.0), (1.0, 0.8), (2.0, 1.8)]:
        for cell, seconds in ((vanilla, v_s), (eagle, e_s)):
            cell.record([bench.Output([[1, 2]], 2, 2)], seconds)
    row = bench.summarize([vanilla, eagle])[1]
    ratios = [1.0 / 0.9, 2.0 / 1.9, 2.2 / 1.0, 1.0 / 0.8, 2.0 / 1.8]
    assert row["speedup_paired_all_repeats"] == pytest.approx(ratios)
    assert row["speedup_paired"] == pytest.approx(1.0 / 0.9)
    assert (row["speedup_paired_min"], row["speedup_paired_max"]) == pytest.approx((2.0 / 1.9, 2.2))
    assert row["speedup_vs_vanilla"] == pytest.approx(2.0)  # ratio of medians: 2.0 / 1.0 tokens/s
    assert "1.11x (1.05-2.20)" in bench.format_table(bench.summarize([vanilla, eagle]))


def test_tau_and_the_plain_step_share_cover_every_timed_repeat():
    """tokens/s is a median over the repeats, so tau and eagle_auto's plain-step share come from all of
    them too: they came from the first repeat alone, while eagle_auto adapts on the clock and a dynamic
    tree may change between repeats (an eagle_auto run at T = 0 had tau 1.81 and 62% plain steps in its
    first repeat, 2.61 and none in the next three)."""
    auto = bench.Cell("eagle_auto", 1, 0.0)
    for forwards, plain, rounds in [(10, 6, 4), (5, 0, 5)]:
        auto.record([bench.Output([[1] * 12], 11, forwards, plain, rounds)], 1.0)
    row = bench.summarize([auto])[0]
    assert row["tau"] == pytest.approx(22 / 15) and row["tau_all_repeats"] == pytest.approx([1.1, 2.2])
    assert (row["decode_tokens"], row["decode_forwards_per_row_summed"]) == (22, 15)
    assert row["plain_step_share"] == pytest.approx(6 / 15)
    assert row["plain_steps_all_repeats"] == [6, 0] and row["speculative_rounds_all_repeats"] == [4, 5]


def test_hugging_face_methods_do_not_apply_the_checkpoints_generation_settings(tiny_target, tmp_path):
    """A checkpoint's generation_config.json may set a repetition penalty (Qwen2.5-Instruct: 1.05),
    min_p, ...: generate() applied them to the Hugging Face methods alone, whose greedy tokens then
    differed from vanilla's (a "MISMATCH" blamed on them) and whose sampled runs drew from another
    distribution. They are left out, said and recorded."""
    import shutil

    target = shutil.copytree(tiny_target, tmp_path / "target")
    own = {"repetition_penalty": 3.0, "no_repeat_ngram_size": 1, "min_p": 0.5, "top_k": 3}
    (target / "generation_config.json").write_text(json.dumps(own))
    messages = []
    config = _config(
        target,
        tmp_path,
        methods=("vanilla", "hf_generate"),
        batch_sizes=(1,),
        temperatures=(0.0,),
        repeats=1,
        plot=False,
        prompts=("def f(x):\n    return x",),
        new_tokens=24,  # (the first 6 tokens of this prompt come out the same with the penalty)
    )
    with pytest.warns(UserWarning, match="this runtime does not apply them"):  # (eagle.load's own warning)
        report = run_benchmark(config, log=messages.append)
    assert report.greedy_agreement_ok, report.payload["results"]
    assert report.payload["settings"]["hf_dropped_generation_settings"] == {"target": own}
    assert any("settings" in m and "repetition_penalty" in m and "not applied" in m for m in messages)


def test_the_table_and_plot_warn_when_the_extension_did_not_run():
    payload = {"machine": {"kernels": {"extension_loaded": False, "extension_status": "not built"}}}
    assert "C++/CUDA extension did not run (not built)" in bench.extension_warning(payload)
    assert bench.extension_warning({"machine": {"kernels": {"extension_loaded": True}}}) is None


def test_repeats_alternate_the_order_of_the_methods(monkeypatch):
    order = []

    def fake_run(config, models, batches, cell, new_tokens):
        order.append(cell.method)
        return [bench.Output([[1] * new_tokens], new_tokens, new_tokens)], 1.0

    monkeypatch.setattr(bench, "_run_cell", fake_run)
    monkeypatch.setattr(bench, "check_lengths", lambda *a: None)
    methods = ("vanilla", "eagle_chain", "eagle_dynamic")
    config = BenchConfig(methods=methods, batch_sizes=(1,), temperatures=(0.0,), repeats=3, progress=False)
    cells = bench.run_cells(config, None, [bench.Prompt("p", [1, 2, 3])], lambda _: None)
    warm_up, timed = order[:3], order[3:]
    assert warm_up == list(methods)
    assert timed == [*methods, *methods[::-1], *methods]
    assert all(len(c.seconds) == 3 for c in cells)


def test_a_timed_run_on_a_tree_new_to_its_cell_is_timed_again(monkeypatch):
    """tree="dynamic" may choose another tree after a refit; that tree's first run builds its decoder,
    graph and kernels inside the timed run, so the run is recorded as cold and timed again."""
    trees = iter(["A", "A", "B", "B", "B", "C", "D", "E"])  # warm-up, then the timed runs
    seconds = iter([9.0, 1.0, 5.0, 1.1, 1.2, 6.0, 7.0, 8.0])

    def fake_run(config, models, batches, cell, new_tokens):
        return [bench.Output([[1] * new_tokens], new_tokens, new_tokens, tree=next(trees))], next(seconds)

    monkeypatch.setattr(bench, "_run_cell", fake_run)
    monkeypatch.setattr(bench, "check_lengths", lambda *a: None)
    monkeypatch.setattr(bench, "MAX_COLD_RETRIES", 2)
    logged = []
    config = BenchConfig(
        methods=("eagle_dynamic",), batch_sizes=(1,), temperatures=(0.0,), repeats=4, progress=False
    )
    (cell,) = bench.run_cells(config, None, [bench.Prompt("p", [1, 2, 3])], logged.append)
    # repeat 0: A (warm); repeat 1: B cold (5.0 s), then warm (1.1); repeat 2: B (1.2); repeat 3: a new
    # tree three times in a row (C, D, E): after MAX_COLD_RETRIES re-timings the last run stands
    assert cell.seconds == [1.0, 1.1, 1.2, 8.0]
    assert cell.cold_runs == [
        (1, "B", 5.0, True),
        (3, "C", 6.0, True),
        (3, "D", 7.0, True),
        (3, "E", 8.0, False),
    ]
    assert sum("re-timing it" in line for line in logged) == 3
    assert sum("kept: a new tree in each of 3 runs in a row" in line for line in logged) == 1
    row = bench.summarize([cell])[0]
    assert row["cold_runs"][0] == {"repeat": 1, "tree": "B", "seconds": 5.0, "retimed": True}
    assert row["tree"] == "A / B / E"  # the trees of the runs in the figures
    assert "3 run(s) on a new tree re-timed, 1 kept (cold)" in bench.format_table([row])


def test_with_cuda_graphs_every_batch_and_temperature_keeps_its_buffers(monkeypatch):
    class FakeEagle:
        kept_batch_states = 4

    models = type("Models", (), {"eagle": FakeEagle()})()
    monkeypatch.setattr(bench, "_run_cell", lambda *a: ([bench.Output([[1]], 1, 1)], 1.0))
    monkeypatch.setattr(bench, "check_lengths", lambda *a: None)
    config = BenchConfig(
        methods=("vanilla",), batch_sizes=(1, 4, 16), temperatures=(0.0, 1.0), repeats=1, progress=False
    )
    bench.run_cells(config, models, [bench.Prompt("p", [1, 2, 3])] * 16, lambda _: None)
    assert models.eagle.kept_batch_states == 4  # without CUDA graphs the setting is left alone
    config = replace(config, cuda_graph=True)
    bench.run_cells(config, models, [bench.Prompt("p", [1, 2, 3])] * 16, lambda _: None)
    assert models.eagle.kept_batch_states == 6  # vanilla only: its 6 (batch, temperature) states
    config = replace(config, methods=("vanilla", "eagle_chain", "eagle_dynamic"))
    bench.run_cells(config, models, [bench.Prompt("p", [1, 2, 3])] * 16, lambda _: None)
    assert models.eagle.kept_batch_states == 6 * 3  # 2 trees and a refit's, in one shared pool


def test_tree_labels_tell_every_tree_apart():
    import eagle_kernels
    from eagle.tree import TreeConfig

    labels = [
        bench.tree_label(TreeConfig.chain(5)),
        bench.tree_label(TreeConfig(3, 2, 6)),
        bench.tree_label(eagle_kernels.build_static_tree(eagle_kernels.MC_SIM_7B_63)),
        bench.tree_label(eagle_kernels.build_static_tree(eagle_kernels.MC_SIM_7B_63, topk=10)),
        bench.tree_label(eagle_kernels.build_static_tree([(0,), (1,), (0, 0)])),
        bench.tree_label(eagle_kernels.build_static_tree([(0,), (1,), (1, 0)])),  # same size, other paths
    ]
    assert labels[0] == "chain(depth=5)" and labels[2] == "static(26 tokens)"
    assert len(set(labels)) == len(labels), labels


def test_first_forward_tokens_come_from_the_second_forwards_start():
    # prompt of 10; the first forward verified candidates and accepted one (+ its bonus token): the
    # second starts at position 11 (prompt + the accepted draft; the bonus token is its input)
    assert bench._first_forward_tokens([0, 11, 14], 10) == 2
    assert bench._first_forward_tokens([0, 10, 11], 10) == 1
    with pytest.raises(RuntimeError, match="passes neither cache_position nor position_ids"):
        bench._first_forward_tokens([None, None], 10)


def test_prompt_lookup_tau_does_not_count_the_first_forwards_drafts_as_one_token():
    """transformers' prompt-lookup decoding verifies its first candidates in the prefill forward, which
    can emit several tokens; tau counted that forward as emitting one (and so overstated itself)."""
    from transformers import AutoModelForCausalLM

    import eagle
    from eagle.api import _resolve_bundled

    path = _resolve_bundled("tiny-code", "target")
    model = eagle.load("tiny-code")
    models = bench.Models(model, path, "bundled", random_draft=False)
    models.hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bench._count_forwards(models.hf, models.forwards, "target", models.target_starts)
    text = "import os\nimport sys\nimport os\nimport sys\nimport os\nimport"
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    new = 16
    out = bench._hf_generate(models, [ids], new, 0.0, 0, {"prompt_lookup_num_tokens": 5})
    assert len(models.target_starts) == 2 and all(isinstance(t, torch.Tensor) for t in models.target_starts)
    first = bench._first_forward_tokens([int(t) for t in models.target_starts], len(ids))
    assert first > 1, models.target_starts  # the case arises: the prefill forward accepted drafts
    assert out.decode_tokens == new - first and out.decode_forwards == models.forwards["target"] - 1
    assert out.tokens[0] == model.generate([ids], new, speculative=False, eos_token_id=[]).tokens[0]


def test_no_save_writes_nothing_and_a_replaced_result_is_announced(tiny_target, tmp_path):
    small = dict(
        methods=("vanilla", "eagle_chain"), batch_sizes=(1,), temperatures=(0.0,), repeats=1, plot=False
    )
    config = _config(tiny_target, tmp_path, save=False, **small)
    report = run_benchmark(config, log=lambda _: None)
    assert report.json_path is None and not (tmp_path / "out").exists()
    assert report.payload["results"]
    logs: list[str] = []
    first = run_benchmark(replace(config, save=True), log=logs.append).json_path
    assert first.exists() and not any("replacing" in line for line in logs)
    run_benchmark(replace(config, save=True), log=logs.append)
    assert any(f"replacing {first}" in line for line in logs)
    assert not list(first.parent.glob("*.partial"))


def test_an_installed_package_writes_results_to_the_working_directory(tmp_path, monkeypatch):
    """Installed from a wheel, REPO_ROOT is site-packages: results go to ./bench-results, not there."""
    assert bench.default_out_dir() == bench.DEFAULT_OUT  # this checkout
    monkeypatch.setattr(bench, "REPO_ROOT", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    assert bench.default_out_dir() == tmp_path / "bench-results"


def test_without_matplotlib_the_json_is_kept_and_the_plot_skipped(tiny_target, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    small = dict(methods=("vanilla",), batch_sizes=(1,), temperatures=(0.0,), repeats=1)
    logs: list[str] = []
    report = run_benchmark(_config(tiny_target, tmp_path, **small), log=logs.append)
    assert report.json_path.exists() and report.png_path is None
    assert any("no plot: matplotlib is not installed" in line for line in logs)


def test_eagle_rows_carry_their_speedup_over_the_fastest_hugging_face_method():
    """DESIGN §7: the speedup over the peer a user would pick instead, in the same run (readers had to
    divide by hand); the derived, untrained assistant is marked in the table."""
    cells = {
        m: bench.Cell(m, 1, 0.0) for m in ("vanilla", "hf_generate", "hf_prompt_lookup", "eagle_dynamic")
    }
    seconds = {"vanilla": 1.0, "hf_generate": 4.0, "hf_prompt_lookup": 2.0, "eagle_dynamic": 0.5}
    for m, cell in cells.items():
        cell.record([bench.Output([[1, 2]], 2, 2)], seconds[m])
    rows = {r["method"]: r for r in bench.summarize(list(cells.values()))}
    assert rows["eagle_dynamic"]["best_hf_method"] == "hf_prompt_lookup"
    assert rows["eagle_dynamic"]["speedup_vs_best_hf"] == pytest.approx(4.0)
    assert rows["vanilla"]["speedup_vs_best_hf"] == pytest.approx(2.0)
    assert "speedup_vs_best_hf" not in rows["hf_generate"]
    table = bench.format_table(list(rows.values()))
    assert "vs best HF" in table and "4.00x" in next(
        line for line in table.splitlines() if "eagle_dynamic" in line
    )
    assistant = bench.Cell("hf_assisted", 1, 0.0)
    assistant.record([bench.Output([[1, 2]], 2, 2)], 3.0)
    marked = bench.format_table(
        bench.summarize([cells["vanilla"], assistant]), {"how": "derived: x, untrained"}
    )
    assert "hf_assisted*" in marked and "its assistant is derived: x, untrained" in marked


def test_a_run_with_nothing_to_run_or_no_vanilla_says_so():
    with pytest.raises(ValueError, match="every method x batch size is skipped"):
        bench.BenchConfig(methods=("hf_assisted", "hf_prompt_lookup"), batch_sizes=(4,)).validate()
    eagle_only = bench.Cell("eagle_chain", 1, 0.0)
    eagle_only.record([bench.Output([[1, 2]], 2, 2)], 1.0)
    assert "NOT CHECKED (no vanilla run)" in bench.format_table(bench.summarize([eagle_only]))


def test_eagle_gets_no_near_tie_allowance_where_it_is_bit_exact(tiny_target, monkeypatch):
    """On a CPU with every linear packed, a verified tree gives plain decoding's logits bit for bit
    (test_block_invariance.py), so an EAGLE flip there is a bug, however close the pair; transformers'
    rows keep the allowance (another implementation may round a tie the other way)."""
    models, prompt, want, logits = _greedy_run_and_its_third_logits(tiny_target)
    runner_up = int(logits.topk(2).indices[1])
    flipped = want[:2] + [runner_up]
    got = flipped + [_greedy_after(models, prompt, flipped)]
    monkeypatch.setattr(bench, "_ulp", lambda dtype, magnitude: float(logits[want[2]] - logits[runner_up]))
    monkeypatch.setattr(bench, "eagle_is_bit_exact", lambda target: True)
    cells = [bench.Cell(m, 1, 0.0) for m in ("vanilla", "eagle_chain", "hf_generate")]
    for cell, tokens in zip(cells, (want, got, got)):
        cell.record([bench.Output([tokens], 3, 3)], 1.0)
    bench.check_greedy_agreement(cells, models, [prompt])
    rows = {r["method"]: r["greedy_agreement"] for r in bench.summarize(cells)}
    assert (
        not rows["eagle_chain"]["ok"]
        and "bit-exact" in rows["eagle_chain"]["mismatches"][0]["why_not_forgiven"]
    )
    assert rows["hf_generate"]["ok"] and rows["hf_generate"]["near_tie_rows"] == 1


def test_the_bundled_pair_is_bit_exact_on_a_cpu_with_packed_linears():
    import eagle
    from eagle.models.cpu_packed import packing_supported

    for dtype in (torch.float32, torch.bfloat16):
        target = eagle.load("tiny-code", dtype=dtype).target
        from eagle_kernels import _ext

        assert bench.eagle_is_bit_exact(target) == (
            packing_supported(dtype) and _ext.has_op("tree_attention")
        )
    assert not bench.eagle_is_bit_exact(eagle.load("tiny-code", dtype=torch.float64).target)


def test_the_bundled_target_given_as_a_path_is_the_bundled_pair(monkeypatch):
    """`--target eagle/assets/tiny-code/target` ran EAGLE with a random head (no --draft), an
    untrained assistant and another file name: a path to the bundled target is the bundled pair."""
    from eagle.api import ASSETS, BUNDLED

    seen = []

    def stop(config, dtype, log):
        seen.append(config.target)
        raise RuntimeError("stop here")

    monkeypatch.setattr(bench, "load_models", stop)
    path = str(ASSETS / BUNDLED / "target")
    for target in (
        path,
        path + "/",
        str(Path(path).relative_to(Path.cwd())) if Path(path).is_relative_to(Path.cwd()) else path,
    ):
        with pytest.raises(RuntimeError, match="stop here"):
            run_benchmark(
                BenchConfig(target=target, methods=("vanilla",), batch_sizes=(1,)), log=lambda m: None
            )
    assert seen == [BUNDLED] * 3
    assert not bench._is_bundled_target(str(ASSETS / BUNDLED / "draft"))
