#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace eagle {
namespace rng {

// eagle/rng.py in C++ (csrc/cpu/rng.cpp): the same integer arithmetic, so the same bits.

// splitmix64's finaliser (wrapping 64-bit arithmetic; eagle.rng.splitmix64 on int64 tensors).
inline uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// eagle.rng.uniforms: [B, n] uniforms in [0, 1) of draw counter[b] of row b's stream, float32 (top 24
// bits of each hash) or float64 (top 53). seeds int64 [B]; counter int32/int64 [B]; CPU.
at::Tensor uniforms_cpu(const at::Tensor& seeds, const at::Tensor& counter, int64_t n, at::ScalarType dtype);

// eagle.rng.inverse_cdf: one token per row of probs [R, V] (any float dtype, unnormalised is fine)
// with uniforms u [R]: the first index whose float64 running sum exceeds u * total, clamped to V - 1.
// int64 [R].
at::Tensor inverse_cdf_cpu(const at::Tensor& probs, const at::Tensor& u);

}  // namespace rng
}  // namespace eagle
