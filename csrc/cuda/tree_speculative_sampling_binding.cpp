// CUDA binding of tree_speculative_sampling: torch-side checks (shared with the CPU kernel), output
// allocation, then the C-ABI launcher on the current stream. No host synchronisation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../cpu/tree_speculative_sampling.h"
#include "tree_speculative_sampling.cuh"

namespace eagle {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tree_speculative_sampling_cuda(
    const at::Tensor& candidates, const at::Tensor& retrive_index, const at::Tensor& retrive_next_token,
    const at::Tensor& retrive_next_sibling, const at::Tensor& target_probs, const c10::optional<at::Tensor>& draft_probs,
    const at::Tensor& uniform_samples, const at::Tensor& uniform_final, int64_t num_spec_steps, bool lossy,
    double threshold_single, double threshold_acc) {
  check_tree_speculative_sampling_args(candidates, retrive_index, retrive_next_token, retrive_next_sibling,
                                       target_probs, draft_probs, uniform_samples, uniform_final, num_spec_steps,
                                       lossy);
  const c10::cuda::CUDAGuard guard(target_probs.device());
  const int64_t B = target_probs.size(0), n = target_probs.size(1), V = target_probs.size(2);
  auto opts = target_probs.options().dtype(at::kInt);
  auto predicts = at::empty({B * n}, opts);
  auto accept_index = at::empty({B, num_spec_steps}, opts);
  auto num = at::empty({B}, opts);
  auto status = at::empty({B}, opts);
  auto cand = candidates.contiguous();
  auto ri = retrive_index.contiguous(), nt = retrive_next_token.contiguous(), ns = retrive_next_sibling.contiguous();
  auto u = uniform_samples.contiguous(), uf = uniform_final.contiguous();
  const float* q = draft_probs.has_value() ? draft_probs->data_ptr<float>() : nullptr;
  const int err = eagle_tree_speculative_sampling_cuda(
      cand.data_ptr(), cand.scalar_type() == at::kLong, ri.data_ptr(), nt.data_ptr(), ns.data_ptr(),
      ri.scalar_type() == at::kLong, target_probs.data_ptr<float>(), target_probs.stride(0), target_probs.stride(1), q,
      draft_probs.has_value() ? draft_probs->stride(0) : 0, draft_probs.has_value() ? draft_probs->stride(1) : 0,
      u.data_ptr<float>(), uf.data_ptr<float>(), predicts.data_ptr<int32_t>(), accept_index.data_ptr<int32_t>(),
      num.data_ptr<int32_t>(), status.data_ptr<int32_t>(), B, n, V, num_spec_steps, lossy,
      static_cast<float>(threshold_single), static_cast<float>(std::max(threshold_acc, 1e-9)),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "tree_speculative_sampling CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {predicts, accept_index, num, status};
}

}  // namespace
}  // namespace eagle

TORCH_LIBRARY_IMPL(eagle_C, CUDA, m) { m.impl("tree_speculative_sampling", &eagle::tree_speculative_sampling_cuda); }
