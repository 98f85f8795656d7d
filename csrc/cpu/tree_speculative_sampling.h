// Shared by the CPU kernels and the CUDA binding of tree_speculative_sampling: the constants that
// every backend must agree on bit for bit, and the shape/dtype checks of the op's arguments.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace eagle {
namespace spec_sampling {

// Per-sequence status bits (eagle_kernels/tree_speculative_sampling.py: STATUS_MESSAGES).
constexpr int32_t kBadTree = 1;
constexpr int32_t kBadToken = 2;
constexpr int32_t kBadUniform = 4;
constexpr int32_t kBadProb = 8;
constexpr int32_t kBadRow = 16;
constexpr int32_t kDupSibling = 32;
constexpr int32_t kBadDraft = 64;

// A probability is valid in [0, float32(1 + 1e-3)]; rows must sum to 1 within 1e-3.
constexpr float kProbLimit = 1.00100004673004150390625f;
constexpr double kProbTol = 1e-3;
// Fixed-point scale of the integer masses the bonus token is drawn from: mass = trunc(r * 2^60).
constexpr float kMassScale = 1152921504606846976.0f;
constexpr double kMassScaleD = 1152921504606846976.0;

}  // namespace spec_sampling

void check_tree_speculative_sampling_args(const at::Tensor& candidates, const at::Tensor& retrive_index,
                                          const at::Tensor& retrive_next_token,
                                          const at::Tensor& retrive_next_sibling, const at::Tensor& target_probs,
                                          const c10::optional<at::Tensor>& draft_probs,
                                          const at::Tensor& uniform_samples, const at::Tensor& uniform_final,
                                          int64_t num_spec_steps, bool lossy);

}  // namespace eagle
