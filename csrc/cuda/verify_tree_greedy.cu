// verify_tree_greedy CUDA kernel: one block per sequence, one thread per tree slot (strided when the
// tree is larger than the block).
//
// Instead of one thread walking child lists (sgl-kernel), the block
//   1. inverts the links in shared memory: link[c] = p when c is p's first child, n + s when c is the
//      next sibling of s;
//   2. resolves sibling links to parents by pointer jumping (ceil(log2 n) rounds), counting the hops,
//      which gives each slot's rank among its siblings;
//   3. marks, in parallel, every slot whose token equals the target at its parent;
//   4. walks the accepted path: per level one block-wide atomicMin over (rank, slot) of the matching
//      children of the current node.
// The cost per sequence is O(log n + depth) block steps, so it stays flat as the batch grows.
// Malformed trees (checked on the host in debug mode) can give a wrong path, never an out-of-bounds
// access or an unbounded loop: indices are range-checked and every loop has a fixed bound.
#include <climits>

#include "verify_tree_greedy.cuh"

namespace {

template <typename cand_t, typename tree_t, typename target_t>
__global__ void verify_tree_greedy_kernel(const cand_t* __restrict__ candidates, const tree_t* __restrict__ rows,
                                          const tree_t* __restrict__ first_child,
                                          const tree_t* __restrict__ next_sibling,
                                          const target_t* __restrict__ target, int32_t* __restrict__ predicts,
                                          int32_t* __restrict__ accept_index, int32_t* __restrict__ accept_num,
                                          int n, int num_steps, int jump_rounds) {
  extern __shared__ int smem[];
  int* link = smem;
  int* link_next = smem + n;
  int* rank = smem + 2 * n;
  int* rank_next = smem + 3 * n;
  __shared__ int best_order;

  const int64_t b = blockIdx.x;
  const int64_t base = b * n;
  const int64_t row_lo = base, row_hi = base + n;

  for (int s = threadIdx.x; s < n; s += blockDim.x) link[s] = -1;
  __syncthreads();
  for (int s = threadIdx.x; s < n; s += blockDim.x) {
    const int64_t child = first_child[base + s];
    if (child >= 0 && child < n) link[child] = s;
    const int64_t right = next_sibling[base + s];
    if (right >= 0 && right < n) link[right] = n + s;
  }
  __syncthreads();
  for (int s = threadIdx.x; s < n; s += blockDim.x) rank[s] = link[s] >= n ? 1 : 0;
  __syncthreads();

  for (int round = 0; round < jump_rounds; ++round) {
    for (int s = threadIdx.x; s < n; s += blockDim.x) {
      const int l = link[s];
      if (l >= n) {
        const int left = l - n;
        link_next[s] = link[left];
        rank_next[s] = rank[s] + rank[left];
      } else {
        link_next[s] = l;
        rank_next[s] = rank[s];
      }
    }
    __syncthreads();
    int* t = link;
    link = link_next;
    link_next = t;
    t = rank;
    rank = rank_next;
    rank_next = t;
  }

  // order[s]: (rank, slot) of a slot whose token matches the target at its parent, else INT_MAX.
  int* order = rank_next;
  for (int s = threadIdx.x; s < n; s += blockDim.x) {
    const int parent = link[s];
    int key = INT_MAX;
    if (parent >= 0 && parent < n) {
      const int64_t parent_row = rows[base + parent];
      if (parent_row >= row_lo && parent_row < row_hi &&
          static_cast<int64_t>(candidates[base + s]) == static_cast<int64_t>(target[parent_row])) {
        key = rank[s] * n + s;
      }
    }
    order[s] = key;
  }
  __syncthreads();

  int64_t cur_row = rows[base];
  if (cur_row < row_lo || cur_row >= row_hi) cur_row = row_lo;
  int cur = 0;
  int count = 0;
  for (int step = 1; step < num_steps; ++step) {
    if (threadIdx.x == 0) best_order = INT_MAX;
    __syncthreads();
    for (int s = threadIdx.x; s < n; s += blockDim.x) {
      if (link[s] == cur && order[s] != INT_MAX) atomicMin(&best_order, order[s]);
    }
    __syncthreads();
    const int best = best_order;
    __syncthreads();  // everyone has read best_order before thread 0 resets it
    if (best == INT_MAX) break;
    const int child = best % n;
    const int64_t child_row = rows[base + child];
    if (child_row < row_lo || child_row >= row_hi) break;
    if (threadIdx.x == 0) {
      predicts[cur_row] = static_cast<int32_t>(candidates[base + child]);
      accept_index[b * num_steps + step] = static_cast<int32_t>(child_row);
    }
    cur = child;
    cur_row = child_row;
    ++count;
  }
  if (threadIdx.x == 0) {
    accept_index[b * num_steps] = static_cast<int32_t>(rows[base] >= row_lo && rows[base] < row_hi ? rows[base] : row_lo);
    for (int step = count + 1; step < num_steps; ++step) accept_index[b * num_steps + step] = -1;
    predicts[cur_row] = static_cast<int32_t>(target[cur_row]);
    accept_num[b] = count;
  }
}

template <typename cand_t, typename tree_t, typename target_t>
cudaError_t launch(const void* candidates, const void* rows, const void* first_child, const void* next_sibling,
                   const void* target, int32_t* predicts, int32_t* accept_index, int32_t* accept_num, int64_t B,
                   int64_t n, int64_t num_steps, cudaStream_t stream) {
  int threads = 32;
  while (threads < n && threads < 1024) threads *= 2;
  int jump_rounds = 0;
  while ((int64_t{1} << jump_rounds) < n) ++jump_rounds;
  const size_t smem = 4 * static_cast<size_t>(n) * sizeof(int);
  verify_tree_greedy_kernel<cand_t, tree_t, target_t><<<static_cast<unsigned>(B), threads, smem, stream>>>(
      static_cast<const cand_t*>(candidates), static_cast<const tree_t*>(rows),
      static_cast<const tree_t*>(first_child), static_cast<const tree_t*>(next_sibling),
      static_cast<const target_t*>(target), predicts, accept_index, accept_num, static_cast<int>(n),
      static_cast<int>(num_steps), jump_rounds);
  return cudaGetLastError();
}

template <typename cand_t, typename tree_t>
cudaError_t launch_target(int target_is_int64, const void* candidates, const void* rows, const void* first_child,
                          const void* next_sibling, const void* target, int32_t* predicts, int32_t* accept_index,
                          int32_t* accept_num, int64_t B, int64_t n, int64_t num_steps, cudaStream_t stream) {
  if (target_is_int64) {
    return launch<cand_t, tree_t, int64_t>(candidates, rows, first_child, next_sibling, target, predicts,
                                           accept_index, accept_num, B, n, num_steps, stream);
  }
  return launch<cand_t, tree_t, int32_t>(candidates, rows, first_child, next_sibling, target, predicts,
                                         accept_index, accept_num, B, n, num_steps, stream);
}

template <typename cand_t>
cudaError_t launch_tree(int tree_is_int64, int target_is_int64, const void* candidates, const void* rows,
                        const void* first_child, const void* next_sibling, const void* target, int32_t* predicts,
                        int32_t* accept_index, int32_t* accept_num, int64_t B, int64_t n, int64_t num_steps,
                        cudaStream_t stream) {
  if (tree_is_int64) {
    return launch_target<cand_t, int64_t>(target_is_int64, candidates, rows, first_child, next_sibling, target,
                                          predicts, accept_index, accept_num, B, n, num_steps, stream);
  }
  return launch_target<cand_t, int32_t>(target_is_int64, candidates, rows, first_child, next_sibling, target,
                                        predicts, accept_index, accept_num, B, n, num_steps, stream);
}

}  // namespace

extern "C" int eagle_verify_tree_greedy_cuda(const void* candidates, int candidates_is_int64, const void* retrive_index,
                                             const void* retrive_next_token, const void* retrive_next_sibling,
                                             int tree_is_int64, const void* target_predict, int target_is_int64,
                                             int32_t* predicts, int32_t* accept_index, int32_t* accept_num, int64_t B,
                                             int64_t n, int64_t num_steps, cudaStream_t stream) {
  if (n < 1 || n > EAGLE_VERIFY_TREE_GREEDY_MAX_N || num_steps < 1) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  if (candidates_is_int64) {
    return launch_tree<int64_t>(tree_is_int64, target_is_int64, candidates, retrive_index, retrive_next_token,
                                retrive_next_sibling, target_predict, predicts, accept_index, accept_num, B, n,
                                num_steps, stream);
  }
  return launch_tree<int32_t>(tree_is_int64, target_is_int64, candidates, retrive_index, retrive_next_token,
                              retrive_next_sibling, target_predict, predicts, accept_index, accept_num, B, n,
                              num_steps, stream);
}
