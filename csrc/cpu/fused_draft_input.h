// The CPU fused_draft_input kernel, for the C++ draft-head op in llama_layers.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace eagle {

// out [N, H] = cat([embed_weight[token_ids], hidden], -1) @ fc_weight.T + fc_bias (checks its inputs).
void fused_draft_input_cpu(const at::Tensor& hidden, const at::Tensor& token_ids, const at::Tensor& embed_weight,
                           const at::Tensor& fc_weight, const std::optional<at::Tensor>& fc_bias, at::Tensor out);

}  // namespace eagle
