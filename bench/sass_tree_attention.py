"""What the compiler made of the Triton ``tree_attention`` kernel, without a GPU: registers, stack
(register spills), SASS instructions and the size of each loop, from an ahead-of-time compile for
sm_90 (``--arch``) read back with the ``cuobjdump`` that Triton ships.

    python bench/sass_tree_attention.py                         # the working tree, issue 3's goal shapes
    python bench/sass_tree_attention.py OLD.py                  # beside another commit's module
    python bench/sass_tree_attention.py OLD.py --new VARIANT.py --shapes tree64-B32 --configs default tma
    python bench/sass_tree_attention.py --kv e4m3 --configs default   # an fp8 cache with per-head scales

Counts are a proxy, not a timing: they find what changed where (a spill, a loop that grew) before a GPU
run measures it with ``bench/ab_tree_attention.py``. On 2026-11-28 a non-finite-V check had spilled
~500 bytes (stack 528 against 8) and grown the kernel from 3248 to 5144 instructions; the A/B on an
H200 then measured it 5-12% slower. The masked loop's growth (1025 to 1310 instructions against a
352-instruction main loop run 32 times) matched the ~2% it still cost at batch 32.

Each version's own :func:`plan_launch` picks the plan for ``--sms`` SMs (132: an H100 / H200); a
configuration is as in ``bench/ab_tree_attention.py`` (``default``, ``tma``, ``m128_n64_w8_s4``...).
The launches are recorded from zero-filled CPU tensors of the shape (the JIT's specialisation: dtypes,
16-divisible sizes and strides) and compiled as the JIT would (``tests.kernels.helpers``). ``--out``
(default ``bench/results/sass_tree_attention_triton<version>.json``) gets every figure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter compiles nothing
    raise SystemExit("run without TRITON_INTERPRET=1: this compiles the kernels ahead of time")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

from bench import ab_tree_attention as ab  # noqa: E402
from bench import sweep_tree_attention as sweep  # noqa: E402
from tests.kernels.helpers import compile_like_jit  # noqa: E402

DEFAULT_SHAPES = ("tree64-B1", "tree64-B8", "tree64-B32")


def cuobjdump() -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise SystemExit(f"this triton install has no cuobjdump ({path})")
    return str(path)


MASKS = ("int32", "bool", "uint8")  # tree-mask formats: bit-packed int32 words (the benchmark's), bool
# [B, T, T] (what the decoding loop passes), bit-packed bytes


# KV cache formats (--kv): the queries' own dtype, or an 8-bit cache with per-kv-head scales, converted
# as a launch on an sm_89+ GPU converts it (tree_attention._fp8_bits: e5m2 into bfloat16 by the byte
# shift, else Triton's conversion); "e4m3-bits" is the integer e4m3 conversion of older GPUs.
KV_FORMATS = {
    "same": None,
    "e4m3": torch.float8_e4m3fn,
    "e4m3-bits": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}


def record_launches(module, shape, config, mask_format: str = "int32", kv: str = "same") -> list[tuple]:
    """(kernel, args, keyword args) of every launch ``module``'s Triton launcher makes for ``shape``
    under ``config``, from zero-filled CPU tensors (nothing is computed); a tree shape's mask in
    ``mask_format`` (:data:`MASKS`); the cache in the ``kv`` format (:data:`KV_FORMATS`)."""
    dtype = torch.float32 if shape.fp32 else torch.bfloat16
    q = torch.zeros(shape.B, shape.T, shape.Hq, shape.D, dtype=dtype)
    kv_dtype = KV_FORMATS[kv] or dtype
    kv_cache = torch.zeros(2, shape.B, shape.Hkv, shape.s_max, shape.D, dtype=kv_dtype)
    scales = (
        {} if KV_FORMATS[kv] is None else dict(k_scale=torch.ones(shape.Hkv), v_scale=torch.ones(shape.Hkv))
    )
    seqlens = torch.full((shape.B,), shape.prefix, dtype=torch.int32)
    B, T = shape.B, shape.T
    masks = {
        "int32": lambda: torch.zeros(B, T, -(-T // 32), dtype=torch.int32),
        "bool": lambda: torch.zeros(B, T, T, dtype=torch.bool),
        "uint8": lambda: torch.zeros(B, T, -(-T // 8), dtype=torch.uint8),
    }
    mask = None if shape.mask == "causal" else masks[mask_format]()
    launches = []
    original, fp8_bits = module._launch, getattr(module, "_fp8_bits", None)
    module._launch = lambda kernel, grid, *args, **kw: launches.append((kernel, args, kw))
    if fp8_bits is not None:  # an sm_90 launch's choice (CPU tensors would take the integer one for all fp8)
        forced = 1 if kv == "e4m3-bits" else 2 if kv == "e5m2" and dtype == torch.bfloat16 else 0
        module._fp8_bits = lambda cache, q_dtype=None: forced
    try:
        module._tree_attention_triton(
            q, kv_cache[0], kv_cache[1], seqlens, mask, shape.D**-0.5, config, **scales
        )
    finally:
        module._launch = original
        if fp8_bits is not None:
            module._fp8_bits = fp8_bits
    for _, _, kw in launches:
        if "FP32_DOT" in kw:  # what a CUDA launch uses (the CPU launcher's bf16 workaround is not)
            kw["FP32_DOT"] = dtype == torch.float32
    return launches


def resources(cubin: bytes) -> dict:
    """Registers, stack and shared bytes, SASS instruction count and loop sizes of one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True
        )
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout))
    instructions = []  # (address, text)
    for line in sass.stdout.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            instructions.append((int(m.group(1), 16), m.group(2)))
    # A backward branch closes a loop: its size in instructions. Not one whose range holds an EXIT:
    # the TMA variants' barrier-wait retries sit after the kernel's EXIT and branch back into it.
    exits = [a for a, text in instructions if re.search(r"\bEXIT\b", text)]
    loops = []
    for address, text in instructions:
        m = re.search(r"\bBRA(?:\.\w+)*\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < address:
            start = int(m.group(1), 16)
            if not any(start <= a <= address for a in exits):
                loops.append(sum(1 for a, _ in instructions if start <= a <= address))
    return {
        "registers": int(fields.get("REG", -1)),
        "stack_bytes": int(fields.get("STACK", -1)),
        "static_shared_bytes": int(fields.get("SHARED", -1)),
        "instructions": len(instructions),
        "loops": loops,
    }


def report_version(
    module, shape, text: str, arch: int, sms: int, mask_format: str = "int32", kv: str = "same"
) -> list[dict]:
    config = ab.parse_config(text, module)
    G = shape.Hq // shape.Hkv
    dtype_size = 4 if shape.fp32 else 2
    plan = module.plan_launch(shape.B, shape.Hkv, shape.T, G, shape.s_max, shape.D, sms, config, dtype_size)
    # the launch as planned for `sms` SMs (the CPU tensors would plan for 1)
    planned = module.LaunchConfig(
        plan.block_m, plan.block_n, plan.num_warps, plan.num_stages, plan.num_splits, kv_tma=plan.kv_tma
    )
    rows = []
    for kernel, args, kwargs in record_launches(module, shape, planned, mask_format, kv):
        entry = {"kernel": kernel.fn.__name__, "plan": str(plan)}
        try:
            entry |= resources(compile_like_jit(kernel, args, kwargs, arch).asm["cubin"])
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            entry["error"] = (
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}"
            )
        rows.append(entry)
    return rows


def print_rows(shape_name: str, text: str, name: str, rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"  {shape_name:12s} {text:18s} {name:4s} {r['kernel']:24s} {r['error']}")
            continue
        print(
            f"  {shape_name:12s} {text:18s} {name:4s} {r['kernel']:24s} regs {r['registers']:3d}  stack "
            f"{r['stack_bytes']:4d} B  {r['instructions']:5d} instr  loops {r['loops']}"
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("baseline", type=Path, nargs="?", default=None, help="another commit's tree_attention.py")
    p.add_argument("--new", type=Path, default=None, help="a module file instead of the working tree's")
    p.add_argument("--shapes", nargs="*", default=list(DEFAULT_SHAPES), help="sweep_tree_attention shapes")
    p.add_argument("--configs", nargs="*", default=["default", "tma"], help="launch configurations")
    p.add_argument("--mask", choices=MASKS, default="int32", help="the tree shapes' mask format")
    p.add_argument(
        "--kv", choices=KV_FORMATS, default="same", help="the cache: q's dtype or 8-bit with scales"
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--sms", type=int, default=132, help="SMs the plans are made for")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/...)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    known = {s.name: s for s in sweep.GPU_SHAPES}
    unknown = [n for n in args.shapes if n not in known]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {sorted(known)}")
    cuobjdump()  # refuse early, by name
    missing = [str(p) for p in (args.baseline, args.new) if p is not None and not p.is_file()]
    if missing:
        raise SystemExit(f"no such module file: {', '.join(missing)}")
    working_tree = importlib.import_module("eagle_kernels.tree_attention")
    modules = {"new": working_tree if args.new is None else ab.load_baseline(args.new, ab.NEW_NAMESPACE)}
    if args.baseline is not None:
        modules["old"] = ab.load_baseline(args.baseline)
    print(
        f"# tree_attention for sm_{args.arch}, triton {triton.__version__}: new = {args.new or 'working tree'}"
        + (f", old = {args.baseline}" if args.baseline else "")
    )
    report = {
        "triton": triton.__version__,
        "arch": args.arch,
        "sms": args.sms,
        "new": str(args.new) if args.new else "working tree",
        "baseline": str(args.baseline) if args.baseline else None,
        "mask": args.mask,
        "kv": args.kv,
        "shapes": {},
    }
    for shape_name in args.shapes:
        shape = known[shape_name]
        per_config = report["shapes"][shape_name] = {}
        for text in args.configs:
            per_config[text] = {}
            for name, module in modules.items():
                rows = report_version(module, shape, text, args.arch, args.sms, args.mask, args.kv)
                per_config[text][name] = rows
                print_rows(shape_name, text, name, rows)
    out = args.out or ROOT / "bench" / "results" / f"sass_tree_attention_triton{triton.__version__}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"# wrote {out}")
    failed = [
        f"{shape} {text} {name}"
        for shape, configs in report["shapes"].items()
        for text, versions in configs.items()
        for name, rows in versions.items()
        if any("error" in row for row in rows)
    ]
    if failed:
        print(f"# compile errors in: {'; '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
