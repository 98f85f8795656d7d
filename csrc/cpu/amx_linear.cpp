// amx_linear: y = x @ W.T + b in bfloat16 on Intel AMX tiles, for the 1-64 rows of a decoding step.
//
// Why not oneDNN: a packed oneDNN bf16 linear costs ~18-30 us per call on this package's small
// layers whatever the row count (primitive lookup, scratchpad, threading set-up), more than the
// arithmetic. Here a call is a loop of tile loads and TDPBF16PS, so a 256x256 layer costs a few us.
//
// Numerics: every output is accumulated in float32 over K in blocks of 32 (in order, the hardware's
// pairwise FMA within a block), the bias is added in float32, and the sum is rounded to bf16 to
// nearest even. A row's result therefore does not depend on how many other rows are in the call,
// which the speculative loop relies on: a tree row verified in a block of 60 gets exactly the logits
// it would get decoded alone, so greedy EAGLE output equals plain decoding bit for bit.
//
// Weight layout ("tiled"): W [N, K] bf16 with N % 16 == 0 and K % 32 == 0 stored as
// [N/16, K/32, 16, 32]: tile (nb, kb) holds W[nb*16 + c][kb*32 + 2r + j] at [r][2c + j], the
// pair-interleaved ("VNNI") layout TDPBF16PS reads B in. eagle/models/cpu_packed.py makes it with
// a view + permute.
#include "amx_linear.h"

#include "linear_grain.h"
#include "tensor_pool.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define EAGLE_AMX_BUILD 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define EAGLE_AMX_BUILD 0
#endif

namespace eagle {
namespace amx {

#if EAGLE_AMX_BUILD
namespace {

constexpr int kTileRows = 16;  // rows of x per A tile, k-pairs per B tile
constexpr int kTileK = 32;  // bf16 values of K per tile row (64 bytes)
constexpr int kTileN = 16;  // output columns per C tile
constexpr int kGroup = 4;  // C tiles (column blocks) accumulated together: tmm0-3; A in tmm4; B in tmm5-7

// Linux: ask for permission to use the AMX tile data state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;

bool cpu_and_os_support() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool avx512f = b & (1u << 16), avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  if (!__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) return false;
  const bool avx512_bf16 = a1 & (1u << 5);
  if (!(avx512f && avx512bw && avx512vl && amx_bf16 && amx_tile && avx512_bf16)) return false;
  // The OS must save the AVX-512 state (XCR0 bits 5-7) before we may touch zmm registers.
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  uint32_t xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0xE6u) != 0xE6u) return false;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

#define EAGLE_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

// Tiles for a block of m <= 16 rows: C tmm0-3 [m x 16 fp32], A tmm4 [m x 32 bf16], B tmm5-7 [16 x 32 bf16].
void configure_tiles(int m) {
  const uint8_t r = static_cast<uint8_t>(m);
  const uint8_t rows[8] = {r, r, r, r, r, kTileRows, kTileRows, kTileRows};
  load_tile_config(rows);
}

// acc [m x 64] fp32 (+ bias) -> out rows (bf16, row stride ldo), `blocks` column blocks of 16.
EAGLE_AMX_TARGET void store_rows(const float* acc, int m, int blocks, const c10::BFloat16* bias, c10::BFloat16* out,
                                 int64_t ldo) {
  for (int r = 0; r < m; ++r) {
    for (int q = 0; q < blocks; ++q) {
      __m512 v = _mm512_loadu_ps(acc + r * kGroup * kTileN + q * kTileN);
      if (bias != nullptr) {
        const __m256i b16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + q * kTileN));
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b16), 16)));
      }
      const __m256bh rounded = _mm512_cvtneps_pbh(v);
      std::memcpy(out + r * ldo + q * kTileN, &rounded, sizeof(rounded));
    }
  }
}

// One row block (m rows of x starting at `a`) times column blocks [nb0, nb0 + blocks) of the weight.
EAGLE_AMX_TARGET void multiply_block(const c10::BFloat16* a, int64_t lda_bytes, int m, const c10::BFloat16* tiled,
                                     int64_t kblocks, int64_t nb0, int blocks, const c10::BFloat16* bias,
                                     c10::BFloat16* out, int64_t ldo) {
  alignas(64) float acc[kTileRows * kGroup * kTileN];
  constexpr int64_t tile_elems = kTileRows * kTileK;
  const c10::BFloat16* b = tiled + nb0 * kblocks * tile_elems;
  const int64_t next_block = kblocks * tile_elems;  // elements between column blocks of the same kb
  if (blocks == kGroup) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const c10::BFloat16* bk = b + kb * tile_elems;
      _tile_loadd(4, a + kb * kTileK, lda_bytes);
      _tile_loadd(5, bk, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, bk + next_block, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, bk + 2 * next_block, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, bk + 3 * next_block, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
    constexpr int ld_acc = kGroup * kTileN * sizeof(float);
    _tile_stored(0, acc, ld_acc);
    _tile_stored(1, acc + kTileN, ld_acc);
    _tile_stored(2, acc + 2 * kTileN, ld_acc);
    _tile_stored(3, acc + 3 * kTileN, ld_acc);
  } else {
    for (int q = 0; q < blocks; ++q) {  // the last < 4 column blocks, one at a time
      _tile_zero(0);
      const c10::BFloat16* bq = b + q * next_block;
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        _tile_loadd(4, a + kb * kTileK, lda_bytes);
        _tile_loadd(5, bq + kb * tile_elems, 64);
        _tile_dpbf16ps(0, 4, 5);
      }
      _tile_stored(0, acc + q * kTileN, kGroup * kTileN * sizeof(float));
    }
  }
  // GCC's tile intrinsics are asm without memory operands: the reads of acc must follow the stores.
  __asm__ volatile("" ::: "memory");
  store_rows(acc, m, blocks, bias == nullptr ? nullptr : bias + nb0 * kTileN, out + nb0 * kTileN, ldo);
}

EAGLE_AMX_TARGET void release_tiles() { _tile_release(); }

void run(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* tiled, int64_t N,
         const c10::BFloat16* bias, c10::BFloat16* out) {
  const int64_t kblocks = K / kTileK, nblocks = N / kTileN;
  const int64_t groups = (nblocks + kGroup - 1) / kGroup;
  const int64_t grain = linear_grain(M * K * kGroup * kTileN, K * kGroup * kTileN * int64_t{sizeof(c10::BFloat16)});
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    int configured = 0;
    for (int64_t row0 = 0; row0 < M; row0 += kTileRows) {
      const int m = static_cast<int>(std::min<int64_t>(kTileRows, M - row0));
      if (m != configured) {
        configure_tiles(m);
        configured = m;
      }
      for (int64_t g = begin; g < end; ++g) {
        const int64_t nb0 = g * kGroup;
        const int blocks = static_cast<int>(std::min<int64_t>(kGroup, nblocks - nb0));
        multiply_block(x + row0 * K, K * static_cast<int64_t>(sizeof(c10::BFloat16)), m, tiled, kblocks, nb0, blocks,
                       bias, out + row0 * N, N);
      }
    }
    if (configured) release_tiles();
  });
}

}  // namespace
#endif  // EAGLE_AMX_BUILD

void load_tile_config(const uint8_t (&rows)[8]) {
#if EAGLE_AMX_BUILD
  struct alignas(64) TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = rows[t] ? 64 : 0;
    cfg.rows[t] = rows[t];
  }
  // Not _tile_loadconfig: GCC 12's version tells the compiler it reads 8 bytes, so the stores to the
  // rest of cfg may be dropped (and the tiles stay unconfigured: SIGILL at the first tile op).
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg) : "memory");
#else
  (void)rows;
  TORCH_CHECK(false, "AMX tiles are not built on this platform");
#endif
}

bool bf16_available() {
#if EAGLE_AMX_BUILD
  static const bool ok = cpu_and_os_support();
  return ok;
#else
  return false;
#endif
}

bool is_tiled_weight(const at::Tensor& w) {
  return w.dim() == 4 && w.scalar_type() == at::kBFloat16 && w.size(2) == 16 && w.size(3) == 32 && !w.is_mkldnn();
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& tiled, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(bf16_available(), "amx_linear_bf16: this CPU (or OS) offers no AMX-BF16 tiles");
  TORCH_CHECK_VALUE(is_tiled_weight(tiled) && tiled.is_contiguous() && tiled.device().is_cpu(),
                    "amx_linear_bf16: weight must be a contiguous CPU bf16 tensor [N/16, K/32, 16, 32], got ",
                    tiled.scalar_type(), " ", tiled.sizes());
  const int64_t N = tiled.size(0) * 16, K = tiled.size(1) * 32;
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() >= 1 && x.size(-1) == K,
                    "amx_linear_bf16: x must be a CPU bf16 tensor [..., ", K, "], got ", x.scalar_type(), " ",
                    x.sizes(), " on ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->scalar_type() == at::kBFloat16 && bias->dim() == 1 &&
                          bias->size(0) == N,
                      "amx_linear_bf16: bias must be a CPU bf16 tensor [", N, "], got ", bias->scalar_type(), " ",
                      bias->sizes());
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  at::Tensor out = pool::empty(out_shape, at::kBFloat16);
  if (K == 0) return bias.has_value() ? out.copy_(bias->expand(out_shape)) : out.zero_();  // an empty sum
  const int64_t M = x.numel() / K;
  if (M == 0) return out;
#if EAGLE_AMX_BUILD
  const at::Tensor xc = x.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  run(xc.const_data_ptr<c10::BFloat16>(), M, K, tiled.const_data_ptr<c10::BFloat16>(), N,
      b.defined() ? b.const_data_ptr<c10::BFloat16>() : nullptr, out.mutable_data_ptr<c10::BFloat16>());
#endif
  return out;
}

}  // namespace amx
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def("amx_bf16_available() -> bool", &eagle::amx::bf16_available);
  m.def("amx_linear_bf16(Tensor x, Tensor weight_tiled, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) { m.impl("amx_linear_bf16", &eagle::amx::linear_bf16); }
