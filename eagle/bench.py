"""End-to-end decoding benchmark: EAGLE against vanilla decoding and the Hugging Face peers.

On one checkpoint and one prompt set, in one process, it times

* ``vanilla``: plain decoding on this runtime (``EagleModel.generate(..., speculative=False)``);
* ``hf_generate``: ``transformers`` ``generate`` of the same checkpoint (greedy or sampled);
* ``hf_prompt_lookup``: its prompt-lookup decoding (``prompt_lookup_num_tokens``), batch 1 only;
* ``hf_assisted``: its assisted generation with a small assistant model, batch 1 only;
* ``eagle_chain`` / ``eagle_static`` / ``eagle_dynamic``: EAGLE with a chain, the EAGLE-1 static
  tree or the dynamic (EAGLE-2) tree,
* ``eagle_auto``: the dynamic tree with ``speculative="auto"`` (:mod:`eagle.adaptive`: plain steps
  wherever speculation measures slower; its share of plain steps is reported; not with CUDA graphs),

for each batch size and temperature. Within each repeat every method runs once, one after the other,
in reverse order on every other repeat (the machine is shared: load changes hit all methods alike);
the reported tokens/s is the **median over repeats** (the best is stored too), tau is tokens emitted
per target forward after the prefill (per sequence, pooled over the timed repeats), and the speedup is a method's median tokens/s
over vanilla's at the same batch size and temperature; beside it, the paired speedup is the median of each repeat's own ratio (with their
min and max), which a drift of the machine's speed across repeats moves less. EOS is ignored: every
sequence generates exactly ``new_tokens`` tokens, so every method does the same work. At temperature
0 every method is lossless, so each one's tokens are compared with vanilla's, prompt by prompt; a
mismatch is reported in the table and the JSON with the target's top-2 logit gap at the first
differing token. A difference whose two tokens' logits are within ``NEAR_TIE_ULPS`` units in the last
place of the model dtype is a rounding near-tie (bfloat16 runs have them): shown, but not a failure.

    python bench/e2e.py                      # the bundled tiny-code pair, every method
    eagle bench --batch 1 4 --temperature 0 1 --num-prompts 4 --new-tokens 64 --threads 1
    eagle bench --quick                      # smoke test
    eagle bench --target DIR --draft DIR --prompts-file mt_bench.jsonl

Writes ``e2e_<target>[_<GPU>][_<dtype>][_draft<dtype>][_cudagraph][_randomdraft][_quick].json`` and ``.png`` under ``bench/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import eagle
from eagle._bench_args import METHODS, add_arguments  # noqa: F401  (add_arguments: re-exported)
from eagle.api import ASSETS, BUNDLED, EagleModel, _default_static_tree, chat_prompt_ids
from eagle.models import random_draft
from eagle.models.weights import DTYPES
from eagle_kernels import _ext

EAGLE_TREES = {
    "eagle_chain": "chain",
    "eagle_static": "static",
    "eagle_dynamic": "dynamic",
    "eagle_auto": "dynamic",
}
BATCH_ONE_ONLY = {
    "hf_prompt_lookup": "transformers' prompt-lookup decoding supports batch size 1 only",
    "hf_assisted": "transformers' assisted generation supports batch size 1 only",
}
ASSISTANT_LAYERS = 2
MAX_TREE_TOKENS = 64  # room kept after prompt + new tokens for the largest verified tree
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results"  # in a source checkout; see default_out_dir


def default_out_dir() -> Path:
    """Where results go without ``--out``: the checkout's ``bench/results``, or, for an installed
    package (REPO_ROOT is then site-packages, not to be written into), ``./bench-results``."""
    if (REPO_ROOT / "bench" / "utils.py").exists():
        return DEFAULT_OUT
    return Path.cwd() / "bench-results"


@dataclass
class BenchConfig:
    """Settings of one benchmark (see :func:`build_parser` for the command-line names).

    prompts / prompts_file: user prompts (text); when both are empty the default set is used: the
    first ``prompt_tokens`` tokens of ``num_prompts`` held-out standard-library files.
    chat: encode each user prompt as one user message through the tokenizer's chat template (as a
    chat model's EAGLE head was trained and is evaluated, e.g. on MT-bench), not as plain text.
    num_prompts: None means 8 for the default set and every user prompt.
    """

    target: str = BUNDLED
    draft: str | None = None
    assistant: str | None = None
    methods: tuple[str, ...] = METHODS
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    temperatures: tuple[float, ...] = (0.0, 1.0)
    new_tokens: int = 128
    num_prompts: int | None = None
    prompt_tokens: int = 200
    repeats: int = 4  # even: each method runs first as often as last (the order alternates)
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None
    chat: bool = False
    out: str | None = None
    threads: int | None = None
    device: str = "cpu"
    cuda_graph: bool = False  # CUDA: vanilla and EAGLE replay their steps from CUDA graphs
    dtype: str | None = None
    draft_dtype: str | None = None  # the EAGLE head's dtype (default: dtype); the output is unchanged
    seed: int = 0
    lookup_tokens: int = 10
    work_dir: str | None = None
    name: str | None = None
    progress: bool = True
    plot: bool = True
    save: bool = True  # False: the table only, no JSON or PNG
    quick: bool = False  # only names the output files (``_quick``); QUICK holds the settings

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if not self.methods:
            raise ValueError("methods is empty; choose from " + ", ".join(METHODS))
        for name in ("methods", "batch_sizes", "temperatures"):
            values = list(getattr(self, name))
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            if repeated:
                raise ValueError(f"{name} lists {repeated} more than once")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batch_sizes)}")
        if not self.temperatures or any(not 0 <= t < math.inf for t in self.temperatures):
            raise ValueError(f"temperatures must be finite and >= 0, got {list(self.temperatures)}")
        for name in ("new_tokens", "repeats", "prompt_tokens", "lookup_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        runnable = [
            (m, b) for m in self.methods for b in self.batch_sizes if _skip_reason(self, m, b) is None
        ]
        if not runnable:
            raise ValueError(
                f"every method x batch size is skipped ({', '.join(self.methods)} at batch "
                f"{', '.join(map(str, self.batch_sizes))}): nothing to run"
            )
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.chat and not (self.prompts or self.prompts_file):
            raise ValueError(
                "chat (--chat) sends user prompts (--prompt / --prompts-file) through the chat template; "
                "the default prompts are code files, not conversations"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        for name in ("dtype", "draft_dtype"):
            value = getattr(self, name)
            if value is not None and getattr(torch, value, None) not in DTYPES.values():
                raise ValueError(
                    f"{name} must name a floating dtype the models run in (float16, bfloat16, float32, "
                    f"float64), got {value!r}"
                )


QUICK = dict(batch_sizes=(1, 4), new_tokens=16, num_prompts=2, prompt_tokens=48, repeats=1, quick=True)


# ==================================================================================================
# Prompts
# ==================================================================================================
@dataclass
class Prompt:
    """One benchmark prompt: where it came from, its token ids and (a user prompt) its text."""

    source: str
    ids: list[int]
    text: str | None = None

    def record(self) -> dict:
        """What the result file keeps of it: enough to tell whether two runs had the same prompt."""
        ids = ",".join(map(str, self.ids)).encode()
        out = {"source": self.source, "tokens": len(self.ids), "ids_sha256": hashlib.sha256(ids).hexdigest()}
        return out if self.text is None else out | {"text": self.text}


def read_prompts_file(path: str | Path) -> list[tuple[str, str]]:
    """``(source, text)`` for each line of a JSONL file: ``{"prompt": TEXT}`` or MT-bench's
    ``{"question_id": ..., "turns": [TEXT, ...]}`` (the first turn). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        source = f"{path.name}:{number}"
        if isinstance(record, dict) and record.get("question_id") is not None:
            source += f" (question_id {record['question_id']})"
        out.append((source, _prompt_text(record, f"{path}:{number}")))
    if not out:
        raise ValueError(f"prompts file {str(path)!r} holds no prompts (expected JSON lines)")
    return out


def _prompt_text(record, where: str) -> str:
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        text = record["prompt"]
    elif isinstance(record, dict) and isinstance(record.get("turns"), list) and record["turns"]:
        text = record["turns"][0]
    else:
        raise ValueError(
            f'{where}: expected {{"prompt": TEXT}} or {{"question_id": ..., "turns": [TEXT, ...]}}'
        )
    if not isinstance(text, str) or not text:
        raise ValueError(f"{where}: the prompt is empty or not a string")
    return text


def heldout_prompts(tokenizer, count: int, prompt_tokens: int) -> list[Prompt]:
    """The first ``prompt_tokens`` tokens of ``count`` held-out standard-library files (the tiny-code
    validation split), evenly spread over the files long enough, in a fixed order."""
    from eagle.train.corpus import collect_sources, split_sources

    _, heldout = split_sources(collect_sources())
    long_enough = []
    for source in heldout:
        # A generous character prefix: cutting the text can only change the token at the cut.
        prefix = source.text[: prompt_tokens * 16]
        ids = tokenizer(prefix, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) > prompt_tokens:
            long_enough.append(Prompt(source.relpath, ids[:prompt_tokens]))
    if len(long_enough) < count:
        raise ValueError(
            f"only {len(long_enough)} held-out standard-library files have more than {prompt_tokens} "
            f"tokens; ask for fewer prompts or shorter ones"
        )
    step = len(long_enough) / count
    return [long_enough[int(i * step)] for i in range(count)]


def user_prompt_texts(config: BenchConfig) -> list[tuple[str, str]]:
    """``(source, text)`` of the ``--prompt`` texts then the prompts file's, capped at ``num_prompts``
    (read before any model is loaded, so that a bad file fails fast)."""
    texts = [(f"--prompt {i + 1}", p) for i, p in enumerate(config.prompts)]
    empty = [src for src, text in texts if not text]
    if empty:
        raise ValueError(f"empty prompt: {empty}")
    if config.prompts_file:
        texts += read_prompts_file(config.prompts_file)
    return texts[: config.num_prompts] if config.num_prompts else texts


def encode_texts(texts: list[tuple[str, str]], tokenizer, chat: bool = False) -> list[Prompt]:
    """``(source, text)`` pairs encoded with the tokenizer's own convention, or with ``chat`` each as one
    user message through its chat template (:func:`eagle.api.chat_prompt_ids`); a text that encodes
    to no token raises, naming its source."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat prompts (--chat) go through the tokenizer's chat template, and this checkpoint's "
                "tokenizer has none (tokenizer_config.json's chat_template): drop --chat, or add a template"
            )
        prompts = [
            Prompt(src, chat_prompt_ids(tokenizer, [{"role": "user", "content": t}], src), t)
            for src, t in texts
        ]
    else:
        prompts = [Prompt(src, tokenizer(t)["input_ids"], t) for src, t in texts]
    empty = [p.source for p in prompts if not p.ids]
    if empty:
        raise ValueError(f"prompts encode to no tokens: {empty}")
    return prompts


def build_prompts(config: BenchConfig, texts: list[tuple[str, str]], tokenizer) -> tuple[list[Prompt], str]:
    """The prompt set (user texts encoded, else the held-out default) and where it came from."""
    if tokenizer is None:
        raise ValueError(f"{config.target} has no tokenizer, so the benchmark cannot encode its prompts")
    if texts:
        origin = (
            "user prompts, each a user message through the chat template" if config.chat else "user prompts"
        )
        return encode_texts(texts, tokenizer, config.chat), origin
    count = config.num_prompts or 8
    return heldout_prompts(tokenizer, count, config.prompt_tokens), (
        f"first {config.prompt_tokens} tokens of {count} held-out standard-library files"
    )


def batches_of(prompts: Sequence[Prompt], batch: int) -> list[list[Prompt]]:
    """Split the prompts into batches of ``batch``; prompts are reused cyclically to fill the last
    batch (and every batch when there are fewer prompts than ``batch``)."""
    n = max(1, -(-len(prompts) // batch))
    return [[prompts[(i * batch + j) % len(prompts)] for j in range(batch)] for i in range(n)]


# ==================================================================================================
# Models
# ==================================================================================================
@dataclass
class Models:
    """Everything the methods run on, loaded once."""

    eagle: EagleModel
    target_path: str
    draft_label: str
    random_draft: bool
    hf: torch.nn.Module | None = None
    assistant: torch.nn.Module | None = None
    assistant_info: dict = field(default_factory=dict)
    forwards: dict[str, int] = field(default_factory=lambda: {"target": 0, "assistant": 0})
    target_starts: list = field(default_factory=list)  # each HF target forward's first cache position
    # what neutral_generation_config left out of each checkpoint's generation_config.json
    hf_dropped_generation_settings: dict[str, dict] = field(default_factory=dict)


def _is_bundled_target(target: str) -> bool:
    """``target`` is the bundled pair's target directory given as a path."""
    try:
        return Path(target).resolve() == (ASSETS / BUNDLED / "target").resolve()
    except OSError:
        return False


def resolve_pair(target: str, draft: str | None) -> tuple[str, str | None]:
    """Checkpoint directories of the target and the draft (None: no trained head available)."""
    if target != BUNDLED:
        return target, draft
    target_path = ASSETS / BUNDLED / "target"
    if not (target_path / "config.json").exists():
        raise FileNotFoundError(
            f"the bundled {BUNDLED!r} target is missing ({target_path} has no config.json)"
        )
    bundled_draft = ASSETS / BUNDLED / "draft"
    if draft is None and (bundled_draft / "config.json").exists():
        draft = str(bundled_draft)
    return str(target_path), draft


def load_models(config: BenchConfig, dtype: torch.dtype, log: Callable[[str], None]) -> Models:
    target_path, draft_path = resolve_pair(config.target, config.draft)
    model = eagle.load(
        target_path, draft_path, device=config.device, dtype=dtype, draft_dtype=config.draft_dtype
    )
    if draft_path is None:
        if config.draft_dtype is not None and getattr(torch, config.draft_dtype) != model.target.dtype:
            raise ValueError(
                f"draft_dtype={config.draft_dtype} needs a trained head (--draft): the random stand-in head "
                f"runs in the target's dtype ({model.target.dtype})"
            )
        head = random_draft(model.target, seed=config.seed).eval().requires_grad_(False)
        model = EagleModel(model.target, head, model.tokenizer)
        label = "random (untrained) EAGLE-2 head: no trained head found, EAGLE tau and speedups are not meaningful"
    else:
        label = draft_path
    log(f"target: {target_path}")
    log(f"draft:  {label}")
    models = Models(model, target_path, label, draft_path is None)
    needs_hf = any(m.startswith("hf_") for m in config.methods)
    if needs_hf:
        models.hf = _load_hf(target_path, dtype, config.device)
        _count_forwards(models.hf, models.forwards, "target", models.target_starts)
        _note_dropped_generation_settings(models, "target", target_path, log)
    if "hf_assisted" in config.methods:
        path, how = find_assistant(config, target_path)
        models.assistant = _load_hf(path, dtype, config.device)
        _count_forwards(models.assistant, models.forwards, "assistant")
        _note_dropped_generation_settings(models, "assistant", path, log)
        params = sum(p.numel() for p in models.assistant.parameters())
        models.assistant_info = {
            "path": str(path),
            "how": how,
            "parameters": params,
            "weights_sha256": weights_sha256(path),
        }
        log(f"assistant for hf_assisted: {path} ({how}; {params:,} parameters)")
    return models


def _note_dropped_generation_settings(models: Models, which: str, path, log: Callable[[str], None]) -> None:
    dropped = dropped_generation_settings(path)
    if dropped:
        models.hf_dropped_generation_settings[which] = dropped
        log(f"Hugging Face methods: the {which}'s generation_config.json settings {dropped} are not applied")


def _load_hf(path: str | Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.generation_config = neutral_generation_config(model.generation_config)
    return model


def neutral_generation_config(checkpoint_config):
    """A generation config with transformers' defaults but the checkpoint's bos / pad ids, and no EOS.

    The checkpoint's own ``generation_config.json`` may set a repetition penalty, min_p, beams, ... that
    vanilla and EAGLE decoding do not apply (they decode the target's distribution); generate() would
    apply them, and fills any field a call leaves unset from the model's config, so the model's config
    itself is replaced. EOS is ignored (fixed-length outputs) the same way."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=checkpoint_config.bos_token_id,
        pad_token_id=checkpoint_config.pad_token_id,
        eos_token_id=None,
    )


def dropped_generation_settings(path: str | Path) -> dict:
    """The checkpoint's generation settings the benchmark does not apply (all but the token ids)."""
    from transformers import GenerationConfig

    try:
        own = GenerationConfig.from_pretrained(path).to_diff_dict()
    except OSError:  # no generation_config.json
        return {}
    keep = {"bos_token_id", "pad_token_id", "eos_token_id", "transformers_version", "_from_model_config"}
    return {k: v for k, v in own.items() if k not in keep}


def _count_forwards(
    module: torch.nn.Module, counter: dict[str, int], key: str, starts: list | None = None
) -> None:
    """Count ``module``'s forwards in ``counter[key]``; with ``starts``, also append the first
    position of the first two forwards after ``starts`` was emptied (``cache_position``, or the first
    row's ``position_ids`` as transformers 5 passes them; None when the call has neither), as a
    one-element tensor on the model's device: no host read inside the timed call (on CUDA that would
    be a synchronisation HF's own path does not have). At batch 1, how many positions the cache held
    before each, from which :func:`_first_forward_tokens` tells what the first one emitted."""

    def hook(_module, args, kwargs, _output):
        counter[key] += 1
        if starts is not None and len(starts) < 2:
            position = kwargs.get("cache_position")
            if position is None and kwargs.get("position_ids") is not None:
                position = kwargs["position_ids"][0]
            starts.append(
                None if position is None or position.numel() == 0 else position.reshape(-1)[:1].clone()
            )

    module.register_forward_hook(hook, with_kwargs=True)


def find_assistant(config: BenchConfig, target_path: str) -> tuple[Path, str]:
    """The assistant model of ``hf_assisted`` and how it was obtained: ``--assistant``; else the
    bundled ``tiny-code/assistant`` (for the bundled target); else one derived from the target."""
    if config.assistant is not None:
        path = Path(config.assistant)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"assistant {str(path)!r} has no config.json")
        return path, "given with --assistant"
    bundled = ASSETS / BUNDLED / "assistant"
    if config.target == BUNDLED and (bundled / "config.json").exists():
        return bundled, "the bundled tiny-code assistant"
    work = Path(config.work_dir) if config.work_dir else Path(tempfile.gettempdir()) / "eagle-bench"
    return derive_assistant(target_path, work)


def derive_assistant(target_path: str, work_dir: Path, layers: int = ASSISTANT_LAYERS) -> tuple[Path, str]:
    """A ``layers``-layer model cut from the target: its embedding, first ``layers`` decoder layers,
    final norm and lm_head (no training), saved with transformers under ``work_dir`` and reused while
    the target's files are unchanged."""
    from transformers import AutoModelForCausalLM

    how = f"derived: the target's first {layers} decoder layers + final norm + lm_head, untrained"
    out = work_dir / f"assistant-{layers}layers-{_files_digest(Path(target_path))}"
    if (out / "config.json").exists():
        return out, how + f" (cached in {work_dir})"
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    base = model.get_decoder()
    if len(base.layers) <= layers:
        raise ValueError(
            f"the target has only {len(base.layers)} layers; cannot cut a {layers}-layer assistant"
        )
    base.layers = base.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    work_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=work_dir))
    model.save_pretrained(staging)
    staging.rename(out)
    return out, how + f" (built now, cached in {work_dir})"


def weights_sha256(directory: str | Path | None) -> str | None:
    """SHA-256 (first 16 hex digits) of a checkpoint directory's weight files, so that a result names
    the exact weights it was measured with; None for a hub id or no directory."""
    if directory is None or not Path(directory).is_dir():
        return None
    files = sorted(f for f in Path(directory).iterdir() if f.suffix in (".safetensors", ".bin"))
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16] if files else None


def _files_digest(directory: Path) -> str:
    """A short hash of the checkpoint's location and its files' names, sizes and modification times."""
    h = hashlib.sha256(str(directory.resolve()).encode())
    for f in sorted(directory.iterdir()) if directory.is_dir() else []:
        stat = f.stat()
        h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


# ==================================================================================================
# Methods: each turns a batch of prompts into new tokens and counts target forwards
# ==================================================================================================
@dataclass
class Output:
    """What one call produced: new tokens per row, and decode-phase tokens and forwards per row."""

    tokens: list[list[int]]
    decode_tokens: int  # tokens emitted after the prefill's, summed over rows
    decode_forwards: int  # target forwards after the prefill, summed over rows
    plain_steps: int = 0  # eagle_auto: plain decoding steps among those forwards (per batch)
    rounds: int = 0  # eagle_auto: speculative rounds among them (per batch)
    tree: str | None = None  # the EAGLE methods: the draft tree the call used (tree_label)


def run_method(
    method: str,
    models: Models,
    prompts: list[list[int]],
    new_tokens: int,
    temperature: float,
    seed: int,
    lookup_tokens: int,
    cuda_graph: bool = False,
) -> Output:
    """Generate ``new_tokens`` tokens for each prompt of one batch with ``method``."""
    if method == "vanilla" or method in EAGLE_TREES:
        with warnings.catch_warnings():  # eagle_auto's seeded sampled runs do not repeat: known here
            warnings.filterwarnings("ignore", message="speculative='auto' chooses", category=UserWarning)
            res = models.eagle.generate(
                prompts,
                new_tokens,
                temperature=temperature,
                seed=seed,
                eos_token_id=[],
                speculative="auto" if method == "eagle_auto" else method != "vanilla",
                tree=EAGLE_TREES.get(method, "dynamic"),
                cuda_graph=cuda_graph,
            )
        if any(len(t) != new_tokens for t in res.tokens):  # (EOS is off: every method does the same work)
            raise RuntimeError(
                f"{method} generated {[len(t) for t in res.tokens]} tokens, expected {new_tokens}"
            )
        lengths = [n for row in res.accept_lengths for n in row]
        auto = res.speculation or {}
        return Output(
            res.tokens,
            sum(lengths),
            len(lengths),
            auto.get("plain_steps", 0),
            auto.get("rounds", 0),
            None if res.tree is None else tree_label(res.tree),
        )
    extra: dict = {}
    if method == "hf_prompt_lookup":
        extra = {"prompt_lookup_num_tokens": lookup_tokens}
    elif method == "hf_assisted":
        extra = {"assistant_model": models.assistant}
    return _hf_generate(models, prompts, new_tokens, temperature, seed, extra)


def _hf_generate(
    models: Models, prompts: list[list[int]], new_tokens: int, temperature: float, seed: int, extra: dict
) -> Output:
    hf = models.hf
    pad = _pad_id(hf.config)
    block, mask = left_pad(prompts, pad, hf.device)
    gen_config = copy.deepcopy(hf.generation_config)
    gen_config.update(
        max_new_tokens=new_tokens,
        min_new_tokens=None,
        eos_token_id=None,
        pad_token_id=pad,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=0 if temperature > 0 else None,
        top_p=1.0 if temperature > 0 else None,
    )
    if "prompt_lookup_num_tokens" in extra:
        gen_config.prompt_lookup_num_tokens = extra.pop("prompt_lookup_num_tokens")
    if temperature > 0:
        torch.manual_seed(seed)
    before = models.forwards["target"]
    models.target_starts.clear()
    speculative = bool(extra) or gen_config.prompt_lookup_num_tokens is not None
    with torch.inference_mode():
        out = hf.generate(block, attention_mask=mask, generation_config=gen_config, **extra)
    forwards = models.forwards["target"] - before
    tokens = out[:, block.shape[1] :].tolist()
    if any(len(t) != new_tokens for t in tokens):
        raise RuntimeError(f"transformers generated {[len(t) for t in tokens]} tokens, expected {new_tokens}")
    rows = len(tokens)
    # The first forward of assisted / prompt-lookup decoding verifies candidates with the prompt and
    # may emit several tokens: counting one (as for plain generate) overstated their tau.
    if speculative and rows != 1:
        raise ValueError("transformers' assisted and prompt-lookup decoding run one sequence at a time")
    starts = [None if t is None else int(t) for t in models.target_starts]  # (after the generation)
    first = _first_forward_tokens(starts, block.shape[1]) if speculative else 1
    return Output(tokens, rows * (new_tokens - min(first, new_tokens)), rows * (forwards - 1))


def _first_forward_tokens(starts: list, prompt_len: int) -> int:
    """Tokens the first target forward of a ``generate`` call emitted, from the first cache positions
    of its first two forwards (``starts``, ints): the second forward starts after the prompt and the drafts the first accepted (its bonus
    token is the second's input), so the first emitted ``starts[1] - prompt_len + 1``; 1 when there
    was no second forward (it emitted everything, at most the budget: the caller clips)."""
    if len(starts) < 2:
        return 1 if not starts else 10**9
    if starts[0] != 0 or starts[1] is None or starts[1] < prompt_len:
        raise RuntimeError(
            f"cannot tell what the first target forward emitted from its cache positions {starts[:2]} "
            f"(prompt of {prompt_len} tokens): this transformers version passes neither cache_position "
            "nor position_ids"
        )
    return starts[1] - prompt_len + 1


def _pad_id(config) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids ``[B, T_max]`` int64 and the attention mask ``[B, T_max]`` int64 (1 = real)."""
    width = max(len(p) for p in prompts)
    block = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for b, p in enumerate(prompts):
        block[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return block.to(device), mask.to(device)


# ==================================================================================================
# The benchmark
# ==================================================================================================
@dataclass
class Cell:
    """One (method, batch size, temperature) of the benchmark and its measurements."""

    method: str
    batch: int
    temperature: float
    skipped: str | None = None
    # the EAGLE methods' draft tree in the timed repeats (" / "-joined when tree="dynamic" chose another
    # after refitting the pair's acceptance from earlier runs: eagle.api.EagleModel.accept_rates)
    tree: str | None = None
    warm_trees: set[str] = field(default_factory=set)  # trees this cell has run (warm-up included)
    # timed runs whose tree was new to the cell (its decoder, graph and kernels were built inside the
    # run): (repeat, tree, seconds, re-timed), re-timed at once up to MAX_COLD_RETRIES times in a row
    cold_runs: list[tuple[int, str, float, bool]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    tokens: int = 0  # new tokens per repeat (all batches)
    # per timed repeat, summed over batches: tau's counts, and eagle_auto's plain steps and speculative
    # rounds (per batch). They can differ between repeats: eagle_auto adapts on the clock, and a dynamic
    # tree may change after a refit.
    decode_tokens: list[int] = field(default_factory=list)
    decode_forwards: list[int] = field(default_factory=list)
    plain_steps: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    outputs: list[list[list[list[int]]]] = field(default_factory=list)  # [repeat][batch][row] -> tokens
    mismatches: list[dict] = field(default_factory=list)
    rows_compared: int = 0  # distinct prompt rows (each compared in every repeat)

    def record(self, batch_outputs: list[Output], seconds: float) -> None:
        """Store one timed repeat (in order: the lists are per repeat)."""
        self.seconds.append(seconds)
        self.outputs.append([o.tokens for o in batch_outputs])
        for label in dict.fromkeys(o.tree for o in batch_outputs if o.tree is not None):
            known = self.tree.split(" / ") if self.tree else []
            if label not in known:
                self.tree = " / ".join([*known, label])
        self.tokens = sum(len(t) for o in batch_outputs for t in o.tokens)  # (checked equal in every run)
        self.decode_tokens.append(sum(o.decode_tokens for o in batch_outputs))
        self.decode_forwards.append(sum(o.decode_forwards for o in batch_outputs))
        self.plain_steps.append(sum(o.plain_steps for o in batch_outputs))
        self.rounds.append(sum(o.rounds for o in batch_outputs))


def run_cells(
    config: BenchConfig, models: Models, prompts: list[Prompt], log: Callable[[str], None]
) -> list[Cell]:
    """Warm every method up, then time them: repeats outermost, methods interleaved innermost, in the
    cells' order on even repeats and the reverse on odd ones, so that over a pair of repeats a steady
    drift of the machine's speed charges every method alike (and each repeat's ratio to vanilla
    alternates which side of the drift vanilla ran on)."""
    cells = [
        Cell(m, b, t, skipped=_skip_reason(config, m, b))
        for b in config.batch_sizes
        for t in config.temperatures
        for m in config.methods
    ]
    active = [c for c in cells if c.skipped is None]
    batches = {b: batches_of(prompts, b) for b in config.batch_sizes}
    check_lengths(config, models, prompts)
    log(f"warm-up: {len(active)} method/batch/temperature combinations")
    # The warm-up runs the longest batch at full length: Triton compiles a kernel per launch plan, and
    # the plan depends on the cache's size, so a shorter warm-up left compiles inside the timed runs
    # (CUDA, 2026-11-26: 50 ms per token in the first timed cells). With CUDA graphs the buffers and
    # graph it leaves behind fit every timed call.
    if config.cuda_graph:  # every (tree, batch, sampling) keeps its graph: no re-capture inside a timed run
        combos = len(config.batch_sizes) * len(config.temperatures)
        kinds = {EAGLE_TREES[c.method] for c in active if c.method in EAGLE_TREES}
        trees = len(kinds) + ("dynamic" in kinds)  # + 1: the tree a dynamic refit switches to
        models.eagle.kept_batch_states = max(models.eagle.kept_batch_states, combos * max(1, trees))
    for cell in active:
        longest = max(batches[cell.batch], key=lambda batch: max(len(p.ids) for p in batch))
        outputs, seconds = _run_cell(config, models, [longest], cell, config.new_tokens)
        cell.warm_trees.update(_new_trees(cell, outputs))
        log(f"  warm-up {cell.method} B={cell.batch} T={cell.temperature:g}: {seconds:.2f} s")
    bar = _progress(config, total=len(active) * config.repeats)
    for repeat in range(config.repeats):
        for cell in active if repeat % 2 == 0 else active[::-1]:
            bar.set_description(
                f"repeat {repeat + 1}/{config.repeats} {cell.method} B={cell.batch} T={cell.temperature:g}"
            )
            outputs, seconds = _run_warm(config, models, batches[cell.batch], cell, repeat, log)
            cell.record(outputs, seconds)
            bar.update()
    bar.close()
    return cells


# A timed run is re-timed at most this many times in a row for using a tree new to its cell
MAX_COLD_RETRIES = 3


def _new_trees(cell: Cell, outputs: list[Output]) -> set[str]:
    return {o.tree for o in outputs if o.tree is not None} - cell.warm_trees


def _run_warm(config, models, batches, cell: Cell, repeat: int, log) -> tuple[list[Output], float]:
    """One timed run of ``cell``, re-timed while it used a draft tree the cell had not run before.

    tree="dynamic" refits the pair's acceptance after every run and may then choose another tree
    (eagle.api.EagleModel.accept_rates). The first run of a tree builds its decoder, allocates its
    caches, captures its CUDA graph and compiles kernels for its size: a one-time cost (most likely
    why one of two timed runs on an H100 took 14x the other, 2026-11-27). The cold run is recorded in
    ``cell.cold_runs`` and the run repeated, now warm."""
    for attempt in range(MAX_COLD_RETRIES + 1):
        outputs, seconds = _run_cell(config, models, batches, cell, config.new_tokens)
        cold = _new_trees(cell, outputs)
        if not cold:
            return outputs, seconds
        cell.warm_trees.update(cold)
        label, retime = " / ".join(sorted(cold)), attempt < MAX_COLD_RETRIES
        cell.cold_runs.append((repeat, label, seconds, retime))
        what = "re-timing it" if retime else f"kept: a new tree in each of {attempt + 1} runs in a row"
        log(
            f"  {cell.method} B={cell.batch} T={cell.temperature:g} (repeat {repeat + 1}) ran a tree new to "
            f"it, {label}, in {seconds:.2f} s; {what}"
        )
    return outputs, seconds


def _skip_reason(config: BenchConfig, method: str, batch: int) -> str | None:
    if batch > 1 and method in BATCH_ONE_ONLY:
        return BATCH_ONE_ONLY[method]
    if method == "eagle_auto" and config.cuda_graph:
        return "speculative='auto' does not run with CUDA graphs"
    return None


def tree_label(tree) -> str:
    """``chain(depth=5)``, ``dynamic(depth=6, topk=4, tokens=16)``, ``static(26 tokens)`` (EAGLE-1's
    tree) or ``static(12 tokens, paths 3f2a9c1b)``: two different trees never share a label (the
    re-timing of cold runs in run_cells tells trees apart by it)."""
    if isinstance(tree, eagle.TreeConfig):
        if tree.topk == 1:  # TreeConfig allows a chain only with depth + 1 tokens
            return f"chain(depth={tree.depth})"
        return f"dynamic(depth={tree.depth}, topk={tree.topk}, tokens={tree.total_tokens})"
    default = _default_static_tree()
    if (tree.paths, tree.topk) == (default.paths, default.topk):
        return f"static({tree.num_draft_tokens} tokens)"
    digest = hashlib.sha256(repr((tree.paths, tree.topk)).encode()).hexdigest()[:8]
    return f"static({tree.num_draft_tokens} tokens, paths {digest})"


def _run_cell(config, models, batches, cell: Cell, new_tokens: int) -> tuple[list[Output], float]:
    outputs = []
    sync = torch.cuda.synchronize if models.eagle.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        ids = [p.ids for p in batch]
        outputs.append(
            run_method(
                cell.method,
                models,
                ids,
                new_tokens,
                cell.temperature,
                config.seed + i,
                config.lookup_tokens,
                config.cuda_graph,
            )
        )
    sync()
    return outputs, time.perf_counter() - start


def _progress(config: BenchConfig, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", disable=not config.progress, file=sys.stderr, dynamic_ncols=True)


def check_lengths(config: BenchConfig, models: Models, prompts: list[Prompt]) -> None:
    """Fail before timing anything when a prompt leaves no room for the new tokens and the tree."""
    limit = models.eagle.target.config.max_position_embeddings
    room = MAX_TREE_TOKENS if any(m in EAGLE_TREES for m in config.methods) else 1
    for p in prompts:
        if len(p.ids) + config.new_tokens + room > limit:
            raise ValueError(
                f"prompt {p.source} ({len(p.ids)} tokens) + new_tokens ({config.new_tokens}) + {room} "
                f"exceeds the target's max_position_embeddings={limit}; shorten it or generate fewer tokens"
            )


# ==================================================================================================
# Greedy agreement
# ==================================================================================================
def check_greedy_agreement(cells: list[Cell], models: Models, prompts: list[Prompt]) -> None:
    """At temperature 0, compare every method's tokens with vanilla's (same batch size, same rows,
    same repeat), in every repeat."""
    vanilla = {(c.batch, c.temperature): c for c in cells if c.method == "vanilla" and not c.skipped}
    exact = eagle_is_bit_exact(models.eagle.target)
    for cell in cells:
        ref = vanilla.get((cell.batch, cell.temperature))
        if cell.skipped or cell.temperature != 0 or cell.method == "vanilla" or ref is None:
            continue
        batches = batches_of(prompts, cell.batch)
        cell.rows_compared = sum(len(b) for b in batches)
        strict = exact and cell.method in EAGLE_TREES
        for repeat, (got_batches, want_batches) in enumerate(zip(cell.outputs, ref.outputs)):
            for b, (got, want) in enumerate(zip(got_batches, want_batches)):
                for row, (g, w) in enumerate(zip(got, want)):
                    if g != w:
                        detail = _describe_mismatch(models, batches[b][row], g, w)
                        if strict and detail["near_tie"]:
                            detail["near_tie"] = False
                            detail["why_not_forgiven"] = (
                                "EAGLE is bit-exact on this CPU (packed linears, C++ tree attention): "
                                "no near-tie allowance"
                            )
                        cell.mismatches.append({"repeat": repeat, "batch_index": b, "row": row} | detail)


def eagle_is_bit_exact(target) -> bool:
    """Whether a verified tree gives each token bit for bit the logits plain decoding gives it on this
    machine (README: on CPU, with every linear packed for this package's kernels and the C++ tree
    attention; ``tests/eagle/test_block_invariance.py``): EAGLE's greedy output must then equal
    vanilla's exactly, near-ties included."""
    from eagle.models.cpu_packed import Linear, packed_weight

    if target.device.type != "cpu" or not _ext.has_op("tree_attention"):
        return False
    weights = [m.weight for m in target.modules() if isinstance(m, Linear)] + [target.lm_head_weight]
    return all(packed_weight(w) is not w for w in weights)


# A greedy difference whose two tokens' logits (a re-run forward of vanilla's tokens) are at most this
# many units in the last place of the model dtype apart, in either order, is a rounding near-tie: two correct implementations of
# the same model in bfloat16 (ours and transformers', or a T=1 step and a tree verify) can round
# such a pair either way. It is reported, but does not fail the run.
NEAR_TIE_ULPS = 2


def _ulp(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of ``dtype`` numbers at ``magnitude``."""
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(abs(magnitude), torch.finfo(dtype).tiny)))


def _describe_mismatch(models: Models, prompt: Prompt, got: list[int], want: list[int]) -> dict:
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    gap = diff = ulp = below_top = None
    if at < min(len(got), len(want)):
        logits = _next_logits(models.eagle.target, prompt.ids + want[:at])
        top2 = logits.topk(2).values
        gap = float(top2[0] - top2[1])
        diff = float(logits[want[at]] - logits[got[at]])
        below_top = float(top2[0] - torch.maximum(logits[want[at]], logits[got[at]]))
        ulp = _ulp(models.eagle.target.dtype, float(top2[0]))
    near_tie = diff is not None and abs(diff) <= NEAR_TIE_ULPS * ulp and below_top <= NEAR_TIE_ULPS * ulp
    later = _first_non_greedy(models.eagle.target, prompt.ids, got, at + 1) if near_tie else None
    return {
        "prompt": prompt.source,
        "first_difference_at": at,
        "vanilla_token": want[at] if at < len(want) else None,
        "method_token": got[at] if at < len(got) else None,
        "vanilla_top2_logit_gap": gap,
        "logit_vanilla_minus_method_token": diff,
        "model_dtype_ulp_at_top_logit": ulp,
        "top_logit_minus_pair_best": below_top,
        # Either sign: the re-run forward can round the pair the other way than vanilla's decode did
        # (an H200 bfloat16 run: vanilla's token 1 ulp *below* the method's in the re-run logits). And
        # the pair must be at the top: two tokens close to each other but far below the re-run's best
        # are no rounding tie of the choice.
        "near_tie": near_tie and later is None,
        # After a forgiven flip the method continues its own text: each later token must still be the
        # target's greedy choice (within the same near-tie margin) given the method's own prefix.
        "later_non_greedy_at": later,
    }


def _first_non_greedy(target, prompt: list[int], tokens: list[int], start: int) -> int | None:
    """The first position ``i >= start`` whose token is not the target's greedy choice after
    ``prompt + tokens[:i]`` (beyond a near-tie), by one forward over the whole sequence; None if all are."""
    if start >= len(tokens):
        return None
    ids = prompt + tokens[:-1]
    with torch.inference_mode():
        cache = target.new_cache(1, len(ids))
        logits = target(torch.tensor([ids], device=target.device), cache).logits[0].double().cpu()
    for i in range(start, len(tokens)):
        row = logits[len(prompt) + i - 1]
        top = float(row.max())
        if top - float(row[tokens[i]]) > NEAR_TIE_ULPS * _ulp(target.dtype, top):
            return i
    return None


@torch.inference_mode()
def _next_logits(target, ids: list[int]) -> torch.Tensor:
    """The target's logits ``[V]`` (float64) after the sequence ``ids``."""
    cache = target.new_cache(1, len(ids) + 1)
    block = torch.tensor([ids], device=target.device)
    out = target(block, cache, logits_index=torch.tensor([[len(ids) - 1]], device=target.device))
    return out.logits[0, -1].double().cpu()


# ==================================================================================================
# Report
# ==================================================================================================
def summarize(cells: list[Cell]) -> list[dict]:
    """One JSON row per cell: tokens/s (median and best over repeats), tau, speedup, agreement."""
    rows = []
    vanilla_rows: dict[tuple[int, float], dict] = {}
    for c in cells:
        row: dict = {"method": c.method, "batch": c.batch, "temperature": c.temperature}
        if c.tree:
            row["tree"] = c.tree
        if c.cold_runs:  # timed runs on a tree new to the cell (run_cells); only kept ones are in the figures
            row["cold_runs"] = [
                {"repeat": r, "tree": t, "seconds": s, "retimed": retimed} for r, t, s, retimed in c.cold_runs
            ]
        if c.skipped:
            rows.append(row | {"status": "skipped", "reason": c.skipped})
            continue
        per_repeat = [c.tokens / s for s in c.seconds]
        row |= {
            "status": "ok",
            "tokens_per_s": statistics.median(per_repeat),
            "tokens_per_s_best": max(per_repeat),
            "tokens_per_s_all_repeats": per_repeat,
            "seconds_all_repeats": c.seconds,
            "new_tokens_per_repeat": c.tokens,
            # pooled over the timed repeats, as tokens/s covers all of them
            "tau": sum(c.decode_tokens) / sum(c.decode_forwards) if sum(c.decode_forwards) else None,
            "tau_all_repeats": [t / f if f else None for t, f in zip(c.decode_tokens, c.decode_forwards)],
            "decode_tokens": sum(c.decode_tokens),
            "decode_forwards_per_row_summed": sum(c.decode_forwards),
        }
        if c.method == "eagle_auto":  # how often it chose plain steps (all timed repeats)
            plain, rounds = sum(c.plain_steps), sum(c.rounds)
            row["plain_step_share"] = plain / max(1, plain + rounds)
            row["plain_steps"], row["speculative_rounds"] = plain, rounds
            row["plain_steps_all_repeats"], row["speculative_rounds_all_repeats"] = c.plain_steps, c.rounds
        row["greedy_agreement"] = _agreement(c)
        if c.method == "vanilla":  # the first vanilla cell of a batch size and temperature is the baseline
            vanilla_rows.setdefault((c.batch, c.temperature), row)
        rows.append(row)
    best_peer: dict[tuple[int, float], dict] = {}  # the fastest Hugging Face method per batch and T
    for row in rows:
        key = (row["batch"], row["temperature"])
        if row["status"] == "ok" and row["method"].startswith("hf_"):
            if key not in best_peer or row["tokens_per_s"] > best_peer[key]["tokens_per_s"]:
                best_peer[key] = row
    for row in rows:
        key = (row["batch"], row["temperature"])
        vanilla = vanilla_rows.get(key)
        if row["status"] == "ok":
            row["speedup_vs_vanilla"] = row["tokens_per_s"] / vanilla["tokens_per_s"] if vanilla else None
            if vanilla and row is not vanilla:
                row |= paired_speedups(row["tokens_per_s_all_repeats"], vanilla["tokens_per_s_all_repeats"])
            peer = best_peer.get(key)
            if peer is not None and not row["method"].startswith("hf_"):
                # DESIGN §7: the speedup over the peer a user would pick instead, in the same run
                row["best_hf_method"] = peer["method"]
                row["speedup_vs_best_hf"] = row["tokens_per_s"] / peer["tokens_per_s"]
    return rows


def paired_speedups(method_rates: list[float], vanilla_rates: list[float]) -> dict:
    """Speedup repeat by repeat (``method_rates`` and ``vanilla_rates``: tokens/s of the same repeats,
    in order). Each repeat runs every method once, one after the other (seconds apart when the Hugging
    Face methods run between), so a ratio within a repeat takes in less of the machine's drift than
    the ratio of medians over repeats: session 18's EAGLE dynamic had 1.38x by medians, with vanilla's
    median at 57% of its best, and 1.25x paired. ``speedup_paired``: the median of those ratios;
    ``_min`` / ``_max`` show how far they spread."""
    ratios = [m / v for m, v in zip(method_rates, vanilla_rates, strict=True)]
    return {
        "speedup_paired": statistics.median(ratios),
        "speedup_paired_min": min(ratios),
        "speedup_paired_max": max(ratios),
        "speedup_paired_all_repeats": ratios,
    }


def _agreement(c: Cell) -> dict:
    if c.method == "vanilla":
        return {"checked": False, "reason": "the reference"}
    if c.temperature != 0:
        return {"checked": False, "reason": "sampled (temperature > 0): distributions match, tokens differ"}
    if not c.rows_compared:
        return {"checked": False, "reason": "not checked: vanilla was not run at this batch size"}
    rows = {(m["batch_index"], m["row"]) for m in c.mismatches}
    real = {(m["batch_index"], m["row"]) for m in c.mismatches if not m.get("near_tie")}
    return {
        "checked": True,
        "ok": not real,  # near-tie flips only (see NEAR_TIE_ULPS) still count as agreement
        "rows_compared": c.rows_compared,
        "repeats_compared": min(len(c.outputs), len(c.seconds)),
        "mismatched_rows": len(rows),
        "near_tie_rows": len(rows - real),
        "mismatches": c.mismatches,
    }


def format_table(results: list[dict], assistant: dict | None = None) -> str:
    """The terminal table: one line per method, batch size and temperature (``assistant``: the
    settings' record of hf_assisted's assistant; an untrained one is marked)."""
    weak = bool(assistant and "untrained" in assistant.get("how", ""))
    head = (
        f"{'method':<17} {'B':>3} {'T':>4} {'tok/s':>8} {'best':>8} {'tau':>5} {'speedup':>8} "
        f"{'paired (min-max)':>20} {'vs best HF':>10}  greedy == vanilla"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        name = r["method"] + ("*" if weak and r["method"] == "hf_assisted" else "")
        lead = f"{name:<17} {r['batch']:>3} {r['temperature']:>4g}"
        if r["status"] == "skipped":
            lines.append(f"{lead} {'skipped: ' + r['reason']}")
            continue
        tau = f"{r['tau']:.2f}" if r["tau"] is not None else "-"
        speedup = f"{r['speedup_vs_vanilla']:.2f}x" if r.get("speedup_vs_vanilla") else "-"
        share = f"; plain steps {r['plain_step_share']:.0%}" if "plain_step_share" in r else ""
        if r.get("cold_runs"):
            retimed = sum(c["retimed"] for c in r["cold_runs"])
            kept = len(r["cold_runs"]) - retimed
            share += f"; {retimed} run(s) on a new tree re-timed" + (f", {kept} kept (cold)" if kept else "")
        paired = "-"
        if "speedup_paired" in r:
            paired = (
                f"{r['speedup_paired']:.2f}x ({r['speedup_paired_min']:.2f}-{r['speedup_paired_max']:.2f})"
            )
        rates = f"{r['tokens_per_s']:>8.1f} {r['tokens_per_s_best']:>8.1f} {tau:>5}"
        agreement = _agreement_label(r["greedy_agreement"])
        peer = f"{r['speedup_vs_best_hf']:.2f}x" if r.get("speedup_vs_best_hf") else "-"
        lines.append(f"{lead} {rates} {speedup:>8} {paired:>20} {peer:>10}  {agreement}{share}")
    if assistant and "untrained" in assistant.get("how", ""):
        lines.append(f"hf_assisted*: its assistant is {assistant['how']}: a weak peer, not a tuned one")
    return "\n".join(lines)


def _agreement_label(a: dict) -> str:
    if not a["checked"]:
        if a["reason"] == "the reference":
            return "-"
        return "n/a (sampled)" if "sampled" in a["reason"] else "NOT CHECKED (no vanilla run)"
    if a["ok"] and not a["mismatched_rows"]:
        return f"ok ({a['rows_compared']} rows)"
    if a["ok"]:
        first = a["mismatches"][0]
        return (
            f"ok ({a['rows_compared']} rows; {a['near_tie_rows']} near-tie flip(s), first: {first['prompt']} at "
            f"token {first['first_difference_at']}, logit difference {first['logit_vanilla_minus_method_token']:.2e}"
            f" <= {NEAR_TIE_ULPS} ulp)"
        )
    first = next(m for m in a["mismatches"] if not m.get("near_tie"))
    gap = first["vanilla_top2_logit_gap"]
    gap_text = f", top-2 logit gap {gap:.2e}" if gap is not None else ""
    return (
        f"!!! MISMATCH {a['mismatched_rows']}/{a['rows_compared']} rows "
        f"(first: {first['prompt']} at token {first['first_difference_at']}{gap_text})"
    )


def plot(payload: dict, path: Path) -> Path:
    """Bar charts of speedup vs vanilla and tau, per method and batch size, one column per temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in payload["results"] if r["status"] == "ok"]
    temps = sorted({r["temperature"] for r in payload["results"]})
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    sizes = sorted({r["batch"] for r in payload["results"]})
    fig, axes = plt.subplots(2, len(temps), figsize=(5.5 * len(temps), 7), squeeze=False)
    width = 0.8 / len(sizes)
    for col, temp in enumerate(temps):
        for row, (key, label) in enumerate((("speedup_vs_vanilla", "speedup vs vanilla"), ("tau", "tau"))):
            ax = axes[row][col]
            for k, size in enumerate(sizes):
                values = [_lookup(results, m, size, temp, key) for m in methods]
                xs = [i + (k - (len(sizes) - 1) / 2) * width for i in range(len(methods))]
                bars = ax.bar(xs, [v or 0.0 for v in values], width, label=f"batch {size}")
                ax.bar_label(bars, [f"{v:.2f}" if v else "" for v in values], fontsize=6)
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{label}, temperature {temp:g}", fontsize=10)
            ax.legend(fontsize=7)
    fig.suptitle(_plot_title(payload), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_title(payload: dict) -> str:
    s = payload["settings"]
    lines = [
        f"{s['target_name']} ({s['dtype']}, {s['device']}, {s['threads']} thread(s)): {s['new_tokens']} new "
        f"tokens x {len(s['prompts'])} prompts, median of {s['repeats']} repeat(s)"
    ]
    if s["random_draft"]:
        lines.append("RANDOM (untrained) draft head: the EAGLE bars are not meaningful")
    assistant = s.get("assistant") or {}
    if "untrained" in assistant.get("how", ""):
        lines.append(f"hf_assisted: assistant {assistant['how'].split(' (')[0]}")
    if not payload["greedy_agreement_ok"]:
        lines.append("!!! GREEDY MISMATCH against vanilla: see the JSON")
    warning = extension_warning(payload)
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def extension_warning(payload: dict) -> str | None:
    """A line for the table and the plot when the C++/CUDA extension did not run: the figures are the
    fallback kernels', not the package's (on CPU the speedups can even change direction)."""
    kernels = payload["machine"].get("kernels") or {}
    if kernels.get("extension_loaded", True):
        return None
    return f"!!! the C++/CUDA extension did not run ({kernels.get('extension_status')}): fallback kernels' figures"


def _lookup(results: list[dict], method: str, batch: int, temp: float, key: str):
    for r in results:
        if (r["method"], r["batch"], r["temperature"]) == (method, batch, temp):
            return r.get(key)
    return None


def machine_info() -> dict:
    """Machine, versions and commit from ``bench/utils.py`` of the source checkout (run in the
    checkout so that the commit is this one); a reduced record when the package runs from a wheel."""
    utils = REPO_ROOT / "bench" / "utils.py"
    if not utils.exists():
        import platform

        return {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "commit": None,
            "note": "bench/utils.py not found: not a source checkout",
            "kernels": _ext.runtime_info(),
        }
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench.utils import machine_info as checkout_machine_info

    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        return checkout_machine_info()
    finally:
        os.chdir(cwd)


def uncommitted_files() -> list[str] | None:
    """Tracked files of the checkout that differ from its commit (the result then is not exactly that
    commit's); None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [line[3:] for line in out.splitlines() if line.strip()]


def versions() -> dict:
    import tokenizers
    import transformers

    return {
        "eagle": eagle.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
    }


# ==================================================================================================
# Entry points
# ==================================================================================================
@dataclass
class BenchReport:
    """What :func:`run_benchmark` returns: the JSON payload and where it and the plot were written."""

    payload: dict
    json_path: Path | None  # None with save=False
    png_path: Path | None

    @property
    def greedy_agreement_ok(self) -> bool:
        return self.payload["greedy_agreement_ok"]


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> BenchReport:
    """Run the benchmark described by ``config``; write the JSON (and PNG); return the report."""
    config.validate()
    if config.target != BUNDLED and _is_bundled_target(config.target):
        config = replace(config, target=BUNDLED)  # its head, assistant and name, as by its name
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    dtype = getattr(torch, config.dtype) if config.dtype else eagle.api._default_dtype(device)
    texts = user_prompt_texts(config)
    machine = machine_info() | {"uncommitted_tracked_files": uncommitted_files()}  # the code as it runs
    models = load_models(config, dtype, log)
    prompts, prompt_origin = build_prompts(config, texts, models.eagle.tokenizer)
    log(f"prompts: {len(prompts)} ({prompt_origin}); EOS ignored, {config.new_tokens} new tokens per row")
    cells = run_cells(config, models, prompts, log)
    check_greedy_agreement(cells, models, prompts)
    results = summarize(cells)
    payload = {
        "machine": machine,
        "versions": versions(),
        "settings": _settings(config, models, prompts, prompt_origin, dtype),
        "greedy_agreement_ok": all(
            r["greedy_agreement"].get("ok", True) for r in results if r["status"] == "ok"
        ),
        # False when no row was compared (no vanilla run at T = 0): "ok" then means "not checked"
        "greedy_agreement_checked": any(
            r["greedy_agreement"].get("checked", False) for r in results if r["status"] == "ok"
        ),
        "results": results,
    }
    if not config.save:
        return BenchReport(payload, None, None)
    out_dir = Path(config.out) if config.out else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = config.name or default_name(config, models)
    json_path = out_dir / f"{stem}.json"
    if json_path.exists():
        log(f"replacing {json_path} (--name or --out keep an earlier result; --no-save writes nothing)")
    partial = json_path.with_name(json_path.name + ".partial")  # an interrupted write leaves the old file
    partial.write_text(json.dumps(payload, indent=2))
    os.replace(partial, json_path)
    png_path = None
    if config.plot:
        try:
            png_path = plot(payload, out_dir / f"{stem}.png")
        except ImportError:  # matplotlib comes with the bench / test extras only
            log("no plot: matplotlib is not installed (pip install 'eagle-kernels[bench]')")
    return BenchReport(payload, json_path, png_path)


def target_name(config: BenchConfig, models: Models) -> str:
    """``tiny-code`` for the bundled pair, else the target directory's name."""
    return config.target if config.target == BUNDLED else Path(models.target_path).name


def default_name(config: BenchConfig, models: Models) -> str:
    """``e2e_<target>[_<GPU>][_<dtype>][_draft<dtype>][_cudagraph][_chat][_randomdraft][_quick]``: a GPU run
    does not overwrite the CPU one, the dtype is named when it is not the device's default (the head's
    when it differs from the target's), and a random draft or smoke-test run is never mistaken for a
    final result."""
    device = torch.device(config.device)
    gpu = "_" + torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else ""
    default_dtype = str(eagle.api._default_dtype(device)).removeprefix("torch.")
    dtype = f"_{config.dtype}" if config.dtype and config.dtype != default_dtype else ""
    if config.draft_dtype and config.draft_dtype != (config.dtype or default_dtype):
        dtype += f"_draft{config.draft_dtype}"
    return (
        f"e2e_{target_name(config, models)}{gpu}{dtype}"
        + ("_cudagraph" if config.cuda_graph else "")
        + ("_chat" if config.chat else "")
        + ("_randomdraft" if models.random_draft else "")
        + ("_quick" if config.quick else "")
    )


def _settings(config, models: Models, prompts, prompt_origin: str, dtype) -> dict:
    settings = asdict(config) | {
        "target": models.target_path,
        "target_weights_sha256": weights_sha256(models.target_path),
        "draft_weights_sha256": None if models.random_draft else weights_sha256(models.draft_label),
        "target_name": target_name(config, models),
        "draft": models.draft_label,
        "random_draft": models.random_draft,
        "assistant": models.assistant_info or None,
        "dtype": str(dtype).removeprefix("torch."),
        "draft_dtype": str(models.eagle.head.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "prompt_origin": prompt_origin,
        "prompts": [p.record() for p in prompts],
        "statistic": "tokens/s: median over repeats (best also stored); speedup: ratio of medians; "
        "speedup_paired: median over repeats of the ratio within each repeat (min and max stored)",
        "tau": "tokens emitted per target forward after the prefill, per sequence, pooled over the timed "
        "repeats (tau_all_repeats: each repeat's)",
        "eos": "ignored: every sequence generates exactly new_tokens tokens",
        "hf_assisted_defaults": "transformers' defaults (num_assistant_tokens 20, constant schedule, "
        "assistant_confidence_threshold 0.4, adapted only when scikit-learn is installed)",
        "scikit_learn_installed": importlib.util.find_spec("sklearn") is not None,
        "hf_generation_config": "transformers' defaults (the checkpoints' generation_config.json is not "
        "applied, as vanilla and EAGLE do not apply it)",
        "hf_dropped_generation_settings": models.hf_dropped_generation_settings,
    }
    settings.pop("prompts_file", None)
    settings["prompts_file"] = config.prompts_file
    settings["prompts_file_sha256"] = (
        hashlib.sha256(Path(config.prompts_file).read_bytes()).hexdigest() if config.prompts_file else None
    )
    settings.pop("progress")
    # what ran, beside what was asked (a cap over user prompts may exceed how many were given)
    settings["num_prompts_requested"] = config.num_prompts
    settings["num_prompts"] = len(prompts)
    return settings


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A :class:`BenchConfig` from parsed options; ``--quick`` changes the defaults, explicit options win."""
    defaults = BenchConfig(**QUICK) if args.quick else BenchConfig()  # explicit options override these
    chosen = {
        "methods": tuple(args.methods) if args.methods else None,
        "batch_sizes": tuple(args.batch) if args.batch else None,
        "temperatures": tuple(args.temperature) if args.temperature else None,
        "new_tokens": args.new_tokens,
        "num_prompts": args.num_prompts,
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
    }
    config = BenchConfig(
        **{k: (v if v is not None else getattr(defaults, k)) for k, v in chosen.items()},
        target=args.target,
        draft=args.draft,
        assistant=args.assistant,
        prompts=tuple(args.prompt),
        prompts_file=args.prompts_file,
        chat=args.chat,
        out=args.out,
        name=args.name,
        threads=args.threads,
        device=args.device,
        cuda_graph=args.cuda_graph,
        dtype=args.dtype,
        draft_dtype=args.draft_dtype,
        seed=args.seed,
        lookup_tokens=args.lookup_tokens,
        work_dir=args.work_dir,
        progress=not args.no_progress,
        plot=not args.no_plot and not args.no_save,
        save=not args.no_save,
        quick=args.quick,
    )
    return config


def run_from_args(args: argparse.Namespace) -> int:
    """Run from parsed options, print the table; exit status 1 when the greedy check failed.

    The dynamic tree is timed afresh in each run, as every run before the probe's disk cache was
    (``EAGLE_AUTOTREE_CACHE`` defaults to 0 here; 1 takes the saved timings)."""
    os.environ.setdefault("EAGLE_AUTOTREE_CACHE", "0")
    report = run_benchmark(config_from_args(args))
    print(format_table(report.payload["results"], report.payload["settings"].get("assistant")))
    warning = extension_warning(report.payload)
    if warning:
        print(warning)
    print(
        f"tokens/s: median over {report.payload['settings']['repeats']} repeats; "
        "speedup = median / vanilla's; paired = median of the repeats' own ratios (their min-max)"
    )
    if report.json_path is not None:
        print(f"wrote {report.json_path}" + (f" and {report.png_path}" if report.png_path else ""))
    if not report.greedy_agreement_ok:
        print("!!! GREEDY MISMATCH: some method's temperature-0 tokens differ from vanilla's (see above)")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eagle bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))
