// C-ABI launcher of the compact_kv_cache CUDA kernel. No torch headers: this file and the .cu that
// implements it compile with plain nvcc.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// kv: base pointer of the [L, 2, B, H, S, D] cache; strides are in elements; element_size in bytes
// (1, 2, 4 or 8). accept_index is int64 when index_is_int64, else int32; accept_num and seqlens are
// int32. Rows outside a sequence's [0, S) are never read or written. Returns a cudaError_t.
int eagle_compact_kv_cache_cuda(void* kv, int64_t L, int64_t B, int64_t H, int64_t S, int64_t D,
                                int64_t s_layer, int64_t s_kv, int64_t s_b, int64_t s_h, int64_t s_pos,
                                int64_t element_size, const int32_t* seqlens, const void* accept_index,
                                int index_is_int64, const int32_t* accept_num, int64_t num_steps,
                                int64_t num_draft_tokens, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
