"""Per-token decode time of the eagle runtime vs Hugging Face's own forward with its cache.

Model: the project's tiny-code target shape (12 layers, hidden 256, 4 heads / 2 kv heads, MLP 768,
vocab 4096, untied; random weights, float32). Each measurement decodes greedily, batch 1, after a
~100-token prompt; the two implementations alternate round by round in the same process so machine
load hits both alike.

    python bench/bench_runtime.py                     # table + bench/results/runtime_cpu.json
    pytest bench/bench_runtime.py --benchmark-only    # the same decode step under pytest-benchmark
"""

from __future__ import annotations

import argparse
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
from eagle.models import load_target  # noqa: E402

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


def run(rounds: int, new_tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    load_before = os.getloadavg()  # other processes on the machine slow both implementations
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_models(Path(tmp))
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
        "model": SHAPE | {"dtype": "float32", "params": sum(p.numel() for p in hf.parameters())},
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


def print_table(result: dict) -> None:
    ms = result["ms_per_token_median"]
    hf_ms = ms["HF forward + DynamicCache"]
    print(
        f"decode, batch 1, after a {result['prompt_len']}-token prompt, {result['threads']} thread(s), "
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
    args = parser.parse_args(argv)
    results = []
    for threads in dict.fromkeys(args.threads):
        results.append(run(args.rounds, args.new_tokens, threads))
        print_table(results[-1])
    if not args.no_save:
        print(f"wrote {save_json('runtime_cpu.json', {'runs': results})}")


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


if __name__ == "__main__":
    main()
