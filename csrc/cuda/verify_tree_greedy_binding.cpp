// CUDA binding of verify_tree_greedy: torch-side checks, then the C-ABI launcher on the current stream.
// Tree values are not validated here (that would need a device->host copy); the Python wrapper does
// it when EAGLE_KERNELS_DEBUG=1, and the kernel stays memory-safe and bounded on malformed trees.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../cpu/verify_tree_greedy.h"
#include "verify_tree_greedy.cuh"

namespace eagle {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_greedy_cuda(
    const at::Tensor& candidates, const at::Tensor& retrive_index, const at::Tensor& retrive_next_token,
    const at::Tensor& retrive_next_sibling, const at::Tensor& target_predict, int64_t num_spec_steps) {
  check_verify_tree_greedy_args(candidates, retrive_index, retrive_next_token, retrive_next_sibling,
                                target_predict, num_spec_steps);
  const int64_t B = candidates.size(0), n = candidates.size(1);
  TORCH_CHECK_VALUE(n <= EAGLE_VERIFY_TREE_GREEDY_MAX_N, "the CUDA verify_tree_greedy kernel handles trees of up to ",
                    EAGLE_VERIFY_TREE_GREEDY_MAX_N, " slots, got n=", n, "; use the Triton backend");
  const c10::cuda::CUDAGuard guard(candidates.device());
  const auto opts = candidates.options().dtype(at::kInt);
  at::Tensor predicts = at::zeros({B * n}, opts);
  at::Tensor accept_index = at::empty({B, num_spec_steps}, opts);
  at::Tensor accept_num = at::empty({B}, opts);
  const at::Tensor cand = candidates.contiguous(), rows = retrive_index.contiguous();
  const at::Tensor first = retrive_next_token.contiguous(), sib = retrive_next_sibling.contiguous();
  const at::Tensor target = target_predict.contiguous();
  const int err = eagle_verify_tree_greedy_cuda(
      cand.data_ptr(), cand.scalar_type() == at::kLong, rows.data_ptr(), first.data_ptr(), sib.data_ptr(),
      rows.scalar_type() == at::kLong, target.data_ptr(), target.scalar_type() == at::kLong,
      predicts.data_ptr<int32_t>(), accept_index.data_ptr<int32_t>(), accept_num.data_ptr<int32_t>(), B, n,
      num_spec_steps, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "verify_tree_greedy CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {predicts, accept_index, accept_num};
}

}  // namespace
}  // namespace eagle

TORCH_LIBRARY_IMPL(eagle_C, CUDA, m) { m.impl("verify_tree_greedy", &eagle::verify_tree_greedy_cuda); }
