// C-ABI launcher of the build_tree CUDA kernel. No torch headers: this file and the .cu that
// implements it compile with plain nvcc.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Index tensors are int64 when their *_is_int64 flag is set, else int32; retrive_index,
// retrive_next_token and retrive_next_sibling ([B, n]) have selected_index's dtype. parent_list is
// [B, parent_width], selected_index [B, n-1], seq_lens [B], positions [B*n] int64, all contiguous.
// tree_mask: mask_mode 0 (full) and 1 (qlen bool) bytes (bool), 2 (u8 bits) bytes, 3 (i32 bits)
// int32 words; mask_numel is its element count (the full layout is bounds-checked against it).
// Malformed slots get positions == -1 (see build_tree.cu). Returns a cudaError_t.
int eagle_build_tree_cuda(const void* parent_list, int parent_is_int64, int64_t parent_width,
                          const void* selected_index, int selected_is_int64, const void* seq_lens,
                          int seq_lens_is_int64, void* tree_mask, int64_t mask_numel, int mask_mode,
                          int64_t* positions, void* retrive_index, void* retrive_next_token,
                          void* retrive_next_sibling, int64_t batch, int64_t topk, int64_t depth,
                          int64_t num_draft_tokens, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
