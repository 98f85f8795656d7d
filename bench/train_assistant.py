"""Distil the assistant model of ``eagle bench``'s ``hf_assisted`` from the bundled target.

Hugging Face assisted generation needs a small model with the target's tokenizer. The bench used to
cut one from the target (its embedding, first decoder layers, final norm and lm_head) and use it
untrained: tau 1.14-1.22 in the stored e2e runs, a weak peer. This script starts from that cut and trains it to match the
target's next-token distribution (KL(target || assistant) at every position, soft labels) on windows
of the standard library's *training* files (the held-out files the benchmark prompts come from are
never seen), for a wall-clock budget, then writes it where ``eagle bench`` looks for the bundled
assistant::

    python bench/train_assistant.py                         # eagle/assets/tiny-code/assistant, 8 minutes
    python bench/train_assistant.py --minutes 2 --out /tmp/a # a quick one elsewhere

The model card it writes records the settings, the tokens seen and the held-out agreement (top-1
with the target, and the KL) before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eagle.api import ASSETS, BUNDLED  # noqa: E402
from eagle.bench import ASSISTANT_LAYERS, derive_assistant  # noqa: E402
from eagle.train.corpus import DEFAULT_VAL_FRACTION, collect_sources, split_sources  # noqa: E402

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def token_stream(tokenizer, sources) -> np.ndarray:
    """The files' tokens, concatenated (uint16: the bundled vocabulary has 2048 tokens)."""
    ids = [tokenizer(s.text, add_special_tokens=False, verbose=False)["input_ids"] for s in sources]
    return np.concatenate([np.asarray(i, dtype=np.uint16) for i in ids if i])


def windows(stream: np.ndarray, count: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, len(stream) - seq_len, count)
    return torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int64))


def distill_loss(student, target, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean KL(target || student) per position, and the top-1 agreement (no gradient)."""
    with torch.no_grad():
        p_logits = target(ids).logits.float()
    q_logits = student(ids).logits.float()
    log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    agree = (q_logits.argmax(-1) == p_logits.argmax(-1)).float().mean()
    return kl, agree.detach()


@torch.no_grad()
def evaluate(student, target, batches: list[torch.Tensor]) -> dict:
    kls, agrees = zip(*(distill_loss(student, target, b) for b in batches))
    return {"kl": float(torch.stack(kls).mean()), "top1_agreement": float(torch.stack(agrees).mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=str(ASSETS / BUNDLED / "target"))
    p.add_argument("--out", default=str(ASSETS / BUNDLED / "assistant"))
    p.add_argument("--layers", type=int, default=ASSISTANT_LAYERS)
    p.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_dir, out = Path(args.target), Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    train_files, val_files = split_sources(collect_sources(None), DEFAULT_VAL_FRACTION)
    train, val = token_stream(tokenizer, train_files), token_stream(tokenizer, val_files)
    rng = np.random.default_rng(args.seed)
    val_batches = [windows(val, args.batch, args.seq_len, rng) for _ in range(4)]

    cut_dir, how = derive_assistant(str(target_dir), Path(tempfile.gettempdir()) / "eagle-bench", args.layers)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(cut_dir, dtype=torch.float32).train()
    target.requires_grad_(False)
    before = evaluate(student.eval(), target, val_batches)
    student.train()
    print(f"[assistant] {how}; held-out before: {before}", flush=True)

    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    budget, start, step = args.minutes * 60.0, time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < budget:
        progress = elapsed / budget  # a cosine over the time budget, after a linear warm-up
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        kl, agree = distill_loss(student, target, windows(train, args.batch, args.seq_len, rng))
        optimizer.zero_grad(set_to_none=True)
        kl.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            print(
                f"[assistant] step {step} ({elapsed:.0f} s): kl {kl.item():.3f}, top-1 {agree.item():.3f}",
                flush=True,
            )
    seconds = time.perf_counter() - start
    after = evaluate(student.eval(), target, val_batches)
    print(f"[assistant] {step} steps in {seconds:.0f} s; held-out after: {after}", flush=True)

    if out.exists():
        shutil.rmtree(out)
    student.half().save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (target_dir / name).exists():
            shutil.copy(target_dir / name, out / name)
    params = sum(p.numel() for p in student.parameters())
    record = {
        "derived_from": f"cut from the target (its embedding, first {args.layers} decoder layers, final norm and lm_head)",
        "parameters": params,
        "steps": step,
        "seconds": round(seconds, 1),
        "tokens_seen": step * args.batch * args.seq_len,
        "settings": vars(args) | {"target": str(target_dir), "out": str(out)},
        "heldout_before": before,
        "heldout_after": after,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(_card(record))
    return 0


def _card(r: dict) -> str:
    s = r["settings"]
    return f"""# tiny-code assistant (for `eagle bench`'s `hf_assisted`)

A {r["parameters"]:,}-parameter Llama with the target's tokenizer, {r["derived_from"]}, then
distilled from the target (KL(target || assistant) at every position) on {r["tokens_seen"]:,} tokens of windows of
the standard library's training files ({r["steps"]} steps of {s["batch"]} x {s["seq_len"]} tokens,
{r["seconds"]:.0f} s on {r["torch_threads"]} CPU thread(s), AdamW lr {s["lr"]}, cosine over the time
budget). The held-out files the benchmark's prompts come from were not seen.

Held-out windows ({s["batch"] * 4} of {s["seq_len"]} tokens), against the target:

| | KL(target \\|\\| assistant) | top-1 agreement |
|---|---:|---:|
| before (the untrained cut) | {r["heldout_before"]["kl"]:.3f} | {r["heldout_before"]["top1_agreement"]:.3f} |
| after | {r["heldout_after"]["kl"]:.3f} | {r["heldout_after"]["top1_agreement"]:.3f} |

Reproduce: `python bench/train_assistant.py --minutes {s["minutes"]:g} --threads {r["torch_threads"]}`
(time-budgeted: the step count depends on the machine). `training.json` has every setting.
"""


if __name__ == "__main__":
    sys.exit(main())
