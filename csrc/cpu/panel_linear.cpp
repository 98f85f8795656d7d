// panel_linear: y = x @ W.T + b in float32 on CPU for the 1-64 rows of a decoding step or a tree
// verification, from W packed in column panels.
//
// Why: skinny_linear.cpp reads W in its own [N, K] layout, so each output is a dot product whose
// 16 lanes must be summed across the vector at the end; with the weights of a whole model streaming
// from L3 or memory that kernel ran at ~20 GMAC/s on 12 rows, and MKL not much better, so a verify
// of a 12-token tree cost about two plain steps although it reads the same weights once.
//
// How: W [N, K] is stored as panels [N/16, K, 16] (eagle/models/cpu_packed.py: panels()), so
// W[:, k] for 16 output features is one 64-byte vector. The micro-kernel keeps an RT x NB block of
// output vectors in registers and, for each k, loads NB weight vectors and broadcasts RT inputs:
// no horizontal sums, every weight byte read once per RT rows, the FMAs independent across the
// block. Row tiles of up to 12 rows with 2 panels, 3-6 rows with 4 panels, 1-2 rows with 8 panels
// keep 16-24 accumulators in the 32 vector registers (enough independent chains to hide the FMA
// latency even for one row). Threads split the output features in chunks of 8 panels.
//
// Numerics: out[r, n] = fma chain over k = 0..K-1 in order from 0, then + bias[n], in float32. The
// order depends on nothing but k, so a row gives the same bits alone, in a block of 60 tree rows, on
// any thread count: the speculative loop's greedy output equals plain decoding's.
//
// bfloat16 (panel_linear_bf16), for CPUs with AVX512-BF16 but no AMX (AMD Zen 4 and later, Intel
// Cooper Lake): W is stored as [N/16, K/2, 32], panel p holding W[16p + c, 2i + j] at [p, i, 2c + j],
// so one 64-byte vector holds k = 2i, 2i + 1 of 16 output features, the operand layout of VDPBF16PS;
// the input pair (x[r, 2i], x[r, 2i + 1]) is broadcast as one 32-bit lane. Each output is a float32
// chain over the pairs i in order (VDPBF16PS: both products exact, added to the accumulator in a
// fixed order), + bias in float32, rounded once to bf16 (RNE): again a row's bits do not depend on
// the rows beside it or the thread count. Against oneDNN's bf16 linear, which costs ~20 us a call
// whatever its size, this halves the bytes per weight of the float32 panels and keeps their
// few-microsecond calls. Odd K or N % 16 != 0: no bf16 panels (eagle/models/cpu_packed.py keeps
// oneDNN's layout for such a weight).
#include "linear_grain.h"
#include "panel_linear.h"
#include "tensor_pool.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#define EAGLE_PANEL_BUILD 1
#include <immintrin.h>
#else
#define EAGLE_PANEL_BUILD 0
#endif

namespace eagle {
namespace panel {

#if EAGLE_PANEL_BUILD
namespace {

#define EAGLE_PANEL_TARGET __attribute__((target("avx512f")))

constexpr int kChunkPanels = 8;  // panels per unit of parallel work (128 output features)
constexpr int kMaxRowTile = 12;
// Weight lines (k steps of every panel) requested ahead of the FMAs, for tiles of 3+ rows: at 7-12 rows
// the kernel streams the weights from L3 at about the rate the hardware prefetcher alone sustains, and
// this took 12 rows of the tiny-code layer shapes from 173 to 150 us (6 rows: 140 -> 137; 1-2 rows,
// 8 panels each, run without it: there it cost ~3%). Distances of 16 and 64 lines measured worse.
constexpr int64_t kPrefetchAhead = 32;

// Panels per micro-kernel call for a tile of rt rows: rt * nb accumulators + nb weights + 1 input
// stay within the 32 zmm registers. (One panel for 13-24 rows, which reads the weights once, ran
// at half the speed of two passes of 12 rows x 2 panels: the broadcasts outnumber the FMAs' loads.)
constexpr int panels_for_rows(int rt) { return rt <= 2 ? 8 : rt <= 6 ? 4 : 2; }

// out[r, 16j + c] = bias[16j + c] + sum_k x[r, k] * panels[j, k, c] for r < RT, j < NB.
template <int RT, int NB>
EAGLE_PANEL_TARGET void micro(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t K,
                              const float* __restrict bias, float* __restrict out, int64_t ldo) {
  __m512 acc[RT][NB];
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t panel_stride = K * kPanelWidth;
  // The last steps of panel j fetch the start of panel j + NB, the next call's (see micro_bf16).
  const int64_t wrap_from = std::max<int64_t>(K - kPrefetchAhead, 0);
  for (int64_t k = 0; k < K; ++k) {
    const float* ahead = w + (k + kPrefetchAhead) * kPanelWidth + (k < wrap_from ? 0 : (NB - 1) * panel_stride);
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) {
      if constexpr (RT > 2) {  // see kPrefetchAhead
        _mm_prefetch(reinterpret_cast<const char*>(ahead + j * panel_stride), _MM_HINT_T0);
      }
      wv[j] = _mm512_loadu_ps(w + j * panel_stride + k * kPanelWidth);
    }
    for (int r = 0; r < RT; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_fmadd_ps(a, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < RT; ++r) {
    for (int j = 0; j < NB; ++j) {
      __m512 v = acc[r][j];
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j * kPanelWidth));
      _mm512_storeu_ps(out + r * ldo + j * kPanelWidth, v);
    }
  }
}

#define EAGLE_PANEL_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// out[r, 16j + c] = bf16(bias[16j + c] + sum_i dot(x[r, 2i:2i+2], panels[j, i, 2c:2c+2])) for r < RT,
// j < NB, over the K / 2 pairs i.
template <int RT, int NB>
EAGLE_PANEL_BF16_TARGET void micro_bf16(const uint16_t* __restrict x, int64_t ldx, const uint16_t* __restrict w,
                                        int64_t K, const uint16_t* __restrict bias, uint16_t* __restrict out,
                                        int64_t ldo) {
  __m512 acc[RT][NB];
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t K2 = K / 2, panel_stride = K * kPanelWidth;  // bf16 elements per panel
  // 16 lines ahead (each holds two k steps) for every row count: on a Zen 4 core it sped up 1 and
  // 3-12 rows by 2-15% and left 2 rows unchanged (ad hoc, in one process, alternating). The last
  // steps of panel j fetch the start of panel j + NB, which the next call (the next NB panels, laid out
  // right after these) streams first: a plain "i + ahead" there would fetch panel j + 1, which this
  // call is already reading, and leave all but one of the next call's streams to start cold.
  constexpr int64_t kAhead = kPrefetchAhead / 2;
  const int64_t wrap_from = std::max<int64_t>(K2 - kAhead, 0);
  for (int64_t i = 0; i < K2; ++i) {
    const uint16_t* ahead = w + (i + kAhead) * 2 * kPanelWidth + (i < wrap_from ? 0 : (NB - 1) * panel_stride);
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + j * panel_stride), _MM_HINT_T0);
      wv[j] = (__m512bh)_mm512_loadu_si512(w + j * panel_stride + i * 2 * kPanelWidth);
    }
    for (int r = 0; r < RT; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, x + r * ldx + 2 * i, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, wv[j]);
    }
  }
  for (int r = 0; r < RT; ++r) {
    for (int j = 0; j < NB; ++j) {
      __m512 v = acc[r][j];
      if (bias != nullptr) {  // bf16 -> float32: the bits shifted into the high half
        const __m256i b16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + j * kPanelWidth));
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b16), 16)));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + j * kPanelWidth),
                          (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// The micro-kernel of element type T (float: float32 panels; uint16_t: bf16 panels, K even).
template <typename T>
using MicroFn = void (*)(const T*, int64_t, const T*, int64_t, const T*, T*, int64_t);

template <typename T, int RT, int NB>
constexpr MicroFn<T> micro_of() {
  if constexpr (std::is_same_v<T, float>) {
    return micro<RT, NB>;
  } else {
    return micro_bf16<RT, NB>;
  }
}

template <typename T, int RT>
MicroFn<T> micro_for(int nb) {
  if constexpr (RT <= 2) {
    if (nb == 8) return micro_of<T, RT, 8>();
  }
  if constexpr (RT <= 6) {
    if (nb == 4) return micro_of<T, RT, 4>();
  }
  if (nb == 2) return micro_of<T, RT, 2>();
  return micro_of<T, RT, 1>();
}

template <typename T>
MicroFn<T> select_micro(int rt, int nb) {
  switch (rt) {
    case 1: return micro_for<T, 1>(nb);
    case 2: return micro_for<T, 2>(nb);
    case 3: return micro_for<T, 3>(nb);
    case 4: return micro_for<T, 4>(nb);
    case 5: return micro_for<T, 5>(nb);
    case 6: return micro_for<T, 6>(nb);
    case 7: return micro_for<T, 7>(nb);
    case 8: return micro_for<T, 8>(nb);
    case 9: return micro_for<T, 9>(nb);
    case 10: return micro_for<T, 10>(nb);
    case 11: return micro_for<T, 11>(nb);
    default: return micro_for<T, 12>(nb);
  }
}

// Panels [p0, p1) for every row: the chunk's panels stay in L2 while the row tiles pass over them.
// A panel holds K * 16 elements in either layout.
template <typename T>
void run_panels(const T* x, int64_t M, int64_t K, const T* w, const T* bias, T* out, int64_t N, int64_t p0,
                int64_t p1) {
  for (int64_t r0 = 0; r0 < M; r0 += kMaxRowTile) {
    const int rt = static_cast<int>(std::min<int64_t>(kMaxRowTile, M - r0));
    for (int64_t p = p0; p < p1;) {
      int nb = panels_for_rows(rt);
      while (nb > p1 - p) nb /= 2;  // the last panels of the matrix: smaller steps (nb stays a power of 2)
      select_micro<T>(rt, nb)(x + r0 * K, K, w + p * K * kPanelWidth, K,
                              bias == nullptr ? nullptr : bias + p * kPanelWidth, out + r0 * N + p * kPanelWidth, N);
      p += nb;
    }
  }
}

}  // namespace
#endif  // EAGLE_PANEL_BUILD

bool available() {
#if EAGLE_PANEL_BUILD
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

bool bf16_available() {
#if EAGLE_PANEL_BUILD
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

bool is_bf16_panel_weight(const at::Tensor& w) {
  return w.dim() == 3 && w.scalar_type() == at::kBFloat16 && w.size(2) == 2 * kPanelWidth && !w.is_mkldnn() &&
         w.device().is_cpu() && w.is_contiguous();
}

bool is_panel_weight(const at::Tensor& w) {
  return w.dim() == 3 && w.scalar_type() == at::kFloat && w.size(2) == kPanelWidth && !w.is_mkldnn() &&
         w.device().is_cpu() && w.is_contiguous();
}

namespace {

// The shared part of linear_f32 / linear_bf16 after their checks: the output, the empty cases, then
// the panels split across threads. Scalar: the tensors' element type; Elem: the kernels' view of it.
template <typename Scalar, typename Elem>
at::Tensor multiply(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias, int64_t N,
                    int64_t K) {
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  at::Tensor out = pool::empty(out_shape, x.scalar_type());
  if (K == 0) return bias.has_value() ? out.copy_(bias->expand(out_shape)) : out.zero_();  // an empty sum
  const int64_t M = x.numel() / K;
  if (M == 0 || N == 0) return out;
#if EAGLE_PANEL_BUILD
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto* xp = reinterpret_cast<const Elem*>(xc.const_data_ptr<Scalar>());
  const auto* wp = reinterpret_cast<const Elem*>(panels.const_data_ptr<Scalar>());
  const auto* bp = bc.defined() ? reinterpret_cast<const Elem*>(bc.const_data_ptr<Scalar>()) : nullptr;
  auto* op = reinterpret_cast<Elem*>(out.mutable_data_ptr<Scalar>());
  const int64_t num_panels = panels.size(0), chunks = (num_panels + kChunkPanels - 1) / kChunkPanels;
  const int64_t grain =
      linear_grain(M * K * kChunkPanels * kPanelWidth, K * kChunkPanels * kPanelWidth * int64_t{sizeof(Scalar)});
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    run_panels<Elem>(xp, M, K, wp, bp, op, N, begin * kChunkPanels, std::min(num_panels, end * kChunkPanels));
  });
#endif
  return out;
}

}  // namespace

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(available(), "panel_linear_f32: this CPU has no AVX-512F");
  TORCH_CHECK_VALUE(is_panel_weight(panels),
                    "panel_linear_f32: weight must be a contiguous CPU float32 tensor [N/16, K, 16], got ",
                    panels.scalar_type(), " ", panels.sizes(), " on ", panels.device());
  const int64_t N = panels.size(0) * kPanelWidth, K = panels.size(1);
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) == K,
                    "panel_linear_f32: x must be a CPU float32 tensor [..., ", K, "], got ", x.scalar_type(), " ",
                    x.sizes(), " on ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                          bias->size(0) == N,
                      "panel_linear_f32: bias must be a CPU float32 tensor [", N, "], got ", bias->scalar_type(),
                      " ", bias->sizes());
  }
  return multiply<float, float>(x, panels, bias, N, K);
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(bf16_available(), "panel_linear_bf16: this CPU has no AVX512-BF16");
  TORCH_CHECK_VALUE(is_bf16_panel_weight(panels),
                    "panel_linear_bf16: weight must be a contiguous CPU bfloat16 tensor [N/16, K/2, 32], got ",
                    panels.scalar_type(), " ", panels.sizes(), " on ", panels.device());
  const int64_t N = panels.size(0) * kPanelWidth, K = panels.size(1) * 2;
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() >= 1 && x.size(-1) == K,
                    "panel_linear_bf16: x must be a CPU bfloat16 tensor [..., ", K, "], got ", x.scalar_type(), " ",
                    x.sizes(), " on ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->scalar_type() == at::kBFloat16 && bias->dim() == 1 &&
                          bias->size(0) == N,
                      "panel_linear_bf16: bias must be a CPU bfloat16 tensor [", N, "], got ", bias->scalar_type(),
                      " ", bias->sizes());
  }
  return multiply<at::BFloat16, uint16_t>(x, panels, bias, N, K);
}

}  // namespace panel
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def("panel_linear_available() -> bool", &eagle::panel::available);
  m.def("panel_linear_f32(Tensor x, Tensor weight_panels, Tensor? bias) -> Tensor");
  m.def("panel_linear_bf16_available() -> bool", &eagle::panel::bf16_available);
  m.def("panel_linear_bf16(Tensor x, Tensor weight_panels, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) {
  m.impl("panel_linear_f32", &eagle::panel::linear_f32);
  m.impl("panel_linear_bf16", &eagle::panel::linear_bf16);
}
