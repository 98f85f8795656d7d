// tree_attention on Intel AMX tiles for bfloat16 caches with head dims a multiple of 32: the scores
// (score_block) and P @ V (attend_pv).
//
// Why: converting each bf16 K row to float32 and taking dot products on AVX-512 made the scores about
// half of a verified tree's attention on a CPU (and the attention grows with the tree while the AMX
// linears stay flat up to 16 rows). One TDPBF16PS multiplies 16 keys x 32 dims by 16 query rows. Once
// the scores were on tiles, P @ V in float32 FMAs (with V converted to float32) was over half of what
// was left.
//
// Scores' layout: C = K Q^T, so the A tile is 16 K rows of 32 dims read in place from the cache (no
// conversion, no copy), and the B tile holds 16 query rows in the pair-interleaved layout TDPBF16PS
// reads: qb[((kd * groups + g) * 16 + i) * 32 + 2 * n + j] = q[g * 16 + n, kd * 32 + 2 * i + j]
// (the caller packs it once per task). C[key, row] is then gathered into the scores' row-major layout.
//
// Scores' numerics: a score is q . k summed in float32 over d in blocks of 32 (the hardware's own sum
// inside a block, of exact products of bf16 values), times sm_scale. Each element of C depends only on
// its K row and query row, so a row's scores are the same whatever the other rows of the call, its
// column in the tile or its key's position: the row-invariance the decoding loop relies on holds.
//
// P @ V's numerics: see attend_pv and tree_attention_amx.h. The hardware's sum inside a block is not
// one float32 add after the other: with the same products, a row's result changed with where zero
// products sat in its blocks (about 1 bf16 output in 10^5 differed when a tree row kept its keys at
// their slots instead of packed as in decoding; tests/kernels/test_tree_attention.py).
#include "tree_attention_amx.h"

#include "amx_linear.h"

#include <c10/util/Exception.h>

#include <algorithm>
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

// Every tile 16 rows of 64 bytes: score_block's C tmm0-3 [16 keys x 16 rows fp32], A tmm4 [16 keys x 32
// dims bf16], B tmm5 [16 dim pairs x 16 rows x 2]; attend_pv's pass 1 (see pv_configure) too, so a
// task configures its tiles once for both.
void begin() {
  const uint8_t rows[8] = {16, 16, 16, 16, 16, 16, 16, 16};
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

// ---- P @ V -------------------------------------------------------------------------------------------
namespace {

// Tiles: C tmm0-3 [rows x 16 dims fp32], C tmm4 [rows x 16] the row sums (every column the same),
// A tmm5 [rows x 32 keys bf16] probabilities, B tmm6 [16 key pairs x 16 dims x 2] V, B tmm7 all ones.
constexpr int64_t kDimsPerCTile = 16;
constexpr int64_t kDimTilesPerPass = 4;
constexpr int64_t kChunkKeys = 512;  // pass 1's keys per packed V chunk (64 KB of V at D = 64)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename X>
X* carve(char*& cursor, int64_t count) {
  X* p = reinterpret_cast<X*>(cursor);
  cursor += round_up(count * static_cast<int64_t>(sizeof(X)), 64);
  return p;
}

alignas(64) const uint16_t kOnesTile[16 * 32] = {
#define EAGLE_ONE8 0x3F80, 0x3F80, 0x3F80, 0x3F80, 0x3F80, 0x3F80, 0x3F80, 0x3F80
#define EAGLE_ONE64 EAGLE_ONE8, EAGLE_ONE8, EAGLE_ONE8, EAGLE_ONE8, EAGLE_ONE8, EAGLE_ONE8, EAGLE_ONE8, EAGLE_ONE8
    EAGLE_ONE64, EAGLE_ONE64, EAGLE_ONE64, EAGLE_ONE64, EAGLE_ONE64, EAGLE_ONE64, EAGLE_ONE64, EAGLE_ONE64};
#undef EAGLE_ONE64
#undef EAGLE_ONE8

// permutex2var indices interleaving two rows a, b of 32 bf16: lo = (a0 b0 a1 b1 .. a15 b15), hi = a16..31.
alignas(64) const uint16_t kInterleaveLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) const uint16_t kInterleaveHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

#define EAGLE_PV_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

// 32 bf16 of a V row from dim d0 (row == nullptr: zeros, a padding key).
EAGLE_PV_TARGET inline __m512i load_dims(const c10::BFloat16* row, int64_t d0, int64_t s_d) {
  if (row == nullptr) return _mm512_setzero_si512();
  if (s_d == 1) return _mm512_loadu_si512(row + d0);
  alignas(64) c10::BFloat16 tmp[32];
  for (int64_t i = 0; i < 32; ++i) tmp[i] = row[(d0 + i) * s_d];
  return _mm512_load_si512(tmp);
}

// V rows keys[0..n) (keys == nullptr: rows 0..n-1) as B tiles: block kb's dim tile dt sits at
// out + (kb * D / 16 + dt) * 512, its row i holding for each of its 16 dims c the pair
// (V[key 32 kb + 2i][16 dt + c], V[key 32 kb + 2i + 1][16 dt + c]) (the layout TDPBF16PS reads).
// Keys past n are zero.
EAGLE_PV_TARGET void pack_v(const c10::BFloat16* v, int64_t s_pos, int64_t s_d, int64_t D, const int32_t* keys,
                            int64_t n, c10::BFloat16* out) {
  const int64_t dtiles = D / kDimsPerCTile, blocks = (n + kKeysPerBlock - 1) / kKeysPerBlock;
  const __m512i lo = _mm512_load_si512(kInterleaveLo), hi = _mm512_load_si512(kInterleaveHi);
  for (int64_t kb = 0; kb < blocks; ++kb) {
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t j0 = kb * kKeysPerBlock + 2 * i, j1 = j0 + 1;
      const c10::BFloat16* r0 = j0 < n ? v + (keys == nullptr ? j0 : keys[j0]) * s_pos : nullptr;
      const c10::BFloat16* r1 = j1 < n ? v + (keys == nullptr ? j1 : keys[j1]) * s_pos : nullptr;
      c10::BFloat16* dst = out + kb * dtiles * 512 + i * 32;
      for (int64_t c = 0; c < D / 32; ++c) {
        const __m512i a = load_dims(r0, c * 32, s_d), b = load_dims(r1, c * 32, s_d);
        _mm512_storeu_si512(dst + (2 * c) * 512, _mm512_permutex2var_epi16(a, lo, b));
        _mm512_storeu_si512(dst + (2 * c + 1) * 512, _mm512_permutex2var_epi16(a, hi, b));
      }
    }
  }
}

// dst[0..n_out) = the bf16 rounding (VCVTNEPS2BF16: to nearest even, subnormals flushed) of src[0..n),
// then zeros. Every probability goes through this one conversion, whichever path its row takes.
EAGLE_PV_TARGET void to_bf16(const float* src, int64_t n, c10::BFloat16* dst, int64_t n_out) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j)));
  if (j < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1u);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + j)));
    j += 16;
  }
  if (j < n_out) std::memset(static_cast<void*>(dst + j), 0, (n_out - j) * sizeof(c10::BFloat16));
}

// Tiles for `rows` query rows (C and A tiles) and the two 16-row B tiles.
void pv_configure(int64_t rows) {
  const uint8_t r = static_cast<uint8_t>(rows);
  const uint8_t config[8] = {r, r, r, r, r, r, 16, 16};
  amx::load_tile_config(config);
}

#define EAGLE_PV_DP(t)                                                    \
  do {                                                                    \
    _tile_loadd(6, b + (t) * 512, 64);                                    \
    _tile_dpbf16ps(t, 5, 6);                                              \
  } while (0)
#define EAGLE_PV_TILES(op) \
  do {                     \
    op(0);                 \
    if (nd > 1) op(1);     \
    if (nd > 2) op(2);     \
    if (nd > 3) op(3);     \
  } while (0)

// o[r, :D] += p[r, :32 * blocks] @ V and l16[r, :] += the row's sum of p, for the configured rows,
// block after block (from_zero: o and l16 start at 0). p: bf16 rows ld_p apart; vt: pack_v's layout;
// o: fp32 rows ldo apart; l16: fp32 [rows, 16].
EAGLE_PV_TARGET void pv_accumulate(const c10::BFloat16* p, int64_t ld_p, const c10::BFloat16* vt, int64_t blocks,
                                   int64_t D, float* o, int64_t ldo, float* l16, bool from_zero) {
  const int64_t dtiles = D / kDimsPerCTile, p_stride = ld_p * 2, o_stride = ldo * 4;
  __asm__ volatile("" ::: "memory");  // p, vt and o are written before the tile loads read them
  _tile_loadd(7, kOnesTile, 64);
  for (int64_t d0 = 0; d0 < dtiles; d0 += kDimTilesPerPass) {
    const int64_t nd = dtiles - d0 < kDimTilesPerPass ? dtiles - d0 : kDimTilesPerPass;
    const bool sums = d0 == 0;
    float* ob = o + d0 * kDimsPerCTile;
#define EAGLE_PV_ZERO(t) _tile_zero(t)
#define EAGLE_PV_LOAD(t) _tile_loadd(t, ob + (t) * kDimsPerCTile, o_stride)
#define EAGLE_PV_STORE(t) _tile_stored(t, ob + (t) * kDimsPerCTile, o_stride)
    if (from_zero) {
      EAGLE_PV_TILES(EAGLE_PV_ZERO);
      if (sums) _tile_zero(4);
    } else {
      EAGLE_PV_TILES(EAGLE_PV_LOAD);
      if (sums) _tile_loadd(4, l16, 64);
    }
    for (int64_t kb = 0; kb < blocks; ++kb) {
      _tile_loadd(5, p + kb * kKeysPerBlock, p_stride);
      const c10::BFloat16* b = vt + (kb * dtiles + d0) * 512;
      EAGLE_PV_TILES(EAGLE_PV_DP);
      if (sums) _tile_dpbf16ps(4, 5, 7);
    }
    EAGLE_PV_TILES(EAGLE_PV_STORE);
    if (sums) _tile_stored(4, l16, 64);
#undef EAGLE_PV_ZERO
#undef EAGLE_PV_LOAD
#undef EAGLE_PV_STORE
  }
  __asm__ volatile("" ::: "memory");  // the tile stores are complete before o and l16 are read
}
#undef EAGLE_PV_TILES
#undef EAGLE_PV_DP

// True when token t sees a leading run of the new tokens (0..c-1) and none after it: causal rows, a
// chain, a tree's first branch. Such a row's keys are already one gap-free sequence in the cache.
bool sees_new_prefix(const PvRows& rw, int64_t t) {
  if (rw.visible == nullptr) return true;
  const uint8_t* row = rw.visible + t * rw.T;
  int64_t j = 0;
  while (j < rw.T && row[j] != 0) ++j;
  for (; j < rw.T; ++j)
    if (row[j] != 0) return false;
  return true;
}

}  // namespace

int64_t pv_scratch_bytes(int64_t rows, int64_t D, int64_t T) {
  const int64_t r16 = round_up(rows, 16);
  const int64_t tail = round_up(kKeysPerBlock - 1 + T, kKeysPerBlock);  // a tree row's packed keys, at most
  const int64_t bytes[] = {16 * kChunkKeys * 2, kChunkKeys * D * 2, r16 * 16 * 4, 16 * tail * 2, tail * 4,
                           tail * D * 2, tail * 4, rows * 8};
  int64_t total = 0;
  for (int64_t b : bytes) total += round_up(b, 64);
  return total;
}

// Every row's keys form one sequence taken from key 0 in blocks of 32, as for the same token decoded
// alone. Rows that see a leading run of the new tokens keep all their keys in place (pass 1, 16 rows
// per tile, each chunk of V packed once for all of them). A tree row shares the blocks below tail0 (the
// last multiple of 32 at or below the committed length) and takes the rest (committed keys
// tail0..seqlen, then its visible new keys in order, packed together) in pass 2, starting from pass 1's
// sums: the same blocks, positions and values the decoded token has once its path is committed. In
// pass 1 its probabilities from tail0 on are zeroed; an all-zero block leaves a tile's sums unchanged
// (measured; only a subnormal sum would be flushed, and a row's sum includes its largest key's 1 * v).
// Pass 1 takes kChunkKeys keys at a time (V packed and probabilities rounded per chunk, so they stay in
// cache and the scratch does not grow with the cache); its tiles' sums go through o and l16 between
// chunks, exactly (float32 stores and loads).
EAGLE_PV_TARGET void attend_pv(const PvRows& rw, const float* p, int64_t ld_p, const c10::BFloat16* v, int64_t s_pos,
                               int64_t s_d, int64_t D, float* o, float* l, char* scratch) {
  const int64_t R = rw.R, r16 = round_up(R, 16);
  const int64_t tail0 = rw.seqlen / kKeysPerBlock * kKeysPerBlock;
  const int64_t tail = round_up(kKeysPerBlock - 1 + rw.T, kKeysPerBlock);
  char* cursor = scratch;
  c10::BFloat16* pb = carve<c10::BFloat16>(cursor, 16 * kChunkKeys);
  c10::BFloat16* vt = carve<c10::BFloat16>(cursor, kChunkKeys * D);
  float* l16 = carve<float>(cursor, r16 * 16);
  c10::BFloat16* p2 = carve<c10::BFloat16>(cursor, 16 * tail);
  float* f2 = carve<float>(cursor, tail);
  c10::BFloat16* vt2 = carve<c10::BFloat16>(cursor, tail * D);
  int32_t* idx = carve<int32_t>(cursor, tail);
  int64_t* row_keys = carve<int64_t>(cursor, R);  // pass 1's keys of each row

  auto token_of = [&](int64_t r) { return (rw.r_begin + r) / rw.G; };
  // Pass 1 takes all of a row's keys, or a tree row's below tail0.
  bool any_tree = false;
  int64_t pass1_keys = 0;
  for (int64_t r = 0; r < R; ++r) {
    const bool in_place = sees_new_prefix(rw, token_of(r));
    any_tree |= !in_place;
    row_keys[r] = in_place ? rw.n_keys : tail0;
    pass1_keys = std::max(pass1_keys, row_keys[r]);
  }

  for (int64_t c0 = 0; c0 == 0 || c0 < pass1_keys; c0 += kChunkKeys) {
    const int64_t chunk = std::min(kChunkKeys, std::max<int64_t>(0, pass1_keys - c0));
    pack_v(v + c0 * s_pos, s_pos, s_d, D, nullptr, chunk, vt);
    for (int64_t g0 = 0; g0 < R; g0 += 16) {
      const int64_t g1 = std::min(R, g0 + 16);
      int64_t group_keys = 0;
      for (int64_t r = g0; r < g1; ++r) group_keys = std::max(group_keys, row_keys[r]);
      const int64_t blocks = (std::min(group_keys - c0, chunk) + kKeysPerBlock - 1) / kKeysPerBlock;
      if (c0 > 0 && blocks <= 0) continue;  // (the first chunk always runs: it zeroes o and l16)
      const int64_t ld = round_up(std::max<int64_t>(chunk, 1), kKeysPerBlock);
      for (int64_t r = g0; r < g1; ++r) {
        to_bf16(p + r * ld_p + c0, std::max<int64_t>(0, std::min(row_keys[r] - c0, chunk)), pb + (r - g0) * ld, ld);
      }
      // the tiles have 16 rows (begin()'s configuration): those past the group's multiply zeros
      std::memset(static_cast<void*>(pb + (g1 - g0) * ld), 0, (16 - (g1 - g0)) * ld * sizeof(c10::BFloat16));
      pv_accumulate(pb, ld, vt, std::max<int64_t>(blocks, 0), D, o + g0 * D, D, l16 + g0 * 16, c0 == 0);
    }
  }

  if (any_tree) {
    int64_t configured = 16;
    for (int64_t t = token_of(0); t <= token_of(R - 1); ++t) {
      if (sees_new_prefix(rw, t)) continue;
      int64_t n = 0;  // the token's keys from tail0 on: committed, then its visible new keys in order
      for (int64_t j = tail0; j < rw.seqlen; ++j) idx[n++] = static_cast<int32_t>(j);
      for (int64_t j = 0; j < rw.T; ++j)
        if (rw.visible[t * rw.T + j] != 0) idx[n++] = static_cast<int32_t>(rw.seqlen + j);
      const int64_t n32 = round_up(n, kKeysPerBlock);
      pack_v(v, s_pos, s_d, D, idx, n, vt2);
      const int64_t ra = std::max<int64_t>(0, t * rw.G - rw.r_begin);
      const int64_t rb = std::min<int64_t>(R, (t + 1) * rw.G - rw.r_begin);
      for (int64_t r0 = ra; r0 < rb; r0 += 16) {  // the token's rows, 16 at a time (GQA groups past 16)
        const int64_t rows = std::min<int64_t>(16, rb - r0);
        for (int64_t rr = 0; rr < rows; ++rr) {
          const float* pr = p + (r0 + rr) * ld_p;
          for (int64_t k = 0; k < n; ++k) f2[k] = pr[idx[k]];
          to_bf16(f2, n, p2 + rr * n32, n32);
        }
        if (rows != configured) pv_configure(rows), configured = rows;
        pv_accumulate(p2, n32, vt2, n32 / kKeysPerBlock, D, o + r0 * D, D, l16 + r0 * 16, false);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) l[r] = l16[r * 16];
}

#else  // available() is false: nothing calls these
void begin() { TORCH_CHECK(false, "tree_attention: AMX scores are not built on this platform"); }
void end() {}
void score_block(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t, float, float*,
                 int64_t, c10::BFloat16*) {
  TORCH_CHECK(false, "tree_attention: AMX scores are not built on this platform");
}
int64_t pv_scratch_bytes(int64_t, int64_t, int64_t) { return 0; }
void attend_pv(const PvRows&, const float*, int64_t, const c10::BFloat16*, int64_t, int64_t, int64_t, float*, float*,
               char*) {
  TORCH_CHECK(false, "tree_attention: AMX P @ V is not built on this platform");
}
#endif  // EAGLE_TA_AMX_BUILD

}  // namespace tree_attn_amx
}  // namespace eagle
