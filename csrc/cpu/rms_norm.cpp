// rms_norm: Llama's RMSNorm on CPU for inference. eagle.models.llama.RMSNorm (outside autograd) and
// the llama_layers op both call it, so the two stay bit-identical; this file alone decides which
// kernel each dtype gets.
//
// Semantics (transformers' LlamaRMSNorm): the row is taken to float32, normalised as
// x * 1/sqrt(mean(x^2) + eps) in float32, and
//   float32 input:  multiplied by the weight in float32;
//   other dtypes:   rounded to the input dtype, then multiplied by the weight in that dtype.
//
// float32/bf16/fp16: one loop per row here. torch's rms_norm is a composition of ~6-8 ops (pow,
// mean, add, rsqrt, mul, ...), each with its own dispatch: ~12 us for one row of 256 on a Xeon core
// against ~2 us here, and a decoding step of a small model runs ~25 of them. The sum of squares is
// accumulated in double and the mean rounded once to float32 (torch sums in float32, so a result
// can differ from torch's in the last bit of the mean).
// float64: torch's kernel on the float32 copy, as transformers computes it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "half_convert.h"
#include "tensor_pool.h"

namespace eagle {
namespace rms {
namespace {

// One row: float32 normalisation, rounded to the dtype (a no-op for float32), times the weight in the dtype.
template <typename scalar_t>
EAGLE_AVX512_CLONE void norm_row(const scalar_t* xr, const scalar_t* w, scalar_t* yr, int64_t H, float eps) {
  using M = convert::Math<scalar_t>;
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < H; ++i) {
    const float v = M::load(xr[i]);
    sum += static_cast<double>(v) * static_cast<double>(v);
  }
  const float mean = static_cast<float>(sum / static_cast<double>(H));
  const float inv = 1.0f / std::sqrt(mean + eps);
  for (int64_t i = 0; i < H; ++i) {
    const float normed = M::load(M::store(M::load(xr[i]) * inv));  // rounded to the dtype, as in HF
    yr[i] = M::store(M::load(w[i]) * normed);
  }
}

template <typename scalar_t>
void norm_rows(const scalar_t* x, const scalar_t* w, scalar_t* out, int64_t rows, int64_t H, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(x + r * H, w, out + r * H, H, eps);
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0),
                    "rms_norm: x must be [..., H] and weight [H], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type(), "rms_norm: x (", x.scalar_type(), ") and weight (",
                   weight.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "rms_norm: x must be a floating-point tensor, got ",
                   x.scalar_type());
  const int64_t H = weight.size(0);
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kHalf) {
    return weight * at::rms_norm(x.to(at::kFloat), {H}, std::nullopt, eps).to(x.scalar_type());
  }
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = pool::empty(xc.sizes(), xc.scalar_type());
  const int64_t rows = H == 0 ? 0 : xc.numel() / H;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "eagle_rms_norm", [&] {
    norm_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                        rows, H, static_cast<float>(eps));
  });
  return out;
}

}  // namespace rms
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) { m.impl("rms_norm", &eagle::rms::rms_norm); }
