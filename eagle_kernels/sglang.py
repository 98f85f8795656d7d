"""Drop-in replacements for sgl-kernel's speculative-decoding entry points.

Same names, argument order and in-place semantics as ``sgl_kernel.speculative`` (outputs are
pre-allocated by the caller and written in place; the functions return None), so an SGLang user can
swap the import::

    # from sgl_kernel import build_tree_kernel_efficient, verify_tree_greedy, ...
    from eagle_kernels.sglang import (
        build_tree_kernel_efficient,
        tree_speculative_sampling_target_only,
        verify_tree_greedy,
    )

They run on every backend of :mod:`eagle_kernels` (CUDA, Triton, C++ on CPU, the reference).
``tree_speculative_sampling_target_only`` is lossless: thresholds other than 1.0 (SGLang's relaxed,
lossy acceptance) are refused unless the caller passes ``lossy=True``.
"""

from __future__ import annotations

from eagle_kernels.build_tree import FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING
from eagle_kernels.build_tree import sglang_build_tree_kernel_efficient as build_tree_kernel_efficient
from eagle_kernels.tree_speculative_sampling import (
    sglang_tree_speculative_sampling_target_only as tree_speculative_sampling_target_only,
)
from eagle_kernels.verify_tree_greedy import sglang_verify_tree_greedy as verify_tree_greedy

__all__ = [
    "FULL_MASK",
    "QLEN_ONLY",
    "QLEN_ONLY_BITPACKING",
    "build_tree_kernel_efficient",
    "tree_speculative_sampling_target_only",
    "verify_tree_greedy",
]
