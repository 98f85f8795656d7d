// Scalar <-> float conversions for the CPU loops that must round exactly like ATen, written so that
// the compiler vectorises them (c10's BFloat16 conversions go through a NaN branch and a function
// call per element: ~5 ns each, more than the arithmetic they wrap).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

// The extension is built for baseline x86-64 (SSE2 vectors). A hot elementwise loop marked with this
// gets an AVX-512 clone too, picked once at load time by the dynamic loader (GCC function
// multiversioning, an ifunc); each clone keeps its function's floating-point options (fp-contract).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define EAGLE_AVX512_CLONE __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define EAGLE_AVX512_CLONE
#endif

namespace eagle {
namespace convert {

// Exact: a bfloat16 is the top half of a float32.
inline float bf16_to_float(c10::BFloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, NaN to a quiet NaN: c10::BFloat16(float)'s rule, and ATen's vectorised
// conversion's for every non-NaN value (it writes NaN as 0xffff, this as 0x7fc0; both are NaN).
inline c10::BFloat16 float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint16_t out = f != f ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
  return c10::BFloat16(out, c10::BFloat16::from_bits());
}

// opmath load/store: float for bfloat16/half, the type itself for float/double.
template <typename T>
struct Math {
  static T load(T x) { return x; }
  static T store(T x) { return x; }
};

template <>
struct Math<c10::BFloat16> {
  static float load(c10::BFloat16 x) { return bf16_to_float(x); }
  static c10::BFloat16 store(float x) { return float_to_bf16(x); }
};

template <>
struct Math<c10::Half> {
  static float load(c10::Half x) { return static_cast<float>(x); }
  static c10::Half store(float x) { return static_cast<c10::Half>(x); }
};

}  // namespace convert
}  // namespace eagle
