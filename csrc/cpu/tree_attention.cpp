// tree_attention: schema, argument checks and the CPU kernel.
//
// out[b, i, h] = softmax_p(q[b, i, h] . k[b, h / G, p] * sm_scale) v[b, h / G, p] over the key positions p
// visible to new token i of sequence b: the committed prefix p < cache_seqlens[b] always, and new token
// j (at p = cache_seqlens[b] + j) when the mask allows it (causal j <= i, or the bool / bit-packed
// tree_mask). Accumulation is fp32 (fp64 for fp64 inputs).
//
// The kernel body (tree_attention_kernel.h) is compiled three times, for AVX-512, AVX2+FMA and the
// x86-64 baseline, and the widest one the CPU supports runs. On CPUs with AMX-BF16 the AVX-512 variant
// takes the scores and P @ V of bfloat16 caches on AMX tiles (tree_attention_amx.cpp; the
// probabilities rounded to bf16 for P @ V) when the head dim is a multiple of 32; on CPUs with
// AVX512-BF16 and no AMX it takes their scores by VDPBF16PS (tree_attention_dpbf16.cpp, variant
// "avx512bf16"). EAGLE_KERNELS_CPU_ISA=amx|avx512bf16|avx512|avx2|generic forces one (avx512: neither
// AMX nor VDPBF16PS; tests use it to check every variant).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // the FMA intrinsics of the kernel body's vfma
#endif

#include "cpu_isa.h"
#include "tree_attention_amx.h"
#include "tree_attention_dpbf16.h"
#include "kv_decode.h"
#include "tensor_pool.h"

namespace eagle {
namespace tree_attn {

constexpr int64_t kBlockN = 128;     // keys per block (128 measured ~10% faster than 64 for trees)
constexpr int64_t kRowsPerTask = 64;  // query rows (token x grouped head) per task, at most
// A task keeps every score of its rows (two-pass softmax): fewer rows per task for long caches keep
// that buffer within this budget (rows are computed independently, so the split changes no result).
constexpr int64_t kScoreBytesPerTask = int64_t{4} << 20;

struct Problem {
  const void* q;
  const void* k;  // contiguous caches: [B, Hkv, S_max, D]; paged: the pool [num_blocks, page, Hkv, D]
  const void* v;
  void* out;  // contiguous [B, T, Hq, D]
  const int32_t* seqlens;
  const uint8_t* new_visible;  // contiguous [B, T, T] of 0/1, nullptr = causal
  int64_t B, T, Hq, Hkv, G, D, rows_per_task;
  int64_t sq_b, sq_t, sq_h, sq_d;
  int64_t sk_b, sk_h, sk_s, sk_d;  // paged: sk_b / sv_b step over blocks, sk_s / sv_s over a block's slots
  int64_t sv_b, sv_h, sv_s, sv_d;
  // Paged caches: position p of sequence b is slot p % page of block block_table[b * table_cols + p / page];
  // nullptr for contiguous caches.
  const int64_t* block_table;
  int64_t table_cols, page;
  // 8-bit caches (paged, or contiguous seen as one page per sequence): k / v hold bytes, converted a row
  // at a time into q's dtype by kv_convert (kv_decode.h's row_converter) with kv head h's scales
  // k_scales[h * scale_stride] / v_scales[...]; kv_convert is nullptr for caches in q's dtype.
  void (*kv_convert)(const uint8_t* src, int64_t s_d, double scale, void* dst, int64_t D);
  const double* k_scales;
  const double* v_scales;
  int64_t scale_stride;
  double sm_scale;
  bool amx_scores;  // bf16 with D % 32 == 0 and K contiguous along D: scores on AMX tiles
  bool amx_pv;      // and P @ V (unless EAGLE_CPU_AMX_PV=0)
  bool dpbf16_scores;  // bf16 with D % 32 == 0 and K contiguous along D: scores by VDPBF16PS
};

// Vectors are passed only between functions of one instruction set, so the ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

using RunFn = void (*)(const Problem&, int64_t, int64_t, char*);

// `#pragma GCC target` is GCC's; other compilers (and other CPUs) build only the baseline variant.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EAGLE_TREE_ATTN_X86_VARIANTS 1
#endif

#ifdef EAGLE_TREE_ATTN_X86_VARIANTS
// Each variant's vectors are one register wide: 64-byte vectors on AVX2 or SSE2 are split into 2-4
// registers by the compiler, and the register tiles then spill (the avx2 and generic variants ran ~10x
// slower than avx512 on the same CPU, not ~2-4x).
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define EAGLE_TA_VEC_BYTES 64
#include "tree_attention_kernel.h"
#undef EAGLE_TA_VEC_BYTES
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define EAGLE_TA_VEC_BYTES 32
#include "tree_attention_kernel.h"
#undef EAGLE_TA_VEC_BYTES
#pragma GCC pop_options
}  // namespace avx2
#endif

namespace generic {
#define EAGLE_TA_VEC_BYTES 16
#include "tree_attention_kernel.h"
#undef EAGLE_TA_VEC_BYTES
}  // namespace generic

struct Kernels {
  RunFn f32, f64, f16, bf16;
  const char* isa;
  bool amx;     // bf16 scores on AMX tiles where the shapes allow (the avx512 kernels only)
  bool dpbf16;  // bf16 scores by VDPBF16PS where the shapes allow (the avx512 kernels, without AMX)
};

#define EAGLE_TREE_ATTN_KERNELS(ns, amx, dpbf16) \
  Kernels { ns::run_f32, ns::run_f64, ns::run_f16, ns::run_bf16, #ns, amx, dpbf16 }

Kernels select_kernels() {
  const std::string want = forced_cpu_isa();
#ifdef EAGLE_TREE_ATTN_X86_VARIANTS
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  // Asked only when AMX may run: the first ask requests the tile state from the OS (arch_prctl).
  const auto has_amx = [&] { return has512 && tree_attn_amx::available(); };
  const bool has_dpbf16 = has512 && tree_attn_dpbf16::available();
  if (want == "amx") {
    TORCH_CHECK(has_amx(), "EAGLE_KERNELS_CPU_ISA=amx but this CPU (or OS) offers no AMX-BF16 tiles");
    return EAGLE_TREE_ATTN_KERNELS(avx512, true, false);
  }
  if (want == "avx512bf16") {
    TORCH_CHECK(has_dpbf16, "EAGLE_KERNELS_CPU_ISA=avx512bf16 but this CPU lacks AVX-512 with AVX512-BF16");
    return EAGLE_TREE_ATTN_KERNELS(avx512, false, true);
  }
  if (want == "avx512") {
    TORCH_CHECK(has512, "EAGLE_KERNELS_CPU_ISA=avx512 but this CPU lacks AVX-512");
    return EAGLE_TREE_ATTN_KERNELS(avx512, false, false);
  }
  if (want == "avx2") {
    TORCH_CHECK(has2, "EAGLE_KERNELS_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
    return EAGLE_TREE_ATTN_KERNELS(avx2, false, false);
  }
  if (want.empty()) {
    if (has512) {
      const bool amx = has_amx();
      return EAGLE_TREE_ATTN_KERNELS(avx512, amx, !amx && has_dpbf16);
    }
    if (has2) return EAGLE_TREE_ATTN_KERNELS(avx2, false, false);
  }
#endif
  TORCH_CHECK(want.empty() || want == "generic", "EAGLE_KERNELS_CPU_ISA=", want,
              " is not built into this extension (its tree_attention has the generic variant only)");
  return EAGLE_TREE_ATTN_KERNELS(generic, false, false);
}

// EAGLE_CPU_AMX_PV=0 keeps P @ V in float32 FMAs where the scores run on AMX (read at every call, like
// EAGLE_KERNELS_CPU_ISA, so one process can time both).
bool amx_pv_enabled() {
  const char* v = std::getenv("EAGLE_CPU_AMX_PV");
  return v == nullptr || std::string(v) != "0";
}

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The checks both layouts share: ranks, dtypes, a contiguous cache's batch, heads (Hkv: the caches' kv
// heads), lengths' shape, devices and the mask.
void check_common_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& tree_mask, int64_t Hkv,
                       const char* layout, bool paged, bool quantized = false) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be [B, T, Hq, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "k_cache must be ", layout, ", got shape ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache ", v_cache.sizes(),
                    " must have k_cache's shape ", k_cache.sizes());
  TORCH_CHECK_TYPE(is_float_type(q.scalar_type()), "q must be float16/bfloat16/float32/float64, got ",
                   q.scalar_type());
  if (quantized) {
    TORCH_CHECK_TYPE(k_cache.scalar_type() == at::kByte && v_cache.scalar_type() == at::kByte,
                     "8-bit caches are passed as their bytes (uint8), got k_cache=", k_cache.scalar_type(),
                     ", v_cache=", v_cache.scalar_type());
  } else {
    TORCH_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
                     "dtypes must match: q=", q.scalar_type(), ", k_cache=", k_cache.scalar_type(),
                     ", v_cache=", v_cache.scalar_type());
  }
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(paged || k_cache.size(0) == B, "k_cache must be ", layout, " with B=", B, ", got ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "head dim mismatch: q has D=", D, ", k_cache/v_cache have D=",
                    k_cache.size(3));
  TORCH_CHECK_VALUE(D >= 16 && D <= 256, "head dim D=", D, " is outside the supported 16..256");
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "query heads Hq=", Hq,
                    " must be a positive multiple of kv heads Hkv=", Hkv, " (GQA)");
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, "cache_seqlens must be [B] with B=",
                    B, ", got ", cache_seqlens.sizes());
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32, got ",
                   cache_seqlens.scalar_type());
  for (const at::Tensor* t : {&k_cache, &v_cache, &cache_seqlens}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), "all inputs must be on ", q.device(), ", got ", t->device());
  }
  if (tree_mask.has_value()) {
    const at::Tensor& m = *tree_mask;
    const auto dt = m.scalar_type();
    TORCH_CHECK_TYPE(dt == at::kBool || dt == at::kByte || dt == at::kInt,
                     "tree_mask must be bool, uint8 (bit-packed) or int32 (bit-packed), got ", dt);
    const int64_t width = dt == at::kBool ? T : dt == at::kByte ? (T + 7) / 8 : (T + 31) / 32;
    TORCH_CHECK_VALUE(m.dim() == 3 && m.size(0) == B && m.size(1) == T && m.size(2) == width,
                      "tree_mask (", dt, ") must have shape [B, T, ", width, "] = [", B, ", ", T, ", ", width,
                      "], got ", m.sizes());
    TORCH_CHECK_VALUE(m.device() == q.device(), "tree_mask must be on ", q.device(), ", got ", m.device());
  }
}

// Every length fits `capacity` positions (what names it in the message).
void check_lengths(const at::Tensor& cache_seqlens, int64_t T, int64_t capacity, const char* what) {
  const auto seq = cache_seqlens.contiguous();
  const int32_t* lens = seq.data_ptr<int32_t>();
  for (int64_t b = 0; b < seq.size(0); ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] + T <= capacity,
                      "cache_seqlens must be >= 0 and cache_seqlens + T (T=", T, ") must fit ", what, "=",
                      capacity, ", got cache_seqlens[", b, "]=", lens[b]);
  }
}

void check_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& tree_mask, bool quantized = false) {
  const char* layout = "[B, Hkv, S_max, D]";
  check_common_args(q, k_cache, v_cache, cache_seqlens, tree_mask, k_cache.dim() == 4 ? k_cache.size(1) : 0, layout,
                    false, quantized);
  check_lengths(cache_seqlens, q.size(1), k_cache.size(2), "S_max");
}

// The paged layout's checks; returns the block table's columns that some sequence reads (the first
// ceil((longest cache_seqlens + T) / page) of them) as contiguous int64 [B, table_cols]: an engine's
// table may be as wide as its longest context (SGLang's req_to_token rows), and no call should pay
// for the columns it does not read.
at::Tensor check_paged_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                            const std::optional<at::Tensor>& tree_mask, bool quantized = false) {
  const char* layout = "[num_blocks, page_size, Hkv, D]";
  check_common_args(q, k_cache, v_cache, cache_seqlens, tree_mask, k_cache.dim() == 4 ? k_cache.size(2) : 0, layout,
                    true, quantized);
  const int64_t B = q.size(0), T = q.size(1), num_blocks = k_cache.size(0), page = k_cache.size(1);
  TORCH_CHECK_VALUE(num_blocks > 0 && page > 0, "k_cache must be ", layout,
                    " with at least one block of at least one position, got ", k_cache.sizes());
  TORCH_CHECK_VALUE(block_table.dim() == 2 && block_table.size(0) == B, "block_table must be [B, max_blocks] with B=",
                    B, ", got ", block_table.sizes());
  TORCH_CHECK_TYPE(block_table.scalar_type() == at::kInt || block_table.scalar_type() == at::kLong,
                   "block_table must be int32 or int64, got ", block_table.scalar_type());
  TORCH_CHECK_VALUE(block_table.device() == q.device(), "block_table must be on ", q.device(), ", got ",
                    block_table.device());
  const int64_t cols = block_table.size(1);
  check_lengths(cache_seqlens, T, cols * page, "the block table's capacity (max_blocks * page_size)");
  const auto seq = cache_seqlens.contiguous();
  const int32_t* lens = seq.data_ptr<int32_t>();
  int64_t read = 0;  // columns some sequence reads
  for (int64_t b = 0; b < B; ++b) read = std::max<int64_t>(read, (lens[b] + T + page - 1) / page);
  const auto table = block_table.narrow(1, 0, read).to(at::kLong).contiguous();
  const int64_t* ids = table.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t pages = (lens[b] + T + page - 1) / page;  // the entries sequence b reads
    for (int64_t c = 0; c < pages; ++c) {
      const int64_t id = ids[b * read + c];
      TORCH_CHECK_VALUE(id >= 0 && id < num_blocks, "block_table[", b, ", ", c, "] = ", id,
                        " is not a block of the cache (0 .. ", num_blocks - 1, "); sequence ", b,
                        " reads its first ", pages, " entries");
    }
  }
  return table;
}

// Dense 0/1 [B, T, T] visibility among the new tokens, from any mask format.
at::Tensor dense_new_token_mask(const at::Tensor& tree_mask, int64_t T) {
  if (tree_mask.scalar_type() == at::kBool) return tree_mask.contiguous().view(at::kByte);
  const int64_t B = tree_mask.size(0);
  auto dense = pool::empty({B, T, T}, at::kByte);
  auto packed = tree_mask.contiguous();
  uint8_t* dst = dense.data_ptr<uint8_t>();
  const int64_t width = packed.size(2);
  if (packed.scalar_type() == at::kByte) {
    const uint8_t* src = packed.data_ptr<uint8_t>();
    for (int64_t row = 0; row < B * T; ++row)
      for (int64_t j = 0; j < T; ++j) dst[row * T + j] = (src[row * width + j / 8] >> (j % 8)) & 1;
  } else {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
    for (int64_t row = 0; row < B * T; ++row)
      for (int64_t j = 0; j < T; ++j) dst[row * T + j] = (src[row * width + j / 32] >> (j % 32)) & 1;
  }
  return dense;
}

// The carve() order of attend_task: q, a converted K/V block, the output accumulator, the row sums and
// the scores of every key (at most max_keys) of the task's rows; with AMX also the output's rows up to
// a whole 16-row tile, the packed query tiles, a 16-key block of K (bf16) and attend_pv's scratch; with
// VDPBF16PS scores the bf16 query rows and the transposed keys.
// Paged caches first carve a block of kBlockN gathered rows of D cache elements.
int64_t scratch_bytes(int64_t rows, int64_t D, int64_t max_keys, int64_t T, int64_t elem, bool amx, bool amx_pv,
                      bool dpbf16, int64_t paged_elem) {
  const int64_t lanes = 64 / elem, dp = (D + lanes - 1) / lanes * lanes;
  const int64_t keys = (max_keys + lanes - 1) / lanes * lanes;
  const int64_t counts[] = {rows * dp, kBlockN * dp, rows * dp, rows, rows * keys};
  int64_t bytes = 0;
  for (int64_t c : counts) bytes += (c * elem + 63) / 64 * 64;
  if (amx) {
    for (int64_t c : {tree_attn_amx::packed_q_elems(rows, D), 16 * D}) bytes += (c * 2 + 63) / 64 * 64;
  }
  if (amx_pv) {
    bytes += (((rows + 15) / 16 * 16 - rows) * dp * elem + 63) / 64 * 64;  // o in whole 16-row tiles
    bytes += tree_attn_amx::pv_scratch_bytes(rows, D, T);
  }
  if (dpbf16) {
    bytes += (rows * D * 2 + 63) / 64 * 64;
    bytes += (tree_attn_dpbf16::scratch_words(D) * 4 + 63) / 64 * 64;
  }
  if (paged_elem > 0) bytes += (kBlockN * D * paged_elem + 63) / 64 * 64;
  return bytes + 64;  // room to align the start
}

// The checked problem of either layout: `table` (contiguous int64 [B, max_blocks]) set for a paged cache.
// 8-bit caches (`kind` >= 0, kv_decode.h, with float64 scales [1 or Hkv]) are read as paged ones;
// a contiguous one ([B, Hkv, S_max, D] bytes, `pool_layout` false) as one page of S_max per sequence.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& tree_mask, double sm_scale,
                  const at::Tensor& table, int64_t kind = -1, const at::Tensor& k_scales = at::Tensor(),
                  const at::Tensor& v_scales = at::Tensor(), bool pool_layout = true) {
  const bool paged = table.defined();
  pool_layout = paged && pool_layout;
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(pool_layout ? 2 : 1);
  auto out = pool::empty({B, T, Hq, D}, q.scalar_type());
  if (out.numel() == 0) return out;
  const auto seqlens = cache_seqlens.contiguous();
  const at::Tensor dense = tree_mask.has_value() ? dense_new_token_mask(*tree_mask, T) : at::Tensor();

  Problem P{};
  P.q = q.data_ptr();
  P.k = k_cache.data_ptr();
  P.v = v_cache.data_ptr();
  P.out = out.data_ptr();
  P.seqlens = seqlens.data_ptr<int32_t>();
  P.new_visible = dense.defined() ? dense.data_ptr<uint8_t>() : nullptr;
  P.B = B, P.T = T, P.Hq = Hq, P.Hkv = Hkv, P.G = Hq / Hkv, P.D = D;
  int64_t max_keys = 0;  // the most keys a row sees: the longest committed prefix + T
  for (int64_t b = 0; b < B; ++b) max_keys = std::max<int64_t>(max_keys, P.seqlens[b] + T);
  const int64_t rows_in_budget = std::max<int64_t>(1, kScoreBytesPerTask / (8 * std::max<int64_t>(1, max_keys)));
  P.rows_per_task = std::min<int64_t>({kRowsPerTask, rows_in_budget, T * P.G});
  P.sq_b = q.stride(0), P.sq_t = q.stride(1), P.sq_h = q.stride(2), P.sq_d = q.stride(3);
  const int64_t h_dim = pool_layout ? 2 : 1, s_dim = pool_layout ? 1 : 2;  // pool: [num_blocks, page, Hkv, D]
  P.sk_b = k_cache.stride(0), P.sk_h = k_cache.stride(h_dim), P.sk_s = k_cache.stride(s_dim);
  P.sk_d = k_cache.stride(3);
  P.sv_b = v_cache.stride(0), P.sv_h = v_cache.stride(h_dim), P.sv_s = v_cache.stride(s_dim);
  P.sv_d = v_cache.stride(3);
  P.block_table = paged ? table.data_ptr<int64_t>() : nullptr;
  P.table_cols = paged ? table.size(1) : 0;
  P.page = paged ? k_cache.size(s_dim) : 0;
  P.kv_convert = kind >= 0 ? kvq::row_converter(kind, q.scalar_type()) : nullptr;
  P.k_scales = kind >= 0 ? k_scales.const_data_ptr<double>() : nullptr;
  P.v_scales = kind >= 0 ? v_scales.const_data_ptr<double>() : nullptr;
  P.scale_stride = kind >= 0 && k_scales.size(0) > 1 ? 1 : 0;
  P.sm_scale = sm_scale;
  const bool k_rows_unit = paged || P.sk_d == 1;  // a paged task's gathered rows are contiguous

  const Kernels kernels = select_kernels();
  P.amx_scores = kernels.amx && q.scalar_type() == at::kBFloat16 && D % tree_attn_amx::kDimsPerTile == 0 &&
                 k_rows_unit;
  P.amx_pv = P.amx_scores && amx_pv_enabled();
  P.dpbf16_scores = kernels.dpbf16 && q.scalar_type() == at::kBFloat16 &&
                    D % tree_attn_dpbf16::kDimsMultiple == 0 && k_rows_unit;
  RunFn run = nullptr;
  int64_t acc_bytes = 4;
  switch (q.scalar_type()) {
    case at::kFloat: run = kernels.f32; break;
    case at::kDouble: run = kernels.f64, acc_bytes = 8; break;
    case at::kHalf: run = kernels.f16; break;
    case at::kBFloat16: run = kernels.bf16; break;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", q.scalar_type());
  }
  const int64_t chunks = (T * P.G + P.rows_per_task - 1) / P.rows_per_task;
  const int64_t tasks = B * Hkv * chunks;
  const int64_t bytes = scratch_bytes(P.rows_per_task, D, max_keys, T, acc_bytes, P.amx_scores, P.amx_pv,
                                      P.dpbf16_scores, paged ? q.element_size() : 0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const pool::Scratch scratch(bytes);  // 64-byte aligned, not zeroed: every use writes first
    run(P, begin, end, scratch.data());
  });
  return out;
}

at::Tensor tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& tree_mask,
                              double sm_scale) {
  check_args(q, k_cache, v_cache, cache_seqlens, tree_mask);
  return attend(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale, at::Tensor());
}

// paged_tree_attention: the same attention over a block pool [num_blocks, page_size, Hkv, D]. Each task
// gathers its (sequence, kv head)'s rows into scratch and runs the contiguous kernel on them, so a row's
// output is the contiguous op's bit for bit.
at::Tensor paged_tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                                    const std::optional<at::Tensor>& tree_mask, double sm_scale) {
  const at::Tensor table = check_paged_args(q, k_cache, v_cache, block_table, cache_seqlens, tree_mask);
  return attend(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale, table);
}

// tree_attention / paged_tree_attention over an 8-bit cache, passed as its bytes (uint8) with `kind`
// (kv_decode.h: 0 int8, 1 float8_e4m3fn, 2 float8_e5m2) and optional scales (float64 [1 or Hkv]). Each
// block of keys is converted into q's dtype just before it is read (kv_decode.h, vectorised); the output
// equals the op's on the cache dequantized by dequantize_kv (the same conversion), bit for bit. block_table None: a contiguous cache [B, Hkv, S_max, D].
at::Tensor quantized_tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const std::optional<at::Tensor>& block_table, const at::Tensor& cache_seqlens,
                                        const std::optional<at::Tensor>& tree_mask, double sm_scale, int64_t kind,
                                        const std::optional<at::Tensor>& k_scale,
                                        const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK_VALUE(kind == kvq::kInt8 || kind == kvq::kE4M3 || kind == kvq::kE5M2,
                    "kind must be 0 (int8), 1 (float8_e4m3fn) or 2 (float8_e5m2), got ", kind);
  at::Tensor table;
  if (block_table.has_value()) {
    table = check_paged_args(q, k_cache, v_cache, *block_table, cache_seqlens, tree_mask, true);
  } else {
    check_args(q, k_cache, v_cache, cache_seqlens, tree_mask, true);
    table = at::arange(q.size(0), at::kLong).view({q.size(0), 1});  // sequence b: block b, one page of S_max
  }
  const int64_t Hkv = k_cache.size(block_table.has_value() ? 2 : 1);
  auto scales = [&](const std::optional<at::Tensor>& scale, const char* name) {
    TORCH_CHECK_VALUE(!scale.has_value() || (scale->device().is_cpu() && scale->dim() <= 1 &&
                                             (scale->numel() == 1 || scale->numel() == Hkv)),
                      name, " must be a CPU tensor [], [1] or [Hkv=", Hkv, "], got ",
                      scale.has_value() ? scale->sizes() : at::IntArrayRef{});
    if (!scale.has_value()) return at::ones({1}, at::kDouble);
    TORCH_CHECK_TYPE(is_float_type(scale->scalar_type()), name, " must be a floating tensor, got ",
                     scale->scalar_type());
    at::Tensor s = scale->to(at::kDouble).reshape({-1}).contiguous();
    const double* v = s.const_data_ptr<double>();
    for (int64_t i = 0; i < s.numel(); ++i) {
      TORCH_CHECK_VALUE(std::isfinite(v[i]) && v[i] > 0, name, " must be finite and > 0, got ", v[i], " at ", i);
    }
    return s;
  };
  at::Tensor k_s = scales(k_scale, "k_scale"), v_s = scales(v_scale, "v_scale");
  if (k_s.size(0) != v_s.size(0)) {  // one value for one of them, one per head for the other
    k_s = k_s.expand({Hkv}).contiguous(), v_s = v_s.expand({Hkv}).contiguous();
  }
  return attend(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale, table, kind, k_s, v_s,
                block_table.has_value());
}

// The variant tree_attention runs on this CPU now (EAGLE_KERNELS_CPU_ISA included): "amx" (avx512 with
// bf16 scores on AMX tiles), "avx512bf16" (avx512 with bf16 scores by VDPBF16PS), "avx512", "avx2" or
// "generic".
std::string cpu_variant() {
  const Kernels kernels = select_kernels();
  return kernels.amx ? "amx" : kernels.dpbf16 ? "avx512bf16" : kernels.isa;
}

}  // namespace tree_attn
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? tree_mask, "
      "float sm_scale) -> Tensor");
  m.def(
      "paged_tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor cache_seqlens, "
      "Tensor? tree_mask, float sm_scale) -> Tensor");
  m.def(
      "quantized_tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? block_table, Tensor cache_seqlens, "
      "Tensor? tree_mask, float sm_scale, int kind, Tensor? k_scale, Tensor? v_scale) -> Tensor");
  m.def("tree_attention_cpu_variant() -> str", &eagle::tree_attn::cpu_variant);
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) {
  m.impl("tree_attention", &eagle::tree_attn::tree_attention_cpu);
  m.impl("paged_tree_attention", &eagle::tree_attn::paged_tree_attention_cpu);
  m.impl("quantized_tree_attention", &eagle::tree_attn::quantized_tree_attention_cpu);
}
