"""Build script for eagle-kernels and its C++/CUDA extension ``eagle_kernels._C``.

Environment switches (all optional)
-----------------------------------
EAGLE_SKIP_EXT=1        Pure-Python install: no extension is built. Ops fall back to Triton (CUDA
                        tensors) or the PyTorch reference (CPU tensors).
EAGLE_FORCE_CUDA=1      Require the CUDA kernels: fail loudly when nvcc (CUDA_HOME) or a CUDA build of
                        torch is missing. Without it they are built whenever both are there (a visible
                        GPU is not needed, e.g. on a wheel-build box) and skipped with a message else.
EAGLE_SKIP_CUDA=1       Build only the C++ CPU kernels even when CUDA is available.
TORCH_CUDA_ARCH_LIST    GPU architectures to compile for, e.g. "8.0;9.0+PTX". Default when building
                        CUDA without a visible GPU: "8.0;8.6;8.9;9.0+PTX".
MAX_JOBS                Parallel compile jobs for ninja. Default: min(cores, free RAM / 2.5 GB), at
                        least 1; the choice is printed.
EAGLE_LOCAL_VERSION     Override the wheel's local version label (default: "cputorch{A.B}" or
                        "cu{XY}torch{A.B}", from the torch and the nvcc the extension is built with;
                        none for a pure-Python build or an sdist).
EAGLE_DEBUG_BUILD=1     Compile with -O0 -g.

Install with ``pip install --no-build-isolation .`` so that the extension is compiled against the
torch already installed (see README).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _base_version() -> str:
    """eagle_kernels.__version__, read from its source (importing it would import torch): the one place
    the version is written (eagle/__init__.py repeats it, to stay torch-free; a test keeps the two
    equal)."""
    match = re.search(
        r'^__version__ = "([^"]+)"$', (ROOT / "eagle_kernels" / "__init__.py").read_text(), re.M
    )
    if match is None:
        raise RuntimeError('setup.py: no `__version__ = "..."` line in eagle_kernels/__init__.py')
    return match.group(1)


BASE_VERSION = _base_version()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _import_torch():
    try:
        import torch  # noqa: F401

        return torch
    except ImportError:
        return None


def _free_memory_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 8.0


def _default_max_jobs(cuda: bool) -> int:
    # nvcc translation units can take several GB each; C++ ones much less.
    per_job_gb = 2.5 if cuda else 1.0
    jobs = max(1, min(os.cpu_count() or 1, int(_free_memory_gb() / per_job_gb)))
    return jobs


def _cuda_wanted(torch) -> bool:
    if _flag("EAGLE_SKIP_CUDA"):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    have_toolchain = torch.version.cuda is not None and CUDA_HOME is not None
    if _flag("EAGLE_FORCE_CUDA"):
        if not have_toolchain:
            raise RuntimeError(
                "EAGLE_FORCE_CUDA=1 but a CUDA build needs both a CUDA build of torch "
                f"(torch.version.cuda={torch.version.cuda}) and nvcc (CUDA_HOME={CUDA_HOME})."
            )
        return True
    if not have_toolchain:
        print(
            "[eagle-kernels] building the C++ CPU extension only "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})."
        )
        return False
    return True


@functools.cache  # (the wheel's label and its build info both ask)
def _toolkit_cuda_version(torch) -> str:
    """The CUDA version of the nvcc at CUDA_HOME ("12.4"), which the kernels are compiled with: one
    torch can build against several toolkits (scripts/build_wheels.sh), and the wheel's label and
    build info must name the one used. torch's own CUDA version when nvcc cannot be asked."""
    import re
    import subprocess

    from torch.utils.cpp_extension import CUDA_HOME

    try:
        out = subprocess.run(
            [os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True, check=True
        ).stdout
        found = re.search(r"release (\d+)\.(\d+)", out)
        if found:
            return f"{found.group(1)}.{found.group(2)}"
    except (OSError, subprocess.CalledProcessError, TypeError):
        pass
    return torch.version.cuda


def _local_version(torch, cuda: bool) -> str:
    override = os.environ.get("EAGLE_LOCAL_VERSION")
    if override:
        return override
    if torch is None or _flag("EAGLE_SKIP_EXT"):
        return ""  # pure-Python: platform independent, no local label
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if cuda:
        cuda_major_minor = "".join(_toolkit_cuda_version(torch).split(".")[:2])
        return f"cu{cuda_major_minor}torch{torch_mm}"
    return f"cputorch{torch_mm}"


def _cuda_archs() -> list[str] | None:
    """What the CUDA kernels are compiled for, from torch's own -gencode flags for the arch list in
    force (TORCH_CUDA_ARCH_LIST, or the visible GPUs): "sm_80" (a cubin: runs on 8.x with x >= 0),
    "compute_90" (PTX: JIT-compiled on 9.0 and later). A GPU the list does not cover gets Triton."""
    import re

    try:  # a private torch function: a torch without it records no list (read as covering every GPU)
        from torch.utils.cpp_extension import _get_cuda_arch_flags

        flags = _get_cuda_arch_flags()
    except (ImportError, RuntimeError, ValueError):
        return None
    archs = []
    for flag in flags:  # -gencode=arch=compute_XY,code=sm_XY (or code=[sm_XY,compute_XY])
        if "code=" in flag:
            for kind, number in re.findall(r"(sm|compute)_(\d+a?)", flag.split("code=", 1)[1]):
                archs.append(f"{kind}_{number}")
    return sorted(set(archs))


def _write_build_info(torch, cuda: bool) -> None:
    info = ROOT / "eagle_kernels" / "_build_info.py"
    torch_version = torch.__version__ if torch is not None else None
    cuda_version = _toolkit_cuda_version(torch) if (torch is not None and cuda) else None
    archs = _cuda_archs() if cuda else None
    info.write_text(
        "# Written by setup.py at build time; describes what eagle_kernels._C was compiled against.\n"
        f"TORCH_VERSION = {torch_version!r}\n"
        f"CUDA_VERSION = {cuda_version!r}\n"
        f"WITH_CUDA = {bool(cuda)!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
    )


def _sources(*patterns: str) -> list[str]:
    """csrc/*.cpp and csrc/cpu/*.cpp build everywhere; csrc/cuda/* only into a CUDA build."""
    return sorted(str(p.relative_to(ROOT)) for pat in patterns for p in (ROOT / "csrc").glob(pat))


def _extensions(torch, cuda: bool):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = _flag("EAGLE_DEBUG_BUILD")
    # -g0: Python's sysconfig CFLAGS carry -g, which made the library 38 MB (36 MB of debug info)
    cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -ffp-contract=off: GCC fuses a * b + c into an FMA wherever it likes in C++ (ISO mode too), and
    # different GCC versions chose differently between two paths that must agree bit for bit (a verified
    # block's rows and one-token steps in tree_attention). The kernels write their FMAs out instead.
    # No -std: torch's BuildExtension adds the standard its headers need (C++20 in recent releases,
    # 2.13 included; C++17 in older ones; 2.14's ATen refuses C++17 with an #error). The sources
    # compile as both (make nvcc-check checks the CUDA ones).
    cxx_flags += ["-fopenmp", "-ffp-contract=off"]
    if cuda:
        cxx_flags.append("-DEAGLE_WITH_CUDA")
    sources = _sources("*.cpp", "cpu/*.cpp")
    link_args = ["-fopenmp"]
    if not cuda:
        return [
            CppExtension(
                "eagle_kernels._C",
                sources,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_args,
            )
        ]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0+PTX"
    sources += _sources("cuda/*.cpp", "cuda/*.cu")
    nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
    nvcc_flags += ["--expt-relaxed-constexpr"]
    return [
        CUDAExtension(
            "eagle_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_args,
        )
    ]


def _persistent_build_ext(base):
    """build_ext whose object files live in ./build/ext-temp for every kind of build.

    pip's editable installs compile in a fresh temporary directory each time; keeping the objects in
    one place lets ninja reuse them across `pip install -e .`, `python -m build --wheel` and reruns.
    """

    class PersistentBuildExt(base.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.environ.get("EAGLE_BUILD_TEMP", str(ROOT / "build" / "ext-temp"))

        def run(self):
            try:
                super().run()
            except Exception:
                # pip shows the end of the output: the compiler's own errors are above this
                print(
                    "\neagle-kernels: compiling the C++ extension failed (errors above). It needs a "
                    "C++ compiler with OpenMP (g++ or clang++; CXX picks one; e.g. apt install g++), "
                    "and nvcc for the CUDA part.\n  Without it, install the pure-Python package "
                    "(PyTorch on CPU, Triton on CUDA): EAGLE_SKIP_EXT=1 make run (or pip install)\n",
                    file=sys.stderr,
                )
                raise

    return PersistentBuildExt


def _build_py(skip_ext: bool):
    """build_py that leaves ``eagle_kernels/_build_info.py`` out of a pure-Python build: a copy left
    in the tree by an earlier extension build would make the installed package look for an extension
    it does not have (and warn at every import)."""
    from setuptools.command.build_py import build_py

    class BuildPy(build_py):
        def run(self):
            if skip_ext:  # nor one an earlier extension build left in build/lib
                (Path(self.build_lib) / "eagle_kernels" / "_build_info.py").unlink(missing_ok=True)
            super().run()

        def find_package_modules(self, package, package_dir):
            modules = super().find_package_modules(package, package_dir)
            if skip_ext:
                modules = [m for m in modules if (m[0], m[1]) != ("eagle_kernels", "_build_info")]
            return modules

    return BuildPy


def _dependencies(torch, with_ext: bool) -> list[str]:
    """The runtime requirements; an extension build pins the torch minor version it was compiled
    against (the extension does not load under another: a wheel must not be installed beside it)."""
    # No triton: the Triton kernels run on CUDA tensors, and torch's CUDA wheels for Linux already
    # require it; a CPU install skips its ~290 MB (the tests' extra takes it for TRITON_INTERPRET=1).
    deps = [
        "transformers>=4.45",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "huggingface_hub>=0.24",
        "tqdm>=4.60",
        "numpy>=1.24",
    ]
    if with_ext:
        major, minor = torch.__version__.split("+")[0].split(".")[:2]
        # .0.dev0: a dev or pre-release build of that minor (nightlies' 2.x.0.devYYYYMMDD, NGC's
        # 2.x.0a0+nv) satisfies it too; PEP 440 sorts dev before a0
        return [f"torch>={major}.{minor}.0.dev0,<{major}.{int(minor) + 1}", *deps]
    return ["torch>=2.5", *deps]


def main() -> None:
    torch = _import_torch()
    # an sdist carries sources only: no extension, no build info, no local label, any torch
    sdist = "sdist" in sys.argv
    skip_ext = _flag("EAGLE_SKIP_EXT") or sdist
    building = any(a.startswith(("bdist", "build", "develop", "install", "editable")) for a in sys.argv)
    ext_modules, cmdclass, cuda = [], {"build_py": _build_py(skip_ext)}, False
    if not skip_ext:
        if torch is None:
            if building:
                sys.exit(
                    "eagle-kernels: torch is not importable in the build environment, so the C++/CUDA "
                    "extension cannot be compiled.\n  Install torch first, then build without "
                    "isolation:\n      pip install torch && pip install --no-build-isolation .\n"
                    "  or build the pure-Python package: EAGLE_SKIP_EXT=1 pip install ."
                )
        else:
            from torch.utils.cpp_extension import BuildExtension

            cuda = _cuda_wanted(torch)
            if "MAX_JOBS" not in os.environ:
                os.environ["MAX_JOBS"] = str(_default_max_jobs(cuda))
            print(f"[eagle-kernels] MAX_JOBS={os.environ['MAX_JOBS']} cuda={cuda}")
            ext_modules = _extensions(torch, cuda)
            cmdclass["build_ext"] = _persistent_build_ext(BuildExtension)
            _write_build_info(torch, cuda)
    local = "" if sdist else _local_version(torch, cuda)
    version = BASE_VERSION + (f"+{local}" if local else "")
    setup(
        version=version,
        install_requires=_dependencies(torch, with_ext=bool(ext_modules)),
        packages=find_packages(include=["eagle_kernels*", "eagle*"]),
        package_data={"eagle": ["assets/**/*", "py.typed"], "eagle_kernels": ["py.typed"]},
        include_package_data=True,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
