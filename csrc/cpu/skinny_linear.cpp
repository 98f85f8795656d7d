// skinny_linear: y = x @ W.T + b in float32 for the 1-16 rows of a decoding step on CPU.
//
// Why: MKL's sgemm, behind at::linear, is at memory speed for 1-3 rows but switches to kernels that
// run 1.4-2.2x slower from 4 rows on (this repo's tiny-code shapes, one Xeon core: gate_up [1536, 256]
// 85 us at 1 row, 126 at 4, 153 at 8), so verifying an 8-token draft tree cost 1.8 decode steps
// although the weights, which dominate, are read once either way.
//
// How: W stays in its [N, K] layout. A block of 4 weight rows x 4 input rows keeps 16 AVX-512
// accumulators of 16 lanes; each k step loads 4 weight vectors and 4 input vectors and issues 16
// FMAs, so W streams from memory once while the 4x4 products stay in registers. Lane j of an
// accumulator sums k = j, j + 16, ... in order; the 16 accumulators' lanes are then added with one
// shuffle-and-add tree (the same pairs for every accumulator, whichever share the block), plus the
// bias. Every output element is therefore the same sum whatever the number of rows, the block it
// falls in or the thread count: a verified tree row equals the plain decoding step bit for bit.
// Threads split the output columns.
#include "skinny_linear.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EAGLE_SKINNY_X86 1
#define EAGLE_SKINNY_TARGET __attribute__((target("avx512f,fma")))
#endif

namespace eagle {
namespace skinny {
namespace {

// Up to here it beat MKL on every tiny-code shape (bench/bench_runtime.py --linears); at 32 rows MKL
// was as fast or faster.
constexpr int64_t kMaxRows = 16;
constexpr int kRowBlock = 4;      // input rows per register block
constexpr int kColBlock = 4;      // weight rows (output columns) per register block

#ifdef EAGLE_SKINNY_X86
// Lane 4q + r of the result is the sum of the 16 lanes of a[4r + q]. Every vector goes through the
// same tree of pairwise adds (lanes j + j+8, then j + j+4, j + j+2, j + j+1 of what is left), so an
// output's sum has one order whichever vectors share the call.
EAGLE_SKINNY_TARGET inline __m512 reduce16(const __m512* a) {
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

// out[m * ldo + n] = sum_k x[m * K + k] * w[n * K + k] (+ bias[n]) for an MR x NR block.
template <int MR, int NR>
EAGLE_SKINNY_TARGET void block(const float* x, const float* w, int64_t K, const float* bias, float* out,
                               int64_t ldo) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = _mm512_loadu_ps(w + n * K + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  if (k < K) {  // tail: masked loads read zeros past K
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = _mm512_maskz_loadu_ps(mask, w + n * K + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  // Reduce the 16 accumulators (missing ones zero) at once: lane 4n + m of `sums` is output (m, n).
  __m512 all[16];
  for (int i = 0; i < 16; ++i) all[i] = _mm512_setzero_ps();
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) all[m * 4 + n] = acc[m][n];
  alignas(64) float sums[16];
  _mm512_store_ps(sums, reduce16(all));
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out[m * ldo + n] = bias == nullptr ? sums[4 * n + m] : sums[4 * n + m] + bias[n];
}

using BlockFn = void (*)(const float*, const float*, int64_t, const float*, float*, int64_t);

template <int MR>
constexpr BlockFn kBlocksOfRows[kColBlock] = {block<MR, 1>, block<MR, 2>, block<MR, 3>, block<MR, 4>};
constexpr const BlockFn* kBlocks[kRowBlock] = {kBlocksOfRows<1>, kBlocksOfRows<2>, kBlocksOfRows<3>,
                                               kBlocksOfRows<4>};

void run(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, float* out) {
  const int64_t col_blocks = (N + kColBlock - 1) / kColBlock;
  // Each task streams >= ~256 KiB of W, so small layers stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, kColBlock * K));
  at::parallel_for(0, col_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t cb = begin; cb < end; ++cb) {
      const int64_t n0 = cb * kColBlock;
      const int nr = static_cast<int>(std::min<int64_t>(kColBlock, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
        const int mr = static_cast<int>(std::min<int64_t>(kRowBlock, M - m0));
        kBlocks[mr - 1][nr - 1](x + m0 * K, w + n0 * K, K, bias == nullptr ? nullptr : bias + n0,
                                out + m0 * N + n0, N);
      }
    }
  });
}
#endif

bool cpu_supported() {
#ifdef EAGLE_SKINNY_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace

int64_t max_rows() {
  static const bool supported = cpu_supported();
  if (!supported) return 0;
  const char* env = std::getenv("EAGLE_CPU_SKINNY_LINEAR");  // read per call: benchmarks toggle it
  return env != nullptr && std::strcmp(env, "0") == 0 ? 0 : kMaxRows;
}

bool applies(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  if (max_rows() == 0 || x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat) return false;
  if (!x.device().is_cpu() || !w.device().is_cpu() || w.is_mkldnn() || x.dim() < 1 || w.dim() != 2) return false;
  if (!w.is_contiguous() || x.size(-1) != w.size(1) || w.size(1) == 0) return false;
  if (bias.has_value() && (bias->scalar_type() != at::kFloat || !bias->device().is_cpu() || bias->numel() != w.size(0)))
    return false;
  const int64_t rows = x.numel() / w.size(1);
  return rows >= 1 && rows <= max_rows();
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(max_rows() > 0, "skinny_linear_f32: needs AVX-512 (and EAGLE_CPU_SKINNY_LINEAR not 0)");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
                   "skinny_linear_f32: x and weight must be float32, got ", x.scalar_type(), " and ",
                   w.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() && w.device().is_cpu() && !w.is_mkldnn(),
                    "skinny_linear_f32: CPU tensors only (weight in its plain [N, K] layout)");
  TORCH_CHECK_VALUE(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1) && w.size(1) > 0,
                    "skinny_linear_f32: x must be [..., K] and weight [N, K], got ", x.sizes(), " and ",
                    w.sizes());
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  TORCH_CHECK_VALUE(M <= max_rows(), "skinny_linear_f32: at most ", max_rows(), " rows, got ", M);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->device().is_cpu() && bias->numel() == N,
                      "skinny_linear_f32: bias must be a CPU float32 tensor of ", N, " elements, got ",
                      bias->scalar_type(), " ", bias->sizes());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options());
  if (M == 0 || N == 0) return out;
#ifdef EAGLE_SKINNY_X86
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  run(xc.const_data_ptr<float>(), M, K, wc.const_data_ptr<float>(), N,
      bias.has_value() ? bc.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>());
#endif
  return out;
}

}  // namespace skinny
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def("skinny_linear_f32(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("skinny_linear_max_rows() -> int");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) { m.impl("skinny_linear_f32", &eagle::skinny::linear_f32); }

TORCH_LIBRARY_IMPL(eagle_C, CompositeExplicitAutograd, m) {
  m.impl("skinny_linear_max_rows", []() -> int64_t { return eagle::skinny::max_rows(); });
}
