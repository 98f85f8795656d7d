"""Does a C++ error raised inside a torch custom op reach Python as an exception with this toolchain?

On the first GPU machine (torch 2.11, host compiler /opt/gcc/bin/g++) every TORCH_CHECK failure inside
eagle_kernels._C killed the process with a segfault instead of raising. This probe builds a two-line
custom op that fails a TORCH_CHECK with each candidate C++ compiler (in a subprocess each, all at once,
so a crash is a result, not the end of the probe) and prints which compilers work, and the first that does on the
last line (``CXX=...``), for the build to use:

    python scripts/probe_cxx_exceptions.py [g++ /usr/bin/g++ /opt/gcc/bin/g++ ...]
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
import sys, torch
from torch.utils.cpp_extension import load_inline
load_inline("cxx_probe_{tag}", cpp_sources=[sys.argv[1]], is_python_module=False,
            build_directory=sys.argv[2], verbose=False)
try:
    torch.ops.cxx_probe.fail(torch.zeros(1))
except RuntimeError as e:
    print("RAISED", str(e).splitlines()[0])
"""


def probe(compiler: str) -> str:
    """'ok', 'crash (signal N)', 'build failed: ...' or 'no exception' for one compiler."""
    with tempfile.TemporaryDirectory() as build:
        env = {**os.environ, "CXX": compiler}
        tag = abs(hash(compiler)) % 10**8
        proc = subprocess.run(
            [sys.executable, "-c", CHILD.replace("{tag}", str(tag)), SOURCE, build],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    if proc.returncode < 0:
        return f"crash (signal {-proc.returncode})"
    if "RAISED" in proc.stdout:
        return "ok"
    if proc.returncode != 0:
        return "build failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
    return "no exception"


def main(argv: list[str]) -> int:
    candidates = argv or [os.environ.get("CXX", "c++"), "g++", "/usr/bin/g++", "/opt/gcc/bin/g++", "clang++"]
    seen, paths = set(), []
    for name in candidates:
        path = shutil.which(name)
        if path is not None and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            paths.append(path)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(paths))) as pool:  # one build each
        results = list(pool.map(probe, paths))
    working = []
    for path, result in zip(paths, results):
        print(f"{path:<28} {result}", flush=True)
        if result == "ok":
            working.append(path)
    print(f"CXX={working[0]}" if working else "CXX=")
    return 0 if working else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
