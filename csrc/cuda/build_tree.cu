// build_tree CUDA kernel: one block per sequence, one thread per tree slot.
//
// 1. The block loads its selected_index row into shared memory and checks it (in range, strictly
//    increasing) with one __syncthreads_or.
// 2. Thread i finds the parent of slot i by binary search of parent_list[b, v / topk] in the shared
//    row (O(log n), not SGLang's O(n) scan per hop) and publishes it in shared memory.
// 3. Thread i climbs the shared parent array to the root, at most `depth` hops, which gives its depth
//    and validity; first children come from a shared atomicMin, next siblings from a scan of the
//    shared parent array (children in ascending slot order, like SGLang).
// 4. Thread i writes its own mask row, position and links.
// A slot whose ancestry is broken (parent not selected, e.g. NaN scores; parent not in an earlier row;
// deeper than `depth`) or whose sequence failed step 1 is flagged: positions = -1, no links, mask row
// = root and itself. Nothing is read or written out of bounds and every loop is bounded.
#include <limits.h>

#include "build_tree.cuh"

namespace {

enum : int { kFullMask = 0, kQlenBool = 1, kQlenBitsU8 = 2, kQlenBitsI32 = 3 };

struct BuildTreeArgs {
  const void* parent_list;
  const void* selected_index;
  const void* seq_lens;
  void* tree_mask;
  int64_t* positions;
  void* retrive_index;
  void* next_token;
  void* next_sibling;
  int64_t parent_width, mask_numel, topk, depth, n, num_candidates;
  int parent64, sel64, seq64, mode;
};

__device__ __forceinline__ int64_t load_index(const void* p, int is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

__device__ __forceinline__ void store_index(void* p, int is64, int64_t i, int64_t v) {
  if (is64) {
    static_cast<int64_t*>(p)[i] = v;
  } else {
    static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v);
  }
}

// First index in the sorted row[0:count] whose value is >= target.
__device__ __forceinline__ int lower_bound(const int64_t* row, int count, int64_t target) {
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (row[mid] < target) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__device__ void write_mask_row(const BuildTreeArgs& a, int i, bool valid, const int* s_parent, int64_t row_start,
                               int64_t row_stride, int64_t col_start, int64_t flat) {
  const int n = static_cast<int>(a.n);
  if (a.mode == kFullMask || a.mode == kQlenBool) {
    uint8_t* row = static_cast<uint8_t*>(a.tree_mask) + row_start + i * row_stride + col_start;
    for (int j = 0; j < n; ++j) row[j] = 0;
    row[0] = 1;
    row[i] = 1;
    for (int at = i, hop = 0; valid && at != 0 && hop < a.depth; ++hop) {
      at = s_parent[at];
      row[at] = 1;
    }
  } else if (a.mode == kQlenBitsU8) {
    uint32_t bits = 1u | (1u << i);
    for (int at = i, hop = 0; valid && at != 0 && hop < a.depth; ++hop) {
      at = s_parent[at];
      bits |= 1u << at;
    }
    const int nbytes = n <= 8 ? 1 : (n <= 16 ? 2 : 4);
    uint8_t* out = static_cast<uint8_t*>(a.tree_mask) + flat * nbytes;
    for (int k = 0; k < nbytes; ++k) out[k] = static_cast<uint8_t>(bits >> (8 * k));
  } else {
    const int words = (n + 31) / 32;
    uint32_t* row = static_cast<uint32_t*>(a.tree_mask) + flat * words;
    for (int w = 0; w < words; ++w) row[w] = 0u;
    row[0] |= 1u;
    row[i / 32] |= 1u << (i % 32);
    for (int at = i, hop = 0; valid && at != 0 && hop < a.depth; ++hop) {
      at = s_parent[at];
      row[at / 32] |= 1u << (at % 32);
    }
  }
}

__global__ void build_tree_kernel(BuildTreeArgs a) {
  extern __shared__ int64_t s_sel[];  // [n]: the selected_index row, then int parent/first/valid [n] each
  int* s_parent = reinterpret_cast<int*>(s_sel + a.n);
  int* s_first = s_parent + a.n;
  int* s_valid = s_first + a.n;
  __shared__ unsigned long long s_earlier;  // sum of seq_lens of earlier sequences (full mask)

  const int64_t b = blockIdx.x;
  const int i = threadIdx.x;
  const int n = static_cast<int>(a.n), count = n - 1;
  const int64_t seq_len = load_index(a.seq_lens, a.seq64, b);
  if (i < count) s_sel[i] = load_index(a.selected_index, a.sel64, b * count + i);
  if (i == 0) s_earlier = 0ull;
  __syncthreads();

  if (a.mode == kFullMask) {
    long long part = 0;
    for (int64_t c = i; c < b; c += blockDim.x) part += load_index(a.seq_lens, a.seq64, c);
    atomicAdd(&s_earlier, static_cast<unsigned long long>(part));
  }
  int bad = 0;
  if (i < count) {
    const int64_t v = s_sel[i];
    bad = v < 0 || v >= a.num_candidates || (i + 1 < count && s_sel[i + 1] <= v);
  }
  if (i == 0 && seq_len < 0) bad = 1;
  const int seq_bad = __syncthreads_or(bad);  // also orders the s_earlier atomics before the read

  int64_t row_start = b * a.n * a.n, row_stride = a.n, col_start = 0;
  bool fits = true;
  if (a.mode == kFullMask) {
    row_start = static_cast<long long>(s_earlier) * a.n + b * a.n * a.n;
    row_stride = seq_len + a.n;
    col_start = seq_len;
    // Bound every term first so that garbage lengths cannot overflow into an in-range offset.
    fits = seq_len >= 0 && seq_len <= a.mask_numel && s_earlier <= static_cast<unsigned long long>(a.mask_numel) &&
           row_start + a.n * row_stride <= a.mask_numel;
  }
  bool valid = !seq_bad && fits && i < n;

  int parent = -1;
  if (valid && i > 0) {
    const int64_t v = s_sel[i - 1], row = v / a.topk;
    if (row == 0) {
      parent = 0;
    } else {
      const int64_t u = load_index(a.parent_list, a.parent64, b * a.parent_width + row);
      const int pos = lower_bound(s_sel, count, u);
      if (pos < count && s_sel[pos] == u && u < row * a.topk) {
        parent = pos + 1;
      } else {
        valid = false;
      }
    }
  }
  if (i < n) s_parent[i] = valid ? parent : -1;
  __syncthreads();

  int64_t level = 0;
  if (valid && i > 0) {
    int at = i;
    for (int64_t hop = 0; hop < a.depth && at != 0; ++hop) {
      const int up = s_parent[at];
      if (up < 0) break;  // an ancestor without a parent: broken chain
      at = up;
      ++level;
    }
    valid = at == 0;
  }
  if (i < n) {
    s_valid[i] = valid;
    s_first[i] = INT_MAX;
  }
  __syncthreads();
  if (valid && i > 0) atomicMin(&s_first[s_parent[i]], i);
  __syncthreads();
  if (i >= n) return;

  const int64_t flat = b * a.n + i;
  a.positions[flat] = valid ? seq_len + level : -1;
  store_index(a.retrive_index, a.sel64, flat, flat);
  store_index(a.next_token, a.sel64, flat, s_first[i] == INT_MAX ? -1 : s_first[i]);
  int sibling = -1;
  if (valid && i > 0) {
    for (int j = i + 1; j < n; ++j) {
      if (s_valid[j] && s_parent[j] == s_parent[i]) {
        sibling = j;
        break;
      }
    }
  }
  store_index(a.next_sibling, a.sel64, flat, sibling);
  if (fits) write_mask_row(a, i, valid, s_parent, row_start, row_stride, col_start, flat);
}

}  // namespace

extern "C" int eagle_build_tree_cuda(const void* parent_list, int parent_is_int64, int64_t parent_width,
                                     const void* selected_index, int selected_is_int64, const void* seq_lens,
                                     int seq_lens_is_int64, void* tree_mask, int64_t mask_numel, int mask_mode,
                                     int64_t* positions, void* retrive_index, void* retrive_next_token,
                                     void* retrive_next_sibling, int64_t batch, int64_t topk, int64_t depth,
                                     int64_t num_draft_tokens, cudaStream_t stream) {
  const int64_t n = num_draft_tokens;
  if (n < 1 || n > 1024 || topk < 1 || depth < 1 || mask_mode < 0 || mask_mode > 3) return cudaErrorInvalidValue;
  if (mask_mode == kQlenBitsU8 && n > 32) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  BuildTreeArgs a;
  a.parent_list = parent_list;
  a.selected_index = selected_index;
  a.seq_lens = seq_lens;
  a.tree_mask = tree_mask;
  a.positions = positions;
  a.retrive_index = retrive_index;
  a.next_token = retrive_next_token;
  a.next_sibling = retrive_next_sibling;
  a.parent_width = parent_width;
  a.mask_numel = mask_numel;
  a.topk = topk;
  a.depth = depth;
  a.n = n;
  a.num_candidates = topk + (depth - 1) * topk * topk;
  a.parent64 = parent_is_int64;
  a.sel64 = selected_is_int64;
  a.seq64 = seq_lens_is_int64;
  a.mode = mask_mode;
  const int threads = static_cast<int>((n + 31) / 32 * 32);
  const size_t shared = n * sizeof(int64_t) + 3 * n * sizeof(int);
  build_tree_kernel<<<static_cast<unsigned int>(batch), threads, shared, stream>>>(a);
  return cudaGetLastError();
}
