"""eagle_kernels: kernels for EAGLE speculative decoding, usable from any serving stack.

Every op lives in its own module (reference, Triton kernel, registration, public function) and is
registered as ``torch.ops.eagle.<op>``. Backends are chosen per call by the tensors' device; see
:mod:`eagle_kernels._backend` and :func:`backend_info`.
"""

from __future__ import annotations

from pathlib import Path

from eagle_kernels import _ext
from eagle_kernels._backend import BACKENDS, available_backends, select_backend, use_backend
from eagle_kernels.build_tree import (
    MC_SIM_7B_63,
    StaticTree,
    build_static_tree,
    build_tree,
    build_tree_ref,
)
from eagle_kernels.chain_speculative_sampling import (
    chain_speculative_sampling,
    chain_speculative_sampling_ref,
)
from eagle_kernels.compact_kv_cache import compact_kv_cache, compact_kv_cache_ref
from eagle_kernels.fused_draft_input import (
    fused_draft_input,
    fused_draft_input_ref,
    fused_eagle3_input,
    fused_eagle3_input_ref,
)
from eagle_kernels.paged_compact_kv_cache import paged_compact_kv_cache, paged_compact_kv_cache_ref
from eagle_kernels.paged_tree_attention import (
    block_table_from_page_lists,
    gather_pages,
    paged_tree_attention,
    paged_tree_attention_ref,
)
from eagle_kernels.tree_attention import (
    pack_tree_mask,
    tree_attention,
    tree_attention_ref,
    unpack_tree_mask,
)
from eagle_kernels.tree_speculative_sampling import (
    tree_speculative_sampling,
    tree_speculative_sampling_draft_probs,
    tree_speculative_sampling_draft_probs_ref,
    tree_speculative_sampling_ref,
)
from eagle_kernels.verify_tree_greedy import verify_tree_greedy, verify_tree_greedy_ref
from eagle_kernels.warp_logits import warp_logits, warp_logits_ref

__version__ = "0.1.0"

OPS = (
    "build_tree",
    "compact_kv_cache",
    "tree_attention",
    "paged_tree_attention",
    "paged_compact_kv_cache",
    "fused_draft_input",
    "fused_eagle3_input",
    "verify_tree_greedy",
    "warp_logits",
    "tree_speculative_sampling",
    "chain_speculative_sampling",
)


def _installed_version() -> str | None:
    """The installed distribution's version, with a binary wheel's local label (``0.1.0+cu128torch2.13``:
    what it was built for), or None when this source tree runs without being installed, or runs in
    front of an installed copy elsewhere (a checkout on sys.path): then that copy is not what runs."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("eagle-kernels")
    except PackageNotFoundError:
        return None
    installed = Path(str(dist.locate_file("eagle_kernels/__init__.py")))
    here = Path(__file__)
    # an editable install's metadata locates nothing under its own site-packages: trust it there
    if installed.exists() and installed.resolve() != here.resolve():
        return None
    return dist.version


def backend_info() -> dict:
    """What this process can run: extension status and, per op, the default backend on CPU tensors
    and, when a CUDA device is present, on CUDA tensors."""
    import torch

    from eagle_kernels._triton import HAS_TRITON, TRITON_UNUSABLE_REASON, interpreter_enabled

    cpu = torch.device("cpu")
    cuda = {op: select_backend(op, torch.device("cuda")) for op in OPS} if torch.cuda.is_available() else None
    return {
        "version": __version__,
        "distribution": _installed_version(),
        "torch": torch.__version__,
        "extension_loaded": _ext.STATUS.loaded,
        "extension": _ext.STATUS.reason,
        "extension_cuda": _ext.STATUS.with_cuda,
        "triton": HAS_TRITON,
        "triton_unusable": TRITON_UNUSABLE_REASON,  # None when usable
        "triton_interpreter": interpreter_enabled(),
        "cpu_backend": {op: select_backend(op, cpu) for op in OPS},
        "cuda_backend": cuda,
    }


__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_info",
    "block_table_from_page_lists",
    "MC_SIM_7B_63",
    "StaticTree",
    "build_static_tree",
    "build_tree",
    "build_tree_ref",
    "compact_kv_cache",
    "compact_kv_cache_ref",
    "fused_draft_input",
    "fused_draft_input_ref",
    "fused_eagle3_input",
    "fused_eagle3_input_ref",
    "gather_pages",
    "pack_tree_mask",
    "paged_compact_kv_cache",
    "paged_compact_kv_cache_ref",
    "paged_tree_attention",
    "paged_tree_attention_ref",
    "select_backend",
    "tree_attention",
    "tree_attention_ref",
    "unpack_tree_mask",
    "chain_speculative_sampling",
    "chain_speculative_sampling_ref",
    "tree_speculative_sampling",
    "tree_speculative_sampling_draft_probs",
    "tree_speculative_sampling_draft_probs_ref",
    "tree_speculative_sampling_ref",
    "use_backend",
    "verify_tree_greedy",
    "verify_tree_greedy_ref",
    "warp_logits",
    "warp_logits_ref",
]
