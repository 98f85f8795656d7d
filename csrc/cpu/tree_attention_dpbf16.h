// tree_attention's scores by AVX512-BF16 dot products for bfloat16 caches on CPUs without AMX (see
// tree_attention_dpbf16.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace eagle {
namespace tree_attn_dpbf16 {

constexpr int64_t kDimsMultiple = 32;  // head dims this path takes: a multiple of 32 (16 dim pairs)
constexpr int64_t kKeysPerPass = 32;   // keys whose scores a pass over the query rows computes

// True when this CPU runs it: AVX-512F, AVX-512BW and AVX512-BF16.
bool available();

// 32-bit words of the scratch score_block needs for head dim D: 32 keys' dim pairs, transposed.
inline int64_t scratch_words(int64_t D) { return kKeysPerPass * (D / 2); }

// s[r * ld_s + j] = scale * sum_d q[r * D + d] * k[j * k_stride + d] for r < R, j < nb, with q the R
// query rows (bf16, unscaled, contiguous) and k's rows contiguous along d; D % 32 == 0. Every score is
// one float32 chain of VDPBF16PS steps over the dim pairs in order (exact products of bf16 values),
// times scale: it depends on its query row and key row only, not on the rows beside it or the key's
// position. kt: scratch_words(D) words.
void score_block(const c10::BFloat16* q, int64_t R, int64_t D, const c10::BFloat16* k, int64_t k_stride, int64_t nb,
                 float scale, float* s, int64_t ld_s, uint32_t* kt);

}  // namespace tree_attn_dpbf16
}  // namespace eagle
