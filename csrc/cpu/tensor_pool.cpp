// A small cache of CPU memory blocks for the tensors the decoding loop's ops make and drop every call.
//
// Why: ATen's CPU allocator takes every tensor from posix_memalign, which glibc serves from its bins
// rather than its per-thread cache. A bfloat16 EAGLE round of the bundled pair made ~240 such calls at
// ~1300 cycles each (3.4% of the round; 1.8% of a plain step at ~130 calls), plus the frees.
//
// Blocks come in power-of-two sizes from 256 bytes to 16 MB (larger requests go to ATen); each size
// keeps a mutex-guarded stack of free blocks, at most kMaxFreePerClass of them and kMaxCachedBytes in
// all, so the cache never holds more than a few tens of MB however the process allocates. A block
// freed on another thread goes back to the same stack.
#include "tensor_pool.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace eagle {
namespace pool {
namespace {

constexpr int kMinShift = 8, kMaxShift = 24;  // 256 B .. 16 MB
constexpr int kClasses = kMaxShift - kMinShift + 1;
constexpr size_t kHeader = 64;  // the block's class, kept before the 64-byte-aligned data
constexpr size_t kMaxFreePerClass = 32;
constexpr int64_t kMaxCachedBytes = int64_t{64} << 20;

struct Class {
  std::mutex mutex;
  std::vector<void*> free;  // block bases
};

std::array<Class, kClasses>& classes() {
  static auto* table = new std::array<Class, kClasses>();  // never destroyed: blocks may die at exit
  return *table;
}

std::atomic<int64_t> g_cached_bytes{0}, g_cached_blocks{0};

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag([] {
    const char* v = std::getenv("EAGLE_CPU_TENSOR_POOL");
    return v == nullptr || std::string(v) != "0";
  }());
  return flag;
}

int class_of(int64_t bytes) {
  int shift = kMinShift;
  while ((int64_t{1} << shift) < bytes) ++shift;
  return shift - kMinShift;
}

int64_t class_bytes(int c) { return int64_t{1} << (c + kMinShift); }

void* new_block(int c) {
  void* base = std::aligned_alloc(64, kHeader + class_bytes(c));
  TORCH_CHECK(base != nullptr, "eagle tensor pool: out of memory allocating ", class_bytes(c), " bytes");
  *static_cast<int*>(base) = c;
  return base;
}

void* data_of(void* base) { return static_cast<char*>(base) + kHeader; }
void* base_of(void* data) { return static_cast<char*>(data) - kHeader; }

void give_back(void* base) {
  const int c = *static_cast<int*>(base);
  if (c < 0 || !enabled()) {  // an uncached block, or the cache was switched off meanwhile
    std::free(base);
    return;
  }
  Class& cls = classes()[c];
  {
    std::lock_guard<std::mutex> lock(cls.mutex);
    if (cls.free.size() < kMaxFreePerClass && g_cached_bytes.load() + class_bytes(c) <= kMaxCachedBytes) {
      cls.free.push_back(base);
      g_cached_bytes += class_bytes(c);
      g_cached_blocks += 1;
      return;
    }
  }
  std::free(base);
}

}  // namespace

void* acquire(int64_t bytes) {
  if (!enabled() || bytes > class_bytes(kClasses - 1)) {  // a plain heap block with its header: release frees it
    void* base = std::aligned_alloc(64, kHeader + static_cast<size_t>((std::max<int64_t>(bytes, 1) + 63) / 64 * 64));
    TORCH_CHECK(base != nullptr, "eagle tensor pool: out of memory allocating ", bytes, " bytes");
    *static_cast<int*>(base) = -1;
    return data_of(base);
  }
  const int c = class_of(bytes < 1 ? 1 : bytes);
  Class& cls = classes()[c];
  {
    std::lock_guard<std::mutex> lock(cls.mutex);
    if (!cls.free.empty()) {
      void* base = cls.free.back();
      cls.free.pop_back();
      g_cached_bytes -= class_bytes(c);
      g_cached_blocks -= 1;
      return data_of(base);
    }
  }
  return data_of(new_block(c));
}

void release(void* data) {
  if (data != nullptr) give_back(base_of(data));
}

at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  if (!enabled()) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  int64_t numel = 1;
  for (int64_t s : sizes) {
    TORCH_CHECK(s >= 0, "eagle tensor pool: negative size in ", sizes);
    numel *= s;
  }
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes > (int64_t{1} << kMaxShift)) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  void* data = acquire(bytes);
  c10::DataPtr ptr(data, base_of(data), &give_back, c10::Device(c10::DeviceType::CPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(ptr), /*allocator=*/nullptr,
                       /*resizable=*/false);
  // As at::empty builds its result (at::detail::empty_generic), with this storage.
  at::Tensor tensor = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU), c10::scalarTypeToTypeMeta(dtype));
  tensor.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return tensor;
}

int64_t cached_blocks() { return g_cached_blocks.load(); }
int64_t cached_bytes() { return g_cached_bytes.load(); }

bool enabled() { return enabled_flag().load(std::memory_order_relaxed); }

bool set_enabled(bool on) {
  const bool before = enabled_flag().exchange(on);
  if (!on) {  // drop what is cached
    for (Class& cls : classes()) {
      std::lock_guard<std::mutex> lock(cls.mutex);
      for (void* base : cls.free) {
        g_cached_bytes -= class_bytes(*static_cast<int*>(base));
        g_cached_blocks -= 1;
        std::free(base);
      }
      cls.free.clear();
    }
  }
  return before;
}

}  // namespace pool
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def("tensor_pool_set_enabled(bool enabled) -> bool", [](bool on) { return eagle::pool::set_enabled(on); });
  m.def("tensor_pool_cached_bytes() -> int", [] { return eagle::pool::cached_bytes(); });
}
