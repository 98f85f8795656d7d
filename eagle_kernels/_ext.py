"""Loading of the compiled extension ``eagle_kernels._C``, with a single warning on failure.

The extension registers its ops under the ``torch.ops.eagle_C`` namespace. It is optional: when it
is missing (pure-Python install, ``EAGLE_SKIP_EXT``), was built against another torch, or fails to
load, every op falls back to Triton (CUDA tensors) or the PyTorch reference (CPU tensors).
Loading the library never initialises CUDA.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    with_cuda: bool
    reason: str  # why it is not loaded, or what it was built against
    built_torch: str | None = None


def _torch_major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _try_load() -> ExtensionStatus:
    if os.environ.get("EAGLE_KERNELS_DISABLE_EXT", "").lower() in ("1", "true", "yes"):
        return ExtensionStatus(False, False, "disabled by EAGLE_KERNELS_DISABLE_EXT")
    try:
        info = importlib.import_module("eagle_kernels._build_info")
    except ImportError:
        return ExtensionStatus(False, False, "not built (pure-Python install or EAGLE_SKIP_EXT=1)")
    built = info.TORCH_VERSION
    if built is None or _torch_major_minor(built) != _torch_major_minor(torch.__version__):
        return ExtensionStatus(
            False,
            False,
            f"built for torch {built} but torch {torch.__version__} is installed; install the "
            "eagle-kernels wheel built for this torch, or build from source against it "
            "(`pip install --no-build-isolation .`)",
            built,
        )
    if info.WITH_CUDA and (torch.version.cuda or "").split(".")[0] != str(info.CUDA_VERSION).split(".")[0]:
        return ExtensionStatus(
            False,
            False,
            f"built with CUDA {info.CUDA_VERSION} but torch {torch.__version__} uses CUDA {torch.version.cuda}; "
            "install the eagle-kernels wheel built for this torch, or build from source against it",
            built,
        )
    try:
        importlib.import_module("eagle_kernels._C")
    except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError
        return ExtensionStatus(False, False, f"failed to load: {exc}", built)
    desc = f"built for torch {built}" + (f", CUDA {info.CUDA_VERSION}" if info.WITH_CUDA else ", CPU only")
    return ExtensionStatus(True, bool(info.WITH_CUDA), desc, built)


STATUS = _try_load()
if not STATUS.loaded and "not built" not in STATUS.reason and "disabled" not in STATUS.reason:
    warnings.warn(
        f"eagle_kernels: C++/CUDA extension not used ({STATUS.reason}); "
        "falling back to Triton / PyTorch reference kernels.",
        RuntimeWarning,
        stacklevel=2,
    )


def runtime_info() -> dict:
    """Which kernels a run used, for result files: the extension's status and every ``EAGLE*``
    environment switch (backend choice, ISA, disabled paths), plus whether Triton runs interpreted.
    The same commit gives other figures with the extension missing or a switch set."""
    return {
        "extension_loaded": STATUS.loaded,
        "extension_with_cuda": STATUS.with_cuda,
        "extension_status": STATUS.reason,
        "extension_built_torch": STATUS.built_torch,
        "env": {
            k: v for k, v in sorted(os.environ.items()) if k.startswith("EAGLE") or k == "TRITON_INTERPRET"
        },
    }


@functools.cache
def has_op(name: str, device_type: str = "cpu") -> bool:
    """True when the extension provides op ``eagle_C::<name>`` for tensors on ``device_type``."""
    if not STATUS.loaded:
        return False
    if device_type == "cuda" and not STATUS.with_cuda:
        return False
    if not hasattr(torch.ops.eagle_C, name):
        return False
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"eagle_C::{name}", dispatch_key)


def arch_covers(archs: list[str] | None, capability: tuple[int, int]) -> bool:
    """Whether kernels compiled for ``archs`` (setup.py's ``CUDA_ARCHS``: "sm_80", "sm_90a",
    "compute_90") run on a GPU of compute ``capability``: a cubin sm_XY on X.y for y >= Y ("a" cubins
    on X.Y only), PTX compute_XY on every capability >= X.Y. None (a build that did not record its
    archs) is taken to cover every GPU."""
    if archs is None:
        return True
    major, minor = capability
    for arch in archs:
        kind, number = arch.split("_")
        exact = number.endswith("a")
        value = int(number.rstrip("a"))
        arch_major, arch_minor = value // 10, value % 10
        if kind == "compute" and (
            (arch_major, arch_minor) == (major, minor)
            if exact
            else (arch_major, arch_minor) <= (major, minor)
        ):  # ("a" PTX, from "9.0a+PTX", uses that architecture's own features: it runs there only)
            return True
        if kind == "sm" and arch_major == major and (arch_minor == minor if exact else arch_minor <= minor):
            return True
    return False


_WARNED_ARCH: set[tuple[int, int]] = set()


@functools.cache
def cuda_device_supported(index: int) -> bool:
    """Whether the extension's CUDA kernels were compiled for GPU ``index``'s architecture. When not
    (e.g. a T4, sm_75, under the default 8.0-9.0 list), the ops run Triton there instead of failing
    with "no kernel image"; one warning says so."""
    if not STATUS.with_cuda:
        return False
    info = importlib.import_module("eagle_kernels._build_info")
    capability = torch.cuda.get_device_capability(index)
    archs = getattr(info, "CUDA_ARCHS", None)
    if arch_covers(archs, capability):
        return True
    if capability not in _WARNED_ARCH:
        _WARNED_ARCH.add(capability)
        warnings.warn(
            f"eagle_kernels: the CUDA extension has no kernels for this GPU (compute capability "
            f"{capability[0]}.{capability[1]}; built for {', '.join(archs)}); its ops run the Triton "
            "kernels (or, without Triton, the PyTorch reference) there instead. Rebuild with "
            "TORCH_CUDA_ARCH_LIST naming it to use them.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def op(name: str):
    """The extension's op ``torch.ops.eagle_C.<name>``."""
    return getattr(torch.ops.eagle_C, name)
