"""Per-token decode time of the eagle runtime vs Hugging Face's own forward with its cache.

Model: the project's tiny-code target shape (12 layers, hidden 256, 4 heads / 2 kv heads, MLP 768,
vocab 4096, untied; random weights, float32). Each measurement decodes greedily, batch 1, after a
~100-token prompt; the two implementations alternate round by round in the same process so machine
load hits both alike.

    python bench/bench_runtime.py                     # table + bench/results/runtime_cpu.json
    python bench/bench_runtime.py --forwards          # also: C++ layer op vs Python modules, T=1..64
    python bench/bench_runtime.py --forwards --dtype bfloat16   # bf16 with packed weights
    python bench/bench_runtime.py --linears           # bf16 linears: AMX tiles or bf16 panels vs oneDNN,
                                                      # F.linear and float32 panels
    python bench/bench_runtime.py --linears-f32       # float32 linears: skinny kernel vs F.linear (MKL)
    python bench/bench_runtime.py --argmax            # greedy pick + NaN check: eagle_C vs torch
    pytest bench/bench_runtime.py --benchmark-only    # the same decode step under pytest-benchmark
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.utils import save_json  # noqa: E402
from eagle.api import BUNDLED, _resolve_bundled  # noqa: E402
from eagle.models import cpu_packed, load_target  # noqa: E402
from eagle.models.cpu_packed import pack_module_linears  # noqa: E402
from eagle.models.draft import random_draft  # noqa: E402
from eagle.models.llama import set_cpu_fast_path  # noqa: E402

SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=12,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
PROMPT_LEN = 100


def build_models(directory: Path, dtype: torch.dtype = torch.float32):
    """A random HF Llama of :data:`SHAPE`, saved to ``directory`` and loaded by the eagle runtime."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=None, eos_token_id=None)).eval().to(dtype)
    hf.save_pretrained(directory)
    return hf, load_target(directory, dtype=dtype)


class EagleDecoder:
    """Greedy decode on the eagle runtime: one forward of one token per step, cache advanced by 1."""

    def __init__(self, model, prompt: torch.Tensor, max_new: int) -> None:
        self.model, self.prompt = model, prompt
        self.cache = model.new_cache(1, prompt.shape[1] + max_new + 1)

    def prefill(self) -> torch.Tensor:
        self.cache.reset()
        n = self.prompt.shape[1]
        out = self.model(self.prompt, self.cache, logits_index=torch.tensor([[n - 1]]))
        self.cache.advance(n)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        out = self.model(token, self.cache)
        self.cache.advance(1)
        return out.logits[:, -1].argmax(-1, keepdim=True)


def hf_cache_kwarg() -> str:
    """transformers 5 names the cache argument ``cache``; 4.x called it ``past_key_values``."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class HFDecoder:
    """Greedy decode with transformers' forward and its default dynamic cache."""

    def __init__(self, model, prompt: torch.Tensor) -> None:
        self.model, self.prompt, self.past = model, prompt, None
        self.cache_kwarg = hf_cache_kwarg()

    def prefill(self) -> torch.Tensor:
        out = self.model(self.prompt, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        out = self.model(token, use_cache=True, **{self.cache_kwarg: self.past})
        self.past = out.past_key_values
        return out.logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def time_decode(decoder, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds per decoded token (prefill excluded) and the tokens produced."""
    token = decoder.prefill()
    tokens = [int(token)]
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = decoder.step(token)
        tokens.append(int(token))
    return (time.perf_counter() - start) / new_tokens, tokens


def run(rounds: int, new_tokens: int, threads: int, dtype: torch.dtype = torch.float32) -> dict:
    torch.set_num_threads(threads)
    load_before = os.getloadavg()  # other processes on the machine slow both implementations
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_models(Path(tmp), dtype)
    prompt = torch.randint(
        0, SHAPE["vocab_size"], (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1)
    )
    decoders = {
        "eagle runtime": EagleDecoder(ours, prompt, new_tokens),
        "HF forward + DynamicCache": HFDecoder(hf, prompt),
    }
    times: dict[str, list[float]] = {name: [] for name in decoders}
    outputs = {}
    for dec in decoders.values():  # warm-up
        time_decode(dec, 8)
    for _ in range(rounds):
        for name, dec in decoders.items():
            seconds, outputs[name] = time_decode(dec, new_tokens)
            times[name].append(seconds)
    load_after = os.getloadavg()
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    ours_ms, hf_ms = ms["eagle runtime"], ms["HF forward + DynamicCache"]
    return {
        "model": SHAPE
        | {"dtype": str(dtype).removeprefix("torch."), "params": sum(p.numel() for p in hf.parameters())},
        "prompt_len": PROMPT_LEN,
        "new_tokens_per_round": new_tokens,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "load_average_1_5_15min": {"before": load_before, "after": load_after},
        "ms_per_token_median": ms,
        "ms_per_token_all_rounds": {n: [1e3 * s for s in t] for n, t in times.items()},
        "speedup_vs_hf": hf_ms / ours_ms,
        "same_greedy_tokens": outputs["eagle runtime"] == outputs["HF forward + DynamicCache"],
    }


def _mean_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e3 * (time.perf_counter() - start) / calls


@torch.inference_mode()
def compare_forwards(rounds: int, threads: int, calls: int = 50, dtype: torch.dtype = torch.float32) -> dict:
    """Per-forward ms of the CPU fast path (``eagle_C::llama_layers``) vs the Python modules, for
    target blocks of T = 1, 8, 16, 32, 64 (tree-masked, 100-token cache) and one EAGLE-1/2 draft level
    (T = 1, 8 rows continuing a tree block, past = 3), batch 1. The two paths alternate round by
    round; the outputs are checked equal."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        _, ours = build_models(Path(tmp), dtype)
    head = random_draft(ours, "eagle2").eval().requires_grad_(False)
    pack_module_linears(head, extra=[head.lm_head_weight])  # as load_draft does (bf16/fp16 only)
    gen = torch.Generator().manual_seed(2)
    V, H = SHAPE["vocab_size"], SHAPE["hidden_size"]
    cache, draft_cache = ours.new_cache(1, PROMPT_LEN + 80), head.new_cache(1, PROMPT_LEN + 32)
    cache.advance(PROMPT_LEN)
    draft_cache.advance(PROMPT_LEN)
    cases = {}
    for T in (1, 8, 16, 32, 64):
        ids = torch.randint(0, V, (1, T), generator=gen)
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None]
        cases[f"target forward T={T}"] = lambda ids=ids, mask=mask: ours(ids, cache, tree_mask=mask).logits
    for T in (1, 8):
        hidden = torch.randn(1, T, H, generator=gen).to(dtype)
        ids = torch.randint(0, V, (1, T), generator=gen)
        mask, pos = torch.ones(1, T, 3 + T, dtype=torch.bool), torch.full((1, T), PROMPT_LEN + 3)

        def level(hidden=hidden, ids=ids, mask=mask, pos=pos):
            return head(hidden, ids, draft_cache, positions=pos, tree_mask=mask, past=3).logits

        cases[f"draft level T={T}"] = level
    paths = {"python modules": False, "C++ layer op": True}
    times = {case: {path: [] for path in paths} for case in cases}
    same = True
    previous = set_cpu_fast_path(True)
    try:
        for case, fn in cases.items():
            outputs = {}
            for path, enabled in paths.items():
                set_cpu_fast_path(enabled)
                outputs[path] = fn()  # warm-up
            same &= torch.equal(*outputs.values())
            for _ in range(rounds):
                for path, enabled in paths.items():
                    set_cpu_fast_path(enabled)
                    times[case][path].append(_mean_ms(fn, calls))
    finally:
        set_cpu_fast_path(previous)
    ms = {case: {p: statistics.median(t) for p, t in by_path.items()} for case, by_path in times.items()}
    return {
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "rounds": rounds,
        "ms_median": ms,
        "bit_identical": same,
    }


# Linear shapes of the tiny-code target and head, [N, K]: qkv, o, gate_up, down, fc, lm_head.
LINEAR_SHAPES = ((512, 256), (256, 256), (1536, 256), (256, 768), (256, 512), (2048, 256))
LINEAR_ROWS = (1, 4, 16, 64)


def _time_us(fn, calls: int) -> float:
    return 1e3 * _mean_ms(fn, calls)


def _bf16_kernel() -> tuple[str, callable, callable, str] | None:
    """This CPU's bf16 linear kernel: (name, packing function, op, the environment switch that turns it
    off) for AMX tiles where the CPU has them, else bf16 panels (AVX512-BF16); None without either."""
    if cpu_packed.amx_linear_available():
        return "AMX tiles", cpu_packed.amx_tiles, torch.ops.eagle_C.amx_linear_bf16, "EAGLE_CPU_AMX_LINEAR"
    if cpu_packed.bf16_panel_linear_available():
        return (
            "bf16 panels",
            cpu_packed.bf16_panels,
            torch.ops.eagle_C.panel_linear_bf16,
            "EAGLE_CPU_BF16_PANEL_LINEAR",
        )
    return None


@torch.inference_mode()
def compare_linears(rounds: int, threads: int, calls: int = 200) -> dict:
    """Microseconds per bf16 linear of each tiny-code shape and row count M, for ``F.linear``, the
    oneDNN-packed weight, this package's kernel (AMX tiles, or bf16 panels on CPUs with AVX512-BF16
    and no AMX) and, for the dtype choice, the float32 panel kernel on the same weights in float32
    (alternating round by round); and target forwards (T = 1, 16, 64) of models loaded with each
    layout. Each output of this package's kernel is checked to be row-count invariant (rows computed
    alone are bit-identical)."""
    kernel = _bf16_kernel()
    if kernel is None:
        raise SystemExit("--linears needs AMX-BF16 tiles or AVX512-BF16 (see `eagle info`)")
    name, pack, op, _ = kernel
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(3)
    impls = ["F.linear", "oneDNN packed", name]
    if cpu_packed.panel_linear_available():
        impls.append("float32 panels")
    linears, invariant = {}, True
    for N, K in LINEAR_SHAPES:
        w = torch.randn(N, K, generator=gen).bfloat16()
        onednn, packed = torch.ops.mkldnn._reorder_linear_weight(w, None), pack(w)
        f32_panels = cpu_packed.panels(w.float())
        for M in LINEAR_ROWS:
            x = torch.randn(M, K, generator=gen).bfloat16()
            x32 = x.float()
            fns = {
                "F.linear": lambda x=x, w=w: torch.nn.functional.linear(x, w),
                "oneDNN packed": lambda x=x, p=onednn: torch.ops.mkldnn._linear_pointwise(
                    x, p, None, "none", [], ""
                ),
                name: lambda x=x, p=packed: op(x, p, None),
                "float32 panels": lambda x=x32, p=f32_panels: torch.ops.eagle_C.panel_linear_f32(x, p, None),
            }
            alone = torch.cat([op(x[i : i + 1], packed, None) for i in range(M)])
            invariant &= torch.equal(alone, fns[name]())
            times = {impl: [] for impl in impls}
            for _ in range(rounds):
                for impl in impls:
                    times[impl].append(_time_us(fns[impl], calls))
            linears[f"{N}x{K} M={M}"] = {impl: statistics.median(t) for impl, t in times.items()}
    forwards = _compare_forward_layouts(rounds, calls=20, kernel=kernel)
    return {
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "kernel": name,
        "linear_us_median": linears,
        "kernel_rows_invariant": invariant,
        "forward_ms_median": forwards,
    }


F32_LINEAR_ROWS = (1, 2, 4, 8, 12, 16, 32, 64)
F32_FORWARD_T = (1, 4, 8, 12, 16, 32)
LAYERS = 12  # distinct weights per shape, as in a forward: each call reads its weight from memory
F32_FORWARDS = ("MKL (F.linear)", "skinny", "panels")


def _row_invariant(fn, x: torch.Tensor) -> bool:
    """True when ``fn`` gives each row of ``x`` alone exactly what it gives the row in the block."""
    return torch.equal(torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])]), fn(x))


@torch.inference_mode()
def compare_linears_f32(rounds: int, threads: int, calls: int = 20) -> dict:
    """Microseconds per float32 linear of each tiny-code shape and row count M: ``F.linear`` (MKL),
    ``eagle_C::skinny_linear_f32`` (up to its row limit) and ``eagle_C::panel_linear_f32`` on the
    panel copy, alternating round by round, each call on the next of 12 distinct weights; then
    tiny-code target forwards of T tokens through each (MKL and skinny: the unpacked model with
    ``EAGLE_CPU_SKINNY_LINEAR`` 0 / 1, read per call; panels: the model loaded with its float32
    panels), alternating likewise. Each kernel's output is checked to be row-count invariant."""
    limit = cpu_packed.skinny_max_rows()
    if limit == 0 or not cpu_packed.panel_linear_available():
        raise SystemExit("--linears-f32 needs the float32 kernels (AVX-512; see `eagle info`)")
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(4)
    linears, invariant = {}, {"skinny": True, "panels": True}
    for N, K in LINEAR_SHAPES:
        ws = [torch.randn(N, K, generator=gen) for _ in range(LAYERS)]
        ps = [cpu_packed.panels(w) for w in ws]
        for M in F32_LINEAR_ROWS:
            x = torch.randn(M, K, generator=gen)
            fns = {
                "F.linear": lambda x=x, ws=ws: [torch.nn.functional.linear(x, w) for w in ws],
                "panels": lambda x=x, ps=ps: [torch.ops.eagle_C.panel_linear_f32(x, p, None) for p in ps],
            }
            invariant["panels"] &= _row_invariant(
                lambda r, p=ps[0]: torch.ops.eagle_C.panel_linear_f32(r, p, None), x
            )
            if M <= limit:
                fns["skinny"] = lambda x=x, ws=ws: [
                    torch.ops.eagle_C.skinny_linear_f32(x, w, None) for w in ws
                ]
                invariant["skinny"] &= _row_invariant(
                    lambda r, w=ws[0]: torch.ops.eagle_C.skinny_linear_f32(r, w, None), x
                )
            times = {name: [] for name in fns}
            for _ in range(rounds):
                for name, fn in fns.items():
                    times[name].append(_time_us(fn, calls) / LAYERS)
            linears[f"{N}x{K} M={M}"] = {name: statistics.median(t) for name, t in times.items()}
    return {
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "skinny_max_rows": limit,
        "linear_us_median": linears,
        "rows_invariant": invariant,
        "forward_ms_median": _compare_forward_f32(rounds, calls=20),
    }


@contextlib.contextmanager
def _restored_env(name: str):
    """Whatever the block sets ``os.environ[name]`` to, it is back to its old value (or unset) after."""
    previous = os.environ.get(name)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _load_f32_target(panels: bool):
    with _restored_env("EAGLE_CPU_PANEL_LINEAR"):
        os.environ["EAGLE_CPU_PANEL_LINEAR"] = "1" if panels else "0"  # read when the weights are packed
        return load_target(_resolve_bundled(BUNDLED, "target"), dtype=torch.float32)


def _compare_forward_f32(rounds: int, calls: int) -> dict:
    dense, packed = _load_f32_target(panels=False), _load_f32_target(panels=True)
    variants = {"MKL (F.linear)": (dense, "0"), "skinny": (dense, "1"), "panels": (packed, "1")}
    result = {}
    with _restored_env("EAGLE_CPU_SKINNY_LINEAR"):
        for T in F32_FORWARD_T:
            ids = torch.randint(0, 2000, (1, T))
            mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None]
            prompt = torch.randint(0, 2000, (1, 200))
            caches = {}
            for model in (dense, packed):
                caches[id(model)] = model.new_cache(1, 256 + T)
                model(prompt, caches[id(model)])
                caches[id(model)].advance(200)
            times = {name: [] for name in variants}
            for _ in range(rounds):
                for name, (model, env) in variants.items():
                    os.environ["EAGLE_CPU_SKINNY_LINEAR"] = env
                    cache = caches[id(model)]
                    forward = lambda m=model, c=cache, i=ids, k=mask: m(i, c, tree_mask=k)  # noqa: E731
                    times[name].append(_mean_ms(forward, calls))
            result[f"target forward T={T}"] = {name: statistics.median(t) for name, t in times.items()}
    return result


def print_linears_f32(result: dict) -> None:
    print(f"float32 linears, {result['threads']} thread(s), median of {result['rounds']} rounds (us)")
    print(f"{'[N x K] rows':<20}{'F.linear':>10}{'skinny':>10}{'panels':>10}{'panels vs MKL':>15}")
    for case, us in result["linear_us_median"].items():
        f, sk, pa = us["F.linear"], us.get("skinny", float("nan")), us["panels"]
        print(f"{case:<20}{f:>10.1f}{sk:>10.1f}{pa:>10.1f}{f / pa:>14.2f}x")
    print(f"rows computed alone are bit-identical to the block: {result['rows_invariant']}")
    print(f"{'forward (ms)':<20}{'MKL':>10}{'skinny':>10}{'panels':>10}{'panels vs MKL':>15}")
    for case, ms in result["forward_ms_median"].items():
        f, sk, pa = (ms[k] for k in F32_FORWARDS)
        print(f"{case:<20}{f:>10.3f}{sk:>10.3f}{pa:>10.3f}{f / pa:>14.2f}x")


ARGMAX_SHAPES = ((1, 2048), (16, 2048), (64, 2048), (1, 32000), (64, 32000))


def _argmax_torch(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loop did before eagle_C::argmax_checked: two torch reductions."""
    return logits.argmax(-1), ~torch.isfinite(logits).all()


@torch.inference_mode()
def compare_argmax(rounds: int, threads: int, calls: int = 200) -> dict:
    """Microseconds per greedy pick with its NaN/inf check on logits ``[rows, V]`` (a decode row, a
    verified tree, a batch of trees; the tiny-code and a Llama-2 vocabulary), bf16 and fp32:
    ``eagle_C::argmax_checked`` against torch's ``argmax`` + ``isfinite().all()``, alternating round
    by round. Each result is checked to equal torch's."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(5)
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        for rows, V in ARGMAX_SHAPES:
            logits = (torch.randn(rows, V, generator=gen) * 4).to(dtype)
            index, bad = torch.ops.eagle_C.argmax_checked(logits)
            assert torch.equal(index, logits.argmax(-1)) and not bool(bad)
            fns = {
                "torch": lambda x=logits: _argmax_torch(x),
                "argmax_checked": lambda x=logits: torch.ops.eagle_C.argmax_checked(x),
            }
            n = max(10, calls * 2048 * 16 // (rows * V))
            times = {name: [] for name in fns}
            for _ in range(rounds):
                for name, fn in fns.items():
                    times[name].append(_time_us(fn, n))
            out[f"{str(dtype).removeprefix('torch.')} [{rows}, {V}]"] = {
                name: statistics.median(t) for name, t in times.items()
            }
    return {"threads": torch.get_num_threads(), "rounds": rounds, "argmax_us_median": out}


def print_argmax(result: dict) -> None:
    print(f"greedy pick + NaN check, {result['threads']} thread(s), median of {result['rounds']} rounds (us)")
    print(f"{'logits':<22}{'torch':>10}{'eagle_C':>10}{'speedup':>10}")
    for case, us in result["argmax_us_median"].items():
        t, a = us["torch"], us["argmax_checked"]
        print(f"{case:<22}{t:>10.1f}{a:>10.1f}{t / a:>9.1f}x")


def _compare_forward_layouts(rounds: int, calls: int, kernel) -> dict:
    """Target forwards (ms, median over rounds) of the tiny-code shape in bf16 with oneDNN-packed
    weights and with this package's kernel (``kernel``: :func:`_bf16_kernel`), and in float32 with
    panels where the float32 panel kernel runs, alternating."""
    name, _, _, env = kernel
    models = {}
    with _restored_env(env):
        for label, value in (("oneDNN packed", "0"), (name, "1")):
            os.environ[env] = value
            with tempfile.TemporaryDirectory() as tmp:
                models[label] = build_models(Path(tmp), torch.bfloat16)[1]
    if cpu_packed.panel_linear_available():
        with tempfile.TemporaryDirectory() as tmp:
            models["float32 panels"] = build_models(Path(tmp), torch.float32)[1]
    gen = torch.Generator().manual_seed(4)
    caches = {label: m.new_cache(1, PROMPT_LEN + 80) for label, m in models.items()}
    for c in caches.values():
        c.advance(PROMPT_LEN)
    result = {}
    for T in (1, 16, 64):
        ids = torch.randint(0, SHAPE["vocab_size"], (1, T), generator=gen)
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None]
        times = {label: [] for label in models}
        for _ in range(rounds):
            for label, m in models.items():
                times[label].append(
                    _mean_ms(
                        lambda m=m, c=caches[label], ids=ids, mask=mask: m(ids, c, tree_mask=mask), calls
                    )
                )
        result[f"target forward T={T}"] = {label: statistics.median(t) for label, t in times.items()}
    return result


def print_linears(result: dict) -> None:
    name = result["kernel"]
    f32 = any("float32 panels" in us for us in result["linear_us_median"].values())
    print(f"bf16 linears, {result['threads']} thread(s), median of {result['rounds']} rounds (us)")
    print(
        f"{'[N x K] rows':<20}{'F.linear':>10}{'oneDNN':>10}{name:>13}{'vs oneDNN':>11}"
        + (f"{'fp32 panels':>13}{'vs fp32':>9}" if f32 else "")
    )
    for case, us in result["linear_us_median"].items():
        f, o, a = us["F.linear"], us["oneDNN packed"], us[name]
        line = f"{case:<20}{f:>10.1f}{o:>10.1f}{a:>13.1f}{o / a:>10.2f}x"
        if f32:
            line += f"{us['float32 panels']:>13.1f}{us['float32 panels'] / a:>8.2f}x"
        print(line)
    print(f"{name}: rows computed alone are bit-identical to the block: {result['kernel_rows_invariant']}")
    _print_forward_ratios(result["forward_ms_median"], ("oneDNN packed", "oneDNN"), (name, name))
    if f32:
        _print_forward_ratios(result["forward_ms_median"], ("float32 panels", "fp32 panels"), (name, name))


def _print_forward_ratios(forwards: dict, base: tuple[str, str], new: tuple[str, str]) -> None:
    """Forward times (ms) of a baseline and a new implementation, each given as (key, column title)."""
    print(f"{'forward (ms)':<20}{base[1]:>13}{new[1]:>13}{'speedup':>10}")
    for case, ms in forwards.items():
        b, n = ms[base[0]], ms[new[0]]
        print(f"{case:<20}{b:>13.3f}{n:>13.3f}{b / n:>9.2f}x")


def print_forwards(result: dict) -> None:
    print(
        f"forwards, batch 1, {result['dtype']}, {result['threads']} thread(s), median of {result['rounds']} rounds"
    )
    print(f"{'forward':<24}{'python ms':>10}{'C++ op ms':>10}{'speedup':>9}")
    for case, ms in result["ms_median"].items():
        py, cpp = ms["python modules"], ms["C++ layer op"]
        print(f"{case:<24}{py:>10.3f}{cpp:>10.3f}{py / cpp:>8.2f}x")
    print(f"outputs bit-identical: {result['bit_identical']}")


def print_table(result: dict) -> None:
    ms = result["ms_per_token_median"]
    hf_ms = ms["HF forward + DynamicCache"]
    print(
        f"decode, batch 1, {result['model']['dtype']}, after a {result['prompt_len']}-token prompt, "
        f"{result['threads']} thread(s), "
        f"median of {result['rounds']} rounds x {result['new_tokens_per_round']} tokens"
    )
    print(f"{'implementation':<28}{'ms/token':>10}{'tokens/s':>10}{'vs HF':>8}")
    for name, value in ms.items():
        print(f"{name:<28}{value:>10.2f}{1e3 / value:>10.1f}{hf_ms / value:>7.2f}x")
    print(
        f"same greedy tokens: {result['same_greedy_tokens']}; load average before/after: "
        f"{result['load_average_1_5_15min']['before'][0]:.1f}/{result['load_average_1_5_15min']['after'][0]:.1f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, torch.get_num_threads()],
        help="torch thread counts to run",
    )
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument(
        "--dtype", default="float32", help="float32 (default) or bfloat16 (oneDNN-packed weights on CPU)"
    )
    parser.add_argument(
        "--forwards", action="store_true", help="also compare the C++ layer op with the Python modules"
    )
    parser.add_argument(
        "--linears",
        action="store_true",
        help="only compare bf16 linear implementations (AMX tiles, oneDNN, F.linear) and forwards with each",
    )
    parser.add_argument(
        "--linears-f32",
        action="store_true",
        help="only compare float32 linears (skinny kernel vs F.linear) and forwards with each",
    )
    parser.add_argument(
        "--argmax",
        action="store_true",
        help="only compare the greedy pick + NaN check (eagle_C::argmax_checked vs torch)",
    )
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    comparisons = {  # --argmax / --linears: only that comparison, once per thread count
        "argmax": (compare_argmax, print_argmax, "argmax_cpu.json"),
        "linears": (compare_linears, print_linears, "linears_cpu_bfloat16.json"),
        "linears_f32": (compare_linears_f32, print_linears_f32, "linears_cpu_float32.json"),
    }
    for flag, (compare, show, name) in comparisons.items():
        if getattr(args, flag):
            runs = [compare(args.rounds, threads) for threads in dict.fromkeys(args.threads)]
            for r in runs:
                show(r)
            if flag == "linears" and runs[0]["kernel"] != "AMX tiles":  # keep the AMX machine's file
                name = "linears_cpu_bfloat16_panels.json"
            if not args.no_save:
                print(f"wrote {save_json(name, {'runs': runs})}")
            return
    results, forwards = [], []
    for threads in dict.fromkeys(args.threads):
        results.append(run(args.rounds, args.new_tokens, threads, dtype))
        print_table(results[-1])
        if args.forwards:
            forwards.append(compare_forwards(args.rounds, threads, dtype=dtype))
            print_forwards(forwards[-1])
    if not args.no_save:
        payload = {"runs": results} | ({"forwards": forwards} if forwards else {})
        name = "runtime_cpu.json" if dtype == torch.float32 else f"runtime_cpu_{args.dtype}.json"
        print(f"wrote {save_json(name, payload)}")


# --------------------------------------------------------------------------------------------------
# pytest-benchmark: one decode step of each implementation (same model, same cache length)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("bench_runtime"))


@pytest.mark.parametrize("impl", ["eagle", "hf"])
def test_decode_step(benchmark, models, impl):
    hf, ours = models
    prompt = torch.randint(
        0, SHAPE["vocab_size"], (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        if impl == "eagle":
            dec = EagleDecoder(ours, prompt, 1)
            token = dec.prefill()

            def step():  # rewrite position PROMPT_LEN each time: constant cache length
                return ours(token, dec.cache)
        else:
            dec = HFDecoder(hf, prompt)
            token = dec.prefill()
            past = dec.past

            def step():
                out = hf(token, use_cache=True, **{dec.cache_kwarg: past})
                past.crop(-1)  # drop the token just added: constant cache length
                return out

        benchmark.group = "decode step, 12x256 Llama, fp32, batch 1, 100-token cache"
        benchmark(step)


@pytest.mark.skipif(not cpu_packed.amx_linear_available(), reason="needs AMX-BF16 tiles")
@pytest.mark.parametrize("impl", ["oneDNN packed", "AMX tiles"])
@pytest.mark.parametrize("rows", [1, 16])
def test_bf16_linear(benchmark, impl, rows):
    N, K = 1536, 256  # the tiny-code MLP's gate_up projection
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(N, K, generator=gen).bfloat16(), torch.randn(rows, K, generator=gen).bfloat16()
    if impl == "AMX tiles":
        tiles = cpu_packed.amx_tiles(w)
        fn = lambda: torch.ops.eagle_C.amx_linear_bf16(x, tiles, None)  # noqa: E731
    else:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        fn = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # noqa: E731
    benchmark.group = f"bf16 linear {N}x{K}, {rows} row(s)"
    assert torch.equal(fn(), torch.nn.functional.linear(x, w)) or impl == "AMX tiles"
    benchmark(fn)


@pytest.mark.parametrize("impl", ["torch", "argmax_checked"])
@pytest.mark.parametrize("rows", [1, 16])
def test_argmax_checked(benchmark, impl, rows):
    if impl == "argmax_checked" and os.environ.get("EAGLE_SKIP_EXT") == "1":
        pytest.skip("argmax_checked is an eagle_C op; EAGLE_SKIP_EXT=1 (a pure-Python install)")
    logits = torch.randn(rows, 2048, generator=torch.Generator().manual_seed(0)).bfloat16()
    fn = (
        (lambda: _argmax_torch(logits))
        if impl == "torch"
        else (lambda: torch.ops.eagle_C.argmax_checked(logits))
    )
    benchmark.group = f"greedy pick + NaN check, bf16 [{rows}, 2048]"
    assert torch.equal(fn()[0], logits.argmax(-1))
    benchmark(fn)


if __name__ == "__main__":
    main()
