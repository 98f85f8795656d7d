// verify_tree_greedy: schema, argument checks shared with the CUDA binding, and the CPU kernel.
//
// Per sequence (at::parallel_for over the batch): validate the tree arrays, then walk from the root;
// at each node scan its child list in sibling order and accept the first child whose candidate token
// equals the target's argmax at the node (target_predict and predicts are indexed by the flat row
// retrive_index[b, slot], candidates by slot, as in sgl-kernel). The last accepted node gets the
// bonus token. Every loop is bounded by n and num_spec_steps.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "verify_tree_greedy.h"

namespace eagle {

namespace {
bool is_index_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}
}  // namespace

void check_verify_tree_greedy_args(const at::Tensor& candidates, const at::Tensor& retrive_index,
                                   const at::Tensor& retrive_next_token, const at::Tensor& retrive_next_sibling,
                                   const at::Tensor& target_predict, int64_t num_spec_steps) {
  TORCH_CHECK_VALUE(candidates.dim() == 2, "candidates must be [B, n], got ", candidates.sizes());
  TORCH_CHECK_VALUE(candidates.size(1) >= 1, "candidates must have at least one slot per sequence (the root)");
  TORCH_CHECK_VALUE(num_spec_steps >= 1, "num_spec_steps must be >= 1 (root plus drafts), got ", num_spec_steps);
  const std::pair<const char*, const at::Tensor*> all[] = {{"candidates", &candidates},
                                                           {"retrive_index", &retrive_index},
                                                           {"retrive_next_token", &retrive_next_token},
                                                           {"retrive_next_sibling", &retrive_next_sibling},
                                                           {"target_predict", &target_predict}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK_VALUE(t->sizes() == candidates.sizes(), name, " must have shape ", candidates.sizes(), ", got ",
                      t->sizes());
    TORCH_CHECK_TYPE(is_index_dtype(*t), name, " must have dtype in (int32, int64), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == candidates.device(), name, " is on ", t->device(),
                      " but the other inputs are on ", candidates.device());
  }
  TORCH_CHECK_TYPE(retrive_next_token.scalar_type() == retrive_index.scalar_type() &&
                       retrive_next_sibling.scalar_type() == retrive_index.scalar_type(),
                   "dtypes must match: retrive_index, retrive_next_token and retrive_next_sibling");
}

namespace {

// Raises ValueError unless sequence b's arrays describe a forest rooted at slot 0: rows inside the
// sequence and distinct, links in [-1, n), every slot linked at most once, the root never, no cycle,
// every child after its parent.
template <typename tree_t, typename target_t>
void check_sequence(int64_t b, int64_t n, const tree_t* rows, const tree_t* first_child,
                    const tree_t* next_sibling, const target_t* target_at_row, std::vector<int32_t>& scratch) {
  scratch.assign(2 * n, 0);
  int32_t* row_seen = scratch.data();
  int32_t* in_degree = scratch.data() + n;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t r = static_cast<int64_t>(rows[s]) - b * n;
    TORCH_CHECK_VALUE(r >= 0 && r < n, "retrive_index is out of range: slot ", s, " of sequence ", b,
                      " maps to row ", rows[s], ", expected a row in [", b * n, ", ", b * n + n, ")");
    TORCH_CHECK_VALUE(row_seen[r]++ == 0, "retrive_index must map the n slots of each sequence to n distinct rows",
                      " (sequence ", b, " uses row ", rows[s], " twice)");
    const int64_t t = static_cast<int64_t>(target_at_row[b * n + s]);
    TORCH_CHECK_VALUE(t >= 0 && t <= std::numeric_limits<int32_t>::max(),
                      "target_predict is out of range: token ids must be in [0, 2**31), got ", t);
    for (const tree_t* links : {first_child, next_sibling}) {
      const int64_t d = links[s];
      TORCH_CHECK_VALUE(d >= -1 && d < n, links == first_child ? "retrive_next_token" : "retrive_next_sibling",
                        " is out of range: entries must be -1 or a slot in [0, ", n, "), got ", d, " at sequence ",
                        b, ", slot ", s);
      if (d >= 0) ++in_degree[d];
    }
  }
  TORCH_CHECK_VALUE(next_sibling[0] == -1,
                    "the root (slot 0) cannot have a next sibling (retrive_next_sibling[:, 0] must be -1)");
  TORCH_CHECK_VALUE(in_degree[0] == 0, "cycle in the tree arrays: a link points back to the root (slot 0)");
  for (int64_t s = 1; s < n; ++s) {
    TORCH_CHECK_VALUE(in_degree[s] <= 1, "cycle or shared node in the tree arrays: slot ", s, " of sequence ", b,
                      " is linked more than once");
  }
  // With in-degree <= 1, a slot lies on (or below) a cycle exactly when no traversal from a slot of
  // in-degree 0 reaches it. Each entry carries the slot's parent (-1 for a traversal's start).
  std::vector<std::pair<int32_t, int32_t>> stack;
  int64_t reached = 0;
  for (int64_t s = 0; s < n; ++s) {
    if (in_degree[s] != 0) continue;
    stack.emplace_back(static_cast<int32_t>(s), -1);
    while (!stack.empty()) {
      const auto [u, parent] = stack.back();
      stack.pop_back();
      ++reached;
      // A child after its parent (SGLang's build_tree order; sibling order is free): an accepted path
      // then lists increasing slots, which compact_kv_cache's in-place moves rely on.
      TORCH_CHECK_VALUE(parent < u, "a child must come after its parent in the tree arrays: slot ", u,
                        " of sequence ", b, " is a child of slot ", parent);
      if (first_child[u] >= 0) stack.emplace_back(static_cast<int32_t>(first_child[u]), u);
      if (next_sibling[u] >= 0) stack.emplace_back(static_cast<int32_t>(next_sibling[u]), parent);
    }
  }
  TORCH_CHECK_VALUE(reached == n, "cycle in the tree arrays of sequence ", b,
                    " (retrive_next_token / retrive_next_sibling)");
}

template <typename cand_t, typename tree_t, typename target_t>
void verify_cpu_impl(int64_t B, int64_t n, int64_t steps, const cand_t* cand, const tree_t* rows,
                     const tree_t* first_child, const tree_t* next_sibling, const target_t* target_at_row,
                     int32_t* predicts, int32_t* accept_index, int32_t* accept_num) {
  // Small batches run on the calling thread: waking the pool costs more than a few hundred walks.
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> scratch;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t off = b * n;
      check_sequence(b, n, rows + off, first_child + off, next_sibling + off, target_at_row, scratch);
      int32_t* accepted = accept_index + b * steps;
      std::fill(accepted, accepted + steps, -1);
      int64_t cur = 0;
      int64_t cur_row = rows[off];
      accepted[0] = static_cast<int32_t>(cur_row);
      int32_t count = 0;
      for (int64_t step = 1; step < steps; ++step) {
        const int64_t target = target_at_row[cur_row];
        int64_t child = first_child[off + cur];
        for (int64_t hops = 0; child >= 0 && hops < n; ++hops) {
          if (static_cast<int64_t>(cand[off + child]) == target) break;
          child = next_sibling[off + child];
        }
        if (child < 0) break;
        predicts[cur_row] = static_cast<int32_t>(target);
        cur = child;
        cur_row = rows[off + child];
        accepted[++count] = static_cast<int32_t>(cur_row);
      }
      predicts[cur_row] = static_cast<int32_t>(target_at_row[cur_row]);
      accept_num[b] = count;
    }
  });
}

// Calls f with a typed const pointer to the data of an int32 or int64 tensor.
template <typename F>
void with_index_data(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kLong) {
    f(t.data_ptr<int64_t>());
  } else {
    f(t.data_ptr<int32_t>());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_greedy_cpu(
    const at::Tensor& candidates, const at::Tensor& retrive_index, const at::Tensor& retrive_next_token,
    const at::Tensor& retrive_next_sibling, const at::Tensor& target_predict, int64_t num_spec_steps) {
  check_verify_tree_greedy_args(candidates, retrive_index, retrive_next_token, retrive_next_sibling,
                                target_predict, num_spec_steps);
  const int64_t B = candidates.size(0), n = candidates.size(1);
  const auto opts = candidates.options().dtype(at::kInt);
  at::Tensor predicts = at::zeros({B * n}, opts);
  at::Tensor accept_index = at::empty({B, num_spec_steps}, opts);
  at::Tensor accept_num = at::empty({B}, opts);
  const at::Tensor cand = candidates.contiguous(), rows = retrive_index.contiguous();
  const at::Tensor first = retrive_next_token.contiguous(), sib = retrive_next_sibling.contiguous();
  const at::Tensor target = target_predict.contiguous();
  with_index_data(cand, [&](auto* c) {
    with_index_data(target, [&](auto* t) {
      if (rows.scalar_type() == at::kLong) {
        verify_cpu_impl(B, n, num_spec_steps, c, rows.data_ptr<int64_t>(), first.data_ptr<int64_t>(),
                        sib.data_ptr<int64_t>(), t, predicts.data_ptr<int32_t>(), accept_index.data_ptr<int32_t>(),
                        accept_num.data_ptr<int32_t>());
      } else {
        verify_cpu_impl(B, n, num_spec_steps, c, rows.data_ptr<int32_t>(), first.data_ptr<int32_t>(),
                        sib.data_ptr<int32_t>(), t, predicts.data_ptr<int32_t>(), accept_index.data_ptr<int32_t>(),
                        accept_num.data_ptr<int32_t>());
      }
    });
  });
  return {predicts, accept_index, accept_num};
}

}  // namespace
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "verify_tree_greedy(Tensor candidates, Tensor retrive_index, Tensor retrive_next_token, "
      "Tensor retrive_next_sibling, Tensor target_predict, int num_spec_steps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) { m.impl("verify_tree_greedy", &eagle::verify_tree_greedy_cpu); }
