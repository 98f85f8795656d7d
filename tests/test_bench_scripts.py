"""The analysis scripts of bench/ that are not pytest-benchmark modules run and report sane figures."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EAGLE_CPU_")}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=240, env=env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_count_ops_counts_a_round_by_phase():
    """The GPU code path's op counts: a chain round's verify is one target forward over the tree (as
    many ops as a plain step, give or take the sampling), drafting launches ops too, and every phase
    is reported."""
    out = _run("count_ops.py", "--trees", "chain", "--new-tokens", "8", "--top", "3")
    step = float(re.search(r"plain step: ([\d.]+) ops", out).group(1))
    phases = dict((m.group(1), float(m.group(2))) for m in re.finditer(r"^  (\w+)\s+([\d.]+) ops", out, re.M))
    assert set(phases) == {"draft", "verify", "accept", "compact", "draft_update"}, out
    assert step > 12 and 0.8 * step <= phases["verify"] <= 1.2 * step, out
    assert phases["draft"] > 12 and all(v > 0 for v in phases.values()), out
    total = float(re.search(r"([\d.]+) ops per round", out).group(1))
    assert abs(total - sum(phases.values())) < 0.5, out


def test_profile_round_reports_rounds_and_steps():
    out = _run("profile_round.py", "--tree", "chain", "--new-tokens", "16", "--top", "3")
    assert re.search(r"EAGLE chain: \d+ rounds; per round: wall [\d.]+ ms", out), out
    assert re.search(r"plain: 15 steps; per step: wall [\d.]+ ms", out), out
    assert "round / plain step: wall" in out, out


def test_bench_draft_dtype_reproduces_plain_decoding_with_a_bfloat16_head():
    out = _run(
        "bench_draft_dtype.py", "--new-tokens", "8", "--repeats", "1", "--num-prompts", "2",
        "--batch", "1", "2", "--trees", "chain", "--no-save",
    )  # fmt: skip
    assert "every speculative run reproduced plain decoding's tokens" in out, out
    assert re.search(r"EAGLE chain +bfloat16 +head: +\d+ tok/s", out), out
    assert re.search(r"B 2: plain decoding \d+ tok/s", out), out


def test_bench_adaptive_times_auto_plain_steps_with_plain_decodings_tokens():
    out = _run(
        "bench_adaptive.py", "--new-tokens", "8", "--repeats", "1", "--num-prompts", "2",
        "--batch", "1", "2", "--temperature", "0", "1", "--no-save",
    )  # fmt: skip
    assert "every cell gave plain decoding's tokens" in out, out
    for b, t in ((1, 0), (1, 1), (2, 0), (2, 1)):
        assert re.search(
            rf"B {b}, T {t}: vanilla \d+ tok/s; auto_step \d+ \([\d.]+x\); auto_stream \d+ \([\d.]+x\); "
            rf"auto_chunk \d+ \([\d.]+x\)",
            out,
        ), out


def test_sweep_linear_cuda_dry_run_lists_the_tiny_code_shapes():
    out = _run("sweep_linear_cuda.py", "--dry-run")
    assert "1536x256: rows [1, 8, 16, 32, 48, 60, 64, 128]" in out, out
    assert "'mm(x, W^T contiguous)'" in out and "'cublaslt'" in out, out


def test_bench_verify_update_compares_both_paths_with_the_same_tokens():
    out = _run(
        "bench_verify_update.py", "--new-tokens", "8", "--repeats", "1", "--num-prompts", "2",
        "--trees", "dynamic", "chain", "--no-save",
    )  # fmt: skip
    assert "every speculative run reproduced plain decoding's tokens" in out, out
    assert re.search(r"dynamic: one C\+\+ call is [\d.]+x the Python path", out), out
    assert re.search(r"EAGLE chain +Python +: +\d+ tok/s", out), out


def test_bench_verify_update_compares_the_sampled_paths_and_rngs():
    out = _run(
        "bench_verify_update.py", "--new-tokens", "8", "--repeats", "1", "--num-prompts", "2",
        "--temperature", "1", "--no-save",
    )  # fmt: skip
    assert "both paths sampled the same tokens" in out, out
    assert re.search(r"the C\+\+ RNG is [\d.]+x it", out), out
    assert re.search(r"dynamic: one C\+\+ call is [\d.]+x the Python path", out), out


@pytest.mark.parametrize(
    "switch",
    ["amx_pv", "tensor_pool", "linear_grain", "cpu_round", "bf16_panels", "decode_step", "attention_dpbf16"],
)
def test_bench_cpu_switches_times_both_settings_and_checks_greedy_output(switch):
    import torch

    import eagle_kernels  # noqa: F401

    if switch == "amx_pv" and not (
        hasattr(torch.ops.eagle_C, "tree_attention_cpu_variant")
        and torch.ops.eagle_C.tree_attention_cpu_variant() == "amx"
    ):
        pytest.skip("tree_attention does not run on AMX tiles on this CPU")
    if switch == "attention_dpbf16" and not (
        hasattr(torch.ops.eagle_C, "tree_attention_cpu_variant")
        and torch.ops.eagle_C.tree_attention_cpu_variant() == "avx512bf16"
    ):
        pytest.skip("tree_attention's VDPBF16PS scores apply to CPUs with AVX512-BF16 and no AMX")
    if switch == "bf16_panels":
        from eagle.models import cpu_packed

        if not cpu_packed.bf16_panel_linear_available() or cpu_packed.amx_linear_available():
            pytest.skip("bf16 panels apply to CPUs with AVX512-BF16 and no AMX")
    if switch in ("tensor_pool", "linear_grain", "cpu_round") and not hasattr(
        torch.ops.eagle_C, "eagle2_round_greedy"
    ):
        pytest.skip("the extension is not built")
    threads = ["--threads", "2"] if switch == "linear_grain" else []  # it only matters with more than one
    out = _run(
        "bench_cpu_switches.py", "--switch", switch, "--new-tokens", "8", "--repeats", "1", "--num-prompts", "2",
        "--trees", "2/2/4", "--temperature", "0", "1", "--no-save", *threads,
    )  # fmt: skip
    assert "every greedy EAGLE run reproduced its setting's plain decoding" in out, out
    same_sampled = "every sampled EAGLE run emitted the same tokens under both settings" in out
    assert same_sampled == (switch not in ("amx_pv", "bf16_panels", "attention_dpbf16")), (
        out
    )  # these change bits
    assert re.search(r"2/2/4 +\d+ +\d+ +[\d.]+x +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+x", out), out
    assert f"{switch}, T = 1, B 1" in out and "wrote" not in out, out


def test_ab_builds_times_two_builds_from_copies_of_the_package():
    so = next((BENCH.parent / "eagle_kernels").glob("_C*.so"), None)
    if so is None:
        pytest.skip("the extension is not built")
    out = _run(
        "ab_builds.py", str(so), str(so), "--cases", "attention", "forward", "draft", "loop", "--rounds", "1", "--quick"
    )  # fmt: skip
    assert re.search(r"tree_attention tiny-tree12-B1 bfloat16 +[\d.]+ +[\d.]+ +[\d.]+", out), out
    assert re.search(r"tiny-code target forward T=12 float32 +[\d.]+ +[\d.]+ +[\d.]+", out), out
    assert re.search(r"tiny-code cpu_dynamic_tree 3/4/12 bfloat16 +[\d.]+ +[\d.]+ +[\d.]+", out), out
    assert re.search(r"tiny-code cpu_verify_update 5/8/32 float32 +[\d.]+ +[\d.]+ +[\d.]+", out), out
    assert re.search(r"tiny-code EAGLE 3/4/12 B1 T0 bfloat16, us/token +[\d.]+ +[\d.]+ +[\d.]+", out), out
    assert re.search(r"tiny-code plain B1 T1 float32, us/token +[\d.]+ +[\d.]+ +[\d.]+", out), out


def test_ab_commits_compares_two_checkouts_by_their_own_ratios(tmp_path):
    """Two checkouts (here the same one twice) through bench/e2e.py, alternating: each side's speedup
    over its own run's vanilla, and new / old; the JSON keeps every run."""
    if next((BENCH.parent / "eagle_kernels").glob("_C*.so"), None) is None:
        pytest.skip("the extension is not built")
    root, out_file = str(BENCH.parent), tmp_path / "ab.json"
    out = _run(
        "ab_commits.py", root, root, "--rounds", "2", "--out", str(out_file), "--", "--methods", "vanilla",
        "eagle_chain", "--batch", "1", "--temperature", "0", "--new-tokens", "8", "--num-prompts", "1",
        "--repeats", "1", "--threads", "1",
    )  # fmt: skip
    assert out.index("round 1: old done") < out.index("round 1: new done"), out
    assert out.index("round 2: new done") < out.index("round 2: old done"), out
    assert re.search(r"eagle_chain B1 T0 +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+", out), out
    import json

    saved = json.loads(out_file.read_text())
    assert len(saved["runs"]["old"]) == len(saved["runs"]["new"]) == 2
    row = saved["summary"]["eagle_chain B1 T0"]
    assert row["old_tau"] == row["new_tau"] > 1  # the same code and prompts: the same greedy rounds
    assert row["new_over_old_speedup"] > 0


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status (Linux)")
def test_load_memory_reports_a_targets_load_time_and_memory(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert "wrote" in _run("load_memory.py", "--target", str(ckpt), "--make", "64,128,2,256")
    out = _run("load_memory.py", "--target", str(ckpt), "--rounds", "1", "--dtypes", "bfloat16")
    assert re.search(
        r"bfloat16 +load [\d.]+ s, peak \d+ MB over start; after: anon \d+ MB, file-backed \d+ MB", out
    ), out


def test_bench_loop_times_fixed_trees_over_several_prompt_sets():
    out = _run(
        "bench_loop.py", "--trees", "2/2/4", "chain", "--batch", "1", "--temperature", "0", "--new-tokens", "8",
        "--repeats", "1", "--prompt-sets", "2", "--prompt-tokens", "40", "--threads", "1", "--no-save",
    )  # fmt: skip
    assert re.search(r"dynamic\(depth=2,topk=2,n=4\) +1 +0\.0 +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+", out), out
    assert re.search(r"chain\(\d+\) +1 +0\.0 ", out), out
    assert "wrote" not in out, out


def test_bench_runtime_linears_compares_the_bf16_kernel_with_onednn_and_float32():
    import torch

    from eagle.models import cpu_packed

    if not (cpu_packed.amx_linear_available() or cpu_packed.bf16_panel_linear_available()):
        pytest.skip("needs AMX tiles or AVX512-BF16")
    name = "AMX tiles" if cpu_packed.amx_linear_available() else "bf16 panels"
    out = _run("bench_runtime.py", "--linears", "--rounds", "1", "--no-save")
    assert re.search(r"2048x256 M=64 +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+x", out), out
    assert f"{name}: rows computed alone are bit-identical to the block: True" in out, out
    assert re.search(r"target forward T=16 +[\d.]+ +[\d.]+ +[\d.]+x", out), out
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert "fp32 panels" in out, out


def test_bench_accept_calibration_compares_fixed_and_refitted_rates_with_vanilla():
    out = _run(
        "bench_accept_calibration.py", "--repeats", "1", "--new-tokens", "8", "--num-prompts", "2",
        "--prompt-tokens", "40", "--temperature", "0", "--dtype", "float32", "--variants", "log2", "--no-save",
    )  # fmt: skip
    assert "every greedy run reproduced vanilla's tokens" in out, out
    for cell in ("vanilla", "fixed", "stored", "refitted", "refitted_log2"):
        assert re.search(rf"{cell} +\d+ +[\d.]+x", out), out
    assert "wrote" not in out


def test_bench_accept_model_fits_both_gain_shapes():
    out = _run(
        "bench_accept_model.py", "--num-prompts", "1", "--new-tokens", "8", "--prompt-tokens", "40",
        "--temperature", "0", "--depths", "3", "--widths", "8", "16", "--no-save",
    )  # fmt: skip
    assert re.search(r"chain depth 3: tau [\d.]+, fitted acceptance a = [\d.]+", out), out
    assert re.search(r"3/3/8 +[\d.]+ +[+-][\d.]+% +[+-][\d.]+%", out), out
    for shape in ("log2", "sqrt_log2"):
        assert re.search(rf"{shape}: g = -?[\d.]+, rms relative error of tau [\d.]+%", out), out
    assert "wrote" not in out


def test_compare_heads_ranks_the_trained_head_above_a_random_one(tmp_path):
    from eagle.api import BUNDLED, load
    from eagle.models import random_draft, save_draft

    save_draft(random_draft(load(BUNDLED).target, "eagle2", seed=0), tmp_path / "random")
    trained = str(Path(__file__).resolve().parents[1] / "eagle" / "assets" / "tiny-code" / "draft")
    out = _run(
        "compare_heads.py", "--draft", trained, str(tmp_path / "random"), "--trees", "3/2/6",
        "--prompts", "2", "--new-tokens", "24", "--temperature", "0",
    )  # fmt: skip
    taus = [float(t) for t in re.findall(r"tree 3/2/6 +T=0 +tau ([\d.]+)", out)]
    assert len(taus) == 2 and taus[0] > 1.5 and taus[1] < 1.2, out
    assert "wrote" not in out
    (tmp_path / "p.jsonl").write_text('{"prompt": "def parse(text):\\n    for line in text.splitlines():"}\n')
    out = _run(
        "compare_heads.py", "--draft", trained, "--trees", "3/2/6", "--prompts", "1", "--new-tokens", "16",
        "--temperature", "0", "--prompts-file", str(tmp_path / "p.jsonl"),
    )  # fmt: skip
    assert len(re.findall(r"tree 3/2/6 +T=0 +tau [\d.]+", out)) == 1, out
    assert re.search(r"1 prompts from .*p\.jsonl, 1\d prompt tokens", out), out
    # --chat: the text as a user message through the template (a copy of the target given one)
    target = tmp_path / "chat_target"
    shutil.copytree(Path(trained).parent / "target", target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<bot>"
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    out = _run(
        "compare_heads.py", "--target", str(target), "--draft", trained, "--trees", "3/2/6", "--prompts", "1",
        "--new-tokens", "16", "--temperature", "0", "--prompts-file", str(tmp_path / "p.jsonl"), "--chat",
    )  # fmt: skip
    assert re.search(
        r"1 prompts from .*p\.jsonl, each a user message through the chat template, 2\d prompt", out
    )
    refused = {
        "--chat applies to --prompts-file texts": ["--chat"],  # refused before any model loads
        "drop --chat, or add a template": ["--prompts-file", str(tmp_path / "p.jsonl"), "--chat"],
    }
    for message, args in refused.items():
        done = subprocess.run(
            [sys.executable, str(BENCH / "compare_heads.py"), "--draft", trained, *args],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_autotree_stability_probes_in_fresh_processes_by_both_methods():
    out = _run("autotree_stability.py", "--processes", "1", "--threads", "1")
    for method in ("sequential", "interleaved"):
        assert re.search(rf"{method} +1: +\d/\d+/\d+ +probe", out), out
        assert re.search(rf"{method} \| 1\.00 \| 1 \|", out), out
    assert "wrote" not in out


def test_cpu_verify_ceiling_times_the_targets_linears_per_row_count():
    from eagle.models import cpu_packed

    if not cpu_packed.bf16_panel_linear_available() or cpu_packed.amx_linear_available():
        pytest.skip("the bf16 panel kernel runs the target's linears only on AVX512-BF16 CPUs without AMX")
    out = _run("cpu_verify_ceiling.py", "--rows", "1", "6", "--repeats", "1", "--no-save")
    assert "tiny-code: 49 linears, 9.96 M MACs per row" in out, out  # 12 layers x 4 + the LM head
    rows = {
        int(m.group(1)): float(m.group(2))
        for m in re.finditer(r"^\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)$", out, re.M)
    }
    # structure only: timings under a loaded CI machine can put 6 rows below 1 (CI once saw 0.92x)
    assert set(rows) == {1, 6} and rows[1] == 1.0 and rows[6] > 0, out
    assert re.search(r"ceiling \(one 768 x 256 matrix in L2\): 6 rows \d+ GFLOP/s", out), out
    need = {
        int(m.group(1)): float(m.group(2))
        for m in re.finditer(r"^\s+(\d+)\s+[\d.]+ ms.*\s([\d.]+)$", out, re.M)
    }
    assert need[1] == 3.0 and need[6] > 0, out  # a one-token "tree" needs tau 3 for 3x, by definition


def test_every_op_of_eagle_kernels_has_its_benchmark_module():
    """Issue 8: bench/bench_<op>.py for every op (DESIGN §2: benchmarks mirror module names)."""
    import importlib
    import pkgutil

    import eagle_kernels

    ops = []
    for info in pkgutil.iter_modules(eagle_kernels.__path__):
        module = importlib.import_module(f"eagle_kernels.{info.name}")
        if isinstance(getattr(module, "OP", None), str):
            ops.append(module.OP)
    assert len(ops) >= 8, ops
    missing = [op for op in ops if not (BENCH / f"bench_{op}.py").is_file()]
    assert not missing, f"no bench/bench_<op>.py for {missing}"


def test_bench_loop_times_unprofiled_runs_and_profiles_separate_passes(monkeypatch):
    """Profiling stamps every phase and, on CPU, takes the Python path instead of the one-call C++
    round: a speedup timed from profiled runs understated EAGLE (this script did so before session 23).
    The timed runs must be plain ``run`` calls; the split comes from a profiled pass beside them."""
    sys.path.insert(0, str(BENCH.parent))
    from bench import bench_loop
    from eagle.api import load
    from eagle.speculate import SpeculativeDecoder

    calls = []
    real_run = SpeculativeDecoder.run

    def run(self, prompts, max_new_tokens, sampling, **kw):
        calls.append((max_new_tokens, kw.get("profile", False)))
        return real_run(self, prompts, max_new_tokens, sampling, **kw)

    monkeypatch.setattr(SpeculativeDecoder, "run", run)
    model = load("tiny-code")
    row = bench_loop.measure(model, "chain", 1, 0.0, 6, repeats=2, prompt_sets=2, prompt_tokens=20)
    timed = [c for c in calls if c[0] == 6]
    assert [p for _, p in timed] == [False, False, True, True] * 2, calls
    assert row["round_ms"]["verify"] > 0 and row["speedup"] > 0 and row["tau"] >= 1
    assert row["profiled_tokens_per_s"] > 0


def test_bench_draft_dtype_tau_is_per_row_at_every_batch_size():
    """tau was rounds * B per batch: a batch runs until its slowest row finishes, so that counted
    rounds of rows already done (a third low at batch 4). Greedy rows are independent of their
    batch: tau at batch 2 must be tau at batch 1."""
    sys.path.insert(0, str(BENCH.parent))
    from bench.bench_draft_dtype import timed_speculative
    from bench.bench_loop import prompts_for
    from eagle.api import load
    from eagle.speculate import SpeculativeDecoder

    model = load("tiny-code")
    prompts = prompts_for(model, 2, 40)
    taus = []
    for B in (1, 2):
        decoder = SpeculativeDecoder(model.target, model.head, model._tree("chain", B))
        batches = [prompts[i : i + B] for i in range(0, 2, B)]
        tokens, rounds, _, tau = timed_speculative(decoder, batches, 24)
        taus.append((tokens, tau))
    assert taus[0][0] == taus[1][0]
    assert taus[1][1] == taus[0][1] > 1


def test_train_assistant_distils_a_loadable_assistant_with_the_targets_tokenizer(tmp_path):
    """A few seconds of distillation: the assistant it writes loads with transformers, shares the
    target's vocabulary and tokenizer, and its card records the held-out agreement before and after."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "assistant"
    _run("train_assistant.py", "--minutes", "0.05", "--out", str(out), "--batch", "2", "--seq-len", "64")
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] >= 1 and record["tokens_seen"] == record["steps"] * 2 * 64
    assert set(record["heldout_after"]) == {"kl", "top1_agreement"}
    model = AutoModelForCausalLM.from_pretrained(out)
    target_dir = Path(__file__).resolve().parents[1] / "eagle" / "assets" / "tiny-code" / "target"
    assert model.config.num_hidden_layers == 2
    assert model.config.vocab_size == json.loads((target_dir / "config.json").read_text())["vocab_size"]
    text = "def f(x):\n    return x\n"
    assert (
        AutoTokenizer.from_pretrained(out)(text)["input_ids"]
        == AutoTokenizer.from_pretrained(target_dir)(text)["input_ids"]
    )
    assert "top-1 agreement" in (out / "MODEL_CARD.md").read_text()
