// tree_attention's scores for bfloat16 caches by VDPBF16PS, on CPUs with AVX512-BF16 but no AMX (AMD
// Zen 4 and later, Intel Cooper Lake).
//
// Why: the float32 path converts each bf16 K row to float32 (into scratch, or in registers) and takes
// dot products of 4 query rows x 4 keys whose 16 lane partials are then summed across lanes; for a
// verified tree on a Zen 4 core those conversions and horizontal sums were about half of the
// attention's time, and the attention about a fifth of the verify forward of the bundled model.
//
// How: keys along the lanes. A block of 16 keys is transposed once (16 x 16 32-bit transposes) so that
// one vector holds dims 2w, 2w + 1 of 16 keys (the VDPBF16PS operand layout, the pair as one 32-bit
// word); each query row's pair of the same dims is broadcast, and one VDPBF16PS adds both products to
// 16 keys' scores. No horizontal sums, no float32 copy of K, and half the multiply-adds of the float32
// path. Rows are taken 4 at a time over 32 keys (two blocks): 8 independent accumulator chains.
//
// Numerics: a score is one float32 accumulator taking the dim pairs w = 0, 1, ... in order (VDPBF16PS:
// exact products of bf16 values, denormal inputs read as zero), then times sm_scale. Nothing depends on
// the other rows of the call, the key's lane or block, so a tree token's scores equal those of the same
// token decoded alone (tests/kernels/test_tree_attention.py checks it bit for bit).
#include "tree_attention_dpbf16.h"

#include "panel_linear.h"

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__)
#define EAGLE_TA_DPBF16_BUILD 1
#include <immintrin.h>
#else
#define EAGLE_TA_DPBF16_BUILD 0
#endif

namespace eagle {
namespace tree_attn_dpbf16 {

// The instructions the bf16 panel linears need (AVX-512F/BW, AVX512-BF16): one check for both.
bool available() { return panel::bf16_available(); }

#if EAGLE_TA_DPBF16_BUILD
namespace {

#define EAGLE_TA_DPBF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

constexpr int64_t kBlockKeys = 16;  // keys per transposed block: one vector of float32 scores

// In place: r[i] lane j becomes r[j] lane i (a 16 x 16 matrix of 32-bit words).
EAGLE_TA_DPBF16_TARGET inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // within 128-bit lanes: words of rows 2i, 2i + 1 interleaved
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i + 3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c: lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512i even_a = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);  // lanes 0, 2 of each
    const __m512i odd_a = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);   // lanes 1, 3 of each
    const __m512i even_b = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i odd_b = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_i32x4(even_a, even_b, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(even_a, even_b, 0xDD);
    r[4 + c] = _mm512_shuffle_i32x4(odd_a, odd_b, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(odd_a, odd_b, 0xDD);
  }
}

// kt[w * 16 + j] = the dims 2w, 2w + 1 of key j (one word) for j < m, zero for m <= j < 16; w < words.
// Keys past m are not read (they may lie outside the cache).
EAGLE_TA_DPBF16_TARGET void transpose_keys(const c10::BFloat16* k, int64_t k_stride, int64_t m, int64_t words,
                                           uint32_t* kt) {
  for (int64_t w0 = 0; w0 < words; w0 += 16) {
    __m512i r[16];
    for (int64_t j = 0; j < kBlockKeys; ++j) {
      r[j] = j < m ? _mm512_loadu_si512(k + j * k_stride + 2 * w0) : _mm512_setzero_si512();
    }
    transpose16(r);
    for (int w = 0; w < 16; ++w) _mm512_storeu_si512(kt + (w0 + w) * kBlockKeys, r[w]);
  }
}

// Scores of RB query rows x KB blocks of 16 keys (keys of block b: kt + b * words * 16), lanes past
// mask[b] not stored.
template <int RB, int KB>
EAGLE_TA_DPBF16_TARGET void score_rows(const c10::BFloat16* q, int64_t D, const uint32_t* kt, int64_t words,
                                       const __mmask16* mask, float scale, float* s, int64_t ld_s) {
  __m512 acc[RB][KB];
  for (int r = 0; r < RB; ++r)
    for (int b = 0; b < KB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t w = 0; w < words; ++w) {
    __m512bh kv[KB];
    for (int b = 0; b < KB; ++b) kv[b] = (__m512bh)_mm512_loadu_si512(kt + (b * words + w) * kBlockKeys);
    for (int r = 0; r < RB; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, q + r * D + 2 * w, sizeof(pair));
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < KB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], qv, kv[b]);
    }
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int r = 0; r < RB; ++r)
    for (int b = 0; b < KB; ++b)
      _mm512_mask_storeu_ps(s + r * ld_s + b * kBlockKeys, mask[b], _mm512_mul_ps(acc[r][b], vscale));
}

template <int KB>
EAGLE_TA_DPBF16_TARGET void score_all_rows(const c10::BFloat16* q, int64_t R, int64_t D, const uint32_t* kt,
                                           int64_t words, const __mmask16* mask, float scale, float* s,
                                           int64_t ld_s) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) score_rows<4, KB>(q + r * D, D, kt, words, mask, scale, s + r * ld_s, ld_s);
  switch (R - r) {
    case 3: score_rows<3, KB>(q + r * D, D, kt, words, mask, scale, s + r * ld_s, ld_s); break;
    case 2: score_rows<2, KB>(q + r * D, D, kt, words, mask, scale, s + r * ld_s, ld_s); break;
    case 1: score_rows<1, KB>(q + r * D, D, kt, words, mask, scale, s + r * ld_s, ld_s); break;
    default: break;
  }
}

}  // namespace

void score_block(const c10::BFloat16* q, int64_t R, int64_t D, const c10::BFloat16* k, int64_t k_stride, int64_t nb,
                 float scale, float* s, int64_t ld_s, uint32_t* kt) {
  const int64_t words = D / 2;
  for (int64_t j0 = 0; j0 < nb; j0 += kKeysPerPass) {
    const int64_t m = std::min(kKeysPerPass, nb - j0);
    const int64_t blocks = (m + kBlockKeys - 1) / kBlockKeys;
    __mmask16 mask[2];
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t mb = std::min(kBlockKeys, m - b * kBlockKeys);
      transpose_keys(k + (j0 + b * kBlockKeys) * k_stride, k_stride, mb, words, kt + b * words * kBlockKeys);
      mask[b] = static_cast<__mmask16>((1u << mb) - 1u);
    }
    if (blocks == 2) {
      score_all_rows<2>(q, R, D, kt, words, mask, scale, s + j0, ld_s);
    } else {
      score_all_rows<1>(q, R, D, kt, words, mask, scale, s + j0, ld_s);
    }
  }
}

#else
void score_block(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t, float, float*,
                 int64_t, uint32_t*) {}
#endif  // EAGLE_TA_DPBF16_BUILD

}  // namespace tree_attn_dpbf16
}  // namespace eagle
