// The grain of the CPU linears' parallel loops (see linear_grain.h).
//
// With 2 threads on the 2-core development machine, the bundled pair at batch 1, against the
// multiply-adds bound alone (which never split a one-row linear of this model), in one process
// (OMP_NUM_THREADS=2 python bench/bench_cpu_switches.py --switch linear_grain --threads 2 [--dtype
// float32]; bench/results/cpu_switch_linear_grain_tiny-code_<dtype>_2threads.json): plain decoding
// 1.38x (bfloat16) / 1.44x (float32) the tokens/s, EAGLE 1.04-1.07x / 1.01-1.06x (its verify forward
// of 12-32 rows was already split by multiply-adds). One thread: no change.
#include "linear_grain.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

namespace eagle {
namespace {

constexpr int64_t kDefaultGrainBytes = int64_t{64} << 10;

std::atomic<int64_t>& grain_bytes() {
  static std::atomic<int64_t> bytes([] {
    const char* v = std::getenv("EAGLE_CPU_LINEAR_GRAIN_BYTES");
    return v == nullptr ? kDefaultGrainBytes : std::max<int64_t>(0, std::atoll(v));
  }());
  return bytes;
}

// Sets the byte bound (0: multiply-adds only); returns the previous one.
int64_t set_grain_bytes(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "linear_grain_set_bytes: bytes must be >= 0, got ", bytes);
  return grain_bytes().exchange(bytes);
}

}  // namespace

int64_t linear_grain(int64_t macs_per_block, int64_t weight_bytes_per_block) {
  const int64_t by_macs = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, macs_per_block));
  const int64_t bytes = grain_bytes().load(std::memory_order_relaxed);
  if (bytes == 0) return by_macs;
  return std::min(by_macs, std::max<int64_t>(1, bytes / std::max<int64_t>(1, weight_bytes_per_block)));
}

}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def("linear_grain_set_bytes(int bytes) -> int", &eagle::set_grain_bytes);
}
