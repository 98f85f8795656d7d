// The CPU fused_draft_input kernel, for the C++ draft-head op in llama_layers.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace eagle {

// out [N, H] = cat([embed_weight[token_ids], hidden], -1) @ fc_weight.T + fc_bias (checks its inputs).
void fused_draft_input_cpu(const at::Tensor& hidden, const at::Tensor& token_ids, const at::Tensor& embed_weight,
                           const at::Tensor& fc_weight, const std::optional<at::Tensor>& fc_bias, at::Tensor out);

// The skinny GEMM behind it, for float32 (skinny_linear.cpp uses it too): out [M, N] = a [M, K] @
// w [N, K].T (+ bias [N]); a contiguous, w with unit column stride. Columns are split over threads;
// every output is one fixed-order sum, whatever M, the tile it falls in or the thread count.
bool skinny_f32_available();  // AVX-512 CPU and build
void skinny_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& w, const float* bias);

}  // namespace eagle
