// dequantize_kv: the CPU path of 8-bit KV caches (eagle_kernels._kv_quant). tree_attention's C++ kernel
// reads K and V in q's dtype, so an fp8 / int8 cache is first dequantized into that dtype, each
// sequence's rows up to its last new token only: value(byte) * scale[h], the product in float32
// (float64 for a float64 output) rounded once, which is what PyTorch's cache.float() * scale gives.
//
// PyTorch's float8_e4m3fn -> float32 conversion costs ~5 ns an element on a Zen 4 core (20 ms for a
// 16-sequence, 1k-position cache of 4 heads of 64, one thread, ad hoc), more than the attention it
// feeds; here every 8-bit format is decoded in vectorised integer code (kv_decode.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "half_convert.h"
#include "kv_decode.h"
#include "tensor_pool.h"

namespace eagle {
namespace dequant {
namespace {

using kvq::kE4M3;
using kvq::kE5M2;
using kvq::kInt8;
using kvq::scaled;

// One row of D bytes into T, vectorised (float32 out: ~0.15 ns an element for int8, ~0.26 for fp8, one
// Zen 4 core). The unit-stride loop is a function of its own: inside the strided one's branch GCC 12 did
// not vectorise the fp8 decode (2.5 ns an element).
template <int64_t K, typename T>
EAGLE_AVX512_CLONE void convert_unit_row(const uint8_t* __restrict src, double scale, T* __restrict dst, int64_t D) {
  const float s = static_cast<float>(scale);
  for (int64_t d = 0; d < D; ++d) dst[d] = convert::Math<T>::store(kvq::decode<K>(src[d]) * s);
}

template <int64_t K, typename T>
void convert_row(const uint8_t* src, int64_t s_d, double scale, T* dst, int64_t D) {
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t d = 0; d < D; ++d) dst[d] = scaled<K, T>(src[d * s_d], scale);
  } else {
    if (s_d == 1) return convert_unit_row<K, T>(src, scale, dst, D);
    for (int64_t d = 0; d < D; ++d) dst[d] = scaled<K, T>(src[d * s_d], scale);
  }
}

template <int64_t K, typename T>
void convert(const at::Tensor& cache, const double* scales, int64_t n_scales, const int64_t* lengths, at::Tensor& out) {
  const int64_t B = cache.size(0), H = cache.size(1), D = cache.size(3), L = out.size(2);
  const int64_t sb = cache.stride(0), sh = cache.stride(1), ss = cache.stride(2), sd = cache.stride(3);
  const uint8_t* src = cache.const_data_ptr<uint8_t>();
  T* dst = out.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, L * D));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, n = lengths[b], hs = n_scales == 1 ? 0 : h;
      const uint8_t* rows = src + b * sb + h * sh;
      T* o = dst + bh * L * D;
      for (int64_t s = 0; s < n; ++s) {
        convert_row<K, T>(rows + s * ss, sd, scales[hs], o + s * D, D);
      }
      // rows past the sequence's length are never read by the attention; zeroed, not left unset
      std::memset(static_cast<void*>(o + n * D), 0, static_cast<size_t>((L - n) * D) * sizeof(T));
    }
  });
}

template <int64_t K, typename T>
void convert_row_erased(const uint8_t* src, int64_t s_d, double scale, void* dst, int64_t D) {
  convert_row<K, T>(src, s_d, scale, static_cast<T*>(dst), D);
}

template <typename T>
void convert_kind(int64_t kind, const at::Tensor& cache, const double* scales, int64_t n_scales, const int64_t* lengths,
                  at::Tensor& out) {
  if (kind == kInt8) {
    convert<kInt8, T>(cache, scales, n_scales, lengths, out);
  } else if (kind == kE4M3) {
    convert<kE4M3, T>(cache, scales, n_scales, lengths, out);
  } else {
    convert<kE5M2, T>(cache, scales, n_scales, lengths, out);
  }
}

}  // namespace

}  // namespace dequant

namespace kvq {

RowConvert row_converter(int64_t kind, at::ScalarType dtype) {
  RowConvert fn = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "eagle_kv_row_converter", [&] {
    fn = kind == kInt8   ? &dequant::convert_row_erased<kInt8, scalar_t>
         : kind == kE4M3 ? &dequant::convert_row_erased<kE4M3, scalar_t>
                         : &dequant::convert_row_erased<kE5M2, scalar_t>;
  });
  return fn;
}

}  // namespace kvq

namespace dequant {

// cache: [B, H, S, D] uint8 (the bytes of an 8-bit cache), any strides; kind: 0 int8, 1 float8_e4m3fn,
// 2 float8_e5m2; scale: float64 [1 or H] (one value, or one per head), or None (1); dtype: the output's
// (float32 / bfloat16 / float16 / float64); lengths: int32 / int64 [B], 0 <= lengths[b] <= S. Returns
// [B, H, max(lengths), D]: row s < lengths[b] of (b, h) is value(cache[b, h, s]) * scale[h], the rest zero.
at::Tensor dequantize_kv(const at::Tensor& cache, int64_t kind, const std::optional<at::Tensor>& scale,
                         at::ScalarType dtype, const at::Tensor& lengths) {
  TORCH_CHECK_VALUE(cache.device().is_cpu() && lengths.device().is_cpu(), "dequantize_kv: CPU tensors only");
  TORCH_CHECK_TYPE(cache.scalar_type() == at::kByte, "dequantize_kv: cache must be uint8 (an 8-bit cache's bytes), got ",
                   cache.scalar_type());
  TORCH_CHECK_VALUE(cache.dim() == 4, "dequantize_kv: cache must be [B, H, S, D], got ", cache.sizes());
  TORCH_CHECK_VALUE(kind == kInt8 || kind == kE4M3 || kind == kE5M2,
                    "dequantize_kv: kind must be 0 (int8), 1 (float8_e4m3fn) or 2 (float8_e5m2), got ", kind);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
                   "dequantize_kv: dtype must be float32, bfloat16, float16 or float64, got ", dtype);
  const int64_t B = cache.size(0), H = cache.size(1), S = cache.size(2);
  at::Tensor scales = scale.has_value() ? scale->to(at::kDouble).contiguous() : at::ones({1}, at::kDouble);
  TORCH_CHECK_VALUE(scales.device().is_cpu() && scales.dim() == 1 && (scales.size(0) == 1 || scales.size(0) == H),
                    "dequantize_kv: scale must be a CPU tensor [1 or H=", H, "], got ", scales.sizes(), " on ",
                    scales.device());
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong,
                   "dequantize_kv: lengths must be int32 or int64, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == B, "dequantize_kv: lengths must be [B=", B, "], got ",
                    lengths.sizes());
  const at::Tensor lens = lengths.to(at::kLong).contiguous();
  const int64_t* n = lens.const_data_ptr<int64_t>();
  int64_t L = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(n[b] >= 0 && n[b] <= S, "dequantize_kv: lengths[", b, "] = ", n[b], " is outside 0..S=", S);
    L = std::max(L, n[b]);
  }
  // (the process's reused blocks: a fresh allocation of a long cache's size faults in every page, which
  // cost more than the conversion)
  at::Tensor out = pool::empty({B, H, L, cache.size(3)}, dtype);
  const double* sc = scales.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "eagle_dequantize_kv",
                                  [&] { convert_kind<scalar_t>(kind, cache, sc, scales.size(0), n, out); });
  return out;
}

}  // namespace dequant
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def("dequantize_kv(Tensor cache, int kind, Tensor? scale, ScalarType dtype, Tensor lengths) -> Tensor");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) { m.impl("dequantize_kv", &eagle::dequant::dequantize_kv); }
