"""Does a C++ error raised inside a torch custom op reach Python as an exception with this toolchain?

On the GPU machines (torch 2.11, host compiler /opt/gcc/bin/g++) every TORCH_CHECK failure inside
eagle_kernels._C killed the process with a segfault instead of raising, although a two-line probe op
built with the same compiler through ``load_inline`` raised. So this probe builds the failing op with
each candidate C++ compiler *and* each way our build differs from ``load_inline`` (``-O3 -fopenmp``,
the ``-Bsymbolic-functions`` link flag of the distribution's Python, the CUDA libraries), all at once,
each in its own subprocess (a crash is a result, not the end of the probe), and prints the matrix. The
last line names the first compiler for which every variant raised (``CXX=...``), for the build to use:

    python scripts/probe_cxx_exceptions.py [g++ /usr/bin/g++ /opt/gcc/bin/g++ ...]
    python scripts/probe_cxx_exceptions.py --check-extension    # does the built eagle_kernels._C raise?
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
at::Tensor probe_fail(const at::Tensor& x) {
  TORCH_CHECK(x.numel() < 0, "probe: this check always fails");
  return x;
}
TORCH_LIBRARY(cxx_probe, m) { m.def("fail(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(cxx_probe, CPU, m) { m.impl("fail", &probe_fail); }
"""

CHILD = r"""
import json, sys, torch
from torch.utils.cpp_extension import load_inline
cflags, ldflags = json.loads(sys.argv[3])
load_inline("cxx_probe_{tag}", cpp_sources=[sys.argv[1]], is_python_module=False,
            build_directory=sys.argv[2], verbose=False, extra_cflags=cflags, extra_ldflags=ldflags)
try:
    torch.ops.cxx_probe.fail(torch.zeros(1))
except RuntimeError as e:
    print("RAISED", str(e).splitlines()[0])
"""

CHECK_EXTENSION = r"""
import torch, eagle_kernels._C
try:
    torch.ops.eagle_C.argmax_checked(torch.zeros(0))
except (RuntimeError, ValueError) as e:
    print("RAISED", str(e).splitlines()[0])
"""


def variants() -> dict[str, tuple[list[str], list[str]]]:
    """name -> (extra compile flags, extra link flags): each way setup.py's build differs from load_inline."""
    import torch
    from torch.utils import cpp_extension

    found = {
        "plain": ([], []),
        "O3-openmp": (["-O3", "-fopenmp"], ["-fopenmp"]),
        "bsymbolic": ([], ["-Wl,-O1", "-Wl,-Bsymbolic-functions"]),
    }
    if torch.version.cuda and cpp_extension.CUDA_HOME:
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        cuda_lib = os.path.join(cpp_extension.CUDA_HOME, "lib64")
        found["cuda-libs"] = (
            [],
            [f"-L{torch_lib}", "-lc10_cuda", "-ltorch_cuda", f"-L{cuda_lib}", "-lcudart"],
        )
    found["all"] = (
        sum((c for c, _ in found.values()), []),
        sum((ld for _, ld in found.values()), []),
    )
    return found


def _outcome(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode < 0:
        return f"crash (signal {-proc.returncode})"
    if "RAISED" in proc.stdout:
        return "ok"
    if proc.returncode != 0:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
    return "no exception"


def probe(compiler: str, flags: tuple[list[str], list[str]]) -> str:
    """'ok', 'crash (signal N)', 'failed: ...' or 'no exception' for one compiler and flag set."""
    import json

    with tempfile.TemporaryDirectory() as build:
        env = {**os.environ, "CXX": compiler}
        tag = abs(hash((compiler, json.dumps(flags)))) % 10**8
        proc = subprocess.run(
            [sys.executable, "-c", CHILD.replace("{tag}", str(tag)), SOURCE, build, json.dumps(flags)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    return _outcome(proc)


def check_extension() -> int:
    """Import the built eagle_kernels._C in a subprocess and fail one of its TORCH_CHECKs."""
    proc = subprocess.run(
        [sys.executable, "-c", CHECK_EXTENSION], capture_output=True, text=True, timeout=120
    )
    result = _outcome(proc)
    print(f"extension: {result}")
    return 0 if result == "ok" else 1


def main(argv: list[str]) -> int:
    if argv == ["--check-extension"]:
        return check_extension()
    candidates = argv or [os.environ.get("CXX", "c++"), "g++", "/usr/bin/g++", "/opt/gcc/bin/g++", "clang++"]
    seen, paths = set(), []
    for name in candidates:
        path = shutil.which(name)
        if path is not None and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            paths.append(path)
    matrix = [(path, name, flags) for path in paths for name, flags in variants().items()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(matrix))) as pool:  # one build each
        results = list(pool.map(lambda job: probe(job[0], job[2]), matrix))
    by_compiler: dict[str, list[str]] = {}
    for (path, name, _), result in zip(matrix, results):
        print(f"{path:<28} {name:<10} {result}", flush=True)
        by_compiler.setdefault(path, []).append(result)
    working = [path for path, outcomes in by_compiler.items() if all(r == "ok" for r in outcomes)]
    print(f"CXX={working[0]}" if working else "CXX=")
    return 0 if working else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
