// tree_attention scores on Intel AMX tiles, for bfloat16 caches with head dims a multiple of 32.
//
// Why: converting each bf16 K row to float32 and taking dot products on AVX-512 made the scores about
// half of a verified tree's attention on a CPU (and the attention grows with the tree while the AMX
// linears stay flat up to 16 rows). One TDPBF16PS multiplies 16 keys x 32 dims by 16 query rows.
//
// Layout: C = K Q^T, so the A tile is 16 K rows of 32 dims read in place from the cache (no
// conversion, no copy), and the B tile holds 16 query rows in the pair-interleaved layout TDPBF16PS
// reads: qb[((kd * groups + g) * 16 + i) * 32 + 2 * n + j] = q[g * 16 + n, kd * 32 + 2 * i + j]
// (the caller packs it once per task). C[key, row] is then gathered into the scores' row-major layout.
//
// Numerics: a score is q . k summed in float32 over d in blocks of 32 (the hardware's pairwise FMA
// inside a block; the products of bf16 values are exact), times sm_scale. Each element of C depends
// only on its K row and query row, so a row's scores are the same whatever the other rows of the call,
// its column in the tile or its key's position: the row-invariance the decoding loop relies on holds.
#include "tree_attention_amx.h"

#include "amx_linear.h"

#include <c10/util/Exception.h>

#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define EAGLE_TA_AMX_BUILD 1
#include <immintrin.h>
#else
#define EAGLE_TA_AMX_BUILD 0
#endif

namespace eagle {
namespace tree_attn_amx {

bool available() { return amx::bf16_available(); }

#if EAGLE_TA_AMX_BUILD
namespace {

constexpr int kTileBytes = 64;  // bytes per tile row
constexpr int kTileElems = 16 * 32;  // bf16 elements of an A or B tile

}  // namespace

#define EAGLE_TA_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))

// C tmm0-3 [16 keys x 16 rows fp32], A tmm4 [16 keys x 32 dims bf16], B tmm5 [16 dim pairs x 16 rows x 2].
void begin() {
  const uint8_t rows[8] = {16, 16, 16, 16, 16, 16, 0, 0};
  amx::load_tile_config(rows);
}

EAGLE_TA_AMX_TARGET void end() { _tile_release(); }

// The tile register of a TDPBF16PS is an immediate: one expansion per row group.
#define EAGLE_TA_GROUP_DP(g)                          \
  do {                                                \
    _tile_loadd(5, b + (g) * kTileElems, kTileBytes); \
    _tile_dpbf16ps(g, 4, 5);                          \
  } while (0)

EAGLE_TA_AMX_TARGET void score_block(const c10::BFloat16* qb, int64_t R, int64_t D, const c10::BFloat16* k,
                                     int64_t k_stride, int64_t nb, float scale, float* s, int64_t ld_s,
                                     c10::BFloat16* tail) {
  const int64_t groups = (R + kRowsPerGroup - 1) / kRowsPerGroup, dtiles = D / kDimsPerTile;
  alignas(64) float c[4 * 256];
  const __m512i key_offsets = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(16));
  const __m512 vscale = _mm512_set1_ps(scale);
  __asm__ volatile("" ::: "memory");  // qb (and the caller's stores) are complete before the tile loads
  for (int64_t j0 = 0; j0 < nb; j0 += 16) {
    const int64_t m = nb - j0 < 16 ? nb - j0 : 16;
    const c10::BFloat16* kb = k + j0 * k_stride;
    int64_t stride = k_stride * static_cast<int64_t>(sizeof(c10::BFloat16));
    if (m < 16) {  // a ragged last block: rows past it may lie outside the cache
      for (int64_t jj = 0; jj < m; ++jj) std::memcpy(tail + jj * D, kb + jj * k_stride, D * sizeof(c10::BFloat16));
      std::memset(static_cast<void*>(tail + m * D), 0, (16 - m) * D * sizeof(c10::BFloat16));
      kb = tail, stride = D * static_cast<int64_t>(sizeof(c10::BFloat16));
      // GCC's tile-load intrinsics are asm without a memory operand: keep the copy before them.
      __asm__ volatile("" ::: "memory");
    }
    _tile_zero(0);
    if (groups > 1) _tile_zero(1);
    if (groups > 2) _tile_zero(2);
    if (groups > 3) _tile_zero(3);
    for (int64_t kd = 0; kd < dtiles; ++kd) {
      _tile_loadd(4, kb + kd * kDimsPerTile, stride);
      const c10::BFloat16* b = qb + kd * groups * kTileElems;
      EAGLE_TA_GROUP_DP(0);
      if (groups > 1) EAGLE_TA_GROUP_DP(1);
      if (groups > 2) EAGLE_TA_GROUP_DP(2);
      if (groups > 3) EAGLE_TA_GROUP_DP(3);
    }
    _tile_stored(0, c, kTileBytes);
    if (groups > 1) _tile_stored(1, c + 256, kTileBytes);
    if (groups > 2) _tile_stored(2, c + 512, kTileBytes);
    if (groups > 3) _tile_stored(3, c + 768, kTileBytes);
    __asm__ volatile("" ::: "memory");  // the gathers below read what the tile stores wrote
    const __mmask16 keys = static_cast<__mmask16>((1u << m) - 1u);
    for (int64_t r = 0; r < R; ++r) {  // c[g][key][n] -> s[g * 16 + n, j0 + key]
      const __m512i idx = _mm512_add_epi32(key_offsets, _mm512_set1_epi32(static_cast<int>(r % 16)));
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keys, idx, c + (r / 16) * 256, 4);
      _mm512_mask_storeu_ps(s + r * ld_s + j0, keys, _mm512_mul_ps(v, vscale));
    }
  }
}
#undef EAGLE_TA_GROUP_DP

#else  // available() is false: nothing calls these
void begin() { TORCH_CHECK(false, "tree_attention: AMX scores are not built on this platform"); }
void end() {}
void score_block(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t, float, float*,
                 int64_t, c10::BFloat16*) {
  TORCH_CHECK(false, "tree_attention: AMX scores are not built on this platform");
}
#endif  // EAGLE_TA_AMX_BUILD

}  // namespace tree_attn_amx
}  // namespace eagle
