// fused_draft_input / fused_eagle3_input: the draft head's input projection on CPU.
//
//   fused_draft_input:  out = cat([embed_weight[token_ids], hidden], -1) @ fc_weight.T (+ fc_bias)
//   fused_eagle3_input: out = cat([h_low, h_mid, h_high], -1) @ fc_weight.T (+ fc_bias)
//
// Each activation row is written once into a scratch [N, K] buffer (K = 2H or 3H: the embedding row
// chosen by token id, then the feature row(s)); the gathered embedding and the concat never exist as
// separate tensors. Then one of two GEMMs:
//
// * "skinny" (AVX-512; up to 64 rows in fp32, 32 in bf16, every row count in fp16): fp32 accumulation
//   over register tiles of up to 4 rows x 8 output features, one pass over W per 4 rows. bf16 uses
//   the AVX512_BF16 dot-product instruction on A and W as they are; otherwise A is gathered in fp32
//   and W widened to fp32 in registers. At decode sizes the cost is reading W once; there oneDNN's
//   small-GEMM overhead dominates (2-4x slower), and torch's fp16 CPU GEMM is slow at every size.
// * "blas": one at::addmm (MKL / oneDNN) on the scratch buffer in the inputs' dtype; it wins for many
//   rows in fp32/bf16 and serves float64 and CPUs without AVX-512.
//
// EAGLE_KERNELS_CPU_ISA=generic forces the blas path, =avx512 the skinny path for every row count
// (=amx and =avx512bf16, which pick tree_attention's AMX / VDPBF16PS scores, leave this op's choice as
// auto does);
// EAGLE_KERNELS_CPU_BF16DOT=0 turns the bf16 dot-product instructions off (tests use all three). Measurements: bench/bench_fused_draft_input.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "fused_draft_input.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EAGLE_FDI_HAVE_AVX512_BUILD 1
// Vectors are passed only between functions of this one instruction set, so the ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
#define EAGLE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#define EAGLE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c,avx512bf16")))
#endif

namespace eagle {
namespace {

// Rows up to which the skinny kernel beats at::addmm (measured on Zen 4, H = 256 and 1024): fp32,
// bf16 with dot-product instructions, bf16 widened to fp32. fp16 always takes the skinny kernel.
constexpr int64_t kSkinnyMaxRowsF32 = 64;
constexpr int64_t kSkinnyMaxRowsBF16Dot = 32;
constexpr int64_t kSkinnyMaxRowsBF16 = 4;
constexpr int64_t kTileRows = 4;
constexpr int64_t kMaxTileCols = 8;

// ---------------------------------------------------------------------------------------------------
// Argument checks (the Python wrapper checks first; these keep the op safe when called on its own)
// ---------------------------------------------------------------------------------------------------
bool is_float_input(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

void check_projection(const at::Tensor& rows, const at::Tensor& fc_weight,
                      const std::optional<at::Tensor>& fc_bias, const at::Tensor& out, int64_t segments) {
  const int64_t N = rows.size(0), H = rows.size(1);
  TORCH_CHECK_TYPE(is_float_input(rows), "inputs must be float16, bfloat16, float32 or float64, got ",
                   rows.scalar_type());
  TORCH_CHECK_VALUE(fc_weight.dim() == 2 && fc_weight.size(0) == H && fc_weight.size(1) == segments * H,
                    "fc_weight must be [H, ", segments, "H] with H=", H, ", got ", fc_weight.sizes());
  TORCH_CHECK_TYPE(fc_weight.scalar_type() == rows.scalar_type(), "fc_weight dtype ", fc_weight.scalar_type(),
                   " does not match the inputs' ", rows.scalar_type());
  TORCH_CHECK_VALUE(fc_weight.device() == rows.device(), "fc_weight must be on ", rows.device());
  if (fc_bias.has_value()) {
    TORCH_CHECK_VALUE(fc_bias->dim() == 1 && fc_bias->size(0) == H, "fc_bias must be [H] with H=", H,
                      ", got ", fc_bias->sizes());
    TORCH_CHECK_TYPE(fc_bias->scalar_type() == rows.scalar_type(), "fc_bias dtype ", fc_bias->scalar_type(),
                     " does not match the inputs' ", rows.scalar_type());
    TORCH_CHECK_VALUE(fc_bias->device() == rows.device(), "fc_bias must be on ", rows.device());
  }
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == N && out.size(1) == H, "out must be [N, H] = [", N,
                    ", ", H, "], got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == rows.scalar_type(), "out dtype ", out.scalar_type(),
                   " does not match the inputs' ", rows.scalar_type());
  TORCH_CHECK_VALUE(out.device() == rows.device(), "out must be on ", rows.device());
}

void check_rows(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.sizes() == like.sizes(), name, " must be ", like.sizes(), ", got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " dtype ", t.scalar_type(),
                   " does not match ", like.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device());
}

template <typename id_t>
void check_ids_in_range(const id_t* ids, int64_t N, int64_t V) {
  for (int64_t r = 0; r < N; ++r) {
    TORCH_CHECK_VALUE(ids[r] >= 0 && ids[r] < V, "token_ids must be in [0, ", V,
                      ") (the embedding's vocabulary), got token_ids[", r, "]=", ids[r]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Gather: one pass writes the concatenated activation rows into the scratch buffer
// ---------------------------------------------------------------------------------------------------
// One A-operand segment: row r of it is t[row_ids ? row_ids[r] : r].
struct Segment {
  const at::Tensor* t;
  const int64_t* row_ids;  // only segment 0 of fused_draft_input is indexed
};

template <typename in_t, typename acc_t>
void gather_rows_typed(const std::vector<Segment>& segments, at::Tensor& a) {
  const int64_t N = a.size(0), S = static_cast<int64_t>(segments.size()), H = a.size(1) / S;
  acc_t* dst = a.data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, S * H));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t s = 0; s < S; ++s) {
        const at::Tensor& t = *segments[s].t;
        const int64_t row = segments[s].row_ids != nullptr ? segments[s].row_ids[r] : r;
        const in_t* src = t.const_data_ptr<in_t>() + row * t.stride(0);
        acc_t* d = dst + (r * S + s) * H;
        const int64_t sk = t.stride(1);
        if (sk == 1 && std::is_same<in_t, acc_t>::value) {
          std::memcpy(d, src, H * sizeof(acc_t));
        } else {
          for (int64_t k = 0; k < H; ++k) d[k] = static_cast<acc_t>(src[k * sk]);
        }
      }
    }
  });
}

// Scratch [N, S*H] in `dtype`: the inputs' dtype for the blas path and bf16 dot products, else fp32.
at::Tensor gather_rows(const std::vector<Segment>& segments, int64_t N, at::ScalarType dtype) {
  const at::Tensor& first = *segments[1].t;  // a feature tensor: [N, H]
  const int64_t H = first.size(1);
  at::Tensor a = at::empty({N, static_cast<int64_t>(segments.size()) * H}, first.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "fused_draft_input_gather", [&] {
    if (dtype == at::kFloat) {
      gather_rows_typed<scalar_t, float>(segments, a);
    } else {
      gather_rows_typed<scalar_t, scalar_t>(segments, a);
    }
  });
  return a;
}

// ---------------------------------------------------------------------------------------------------
// Skinny GEMM (AVX-512): out[r, j] = bias[j] + sum_k A[r, k] * W[j, k], fp32 accumulation
// ---------------------------------------------------------------------------------------------------
#ifdef EAGLE_FDI_HAVE_AVX512_BUILD
template <typename w_t>
EAGLE_AVX512 inline __m512 load_widen(const w_t* p, __mmask16 m);

template <>
EAGLE_AVX512 inline __m512 load_widen<float>(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}

template <>
EAGLE_AVX512 inline __m512 load_widen<c10::BFloat16>(const c10::BFloat16* p, __mmask16 m) {
  const __m256i bits = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));  // bf16 = top half of fp32
}

template <>
EAGLE_AVX512 inline __m512 load_widen<c10::Half>(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// How a skinny tile multiplies. WidenToF32: A in fp32, W in its own dtype widened to fp32 in
// registers, one FMA per 16 products (every AVX-512 CPU). DotBF16: A and W in bf16, vdpbf16ps does
// 32 exact bf16 products per instruction and accumulates them in fp32 (CPUs with AVX512_BF16).
template <typename w_t>
struct WidenToF32 {
  using a_t = float;
  using w_elem = w_t;
  using vec_t = __m512;
  using mask_t = __mmask16;
  static constexpr int64_t kStep = 16;
  static constexpr mask_t kFull = 0xFFFF;
  EAGLE_AVX512 static vec_t load_a(const float* p, mask_t m) { return _mm512_maskz_loadu_ps(m, p); }
  EAGLE_AVX512 static vec_t load_w(const w_t* p, mask_t m) { return load_widen<w_t>(p, m); }
  EAGLE_AVX512 static __m512 mac(__m512 acc, vec_t a, vec_t w) { return _mm512_fmadd_ps(a, w, acc); }
};

struct DotBF16 {
  using a_t = c10::BFloat16;
  using w_elem = c10::BFloat16;
  using vec_t = __m512i;
  using mask_t = __mmask32;
  static constexpr int64_t kStep = 32;
  static constexpr mask_t kFull = 0xFFFFFFFFu;
  EAGLE_AVX512_BF16 static vec_t load_a(const a_t* p, mask_t m) { return _mm512_maskz_loadu_epi16(m, p); }
  EAGLE_AVX512_BF16 static vec_t load_w(const w_elem* p, mask_t m) { return _mm512_maskz_loadu_epi16(m, p); }
  EAGLE_AVX512_BF16 static __m512 mac(__m512 acc, vec_t a, vec_t w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)w);
  }
};

// acc[r][j] += a[r * lda + k ..] . w[j * ldw + k ..] over one step of P::kStep elements (lanes outside
// mask m read as 0).
template <typename P, int R, int J>
EAGLE_AVX512_BF16 inline void skinny_step(__m512 (&acc)[R][J], const typename P::a_t* a, int64_t lda,
                                          const typename P::w_elem* w, int64_t ldw, int64_t k,
                                          typename P::mask_t m) {
  typename P::vec_t wv[J];
  for (int j = 0; j < J; ++j) wv[j] = P::load_w(w + j * ldw + k, m);
  for (int r = 0; r < R; ++r) {
    const typename P::vec_t av = P::load_a(a + r * lda + k, m);
    for (int j = 0; j < J; ++j) acc[r][j] = P::mac(acc[r][j], av, wv[j]);
  }
}

// Lane 4q + r of the result is the sum of the 16 lanes of a[4r + q]. Every vector goes through the
// same tree of pairwise adds (lanes j + j+8, then j + j+4, j + j+2, j + j+1 of what is left), so an
// output's sum has one order whichever vectors share the call. One tree for 16 sums costs about what
// _mm512_reduce_add_ps costs for one.
EAGLE_AVX512 inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // [a_2i lo+hi 256 | a_2i+1 lo+hi 256]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // 128-bit chunk q: 4 partials of a_4j+q
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xDD));
  for (int k = 0; k < 2; ++k)  // chunk q: 2 partials of a_8k+q, then 2 of a_8k+4+q
    d[k] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * k], c[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(c[2 * k], c[2 * k + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
}

// res[r][j] = sum_k a[r * lda + k] * w[j * ldw + k] for an R x J tile (R rows of A, J rows of W).
template <typename P, int R, int J>
EAGLE_AVX512_BF16 inline void skinny_tile(const typename P::a_t* a, int64_t lda, const typename P::w_elem* w,
                                          int64_t ldw, int64_t K, float (*res)[kMaxTileCols]) {
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + P::kStep <= K; k += P::kStep) skinny_step<P, R, J>(acc, a, lda, w, ldw, k, P::kFull);
  if (k < K) skinny_step<P, R, J>(acc, a, lda, w, ldw, k, typename P::mask_t((1ull << (K - k)) - 1));
  static_assert(R * J <= 16, "one reduce16 per tile");
  __m512 all[16];  // accumulator r * J + j; the unused ones zero
  for (int i = 0; i < 16; ++i) all[i] = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) all[r * J + j] = acc[r][j];
  alignas(64) float sums[16];
  _mm512_store_ps(sums, reduce16(all));
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) res[r][j] = sums[4 * ((r * J + j) % 4) + (r * J + j) / 4];
}

// An R-row tile over `cols` <= J output features (the last block of features may be partial).
template <typename P, int R, int J>
EAGLE_AVX512_BF16 void skinny_tile_cols(const typename P::a_t* a, int64_t lda, const typename P::w_elem* w,
                                        int64_t ldw, int64_t K, int64_t cols, float (*res)[kMaxTileCols]) {
  if (cols == J) return skinny_tile<P, R, J>(a, lda, w, ldw, K, res);
  for (int64_t j = 0; j < cols; ++j) {
    float one[R][kMaxTileCols];
    skinny_tile<P, R, 1>(a, lda, w + j * ldw, ldw, K, one);
    for (int r = 0; r < R; ++r) res[r][j] = one[r][0];
  }
}

// Rows [r, r + R) x output features [jb, jb + cols): 8 features per tile for 1-2 rows, 4 for 3-4 rows,
// so that the accumulators, the W vectors and one A vector fit the 32 vector registers.
template <typename P, int R>
EAGLE_AVX512_BF16 void skinny_rows(const typename P::a_t* a, int64_t K, const typename P::w_elem* w, int64_t ldw,
                                   int64_t cols, float (*res)[kMaxTileCols]) {
  constexpr int J = R <= 2 ? 8 : 4;
  for (int64_t j = 0; j < cols; j += J) {
    float part[R][kMaxTileCols];
    skinny_tile_cols<P, R, J>(a, K, w + j * ldw, ldw, K, std::min<int64_t>(J, cols - j), part);
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < std::min<int64_t>(J, cols - j); ++c) res[r][j + c] = part[r][c];
  }
}

// Output features [j0, j1) for every row: each block of 8 W rows stays in cache while the rows pass.
template <typename P, typename out_t>
EAGLE_AVX512_BF16 void skinny_columns(const typename P::a_t* a, int64_t N, int64_t K, const typename P::w_elem* w,
                                      int64_t ldw, const float* bias, out_t* out, int64_t ldo, int64_t j0,
                                      int64_t j1) {
  float res[kTileRows][kMaxTileCols];
  for (int64_t jb = j0; jb < j1; jb += kMaxTileCols) {
    const int64_t cols = std::min<int64_t>(kMaxTileCols, j1 - jb);
    for (int64_t r = 0; r < N; r += kTileRows) {
      const int64_t rows = std::min<int64_t>(kTileRows, N - r);
      const auto* ar = a + r * K;
      const auto* wb = w + jb * ldw;
      switch (rows) {
        case 4: skinny_rows<P, 4>(ar, K, wb, ldw, cols, res); break;
        case 3: skinny_rows<P, 3>(ar, K, wb, ldw, cols, res); break;
        case 2: skinny_rows<P, 2>(ar, K, wb, ldw, cols, res); break;
        default: skinny_rows<P, 1>(ar, K, wb, ldw, cols, res); break;
      }
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j)
          out[(r + i) * ldo + jb + j] = static_cast<out_t>(res[i][j] + (bias ? bias[jb + j] : 0.0f));
    }
  }
}
#endif

bool cpu_has_avx512() {
#ifdef EAGLE_FDI_HAVE_AVX512_BUILD
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// bf16 dot-product instructions: on when the CPU has them, unless EAGLE_KERNELS_CPU_BF16DOT=0 (tests
// use it to check the widening path that CPUs without AVX512_BF16 take).
bool use_bf16_dot() {
#ifdef EAGLE_FDI_HAVE_AVX512_BUILD
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  const char* env = std::getenv("EAGLE_KERNELS_CPU_BF16DOT");
  return has && !(env != nullptr && std::string(env) == "0");
#else
  return false;
#endif
}

bool use_skinny(at::ScalarType dtype, int64_t N) {
  const std::string forced = forced_cpu_isa();
  if (forced == "generic" || forced == "avx2" || !cpu_has_avx512()) return false;
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (forced == "avx512" || dtype == at::kHalf) return true;
  if (dtype == at::kFloat) return N <= kSkinnyMaxRowsF32;
  return N <= (use_bf16_dot() ? kSkinnyMaxRowsBF16Dot : kSkinnyMaxRowsBF16);
}

#ifdef EAGLE_FDI_HAVE_AVX512_BUILD
// out = a @ w.T + bias through the skinny kernel with multiply policy P, columns split over threads.
template <typename P, typename out_t>
void run_skinny(at::Tensor& out, const at::Tensor& a, const at::Tensor& w, const float* bias) {
  const int64_t N = a.size(0), K = a.size(1), H = out.size(1);
  const bool direct = out.stride(1) == 1;
  at::Tensor dst = direct ? out : at::empty(out.sizes(), out.options());
  const int64_t blocks = (H + kMaxTileCols - 1) / kMaxTileCols;
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, N * K * kMaxTileCols));
  const auto* a_ptr = a.const_data_ptr<typename P::a_t>();
  const auto* w_ptr = w.const_data_ptr<typename P::w_elem>();
  out_t* o_ptr = dst.data_ptr<out_t>();
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    skinny_columns<P, out_t>(a_ptr, N, K, w_ptr, w.stride(0), bias, o_ptr, dst.stride(0), begin * kMaxTileCols,
                             std::min(H, end * kMaxTileCols));
  });
  if (!direct) out.copy_(dst);
}
#endif

}  // namespace

bool skinny_f32_available() { return cpu_has_avx512(); }

void skinny_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& w, const float* bias) {
#ifdef EAGLE_FDI_HAVE_AVX512_BUILD
  TORCH_CHECK(cpu_has_avx512(), "skinny_f32: this CPU has no AVX-512");
  run_skinny<WidenToF32<float>, float>(out, a, w, bias);
#else
  TORCH_CHECK(false, "skinny_f32: the skinny kernel was not compiled for this platform");
#endif
}

namespace {

void project_skinny(at::Tensor& out, const std::vector<Segment>& segments, const at::Tensor& fc_weight,
                    const std::optional<at::Tensor>& fc_bias) {
#ifdef EAGLE_FDI_HAVE_AVX512_BUILD
  const int64_t N = out.size(0);
  const at::Tensor w = fc_weight.stride(1) == 1 ? fc_weight : fc_weight.contiguous();
  const at::Tensor bias = fc_bias.has_value() ? fc_bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  switch (out.scalar_type()) {
    case at::kFloat:
      return run_skinny<WidenToF32<float>, float>(out, gather_rows(segments, N, at::kFloat), w, b);
    case at::kHalf:
      return run_skinny<WidenToF32<c10::Half>, c10::Half>(out, gather_rows(segments, N, at::kFloat), w, b);
    case at::kBFloat16:
      if (use_bf16_dot()) {
        return run_skinny<DotBF16, c10::BFloat16>(out, gather_rows(segments, N, at::kBFloat16), w, b);
      }
      return run_skinny<WidenToF32<c10::BFloat16>, c10::BFloat16>(out, gather_rows(segments, N, at::kFloat), w,
                                                                   b);
    default:
      TORCH_CHECK(false, "fused_draft_input: no skinny kernel for ", out.scalar_type());
  }
#else
  TORCH_CHECK(false, "fused_draft_input: the skinny kernel was not compiled for this platform");
#endif
}

void project_blas(at::Tensor& out, const at::Tensor& a, const at::Tensor& fc_weight,
                  const std::optional<at::Tensor>& fc_bias) {
  if (fc_bias.has_value()) {
    at::addmm_out(out, *fc_bias, a, fc_weight.t());
  } else {
    at::mm_out(out, a, fc_weight.t());
  }
}

void project(at::Tensor& out, const std::vector<Segment>& segments, const at::Tensor& fc_weight,
             const std::optional<at::Tensor>& fc_bias) {
  const int64_t N = out.size(0);
  if (N == 0) return;
  if (use_skinny(out.scalar_type(), N)) {
    project_skinny(out, segments, fc_weight, fc_bias);
  } else {
    project_blas(out, gather_rows(segments, N, out.scalar_type()), fc_weight, fc_bias);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------------
void fused_draft_input_cpu(const at::Tensor& hidden, const at::Tensor& token_ids, const at::Tensor& embed_weight,
                           const at::Tensor& fc_weight, const std::optional<at::Tensor>& fc_bias, at::Tensor out) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, "hidden must be [N, H], got ", hidden.sizes());
  const int64_t N = hidden.size(0), H = hidden.size(1);
  check_projection(hidden, fc_weight, fc_bias, out, 2);
  TORCH_CHECK_VALUE(token_ids.dim() == 1 && token_ids.size(0) == N, "token_ids must be [N] with N=", N,
                    ", got ", token_ids.sizes());
  TORCH_CHECK_TYPE(token_ids.scalar_type() == at::kInt || token_ids.scalar_type() == at::kLong,
                   "token_ids must be int32 or int64, got ", token_ids.scalar_type());
  TORCH_CHECK_VALUE(token_ids.device() == hidden.device(), "token_ids must be on ", hidden.device());
  TORCH_CHECK_VALUE(embed_weight.dim() == 2 && embed_weight.size(1) == H, "embed_weight must be [V, H] with H=",
                    H, ", got ", embed_weight.sizes());
  TORCH_CHECK_TYPE(embed_weight.scalar_type() == hidden.scalar_type(), "embed_weight dtype ",
                   embed_weight.scalar_type(), " does not match hidden's ", hidden.scalar_type());
  TORCH_CHECK_VALUE(embed_weight.device() == hidden.device(), "embed_weight must be on ", hidden.device());
  const at::Tensor ids = token_ids.to(at::kLong).contiguous();
  check_ids_in_range(ids.const_data_ptr<int64_t>(), N, embed_weight.size(0));
  project(out, {Segment{&embed_weight, ids.const_data_ptr<int64_t>()}, Segment{&hidden, nullptr}}, fc_weight,
          fc_bias);
}

void fused_eagle3_input_cpu(const at::Tensor& h_low, const at::Tensor& h_mid, const at::Tensor& h_high,
                            const at::Tensor& fc_weight, const std::optional<at::Tensor>& fc_bias, at::Tensor out) {
  TORCH_CHECK_VALUE(h_low.dim() == 2, "h_low must be [N, H], got ", h_low.sizes());
  check_rows("h_mid", h_mid, h_low);
  check_rows("h_high", h_high, h_low);
  check_projection(h_low, fc_weight, fc_bias, out, 3);
  project(out, {Segment{&h_low, nullptr}, Segment{&h_mid, nullptr}, Segment{&h_high, nullptr}}, fc_weight,
          fc_bias);
}

}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "fused_draft_input(Tensor hidden, Tensor token_ids, Tensor embed_weight, Tensor fc_weight, "
      "Tensor? fc_bias, Tensor(a!) out) -> ()");
  m.def(
      "fused_eagle3_input(Tensor h_low, Tensor h_mid, Tensor h_high, Tensor fc_weight, Tensor? fc_bias, "
      "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) {
  m.impl("fused_draft_input", &eagle::fused_draft_input_cpu);
  m.impl("fused_eagle3_input", &eagle::fused_eagle3_input_cpu);
}
