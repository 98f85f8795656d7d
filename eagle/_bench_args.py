"""The options of ``eagle bench`` / ``bench/e2e.py``, in a module that imports neither torch nor
transformers, so that the CLI's parser (``eagle --help``) is built in a fraction of a second.
:mod:`eagle.bench` re-exports both names."""

from __future__ import annotations

import argparse

BUNDLED = "tiny-code"  # eagle.api.BUNDLED (not imported: eagle.api loads torch)

METHODS = (
    "vanilla",
    "hf_generate",
    "hf_prompt_lookup",
    "hf_assisted",
    "eagle_chain",
    "eagle_static",
    "eagle_dynamic",
    "eagle_auto",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``eagle bench`` and ``bench/e2e.py``)."""
    p.add_argument("--target", default=BUNDLED, help="target checkpoint dir / hub id (default: tiny-code)")
    p.add_argument(
        "--draft", default=None, help="EAGLE head dir (default: the bundled head, else a random one)"
    )
    p.add_argument(
        "--assistant", default=None, help="assistant model dir for hf_assisted (default: see docs)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=METHODS,
        metavar="METHOD",
        help="methods to run (default: all): " + ", ".join(METHODS),
    )
    p.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 1 4 16)")
    p.add_argument("--temperature", nargs="+", type=float, default=None, help="temperatures (default 0 1)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per sequence (default 128)")
    p.add_argument(
        "--num-prompts", type=int, default=None, help="prompts (default 8 held-out files / all given)"
    )
    p.add_argument(
        "--prompt-tokens", type=int, default=None, help="tokens of each default prompt (default 200)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats; the median is reported (default 4)"
    )
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE.jsonl",
        help='JSONL: {"prompt": ...} or MT-bench {"question_id": ..., "turns": [...]} lines',
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="send each --prompt / --prompts-file text as a user message through the tokenizer's chat "
        "template (chat models' heads were trained and are evaluated on such prompts, e.g. MT-bench)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: the checkout's bench/results; ./bench-results when installed)",
    )
    p.add_argument(
        "--name",
        default=None,
        help="file name stem (default e2e_<target>[_<GPU>][_<dtype>][_draft<dtype>][_cudagraph][_randomdraft][_quick])",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="CUDA: vanilla decoding and EAGLE rounds replayed from CUDA graphs (HF methods run as usual)",
    )
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float64")
    p.add_argument(
        "--draft-dtype",
        default=None,
        help="the EAGLE head's dtype (default: --dtype), e.g. bfloat16 drafts for a float32 target",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled runs")
    p.add_argument("--lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens (default 10)")
    p.add_argument("--work-dir", default=None, help="where a derived assistant is cached (default: temp dir)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings for smoke tests: batch 1 4, 16 tokens, 2 prompts of 48 tokens, 1 repeat",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--no-save", action="store_true", help="print the table only: no JSON or PNG (nothing is replaced)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
