// C-ABI launcher of the tree_speculative_sampling CUDA kernel. No torch headers: this file and the .cu
// that implements it compile with plain nvcc.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// One thread block per sequence. Tensors are raw pointers:
//   candidates [B, n] (int64 when cand_is_int64, else int32); retrive_index / retrive_next_token /
//   retrive_next_sibling [B, n] (int64 when idx_is_int64, else int32), contiguous;
//   target_probs / draft_probs [B, n, V] float32 with strides (s_b, s_n, 1); draft_probs may be null
//   (deterministic drafts); uniform_samples [B, n], uniform_final [B] float32;
//   outputs predicts [B*n], accept_index [B, num_spec_steps], accept_token_num [B], status [B] int32.
// lossy selects SGLang's relaxed acceptance (deterministic drafts only). Returns a cudaError_t.
int eagle_tree_speculative_sampling_cuda(const void* candidates, int cand_is_int64, const void* retrive_index,
                                         const void* retrive_next_token, const void* retrive_next_sibling,
                                         int idx_is_int64, const float* target_probs, int64_t sp_b, int64_t sp_n,
                                         const float* draft_probs, int64_t sq_b, int64_t sq_n,
                                         const float* uniform_samples, const float* uniform_final, int32_t* predicts,
                                         int32_t* accept_index, int32_t* accept_token_num, int32_t* status, int64_t B,
                                         int64_t n, int64_t V, int64_t num_spec_steps, int lossy,
                                         float threshold_single, float threshold_acc, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
