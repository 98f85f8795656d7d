// The sampling loops' random numbers and inverse-CDF draw on CPU (eagle/rng.py), bit for bit.
//
// eagle_C::uniforms(seeds int64 [B], counter int [B], int n, ScalarType dtype) -> [B, n]
// eagle_C::inverse_cdf(probs [R, V], u [R]) -> int64 [R]
//
// eagle.rng builds the counter-based uniforms from ~30 int64 tensor ops (splitmix64 three times, the
// logical shifts as shift-and-mask) and the inverse CDF from cumsum + searchsorted; each is a dispatch
// and an allocation, together ~0.15 ms of a sampled decoding step of a small model on one core. The
// loops below compute the same values: integer hashing (wrapping, as ATen's int64 ops), an exact
// int-to-float conversion times a power of two, a sequential float64 running sum (ATen's CPU cumsum
// accumulates in order in float64) and ATen's upper-bound search (`!(mid > value)`, so NaN behaves the
// same way).
#include "rng.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace eagle {
namespace rng {

namespace {

void check_row_vector(const char* name, const at::Tensor& t, int64_t B) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, "uniforms: ", name, " must be [B] = [", B, "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "uniforms: ", name, " must be on the CPU, got ", t.device());
}

template <typename F>
void fill_uniforms(const int64_t* seeds, const at::Tensor& counter, int64_t B, int64_t n, F* out) {
  constexpr int mantissa = std::is_same_v<F, double> ? 53 : 24;
  const F scale = std::ldexp(F(1), -mantissa);
  for (int64_t b = 0; b < B; ++b) {
    const uint64_t draw = counter.scalar_type() == at::kLong
                              ? static_cast<uint64_t>(counter.const_data_ptr<int64_t>()[b])
                              : static_cast<uint64_t>(static_cast<int64_t>(counter.const_data_ptr<int32_t>()[b]));
    const uint64_t base = splitmix64(static_cast<uint64_t>(seeds[b]) ^ splitmix64(draw));
    for (int64_t j = 0; j < n; ++j) {
      // eagle.rng: splitmix64(base + (j + 1) * GOLDEN), top `mantissa` bits, times 2^-mantissa
      const uint64_t bits = splitmix64(base + static_cast<uint64_t>(j + 1) * 0x9E3779B97F4A7C15ull);
      out[b * n + j] = static_cast<F>(static_cast<int64_t>(bits >> (64 - mantissa))) * scale;
    }
  }
}

template <typename P, typename U>
void sample_rows(const P* probs, int64_t R, int64_t V, int64_t row_stride, const U* u, int64_t* out,
                 std::vector<double>& cdf) {
  cdf.resize(V);
  for (int64_t r = 0; r < R; ++r) {
    const P* p = probs + r * row_stride;
    double acc = 0.0;
    for (int64_t i = 0; i < V; ++i) cdf[i] = acc += static_cast<double>(p[i]);
    const double target = static_cast<double>(u[r]) * cdf[V - 1];
    int64_t lo = 0, hi = V;  // ATen's searchsorted(right=True): the first index whose value > target
    while (lo < hi) {
      const int64_t mid = lo + ((hi - lo) >> 1);
      if (!(cdf[mid] > target)) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    out[r] = std::min(lo, V - 1);
  }
}

}  // namespace

at::Tensor uniforms_cpu(const at::Tensor& seeds, const at::Tensor& counter, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(seeds.scalar_type() == at::kLong, "uniforms: seeds must be int64, got ", seeds.scalar_type());
  TORCH_CHECK_TYPE(counter.scalar_type() == at::kLong || counter.scalar_type() == at::kInt,
                   "uniforms: counter must be int32 or int64, got ", counter.scalar_type());
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, "uniforms: dtype must be float32 or float64, got ",
                   dtype);
  TORCH_CHECK_VALUE(n >= 0, "uniforms: n must be >= 0, got ", n);
  const int64_t B = seeds.dim() == 1 ? seeds.size(0) : -1;
  TORCH_CHECK_VALUE(B >= 0, "uniforms: seeds must be [B], got ", seeds.sizes());
  check_row_vector("seeds", seeds, B);
  check_row_vector("counter", counter, B);
  const at::Tensor s = seeds.contiguous(), c = counter.contiguous();
  at::Tensor out = at::empty({B, n}, seeds.options().dtype(dtype));
  if (dtype == at::kDouble) {
    fill_uniforms(s.const_data_ptr<int64_t>(), c, B, n, out.mutable_data_ptr<double>());
  } else {
    fill_uniforms(s.const_data_ptr<int64_t>(), c, B, n, out.mutable_data_ptr<float>());
  }
  return out;
}

at::Tensor inverse_cdf_cpu(const at::Tensor& probs, const at::Tensor& u) {
  TORCH_CHECK_VALUE(probs.dim() == 2 && probs.size(1) >= 1, "inverse_cdf: probs must be [R, V >= 1], got ",
                    probs.sizes());
  const int64_t R = probs.size(0), V = probs.size(1);
  TORCH_CHECK_VALUE(u.dim() == 1 && u.size(0) == R, "inverse_cdf: u must be [R] = [", R, "], got ", u.sizes());
  TORCH_CHECK_VALUE(probs.device().is_cpu() && u.device().is_cpu(), "inverse_cdf: probs and u must be on the CPU");
  TORCH_CHECK_TYPE(at::isFloatingType(probs.scalar_type()) && at::isFloatingType(u.scalar_type()),
                   "inverse_cdf: probs and u must be floating point, got ", probs.scalar_type(), " and ",
                   u.scalar_type());
  const at::Tensor p = probs.stride(1) == 1 ? probs : probs.contiguous();
  const at::Tensor w = u.contiguous();
  at::Tensor out = at::empty({R}, probs.options().dtype(at::kLong));
  std::vector<double> cdf;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "inverse_cdf_p", [&] {
    using P = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "inverse_cdf_u", [&] {
      sample_rows<P, scalar_t>(p.const_data_ptr<P>(), R, V, p.stride(0), w.const_data_ptr<scalar_t>(),
                               out.mutable_data_ptr<int64_t>(), cdf);
    });
  });
  return out;
}

}  // namespace rng
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def("uniforms(Tensor seeds, Tensor counter, int n, ScalarType dtype) -> Tensor");
  m.def("inverse_cdf(Tensor probs, Tensor u) -> Tensor");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) {
  m.impl("uniforms", &eagle::rng::uniforms_cpu);
  m.impl("inverse_cdf", &eagle::rng::inverse_cdf_cpu);
}
