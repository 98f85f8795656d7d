#pragma once
#include <ATen/core/Tensor.h>

namespace eagle {
// Shape/dtype/device checks shared by the CPU kernel and the CUDA binding.
void check_compact_kv_cache_args(const at::Tensor& kv_cache, const at::Tensor& cache_seqlens,
                                 const at::Tensor& accept_index, const at::Tensor& accept_token_num,
                                 int64_t num_draft_tokens);
}  // namespace eagle
