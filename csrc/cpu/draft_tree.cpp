// Two ops of the CPU decoding loop with an EAGLE-1/2 head: eagle2_draft_dynamic (below) and
// eagle2_verify_update (the greedy rest of a round after the verify forward, further down).
//
// eagle2_draft_dynamic: one EAGLE-2 dynamic draft tree (eagle.speculate.SpeculativeDecoder._draft_dynamic
// with an EAGLE-1/2 head on the CPU fast path) in one C++ call.
//
// It makes the ATen calls of the Python loop (eagle/tree.py: expand_root, expand_level,
// select_candidates; eagle/models/draft.py: the head forward through eagle2_head; build_tree), in the
// same order, with the same shapes and arguments, so the tree (and everything decoded from it) is the
// same bit for bit; only the Python between them goes. A draft level of a small model costs less
// than that Python did.
//
// Returns [candidates [b, n] int64, tree_mask [b, n, n] bool, positions [b*n] int64,
//          retrive_index, retrive_next_token, retrive_next_sibling [b, n] int64].
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "build_tree.h"
#include "llama_layers.h"

#include <vector>

namespace eagle {
namespace draft_tree {

using llama_layers::OptTensor;

namespace {

// eagle.speculate.SpeculativeDecoder._draft_logprobs
at::Tensor draft_logprobs(const at::Tensor& logits) { return at::log_softmax(logits.to(at::kFloat), -1); }

struct Frontier {  // eagle.tree.Frontier
  at::Tensor tokens, scores, parent_rows, flat_index;
};

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
  const int64_t b = root_logits.size(0), k = topk, H = root_hidden.size(1);
  const auto i64 = root.options().dtype(at::kLong);

  // expand_root
  auto [scores, tokens] = at::topk(draft_logprobs(root_logits), k, -1);
  const at::Tensor index = at::arange(k, i64).expand({b, k});
  Frontier frontier{tokens, scores, at::zeros_like(index), index};
  std::vector<at::Tensor> score_list{scores}, token_list{tokens};
  std::vector<at::Tensor> parents_list{at::arange(-1, k, i64).expand({b, k + 1})};

  const at::Tensor base_pos = draft_seqlens.to(at::kLong).unsqueeze(1);
  at::Tensor fed_mask;  // [b, T, T] ancestor mask of the tree rows fed to the draft so far
  at::Tensor parent_hidden = root_hidden.unsqueeze(1).expand({b, k, H});
  const at::Tensor eye = at::eye(k, root.options().dtype(at::kBool)).expand({b, k, k});
  for (int64_t level = 1; level < depth; ++level) {
    const at::Tensor positions = (base_pos + (level - 1)).expand({b, k});
    int64_t past = 0;
    at::Tensor rows_mask;
    if (!fed_mask.defined()) {
      rows_mask = eye, fed_mask = eye;
    } else {
      past = fed_mask.size(1);
      const at::Tensor parent_rows = frontier.parent_rows + (past - k);
      rows_mask = at::cat({fed_mask.gather(1, parent_rows.unsqueeze(-1).expand({b, k, past})), eye}, 2);
      const at::Tensor zeros = at::zeros({b, past, k}, eye.options());
      fed_mask = at::cat({at::cat({fed_mask, zeros}, 2), rows_mask}, 1);
    }
    // eagle.models.llama.block_context (the checks the Python head makes are the kernels' here)
    const std::vector<at::Tensor> rope = llama_layers::rope_cos_sin_cpu(positions, draft_seqlens, past, k,
                                                                        doubled_inv_freq, signs, kv.scalar_type());
    at::Tensor mask = rows_mask;
    if (past) {
      const int64_t width = past + k;
      const at::Tensor earlier = at::eye(past, width, eye.options()).expand({b, past, width});
      mask = at::cat({earlier, rows_mask}, 1);
    }
    const std::vector<at::Tensor> out =
        llama_layers::eagle2_head_cpu(parent_hidden, frontier.tokens, embed_weight, fc_weight, fc_bias, weights, kv,
                                      rope[0], rope[1], draft_seqlens, mask, past, num_heads, num_kv_heads, eps,
                                      lm_head, std::nullopt);
    const at::Tensor logp = draft_logprobs(out[1]);
    // expand_level(frontier, logp, level + 1, k)
    auto [child_lp, child_tok] = at::topk(logp, k, -1);
    const at::Tensor cum = frontier.scores.unsqueeze(2) + child_lp;
    const at::Tensor flat_scores = cum.reshape({b, k * k}), flat_tokens = child_tok.reshape({b, k * k});
    auto [best_scores, best] = at::topk(flat_scores, k, -1);
    const int64_t level_offset = k + (level - 1) * k * k;
    frontier = Frontier{flat_tokens.gather(1, best), best_scores, at::div(best, k, "floor"), best + level_offset};
    parent_hidden = out[0].gather(1, frontier.parent_rows.unsqueeze(-1).expand({-1, -1, out[0].size(-1)}));
    score_list.push_back(flat_scores);
    token_list.push_back(flat_tokens);
    parents_list.push_back(frontier.flat_index);
  }
  // select_candidates(score_list, token_list, parents_list, num_tokens - 1)
  const at::Tensor all_scores = at::cat(score_list, 1), all_tokens = at::cat(token_list, 1);
  // (the optional<bool> spells the stable overload: a plain `true` would bind to sort(self, dim, descending))
  const at::Tensor order =
      std::get<1>(at::sort(all_scores.neg(), std::optional<bool>(true), /*dim=*/-1, /*descending=*/false));
  const at::Tensor selected =
      std::get<0>(at::sort(order.slice(1, 0, num_tokens - 1), /*dim=*/-1, /*descending=*/false));
  const at::Tensor parent_list = at::cat(parents_list, 1).slice(1, 0, k * (depth - 1) + 1);
  const at::Tensor draft_tokens = all_tokens.gather(1, selected);
  const at::Tensor candidates = at::cat({root.unsqueeze(1), draft_tokens}, 1);
  // build_tree(..., mask_mode="qlen_bool") with outputs as eagle_kernels.build_tree allocates them
  const int64_t n = num_tokens;
  at::Tensor tree_mask = at::empty({b, n, n}, eye.options());
  at::Tensor positions = at::empty({b * n}, i64);
  at::Tensor retrive_index = at::empty({b, n}, selected.options());
  at::Tensor next_token = at::empty({b, n}, selected.options());
  at::Tensor next_sibling = at::empty({b, n}, selected.options());
  build_tree_cpu(parent_list, selected, target_seqlens, tree_mask, positions, retrive_index, next_token, next_sibling,
                 k, depth, n, kQlenBool);
  return {candidates, tree_mask, positions, retrive_index, next_token, next_sibling};
}

// The rest of a greedy round after the verify forward (eagle.speculate.SpeculativeDecoder._round from
// the target's logits on, with _update_draft and an EAGLE-1/2 head on the CPU fast path) in one call:
// argmax_checked, verify_tree_greedy, compact_kv_cache (the registered ops, as the Python calls them),
// the accepted tokens, and the draft head's forward over them (rope_cos_sin + eagle2_head, as
// Eagle2Head.forward makes it). Same ops, same arguments, same order: the same bits. The Python
// between them cost more than the ops at the bundled model's size.
//
// Returns [new_tokens [b, steps] int64, counts [b] int64, new target lengths [b] (compact_kv_cache's),
// root [b], root_hidden [b, H], root_logits [b, V], nonfinite (bool scalar)]. When the logits hold
// NaN/inf nothing is written (no cache, no output but the flag): the caller raises.
std::vector<at::Tensor> eagle2_verify_update_cpu(
    const at::Tensor& logits, const at::Tensor& target_hidden, const at::Tensor& candidates,
    const at::Tensor& retrive_index, const at::Tensor& retrive_next_token, const at::Tensor& retrive_next_sibling,
    const at::Tensor& target_kv, const at::Tensor& target_seqlens, int64_t num_spec_steps,
    const at::Tensor& embed_weight, const at::Tensor& fc_weight, const OptTensor& fc_bias,
    const c10::List<OptTensor>& weights, const at::Tensor& draft_kv, const at::Tensor& draft_seqlens,
    const at::Tensor& doubled_inv_freq, const at::Tensor& signs, const at::Tensor& lm_head, int64_t num_heads,
    int64_t num_kv_heads, double eps) {
  TORCH_CHECK_VALUE(logits.dim() == 3 && target_hidden.dim() == 3 && candidates.dim() == 2 &&
                        logits.size(0) == candidates.size(0) && logits.size(1) == candidates.size(1) &&
                        target_hidden.size(0) == candidates.size(0) && target_hidden.size(1) == candidates.size(1),
                    "eagle2_verify_update: logits [b, n, V], target_hidden [b, n, H] and candidates [b, n] expected, "
                    "got ", logits.sizes(), ", ", target_hidden.sizes(), ", ", candidates.sizes());
  static const auto argmax_op = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("eagle_C::argmax_checked", "")
                                    .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  static const auto verify_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("eagle_C::verify_tree_greedy", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, int64_t)>();
  static const auto compact_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("eagle_C::compact_kv_cache", "")
          .typed<at::Tensor(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  const int64_t b = candidates.size(0), n = candidates.size(1), steps = num_spec_steps;

  auto [target_predict, bad] = argmax_op.call(logits);
  if (bad.item<bool>()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), bad};
  auto [predicts, accept_index, accept_num] =
      verify_op.call(candidates, retrive_index, retrive_next_token, retrive_next_sibling, target_predict, steps);
  const at::Tensor new_lengths = compact_op.call(target_kv, target_seqlens, accept_index, accept_num, n);

  const auto i64 = candidates.options().dtype(at::kLong);
  const at::Tensor valid = at::arange(steps, i64).unsqueeze(0) <= accept_num.unsqueeze(1).to(at::kLong);
  const at::Tensor rows = accept_index.to(at::kLong).clamp(0);
  const at::Tensor new_tokens = at::where(valid, predicts.to(at::kLong).index({rows}), 0);
  const at::Tensor counts = accept_num.to(at::kLong) + 1;

  // _update_draft: the target feature at each accepted node with the token that follows it
  const at::Tensor features = target_hidden.to(fc_weight.scalar_type());  // DraftHead.target_features
  const int64_t H = features.size(-1);
  const at::Tensor feats = features.reshape({-1, H}).index({rows.reshape({-1})}).view({b, steps, H});
  const at::Tensor last = (counts - 1).unsqueeze(1);
  const std::vector<at::Tensor> rope = llama_layers::rope_cos_sin_cpu(std::nullopt, draft_seqlens, 0, steps,
                                                                      doubled_inv_freq, signs, draft_kv.scalar_type());
  const std::vector<at::Tensor> d =
      llama_layers::eagle2_head_cpu(feats, new_tokens, embed_weight, fc_weight, fc_bias, weights, draft_kv, rope[0],
                                    rope[1], draft_seqlens, std::nullopt, 0, num_heads, num_kv_heads, eps, lm_head, last);
  const at::Tensor root_hidden = d[0].gather(1, last.unsqueeze(-1).expand({b, 1, H})).select(1, 0);
  const at::Tensor root_logits = d[1].select(1, 0);
  const at::Tensor root = new_tokens.gather(1, last).select(1, 0);
  return {new_tokens, counts, new_lengths, root, root_hidden, root_logits, bad};
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
      "int num_heads, int num_kv_heads, float eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) {
  m.impl("eagle2_draft_dynamic", &eagle::draft_tree::eagle2_draft_dynamic_cpu);
  m.impl("eagle2_verify_update", &eagle::draft_tree::eagle2_verify_update_cpu);
}
TORCH_LIBRARY_IMPL(eagle_C, MkldnnCPU, m) {
  m.impl("eagle2_draft_dynamic", &eagle::draft_tree::eagle2_draft_dynamic_cpu);
  m.impl("eagle2_verify_update", &eagle::draft_tree::eagle2_verify_update_cpu);
}
