// The ops of the CPU decoding loop with an EAGLE-1/2 head: eagle2_draft_dynamic (below), and
// eagle2_verify_update / eagle2_verify_update_sampled (the greedy / sampled rest of a round after the
// verify forward, further down).
//
// eagle2_draft_dynamic: one EAGLE-2 dynamic draft tree (eagle.speculate.SpeculativeDecoder._draft_dynamic
// with an EAGLE-1/2 head on the CPU fast path) in one C++ call.
//
// It makes the Python loop's numerical ATen calls (eagle/tree.py: the log-softmax and top-k of
// expand_root and expand_level; eagle/models/draft.py: the head forward through eagle2_head; build_tree)
// with the same shapes and arguments, and keeps the tree's bookkeeping (ancestor masks, positions,
// frontier indices, score lists, select_candidates' stable sort) in host arrays with exact loops, so
// the tree (and everything decoded from it) is the same bit for bit. A draft level of a small model
// costs less than the Python, and the small ATen calls, did.
//
// Returns [candidates [b, n] int64, tree_mask [b, n, n] bool, positions [b*n] int64,
//          retrive_index, retrive_next_token, retrive_next_sibling [b, n] int64].
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "build_tree.h"
#include "llama_layers.h"
#include "rng.h"
#include "tensor_pool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace eagle {
namespace draft_tree {

using llama_layers::OptTensor;

namespace {

// eagle.speculate.SpeculativeDecoder._draft_logprobs (ATen's cast and log_softmax, into cached blocks)
at::Tensor draft_logprobs(const at::Tensor& logits) {
  at::Tensor x = logits;
  if (logits.scalar_type() != at::kFloat) x = pool::empty(logits.sizes(), at::kFloat).copy_(logits);
  at::Tensor out = pool::empty(x.sizes(), at::kFloat);
  at::log_softmax_out(out, x, -1);
  return out;
}

// at::topk(x, k, -1) (largest, sorted), into cached blocks.
std::tuple<at::Tensor, at::Tensor> top_k(const at::Tensor& x, int64_t k) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = k;
  at::Tensor values = pool::empty(sizes, x.scalar_type()), indices = pool::empty(sizes, at::kLong);
  at::topk_out(values, indices, x, k, -1);
  return {values, indices};
}

// The tree's bookkeeping (eagle/tree.py) for b rows, in host arrays. The Python loop keeps it in small
// tensors, and each of its ~60 small ATen calls per level (cat, gather, eye, arange, div, ...) costs
// a dispatch and an allocation: more than the loops below. These are exact (integer indexing, copies,
// and the one float add that expand_level makes), so they give the tensors' values.
struct TreeBook {
  int64_t b, k, levels;
  int64_t per_row;  // scores and tokens per row: k from the root, then k*k per level
  std::vector<float> scores;  // score_list, concatenated: [b, per_row]
  std::vector<int64_t> tokens;  // token_list, concatenated: [b, per_row]
  std::vector<int64_t> parents;  // parents_list, concatenated: [b, k + 1 + levels * k]
  // Frontier (eagle.tree.Frontier; its flat indices are the parents entries): [b, k] each
  std::vector<float> front_scores;
  std::vector<int64_t> front_tokens, front_parent;
  // Ancestor mask of the tree rows fed to the draft so far: [b, levels*k, levels*k].
  std::vector<uint8_t> fed;

  TreeBook(int64_t b_, int64_t k_, int64_t levels_)
      : b(b_), k(k_), levels(levels_), per_row(k_ + levels_ * k_ * k_),
        scores(b_ * per_row), tokens(b_ * per_row), parents(b_ * (k_ + 1 + levels_ * k_)),
        front_scores(b_ * k_), front_tokens(b_ * k_), front_parent(b_ * k_),
        fed(b_ * levels_ * k_ * levels_ * k_, 0) {}

  int64_t parents_per_row() const { return k + 1 + levels * k; }
  uint8_t& fed_at(int64_t row, int64_t i, int64_t j) { return fed[(row * levels * k + i) * levels * k + j]; }

  // expand_root: the root's top-k as the first frontier; parents start as [-1, 0, ..., k-1].
  void expand_root(const at::Tensor& root_scores, const at::Tensor& root_tokens) {
    const at::Tensor s = root_scores.contiguous(), t = root_tokens.contiguous();
    const float* sp = s.const_data_ptr<float>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < b; ++r) {
      for (int64_t i = 0; i < k; ++i) {
        scores[r * per_row + i] = front_scores[r * k + i] = sp[r * k + i];
        tokens[r * per_row + i] = front_tokens[r * k + i] = tp[r * k + i];
        front_parent[r * k + i] = 0;
      }
      for (int64_t i = 0; i <= k; ++i) parents[r * parents_per_row() + i] = i - 1;
    }
  }

  // The attention mask of one draft level (eagle.tree's ancestor masks as the head's block sees
  // them): [b, past + k, past + k] bool. Rows of earlier levels are zero queries that see only
  // themselves (eye(past, past + k)); the frontier's row i sees its parent's ancestors and itself.
  // Also grows `fed` by the frontier's rows.
  at::Tensor level_mask(int64_t past, const at::TensorOptions& bool_options) {
    const int64_t width = past + k;
    at::Tensor mask = at::zeros({b, width, width}, bool_options);
    bool* m = mask.mutable_data_ptr<bool>();
    for (int64_t r = 0; r < b; ++r) {
      bool* mr = m + r * width * width;
      for (int64_t i = 0; i < past; ++i) mr[i * width + i] = true;
      for (int64_t i = 0; i < k; ++i) {
        bool* row = mr + (past + i) * width;
        if (past) {  // the parent is one of the previous level's k rows, the last fed
          const int64_t parent = front_parent[r * k + i] + (past - k);
          for (int64_t j = 0; j < past; ++j) row[j] = fed_at(r, parent, j) != 0;
        }
        row[past + i] = true;
      }
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < width; ++j) fed_at(r, past + i, j) = mr[(past + i) * width + j];
    }
    return mask;
  }

  // expand_level(frontier, logp, level + 1, k) after at::topk of the level's log-probabilities
  // (child_lp, child_tok [b, k, k]) and of the cumulative scores (best_scores, best [b, k]).
  void expand_level(int64_t level, const float* cum, const int64_t* child_tok, const at::Tensor& best_scores,
                    const at::Tensor& best) {
    const at::Tensor bs = best_scores.contiguous(), bi = best.contiguous();
    const float* bsp = bs.const_data_ptr<float>();
    const int64_t* bip = bi.const_data_ptr<int64_t>();
    const int64_t offset = k + (level - 1) * k * k;  // this level's first entry in score_list
    for (int64_t r = 0; r < b; ++r) {
      for (int64_t j = 0; j < k * k; ++j) {
        scores[r * per_row + offset + j] = cum[r * k * k + j];
        tokens[r * per_row + offset + j] = child_tok[r * k * k + j];
      }
      for (int64_t i = 0; i < k; ++i) {
        const int64_t pick = bip[r * k + i];
        front_tokens[r * k + i] = child_tok[r * k * k + pick];
        front_scores[r * k + i] = bsp[r * k + i];
        front_parent[r * k + i] = pick / k;  // floor: pick >= 0
        parents[r * parents_per_row() + k + 1 + (level - 1) * k + i] = pick + offset;
      }
    }
  }

  // select_candidates: per row, the num_tokens - 1 best scores (a stable sort of -score, so ties
  // keep score_list's order; NaN last, as torch.sort), in index order.
  std::vector<int64_t> select(int64_t count) const {
    std::vector<int64_t> selected(b * count), order(per_row);
    for (int64_t r = 0; r < b; ++r) {
      const float* s = scores.data() + r * per_row;
      for (int64_t i = 0; i < per_row; ++i) order[i] = i;
      std::stable_sort(order.begin(), order.end(), [s](int64_t x, int64_t y) {
        const float a = -s[x], c = -s[y];
        return (!std::isnan(a) && std::isnan(c)) || a < c;
      });
      std::sort(order.begin(), order.begin() + count);
      std::copy(order.begin(), order.begin() + count, selected.begin() + r * count);
    }
    return selected;
  }
};

// A [rows, cols] int64 tensor holding `values` (row-major).
at::Tensor long_tensor(const std::vector<int64_t>& values, int64_t rows, int64_t cols, int64_t row_stride) {
  at::Tensor t = pool::empty({rows, cols}, at::kLong);
  int64_t* p = t.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) std::copy_n(values.data() + r * row_stride, cols, p + r * cols);
  return t;
}

// out[r, i] = rows[r, index[r * k + i]] for rows [b, m, H] (any dtype, contiguous), out [b, k, H].
at::Tensor gather_rows(const at::Tensor& rows, const std::vector<int64_t>& index, int64_t k) {
  const at::Tensor src = rows.contiguous();
  const int64_t b = src.size(0), m = src.size(1), bytes = src.size(2) * src.element_size();
  at::Tensor out = pool::empty({b, k, src.size(2)}, src.scalar_type());
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(out.mutable_data_ptr());
  for (int64_t r = 0; r < b; ++r)
    for (int64_t i = 0; i < k; ++i) std::memcpy(d + (r * k + i) * bytes, s + (r * m + index[r * k + i]) * bytes, bytes);
  return out;
}

}  // namespace

std::vector<at::Tensor> eagle2_draft_dynamic_cpu(
    const at::Tensor& root_logits, const at::Tensor& root_hidden, const at::Tensor& root,
    const at::Tensor& draft_seqlens, const at::Tensor& target_seqlens, const at::Tensor& embed_weight,
    const at::Tensor& fc_weight, const OptTensor& fc_bias, const c10::List<OptTensor>& weights, const at::Tensor& kv,
    const at::Tensor& doubled_inv_freq, const at::Tensor& signs, const at::Tensor& lm_head, int64_t topk,
    int64_t depth, int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads, double eps) {
  TORCH_CHECK_VALUE(root_logits.dim() == 2 && root_hidden.dim() == 2 && root.dim() == 1 &&
                        root_logits.size(0) == root_hidden.size(0) && root.size(0) == root_logits.size(0),
                    "eagle2_draft_dynamic: root_logits [b, V], root_hidden [b, H] and root [b] expected, got ",
                    root_logits.sizes(), ", ", root_hidden.sizes(), ", ", root.sizes());
  TORCH_CHECK_VALUE(topk >= 1 && depth >= 1 && num_tokens >= 2 && num_tokens - 1 <= topk + (depth - 1) * topk * topk,
                    "eagle2_draft_dynamic: bad tree (topk=", topk, ", depth=", depth, ", num_tokens=", num_tokens,
                    ")");
  TORCH_CHECK_VALUE(topk <= root_logits.size(1), "eagle2_draft_dynamic: topk=", topk, " exceeds the vocabulary (",
                    root_logits.size(1), ")");
  TORCH_CHECK_TYPE(at::isIntegralType(root.scalar_type(), false), "eagle2_draft_dynamic: root must hold token ids "
                   "(an integer tensor), got ", root.scalar_type());
  TORCH_CHECK_VALUE(draft_seqlens.dim() == 1 && draft_seqlens.size(0) == root.size(0),
                    "eagle2_draft_dynamic: draft_seqlens must be [b], got ", draft_seqlens.sizes());
  const int64_t b = root_logits.size(0), k = topk, H = root_hidden.size(1), levels = depth - 1;
  const auto bool_options = root.options().dtype(at::kBool);
  TreeBook book(b, k, levels);

  auto [root_scores, root_tokens] = top_k(draft_logprobs(root_logits), k);
  book.expand_root(root_scores, root_tokens);

  const at::Tensor base = draft_seqlens.to(at::kLong).contiguous();
  at::Tensor parent_hidden = root_hidden.unsqueeze(1).expand({b, k, H}).contiguous();
  std::vector<float> cum(b * k * k);
  for (int64_t level = 1; level <= levels; ++level) {
    const int64_t past = (level - 1) * k;
    const at::Tensor mask = book.level_mask(past, bool_options);
    at::Tensor positions = pool::empty({b, k}, at::kLong);  // every frontier row one position past the last level
    for (int64_t r = 0; r < b; ++r)
      std::fill_n(positions.mutable_data_ptr<int64_t>() + r * k, k, base.const_data_ptr<int64_t>()[r] + level - 1);
    // eagle.models.llama.block_context (the checks the Python head makes are the kernels' here)
    const std::vector<at::Tensor> rope = llama_layers::rope_cos_sin_cpu(positions, draft_seqlens, past, k,
                                                                        doubled_inv_freq, signs, kv.scalar_type());
    const at::Tensor tokens = long_tensor(book.front_tokens, b, k, k);
    const std::vector<at::Tensor> out =
        llama_layers::eagle2_head_cpu(parent_hidden, tokens, embed_weight, fc_weight, fc_bias, weights, kv, rope[0],
                                      rope[1], draft_seqlens, mask, past, num_heads, num_kv_heads, eps, lm_head,
                                      std::nullopt);
    // expand_level: the k best children of each frontier node, then the k best of those k*k by
    // cumulative score (cum = parent score + child log-probability, ATen's float add)
    auto [child_lp, child_tok] = top_k(draft_logprobs(out[1]), k);
    const at::Tensor lp = child_lp.contiguous(), ct = child_tok.contiguous();
    const float* lpp = lp.const_data_ptr<float>();
    for (int64_t r = 0; r < b; ++r)
      for (int64_t p = 0; p < k; ++p)
        for (int64_t c = 0; c < k; ++c)
          cum[(r * k + p) * k + c] = book.front_scores[r * k + p] + lpp[(r * k + p) * k + c];
    const at::Tensor flat_scores = at::from_blob(cum.data(), {b, k * k}, root_logits.options().dtype(at::kFloat));
    auto [best_scores, best] = top_k(flat_scores, k);
    book.expand_level(level, cum.data(), ct.const_data_ptr<int64_t>(), best_scores, best);
    if (level < levels) parent_hidden = gather_rows(out[0], book.front_parent, k);
  }
  // select_candidates(score_list, token_list, parents_list, num_tokens - 1)
  const int64_t n = num_tokens;
  const std::vector<int64_t> chosen = book.select(n - 1);
  const at::Tensor selected = long_tensor(chosen, b, n - 1, n - 1);
  const at::Tensor parent_list = long_tensor(book.parents, b, k * levels + 1, book.parents_per_row());
  at::Tensor candidates = pool::empty({b, n}, at::kLong);
  {
    const at::Tensor root_long = root.to(at::kLong).contiguous();
    int64_t* c = candidates.mutable_data_ptr<int64_t>();
    for (int64_t r = 0; r < b; ++r) {
      c[r * n] = root_long.const_data_ptr<int64_t>()[r];
      for (int64_t j = 0; j < n - 1; ++j) c[r * n + 1 + j] = book.tokens[r * book.per_row + chosen[r * (n - 1) + j]];
    }
  }
  // build_tree(..., mask_mode="qlen_bool") with outputs as eagle_kernels.build_tree allocates them
  at::Tensor tree_mask = pool::empty({b, n, n}, at::kBool);
  at::Tensor positions = pool::empty({b * n}, at::kLong);
  at::Tensor retrive_index = pool::empty({b, n}, at::kLong);
  at::Tensor next_token = pool::empty({b, n}, at::kLong);
  at::Tensor next_sibling = pool::empty({b, n}, at::kLong);
  build_tree_cpu(parent_list, selected, target_seqlens, tree_mask, positions, retrive_index, next_token, next_sibling,
                 k, depth, n, kQlenBool);
  return {candidates, tree_mask, positions, retrive_index, next_token, next_sibling};
}

namespace {

const auto& compact_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("eagle_C::compact_kv_cache", "")
          .typed<at::Tensor(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op;
}

const auto& argmax_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("eagle_C::argmax_checked", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op;
}

void check_round_shapes(const char* op, const at::Tensor& logits, const at::Tensor& target_hidden,
                        const at::Tensor& candidates) {
  TORCH_CHECK_VALUE(logits.dim() == 3 && target_hidden.dim() == 3 && candidates.dim() == 2 &&
                        logits.size(0) == candidates.size(0) && logits.size(1) == candidates.size(1) &&
                        target_hidden.size(0) == candidates.size(0) && target_hidden.size(1) == candidates.size(1),
                    op, ": logits [b, n, V], target_hidden [b, n, H] and candidates [b, n] expected, got ",
                    logits.sizes(), ", ", target_hidden.sizes(), ", ", candidates.sizes());
}

// What both rounds do once the accepted path is known (eagle.speculate.SpeculativeDecoder._round after
// the verification, and _update_draft): compact the target cache, then in loops valid = arange(steps)
// <= accept_num, rows = accept_index.clamp(0), new_tokens = where(valid, predicts[rows], 0), counts =
// accept_num + 1, feats = the target's features at rows, last = counts - 1 (integer indexing and row
// copies: exact), and the head's forward over the accepted tokens.
// Returns [new_tokens, counts, new target lengths, root, root_hidden, root_logits].
std::vector<at::Tensor> commit_accepted(
    const at::Tensor& predicts, const at::Tensor& accept_index, const at::Tensor& accept_num,
    const at::Tensor& target_hidden, const at::Tensor& candidates, const at::Tensor& target_kv,
    const at::Tensor& target_seqlens, int64_t steps, const at::Tensor& embed_weight, const at::Tensor& fc_weight,
    const OptTensor& fc_bias, const c10::List<OptTensor>& weights, const at::Tensor& draft_kv,
    const at::Tensor& draft_seqlens, const at::Tensor& doubled_inv_freq, const at::Tensor& signs,
    const at::Tensor& lm_head, int64_t num_heads, int64_t num_kv_heads, double eps) {
  const int64_t b = candidates.size(0), n = candidates.size(1);
  const at::Tensor new_lengths = compact_op().call(target_kv, target_seqlens, accept_index, accept_num, n);
  const at::Tensor index = accept_index.contiguous(), num = accept_num.contiguous(), pred = predicts.contiguous();
  const int32_t* ai = index.const_data_ptr<int32_t>();
  const int32_t* an = num.const_data_ptr<int32_t>();
  const int32_t* pr = pred.const_data_ptr<int32_t>();
  std::vector<int64_t> rows(b * steps), last_rows(b);
  at::Tensor new_tokens = pool::empty({b, steps}, at::kLong), counts = pool::empty({b}, at::kLong),
             last = pool::empty({b, 1}, at::kLong);
  at::Tensor root = pool::empty({b}, at::kLong);
  int64_t* nt = new_tokens.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < b; ++r) {
    for (int64_t j = 0; j < steps; ++j) {
      rows[r * steps + j] = std::max<int64_t>(ai[r * steps + j], 0);
      nt[r * steps + j] = j <= an[r] ? pr[rows[r * steps + j]] : 0;
    }
    counts.mutable_data_ptr<int64_t>()[r] = static_cast<int64_t>(an[r]) + 1;
    last.mutable_data_ptr<int64_t>()[r] = last_rows[r] = an[r];
    root.mutable_data_ptr<int64_t>()[r] = nt[r * steps + an[r]];
  }
  const at::Tensor features = target_hidden.to(fc_weight.scalar_type());  // DraftHead.target_features
  const int64_t H = features.size(-1);
  const at::Tensor feats = gather_rows(features.reshape({1, -1, H}), rows, b * steps).view({b, steps, H});
  const std::vector<at::Tensor> rope = llama_layers::rope_cos_sin_cpu(std::nullopt, draft_seqlens, 0, steps,
                                                                      doubled_inv_freq, signs, draft_kv.scalar_type());
  const std::vector<at::Tensor> d =
      llama_layers::eagle2_head_cpu(feats, new_tokens, embed_weight, fc_weight, fc_bias, weights, draft_kv, rope[0],
                                    rope[1], draft_seqlens, std::nullopt, 0, num_heads, num_kv_heads, eps, lm_head, last);
  const at::Tensor root_hidden = gather_rows(d[0], last_rows, 1).select(1, 0);
  const at::Tensor root_logits = d[1].select(1, 0);
  return {new_tokens, counts, new_lengths, root, root_hidden, root_logits};
}

}  // namespace

// Per sequence, the first position of the accepted path whose row holds NaN/inf, int64 [b] (steps where
// none; eagle.models.generate_plain.first_nonfinite_accepted_row): position j's row gave the round's
// j-th new token, and the caller decides, after its EOS and budget cuts, whether such a token is emitted.
// logits [b, n, V], accept_index [b, steps] (flat rows of b * n, -1 past accept_num), accept_num [b],
// live: bool [b] or none (every sequence; false: a finished row the batch still computes, whose tokens
// are not emitted, gets steps).
static at::Tensor first_nonfinite_accepted_row(const at::Tensor& logits, const at::Tensor& accept_index,
                                                const at::Tensor& accept_num, const OptTensor& live) {
  const int64_t b = logits.size(0), n = logits.size(1), V = logits.size(2), steps = accept_index.size(1);
  const at::Tensor position = at::arange(steps, accept_num.options().dtype(at::kLong)).unsqueeze(0);
  at::Tensor used = position <= accept_num.to(at::kLong).unsqueeze(1);
  if (live.has_value()) used = used & live->unsqueeze(1);
  const at::Tensor rows = logits.reshape({b * n, V}).index_select(0, accept_index.to(at::kLong).clamp_min(0).reshape(-1));
  const at::Tensor bad = at::isfinite(rows).all(-1).logical_not().view({b, steps}) & used;
  return at::where(bad, position, steps).amin(-1);
}

static void check_live(const char* op, const OptTensor& live, int64_t b) {
  if (!live.has_value()) return;
  TORCH_CHECK_VALUE(live->device().is_cpu() && live->dim() == 1 && live->size(0) == b &&
                        live->scalar_type() == at::kBool,
                    op, ": live must be a CPU bool [b] = [", b, "], got ", live->scalar_type(), " ", live->sizes(),
                    " on ", live->device());
}

// The rest of a greedy round after the verify forward (eagle.speculate.SpeculativeDecoder._round from
// the target's logits on, with _update_draft and an EAGLE-1/2 head on the CPU fast path) in one call:
// argmax_checked, verify_tree_greedy, compact_kv_cache (the registered ops, as the Python calls them),
// the accepted tokens, and the draft head's forward over them (rope_cos_sin + eagle2_head, as
// Eagle2Head.forward makes it). The same numerical ops with the same arguments, and the integer
// bookkeeping between them as exact loops: the same bits. The Python between them, and then the
// small ATen calls, cost more than the ops at the bundled model's size.
//
// Returns [new_tokens [b, steps] int64, counts [b] int64, new target lengths [b] (compact_kv_cache's),
// root [b], root_hidden [b, H], root_logits [b, V], nonfinite_from]: nonfinite_from is
// first_nonfinite_accepted_row's int64 [b] where a row of the logits holds NaN/inf, else undefined
// (None); the round is committed either way (such a row's tokens come from NaN: the caller raises when
// one of them is emitted, not when it is cut at an EOS or the budget, which plain decoding never computes).
std::vector<at::Tensor> eagle2_verify_update_cpu(
    const at::Tensor& logits, const at::Tensor& target_hidden, const at::Tensor& candidates,
    const at::Tensor& retrive_index, const at::Tensor& retrive_next_token, const at::Tensor& retrive_next_sibling,
    const at::Tensor& target_kv, const at::Tensor& target_seqlens, int64_t num_spec_steps,
    const at::Tensor& embed_weight, const at::Tensor& fc_weight, const OptTensor& fc_bias,
    const c10::List<OptTensor>& weights, const at::Tensor& draft_kv, const at::Tensor& draft_seqlens,
    const at::Tensor& doubled_inv_freq, const at::Tensor& signs, const at::Tensor& lm_head, int64_t num_heads,
    int64_t num_kv_heads, double eps, const OptTensor& live) {
  check_round_shapes("eagle2_verify_update", logits, target_hidden, candidates);
  check_live("eagle2_verify_update", live, candidates.size(0));
  static const auto verify_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("eagle_C::verify_tree_greedy", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, int64_t)>();
  auto [target_predict, bad] = argmax_op().call(logits);
  auto [predicts, accept_index, accept_num] = verify_op.call(candidates, retrive_index, retrive_next_token,
                                                             retrive_next_sibling, target_predict, num_spec_steps);
  // Only the accepted path's rows count: a rejected draft token's row may hold NaN that plain decoding
  // never computes.
  const at::Tensor nonfinite_from =
      bad.item<bool>() ? first_nonfinite_accepted_row(logits, accept_index, accept_num, live) : at::Tensor();
  std::vector<at::Tensor> out = commit_accepted(
      predicts, accept_index, accept_num, target_hidden, candidates, target_kv, target_seqlens, num_spec_steps,
      embed_weight, fc_weight, fc_bias, weights, draft_kv, draft_seqlens, doubled_inv_freq, signs, lm_head, num_heads,
      num_kv_heads, eps);
  out.push_back(nonfinite_from);
  return out;
}

// The sampled counterpart (eagle.speculate.SpeculativeDecoder._round at temperature > 0):
// eagle_C::warp_logits over the b * n rows (float64 logits as float32, as SpeculativeDecoder._warp;
// NaN/inf rows as all-zero logits), the round's n + 1 uniforms of each row's stream (eagle.rng.uniforms,
// in C++: the same bits) with the draw counter advanced in place, eagle_C::tree_speculative_sampling,
// the NaN/inf positions of the accepted path's rows, then the same commit as the greedy op. Returns the
// greedy op's seven outputs and the sampling op's status words [b] (int32), or an undefined status
// where every sequence's status is 0. Where a status is set, nothing is written but `draws` (and
// nonfinite_from), and the caller raises.
std::vector<at::Tensor> eagle2_verify_update_sampled_cpu(
    const at::Tensor& logits, const at::Tensor& target_hidden, const at::Tensor& candidates,
    const at::Tensor& retrive_index, const at::Tensor& retrive_next_token, const at::Tensor& retrive_next_sibling,
    const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
    const at::Tensor& seeds, const at::Tensor& draws, const at::Tensor& target_kv, const at::Tensor& target_seqlens,
    int64_t num_spec_steps, const at::Tensor& embed_weight, const at::Tensor& fc_weight, const OptTensor& fc_bias,
    const c10::List<OptTensor>& weights, const at::Tensor& draft_kv, const at::Tensor& draft_seqlens,
    const at::Tensor& doubled_inv_freq, const at::Tensor& signs, const at::Tensor& lm_head, int64_t num_heads,
    int64_t num_kv_heads, double eps, const OptTensor& live) {
  check_round_shapes("eagle2_verify_update_sampled", logits, target_hidden, candidates);
  check_live("eagle2_verify_update_sampled", live, candidates.size(0));
  const int64_t b = candidates.size(0), n = candidates.size(1), V = logits.size(2);
  TORCH_CHECK_VALUE(draws.dim() == 1 && draws.size(0) == b && draws.scalar_type() == at::kLong && draws.is_contiguous(),
                    "eagle2_verify_update_sampled: draws must be a contiguous int64 [b] = [", b, "], got ",
                    draws.sizes(), " ", draws.scalar_type());
  static const auto warp_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("eagle_C::warp_logits", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&)>();
  static const auto sampling_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("eagle_C::tree_speculative_sampling", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t, bool, double, double)>();
  const at::Tensor bad = std::get<1>(argmax_op().call(logits));  // eagle.models.generate_plain.nonfinite_flag
  at::Tensor nonfinite_from;  // undefined: no row of the logits holds NaN/inf
  const auto finish = [&nonfinite_from](std::vector<at::Tensor> out, const at::Tensor& status) {
    out.push_back(nonfinite_from);
    out.push_back(status);
    return out;
  };
  // Only the accepted path's rows may stop the round (checked after the sampling, which reads a row only
  // once its token is accepted); meanwhile the non-finite rows are warped as all-zero logits.
  const bool any_bad = bad.item<bool>();
  const at::Tensor finite_logits =
      any_bad ? at::where(at::isfinite(logits).all(-1, true), logits, at::zeros({}, logits.options())) : logits;
  const at::Tensor flat =
      (finite_logits.scalar_type() == at::kDouble ? finite_logits.to(at::kFloat) : finite_logits).reshape({b * n, V});
  const at::Tensor probs = warp_op.call(flat, temperature, top_k, top_p, min_p).view({b, n, V});
  const at::Tensor u = rng::uniforms_cpu(seeds, draws, n + 1, at::kFloat);  // [b, n + 1]
  int64_t* draw = draws.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < b; ++r) draw[r] += 1;
  auto [predicts, accept_index, accept_num, status] =
      sampling_op.call(candidates, retrive_index, retrive_next_token, retrive_next_sibling, probs, std::nullopt,
                       u.narrow(1, 0, n).contiguous(), u.select(1, n).contiguous(), num_spec_steps, false, 1.0, 1.0);
  if (any_bad) nonfinite_from = first_nonfinite_accepted_row(logits, accept_index, accept_num, live);
  const int32_t* st = status.const_data_ptr<int32_t>();
  if (std::any_of(st, st + b, [](int32_t w) { return w != 0; })) return finish(std::vector<at::Tensor>(6), status);
  return finish(commit_accepted(predicts, accept_index, accept_num, target_hidden, candidates, target_kv,
                                target_seqlens, num_spec_steps, embed_weight, fc_weight, fc_bias, weights, draft_kv,
                                draft_seqlens, doubled_inv_freq, signs, lm_head, num_heads, num_kv_heads, eps),
                at::Tensor());
}

// The draft tree and the target's forward over it, the first two parts of a round in one call: the
// draft tree (eagle2_draft_dynamic_cpu), the target's RoPE tables at the tree's positions and its
// forward over the tree (rope_cos_sin_cpu, llama_forward_cpu: what LlamaModel.forward calls). Returns
// the draft op's outputs [candidates, mask, positions, retrive_index, next_token, next_sibling] and
// the forward's [hidden, logits].
struct DraftedRound {
  std::vector<at::Tensor> tree;
  std::vector<at::Tensor> out;
};

DraftedRound draft_and_verify_forward(
    const at::Tensor& root_logits, const at::Tensor& root_hidden, const at::Tensor& root, const at::Tensor& draft_kv,
    const at::Tensor& draft_seqlens, const at::Tensor& embed_weight, const at::Tensor& fc_weight,
    const OptTensor& fc_bias, const c10::List<OptTensor>& draft_weights, const at::Tensor& draft_doubled_inv_freq,
    const at::Tensor& draft_signs, const at::Tensor& draft_lm_head, int64_t draft_num_heads,
    int64_t draft_num_kv_heads, double draft_eps, int64_t topk, int64_t depth, int64_t num_tokens,
    const at::Tensor& target_kv, const at::Tensor& target_seqlens, const at::Tensor& target_embed_weight,
    const c10::List<OptTensor>& target_weights, const at::Tensor& target_doubled_inv_freq,
    const at::Tensor& target_signs, const at::Tensor& target_norm_weight, const at::Tensor& target_lm_head,
    int64_t target_num_heads, int64_t target_num_kv_heads, double target_eps) {
  std::vector<at::Tensor> tree = eagle2_draft_dynamic_cpu(
      root_logits, root_hidden, root, draft_seqlens, target_seqlens, embed_weight, fc_weight, fc_bias, draft_weights,
      draft_kv, draft_doubled_inv_freq, draft_signs, draft_lm_head, topk, depth, num_tokens, draft_num_heads,
      draft_num_kv_heads, draft_eps);
  const at::Tensor& candidates = tree[0];
  const int64_t b = candidates.size(0), n = candidates.size(1);
  const std::vector<at::Tensor> rope = llama_layers::rope_cos_sin_cpu(
      tree[2].view({b, n}), target_seqlens, 0, n, target_doubled_inv_freq, target_signs, target_kv.scalar_type());
  std::vector<at::Tensor> out = llama_layers::llama_forward_cpu(
      candidates, target_embed_weight, target_weights, target_kv, rope[0], rope[1], target_seqlens, tree[1], 0,
      target_num_heads, target_num_kv_heads, target_eps, {}, target_norm_weight, target_lm_head, std::nullopt);
  return {std::move(tree), std::move(out)};
}

// A whole greedy round of eagle.speculate.SpeculativeDecoder._round on the CPU fast path (EAGLE-1/2
// head, dynamic tree) in one call: draft_and_verify_forward, then the rest (eagle2_verify_update_cpu).
// The same functions with the same arguments as the three calls from Python, so the same bits; what
// it saves is the Python between them, which runs cold after each forward's weights stream through
// the caches. The caller checks both caches' room and the arguments' origins
// (eagle.speculate.SpeculativeDecoder._cpu_round). Returns eagle2_verify_update's outputs.
std::vector<at::Tensor> eagle2_round_greedy_cpu(
    const at::Tensor& root_logits, const at::Tensor& root_hidden, const at::Tensor& root, const at::Tensor& draft_kv,
    const at::Tensor& draft_seqlens, const at::Tensor& embed_weight, const at::Tensor& fc_weight,
    const OptTensor& fc_bias, const c10::List<OptTensor>& draft_weights, const at::Tensor& draft_doubled_inv_freq,
    const at::Tensor& draft_signs, const at::Tensor& draft_lm_head, int64_t draft_num_heads,
    int64_t draft_num_kv_heads, double draft_eps, int64_t topk, int64_t depth, int64_t num_tokens,
    int64_t num_spec_steps, const at::Tensor& target_kv, const at::Tensor& target_seqlens,
    const at::Tensor& target_embed_weight, const c10::List<OptTensor>& target_weights,
    const at::Tensor& target_doubled_inv_freq, const at::Tensor& target_signs, const at::Tensor& target_norm_weight,
    const at::Tensor& target_lm_head, int64_t target_num_heads, int64_t target_num_kv_heads, double target_eps,
    const OptTensor& live) {
  check_live("eagle2_round_greedy", live, root.size(0));
  const DraftedRound r = draft_and_verify_forward(
      root_logits, root_hidden, root, draft_kv, draft_seqlens, embed_weight, fc_weight, fc_bias, draft_weights,
      draft_doubled_inv_freq, draft_signs, draft_lm_head, draft_num_heads, draft_num_kv_heads, draft_eps, topk, depth,
      num_tokens, target_kv, target_seqlens, target_embed_weight, target_weights, target_doubled_inv_freq,
      target_signs, target_norm_weight, target_lm_head, target_num_heads, target_num_kv_heads, target_eps);
  return eagle2_verify_update_cpu(r.out[1], r.out[0], r.tree[0], r.tree[3], r.tree[4], r.tree[5], target_kv,
                                  target_seqlens, num_spec_steps, embed_weight, fc_weight, fc_bias, draft_weights,
                                  draft_kv, draft_seqlens, draft_doubled_inv_freq, draft_signs, draft_lm_head,
                                  draft_num_heads, draft_num_kv_heads, draft_eps, live);
}

// The sampled counterpart: draft_and_verify_forward, then eagle2_verify_update_sampled_cpu with the
// warper's per-row parameters over the b * n tree rows and each row's (seed, draws) stream (draws
// advanced in place). Returns eagle2_verify_update_sampled's outputs (nonfinite_from and the status included).
std::vector<at::Tensor> eagle2_round_sampled_cpu(
    const at::Tensor& root_logits, const at::Tensor& root_hidden, const at::Tensor& root, const at::Tensor& draft_kv,
    const at::Tensor& draft_seqlens, const at::Tensor& embed_weight, const at::Tensor& fc_weight,
    const OptTensor& fc_bias, const c10::List<OptTensor>& draft_weights, const at::Tensor& draft_doubled_inv_freq,
    const at::Tensor& draft_signs, const at::Tensor& draft_lm_head, int64_t draft_num_heads,
    int64_t draft_num_kv_heads, double draft_eps, int64_t topk, int64_t depth, int64_t num_tokens,
    int64_t num_spec_steps, const at::Tensor& target_kv, const at::Tensor& target_seqlens,
    const at::Tensor& target_embed_weight, const c10::List<OptTensor>& target_weights,
    const at::Tensor& target_doubled_inv_freq, const at::Tensor& target_signs, const at::Tensor& target_norm_weight,
    const at::Tensor& target_lm_head, int64_t target_num_heads, int64_t target_num_kv_heads, double target_eps,
    const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
    const at::Tensor& seeds, const at::Tensor& draws, const OptTensor& live) {
  check_live("eagle2_round_sampled", live, root.size(0));
  const DraftedRound r = draft_and_verify_forward(
      root_logits, root_hidden, root, draft_kv, draft_seqlens, embed_weight, fc_weight, fc_bias, draft_weights,
      draft_doubled_inv_freq, draft_signs, draft_lm_head, draft_num_heads, draft_num_kv_heads, draft_eps, topk, depth,
      num_tokens, target_kv, target_seqlens, target_embed_weight, target_weights, target_doubled_inv_freq,
      target_signs, target_norm_weight, target_lm_head, target_num_heads, target_num_kv_heads, target_eps);
  return eagle2_verify_update_sampled_cpu(
      r.out[1], r.out[0], r.tree[0], r.tree[3], r.tree[4], r.tree[5], temperature, top_k, top_p, min_p, seeds, draws,
      target_kv, target_seqlens, num_spec_steps, embed_weight, fc_weight, fc_bias, draft_weights, draft_kv,
      draft_seqlens, draft_doubled_inv_freq, draft_signs, draft_lm_head, draft_num_heads, draft_num_kv_heads,
      draft_eps, live);
}

}  // namespace draft_tree
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "eagle2_draft_dynamic(Tensor root_logits, Tensor root_hidden, Tensor root, Tensor draft_seqlens, "
      "Tensor target_seqlens, Tensor embed_weight, Tensor fc_weight, Tensor? fc_bias, Tensor?[] weights, "
      "Tensor(a!) kv, Tensor doubled_inv_freq, Tensor signs, Tensor lm_head, int topk, int depth, int num_tokens, "
      "int num_heads, int num_kv_heads, float eps) -> Tensor[]");
}

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "eagle2_verify_update(Tensor logits, Tensor target_hidden, Tensor candidates, Tensor retrive_index, "
      "Tensor retrive_next_token, Tensor retrive_next_sibling, Tensor(a!) target_kv, Tensor target_seqlens, "
      "int num_spec_steps, Tensor embed_weight, Tensor fc_weight, Tensor? fc_bias, Tensor?[] weights, "
      "Tensor(b!) draft_kv, Tensor draft_seqlens, Tensor doubled_inv_freq, Tensor signs, Tensor lm_head, "
      "int num_heads, int num_kv_heads, float eps, Tensor? live=None) -> Tensor[]");
  m.def(
      "eagle2_verify_update_sampled(Tensor logits, Tensor target_hidden, Tensor candidates, Tensor retrive_index, "
      "Tensor retrive_next_token, Tensor retrive_next_sibling, Tensor temperature, Tensor top_k, Tensor top_p, "
      "Tensor min_p, Tensor seeds, Tensor(c!) draws, Tensor(a!) target_kv, Tensor target_seqlens, "
      "int num_spec_steps, Tensor embed_weight, Tensor fc_weight, Tensor? fc_bias, Tensor?[] weights, "
      "Tensor(b!) draft_kv, Tensor draft_seqlens, Tensor doubled_inv_freq, Tensor signs, Tensor lm_head, "
      "int num_heads, int num_kv_heads, float eps, Tensor? live=None) -> Tensor[]");
}

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "eagle2_round_greedy(Tensor root_logits, Tensor root_hidden, Tensor root, Tensor(a!) draft_kv, "
      "Tensor draft_seqlens, Tensor embed_weight, Tensor fc_weight, Tensor? fc_bias, Tensor?[] draft_weights, "
      "Tensor draft_doubled_inv_freq, Tensor draft_signs, Tensor draft_lm_head, int draft_num_heads, "
      "int draft_num_kv_heads, float draft_eps, int topk, int depth, int num_tokens, int num_spec_steps, "
      "Tensor(b!) target_kv, Tensor target_seqlens, Tensor target_embed_weight, Tensor?[] target_weights, "
      "Tensor target_doubled_inv_freq, Tensor target_signs, Tensor target_norm_weight, Tensor target_lm_head, "
      "int target_num_heads, int target_num_kv_heads, float target_eps, Tensor? live=None) -> Tensor[]");
  m.def(
      "eagle2_round_sampled(Tensor root_logits, Tensor root_hidden, Tensor root, Tensor(a!) draft_kv, "
      "Tensor draft_seqlens, Tensor embed_weight, Tensor fc_weight, Tensor? fc_bias, Tensor?[] draft_weights, "
      "Tensor draft_doubled_inv_freq, Tensor draft_signs, Tensor draft_lm_head, int draft_num_heads, "
      "int draft_num_kv_heads, float draft_eps, int topk, int depth, int num_tokens, int num_spec_steps, "
      "Tensor(b!) target_kv, Tensor target_seqlens, Tensor target_embed_weight, Tensor?[] target_weights, "
      "Tensor target_doubled_inv_freq, Tensor target_signs, Tensor target_norm_weight, Tensor target_lm_head, "
      "int target_num_heads, int target_num_kv_heads, float target_eps, Tensor temperature, Tensor top_k, "
      "Tensor top_p, Tensor min_p, Tensor seeds, Tensor(c!) draws, Tensor? live=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) {
  m.impl("eagle2_round_greedy", &eagle::draft_tree::eagle2_round_greedy_cpu);
  m.impl("eagle2_round_sampled", &eagle::draft_tree::eagle2_round_sampled_cpu);
  m.impl("eagle2_draft_dynamic", &eagle::draft_tree::eagle2_draft_dynamic_cpu);
  m.impl("eagle2_verify_update", &eagle::draft_tree::eagle2_verify_update_cpu);
  m.impl("eagle2_verify_update_sampled", &eagle::draft_tree::eagle2_verify_update_sampled_cpu);
}
TORCH_LIBRARY_IMPL(eagle_C, MkldnnCPU, m) {
  m.impl("eagle2_round_greedy", &eagle::draft_tree::eagle2_round_greedy_cpu);
  m.impl("eagle2_round_sampled", &eagle::draft_tree::eagle2_round_sampled_cpu);
  m.impl("eagle2_draft_dynamic", &eagle::draft_tree::eagle2_draft_dynamic_cpu);
  m.impl("eagle2_verify_update", &eagle::draft_tree::eagle2_verify_update_cpu);
  m.impl("eagle2_verify_update_sampled", &eagle::draft_tree::eagle2_verify_update_sampled_cpu);
}
