// argmax_checked: the greedy choice of the decoding loop and its NaN/inf check, in one pass.
//
// eagle_C::argmax_checked(logits [..., V]) -> (index int64 [...], nonfinite bool [])
//   index:     torch.argmax(logits, -1): the first maximum of each row; a row holding NaN gives its
//              first NaN (torch treats NaN as the largest value).
//   nonfinite: whether any element is NaN or +-inf (the loop raises on it).
//
// torch's argmax plus isfinite().all() cost ~200 us on the [16, 2048] bfloat16 logits of a verified
// draft tree (and ~20 us on one decode row), several percent of a small model's step; this costs a
// few microseconds. float16/bfloat16 are compared as float32 (exact: the conversion is monotonic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <tuple>
#include <type_traits>

#include "tensor_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace eagle {
namespace argmax_checked {
namespace {

template <typename T>
using Wide = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Returns the row's argmax (torch's rule) and sets *bad when the row holds NaN or inf. Portable
// scalar version (float64, and CPUs without AVX-512).
template <typename T>
int64_t row_argmax(const T* x, int64_t V, bool* bad) {
  using W = Wide<T>;
  W m = -std::numeric_limits<W>::infinity();
  bool odd = false;
  for (int64_t i = 0; i < V; ++i) {
    const W v = static_cast<W>(x[i]);
    odd |= !(v - v == W(0));  // v - v is NaN exactly when v is NaN or +-inf
    m = v > m ? v : m;
  }
  if (odd) {
    *bad = true;
    for (int64_t i = 0; i < V; ++i) {
      const W v = static_cast<W>(x[i]);
      if (v != v) return i;
    }
  }
  for (int64_t i = 0; i < V; ++i) {
    if (static_cast<W>(x[i]) == m) return i;
  }
  return 0;  // unreachable: some element equals the maximum
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EAGLE_ARGMAX_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,f16c")

// 16 elements as float32: bf16 by widening the bits, fp16 with the F16C conversion.
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const c10::BFloat16* x) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const c10::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// row_argmax for 16-bit and 32-bit floats, 16 lanes at a time: per-lane maxima and v - v sums
// (0 while every value is finite, NaN after a NaN or inf), then a search for the first lane equal
// to the maximum. The tail (V % 16) goes through the scalar loop's rules.
template <typename T>
int64_t row_argmax_avx512(const T* x, int64_t V, bool* bad) {
  const int64_t body = V / 16 * 16;
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), odd = _mm512_setzero_ps();
  for (int64_t i = 0; i < body; i += 16) {
    const __m512 v = load16(x + i);
    odd = _mm512_add_ps(odd, _mm512_sub_ps(v, v));
    best = _mm512_max_ps(v, best);  // a NaN v is flagged by `odd`; max_ps then keeps `best`
  }
  float m = _mm512_reduce_max_ps(best);
  bool is_odd = _mm512_cmp_ps_mask(odd, _mm512_setzero_ps(), _CMP_NEQ_UQ) != 0;
  for (int64_t i = body; i < V; ++i) {
    const float v = static_cast<float>(x[i]);
    is_odd |= !(v - v == 0.0f);
    m = v > m ? v : m;
  }
  if (is_odd) return row_argmax(x, V, bad);  // NaN/inf: the scalar rules (rare, then raised)
  const __m512 target = _mm512_set1_ps(m);
  for (int64_t i = 0; i < body; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(load16(x + i), target, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  for (int64_t i = body; i < V; ++i) {
    if (static_cast<float>(x[i]) == m) return i;
  }
  return 0;  // unreachable
}

#pragma GCC pop_options
#endif

template <typename T>
int64_t pick(const T* x, int64_t V, bool* bad) {
#ifdef EAGLE_ARGMAX_AVX512
  if constexpr (!std::is_same_v<T, double>) {
    static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
    if (avx512) return row_argmax_avx512(x, V, bad);
  }
#endif
  return row_argmax(x, V, bad);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> argmax_checked_cpu(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) > 0,
                    "argmax_checked: logits must be [..., V] with V > 0, got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "argmax_checked: CPU tensors only, got ", logits.device());
  const auto x = logits.contiguous();
  const int64_t V = x.size(-1), rows = x.numel() / V;
  auto index = pool::empty(x.sizes().slice(0, x.dim() - 1), at::kLong);
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "argmax_checked", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    int64_t* out = index.mutable_data_ptr<int64_t>();
    std::atomic<bool> any_bad{false};
    at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / V), [&](int64_t begin, int64_t end) {
      bool local = false;
      for (int64_t r = begin; r < end; ++r) out[r] = pick(data + r * V, V, &local);
      if (local) any_bad = true;
    });
    bad = any_bad;
  });
  return {index, at::scalar_tensor(bad, x.options().dtype(at::kBool))};
}

}  // namespace argmax_checked
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) { m.def("argmax_checked(Tensor logits) -> (Tensor index, Tensor nonfinite)"); }

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) { m.impl("argmax_checked", &eagle::argmax_checked::argmax_checked_cpu); }
