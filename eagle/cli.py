"""Command-line interface: ``eagle <command> --help``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings

from eagle._args import positive_int

_ATTENTION_VARIANTS = {
    "amx": "AVX-512, with the scores of bfloat16 caches on AMX tiles",
    "avx512bf16": "AVX-512, with the scores of bfloat16 caches by AVX512-BF16 dot products",
    "avx512": "AVX-512",
    "avx2": "AVX2 (no AVX-512 on this CPU, or EAGLE_KERNELS_CPU_ISA=avx2)",
    "generic": "x86-64 baseline / portable C++ (no AVX2, or EAGLE_KERNELS_CPU_ISA=generic)",
}


def _cpu_attention_variant() -> str | None:
    """The variant of the C++ tree_attention kernel this CPU runs (None without the compiled
    extension); RuntimeError for an ``EAGLE_KERNELS_CPU_ISA`` that is unknown or that this CPU cannot run."""
    import torch

    from eagle_kernels import _ext

    if not (_ext.STATUS.loaded and hasattr(torch.ops.eagle_C, "tree_attention_cpu_variant")):
        return None
    return torch.ops.eagle_C.tree_attention_cpu_variant()


def _cpu_attention_line() -> str:
    """Which variant of the C++ tree_attention kernel runs on this CPU, in words."""
    try:
        variant = _cpu_attention_variant()
    except RuntimeError as err:
        return f"unavailable: {err}".splitlines()[0]
    if variant is None:
        return "PyTorch (no compiled extension)"
    words = _ATTENTION_VARIANTS.get(variant, variant)
    return f"C++ tree_attention, variant {variant}: {words} (csrc/cpu/tree_attention*.cpp)"


def _check_forced_cpu_isa() -> None:
    """An ``EAGLE_KERNELS_CPU_ISA`` that is unknown, or that this CPU cannot run, is bad input: a
    one-line error before the model loads, not a traceback from the first kernel call."""
    if not os.environ.get("EAGLE_KERNELS_CPU_ISA"):
        return
    try:
        _cpu_attention_variant()
    except RuntimeError as err:
        raise ValueError(str(err).splitlines()[0]) from err


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import eagle
    import eagle_kernels
    from eagle.models.cpu_packed import (
        amx_linear_available,
        bf16_panel_linear_available,
        cpu_has_amx_bf16,
        packing_supported,
        skinny_max_rows,
    )
    from eagle.models.draft import cpu_draft_loop_status

    info = {
        "eagle": eagle.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_packed_weights": {
            name: packing_supported(getattr(torch, name)) for name in ("float32", "bfloat16", "float16")
        },
        "cpu_amx_bf16": cpu_has_amx_bf16(),
        "cpu_amx_linear": amx_linear_available(),
        "cpu_bf16_panel_linear": bf16_panel_linear_available(),
        "cpu_draft_loop": cpu_draft_loop_status(),
        "cpu_attention": _cpu_attention_line(),
        "cpu_f32_linear_max_rows": skinny_max_rows(),
        "kernels": eagle_kernels.backend_info(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    k = info.pop("kernels")
    packed, amx = info.pop("cpu_packed_weights"), info.pop("cpu_amx_bf16")
    amx_linear = info.pop("cpu_amx_linear")
    bf16_panel = info.pop("cpu_bf16_panel_linear")
    draft_loop = info.pop("cpu_draft_loop")
    skinny = info.pop("cpu_f32_linear_max_rows")
    attention = info.pop("cpu_attention")
    for key, value in info.items():
        print(f"{key:>16}: {value}")
    if packed["bfloat16"] and amx_linear:
        half = (
            "AMX tiles with this package's bf16 linear kernel: `--dtype bfloat16` is the fast CPU dtype here"
        )
    elif packed["bfloat16"] and amx:
        half = "AMX bf16 with oneDNN-packed weights: `--dtype bfloat16` is the fast CPU dtype here"
    elif packed["bfloat16"] and bf16_panel:
        half = (
            "weights in bf16 panels, this package's AVX512-BF16 kernel (csrc/cpu/panel_linear.cpp): "
            "`--dtype bfloat16` is the fast CPU dtype here"
        )
    elif packed["bfloat16"] and not k["extension_loaded"]:
        half = (
            "oneDNN-packed bf16 weights; without the C++ extension this package's bf16 kernels are "
            "missing (compare --dtype float32 and bfloat16 with `eagle bench`)"
        )
    elif packed["bfloat16"]:
        half = "oneDNN-packed bf16 weights without AMX: float32 is likely faster on this CPU"
    else:
        half = "no oneDNN bf16 support: float32 is the CPU dtype"
    print(f"{'CPU bfloat16':>16}: {half}")
    print(f"{'CPU draft loop':>16}: {draft_loop}")
    if packed["float32"]:
        f32 = "weights in 16-column panels, this package's AVX-512 kernel (csrc/cpu/panel_linear.cpp)"
    elif skinny:
        f32 = (
            f"this package's AVX-512 kernel up to {skinny} rows (csrc/cpu/skinny_linear.cpp), F.linear above"
        )
    else:
        f32 = "F.linear (no AVX-512 kernel: no extension, no AVX-512, or EAGLE_CPU_SKINNY_LINEAR=0)"
    print(f"{'CPU fp32 linear':>16}: {f32}")
    print(f"{'CPU attention':>16}: {attention}")
    print(f"{'installed':>16}: {k['distribution'] or 'not installed (run from the source tree)'}")
    print(f"{'torch':>16}: {k['torch']}")
    print(f"{'extension':>16}: {'loaded' if k['extension_loaded'] else 'not loaded'} ({k['extension']})")
    triton_state = "usable" if k["triton"] else f"off: {k['triton_unusable']}"
    print(f"{'triton':>16}: {triton_state}")
    print(f"{'CPU backends':>16}:")
    for op, backend in k["cpu_backend"].items():
        print(f"{'':>18}{op:<32} {backend}")
    if k["cuda_backend"]:
        print(f"{'CUDA backends':>16}:")
        for op, backend in k["cuda_backend"].items():
            print(f"{'':>18}{op:<32} {backend}")
    return 0


# Below this many target parameters a CPU forward is a few milliseconds of small GEMMs: a second
# OpenMP thread gains little, and when another process holds a core every parallel region waits for
# a time slice (measured: 236 ms instead of 5.6 ms per token of the tiny-code target on 2 busy cores).
SMALL_MODEL_PARAMS = 200_000_000


def _set_cpu_threads(threads: int | None, model) -> None:
    """``threads`` intra-op threads; None: one for small models, torch's default otherwise."""
    import torch

    if model.target.device.type != "cpu":
        return
    if threads is None:
        params = sum(p.numel() for p in model.target.parameters())
        threads = 1 if params < SMALL_MODEL_PARAMS else torch.get_num_threads()
    if threads < 1:
        raise SystemExit(f"eagle generate: --threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def _print_new_text(text: str, shown: str, quiet: bool, *, final: bool) -> str:
    """Print what ``text`` adds to the already printed ``shown`` and return what is now printed.
    Until the end, text ending in U+FFFD is held back: the tokens so far stop inside a multi-byte
    character, whose bytes the next tokens complete (printed now, it would stay a replacement mark)."""
    if not final:
        text = text.rstrip("\ufffd")
    start = len(shown) if text.startswith(shown) else len(os.path.commonprefix([text, shown]))
    if not quiet:
        print(text[start:], end="", flush=True)
    return text


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    import eagle

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        print("eagle generate: empty prompt (give it as an argument or on stdin)", file=sys.stderr)
        return 2
    tree = _tree_from_args(args)  # refused before the model loads
    dtype = args.dtype or None  # a name: eagle.load resolves it (and refuses unknown ones clearly)
    model = eagle.load(args.target, args.draft, device=args.device, dtype=dtype, draft_dtype=args.draft_dtype)
    _set_cpu_threads(args.threads, model)
    if model.tokenizer is None:
        print(
            f"eagle generate: {args.target} has no tokenizer; use the Python API with token ids",
            file=sys.stderr,
        )
        return 2
    if model.head is None and not args.no_speculative:
        print(
            f"eagle generate: {args.target} comes with no draft head: pass one with --draft DIR, "
            "or decode plainly with --no-speculative",
            file=sys.stderr,
        )
        return 2
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    # the tokenizer's convention, as EagleModel.generate
    from eagle.api import _check_encodable, chat_prompt_ids

    _check_encodable(prompt, "prompt 0")
    if args.chat:  # one user message through the chat template, the assistant's turn opened
        ids = chat_prompt_ids(model.tokenizer, [{"role": "user", "content": prompt}], "the prompt")
    else:
        ids = model.tokenizer(prompt, verbose=False)["input_ids"]
    setup = time.perf_counter()
    tokens, lengths, shown = [], [], ""
    chunks = model.stream(
        ids,
        args.max_new_tokens,
        tree=tree,
        seed=args.seed,
        cuda_graph=args.cuda_graph,
        speculative="auto" if args.auto else not args.no_speculative,
        **sampling,
    )  # (its arguments are checked here: a bad one is reported before the prompt is echoed)
    if not args.quiet:
        print(prompt, end="", flush=True)
    # stream() sizes tree="dynamic" on its first call (timed forwards, once per model and batch size):
    # a set-up cost, reported apart from the decoding speed
    start = time.perf_counter()
    setup = start - setup
    continuation = _Continuation(model.tokenizer, ids)
    for chunk in chunks:
        tokens.extend(chunk)
        lengths.append(len(chunk))
        shown = _print_new_text(continuation.text(tokens), shown, args.quiet, final=False)
    _print_new_text(continuation.text(tokens), shown, args.quiet, final=True)
    lengths = lengths[1:]  # the first chunk is the prefill's token
    elapsed = time.perf_counter() - start
    # tau: tokens per target forward after the prefill (n/a when none followed it); a chunk is one
    # forward's tokens, except auto's plain steps, which stream() sends in chunks of several
    forwards = len(lengths)
    auto = ""
    if args.auto:  # what speculative="auto" chose (the decoder keeps its last run's policy)
        from eagle.speculate import SamplingParams

        decoder = model._decoder(tree, 1, args.cuda_graph, SamplingParams(**sampling), args.seed is not None)
        policy = decoder.last_auto
        if policy is not None:
            auto = f"; auto: {policy.plain_steps} plain steps, {policy.rounds} speculative rounds"
            forwards = policy.plain_steps + policy.rounds
    tau = f"{sum(lengths) / forwards:.2f}" if forwards else "n/a"
    note = f"; {setup:.2f} s of set-up (the draft tree's sizing) not counted" if setup >= 0.005 else ""
    gap = "" if args.quiet else "\n\n"  # (after the streamed text; -q streams none)
    print(
        f"{gap}[{len(tokens)} tokens in {elapsed:.2f} s: {len(tokens) / elapsed:.1f} tokens/s, "
        f"tau {tau} tokens per target forward{auto}{note}]",
        file=sys.stderr,
    )
    return 0


class _Continuation:
    """The text the new tokens add to the prompt's: decoded together with the prompt's ids, since a
    SentencePiece-style decoder drops the leading space of a text's first token (decoded alone, the
    continuation would stick to the prompt)."""

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer, self.prompt_ids = tokenizer, list(prompt_ids)
        self.prompt_text = self._decode(self.prompt_ids)

    def _decode(self, ids: list[int]) -> str:
        # without special tokens (an EOS's text), as EagleModel.generate's texts
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, tokens: list[int]) -> str:
        full = self._decode(self.prompt_ids + tokens)
        if full.startswith(self.prompt_text):
            return full[len(self.prompt_text) :]
        return self._decode(tokens)  # a decoder that rewrites the prompt's text: the tokens alone


def _tree_from_args(args: argparse.Namespace):
    """``--tree``, or the TreeConfig of ``--tree-depth / --tree-topk / --tree-tokens`` (the ones not
    given from EAGLE-2's 6 / 10 / 60, the tokens capped at what the depth and width can hold)."""
    import eagle

    given = {
        name: value
        for name, value in (
            ("--tree-depth", args.tree_depth),
            ("--tree-topk", args.tree_topk),
            ("--tree-tokens", args.tree_tokens),
        )
        if value is not None
    }
    if args.no_speculative and args.tree != "dynamic":  # (the default: given or not, nothing to say)
        raise ValueError(f"--tree {args.tree} sets a draft tree, and --no-speculative drafts none")
    if not given:
        return args.tree
    if args.no_speculative:
        raise ValueError(f"{', '.join(given)} sets a draft tree, and --no-speculative drafts none")
    if args.tree != "dynamic":
        raise ValueError(f"{', '.join(given)} sets a dynamic tree's shape, not --tree {args.tree}'s")
    base = eagle.TreeConfig()
    depth = args.tree_depth if args.tree_depth is not None else base.depth
    topk = args.tree_topk if args.tree_topk is not None else base.topk
    if args.tree_tokens is not None:
        total = args.tree_tokens
    elif topk == 1:
        total = depth + 1  # a chain
    else:
        total = min(base.total_tokens, 1 + topk + (depth - 1) * topk * topk)
    return eagle.TreeConfig(depth=depth, topk=topk, total_tokens=total)


def _sampled_temperature(text: str) -> float:
    from eagle.acceptance import SAMPLED_TEMPERATURE_RANGE

    lo, hi = SAMPLED_TEMPERATURE_RANGE
    value = float(text)
    if not lo <= value <= hi:  # (False for NaN too)
        raise argparse.ArgumentTypeError(
            f"must be in [{lo:g}, {hi:g}] (use --greedy-only for T = 0), got {text}"
        )
    return value


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from eagle.acceptance import FILENAME, measure_pair_acceptance, write_pair_acceptance
    from eagle.api import load

    if args.chat and not args.prompts:
        raise ValueError(
            "--chat sends --prompts texts through the chat template; the default prompts are code "
            "files, not conversations"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load(args.target, args.draft, device=args.device, dtype=args.dtype)
    if model.head is None:
        raise ValueError("eagle calibrate needs a draft head (--draft) for this target")
    if args.write:
        _refuse_writing_into_the_package(model.head.checkpoint_dir)
    if args.prompts:
        from eagle.bench import encode_texts, read_prompts_file

        if model.tokenizer is None:
            raise ValueError("--prompts holds text, and this target has no tokenizer to encode it")
        texts = read_prompts_file(args.prompts)[: args.num_prompts]
        encoded = encode_texts(texts, model.tokenizer, chat=args.chat)
        prompts = [p.ids for p in encoded]
        template = ", each a user message through the chat template" if args.chat else ""
        source = f"{args.prompts} (first {len(prompts)}{template})"
    else:
        from eagle.train.tinycode import heldout_prompts

        if model.tokenizer is None:
            raise ValueError("this target has no tokenizer: pass --prompts with text it can encode")
        prompts = heldout_prompts(model.tokenizer, args.num_prompts, args.prompt_tokens)
        source = f"the first {args.prompt_tokens} tokens of {len(prompts)} held-out standard-library files"
    temperature = None if args.greedy_only else args.temperature
    acceptance, record = measure_pair_acceptance(model, prompts, args.new_tokens, temperature)
    record["source"] = source
    for name, fit in (("greedy", acceptance.greedy), (f"T = {args.temperature:g}", acceptance.sampled)):
        if fit is not None:
            print(f"{name}: per-token acceptance {fit.accept_rate:.3f}, widening gain {fit.gain:.3f}")
    if args.write:
        path = write_pair_acceptance(model.head.checkpoint_dir, acceptance, record)
        print(f"wrote {path}")
    else:
        print(f"(not written: --write stores it as {FILENAME} in the head's directory)")
    return 0


def _refuse_writing_into_the_package(head_dir) -> None:
    """The bundled head ships the acceptance measured on 16 held-out files x 128 tokens; --write would
    replace it inside the installed package, for every later user of it, with a quicker measurement."""
    from pathlib import Path

    from eagle.acceptance import FILENAME
    from eagle.api import ASSETS

    head_dir = Path(head_dir).resolve()
    if head_dir.is_relative_to(ASSETS):
        raise ValueError(
            f"--write would replace the bundled head's {FILENAME} inside the installed package "
            f"({head_dir}); copy the head directory and pass the copy with --draft"
        )


def _cmd_bench(args: argparse.Namespace) -> int:
    from eagle.bench import run_from_args

    return run_from_args(args)


TRAIN_STAGES = {
    "target": ("eagle.train.pretrain", "pretrain a target LM on a corpus (default: tiny-code on the stdlib)"),
    "features": (
        "eagle.train.features",
        "dump a target's features (corpus windows or its own continuations)",
    ),
    "head": (
        "eagle.train.head",
        "train an EAGLE-1/2 (or --eagle3: EAGLE-3) draft head on dumped features (DDP under torchrun)",
    ),
    "tiny-code": (
        "eagle.train.tinycode",
        "reproduce the bundled pair from scratch: target, features, head, held-out tau",
    ),
}


def _cmd_train(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(TRAIN_STAGES[args.stage][0])
    return module.main(args.stage_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eagle",
        description="EAGLE speculative decoding: lossless, faster generation for Llama-family models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show devices, kernel backends in use and the extension's status")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=_cmd_info)

    gen = sub.add_parser(
        "generate",
        help="generate text with EAGLE speculative decoding (default: the bundled tiny-code pair)",
        description="Stream a continuation of PROMPT (or of stdin), then print tokens/s and tau, the mean "
        "number of tokens each target forward produced. Output is identical to plain decoding (greedy) "
        "or has exactly the same distribution (sampling).",
    )
    gen.add_argument("prompt", nargs="?", help="the prompt text (read from stdin when omitted)")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message through the tokenizer's chat template (chat models, "
        "whose EAGLE heads were trained on such prompts)",
    )
    gen.add_argument(
        "--target", default="tiny-code", help="target checkpoint dir / hub id, or tiny-code (default)"
    )
    gen.add_argument(
        "--draft", default=None, help="EAGLE head dir / hub id (default: the bundled head for tiny-code)"
    )
    gen.add_argument(
        "-n", "--max-new-tokens", type=positive_int, default=128, help="tokens to generate (default 128)"
    )
    gen.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 or -1 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--min-p", type=float, default=0.0, help="min-p filter (0 = off)")
    gen.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the sampling. The draws follow the tree: the default dynamic tree repeats from run to "
        "run on this machine while its saved timings do (EAGLE_AUTOTREE_CACHE); a fixed tree (--tree chain "
        "or static, or --tree-depth/--tree-topk/--tree-tokens) repeats everywhere. Not with --auto, which "
        "picks plain steps or rounds by the clock",
    )
    gen.add_argument(
        "--tree", default="dynamic", choices=("dynamic", "static", "chain"), help="draft tree shape"
    )
    gen.add_argument("--tree-depth", type=positive_int, default=None, help="dynamic tree: draft levels")
    gen.add_argument("--tree-topk", type=positive_int, default=None, help="dynamic tree: expansion width")
    gen.add_argument(
        "--tree-tokens", type=positive_int, default=None, help="dynamic tree: tokens verified per step"
    )
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--no-speculative", action="store_true", help="plain decoding (the baseline)")
    mode.add_argument(
        "--auto",
        action="store_true",
        help="speculate or decode plainly, whichever the clock says is faster here (speculative='auto': "
        "greedy output unchanged; a seeded sampled run is not reproducible)",
    )
    gen.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    gen.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, float16 or float64 (also fp32, bf16, fp16, fp64; default per device)",
    )
    gen.add_argument(
        "--draft-dtype",
        default=None,
        help="the EAGLE head's dtype (default: --dtype); e.g. bf16 drafts for a float32 target: same greedy "
        "output, same distribution when sampling (a seed then draws another sample)",
    )
    gen.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads (default: 1 for models under 200M parameters, else all cores)",
    )
    gen.add_argument(
        "--cuda-graph",
        action="store_true",
        help="CUDA only: replay each decoding step from a captured CUDA graph (same output, less overhead)",
    )
    gen.add_argument("-q", "--quiet", action="store_true", help="print only the statistics")
    gen.set_defaults(func=_cmd_generate)

    train = sub.add_parser(
        "train",
        help="train a target or an EAGLE head (stages: target, features, head; tiny-code: the bundled pair end to end)",
        description="Run one training stage; the arguments after STAGE go to that stage "
        "(`eagle train STAGE --help` lists them). A new head for a target: `eagle train features "
        "--target DIR ...` then `eagle train head --target DIR --data FEATURES --out HEAD`.",
    )
    train.add_argument(
        "stage", choices=sorted(TRAIN_STAGES), help="; ".join(f"{k}: {v[1]}" for k, v in TRAIN_STAGES.items())
    )
    train.add_argument("stage_args", nargs=argparse.REMAINDER, help="arguments of the stage")
    train.set_defaults(func=_cmd_train)

    cal = sub.add_parser(
        "calibrate",
        help="measure a pair's acceptance for tree='dynamic' and store it beside the head (acceptance.json)",
        description="Measure the draft head's per-token acceptance and widening gain with its target "
        "(chains and trees of depths 3 and 5, greedy and sampled; eagle/acceptance.py) on prompts, print "
        "them, and with --write store them as acceptance.json in the head's directory, which eagle.load "
        "reads as tree='dynamic''s prior.",
    )
    cal.add_argument("--target", default="tiny-code", help="target checkpoint dir, or tiny-code (default)")
    cal.add_argument("--draft", default=None, help="EAGLE head dir (default: the bundled head for tiny-code)")
    cal.add_argument(
        "--prompts",
        default=None,
        help='JSONL of {"prompt": ...} (or MT-bench turns); default: held-out stdlib code',
    )
    cal.add_argument(
        "--chat",
        action="store_true",
        help="send each --prompts text as a user message through the tokenizer's chat template",
    )
    cal.add_argument("--num-prompts", type=positive_int, default=16, help="prompts to use (default 16)")
    cal.add_argument(
        "--prompt-tokens", type=positive_int, default=128, help="held-out prompts' length (default 128)"
    )
    cal.add_argument(
        "--new-tokens", type=positive_int, default=128, help="tokens per prompt and tree (default 128)"
    )
    cal.add_argument(
        "--temperature",
        type=_sampled_temperature,
        default=1.0,
        help="the sampled runs' temperature, in [0.001, 100] (default 1)",
    )
    cal.add_argument("--greedy-only", action="store_true", help="measure greedy acceptance only")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", default=None, help="default per device (float32 on CPU)")
    cal.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    cal.add_argument("--write", action="store_true", help="store acceptance.json in the head's directory")
    cal.set_defaults(func=_cmd_calibrate)

    from eagle._bench_args import add_arguments as add_bench_arguments

    bench = sub.add_parser(
        "bench",
        help="end-to-end benchmark: EAGLE vs vanilla and Hugging Face generate / prompt lookup / assisted",
        description="Time EAGLE (chain, static, dynamic trees, and the dynamic one also with "
        "speculative='auto': eagle_auto), "
        "vanilla decoding on this runtime and Hugging "
        "Face generate, prompt-lookup and assisted decoding on the same checkpoint and prompts, methods "
        "interleaved; print tokens/s (median over repeats), tau and speedup vs vanilla, check greedy "
        "outputs against vanilla, write JSON and PNG under bench/results/ (see eagle/bench.py).",
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    formatwarning = warnings.formatwarning
    # a one-line note, as the errors below (EAGLE_DEBUG=1 keeps Python's format, with the source line)
    if not os.environ.get("EAGLE_DEBUG"):
        warnings.formatwarning = lambda message, category, *_, **__: (
            f"eagle {args.command}: {category.__name__}: {message}\n"
        )
    try:
        if args.command != "info":  # (info reports a forced CPU kernel it cannot run as unavailable)
            _check_forced_cpu_isa()
        return args.func(args)
    except BrokenPipeError:
        # The reader closed the pipe (`eagle generate ... | head`): stop quietly, as Unix tools do. Any
        # output still buffered goes to /dev/null, or Python's exit flush would fail on it once more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a process that SIGPIPE ended
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as e:
        # Bad input (a mismatched head, an over-long prompt, a missing checkpoint...): the message
        # names the problem; a traceback would only bury it. EAGLE_DEBUG=1 shows it.
        if os.environ.get("EAGLE_DEBUG"):
            raise
        print(f"eagle {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
