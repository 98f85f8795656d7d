// The values of 8-bit KV cache bytes (int8, float8_e4m3fn, float8_e5m2), shared by dequantize_kv and
// tree_attention's quantized caches (through row_converter), so that both give the same values bit
// for bit.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "half_convert.h"

namespace eagle {
namespace kvq {

// The 8-bit formats, as eagle_kernels._kv_quant._KINDS numbers them.
enum Kind : int64_t { kInt8 = 0, kE4M3 = 1, kE5M2 = 2 };

inline float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// Selects written as masks: branch-free, so that the loops calling this vectorise.
inline uint32_t pick(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

// The value of one byte of an 8-bit cache, exactly (every such value is a float32).
template <int64_t K>
inline float decode(uint8_t byte) {
  if constexpr (K == kInt8) {
    return static_cast<float>(static_cast<int8_t>(byte));
  } else {
    const uint32_t sign = static_cast<uint32_t>(byte & 0x80u) << 24;
    const uint32_t mag = byte & 0x7Fu;  // exponent and mantissa
    // e4m3: 4 exponent bits (bias 7), 3 mantissa bits; e5m2: 5 (bias 15), 2. A normal value moves its
    // exponent and mantissa up to float32's places and rebiases (127 - 7 = 120, 127 - 15 = 112); a
    // subnormal one (exponent 0) is its mantissa times 2**-9 / 2**-16.
    constexpr int shift = K == kE4M3 ? 20 : 21;
    constexpr uint32_t rebias = (K == kE4M3 ? 120u : 112u) << 23;
    constexpr uint32_t first_normal = K == kE4M3 ? 8u : 4u;
    constexpr float subnormal_unit = K == kE4M3 ? 0x1p-9f : 0x1p-16f;
    uint32_t bits = pick(mag < first_normal, to_bits(static_cast<float>(mag) * subnormal_unit), (mag << shift) + rebias);
    if constexpr (K == kE4M3) {
      bits = pick(mag == 0x7Fu, 0x7FC00000u, bits);  // e4m3fn: S.1111.111 is NaN; no infinity
    } else {
      bits = pick(mag >= 0x7Cu, pick(mag == 0x7Cu, 0x7F800000u, 0x7FC00000u), bits);  // exponent 31: inf, NaN
    }
    return from_bits(bits | sign);
  }
}

// value(byte) * scale rounded once to T: float32 product (float64 for a float64 T).
template <int64_t K, typename T>
inline T scaled(uint8_t byte, double scale) {
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<double>(decode<K>(byte)) * scale;
  } else {
    return convert::Math<T>::store(decode<K>(byte) * static_cast<float>(scale));
  }
}

// Converts one row of D bytes (`s_d` apart) of an 8-bit cache of `kind` into `dtype` values times
// `scale` (scaled<K, T>, vectorised); dequantize_kv.cpp defines it.
using RowConvert = void (*)(const uint8_t* src, int64_t s_d, double scale, void* dst, int64_t D);
RowConvert row_converter(int64_t kind, at::ScalarType dtype);

}  // namespace kvq
}  // namespace eagle
