// C-ABI launcher of the verify_tree_greedy CUDA kernel. No torch headers: this file and the .cu that
// implements it compile with plain nvcc.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Largest tree (slots per sequence) the kernel handles: its shared-memory scratch is 16 * n bytes.
#define EAGLE_VERIFY_TREE_GREEDY_MAX_N 2048

// Inputs are [B, n] row-major arrays; candidates / target_predict are int64 when *_is_int64 else
// int32, and the three tree arrays share one dtype (tree_is_int64). Outputs: predicts [B*n] (must be
// zero-filled by the caller), accept_index [B, num_steps], accept_num [B], all int32.
// Returns a cudaError_t (cudaErrorInvalidValue when n is out of [1, EAGLE_VERIFY_TREE_GREEDY_MAX_N]).
int eagle_verify_tree_greedy_cuda(const void* candidates, int candidates_is_int64, const void* retrive_index,
                                  const void* retrive_next_token, const void* retrive_next_sibling,
                                  int tree_is_int64, const void* target_predict, int target_is_int64,
                                  int32_t* predicts, int32_t* accept_index, int32_t* accept_num, int64_t B,
                                  int64_t n, int64_t num_steps, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
