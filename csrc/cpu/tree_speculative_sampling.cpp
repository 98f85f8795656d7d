// tree_speculative_sampling and chain_speculative_sampling: schemas, argument checks shared with the
// CUDA binding, and the CPU kernels (parallel over the batch, the vocabulary passes written as flat
// loops over contiguous rows).
//
// The definition is eagle_kernels/tree_speculative_sampling.py; every step below mirrors it so that the
// integer outputs are bit-identical for the same uniforms:
//  * the walk adds float32 probabilities in sibling order (target-only) or evaluates
//    max(0, p - S*q) and u*W*q in float64 (sampled drafts), never reassociated or contracted;
//  * the bonus token is drawn from integer masses trunc(r * 2^60), summed in 64-bit integers, as the
//    first token whose cumulative mass exceeds trunc(double(u) * double(total)).
#include "tree_speculative_sampling.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace eagle {

using namespace spec_sampling;

void check_tree_speculative_sampling_args(const at::Tensor& candidates, const at::Tensor& retrive_index,
                                          const at::Tensor& retrive_next_token,
                                          const at::Tensor& retrive_next_sibling, const at::Tensor& target_probs,
                                          const c10::optional<at::Tensor>& draft_probs,
                                          const at::Tensor& uniform_samples, const at::Tensor& uniform_final,
                                          int64_t num_spec_steps, bool lossy) {
  TORCH_CHECK_VALUE(target_probs.dim() == 3, "target_probs must be [B, n, V], got ", target_probs.sizes());
  TORCH_CHECK_TYPE(target_probs.scalar_type() == at::kFloat, "target_probs must be float32");
  TORCH_CHECK_VALUE(target_probs.stride(2) == 1, "target_probs' vocabulary dimension must be contiguous");
  const int64_t B = target_probs.size(0), n = target_probs.size(1), V = target_probs.size(2);
  TORCH_CHECK_VALUE(n >= 1 && V >= 1, "target_probs must be [B, n >= 1, V >= 1]");
  TORCH_CHECK_VALUE(V < (int64_t(1) << 31), "vocabulary too large for int32 tokens");
  if (draft_probs.has_value()) {
    const auto& q = *draft_probs;
    TORCH_CHECK_VALUE(q.sizes() == target_probs.sizes(), "draft_probs must be [B, n, V] like target_probs");
    TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat, "draft_probs must be float32");
    TORCH_CHECK_VALUE(q.stride(2) == 1, "draft_probs' vocabulary dimension must be contiguous");
    TORCH_CHECK_VALUE(!lossy, "the lossy (relaxed) rule exists only for deterministic drafts");
  }
  const auto idx_type = retrive_index.scalar_type();
  for (const auto* t : {&candidates, &retrive_index, &retrive_next_token, &retrive_next_sibling}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == B && t->size(1) == n,
                      "candidates and retrive_* must be [B, n] = [", B, ", ", n, "], got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong,
                     "candidates and retrive_* must be int32 or int64");
  }
  TORCH_CHECK_TYPE(retrive_next_token.scalar_type() == idx_type && retrive_next_sibling.scalar_type() == idx_type,
                   "retrive_index, retrive_next_token and retrive_next_sibling must share a dtype");
  TORCH_CHECK_VALUE(uniform_samples.dim() == 2 && uniform_samples.size(0) == B && uniform_samples.size(1) == n,
                    "uniform_samples must be [B, n], got ", uniform_samples.sizes());
  TORCH_CHECK_VALUE(uniform_final.dim() == 1 && uniform_final.size(0) == B, "uniform_final must be [B], got ",
                    uniform_final.sizes());
  TORCH_CHECK_TYPE(uniform_samples.scalar_type() == at::kFloat && uniform_final.scalar_type() == at::kFloat,
                   "uniform_samples and uniform_final must be float32");
  TORCH_CHECK_VALUE(num_spec_steps >= 1 && num_spec_steps <= n, "num_spec_steps must be in [1, ", n, "], got ",
                    num_spec_steps);
  for (const auto* t : {&candidates, &retrive_index, &retrive_next_token, &retrive_next_sibling, &uniform_samples,
                        &uniform_final}) {
    TORCH_CHECK_VALUE(t->device() == target_probs.device(), "all inputs must be on ", target_probs.device());
  }
  if (draft_probs.has_value()) {
    TORCH_CHECK_VALUE(draft_probs->device() == target_probs.device(), "all inputs must be on ",
                      target_probs.device());
  }
}

namespace {

constexpr int64_t kBlock = 1024;  // vocabulary block whose mass is kept for the bonus search

// Sequences per parallel chunk: about 64K vocabulary entries of work, so small calls stay on one thread.
inline int64_t grain_for(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

inline bool valid_prob(float p) { return (p >= 0.f) & (p <= kProbLimit); }

// ok ? v : 0 as a bit mask: a branch here keeps GCC from vectorising the vocabulary loops.
inline float keep_if(bool ok, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= 0u - static_cast<uint32_t>(ok);
  std::memcpy(&v, &bits, sizeof(bits));
  return v;
}
inline float clean_prob(float p) { return keep_if(valid_prob(p), p); }
inline bool valid_uniform(float u) { return u >= 0.f && u < 1.f; }

// trunc(r * 2^60) for 0 <= r < 2, as two exact 30-bit halves: v = r * 2^30 (exact), hi = trunc(v),
// lo = trunc((v - hi) * 2^30) (the subtraction is exact), mass = hi * 2^30 + lo. Same value as a
// direct float -> int64 conversion, but with int32 conversions, which SSE2 has in vector form.
inline int32_t mass_hi(float v) { return static_cast<int32_t>(v); }
inline int32_t mass_lo(float v) { return static_cast<int32_t>((v - static_cast<float>(static_cast<int32_t>(v))) * 0x1p30f); }
inline int32_t mass_hi(double v) { return static_cast<int32_t>(v); }
inline int32_t mass_lo(double v) { return static_cast<int32_t>((v - static_cast<double>(static_cast<int32_t>(v))) * 0x1p30); }
inline int64_t join_mass(int64_t hi, int64_t lo) { return hi * (int64_t(1) << 30) + lo; }

inline int64_t mass_of(float p) {
  const float v = clean_prob(p) * 0x1p30f;
  return join_mass(mass_hi(v), mass_lo(v));
}

// max(0, p - s*q) in float64 (each operation rounded on its own: the build passes -ffp-contract=off).
inline double residual(float p, float q, double s) {
  const double prod = s * static_cast<double>(clean_prob(q));
  const double r = static_cast<double>(clean_prob(p)) - prod;
  return std::max(r, 0.0);
}

inline int64_t residual_mass(float p, float q, double s) {
  const double v = residual(p, q, s) * 0x1p30;
  return join_mass(mass_hi(v), mass_lo(v));
}

// One row of the vocabulary: the distribution p (and, with sampled drafts, q) at a node.
struct Row {
  const float* p;
  const float* q;  // null: target-only
  double s;        // draft multiplier of the residual max(0, p - s*q); 0 means p itself
  int64_t V;

  int64_t mass(int64_t x) const { return q != nullptr ? residual_mass(p[x], q[x], s) : mass_of(p[x]); }
};

// Masses of a whole row by block of kBlock tokens, plus the BAD_ROW check (invalid entries, sums
// off 1). The loops are SIMD reductions: the integer sums are exact in any order, and the float sums
// only feed the tolerance check.
int32_t block_masses(const Row& row, std::vector<int64_t>& per_block) {
  const int64_t V = row.V, blocks = (V + kBlock - 1) / kBlock;
  per_block.assign(blocks, 0);
  int64_t n_bad = 0;
  double p_sum = 0.0, q_sum = 0.0;
  const float* p = row.p;
  const float* q = row.q;
  const double s = row.s;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t lo = blk * kBlock, end = std::min(V, lo + kBlock);
    int64_t hi_sum = 0, lo_sum = 0, bad = 0;
    float ps = 0.f, qs = 0.f;
    if (q == nullptr) {
#pragma omp simd reduction(+ : hi_sum, lo_sum, bad, ps)
      for (int64_t x = lo; x < end; ++x) {
        const float pv = p[x];
        const bool ok = valid_prob(pv);
        bad += !ok;
        const float pc = keep_if(ok, pv);
        ps += pc;
        const float v = pc * 0x1p30f;
        hi_sum += mass_hi(v);
        lo_sum += mass_lo(v);
      }
    } else {
#pragma omp simd reduction(+ : hi_sum, lo_sum, bad, ps, qs)
      for (int64_t x = lo; x < end; ++x) {
        const float pv = p[x], qv = q[x];
        bad += !valid_prob(pv) + !valid_prob(qv);
        ps += clean_prob(pv);
        qs += clean_prob(qv);
        const double v = residual(pv, qv, s) * 0x1p30;
        hi_sum += mass_hi(v);
        lo_sum += mass_lo(v);
      }
      q_sum += qs;
    }
    n_bad += bad;
    p_sum += ps;
    per_block[blk] = join_mass(hi_sum, lo_sum);
  }
  bool bad = n_bad > 0 || std::abs(p_sum - 1.0) > kProbTol;
  if (row.q != nullptr) bad = bad || std::abs(q_sum - 1.0) > kProbTol;
  return bad ? kBadRow : 0;
}

int64_t row_total(const Row& row, std::vector<int64_t>& per_block, int32_t& status) {
  status |= block_masses(row, per_block);
  uint64_t total = 0;
  for (int64_t m : per_block) total += static_cast<uint64_t>(m);
  return static_cast<int64_t>(total);
}

// Inverse-CDF draw from the row's masses with the `tried` tokens removed; a residual without mass
// falls back to p itself. Returns the token and ORs BAD_ROW into `status`.
int64_t sample_residual(Row row, const std::vector<int64_t>& tried, float u, std::vector<int64_t>& per_block,
                        std::vector<int64_t>& block_buf, int32_t& status) {
  const int64_t V = row.V;
  status |= block_masses(row, per_block);
  for (int64_t t : tried) per_block[t / kBlock] -= mass_of(row.p[t]);
  uint64_t total = 0;
  for (int64_t m : per_block) total += static_cast<uint64_t>(m);
  const bool exclude = static_cast<int64_t>(total) > 0;
  if (!exclude) {
    row.s = 0.0;
    int32_t ignored = 0;
    total = static_cast<uint64_t>(row_total(row, per_block, ignored));
  }
  const int64_t threshold =
      static_cast<int64_t>(static_cast<double>(u) * static_cast<double>(static_cast<int64_t>(total)));
  int64_t carry = 0, blk = 0;
  const int64_t blocks = static_cast<int64_t>(per_block.size());
  while (blk < blocks && carry + per_block[blk] <= threshold) carry += per_block[blk++];
  if (blk == blocks) return V - 1;  // only for a row without any mass (reported as BAD_ROW)
  const int64_t lo = blk * kBlock, hi = std::min(V, lo + kBlock);
  block_buf.resize(hi - lo);
  for (int64_t x = lo; x < hi; ++x) block_buf[x - lo] = row.mass(x);
  if (exclude) {
    for (int64_t t : tried) {
      if (t >= lo && t < hi) block_buf[t - lo] = 0;
    }
  }
  for (int64_t x = lo; x < hi; ++x) {
    carry += block_buf[x - lo];
    if (carry > threshold) return x;
  }
  return V - 1;
}

struct TreeArgs {
  const float* p;
  int64_t sp_b, sp_n;
  const float* q;  // null: deterministic drafts
  int64_t sq_b, sq_n;
  const float* u;
  const float* uf;
  int32_t* predicts;
  int32_t* accept;
  int32_t* num;
  int32_t* status;
  int64_t n, V, steps;
  bool lossy;
  float t_single, t_acc;
};

// Structure, token and uniform checks of one sequence (`indegree`, `rows`: scratch of n entries).
template <typename tok_t, typename idx_t>
int32_t tree_status(const TreeArgs& a, const tok_t* cand, const idx_t* ri, const idx_t* nt, const idx_t* ns,
                    int64_t b, std::vector<int32_t>& indegree, std::vector<int32_t>& rows) {
  const int64_t n = a.n, base = b * n;
  indegree.assign(n, 0);
  rows.assign(n, 0);
  bool bad_tree = ns[base] != -1;
  bool bad_token = false, bad_u = !valid_uniform(a.uf[b]);
  for (int64_t s = 0; s < n; ++s) {
    // A child comes after its parent; siblings may link in any order (SGLang's trees link some
    // backwards) but never to the root or themselves. One incoming link per slot keeps every walk
    // finite: a cycle reached from the root would need a slot with two.
    const int64_t child = nt[base + s], sibling = ns[base + s];
    const bool child_ok = child == -1 || (child > s && child < n);
    const bool sibling_ok = sibling == -1 || (sibling >= 1 && sibling < n && sibling != s);
    if (!child_ok || !sibling_ok) bad_tree = true;
    if (child_ok && child != -1 && ++indegree[child] > 1) bad_tree = true;
    if (sibling_ok && sibling != -1 && ++indegree[sibling] > 1) bad_tree = true;
    const int64_t row = static_cast<int64_t>(ri[base + s]) - base;
    if (row < 0 || row >= n || ++rows[row] > 1) bad_tree = true;
    const int64_t tok = static_cast<int64_t>(cand[base + s]);
    if (s > 0 && (tok < 0 || tok >= a.V)) bad_token = true;
    if (!valid_uniform(a.u[base + s])) bad_u = true;
  }
  return (bad_tree ? kBadTree : 0) | (bad_token ? kBadToken : 0) | (bad_u ? kBadUniform : 0);
}

struct Scratch {
  std::vector<int32_t> indegree, rows;
  std::vector<int64_t> tried, per_block, block_buf;
};

template <typename tok_t, typename idx_t>
void sample_tree(const TreeArgs& a, const tok_t* cand, const idx_t* ri_in, const idx_t* nt, const idx_t* ns,
                 int64_t b, Scratch& scratch) {
  const int64_t n = a.n, base = b * n, V = a.V;
  int32_t status = tree_status(a, cand, ri_in, nt, ns, b, scratch.indegree, scratch.rows);
  const bool walkable = (status & (kBadTree | kBadToken)) == 0;
  auto row_of = [&](int64_t slot) -> int64_t { return walkable ? static_cast<int64_t>(ri_in[base + slot]) : base + slot; };
  for (int64_t s = 0; s < n; ++s) a.predicts[base + s] = 0;
  int32_t* accept = a.accept + b * a.steps;
  std::fill(accept, accept + a.steps, -1);
  accept[0] = static_cast<int32_t>(row_of(0));

  int64_t cur = 0, num = 0;
  float coin = a.u[base];
  std::vector<int64_t>& tried = scratch.tried;
  tried.clear();
  double s_final = 0.0;
  bool go = walkable && a.steps > 1;
  while (go) {
    const float* p_row = a.p + b * a.sp_b + cur * a.sp_n;
    const float* q_row = a.q != nullptr ? a.q + b * a.sq_b + cur * a.sq_n : nullptr;
    int64_t child = nt[base + cur], chosen = -1;
    tried.clear();
    float acc = 0.f;
    double s = 0.0, w = 1.0;
    while (child != -1 && chosen == -1) {
      const int64_t tok = cand[base + child];
      const float p = p_row[tok];
      if (!valid_prob(p)) status |= kBadProb;
      const float pc = clean_prob(p);
      bool accept_child;
      if (q_row != nullptr) {
        const float q = q_row[tok];
        if (!valid_prob(q)) status |= kBadProb;
        const double qc = clean_prob(q);
        if (valid_prob(q) && qc == 0.0) status |= kBadDraft;
        const double prod = s * qc;
        const double r = std::max(static_cast<double>(pc) - prod, 0.0);
        const double lhs = (static_cast<double>(a.u[base + child]) * w) * qc;
        accept_child = lhs < r && w > 0.0;
        if (!accept_child) {
          s = s + w;
          int32_t row_status = 0;
          w = static_cast<double>(row_total(Row{p_row, q_row, s, V}, scratch.per_block, row_status)) / kMassScaleD;
          status |= row_status;
        }
      } else {
        const bool dup = std::find(tried.begin(), tried.end(), tok) != tried.end();
        if (a.lossy) {  // SGLang's relaxed rule
          acc = acc + pc;
          accept_child = coin <= acc / a.t_acc || pc >= a.t_single;
        } else {
          if (dup) status |= kDupSibling;
          if (!dup) acc = acc + pc;
          accept_child = coin < acc;
        }
        if (!accept_child && !dup) tried.push_back(tok);
      }
      if (accept_child) {
        chosen = child;
      } else {
        child = ns[base + child];
      }
    }
    if (q_row == nullptr && acc > kProbLimit) status |= kBadProb;
    if (chosen != -1 && chosen <= cur) {  // a sibling linked backwards put a child before its parent:
      status |= kBadTree;                 // the path must go forward (compact_kv_cache moves in place)
      chosen = -1;
    }
    if (chosen == -1) {
      s_final = s;
      break;
    }
    a.predicts[row_of(cur)] = static_cast<int32_t>(cand[base + chosen]);
    accept[++num] = static_cast<int32_t>(row_of(chosen));
    cur = chosen;
    coin = a.u[base + chosen];
    tried.clear();
    go = num + 1 < a.steps;
  }
  const float* p_row = a.p + b * a.sp_b + cur * a.sp_n;
  const float* q_row = (a.q != nullptr && s_final > 0.0) ? a.q + b * a.sq_b + cur * a.sq_n : nullptr;
  const int64_t bonus =
      sample_residual(Row{p_row, q_row, s_final, V}, tried, a.uf[b], scratch.per_block, scratch.block_buf, status);
  a.predicts[row_of(cur)] = static_cast<int32_t>(bonus);
  a.num[b] = static_cast<int32_t>(num);
  a.status[b] = status;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tree_speculative_sampling_cpu(
    const at::Tensor& candidates, const at::Tensor& retrive_index, const at::Tensor& retrive_next_token,
    const at::Tensor& retrive_next_sibling, const at::Tensor& target_probs, const c10::optional<at::Tensor>& draft_probs,
    const at::Tensor& uniform_samples, const at::Tensor& uniform_final, int64_t num_spec_steps, bool lossy,
    double threshold_single, double threshold_acc) {
  check_tree_speculative_sampling_args(candidates, retrive_index, retrive_next_token, retrive_next_sibling,
                                       target_probs, draft_probs, uniform_samples, uniform_final, num_spec_steps,
                                       lossy);
  const int64_t B = target_probs.size(0), n = target_probs.size(1), V = target_probs.size(2);
  auto opts = target_probs.options().dtype(at::kInt);
  auto predicts = at::empty({B * n}, opts);
  auto accept_index = at::empty({B, num_spec_steps}, opts);
  auto num = at::empty({B}, opts);
  auto status = at::empty({B}, opts);
  auto cand = candidates.contiguous();
  auto ri = retrive_index.contiguous(), nt = retrive_next_token.contiguous(), ns = retrive_next_sibling.contiguous();
  auto u = uniform_samples.contiguous(), uf = uniform_final.contiguous();
  TreeArgs a{};
  a.p = target_probs.data_ptr<float>();
  a.sp_b = target_probs.stride(0);
  a.sp_n = target_probs.stride(1);
  if (draft_probs.has_value()) {
    a.q = draft_probs->data_ptr<float>();
    a.sq_b = draft_probs->stride(0);
    a.sq_n = draft_probs->stride(1);
  }
  a.u = u.data_ptr<float>();
  a.uf = uf.data_ptr<float>();
  a.predicts = predicts.data_ptr<int32_t>();
  a.accept = accept_index.data_ptr<int32_t>();
  a.num = num.data_ptr<int32_t>();
  a.status = status.data_ptr<int32_t>();
  a.n = n;
  a.V = V;
  a.steps = num_spec_steps;
  a.lossy = lossy;
  a.t_single = static_cast<float>(threshold_single);
  a.t_acc = static_cast<float>(std::max(threshold_acc, 1e-9));
  AT_DISPATCH_INDEX_TYPES(cand.scalar_type(), "tree_speculative_sampling_tok", [&] {
    using tok_t = index_t;
    AT_DISPATCH_INDEX_TYPES(ri.scalar_type(), "tree_speculative_sampling_idx", [&] {
      const tok_t* c = cand.data_ptr<tok_t>();
      const index_t *r = ri.data_ptr<index_t>(), *t = nt.data_ptr<index_t>(), *s = ns.data_ptr<index_t>();
      at::parallel_for(0, B, grain_for(V), [&](int64_t begin, int64_t end) {
        Scratch scratch;
        for (int64_t b = begin; b < end; ++b) sample_tree<tok_t, index_t>(a, c, r, t, s, b, scratch);
      });
    });
  });
  return {predicts, accept_index, num, status};
}

// ------------------------------------------------------------------------------------------------
// chain_speculative_sampling (vLLM's flattened layout)
// ------------------------------------------------------------------------------------------------
template <typename tok_t, typename cu_t, typename bonus_t>
void sample_chain(const tok_t* draft, const cu_t* cu, const bonus_t* bonus, const float* p, int64_t sp,
                  const float* q, int64_t sq, const float* u, const float* uf, int32_t* out, int32_t* status_out,
                  int64_t b, int64_t B, int64_t T, int64_t V, int64_t max_spec_len, Scratch& scratch) {
  const int64_t start = b == 0 ? 0 : static_cast<int64_t>(cu[b - 1]);
  const int64_t end = cu[b];
  int32_t* row = out + b * (max_spec_len + 1);
  std::fill(row, row + max_spec_len + 1, -1);
  int32_t status = valid_uniform(uf[b]) ? 0 : kBadUniform;
  const bool bad_layout = start < 0 || end < start || end - start > max_spec_len || end > T || (b == B - 1 && end != T);
  const int64_t bonus_tok = static_cast<int64_t>(bonus[b]);
  if (bonus_tok < 0 || bonus_tok >= V) status |= kBadToken;
  if (bad_layout) {
    status_out[b] = status | kBadTree;
    return;
  }
  for (int64_t t = start; t < end; ++t) {
    const int64_t d = static_cast<int64_t>(draft[t]);
    if (d < 0 || d >= V) status |= kBadToken;
    if (!valid_uniform(u[t])) status |= kBadUniform;
  }
  if (status & kBadToken) {
    status_out[b] = status;
    return;
  }
  for (int64_t t = start; t < end; ++t) {  // every draft's probabilities, as the reference checks them
    const int64_t d = static_cast<int64_t>(draft[t]);
    if (!valid_prob(p[t * sp + d])) status |= kBadProb;
    if (q != nullptr) {
      const float qd = q[t * sq + d];
      if (!valid_prob(qd)) status |= kBadProb;
      if (valid_prob(qd) && qd == 0.f) status |= kBadDraft;
    }
  }
  for (int64_t t = start; t < end; ++t) {
    const int64_t d = static_cast<int64_t>(draft[t]);
    const float* p_row = p + t * sp;
    const float* q_row = q != nullptr ? q + t * sq : nullptr;
    const double qc = q_row != nullptr ? static_cast<double>(clean_prob(q_row[d])) : 1.0;
    const double lhs = (static_cast<double>(u[t]) * 1.0) * qc;
    if (lhs < static_cast<double>(clean_prob(p_row[d]))) {
      row[t - start] = static_cast<int32_t>(d);
      continue;
    }
    scratch.tried.clear();
    if (q_row == nullptr) scratch.tried.push_back(d);
    row[t - start] = static_cast<int32_t>(sample_residual(Row{p_row, q_row, 1.0, V}, scratch.tried, uf[b],
                                                          scratch.per_block, scratch.block_buf, status));
    status_out[b] = status;
    return;
  }
  row[end - start] = static_cast<int32_t>(bonus_tok);
  status_out[b] = status;
}

std::tuple<at::Tensor, at::Tensor> chain_speculative_sampling_cpu(
    const at::Tensor& draft_token_ids, const at::Tensor& cu_num_draft_tokens, const c10::optional<at::Tensor>& draft_probs,
    const at::Tensor& target_probs, const at::Tensor& bonus_token_ids, const at::Tensor& uniform_samples,
    const at::Tensor& uniform_final, int64_t max_spec_len) {
  TORCH_CHECK_VALUE(target_probs.dim() == 2 && target_probs.scalar_type() == at::kFloat && target_probs.stride(1) == 1,
                    "target_probs must be [T, V] float32 with a contiguous vocabulary dimension");
  TORCH_CHECK_VALUE(cu_num_draft_tokens.dim() == 1, "cu_num_draft_tokens must be [B], got ", cu_num_draft_tokens.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"draft_token_ids", &draft_token_ids},
                                {"cu_num_draft_tokens", &cu_num_draft_tokens}, {"bonus_token_ids", &bonus_token_ids}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong, name,
                     " must be int32 or int64, got ", t->scalar_type());
  }
  for (const at::Tensor* t : {&draft_token_ids, &cu_num_draft_tokens, &bonus_token_ids, &uniform_samples,
                              &uniform_final}) {
    TORCH_CHECK_VALUE(t->device() == target_probs.device(), "all inputs must be on ", target_probs.device());
  }
  if (draft_probs.has_value()) {
    TORCH_CHECK_VALUE(draft_probs->device() == target_probs.device(), "all inputs must be on ",
                      target_probs.device());
  }
  const int64_t T = target_probs.size(0), V = target_probs.size(1), B = cu_num_draft_tokens.size(0);
  TORCH_CHECK_VALUE(V >= 1 && V < (int64_t(1) << 31), "vocabulary size must be in [1, 2^31)");
  TORCH_CHECK_VALUE(draft_token_ids.dim() == 1 && draft_token_ids.size(0) == T, "draft_token_ids must be [T]");
  TORCH_CHECK_VALUE(cu_num_draft_tokens.dim() == 1, "cu_num_draft_tokens must be [B]");
  TORCH_CHECK_VALUE(bonus_token_ids.dim() == 1 && bonus_token_ids.size(0) == B, "bonus_token_ids must be [B]");
  TORCH_CHECK_VALUE(uniform_samples.dim() == 1 && uniform_samples.size(0) == T, "uniform_samples must be [T]");
  TORCH_CHECK_VALUE(uniform_final.dim() == 1 && uniform_final.size(0) == B, "uniform_final must be [B]");
  TORCH_CHECK_TYPE(uniform_samples.scalar_type() == at::kFloat && uniform_final.scalar_type() == at::kFloat,
                   "uniforms must be float32");
  TORCH_CHECK_VALUE(max_spec_len >= 0, "max_spec_len must be >= 0");
  if (draft_probs.has_value()) {
    TORCH_CHECK_VALUE(draft_probs->sizes() == target_probs.sizes() && draft_probs->scalar_type() == at::kFloat &&
                          draft_probs->stride(1) == 1,
                      "draft_probs must be [T, V] float32 like target_probs");
  }
  auto opts = target_probs.options().dtype(at::kInt);
  auto out = at::empty({B, max_spec_len + 1}, opts);
  auto status = at::empty({B}, opts);
  auto draft = draft_token_ids.contiguous(), cu = cu_num_draft_tokens.contiguous(), bonus = bonus_token_ids.contiguous();
  auto u = uniform_samples.contiguous(), uf = uniform_final.contiguous();
  const float* q = draft_probs.has_value() ? draft_probs->data_ptr<float>() : nullptr;
  const int64_t sq = draft_probs.has_value() ? draft_probs->stride(0) : 0;
  AT_DISPATCH_INDEX_TYPES(draft.scalar_type(), "chain_tok", [&] {
    using tok_t = index_t;
    AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "chain_cu", [&] {
      using cu_t = index_t;
      AT_DISPATCH_INDEX_TYPES(bonus.scalar_type(), "chain_bonus", [&] {
        at::parallel_for(0, B, grain_for(V), [&](int64_t begin, int64_t end) {
          Scratch scratch;
          for (int64_t b = begin; b < end; ++b) {
            sample_chain<tok_t, cu_t, index_t>(draft.data_ptr<tok_t>(), cu.data_ptr<cu_t>(), bonus.data_ptr<index_t>(),
                                               target_probs.data_ptr<float>(), target_probs.stride(0), q, sq,
                                               u.data_ptr<float>(), uf.data_ptr<float>(), out.data_ptr<int32_t>(),
                                               status.data_ptr<int32_t>(), b, B, T, V, max_spec_len, scratch);
          }
        });
      });
    });
  });
  return {out, status};
}

}  // namespace
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "tree_speculative_sampling(Tensor candidates, Tensor retrive_index, Tensor retrive_next_token, "
      "Tensor retrive_next_sibling, Tensor target_probs, Tensor? draft_probs, Tensor uniform_samples, "
      "Tensor uniform_final, int num_spec_steps, bool lossy, float threshold_single, float threshold_acc) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "chain_speculative_sampling(Tensor draft_token_ids, Tensor cu_num_draft_tokens, Tensor? draft_probs, "
      "Tensor target_probs, Tensor bonus_token_ids, Tensor uniform_samples, Tensor uniform_final, "
      "int max_spec_len) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) {
  m.impl("tree_speculative_sampling", &eagle::tree_speculative_sampling_cpu);
  m.impl("chain_speculative_sampling", &eagle::chain_speculative_sampling_cpu);
}
