"""Acceptance of several draft heads of one target, on the same held-out prompts and trees.

For each head: tau (mean accepted tokens per target forward) at a few fixed trees, greedy and at
T = 1, on the first ``--prompt-tokens`` tokens of held-out standard-library files (the bundled pair's
held-out split, :func:`eagle.train.tinycode.heldout_prompts`) or of random token ids when the target
has no tokenizer. Greedy taus are deterministic for a head; the T = 1 runs are seeded by prompt, so
they are too. Every head runs the same prompts in the same process, so the ratios compare heads, not
machines.

    python bench/compare_heads.py --draft eagle/assets/tiny-code/draft /tmp/new-head --name heads_tiny-code

Prints one row per head and tree, and writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_loop import prompts_for  # noqa: E402
from bench.utils import save_json  # noqa: E402
from eagle.acceptance import measure_tau  # noqa: E402
from eagle.api import BUNDLED, EagleModel, load  # noqa: E402
from eagle.models import load_draft  # noqa: E402
from eagle.tree import TreeConfig  # noqa: E402

TREES = ("6/10/60", "3/2/6", "4/2/8", "5/1/6")


def parse_tree(text: str) -> TreeConfig:
    try:
        return TreeConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def tree_spec(tree: TreeConfig) -> str:
    return f"{tree.depth}/{tree.topk}/{tree.total_tokens}"


def heldout(
    model: EagleModel, n: int, prompt_tokens: int, prompts_file: str | None = None, chat: bool = False
) -> list[list[int]]:
    """``n`` prompts: the texts of the JSONL ``prompts_file`` (as ``eagle bench``; with ``chat`` each a
    user message through the chat template) when given, else :func:`bench.bench_loop.prompts_for`'s
    (held-out standard-library files, or random ids for a target without a tokenizer)."""
    if prompts_file is not None:
        from eagle.bench import encode_texts, read_prompts_file

        if model.tokenizer is None:
            raise SystemExit("compare_heads: --prompts-file holds text, and this target has no tokenizer")
        texts = read_prompts_file(prompts_file)[:n]
        try:
            return [p.ids for p in encode_texts(texts, model.tokenizer, chat=chat)]
        except ValueError as e:  # (no chat template, a text that encodes to nothing)
            raise SystemExit(f"compare_heads: {e}") from None
    return prompts_for(model, n, prompt_tokens)


def compare(
    target: str,
    drafts: list[str],
    trees: list[TreeConfig],
    temperatures: list[float],
    prompts: int,
    prompt_tokens: int,
    new_tokens: int,
    prompts_file: str | None = None,
    chat: bool = False,
) -> list[dict]:
    base = load(target, drafts[0])
    ids = heldout(base, prompts, prompt_tokens, prompts_file, chat)
    source = prompts_file or "held-out standard-library files"
    if chat:
        source += ", each a user message through the chat template"
    print(f"{len(ids)} prompts from {source}, {sum(map(len, ids))} prompt tokens", flush=True)
    rows = []
    for draft in drafts:
        head = load_draft(draft, base.target, dtype=base.target.dtype, device=base.target.device)
        model = EagleModel(base.target, head, base.tokenizer)
        for tree in trees:
            for temperature in temperatures:
                tau = measure_tau(model, ids, tree, temperature, new_tokens)
                rows.append(
                    {
                        "draft": draft,
                        "tree": tree_spec(tree),
                        "temperature": temperature,
                        "tau": tau,
                    }
                )
                print(f"{draft:<40} tree {rows[-1]['tree']:<8} T={temperature:g}  tau {tau:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=BUNDLED, help="target directory or bundled pair name")
    p.add_argument(
        "--draft", nargs="+", required=True, help="head directories (the first one is the baseline)"
    )
    p.add_argument("--trees", nargs="+", type=parse_tree, default=[parse_tree(t) for t in TREES])
    p.add_argument("--temperature", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--prompts", type=int, default=16, help="how many prompts")
    p.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help="prompt texts, JSONL: {'prompt': ...} or MT-bench questions (as eagle bench --prompts-file), "
        "instead of tiny-code's held-out standard-library files",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="send each --prompts-file text as a user message through the tokenizer's chat template (as a "
        "chat model's head was trained, and as eagle bench --chat measures it)",
    )
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None, help="write bench/results/NAME.json")
    args = p.parse_args(argv)
    if args.chat and args.prompts_file is None:
        p.error(
            "--chat applies to --prompts-file texts (the default prompts are code files, not conversations)"
        )
    torch.set_num_threads(args.threads)
    rows = compare(
        args.target,
        args.draft,
        args.trees,
        args.temperature,
        args.prompts,
        args.prompt_tokens,
        args.new_tokens,
        args.prompts_file,
        args.chat,
    )
    base = {(r["tree"], r["temperature"]): r["tau"] for r in rows if r["draft"] == args.draft[0]}
    for r in rows:
        r["tau_vs_first"] = r["tau"] / base[(r["tree"], r["temperature"])]
    if args.name:
        record = {
            "settings": {k: (v if k != "trees" else [tree_spec(t) for t in v])
                         for k, v in vars(args).items()},
            "results": rows,
        }  # fmt: skip
        print(f"wrote {save_json(args.name + '.json', record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
