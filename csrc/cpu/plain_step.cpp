// llama_decode_step: one step of plain decoding (eagle.models.generate_plain.plain_decode_steps) on the
// CPU fast path in one call.
//
// A step from Python is the target's forward (LlamaModel.forward: its checks, the RoPE tables, then
// eagle_C::llama_forward), the cache's advance, the pick (eagle_C::argmax_checked, or the NaN/inf
// flag, eagle_C::warp_logits, the row's next uniform and eagle_C::inverse_cdf) and the next input's
// copy: a dozen Python-level calls, each run cold after the forward's weights streamed through the
// caches. This makes them one, with the same C++ functions and arguments, so the same bits:
//   positions = seqlens[b] (a one-token block, no tree mask), rope_cos_sin_cpu, llama_forward_cpu
//   (logits of the one row), seqlens += 1, then greedy: argmax_checked -> token, nonfinite |= flag;
//   sampled: nonfinite |= flag (set: the argmax is returned, nothing drawn; the caller raises),
//   where with `live` (bool [B]) only live rows count (the others' non-finite rows warped as zeros),
//   warp_logits (float64 logits as float32), uniforms_cpu (one float32
//   per row from (seed, draws)), draws += 1, inverse_cdf_cpu. step_input <- token.
// Returns [token [B] int64 (a new tensor), hidden [B, 1, H] after the final norm (the feature an EAGLE-1/2
// draft reads: speculative="auto"'s plain steps keep it)]. The caller gathers the arguments once per
// run (generate_plain.py: _cpu_decode_step; speculate.py: SpeculativeDecoder._plain_step) and keeps the
// Python cache's length bound.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "llama_layers.h"
#include "rng.h"

namespace eagle {
namespace plain_step {

using OptTensor = std::optional<at::Tensor>;

namespace {

const auto& argmax_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("eagle_C::argmax_checked", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op;
}

const auto& warp_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("eagle_C::warp_logits", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&)>();
  return op;
}

void check_row_tensor(const char* name, const at::Tensor& t, int64_t B, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 1 && t.size(0) == B && t.scalar_type() == dtype &&
                        t.is_contiguous(),
                    "llama_decode_step: ", name, " must be a contiguous CPU ", dtype, " tensor [", B, "], got ",
                    t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

}  // namespace

std::vector<at::Tensor> llama_decode_step_cpu(const at::Tensor& step_input, const at::Tensor& embed_weight,
                                 const c10::List<OptTensor>& weights, const at::Tensor& kv,
                                 const at::Tensor& cache_seqlens, const at::Tensor& doubled_inv_freq,
                                 const at::Tensor& signs, int64_t num_heads, int64_t num_kv_heads, double eps,
                                 const at::Tensor& norm_weight, const at::Tensor& lm_head, const at::Tensor& nonfinite,
                                 const OptTensor& temperature, const OptTensor& top_k, const OptTensor& top_p,
                                 const OptTensor& min_p, const OptTensor& seeds, const OptTensor& draws,
                                 const OptTensor& live) {
  TORCH_CHECK_VALUE(kv.dim() == 6, "llama_decode_step: kv must be [L, 2, B, Hkv, S_max, D], got ", kv.sizes());
  const int64_t B = kv.size(2), S_max = kv.size(4);
  check_row_tensor("step_input", step_input, B, at::kLong);
  check_row_tensor("cache_seqlens", cache_seqlens, B, at::kInt);
  TORCH_CHECK_VALUE(nonfinite.device().is_cpu() && nonfinite.dim() == 0 && nonfinite.scalar_type() == at::kBool,
                    "llama_decode_step: nonfinite must be a CPU bool scalar, got ", nonfinite.scalar_type(), " ",
                    nonfinite.sizes());
  const bool sampled = temperature.has_value();
  TORCH_CHECK_VALUE(sampled == (top_k.has_value() && top_p.has_value() && min_p.has_value() && seeds.has_value() &&
                                draws.has_value()),
                    "llama_decode_step: pass all of temperature, top_k, top_p, min_p, seeds and draws, or none");
  if (live.has_value()) check_row_tensor("live", *live, B, at::kBool);
  if (sampled) {
    check_row_tensor("seeds", *seeds, B, at::kLong);
    check_row_tensor("draws", *draws, B, at::kLong);
  }
  int32_t* lengths = cache_seqlens.mutable_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lengths[b] >= 0 && lengths[b] < S_max, "KV cache overflow: 1 new token does not fit max_seq_len=",
                      S_max, " for sequence ", b, " with length ", lengths[b], "; allocate a longer cache");
  }
  const std::vector<at::Tensor> rope = llama_layers::rope_cos_sin_cpu(std::nullopt, cache_seqlens, 0, 1,
                                                                      doubled_inv_freq, signs, kv.scalar_type());
  const std::vector<at::Tensor> out = llama_layers::llama_forward_cpu(
      step_input.view({B, 1}), embed_weight, weights, kv, rope[0], rope[1], cache_seqlens, std::nullopt, 0, num_heads,
      num_kv_heads, eps, {}, norm_weight, lm_head, std::nullopt);
  at::Tensor logits = out[1].select(1, 0);  // [B, V]
  auto [argmax, bad] = argmax_op().call(logits);
  bool nan_or_inf = bad.item<bool>();
  if (nan_or_inf && live.has_value()) {
    // Only live rows count: a finished row the batch still computes (its tokens are not emitted) may
    // hold NaN/inf; it is warped as all-zero logits, as eagle.speculate's Python step does.
    const at::Tensor finite_rows = at::isfinite(logits).all(-1);
    nan_or_inf = (finite_rows.logical_not() & *live).any().item<bool>();
    if (!nan_or_inf && sampled) logits = at::where(finite_rows.unsqueeze(1), logits, at::zeros({}, logits.options()));
  }
  bool* flag = nonfinite.mutable_data_ptr<bool>();
  *flag = *flag || nan_or_inf;
  at::Tensor token;
  if (!sampled || nan_or_inf) {  // NaN/inf: nothing to sample from (the caller raises; draws stay)
    token = argmax;
  } else {
    const at::Tensor probs = warp_op().call(logits.scalar_type() == at::kDouble ? logits.to(at::kFloat) : logits,
                                            *temperature, *top_k, *top_p, *min_p);
    const at::Tensor u = rng::uniforms_cpu(*seeds, *draws, 1, at::kFloat).select(1, 0);
    int64_t* draw = draws->mutable_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) draw[b] += 1;
    token = rng::inverse_cdf_cpu(probs, u);
  }
  // Committed only now: a step that raised above (bad sampling arguments) leaves the lengths, the
  // input and the draws as they were (the K/V row it wrote sits past the committed length).
  for (int64_t b = 0; b < B; ++b) lengths[b] += 1;
  step_input.copy_(token);
  return {token, out[0]};
}

}  // namespace plain_step
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "llama_decode_step(Tensor(a!) step_input, Tensor embed_weight, Tensor?[] weights, Tensor(b!) kv, "
      "Tensor(c!) cache_seqlens, Tensor doubled_inv_freq, Tensor signs, int num_heads, int num_kv_heads, float eps, "
      "Tensor norm_weight, Tensor lm_head, Tensor(d!) nonfinite, Tensor? temperature=None, Tensor? top_k=None, "
      "Tensor? top_p=None, Tensor? min_p=None, Tensor? seeds=None, Tensor(e!)? draws=None, Tensor? live=None) -> "
      "Tensor[]");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) { m.impl("llama_decode_step", &eagle::plain_step::llama_decode_step_cpu); }
// Packed (mkldnn-layout) weights in the list make the dispatcher pick this key; same CPU kernel.
TORCH_LIBRARY_IMPL(eagle_C, MkldnnCPU, m) { m.impl("llama_decode_step", &eagle::plain_step::llama_decode_step_cpu); }
