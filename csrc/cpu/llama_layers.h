// The CPU fast path's entry points (llama_layers.cpp), for the C++ draft loop (draft_tree.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <optional>
#include <vector>

namespace eagle {
namespace llama_layers {

using OptTensor = std::optional<at::Tensor>;

// cos and signed sin [B, T, 1, D] in `dtype` for positions [B, T] (default seqlens[b] + past + t).
std::vector<at::Tensor> rope_cos_sin_cpu(const std::optional<at::Tensor>& positions, const at::Tensor& cache_seqlens,
                                         int64_t past, int64_t T, const at::Tensor& doubled_inv_freq,
                                         const at::Tensor& signs, at::ScalarType dtype);

// LlamaModel.forward after its checks and RoPE tables: [hidden after the final norm, logits at
// logits_index (undefined without lm_head), *hidden states entering the layers in capture].
std::vector<at::Tensor> llama_forward_cpu(const at::Tensor& input_ids, const at::Tensor& embed_weight,
                                          const c10::List<OptTensor>& weights, const at::Tensor& kv,
                                          const at::Tensor& cos, const at::Tensor& sin,
                                          const at::Tensor& cache_seqlens, const OptTensor& tree_mask, int64_t past,
                                          int64_t num_heads, int64_t num_kv_heads, double eps,
                                          at::IntArrayRef capture, const at::Tensor& norm_weight,
                                          const OptTensor& lm_head, const OptTensor& logits_index);

// EAGLE-1/2 head forward: [h] or [h, logits at logits_index] (lm_head given).
std::vector<at::Tensor> eagle2_head_cpu(const at::Tensor& hidden, const at::Tensor& token_ids,
                                        const at::Tensor& embed_weight, const at::Tensor& fc_weight,
                                        const OptTensor& fc_bias, const c10::List<OptTensor>& weights,
                                        const at::Tensor& kv, const at::Tensor& cos, const at::Tensor& sin,
                                        const at::Tensor& cache_seqlens, const OptTensor& tree_mask, int64_t past,
                                        int64_t num_heads, int64_t num_kv_heads, double eps, const OptTensor& lm_head,
                                        const OptTensor& logits_index);

}  // namespace llama_layers
}  // namespace eagle
