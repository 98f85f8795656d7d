from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from eagle.cli import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kernels"]["extension_loaded"] in (True, False)
    assert "compact_kv_cache" in info["kernels"]["cpu_backend"]
    assert set(info["cpu_packed_weights"]) == {"float32", "bfloat16", "float16"}
    assert info["cpu_draft_loop"].startswith("C++") == info["kernels"]["extension_loaded"]
    assert (info["kernels"]["cuda_backend"] is None) == (not info["cuda_available"])


def test_info_says_which_build_is_installed(capsys, monkeypatch):
    """A binary wheel's local label (``+cu128torch2.13``) says what it was built for; __version__ does not
    carry it. From a source tree on sys.path, not installed: said so."""
    from importlib import metadata

    import eagle_kernels

    assert main(["info"]) == 0
    shown = eagle_kernels._installed_version() or "not installed (run from the source tree)"
    assert f"installed: {shown}" in capsys.readouterr().out

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    assert eagle_kernels.backend_info()["distribution"] is None
    assert main(["info"]) == 0
    assert "installed: not installed (run from the source tree)" in capsys.readouterr().out


def test_an_installed_copy_that_is_not_the_running_one_is_not_reported(tmp_path, monkeypatch):
    """A checkout on sys.path in front of an installed wheel runs the checkout's code: the wheel's label
    would name a build that is not running. An editable install (whose metadata locates no file of its
    own) is the running code."""
    from importlib import metadata

    import eagle_kernels

    other = tmp_path / "site-packages" / "eagle_kernels" / "__init__.py"
    other.parent.mkdir(parents=True)
    other.write_text("")

    class Dist:
        version = "0.1.0+cu128torch2.13"

        def __init__(self, root):
            self.root = root

        def locate_file(self, name):
            return self.root / name

    monkeypatch.setattr(metadata, "distribution", lambda name: Dist(tmp_path / "site-packages"))
    assert eagle_kernels._installed_version() is None
    monkeypatch.setattr(metadata, "distribution", lambda name: Dist(tmp_path / "editable"))
    assert eagle_kernels._installed_version() == "0.1.0+cu128torch2.13"
    here = Path(eagle_kernels.__file__).parents[1]  # the running copy's own metadata
    monkeypatch.setattr(metadata, "distribution", lambda name: Dist(here))
    assert eagle_kernels._installed_version() == "0.1.0+cu128torch2.13"


@pytest.mark.extension
def test_info_text_names_the_draft_loop(capsys, monkeypatch):
    from eagle.models import draft

    assert main(["info"]) == 0
    assert "CPU draft loop: C++, one call per round" in capsys.readouterr().out
    monkeypatch.setattr(draft, "_CPU_DRAFT_LOOP", False)
    assert main(["info"]) == 0
    assert "CPU draft loop: Python (the C++ loop is switched off" in capsys.readouterr().out


def test_info_text_names_the_attention_variant(capsys, monkeypatch):
    from eagle_kernels import _ext

    if not _ext.STATUS.loaded:
        assert main(["info"]) == 0
        assert "CPU attention: PyTorch (no compiled extension)" in capsys.readouterr().out
        return
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", "generic")
    assert main(["info"]) == 0
    assert "CPU attention: C++ tree_attention, variant generic: x86-64 baseline" in capsys.readouterr().out
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", "sse9")
    assert main(["info"]) == 0
    assert "CPU attention: unavailable: EAGLE_KERNELS_CPU_ISA must be amx, avx512" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().out


def _tiny_pair_with_tokenizer(root):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from eagle.models import load_target, random_draft, save_draft
    from tests.eagle.conftest import build_hf_target, save_hf_target

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["def f(x):\n    return x + 1\n"] * 20,
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    hf = build_hf_target("llama", seed=0, vocab_size=tok.get_vocab_size())
    target_dir = save_hf_target(hf, root / "target")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(target_dir)
    head = random_draft(load_target(str(target_dir), dtype=torch.float32))
    save_draft(head, root / "draft")
    return target_dir, root / "draft"


def test_generate_cli_streams_text_and_reports_tau(tmp_path, capsys):
    target_dir, draft_dir = _tiny_pair_with_tokenizer(tmp_path)
    args = ["generate", "def f(x):", "--target", str(target_dir), "--draft", str(draft_dir), "-n", "12"]
    assert main(args + ["--tree", "static"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def f(x):")
    assert "tokens/s" in out.err and "tau" in out.err
    assert main(args + ["--no-speculative", "-q"]) == 0
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err.startswith("[") and "tokens/s" in quiet.err  # no blank lines
    assert main([*args[:-1], "1"]) == 0  # only the prefill's token: no forward after it to average
    assert "tau n/a tokens per target forward" in capsys.readouterr().err
    no_head = ["generate", "def f(x):", "--target", str(target_dir), "-n", "4"]
    assert main(no_head) == 2
    assert "comes with no draft head: pass one with --draft DIR, or decode plainly with --no-speculative" in (
        capsys.readouterr().err
    )
    assert main([*no_head, "--no-speculative", "-q"]) == 0


def test_generate_cli_chat_sends_the_prompt_as_a_user_message(tmp_path, capsys):
    """--chat: the prompt goes through the tokenizer's chat template as one user message (the API's
    conversation prompt); without a template the command says so."""
    from transformers import PreTrainedTokenizerFast

    import eagle

    target_dir, draft_dir = _tiny_pair_with_tokenizer(tmp_path)
    args = ["generate", "def f(x):", "--target", str(target_dir), "--draft", str(draft_dir), "-n", "10"]
    assert main([*args, "--chat"]) == 2
    assert "has no chat template" in capsys.readouterr().err
    tokenizer = PreTrainedTokenizerFast.from_pretrained(target_dir)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}<bot>"
    tokenizer.save_pretrained(target_dir)
    assert main([*args, "--chat"]) == 0
    out = capsys.readouterr().out
    model = eagle.load(str(target_dir), str(draft_dir))
    reply = model.generate([[{"role": "user", "content": "def f(x):"}]], 10).texts[0]
    assert out.startswith("def f(x):") and reply in out[len("def f(x):") :]
    assert main(args) == 0 and capsys.readouterr().out != out  # (the template changed the reply)


def test_generate_cli_auto_prints_the_same_greedy_text(tmp_path, capsys):
    import pytest

    target_dir, draft_dir = _tiny_pair_with_tokenizer(tmp_path)
    args = ["generate", "def f(x):", "--target", str(target_dir), "--draft", str(draft_dir), "-n", "40"]
    assert main(args) == 0
    speculative = capsys.readouterr().out
    assert main(args + ["--auto"]) == 0
    captured = capsys.readouterr()
    assert captured.out == speculative
    assert "auto:" in captured.err and "plain steps" in captured.err and "speculative rounds" in captured.err
    with pytest.raises(SystemExit) as exc:  # one mode or the other
        main(args + ["--auto", "--no-speculative"])
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_train_passes_arguments_to_the_stage(capsys):
    import pytest

    for stage in ("target", "features", "head"):
        with pytest.raises(SystemExit) as exc:
            main(["train", stage, "--help"])
        assert exc.value.code == 0
        assert "usage" in capsys.readouterr().out.lower()


def test_generate_on_the_bundled_pair_prints_code_and_tau(capsys):
    assert main(["generate", "def fibonacci(n):", "-n", "24"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def fibonacci(n):") and len(captured.out) > len("def fibonacci(n):")
    assert "tau" in captured.err and "tokens/s" in captured.err


def test_generate_with_a_bfloat16_head_prints_the_float32_continuation(capsys):
    args = ["generate", "def fibonacci(n):", "-n", "16", "--dtype", "fp32"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--draft-dtype", "bf16"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "tau" in captured.err


def test_bad_input_is_one_clear_line_not_a_traceback(capsys):
    assert main(["generate", "x = 1", "-n", "4", "--cuda-graph", "-q"]) == 2
    err = capsys.readouterr().err
    assert "eagle generate: error: cuda_graph=True needs a CUDA target" in err
    assert "Traceback" not in err
    assert main(["generate", "x = 1", "--target", "/nonexistent/checkpoint", "-q"]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err


def test_a_prompt_that_is_not_utf8_is_named(capsys):
    """Bytes that are not UTF-8 reach Python as lone surrogates (argv, and stdin here): the tokenizer
    refused them with "TextEncodeInput must be Union[...]", naming neither the prompt nor the cause."""
    assert main(["generate", "def f(x):\udcff", "-n", "4", "-q"]) == 2
    err = capsys.readouterr().err
    assert "eagle generate: error: prompt 0 is not valid UTF-8 text: byte ff (0xff) at character 9" in err
    import eagle

    with pytest.raises(ValueError, match="prompt 1 is not valid UTF-8 text"):
        eagle.load("tiny-code").generate(["x = 1", "y = \udcff"], 4)


def test_a_closed_output_pipe_ends_quietly(monkeypatch):
    """`eagle generate ... | head` ended in a BrokenPipeError traceback once head exited: now the exit
    status a shell gives a process that SIGPIPE ended, and nothing on stderr."""
    import io
    import os
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone: every write fails with EPIPE
    pipe = os.fdopen(write_end, "w")
    err = io.StringIO()
    monkeypatch.setattr(sys, "stdout", pipe)
    monkeypatch.setattr(sys, "stderr", err)
    try:
        assert main(["generate", "def fibonacci(n):", "-n", "8"]) == 141
    finally:
        pipe.close()
    assert "Traceback" not in err.getvalue() and "Broken pipe" not in err.getvalue()


def test_streamed_text_leaves_out_special_tokens_as_the_api_texts_do():
    """The CLI printed an EOS's text (``<|endoftext|>``) where ``EagleModel.generate``'s texts have none."""
    from eagle.api import _load_tokenizer, _resolve_bundled
    from eagle.cli import _Continuation

    tok = _load_tokenizer(_resolve_bundled("tiny-code", "target"))
    prompt = tok("def f(x):", verbose=False)["input_ids"]
    new = tok.encode("\n    return x", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode([tok.eos_token_id])  # the EOS has a text to leave out
    assert (
        _Continuation(tok, prompt).text(new) == tok.decode(new, skip_special_tokens=True) == "\n    return x"
    )


def test_a_forced_cpu_kernel_this_cpu_cannot_run_is_one_clear_line(capsys, monkeypatch):
    import pytest

    from eagle_kernels import _ext

    if not _ext.STATUS.loaded:
        pytest.skip("EAGLE_KERNELS_CPU_ISA selects among the compiled extension's CPU kernels")
    monkeypatch.setenv("EAGLE_KERNELS_CPU_ISA", "bogus")
    assert main(["generate", "x = 1", "-n", "4", "-q"]) == 2
    err = capsys.readouterr().err
    assert "eagle generate: error: EAGLE_KERNELS_CPU_ISA must be amx" in err and "Traceback" not in err


def test_streamed_text_keeps_multibyte_characters_whole(capsys):
    """Byte-level tokens can end inside a UTF-8 character: the streamed text must still be the
    full decode, never a replacement character left behind by a partial decode."""
    from eagle.api import _load_tokenizer, _resolve_bundled
    from eagle.cli import _print_new_text

    tok = _load_tokenizer(_resolve_bundled("tiny-code", "target"))
    text = "x = '日本語 café'\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))  # the case arises
    shown = ""
    for i in range(1, len(ids) + 1):
        shown = _print_new_text(tok.decode(ids[:i]), shown, False, final=False)
    _print_new_text(tok.decode(ids), shown, False, final=True)
    assert capsys.readouterr().out == tok.decode(ids) == text


def test_info_text_names_the_float32_linear_kernel(capsys, monkeypatch):
    from eagle.models import cpu_packed

    assert main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "CPU fp32 linear" in ln)
    assert ("panel_linear.cpp" in line) == cpu_packed.panel_linear_available()
    monkeypatch.setenv("EAGLE_CPU_PANEL_LINEAR", "0")
    assert main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "CPU fp32 linear" in ln)
    assert "panel_linear.cpp" not in line


def test_tree_flags_are_checked_and_combined_with_tree(capsys, monkeypatch):
    """--tree-* set a dynamic tree: 0 is refused (not read as "not given"), a conflicting --tree or
    --no-speculative is refused by name, and the tokens default to what depth and topk can hold."""
    import pytest

    import eagle

    seen = []
    real = eagle.EagleModel.stream

    def spy(self, prompt, max_new_tokens=128, **kwargs):
        seen.append(kwargs.get("tree"))
        return real(self, prompt, max_new_tokens, **kwargs)

    monkeypatch.setattr(eagle.EagleModel, "stream", spy)
    base = ["generate", "x = 1", "-n", "4", "-q"]
    assert main([*base, "--tree-topk", "2"]) == 0
    assert seen[-1] == eagle.TreeConfig(6, 2, 23)  # 1 + 2 + 5 * 4 slots: the most depth 6, topk 2 hold
    assert main([*base, "--tree-depth", "3", "--tree-topk", "1"]) == 0
    assert seen[-1] == eagle.TreeConfig.chain(3)
    assert main([*base, "--tree-depth", "3", "--tree-topk", "4", "--tree-tokens", "12"]) == 0
    assert seen[-1] == eagle.TreeConfig(3, 4, 12)
    capsys.readouterr()
    for flags, message in (
        (
            ["--tree", "chain", "--tree-depth", "3"],
            "--tree-depth sets a dynamic tree's shape, not --tree chain's",
        ),
        (["--no-speculative", "--tree-topk", "4"], "--tree-topk sets a draft tree, and --no-speculative"),
        (["--no-speculative", "--tree", "chain"], "--tree chain sets a draft tree, and --no-speculative"),
    ):
        assert main([*base, *flags]) == 2
        assert message in capsys.readouterr().err
    for flag in ("--tree-depth", "--tree-topk", "--tree-tokens", "--threads", "-n"):
        with pytest.raises(SystemExit) as exc:
            main([*base, flag, "0"])
        assert exc.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--num-prompts", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_the_continuation_keeps_the_space_a_sentencepiece_decoder_drops_from_a_first_token():
    """Decoded alone, a SentencePiece-style continuation loses its leading space and sticks to the
    prompt; decoded after the prompt's ids it keeps it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from eagle.cli import _Continuation

    vocab = {"<unk>": 0, "▁w5": 1, "▁w6": 2, "▁w3": 3, "▁w8": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    ids = fast("w5 w6")["input_ids"]
    assert fast.decode(ids) == "w5 w6" and fast.decode([3, 4]) == "w3 w8"  # the space is lost alone
    assert _Continuation(fast, ids).text([3, 4]) == " w3 w8"
    assert _Continuation(fast, ids).text([]) == ""


def test_tokens_per_second_leave_out_the_tree_sizing(capsys, monkeypatch):
    """stream() sizes tree="dynamic" when it is called (timed forwards): set-up, reported apart, not
    decoding time."""
    import re
    import time

    import eagle

    real = eagle.EagleModel.stream

    def slow_setup(self, *args, **kwargs):
        time.sleep(0.5)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(eagle.EagleModel, "stream", slow_setup)
    assert main(["generate", "x = 1", "-n", "8", "-q"]) == 0
    err = capsys.readouterr().err
    seconds = float(re.search(r"tokens in ([\d.]+) s", err).group(1))
    setup = float(re.search(r"; ([\d.]+) s of set-up \(the draft tree's sizing\) not counted", err).group(1))
    assert setup >= 0.5 and seconds < 0.5, err


def test_auto_reports_its_choices_when_sampling_too(capsys):
    with pytest.warns(UserWarning, match="a seeded sampled call does not repeat"):
        assert main(["generate", "x = 1", "-n", "24", "-q", "--auto", "-t", "1", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "auto:" in err and "plain steps" in err and "speculative rounds" in err, err


def test_auto_tau_counts_plain_steps_streamed_in_chunks(capsys, monkeypatch):
    """tau is tokens per target forward: stream(speculative="auto") sends plain steps in chunks of
    ~50 ms, so a chunk is not a forward (taken as one, an all-plain run reported tau ~20)."""
    from eagle import speculate
    from eagle.adaptive import PLAIN, AutoSpeculation

    class AlwaysPlain(AutoSpeculation):
        def next_mode(self) -> str:
            return PLAIN

        def plain_forwards_ahead(self) -> int:
            return 1 << 30

    monkeypatch.setattr(speculate, "AutoSpeculation", AlwaysPlain)  # the policy a run makes
    assert main(["generate", "x = 1", "-n", "48", "-q", "--auto", "--tree", "chain"]) == 0
    err = capsys.readouterr().err
    assert "tau 1.00 tokens per target forward; auto: 47 plain steps, 0 speculative rounds" in err, err


def test_warnings_print_as_one_line_naming_the_command():
    """A warning (here: a seeded sampled --auto run does not repeat) printed Python's default format,
    naming eagle/cli.py and echoing its source line; the CLI prints it as a note, like its errors."""
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "eagle",
            "generate",
            "x = 1",
            "-n",
            "4",
            "-q",
            "--auto",
            "-t",
            "1",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "EAGLE_DEBUG"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "speculative='auto' chooses" in line]
    assert len(lines) == 1 and lines[0].startswith("eagle generate: UserWarning: speculative='auto'"), (
        proc.stderr
    )
    assert "cli.py" not in proc.stderr


def test_generate_reads_the_prompt_from_stdin_and_refuses_an_empty_one(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("x = 1\n"))
    assert main(["generate", "-n", "4"]) == 0
    assert capsys.readouterr().out.startswith("x = 1\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["generate", "-n", "4", "-q"]) == 2
    assert "eagle generate: empty prompt (give it as an argument or on stdin)" in capsys.readouterr().err


def test_targets_without_a_tokenizer_and_heads_missing_are_refused_by_name(
    tiny_checkpoints, capsys, tmp_path
):
    target = str(tiny_checkpoints.target)  # random weights, no tokenizer files
    assert main(["generate", "x = 1", "--target", target, "-n", "2", "-q"]) == 2
    assert (
        f"eagle generate: {target} has no tokenizer; use the Python API with token ids"
        in capsys.readouterr().err
    )
    assert main(["calibrate", "--target", target, "--new-tokens", "4"]) == 2
    assert "eagle calibrate needs a draft head (--draft)" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "x = 1"}) + "\n")
    head = ["--draft", str(tiny_checkpoints.eagle2), "--new-tokens", "4"]
    assert main(["calibrate", "--target", target, *head, "--prompts", str(prompts)]) == 2
    assert "--prompts holds text, and this target has no tokenizer" in capsys.readouterr().err
    assert main(["calibrate", "--target", target, *head]) == 2
    assert "this target has no tokenizer: pass --prompts" in capsys.readouterr().err


def test_a_bad_sampling_argument_is_reported_before_the_prompt_is_echoed(capsys):
    assert main(["generate", "import os", "--min-p", "1.5", "-n", "4"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("eagle generate: error: min_p must be in [0, 1]")


def test_eagle_debug_shows_the_traceback(monkeypatch):
    import pytest

    monkeypatch.setenv("EAGLE_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        main(["generate", "x = 1", "--target", "/nonexistent/checkpoint", "-q"])


def test_the_parser_and_import_eagle_load_neither_torch_nor_transformers():
    """eagle --help took 2 s: eagle/__init__ imported eagle.api, and the bench options eagle.bench."""
    import subprocess
    import sys

    from eagle import _bench_args, api

    code = (
        "import sys, eagle; from eagle.cli import build_parser; build_parser(); "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy; eagle.TreeConfig; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert _bench_args.BUNDLED == api.BUNDLED
