// CUDA binding of compact_kv_cache: torch-side checks, then the C-ABI launcher on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cpu/compact_kv_cache.h"
#include "compact_kv_cache.cuh"

namespace eagle {
namespace {

at::Tensor compact_kv_cache_cuda(at::Tensor kv_cache, const at::Tensor& cache_seqlens,
                                 const at::Tensor& accept_index, const at::Tensor& accept_token_num,
                                 int64_t num_draft_tokens) {
  check_compact_kv_cache_args(kv_cache, cache_seqlens, accept_index, accept_token_num, num_draft_tokens);
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  auto seqlens = cache_seqlens.contiguous();
  auto index = accept_index.contiguous();
  auto num = accept_token_num.to(at::kInt).contiguous();
  const int err = eagle_compact_kv_cache_cuda(
      kv_cache.data_ptr(), kv_cache.size(0), kv_cache.size(2), kv_cache.size(3), kv_cache.size(4), kv_cache.size(5),
      kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
      kv_cache.element_size(), seqlens.data_ptr<int32_t>(), index.data_ptr(),
      index.scalar_type() == at::kLong, num.data_ptr<int32_t>(), index.size(1), num_draft_tokens,
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "compact_kv_cache CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return cache_seqlens + num + 1;
}

}  // namespace
}  // namespace eagle

TORCH_LIBRARY_IMPL(eagle_C, CUDA, m) { m.impl("compact_kv_cache", &eagle::compact_kv_cache_cuda); }
