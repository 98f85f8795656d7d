#pragma once
#include <ATen/core/Tensor.h>

namespace eagle {

// Tree mask layouts (ids 0..2 are SGLang's TreeMaskMode).
enum BuildTreeMaskMode : int64_t { kFullMask = 0, kQlenBool = 1, kQlenBitsU8 = 2, kQlenBitsI32 = 3 };

// Bytes per packed row in kQlenBitsU8 mode: 1, 2 or 4 for n <= 8, 16, 32.
inline int64_t build_tree_u8_bytes(int64_t n) { return n <= 8 ? 1 : (n <= 16 ? 2 : 4); }

// Shape/dtype/device checks shared by the CPU kernel and the CUDA binding. The size of a kFullMask
// mask depends on seq_lens' values and is checked by the kernels.
void check_build_tree_args(const at::Tensor& parent_list, const at::Tensor& selected_index,
                           const at::Tensor& seq_lens, const at::Tensor& tree_mask,
                           const at::Tensor& positions, const at::Tensor& retrive_index,
                           const at::Tensor& retrive_next_token, const at::Tensor& retrive_next_sibling,
                           int64_t topk, int64_t depth, int64_t num_draft_tokens, int64_t mask_mode);

// The CPU kernel behind eagle_C::build_tree (outputs pre-allocated; see eagle_kernels/build_tree.py).
void build_tree_cpu(const at::Tensor& parent_list, const at::Tensor& selected_index, const at::Tensor& seq_lens,
                    at::Tensor tree_mask, at::Tensor positions, at::Tensor retrive_index,
                    at::Tensor retrive_next_token, at::Tensor retrive_next_sibling, int64_t topk, int64_t depth,
                    int64_t n, int64_t mask_mode);

}  // namespace eagle
