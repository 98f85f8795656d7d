"""What a round's verify forward costs on this CPU with this package's kernels, and what the core's
bf16 dot-product ceiling would allow: the target's linears at 1-32 rows, and the tau a 3x speedup
would need.

On a CPU with AVX512-BF16 and no AMX (AMD Zen 4) every linear of a decoding step or a tree verify runs
``eagle_C::panel_linear_bf16`` (csrc/cpu/panel_linear.cpp). This times, with one thread:

* ``ceiling``: one matrix small enough to stay in L2, at 6 and 12 rows: the GFLOP/s the micro-kernel
  reaches when nothing waits for memory (about one VDPBF16PS per cycle);
* ``model``: every linear of the target (all layers, then the LM head, each its own weight: the whole
  model streams from L3 or memory as in a real forward) at 1 row and at each ``--rows``;
* ``forward``: the target's verify forward at W tree tokens as ``eagle.autotree.time_verify`` times it
  (the module call, LM head included, 128-token prefix; for reference), and a plain decoding step (the
  fused C++ step of ``generate(..., speculative=False)``, EOS ignored, per token).

A round costs at least a plain step plus the extra cost of its linears at W rows (the rest of a
forward does not get cheaper with more rows), so EAGLE's speedup <= tau * step / floor(W) even with
a free draft and free bookkeeping. Two floors: ``kernel``, with the linears' measured times
(step + linears(W) - linears(1)), and ``ceiling``, with the linears at W rows taking only their FLOPs
at the L2 ceiling (step + max(0, FLOPs(W) / ceiling - linears(1))): what a perfect kernel could do.
For each the script prints the tau that 3x would need. Each figure is the best of ``--repeats``
passes (this machine is shared and noisy).

    OMP_NUM_THREADS=1 python bench/cpu_verify_ceiling.py            # the bundled tiny-code target
    OMP_NUM_THREADS=1 python bench/cpu_verify_ceiling.py --target DIR --repeats 7

Writes bench/results/cpu_verify_ceiling_<target>.json (``--no-save``: print only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = (1, 2, 4, 6, 8, 12, 16, 24, 32)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=None, help="target checkpoint (default: the bundled tiny-code)")
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def target_linears(target_dir: str | None) -> tuple[str, list[torch.Tensor]]:
    """The target's linear weights [N, K] in forward order (layers, then the LM head), bf16."""
    from eagle.api import ASSETS, BUNDLED
    from eagle.models import load_target

    path = target_dir or str(ASSETS / BUNDLED / "target")
    model = load_target(path, dtype=torch.bfloat16)
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]  # lm_head last
    name = Path(path).name if target_dir else BUNDLED
    return name, [w.contiguous() for w in weights]


def verify_forwards(name: str, args) -> dict:
    """A plain decoding step (ms per token) and the verify forward at each row count (ms), bf16."""
    import eagle
    from eagle.autotree import time_verify

    model = eagle.load(args.target or name, dtype=torch.bfloat16)
    prompt = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n"

    def seconds(new_tokens: int) -> float:
        t = time.perf_counter()
        out = model.generate([prompt], new_tokens, speculative=False, eos_token_id=[])
        elapsed = time.perf_counter() - t
        assert len(out.tokens[0]) == new_tokens, "the plain run stopped early"
        return elapsed

    seconds(64)  # warm
    # 63 decoding steps: a 64-token run less a 1-token one (the prefill and first token)
    per_token = [(seconds(64) - seconds(1)) / 63 for _ in range(args.repeats)]
    verify = time_verify(model.target, 1, sorted({1, *args.rows}), rounds=args.repeats, raw=True)
    return {"plain_step_ms": min(per_token) * 1e3, "verify_ms": {w: s * 1e3 for w, s in verify.items()}}


def best_seconds(fn, repeats: int, inner: int) -> float:
    """One warm-up call, then bench.utils.best_host_us in seconds."""
    from bench.utils import best_host_us

    fn()
    return best_host_us(fn, inner, repeats) * 1e-6


def main(argv=None) -> int:
    args = parse_args(argv)
    from eagle.models import cpu_packed
    from eagle.models.cpu_packed import bf16_panels

    if not cpu_packed.bf16_panel_linear_available() or cpu_packed.amx_linear_available():
        raise SystemExit(
            "the target's linears run the bf16 panel kernel only on AVX512-BF16 CPUs without AMX"
        )
    torch.set_num_threads(1)
    op = torch.ops.eagle_C.panel_linear_bf16
    name, weights = target_linears(args.target)
    packed = [bf16_panels(w) for w in weights if w.shape[0] % 16 == 0 and w.shape[1] % 2 == 0]
    macs_per_row = sum(p.shape[0] * 16 * p.shape[1] * 2 for p in packed)
    weight_mb = macs_per_row * 2 / 1e6

    small = bf16_panels(torch.randn(768, 256).to(torch.bfloat16))  # 0.39 MB: stays in L2
    ceiling = {}
    for m in (6, 12):
        x = torch.randn(m, 256).to(torch.bfloat16)
        s = best_seconds(lambda x=x: op(x, small, None), args.repeats, 200)
        ceiling[m] = 2 * m * 768 * 256 / s / 1e9
    model = {}
    for m in sorted({1, *args.rows}):  # 1 row: the step's linears, the floors' baseline
        xs = {p.shape[1] * 2: torch.randn(m, p.shape[1] * 2).to(torch.bfloat16) for p in packed}

        def forward(xs=xs):
            for p in packed:
                op(xs[p.shape[1] * 2], p, None)

        s = best_seconds(forward, args.repeats, 3)
        model[m] = {
            "ms": s * 1e3,
            "GFLOP/s": 2 * m * macs_per_row / s / 1e9,
            "weights_GB/s": weight_mb / 1e3 / s,
        }
    forward = verify_forwards(name, args)
    one = model[1]["ms"]
    print(
        f"# {name}: {len(packed)} linears, {macs_per_row / 1e6:.2f} M MACs per row, {weight_mb:.1f} MB of bf16 weights"
    )
    print(
        "# ceiling (one 768 x 256 matrix in L2): "
        + ", ".join(f"{m} rows {g:.0f} GFLOP/s" for m, g in ceiling.items())
    )
    print(f"{'rows':>5} {'ms':>8} {'GFLOP/s':>8} {'GB/s':>6} {'x 1 row':>8}")
    for m, r in model.items():
        print(f"{m:5d} {r['ms']:8.3f} {r['GFLOP/s']:8.1f} {r['weights_GB/s']:6.1f} {r['ms'] / one:8.2f}")
    step = forward["plain_step_ms"]
    peak = max(ceiling.values()) * 1e9
    kernel = {m: step + r["ms"] - one for m, r in model.items()}
    perfect = {m: step + max(0.0, 2 * m * macs_per_row / peak * 1e3 - one) for m in model}
    print(f"# plain decoding step {step:.3f} ms ({step - one:.3f} ms outside its linears)")
    print(
        f"{'W':>5} {'time_verify':>12} {'floor: kernel':>14} {'3x needs tau':>13} {'floor: ceiling':>15} {'3x needs tau':>13}"
    )
    for w in model:
        ms = forward["verify_ms"][w]
        print(
            f"{w:5d} {ms:9.3f} ms {kernel[w]:11.3f} ms {3 * kernel[w] / step:13.2f} "
            f"{perfect[w]:12.3f} ms {3 * perfect[w] / step:13.2f}"
        )
    if not args.no_save:
        from bench.utils import save_json

        path = save_json(
            f"cpu_verify_ceiling_{name}.json",
            {
                "settings": {"target": name, "rows": args.rows, "repeats": args.repeats, "threads": 1},
                "linears": len(packed),
                "macs_per_row": macs_per_row,
                "weight_MB": weight_mb,
                "ceiling_GFLOP_s": {str(m): g for m, g in ceiling.items()},
                "model_linears": {str(m): r for m, r in model.items()},
                "plain_step_ms": step,
                "verify_forward_ms": {str(w): ms for w, ms in forward["verify_ms"].items()},
                "floor_kernel_ms": {str(w): f for w, f in kernel.items()},
                "floor_ceiling_ms": {str(w): f for w, f in perfect.items()},
                "tau_needed_for_3x_kernel": {str(w): 3 * f / step for w, f in kernel.items()},
                "tau_needed_for_3x_ceiling": {str(w): 3 * f / step for w, f in perfect.items()},
            },
        )
        print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
