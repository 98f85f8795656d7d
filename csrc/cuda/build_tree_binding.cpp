// CUDA binding of build_tree: torch-side shape/dtype checks, then the C-ABI launcher on the current
// stream. No value is read on the host (no synchronisation): malformed trees are flagged by the kernel
// with positions == -1, which the Python wrapper turns into an error under EAGLE_KERNELS_DEBUG=1.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cpu/build_tree.h"
#include "build_tree.cuh"

namespace eagle {
namespace {

void build_tree_cuda(const at::Tensor& parent_list, const at::Tensor& selected_index, const at::Tensor& seq_lens,
                     at::Tensor tree_mask, at::Tensor positions, at::Tensor retrive_index,
                     at::Tensor retrive_next_token, at::Tensor retrive_next_sibling, int64_t topk, int64_t depth,
                     int64_t num_draft_tokens, int64_t mask_mode) {
  check_build_tree_args(parent_list, selected_index, seq_lens, tree_mask, positions, retrive_index,
                        retrive_next_token, retrive_next_sibling, topk, depth, num_draft_tokens, mask_mode);
  const at::ScalarType out_dtype = selected_index.scalar_type();
  TORCH_CHECK_TYPE(retrive_index.scalar_type() == out_dtype && retrive_next_token.scalar_type() == out_dtype &&
                       retrive_next_sibling.scalar_type() == out_dtype,
                   "the CUDA kernel writes retrive_* in selected_index's dtype ", out_dtype);
  const c10::cuda::CUDAGuard guard(selected_index.device());
  auto parents = parent_list.contiguous();
  auto sel = selected_index.contiguous();
  auto lens = seq_lens.contiguous();
  const int err = eagle_build_tree_cuda(
      parents.data_ptr(), parents.scalar_type() == at::kLong, parents.size(1), sel.data_ptr(),
      sel.scalar_type() == at::kLong, lens.data_ptr(), lens.scalar_type() == at::kLong, tree_mask.data_ptr(),
      tree_mask.numel(), static_cast<int>(mask_mode), positions.data_ptr<int64_t>(), retrive_index.data_ptr(),
      retrive_next_token.data_ptr(), retrive_next_sibling.data_ptr(), sel.size(0), topk, depth, num_draft_tokens,
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "build_tree CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace
}  // namespace eagle

TORCH_LIBRARY_IMPL(eagle_C, CUDA, m) { m.impl("build_tree", &eagle::build_tree_cuda); }
