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

}  // namespace draft_tree
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "eagle2_draft_dynamic(Tensor root_logits, Tensor root_hidden, Tensor root, Tensor draft_seqlens, "
      "Tensor target_seqlens, Tensor embed_weight, Tensor fc_weight, Tensor? fc_bias, Tensor?[] weights, "
      "Tensor(a!) kv, Tensor doubled_inv_freq, Tensor signs, Tensor lm_head, int topk, int depth, int num_tokens, "
      "int num_heads, int num_kv_heads, float eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) { m.impl("eagle2_draft_dynamic", &eagle::draft_tree::eagle2_draft_dynamic_cpu); }
TORCH_LIBRARY_IMPL(eagle_C, MkldnnCPU, m) {
  m.impl("eagle2_draft_dynamic", &eagle::draft_tree::eagle2_draft_dynamic_cpu);
}
