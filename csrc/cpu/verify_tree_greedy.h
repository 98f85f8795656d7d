#pragma once
#include <ATen/core/Tensor.h>

namespace eagle {
// Shape/dtype/device checks of verify_tree_greedy shared by the CPU kernel and the CUDA binding.
void check_verify_tree_greedy_args(const at::Tensor& candidates, const at::Tensor& retrive_index,
                                   const at::Tensor& retrive_next_token, const at::Tensor& retrive_next_sibling,
                                   const at::Tensor& target_predict, int64_t num_spec_steps);
}  // namespace eagle
