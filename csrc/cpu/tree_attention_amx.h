// tree_attention's scores on Intel AMX tiles for bfloat16 caches (see tree_attention_amx.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace eagle {
namespace tree_attn_amx {

constexpr int64_t kRowsPerGroup = 16;  // query rows per B tile (its columns)
constexpr int64_t kDimsPerTile = 32;   // bf16 head dims per tile row (64 bytes)

// True when the scores may run on AMX: the CPU has AMX-BF16 and the OS granted the tile state.
bool available();

// Elements of the packed query buffer for R rows of head dim D (D % 32 == 0).
inline int64_t packed_q_elems(int64_t R, int64_t D) {
  return (D / kDimsPerTile) * ((R + kRowsPerGroup - 1) / kRowsPerGroup) * kRowsPerGroup * kDimsPerTile;
}

// Configure this thread's tiles for score_block; release them after the task's last call.
void begin();
void end();

// s[r * ld_s + j] = scale * sum_d q[r, d] * k[j, d] for r < R, j < nb (nb <= 128), with qb the R query
// rows packed by the caller as B tiles (see tree_attention_amx.cpp) and k's rows k_stride elements
// apart (contiguous along d). Every score is one float32 sum over d in blocks of 32 (the hardware's
// pairwise FMA within a block), the same whatever R, nb and the row's place in the tile, so a row's
// scores do not depend on the rows beside it. tail: scratch for 16 x D bf16 (a ragged last block).
void score_block(const c10::BFloat16* qb, int64_t R, int64_t D, const c10::BFloat16* k, int64_t k_stride, int64_t nb,
                 float scale, float* s, int64_t ld_s, c10::BFloat16* tail);

}  // namespace tree_attn_amx
}  // namespace eagle
