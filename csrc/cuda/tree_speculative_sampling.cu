// tree_speculative_sampling CUDA kernel: one block of kThreads threads per sequence.
//
//  1. The block loads the sequence's tree into shared memory and validates it in parallel (links in
//     range, children after their parent, siblings in any order, in-degree <= 1, retrive_index a permutation of the sequence's rows,
//     tokens in the vocabulary, uniforms in [0, 1)).
//  2. The walk. Deterministic drafts: thread 0 walks alone (it only reads one probability per tried
//     child). Sampled drafts: thread 0 decides, and every rejection triggers a block-wide reduction
//     over the vocabulary for the residual mass W (all threads run the same loop; the state lives in
//     shared memory and every step ends with a barrier).
//  3. The bonus token: a block-wide pass over the row sums the integer masses (rejected tokens are
//     excluded through a shared-memory bitmap), then tiles of kThreads * kItems tokens are scanned
//     with a block prefix sum until the tile holding the threshold is found.
//
// The arithmetic is the definition's (eagle_kernels/tree_speculative_sampling.py), with explicitly
// rounded intrinsics so nvcc cannot contract max(0, p - s*q) into an FMA: integer outputs are
// bit-identical to the CPU backends for the same uniforms.
#include <stdint.h>

#include "tree_speculative_sampling.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;  // contiguous tokens per thread in the bonus search
constexpr float kProbLimit = 1.00100004673004150390625f;  // float32(1 + 1e-3)
constexpr double kProbTol = 1e-3;
constexpr float kMassScale = 1152921504606846976.0f;  // 2^60
constexpr double kMassScaleD = 1152921504606846976.0;

constexpr int kBadTree = 1, kBadToken = 2, kBadUniform = 4, kBadProb = 8, kBadRow = 16, kDupSibling = 32,
              kBadDraft = 64;

__device__ __forceinline__ bool valid_prob(float p) { return p >= 0.f && p <= kProbLimit; }
__device__ __forceinline__ float clean_prob(float p) { return valid_prob(p) ? p : 0.f; }
__device__ __forceinline__ bool valid_uniform(float u) { return u >= 0.f && u < 1.f; }
__device__ __forceinline__ long long mass_of(float p) {
  return static_cast<long long>(__fmul_rn(clean_prob(p), kMassScale));
}
__device__ __forceinline__ long long residual_mass(float p, float q, double s) {
  const double r = __dsub_rn(static_cast<double>(clean_prob(p)), __dmul_rn(s, static_cast<double>(clean_prob(q))));
  return r > 0.0 ? static_cast<long long>(__dmul_rn(r, kMassScaleD)) : 0;
}

struct Shared {
  long long red_i64[kWarps];
  double red_f64[kWarps];
  int red_i32[kWarps];
  long long warp_total[kWarps];
  long long found;
  int status;
  // walk state (sampled drafts: shared by the whole block)
  int cur, num, child, chosen, go, level_done, tried_count;
  double s, w, s_final;
};

template <typename T>
__device__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the total (added in the same order by all of them).
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  v = warp_sum(v);
  __syncthreads();  // the previous reduction's readers are done with `scratch`
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  T total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

__device__ __forceinline__ bool is_excluded(const uint32_t* bits, long long x) {
  return bits != nullptr && ((bits[x >> 5] >> (x & 31)) & 1u);
}

// Integer masses of a row (max(0, p - s*q) with HAS_Q, else p): totals with and without the
// excluded tokens, and the BAD_ROW check. Must be called by the whole block.
template <bool HAS_Q>
__device__ void row_pass(const float* p, const float* q, double s, long long V, const uint32_t* excluded,
                         Shared& sh, long long& total_all, long long& total_kept, int& row_status) {
  unsigned long long all = 0, kept = 0;
  int bad = 0;
  double p_sum = 0.0, q_sum = 0.0;
  for (long long x = threadIdx.x; x < V; x += kThreads) {
    const float pv = p[x];
    bad += !valid_prob(pv);
    p_sum += clean_prob(pv);
    long long m;
    if constexpr (HAS_Q) {
      const float qv = q[x];
      bad += !valid_prob(qv);
      q_sum += clean_prob(qv);
      m = residual_mass(pv, qv, s);
    } else {
      m = mass_of(pv);
    }
    all += static_cast<unsigned long long>(m);
    if (!is_excluded(excluded, x)) kept += static_cast<unsigned long long>(m);
  }
  total_all = block_sum(static_cast<long long>(all), sh.red_i64);
  total_kept = block_sum(static_cast<long long>(kept), sh.red_i64);
  bad = block_sum(bad, sh.red_i32);
  p_sum = block_sum(p_sum, sh.red_f64);
  bool bad_row = bad > 0 || fabs(p_sum - 1.0) > kProbTol;
  if constexpr (HAS_Q) {
    q_sum = block_sum(q_sum, sh.red_f64);
    bad_row = bad_row || fabs(q_sum - 1.0) > kProbTol;
  }
  row_status = bad_row ? kBadRow : 0;
}

// First token whose cumulative mass exceeds `threshold` (V - 1 if none). Whole block.
template <bool HAS_Q>
__device__ long long search_row(const float* p, const float* q, double s, long long V, const uint32_t* excluded,
                                long long threshold, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) sh.found = -1;
  long long carry = 0;
  for (long long tile = 0; tile < V; tile += kThreads * kItems) {
    const long long x0 = tile + static_cast<long long>(threadIdx.x) * kItems;
    long long m[kItems];
    long long local = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const long long x = x0 + i;
      m[i] = 0;
      if (x < V && !is_excluded(excluded, x)) {
        if constexpr (HAS_Q) {
          m[i] = residual_mass(p[x], q[x], s);
        } else {
          m[i] = mass_of(p[x]);
        }
      }
      local += m[i];
    }
    long long inclusive = local;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const long long up = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += up;
    }
    __syncthreads();  // sh.found initialised / previous tile's warp totals consumed
    if (lane == 31) sh.warp_total[warp] = inclusive;
    __syncthreads();
    long long before = 0, tile_total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += sh.warp_total[w];
      tile_total += sh.warp_total[w];
    }
    const long long start = carry + before + inclusive - local;
    if (start <= threshold && threshold < start + local) {
      long long cum = start;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        cum += m[i];
        if (cum > threshold) {
          sh.found = x0 + i;
          break;
        }
      }
    }
    __syncthreads();
    if (sh.found >= 0) break;
    carry += tile_total;
  }
  return sh.found >= 0 ? sh.found : V - 1;
}

struct Params {
  const void* cand;
  const void* ri;
  const void* nt;
  const void* ns;
  const float* p;
  long long sp_b, sp_n;
  const float* q;
  long long sq_b, sq_n;
  const float* u;
  const float* uf;
  int32_t* predicts;
  int32_t* accept;
  int32_t* accept_num;
  int32_t* status;
  long long n, V, steps;
  float t_single, t_acc;
};

// Shared-memory arrays of one sequence (ints), followed by the exclusion bitmap.
struct Arrays {
  int *nt, *ns, *tok, *row, *indegree, *row_seen, *pred, *tried, *path;
  uint32_t* bits;
};

__device__ Arrays carve(int* smem, long long n) {
  Arrays a;
  a.nt = smem;
  a.ns = a.nt + n;
  a.tok = a.ns + n;
  a.row = a.tok + n;
  a.indegree = a.row + n;
  a.row_seen = a.indegree + n;
  a.pred = a.row_seen + n;
  a.tried = a.pred + n;
  a.path = a.tried + n;
  a.bits = reinterpret_cast<uint32_t*>(a.path + n);
  return a;
}

template <typename tok_t, typename idx_t>
__device__ void load_and_check(const Params& prm, long long b, const Arrays& a, Shared& sh) {
  const long long n = prm.n, base = b * n;
  const idx_t* nt = static_cast<const idx_t*>(prm.nt) + base;
  const idx_t* ns = static_cast<const idx_t*>(prm.ns) + base;
  const idx_t* ri = static_cast<const idx_t*>(prm.ri) + base;
  const tok_t* cand = static_cast<const tok_t*>(prm.cand) + base;
  if (threadIdx.x == 0) sh.status = valid_uniform(prm.uf[b]) ? 0 : kBadUniform;
  for (long long s = threadIdx.x; s < n; s += kThreads) {
    a.indegree[s] = 0;
    a.row_seen[s] = 0;
    a.pred[s] = 0;
  }
  __syncthreads();
  int status = 0;
  for (long long s = threadIdx.x; s < n; s += kThreads) {
    const long long first = static_cast<long long>(nt[s]), next = static_cast<long long>(ns[s]);
    const bool first_ok = first == -1 || (first > s && first < n);
    // siblings in any order (SGLang links some backwards), never to the root or themselves; one
    // incoming link per slot (checked below) keeps the walks finite
    const bool next_ok = (next == -1 || (next >= 1 && next < n && next != s)) && !(s == 0 && next != -1);
    if (!first_ok || !next_ok) status |= kBadTree;
    a.nt[s] = first_ok ? static_cast<int>(first) : -1;
    a.ns[s] = next_ok ? static_cast<int>(next) : -1;
    if (first_ok && first != -1) atomicAdd(&a.indegree[first], 1);
    if (next_ok && next != -1) atomicAdd(&a.indegree[next], 1);
    const long long row = static_cast<long long>(ri[s]) - base;
    if (row < 0 || row >= n) {
      status |= kBadTree;
      a.row[s] = static_cast<int>(s);
    } else {
      a.row[s] = static_cast<int>(row);
      atomicAdd(&a.row_seen[row], 1);
    }
    const long long tok = static_cast<long long>(cand[s]);
    const bool tok_ok = tok >= 0 && tok < prm.V;
    if (s > 0 && !tok_ok) status |= kBadToken;
    a.tok[s] = tok_ok ? static_cast<int>(tok) : 0;
    if (!valid_uniform(prm.u[base + s])) status |= kBadUniform;
  }
  __syncthreads();
  for (long long s = threadIdx.x; s < n; s += kThreads) {
    if (a.indegree[s] > 1 || a.row_seen[s] != 1) status |= kBadTree;
  }
  if (status) atomicOr(&sh.status, status);
  __syncthreads();
  if ((sh.status & (kBadTree | kBadToken)) != 0) {  // never write outside this sequence's rows
    for (long long s = threadIdx.x; s < n; s += kThreads) a.row[s] = static_cast<int>(s);
  }
  __syncthreads();
}

// Deterministic drafts: thread 0 walks; leaves cur/num/tried_count in `sh`, the tried tokens in a.tried.
template <bool LOSSY>
__device__ void walk_target_only(const Params& prm, long long b, const Arrays& a, Shared& sh) {
  if (threadIdx.x != 0) return;
  const long long base = b * prm.n;
  const bool walkable = (sh.status & (kBadTree | kBadToken)) == 0;
  int status = 0, cur = 0, num = 0, k = 0;
  float coin = prm.u[base];
  a.path[0] = a.row[0];
  bool go = walkable && prm.steps > 1;
  while (go) {
    const float* p_row = prm.p + b * prm.sp_b + cur * prm.sp_n;
    int child = a.nt[cur], chosen = -1;
    float acc = 0.f;
    k = 0;
    while (child != -1 && chosen == -1) {
      const int tok = a.tok[child];
      const float p = p_row[tok];
      if (!valid_prob(p)) status |= kBadProb;
      const float pc = clean_prob(p);
      bool dup = false;
      for (int i = 0; i < k; ++i) dup = dup || a.tried[i] == tok;
      bool accept;
      if constexpr (LOSSY) {
        acc = __fadd_rn(acc, pc);
        accept = coin <= __fdiv_rn(acc, prm.t_acc) || pc >= prm.t_single;
      } else {
        if (dup) status |= kDupSibling;
        if (!dup) acc = __fadd_rn(acc, pc);
        accept = coin < acc;
      }
      if (!accept && !dup) a.tried[k++] = tok;
      if (accept) {
        chosen = child;
      } else {
        child = a.ns[child];
      }
    }
    if (acc > kProbLimit) status |= kBadProb;
    if (chosen != -1 && chosen <= cur) {  // a child before its parent (a backward sibling link)
      status |= kBadTree;
      chosen = -1;
    }
    if (chosen == -1) break;
    a.pred[cur] = a.tok[chosen];
    a.path[++num] = a.row[chosen];
    cur = chosen;
    coin = prm.u[base + chosen];
    k = 0;
    go = num + 1 < prm.steps;
  }
  sh.cur = cur;
  sh.num = num;
  sh.tried_count = k;
  sh.s_final = 0.0;
  sh.status |= status;
}

// Sampled drafts: the whole block walks; thread 0 decides, a rejection costs one reduction over V.
__device__ void walk_sampled(const Params& prm, long long b, const Arrays& a, Shared& sh) {
  const long long base = b * prm.n;
  if (threadIdx.x == 0) {
    sh.cur = 0;
    sh.num = 0;
    sh.tried_count = 0;
    sh.s_final = 0.0;
    a.path[0] = a.row[0];
    sh.go = (sh.status & (kBadTree | kBadToken)) == 0 && prm.steps > 1;
  }
  __syncthreads();
  while (sh.go) {
    const float* p_row = prm.p + b * prm.sp_b + sh.cur * prm.sp_n;
    const float* q_row = prm.q + b * prm.sq_b + sh.cur * prm.sq_n;
    if (threadIdx.x == 0) {
      sh.child = a.nt[sh.cur];
      sh.chosen = -1;
      sh.s = 0.0;
      sh.w = 1.0;
    }
    __syncthreads();
    while (true) {
      if (threadIdx.x == 0) {
        sh.level_done = sh.child == -1;
        if (!sh.level_done) {
          const int child = sh.child, tok = a.tok[child];
          const float p = p_row[tok], q = q_row[tok];
          int status = 0;
          if (!valid_prob(p) || !valid_prob(q)) status |= kBadProb;
          if (valid_prob(q) && q == 0.f) status |= kBadDraft;
          const double qc = clean_prob(q);
          const double r = fmax(__dsub_rn(static_cast<double>(clean_prob(p)), __dmul_rn(sh.s, qc)), 0.0);
          const double lhs = __dmul_rn(__dmul_rn(static_cast<double>(prm.u[base + child]), sh.w), qc);
          if (lhs < r && sh.w > 0.0) {
            sh.chosen = child;
            sh.level_done = 1;
          } else {
            sh.s = __dadd_rn(sh.s, sh.w);
          }
          sh.status |= status;
        }
      }
      __syncthreads();
      if (sh.level_done) break;
      long long all, kept;
      int row_status;
      row_pass<true>(p_row, q_row, sh.s, prm.V, nullptr, sh, all, kept, row_status);
      if (threadIdx.x == 0) {
        sh.w = __ddiv_rn(static_cast<double>(all), kMassScaleD);
        sh.status |= row_status;
        sh.child = a.ns[sh.child];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      if (sh.chosen != -1 && sh.chosen <= sh.cur) {  // a child before its parent
        sh.status |= kBadTree;
        sh.chosen = -1;
      }
      if (sh.chosen == -1) {
        sh.go = 0;
        sh.s_final = sh.s;
      } else {
        a.pred[sh.cur] = a.tok[sh.chosen];
        a.path[++sh.num] = a.row[sh.chosen];
        sh.cur = sh.chosen;
        sh.go = sh.num + 1 < prm.steps;
      }
    }
    __syncthreads();
  }
}

template <bool HAS_Q>
__device__ long long sample_bonus(const Params& prm, long long b, const Arrays& a, Shared& sh) {
  const float* p_row = prm.p + b * prm.sp_b + sh.cur * prm.sp_n;
  const int k = sh.tried_count;
  const uint32_t* bits = nullptr;
  if (k > 0) {  // deterministic drafts whose children were all rejected
    const long long words = (prm.V + 31) / 32;
    for (long long i = threadIdx.x; i < words; i += kThreads) a.bits[i] = 0u;
    __syncthreads();
    for (int i = threadIdx.x; i < k; i += kThreads) atomicOr(&a.bits[a.tried[i] >> 5], 1u << (a.tried[i] & 31));
    __syncthreads();
    bits = a.bits;
  }
  const double s = sh.s_final;
  const float uf = prm.uf[b];
  long long all, kept;
  int row_status;
  if (HAS_Q && s > 0.0) {
    const float* q_row = prm.q + b * prm.sq_b + sh.cur * prm.sq_n;
    row_pass<true>(p_row, q_row, s, prm.V, nullptr, sh, all, kept, row_status);
    if (threadIdx.x == 0) sh.status |= row_status;
    if (all > 0) {
      const long long threshold = static_cast<long long>(__dmul_rn(static_cast<double>(uf), static_cast<double>(all)));
      return search_row<true>(p_row, q_row, s, prm.V, nullptr, threshold, sh);
    }
    row_pass<false>(p_row, nullptr, 0.0, prm.V, nullptr, sh, all, kept, row_status);  // no residual left
    const long long threshold = static_cast<long long>(__dmul_rn(static_cast<double>(uf), static_cast<double>(all)));
    return search_row<false>(p_row, nullptr, 0.0, prm.V, nullptr, threshold, sh);
  }
  row_pass<false>(p_row, nullptr, 0.0, prm.V, bits, sh, all, kept, row_status);
  if (threadIdx.x == 0) sh.status |= row_status;
  const bool exclude = kept > 0;
  const long long total = exclude ? kept : all;
  const long long threshold = static_cast<long long>(__dmul_rn(static_cast<double>(uf), static_cast<double>(total)));
  return search_row<false>(p_row, nullptr, 0.0, prm.V, exclude ? bits : nullptr, threshold, sh);
}

template <typename tok_t, typename idx_t, bool HAS_Q, bool LOSSY>
__global__ void __launch_bounds__(kThreads) tree_sampling_kernel(Params prm) {
  extern __shared__ int smem[];
  __shared__ Shared sh;
  const long long b = blockIdx.x, n = prm.n, base = b * n;
  const Arrays a = carve(smem, n);
  load_and_check<tok_t, idx_t>(prm, b, a, sh);
  if constexpr (HAS_Q) {
    walk_sampled(prm, b, a, sh);
  } else {
    walk_target_only<LOSSY>(prm, b, a, sh);
  }
  __syncthreads();
  const long long bonus = sample_bonus<HAS_Q>(prm, b, a, sh);
  if (threadIdx.x == 0) a.pred[sh.cur] = static_cast<int>(bonus);
  __syncthreads();
  for (long long s = threadIdx.x; s < n; s += kThreads) prm.predicts[base + a.row[s]] = a.pred[s];
  for (long long j = threadIdx.x; j < prm.steps; j += kThreads) {
    prm.accept[b * prm.steps + j] = j <= sh.num ? static_cast<int32_t>(base + a.path[j]) : -1;
  }
  if (threadIdx.x == 0) {
    prm.accept_num[b] = sh.num;
    prm.status[b] = sh.status;
  }
}

template <typename tok_t, typename idx_t, bool HAS_Q, bool LOSSY>
cudaError_t launch(const Params& prm, long long B, cudaStream_t stream) {
  const size_t smem = sizeof(int) * 9 * static_cast<size_t>(prm.n) + sizeof(uint32_t) * ((prm.V + 31) / 32);
  auto kernel = tree_sampling_kernel<tok_t, idx_t, HAS_Q, LOSSY>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(B), kThreads, smem, stream>>>(prm);
  return cudaGetLastError();
}

template <typename tok_t, typename idx_t>
cudaError_t dispatch_mode(const Params& prm, long long B, int lossy, cudaStream_t stream) {
  if (prm.q != nullptr) return launch<tok_t, idx_t, true, false>(prm, B, stream);
  if (lossy) return launch<tok_t, idx_t, false, true>(prm, B, stream);
  return launch<tok_t, idx_t, false, false>(prm, B, stream);
}

}  // namespace

extern "C" int eagle_tree_speculative_sampling_cuda(const void* candidates, int cand_is_int64, const void* retrive_index,
                                                    const void* retrive_next_token, const void* retrive_next_sibling,
                                                    int idx_is_int64, const float* target_probs, int64_t sp_b,
                                                    int64_t sp_n, const float* draft_probs, int64_t sq_b, int64_t sq_n,
                                                    const float* uniform_samples, const float* uniform_final,
                                                    int32_t* predicts, int32_t* accept_index, int32_t* accept_token_num,
                                                    int32_t* status, int64_t B, int64_t n, int64_t V,
                                                    int64_t num_spec_steps, int lossy, float threshold_single,
                                                    float threshold_acc, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (lossy && draft_probs != nullptr) return cudaErrorInvalidValue;
  Params prm{};
  prm.cand = candidates;
  prm.ri = retrive_index;
  prm.nt = retrive_next_token;
  prm.ns = retrive_next_sibling;
  prm.p = target_probs;
  prm.sp_b = sp_b;
  prm.sp_n = sp_n;
  prm.q = draft_probs;
  prm.sq_b = sq_b;
  prm.sq_n = sq_n;
  prm.u = uniform_samples;
  prm.uf = uniform_final;
  prm.predicts = predicts;
  prm.accept = accept_index;
  prm.accept_num = accept_token_num;
  prm.status = status;
  prm.n = n;
  prm.V = V;
  prm.steps = num_spec_steps;
  prm.t_single = threshold_single;
  prm.t_acc = threshold_acc;
  if (cand_is_int64) {
    return idx_is_int64 ? dispatch_mode<int64_t, int64_t>(prm, B, lossy, stream)
                        : dispatch_mode<int64_t, int32_t>(prm, B, lossy, stream);
  }
  return idx_is_int64 ? dispatch_mode<int32_t, int64_t>(prm, B, lossy, stream)
                      : dispatch_mode<int32_t, int32_t>(prm, B, lossy, stream);
}
