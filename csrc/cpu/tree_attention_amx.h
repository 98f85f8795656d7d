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

// Configure this thread's tiles for score_block and attend_pv; release them after the task's last call.
void begin();
void end();

// s[r * ld_s + j] = scale * sum_d q[r, d] * k[j, d] for r < R, j < nb (nb <= 128), with qb the R query
// rows packed by the caller as B tiles (see tree_attention_amx.cpp) and k's rows k_stride elements
// apart (contiguous along d). Every score is one float32 sum over d in blocks of 32 (the hardware's
// pairwise FMA within a block), the same whatever R, nb and the row's place in the tile, so a row's
// scores do not depend on the rows beside it. tail: scratch for 16 x D bf16 (a ragged last block).
void score_block(const c10::BFloat16* qb, int64_t R, int64_t D, const c10::BFloat16* k, int64_t k_stride, int64_t nb,
                 float scale, float* s, int64_t ld_s, c10::BFloat16* tail);

// ---- P @ V on AMX tiles ----------------------------------------------------------------------------
//
// The probabilities are rounded to bf16 (as flash attention does on GPUs) and multiplied with V on
// tiles, 32 keys per TDPBF16PS. The hardware does not sum those 32 products one after the other
// (measured: its result depends on where zero products sit inside a block), so a row's result is a
// function of its (probability, V row) sequence *and of the sequence's block boundaries*. attend_pv
// keeps both the same for a tree token and the same token decoded after its path was committed: every
// row's keys are taken as one sequence from key 0 in blocks of 32 (the prefix in place; a tree
// token's visible new keys packed right after the committed prefix, see attend_pv).
constexpr int64_t kKeysPerBlock = 32;

// The task's rows as attend_pv needs them: row r is token (r_begin + r) / G of the T new tokens.
struct PvRows {
  int64_t R, r_begin, G, T;
  int64_t seqlen;          // committed keys, visible to every row
  int64_t n_keys;          // keys with probabilities: seqlen + the new keys the task's rows may see
  const uint8_t* visible;  // [T, T] 0/1 among the new tokens (nullptr: causal)
};

// Scratch bytes attend_pv needs for up to `rows` rows and T new tokens, head dim D (not growing with the
// cache: pass 1 goes through the keys in chunks).
int64_t pv_scratch_bytes(int64_t rows, int64_t D, int64_t T);

// o[r, :D] = sum_j P[r, j] v[j, :] and l[r] = sum_j P[r, j] for r < R, with P[r, j] the bf16 rounding
// of p[r * ld_p + j] (fp32 probabilities of keys j < n_keys at their cache positions, 0 where masked)
// and v's rows s_pos elements apart (dims s_d apart). o: fp32 [round_up(R, 16), D] (rows past R are
// scratch); D % 32 == 0. A row's outputs depend only on its own sequence of visible keys.
void attend_pv(const PvRows& rows, const float* p, int64_t ld_p, const c10::BFloat16* v, int64_t s_pos, int64_t s_d,
               int64_t D, float* o, float* l, char* scratch);

}  // namespace tree_attn_amx
}  // namespace eagle
