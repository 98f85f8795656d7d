"""Command-line interface: ``eagle <command> --help``."""

from __future__ import annotations

import argparse
import json
import platform
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import eagle
    import eagle_kernels

    info = {
        "eagle": eagle.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "kernels": eagle_kernels.backend_info(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    k = info.pop("kernels")
    for key, value in info.items():
        print(f"{key:>16}: {value}")
    print(f"{'torch':>16}: {k['torch']}")
    print(f"{'extension':>16}: {'loaded' if k['extension_loaded'] else 'not loaded'} ({k['extension']})")
    print(f"{'triton':>16}: {'installed' if k['triton'] else 'not installed'}")
    print(f"{'CPU backends':>16}:")
    for op, backend in k["cpu_backend"].items():
        print(f"{'':>18}{op:<32} {backend}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eagle",
        description="EAGLE speculative decoding: lossless, faster generation for Llama-family models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show devices, kernel backends in use and the extension's status")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
