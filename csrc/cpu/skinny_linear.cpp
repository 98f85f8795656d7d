// skinny_linear: y = x @ W.T + b in float32 for the 1-16 rows of a decoding step on CPU.
//
// Why: MKL's sgemm, behind at::linear, is at memory speed for 1-2 rows but switches to kernels that
// run 1.6-2.3x slower from 4 rows on (bench/bench_runtime.py --linears-f32, F.linear column, one Xeon
// core: gate_up [1536, 256] 88 us at 1 row, 141 at 4, 175 at 8), so verifying a draft tree cost far
// more than a decode step although the weights, which dominate, are read once either way.
//
// How: the skinny GEMM of fused_draft_input.cpp (AVX-512 register tiles of up to 4 rows x 8 weight
// rows, W streamed once per 4 rows in its own [N, K] layout), called on x directly. Every output
// element is one fixed-order sum whatever the number of rows, the tile it falls in or the thread
// count, so a verified tree row equals the plain decoding step bit for bit.
#include "skinny_linear.h"
#include "tensor_pool.h"

#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "fused_draft_input.h"

namespace eagle {
namespace skinny {
namespace {

// Up to here it beat MKL on every tiny-code shape (bench/bench_runtime.py --linears-f32); at 32 rows
// MKL was as fast or faster.
constexpr int64_t kMaxRows = 16;

}  // namespace

int64_t max_rows() {
  static const bool supported = skinny_f32_available();
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
  at::Tensor out = pool::empty(out_shape, x.scalar_type());
  if (M == 0 || N == 0) return out;
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out2d = out.view({M, N});
  skinny_f32(out2d, x.reshape({M, K}).contiguous(), w.stride(1) == 1 ? w : w.contiguous(),
             bias.has_value() ? bc.const_data_ptr<float>() : nullptr);
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
