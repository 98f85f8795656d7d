"""Load time and peak memory of ``eagle.models.load_target`` (Linux: /proc/self/status), each load in
a fresh process, for one or more checkouts of the package (each with its extension built in place).

    python bench/load_memory.py --make 1024,4096,12,32000        # a random bf16 Llama checkpoint
    python bench/load_memory.py --target /tmp/eagle-load-ckpt --checkouts /tmp/old . --dtypes bfloat16 float32

``--make H,I,L,V`` writes a random Llama checkpoint (hidden H, intermediate I, L layers, vocabulary V,
bfloat16 safetensors, as the hub's are) to ``--target`` (default /tmp/eagle-load-ckpt) and exits.
Otherwise each (round, checkout, dtype) loads the target in a new process and reports seconds, the
peak RSS above the process's RSS before the load (VmHWM), and the anonymous and file-backed RSS after
it: file-backed pages that stay are views of the checkpoint file the model kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from eagle.models import load_target
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
base = status("VmRSS")
t0 = time.perf_counter()
model = load_target(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_over_start_MB": status("VmHWM") - base,
                  "anon_MB": status("RssAnon"), "file_MB": status("RssFile")}))
"""


def make_checkpoint(path: Path, spec: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, vocab = (int(x) for x in spec.split(","))
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64,
        vocab_size=vocab, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    print(f"wrote {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters")


def measure(checkout: Path, target: Path, dtype: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(target), dtype],
        cwd="/tmp",
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{checkout} {dtype}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=Path("/tmp/eagle-load-ckpt"))
    parser.add_argument("--make", metavar="H,I,L,V", help="write a random checkpoint to --target and exit")
    parser.add_argument("--checkouts", type=Path, nargs="+", default=[REPO])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    if args.make:
        make_checkpoint(args.target, args.make)
        return
    if not (args.target / "config.json").is_file():
        parser.error(f"{args.target} holds no checkpoint: make one with --make")
    rows = []
    for r in range(args.rounds):
        for checkout in args.checkouts if r % 2 == 0 else args.checkouts[::-1]:
            for dtype in args.dtypes:
                row = {"round": r, "checkout": str(checkout.resolve()), "dtype": dtype}
                row |= measure(checkout.resolve(), args.target, dtype)
                rows.append(row)
                print(
                    f"{checkout} {dtype:9s} load {row['seconds']:.2f} s, peak {row['peak_over_start_MB']:.0f} MB "
                    f"over start; after: anon {row['anon_MB']:.0f} MB, file-backed {row['file_MB']:.0f} MB",
                    flush=True,
                )
    if args.out:
        size = sum(f.stat().st_size for f in args.target.glob("*.safetensors"))
        args.out.write_text(
            json.dumps({"target": str(args.target), "file_bytes": size, "rows": rows}, indent=1)
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
