"""One command that reproduces the bundled ``tiny-code`` pair from scratch.

Stages, each skipped when its output already exists in the work directory (so an interrupted run
resumes; pretraining resumes from its own checkpoint):

1. ``target``: tokenizer + token files (:func:`eagle.train.pretrain.prepare_data`), pretraining
   (:func:`eagle.train.pretrain.train`), and the export of the best-validation weights to
   ``WORK/pair/target`` (Hugging Face layout, fp16, model card).
2. ``features``: the target's final-norm features over windows of the training split
   (:mod:`eagle.train.features`, ``--source corpus``).
3. ``head``: an EAGLE-2 head trained on them (:mod:`eagle.train.head`), saved in fp16 to
   ``WORK/pair/draft`` with a model card.
4. ``tau``: the pair's mean accepted length on held-out standard-library files (dynamic tree, greedy,
   ``tau_new_tokens`` new tokens after the first ``tau_prompt_tokens`` tokens of each file).
5. ``acceptance``: the pair's per-token acceptance and widening gain, greedy and at T = 1, on the same
   files (:mod:`eagle.acceptance`), written to ``WORK/pair/draft/acceptance.json``: the prior of
   ``tree="dynamic"`` when the pair is loaded.

``--install DIR`` then copies the pair to ``DIR/target`` and ``DIR/draft`` (the package's copy lives
in ``eagle/assets/tiny-code``). Each stage's wall time goes to ``WORK/summary.json`` and the cards.

    eagle train tiny-code --work /root/eagle-work/tiny-code --device cuda --install eagle/assets/tiny-code
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from eagle.train import features as features_mod
from eagle.train import head as head_mod
from eagle.train import pretrain
from eagle.train.corpus import DEFAULT_VAL_FRACTION, collect_sources, split_sources
from eagle.tree import TreeConfig

SUMMARY_NAME = "summary.json"
PAPER_TREE = TreeConfig(depth=6, topk=10, total_tokens=60)  # EAGLE-2's default dynamic tree


@dataclass
class TinyCodeConfig:
    """Settings of the whole pipeline. The defaults reproduce the bundled pair (on a GPU)."""

    work: Path
    device: str = "cpu"
    corpus_root: Path | None = None  # default: this Python's standard library
    val_fraction: float = DEFAULT_VAL_FRACTION  # held-out share of the corpus files
    # target
    target: pretrain.ModelConfig = field(default_factory=pretrain.ModelConfig)
    batch_size: int = 64
    seq_len: int = 512
    lr: float = 2e-3
    warmup_tokens: int = 3_000_000
    max_tokens: int = 80_000_000
    fit_schedule_s: float | None = None  # size the cosine schedule to this much training time
    eval_every_tokens: int = 4_000_000
    # features and head
    feature_tokens: int = 4_000_000
    feature_seq_len: int = 256
    head_epochs: int = 4
    head_batch: int = 32
    head_lr: float = 1.5e-3
    head_unroll_steps: int = 1  # > 1: training-time test over this many draft levels (eagle.train.head)
    head_tau_new_tokens: int = 64  # per-epoch tau of the head's own validation
    # held-out tau
    tau_files: int = 16
    tau_prompt_tokens: int = 128
    tau_new_tokens: int = 128

    def validate(self) -> None:
        """Refuse, before the target trains, lengths that a later stage would refuse: every stage
        runs on the target, whose max_position_embeddings is ``seq_len``."""
        head = head_mod.HeadTrainConfig()  # train_draft keeps its prompt length and tree
        needs = {
            "--feature-seq-len": self.feature_seq_len,
            "the head's per-epoch tau (its prompt + --head-tau-new-tokens + its tree)": min(
                head.tau_prompt_len, self.feature_seq_len
            )
            + self.head_tau_new_tokens
            + head.tau_tree[2],
            "the held-out tau (--tau-prompt-tokens + --tau-new-tokens)": self.tau_prompt_tokens
            + self.tau_new_tokens,
        }
        too_long = [f"{what} needs {n}" for what, n in needs.items() if n > self.seq_len]
        if too_long:
            raise ValueError(
                f"--seq-len {self.seq_len} is the target's max_position_embeddings, but "
                + "; ".join(too_long)
                + ": raise --seq-len or lower those"
            )


def _timed(summary: dict, stage: str, fn) -> None:
    """Run ``fn`` unless ``stage`` is recorded as done; record its wall time and save the summary."""
    if stage in summary["stages"]:
        print(f"[tiny-code] {stage}: done earlier ({summary['stages'][stage]['seconds']:.0f} s), skipped")
        return
    print(f"[tiny-code] {stage} ...", flush=True)
    t0 = time.time()
    extra = fn() or {}
    summary["stages"][stage] = {"seconds": round(time.time() - t0, 1), **extra}
    _save_summary(summary)


def _save_summary(summary: dict) -> None:
    path = Path(summary["work"]) / SUMMARY_NAME
    path.write_text(json.dumps(summary, indent=1, default=str))


def _load_summary(cfg: TinyCodeConfig) -> dict:
    path = cfg.work / SUMMARY_NAME
    if path.is_file():
        return json.loads(path.read_text())
    return {"work": str(cfg.work), "config": asdict(cfg), "stages": {}}


def train_target(cfg: TinyCodeConfig) -> dict:
    """Tokenizer, token files, pretraining and the best-validation export to ``WORK/pair/target``."""
    work = cfg.work / "target"
    meta = pretrain.prepare_data(
        work, cfg.corpus_root, cfg.target.vocab_size, cfg.val_fraction, model_max_length=cfg.seq_len
    )
    model_cfg = pretrain.ModelConfig(
        **{**asdict(cfg.target), "vocab_size": meta["vocab_size"], "max_position_embeddings": cfg.seq_len}
    )
    train_cfg = pretrain.TrainConfig(
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens,
        lr=cfg.lr,
        min_lr=cfg.lr / 10,
        warmup_tokens=cfg.warmup_tokens,
        fit_schedule_s=cfg.fit_schedule_s,
        eval_every_tokens=cfg.eval_every_tokens,
        device=cfg.device,
    )
    resume = (work / pretrain.CHECKPOINT_NAME).is_file()
    pretrain.train(
        work, model_cfg, train_cfg, resume=resume, install_signal_handlers=True, command=_command_line()
    )
    record = pretrain.export(
        work, cfg.work / "pair" / "target", in_progress=False, from_best=True, command=_command_line()
    )
    return {"val_loss": record["val_loss_exported"], "tokens_seen": record["tokens_seen"]}


def dump_features(cfg: TinyCodeConfig) -> dict:
    argv = [
        "--target", str(cfg.work / "pair" / "target"),
        "--tokens", str(cfg.work / "target" / "train.npy"),
        "--out", str(cfg.work / "features"),
        "--source", "corpus",
        "--seq-len", str(cfg.feature_seq_len),
        "--max-tokens", str(cfg.feature_tokens),
        "--batch", "64",
        "--device", cfg.device,
        "--quiet",
    ]  # fmt: skip
    if features_mod.main(argv) != 0:
        raise RuntimeError("feature dump failed")
    return {}


def train_draft(cfg: TinyCodeConfig) -> dict:
    out = cfg.work / "head"
    argv = [
        "--target", str(cfg.work / "pair" / "target"),
        "--data", str(cfg.work / "features"),
        "--out", str(out),
        "--epochs", str(cfg.head_epochs),
        "--batch", str(cfg.head_batch),
        "--lr", str(cfg.head_lr),
        "--device", cfg.device,
        "--save-dtype", "float16",
        "--tau-new-tokens", str(cfg.head_tau_new_tokens),
        "--unroll-steps", str(cfg.head_unroll_steps),
    ]  # fmt: skip
    if (out / "training_state.pt").is_file():
        argv.append("--resume")
    if head_mod.main(argv) != 0:
        raise RuntimeError("head training failed")
    draft = cfg.work / "pair" / "draft"
    draft.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(out / name, draft / name)
    shutil.copy(out / "metrics.jsonl", draft / "training_metrics.jsonl")
    epochs = [r for r in _read_jsonl(out / "metrics.jsonl") if "tau" in r]
    return {"epochs": epochs}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def heldout_prompts(
    tokenizer, n_files: int, prompt_tokens: int, corpus_root=None, val_fraction: float = DEFAULT_VAL_FRACTION
) -> list[list[int]]:
    """The first ``prompt_tokens`` tokens of the first ``n_files`` held-out files (sorted by path)
    that are long enough, so the pair continues real unseen code (fewer where fewer are)."""
    if isinstance(n_files, bool) or not isinstance(n_files, int) or n_files < 1:
        raise ValueError(f"n_files must be a positive int, got {n_files!r}")
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be a positive int, got {prompt_tokens!r}")
    _, val = split_sources(collect_sources(corpus_root), val_fraction)
    prompts = []
    for source in sorted(val, key=lambda s: s.relpath):
        ids = tokenizer(source.text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= 2 * prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == n_files:
            break
    if not prompts:
        raise ValueError(f"no held-out file has {2 * prompt_tokens} tokens")
    return prompts


def measure_heldout_tau(
    target_dir: Path | str,
    draft_dir: Path | str,
    n_files: int = 16,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    corpus_root=None,
    device: str = "cpu",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    tree: TreeConfig = PAPER_TREE,
) -> dict:
    """Mean accepted length of the pair on held-out files, greedy, one prompt at a time.

    ``tree``: a fixed dynamic tree, by default EAGLE-2's paper setting (depth 6, top-k 10, 60 tokens),
    so the figure describes the head, not this machine's speed-optimal tree (``tree="dynamic"`` times
    forwards and may pick smaller trees on a CPU)."""
    import eagle
    from eagle.acceptance import measure_tau

    model = eagle.load(str(target_dir), str(draft_dir), device=device)
    prompts = heldout_prompts(model.tokenizer, n_files, prompt_tokens, corpus_root, val_fraction)
    return {
        "tau": measure_tau(model, prompts, tree, 0.0, new_tokens),
        "prompts": len(prompts),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "tree": f"dynamic tree (depth {tree.depth}, top-k {tree.topk}, {tree.total_tokens} tokens)",
        "temperature": 0.0,
    }


def measure_heldout_acceptance(cfg: TinyCodeConfig, target_dir: Path, draft_dir: Path) -> dict:
    """Measure the pair's acceptance on the tau stage's held-out prompts and write ``acceptance.json``
    into ``draft_dir``; returns what it wrote (fits and the measured taus)."""
    import eagle
    from eagle.acceptance import measure_pair_acceptance, write_pair_acceptance

    model = eagle.load(str(target_dir), str(draft_dir), device="cpu")
    prompts = heldout_prompts(
        model.tokenizer, cfg.tau_files, cfg.tau_prompt_tokens, cfg.corpus_root, cfg.val_fraction
    )
    pair, record = measure_pair_acceptance(model, prompts, cfg.tau_new_tokens)
    record["source"] = f"the first {cfg.tau_prompt_tokens} tokens of {len(prompts)} held-out files"
    write_pair_acceptance(draft_dir, pair, record)
    return {
        "greedy": {"accept_rate": pair.greedy.accept_rate, "gain": pair.greedy.gain},
        "sampled": {"accept_rate": pair.sampled.accept_rate, "gain": pair.sampled.gain},
    }


def draft_card(summary: dict) -> str:
    """MODEL_CARD.md of the head, from the pipeline summary (numbers only from the summary)."""
    c, st = summary["config"], summary["stages"]
    head_cfg = json.loads((Path(summary["work"]) / "pair" / "draft" / "config.json").read_text())
    rows = "\n".join(
        f"| {e['epoch'] + 1} | {e['step']} | {e['val_v_loss']:.4f} | {e['val_p_loss']:.4f} | "
        f"{e['val_top1']:.3f} | {e['tau']:.2f} |"
        for e in st["head"]["epochs"]
    )
    tau = st.get("tau", {})
    times = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in st.items())
    return f"""# tiny-code draft (EAGLE-2 head)

The EAGLE-1/2 draft head of the bundled `tiny-code` target (`../target`), trained with this package's
pipeline (`eagle train features` + `eagle train head`).

## Architecture
EAGLE-1/2 layout: `fc` ({2 * head_cfg["hidden_size"]} -> {head_cfg["hidden_size"]}, with bias) over
`cat(embedding(token t+1), feature t)`, then one Llama decoder layer (hidden {head_cfg["hidden_size"]},
{head_cfg["num_attention_heads"]} query / {head_cfg["num_key_value_heads"]} KV heads, SwiGLU MLP
{head_cfg["intermediate_size"]}); the embedding and the LM head are the target's, frozen (the embedding is stored as the official layout has it; the LM head is not).
Stored in float16.

## Data
The target's final-norm features over {c["feature_tokens"]:,} tokens of its own training split (windows of
{c["feature_seq_len"]} tokens, `--source corpus`), each feature paired with the next token (EAGLE's shift).

## Training
EAGLE-1/2 recipe: SmoothL1 on the next feature + 0.1 x cross-entropy between the target head's
distributions on the true and predicted features, uniform noise on input features, AdamW (0.9, 0.95),
warm-up then cosine decay, gradient clipping; {c["head_epochs"]} epochs, batch {c["head_batch"]} sequences,
peak LR {c["head_lr"]}, bf16 autocast, on {c["device"]}.{_unroll_line(_trained_unroll_steps(st["head"]["epochs"]))} Validation on
5% of the feature sequences:

| epoch | step | val feature loss | val token loss | top-1 agreement | tau (tree 5/8/32) |
|---:|---:|---:|---:|---:|---:|
{rows}

## Acceptance on held-out standard-library code
{_tau_line(tau)}
{_acceptance_line(st.get("acceptance"))}

## Reproduce
```bash
{summary.get("command", "eagle train tiny-code")}
```
Stage wall times of that run: {times}.
"""


def _trained_unroll_steps(epochs: list[dict]) -> int:
    """The unrolled steps the head trained with, from its validation records (one top-1 per step), so
    that a resumed run, whose checkpoint's settings win, is described as it ran."""
    return len(epochs[-1].get("val_top1_by_step", [None])) if epochs else 1


def _unroll_line(steps: int) -> str:
    if steps <= 1:
        return ""
    return (
        f" Training-time test over {steps} draft levels (`--unroll-steps {steps}`): each level is also fed"
        " the head's own prediction of the feature before it, weighted 0.8 per level."
    )


def _tau_line(tau: dict) -> str:
    if not tau:
        return "Not measured yet."
    return (
        f"tau = **{tau['tau']:.2f}** tokens per target forward: EAGLE-2 {tau.get('tree', 'dynamic tree')}, "
        f"greedy, {tau['new_tokens']} new tokens after the first {tau['prompt_tokens']} tokens of each of "
        f"{tau['prompts']} held-out files (`eagle.train.tinycode.measure_heldout_tau`)."
    )


def _acceptance_line(fits: dict | None) -> str:
    if not fits:
        return ""
    g, s = fits["greedy"], fits["sampled"]
    return (
        f'\n`acceptance.json` (`eagle.acceptance`, the prior of `tree="dynamic"`): per-token acceptance '
        f"{g['accept_rate']:.3f} greedy and {s['accept_rate']:.3f} at T = 1, widening gain {g['gain']:.3f} / "
        f"{s['gain']:.3f}, from chains and 16-token trees of depths 3 and 5 on the same files."
    )


def _command_line() -> str:
    return "eagle train tiny-code " + " ".join(sys.argv[1:]) if sys.argv else "eagle train tiny-code"


def run(cfg: TinyCodeConfig, install: Path | None = None) -> dict:
    """Run (or resume) every stage; returns the summary (also in ``WORK/summary.json``)."""
    cfg.validate()
    cfg.work.mkdir(parents=True, exist_ok=True)
    summary = _load_summary(cfg)
    summary.setdefault("command", _command_line())
    summary["hardware"] = (
        torch.cuda.get_device_name(torch.device(cfg.device))
        if torch.device(cfg.device).type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    t0 = time.time()
    _timed(summary, "target", lambda: train_target(cfg))
    _timed(summary, "features", lambda: dump_features(cfg))
    _timed(summary, "head", lambda: train_draft(cfg))
    pair = cfg.work / "pair"
    _timed(
        summary,
        "tau",
        lambda: measure_heldout_tau(
            pair / "target",
            pair / "draft",
            cfg.tau_files,
            cfg.tau_prompt_tokens,
            cfg.tau_new_tokens,
            cfg.corpus_root,
            val_fraction=cfg.val_fraction,
        ),
    )
    _timed(summary, "acceptance", lambda: measure_heldout_acceptance(cfg, pair / "target", pair / "draft"))
    summary["total_seconds"] = round(sum(s["seconds"] for s in summary["stages"].values()), 1)
    summary["this_run_seconds"] = round(time.time() - t0, 1)
    (pair / "draft" / "MODEL_CARD.md").write_text(draft_card(summary))
    _save_summary(summary)
    if install is not None:
        install_pair(pair, install)
    return summary


def install_pair(pair: Path, dest: Path) -> None:
    """Replace ``dest/target`` and ``dest/draft`` by the pair's (copy, then rename over)."""
    for name in ("target", "draft"):
        tmp = dest / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(pair / name, tmp)
        shutil.rmtree(dest / name, ignore_errors=True)
        tmp.rename(dest / name)


def build_parser() -> argparse.ArgumentParser:
    d = TinyCodeConfig(work=Path("."))
    m = pretrain.ModelConfig()
    p = argparse.ArgumentParser(prog="eagle train tiny-code", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="work directory (resumable)")
    p.add_argument("--device", default=d.device, help="cpu or cuda (a GPU takes minutes, a CPU hours)")
    p.add_argument("--corpus-root", type=Path, default=None, help="default: this Python's stdlib")
    p.add_argument("--install", type=Path, default=None, help="copy the pair to DIR/{target,draft}")
    p.add_argument("--layers", type=int, default=m.num_hidden_layers)
    p.add_argument("--hidden-size", type=int, default=m.hidden_size)
    p.add_argument("--intermediate-size", type=int, default=m.intermediate_size)
    p.add_argument("--heads", type=int, default=m.num_attention_heads)
    p.add_argument("--kv-heads", type=int, default=m.num_key_value_heads)
    p.add_argument("--vocab-size", type=int, default=m.vocab_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-tokens", type=int, default=d.warmup_tokens)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument(
        "--fit-schedule-s",
        type=float,
        default=None,
        help="size the target's schedule to this many seconds of training (default: 90 on CUDA; "
        "on CPU none: train to --max-tokens, which takes hours); 0 turns it off",
    )
    p.add_argument("--eval-every-tokens", type=int, default=d.eval_every_tokens)
    p.add_argument("--feature-tokens", type=int, default=d.feature_tokens)
    p.add_argument("--feature-seq-len", type=int, default=d.feature_seq_len)
    p.add_argument("--head-epochs", type=int, default=d.head_epochs)
    p.add_argument("--head-batch", type=int, default=d.head_batch)
    p.add_argument("--head-lr", type=float, default=d.head_lr)
    p.add_argument(
        "--head-unroll-steps",
        type=int,
        default=d.head_unroll_steps,
        help="train the head on its own drafted features too, over this many draft levels",
    )
    p.add_argument("--head-tau-new-tokens", type=int, default=d.head_tau_new_tokens)
    p.add_argument("--tau-files", type=int, default=d.tau_files)
    p.add_argument("--tau-prompt-tokens", type=int, default=d.tau_prompt_tokens)
    p.add_argument("--tau-new-tokens", type=int, default=d.tau_new_tokens)
    return p


def _fit_schedule(seconds: float | None, device: str) -> float | None:
    if seconds is None:
        return 90.0 if torch.device(device).type == "cuda" else None
    return seconds or None


def config_from_args(args: argparse.Namespace) -> TinyCodeConfig:
    return TinyCodeConfig(
        work=args.work,
        device=args.device,
        corpus_root=args.corpus_root,
        target=pretrain.ModelConfig(
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
        ),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_tokens=args.warmup_tokens,
        max_tokens=args.max_tokens,
        fit_schedule_s=_fit_schedule(args.fit_schedule_s, args.device),
        eval_every_tokens=args.eval_every_tokens,
        feature_tokens=args.feature_tokens,
        feature_seq_len=args.feature_seq_len,
        head_epochs=args.head_epochs,
        head_batch=args.head_batch,
        head_lr=args.head_lr,
        head_unroll_steps=args.head_unroll_steps,
        head_tau_new_tokens=args.head_tau_new_tokens,
        tau_files=args.tau_files,
        tau_prompt_tokens=args.tau_prompt_tokens,
        tau_new_tokens=args.tau_new_tokens,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    try:
        cfg.validate()
    except ValueError as e:
        print(f"eagle train tiny-code: error: {e}", file=sys.stderr)
        return 2
    summary = run(cfg, args.install)
    stages = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in summary["stages"].items())
    print(
        f"[tiny-code] done in {summary['total_seconds']:.0f} s ({stages}); target val loss "
        f"{summary['stages']['target']['val_loss']:.3f} nats/token, held-out tau "
        f"{summary['stages']['tau']['tau']:.2f}; pair in {args.work / 'pair'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
