"""Decoding-loop timing: per-round split (draft, verify, accept, compact, draft update, other), tau,
and tokens/s against plain decoding on the same runtime, alternating runs in one process.

    python bench/bench_loop.py                                  # the bundled tiny-code pair
    python bench/bench_loop.py --target DIR --draft DIR --batch 1 4 --temperature 0 1
    python bench/bench_loop.py --random                         # a random 12x256 stand-in pair
    python bench/bench_loop.py --random 7b --device cuda        # random Llama-2-7B-shaped pair (step timings)
    python bench/bench_loop.py --trees 3/4/12 5/4/20 --batch 1 --temperature 0 --prompt-sets 4 \
        --prompt-tokens 200 --new-tokens 128 --name loop_trees   # fixed trees over 4 held-out prompts

tok/s and speedup come from plain runs; the split, and the "profiled" tok/s beside it, from a profiled
run after each (on CPU profiling takes the loop's Python path, not the one-call C++ round, and costs
time of its own; this script timed its speedups from profiled runs before session 23).
With a random stand-in tau is meaningless (an untrained head); the time split is still the loop's.
Writes bench/results/loop_<name>[_<GPU>][_<dtype>].json (dtype named when not the device default).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.utils import save_json  # noqa: E402
from eagle.api import EagleModel, _default_dtype, load  # noqa: E402
from eagle.models import generate_plain, random_draft  # noqa: E402
from eagle.speculate import SamplingParams, SpeculativeDecoder  # noqa: E402
from eagle.tree import TreeConfig  # noqa: E402

# Random stand-in shapes: (layers, hidden, intermediate, heads, kv heads, vocab)
RANDOM_SHAPES = {"12x256": (12, 256, 688, 4, 4, 4096), "7b": (32, 4096, 11008, 32, 32, 32000)}


def random_pair(shape: str, device: torch.device, dtype: torch.dtype) -> EagleModel:
    """A random target of ``RANDOM_SHAPES[shape]`` built directly on ``device`` (no checkpoint on disk:
    a 7B model would take minutes to write and read) and a random head for it."""
    from eagle.models.config import ModelConfig
    from eagle.models.llama import LlamaModel, rope_inv_freq

    layers, hidden, inter, heads, kv, vocab = RANDOM_SHAPES[shape]
    cfg = ModelConfig(
        family="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads, max_position_embeddings=4096,
    )  # fmt: skip
    with torch.device("meta"):
        target = LlamaModel(cfg)
    target = target.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, param in target.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=gen)
    target._inv_freq = rope_inv_freq(cfg)
    target = target.eval().requires_grad_(False)
    return EagleModel(target, random_draft(target))


def tree_label(tree) -> str:
    if isinstance(tree, TreeConfig):
        return (
            f"dynamic(depth={tree.depth},topk={tree.topk},n={tree.total_tokens})"
            if tree.topk > 1
            else f"chain({tree.depth})"
        )
    return f"static({tree.num_draft_tokens} tokens)"


def prompts_for(model: EagleModel, batch: int, length: int) -> list[list[int]]:
    """The first ``length`` tokens of held-out standard-library files when the model has a tokenizer
    (real text: acceptance as in use), else random token ids (a random stand-in pair)."""
    if model.tokenizer is not None:
        from eagle.train.tinycode import heldout_prompts

        files = heldout_prompts(model.tokenizer, batch, length)
        return [files[i % len(files)] for i in range(batch)]
    gen = torch.Generator().manual_seed(1)
    V = model.target.config.vocab_size
    return [torch.randint(0, V, (length,), generator=gen).tolist() for _ in range(batch)]


def profiled_pass(
    decoder: SpeculativeDecoder, groups, new_tokens: int, sampling, seed: int
) -> tuple[dict[str, float], int, int]:
    """``(seconds per phase, rounds, tokens emitted)`` of one profiled pass over ``groups``.

    Kept apart from the timed runs: profiling stamps every phase (on CUDA it synchronises at each
    stamp) and on CPU it takes the loop's Python path instead of the one-call C++ round
    (``SpeculativeDecoder._cpu_round``), so a profiled run is slower than a plain ``run`` and its split
    is that of the Python path. This script timed its speedup from profiled runs before session 23;
    ``profiled_tokens_per_s`` in the JSON shows by how much that understated EAGLE."""
    phase_s, rounds, emitted = {}, 0, 0
    for prompts in groups:
        for e in decoder.run(prompts, new_tokens, sampling, seed=seed, profile=True):
            emitted += sum(map(len, e.tokens))
        rounds += decoder.times.rounds
        for k, v in decoder.times.as_dict().items():
            phase_s[k] = phase_s.get(k, 0.0) + v
    return phase_s, rounds, emitted


def measure(
    model: EagleModel,
    tree,
    batch: int,
    temperature: float,
    new_tokens: int,
    repeats: int,
    cuda_graph: bool = False,
    prompt_sets: int = 1,
    prompt_tokens: int = 100,
) -> dict:
    """EAGLE with ``tree``, plain decoding and a profiled EAGLE pass (the phase split), alternating,
    over ``prompt_sets`` batches of ``batch`` held-out prompts of ``prompt_tokens`` tokens (run one
    batch after the other); best of ``repeats``."""
    every = prompts_for(model, batch * prompt_sets, prompt_tokens)
    groups = [every[i * batch : (i + 1) * batch] for i in range(prompt_sets)]
    sampling = SamplingParams(temperature=temperature)
    decoder = SpeculativeDecoder(model.target, model.head, model._tree(tree, batch), cuda_graph=cuda_graph)
    list(decoder.run(groups[0], 8, sampling, seed=0))  # warm-up
    eagle_s, plain_s, profiled_s, taus = [], [], [], []
    for r in range(repeats):  # alternate the three so load changes hit all of them
        emitted, elapsed, lengths = 0, 0.0, []
        for prompts in groups:
            t0 = time.perf_counter()
            emitted += sum(
                len(t) for e in decoder.run(prompts, new_tokens, sampling, seed=r) for t in e.tokens
            )
            elapsed += time.perf_counter() - t0
            lengths += [n for row in decoder.accept_lengths().values() for n in row]
        eagle_s.append(elapsed)
        taus.append(sum(lengths) / max(len(lengths), 1))
        t0 = time.perf_counter()
        for prompts in groups:
            generate_plain(model.target, prompts, new_tokens, temperature=temperature, cuda_graph=cuda_graph)
        plain_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        phase_s, rounds, profiled_emitted = profiled_pass(decoder, groups, new_tokens, sampling, r)
        profiled_s.append(time.perf_counter() - t0)
    split = {k: v / max(rounds, 1) * 1e3 for k, v in phase_s.items()}  # the last pass's
    eagle_best, plain_best = min(eagle_s), min(plain_s)
    total_tokens = batch * new_tokens * prompt_sets
    step = sum(split.values())
    return {
        "tree": tree_label(decoder.tree),
        "batch": batch,
        "prompt_sets": prompt_sets,
        "prompt_tokens": prompt_tokens,
        "temperature": temperature,
        "cuda_graph": cuda_graph,
        "tau": sum(taus) / len(taus),
        "eagle_tokens_per_s": emitted / eagle_best,
        "plain_tokens_per_s": total_tokens / plain_best,
        "speedup": plain_best / eagle_best * emitted / total_tokens,
        # each profiled pass has its repeat's seed: the same tokens as the timed run (greedy or sampled)
        "profiled_tokens_per_s": profiled_emitted / min(profiled_s),
        "round_ms": split,
        "non_model_fraction": (split["accept"] + split["compact"] + split["other"]) / step,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--draft", default=None)
    p.add_argument(
        "--random",
        nargs="?",
        const="12x256",
        default=None,
        choices=list(RANDOM_SHAPES),
        help="a random stand-in pair (default shape: 12 layers of 256)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument(
        "--trees",
        nargs="*",
        default=["dynamic", "static", "chain"],
        help="dynamic, static, chain, or depth/topk/total_tokens (e.g. 4/4/16)",
    )
    p.add_argument("--batch", nargs="*", type=int, default=[1, 4])
    p.add_argument("--temperature", nargs="*", type=float, default=[0.0, 1.0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--prompt-sets",
        type=int,
        default=1,
        help="batches of held-out prompts run one after the other per timing (default 1)",
    )
    p.add_argument("--prompt-tokens", type=int, default=100, help="tokens of each prompt (default 100)")
    p.add_argument("--name", default=None, help="output file stem (default loop_<target>[_<GPU>][_<dtype>])")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="CUDA: replay EAGLE rounds and plain decoding steps from CUDA graphs (both sides)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else _default_dtype(device)
    if args.random:
        model, name = random_pair(args.random, device, dtype), f"random{args.random}"
    else:
        model, name = load(args.target, args.draft, device=device, dtype=dtype), Path(args.target).name
    if device.type == "cuda":
        name += "_" + torch.cuda.get_device_name(device).replace(" ", "-")
    if dtype != _default_dtype(device):
        name += "_" + str(dtype).removeprefix("torch.")  # a CPU bfloat16 run keeps the float32 table
    rows = []
    print(
        f"{'tree':<34} {'B':>2} {'T':>4} {'tau':>5} {'tok/s':>7} {'plain':>7} {'speedup':>7} {'profiled':>8} {'non-model':>9}  split ms (profiled)"
    )
    for tree in args.trees:
        tree = TreeConfig.parse(tree) if "/" in tree else tree
        for batch in args.batch:
            for temperature in args.temperature:
                r = measure(
                    model,
                    tree,
                    batch,
                    temperature,
                    args.new_tokens,
                    args.repeats,
                    args.cuda_graph,
                    prompt_sets=args.prompt_sets,
                    prompt_tokens=args.prompt_tokens,
                )
                rows.append(r)
                split = " ".join(f"{k}={v:.2f}" for k, v in r["round_ms"].items())
                print(
                    f"{r['tree']:<34} {batch:>2} {temperature:>4} {r['tau']:>5.2f} {r['eagle_tokens_per_s']:>7.1f} "
                    f"{r['plain_tokens_per_s']:>7.1f} {r['speedup']:>7.2f} {r['profiled_tokens_per_s']:>8.1f} {r['non_model_fraction']:>9.1%}  {split}"
                )
    if args.cuda_graph:
        name += "_cudagraph"
    if not args.no_save:
        stem = args.name or f"loop_{name}"
        settings = vars(args) | {"dtype": str(dtype).removeprefix("torch."), "device": str(device)}
        path = save_json(
            f"{stem}.json", {"threads": torch.get_num_threads(), "settings": settings, "results": rows}
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
