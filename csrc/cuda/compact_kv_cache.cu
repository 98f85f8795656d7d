// compact_kv_cache CUDA kernel: one block per (layer, k/v, sequence, head); each thread owns a fixed
// column slice of the head dimension and copies it for every accepted slot j in order. Because a
// thread's reads and writes of one row slice happen in program order, and accepted slots satisfy
// slot_j >= j (strictly increasing), no synchronisation is needed between steps.
#include "compact_kv_cache.cuh"

namespace {

template <typename unit_t, typename idx_t>
__global__ void compact_kv_cache_kernel(unit_t* __restrict__ kv, int64_t B, int64_t H, int64_t S, int64_t D,
                                        int64_t s_layer, int64_t s_kv, int64_t s_b, int64_t s_h,
                                        int64_t s_pos, const int32_t* __restrict__ seqlens,
                                        const idx_t* __restrict__ accept_index,
                                        const int32_t* __restrict__ accept_num, int64_t num_steps,
                                        int64_t n) {
  const int64_t r = blockIdx.x;
  const int64_t h = r % H, b = (r / H) % B, which = (r / (H * B)) % 2, layer = r / (H * B * 2);
  unit_t* head = kv + layer * s_layer + which * s_kv + b * s_b + h * s_h;
  const int64_t start = seqlens[b];
  // Values are checked only in debug mode (a host sync): a malformed count or slot must not read
  // past accept_index's row or the sequence's tree, so the loop stops at the row's last column and
  // an out-of-tree slot is skipped (as the Triton kernel does); nor may a length whose tree passes S
  // (or a negative one) move rows outside the sequence's cache, into the next head's or past the tensor.
  // (and a path never holds more than n slots: accept_index may be wider than the tree)
  const int64_t last = min(min(static_cast<int64_t>(accept_num[b]), num_steps - 1), n - 1);
  for (int64_t j = 0; j <= last; ++j) {  // j = 0 too: the root's row need not be the block's first
    const int64_t slot = static_cast<int64_t>(accept_index[b * num_steps + j]) - b * n;
    if (slot == j || slot < 0 || slot >= n || start < 0 || start + max(slot, j) >= S) continue;
    const unit_t* src = head + (start + slot) * s_pos;
    unit_t* dst = head + (start + j) * s_pos;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
  }
}

template <typename unit_t>
cudaError_t launch_unit(void* kv, int64_t L, int64_t B, int64_t H, int64_t S, int64_t D, int64_t s_layer, int64_t s_kv,
                        int64_t s_b, int64_t s_h, int64_t s_pos, const int32_t* seqlens,
                        const void* accept_index, int index_is_int64, const int32_t* accept_num,
                        int64_t num_steps, int64_t n, cudaStream_t stream) {
  const int64_t blocks = L * 2 * B * H;
  if (blocks == 0) return cudaSuccess;
  const int threads = D >= 128 ? 128 : (D >= 64 ? 64 : 32);
  if (index_is_int64) {
    compact_kv_cache_kernel<unit_t, int64_t><<<blocks, threads, 0, stream>>>(
        static_cast<unit_t*>(kv), B, H, S, D, s_layer, s_kv, s_b, s_h, s_pos, seqlens,
        static_cast<const int64_t*>(accept_index), accept_num, num_steps, n);
  } else {
    compact_kv_cache_kernel<unit_t, int32_t><<<blocks, threads, 0, stream>>>(
        static_cast<unit_t*>(kv), B, H, S, D, s_layer, s_kv, s_b, s_h, s_pos, seqlens,
        static_cast<const int32_t*>(accept_index), accept_num, num_steps, n);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" int eagle_compact_kv_cache_cuda(void* kv, int64_t L, int64_t B, int64_t H, int64_t S, int64_t D,
                                           int64_t s_layer, int64_t s_kv, int64_t s_b, int64_t s_h,
                                           int64_t s_pos, int64_t element_size, const int32_t* seqlens,
                                           const void* accept_index, int index_is_int64,
                                           const int32_t* accept_num, int64_t num_steps,
                                           int64_t num_draft_tokens, cudaStream_t stream) {
  switch (element_size) {  // a bit copy: fp8 / int8 caches are 1-byte units
    case 1:
      return launch_unit<uint8_t>(kv, L, B, H, S, D, s_layer, s_kv, s_b, s_h, s_pos, seqlens, accept_index,
                                  index_is_int64, accept_num, num_steps, num_draft_tokens, stream);
    case 2:
      return launch_unit<uint16_t>(kv, L, B, H, S, D, s_layer, s_kv, s_b, s_h, s_pos, seqlens, accept_index,
                                   index_is_int64, accept_num, num_steps, num_draft_tokens, stream);
    case 4:
      return launch_unit<uint32_t>(kv, L, B, H, S, D, s_layer, s_kv, s_b, s_h, s_pos, seqlens, accept_index,
                                   index_is_int64, accept_num, num_steps, num_draft_tokens, stream);
    case 8:
      return launch_unit<uint64_t>(kv, L, B, H, S, D, s_layer, s_kv, s_b, s_h, s_pos, seqlens, accept_index,
                                   index_is_int64, accept_num, num_steps, num_draft_tokens, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
