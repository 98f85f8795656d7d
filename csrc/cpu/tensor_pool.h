// Reused memory for the CPU ops' short-lived tensors (see tensor_pool.cpp).
#pragma once

#include <ATen/ATen.h>

namespace eagle {
namespace pool {

// An uninitialised contiguous CPU tensor, as at::empty(sizes, dtype), whose memory comes from (and
// goes back to) a process-wide cache of 64-byte-aligned blocks. Its storage is not resizable.
at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype);

// Raw 64-byte-aligned scratch of at least `bytes`, from the same cache; give it back with release.
void* acquire(int64_t bytes);
void release(void* data);

// A block handed out and returned at once, as a scoped scratch buffer.
class Scratch {
 public:
  explicit Scratch(int64_t bytes) : data_(acquire(bytes)) {}
  ~Scratch() { release(data_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  char* data() const { return static_cast<char*>(data_); }

 private:
  void* data_;
};

// Blocks cached now and their bytes.
int64_t cached_blocks();
int64_t cached_bytes();

// Whether empty/acquire use the cache (default: yes, unless EAGLE_CPU_TENSOR_POOL=0 at the first call);
// off, they take ATen's allocator / the heap and the cache is emptied. Returns the previous setting.
bool set_enabled(bool enabled);
bool enabled();

}  // namespace pool
}  // namespace eagle
