// llama_layers: a stack of Llama decoder layers on the in-place KV cache, for CPU tensors, in C++.
//
// The op runs exactly the ATen calls of the Python modules in eagle/models/llama.py (RMSNorm,
// Attention, MLP, DecoderLayer), in the same order and with the same arguments, so its results are
// bit-identical to the Python path; only the Python and per-op Python-binding overhead (~5 us per op,
// ~25 ops per layer) disappears. The attention calls the tree_attention CPU kernel directly (the model
// has already validated the block; the kernel re-checks shapes and lengths itself).
//
// weights holds kSlotsPerLayer optional tensors per layer, in the order of the Slot enum. A missing
// input_layernorm means the layer's attention reads its input directly (EAGLE-1/2 head);
// `attn_input` (one layer only) replaces the attention input altogether (EAGLE-3 midlayer, whose
// input is cat(input_layernorm(emb), hidden_norm(h)) while the residual stream is h).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "amx_linear.h"

#include <cmath>
#include <optional>
#include <vector>

namespace eagle {
namespace tree_attn {
// Defined in tree_attention.cpp (same extension library).
at::Tensor tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& tree_mask,
                              double sm_scale);
}  // namespace tree_attn

namespace rms {
// Defined in rms_norm.cpp.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
}  // namespace rms

namespace llama_layers {

enum Slot : int64_t {
  kInputNorm = 0,
  kQkvWeight,
  kQkvBias,
  kQNorm,
  kKNorm,
  kOWeight,
  kOBias,
  kPostNorm,
  kGateUpWeight,
  kGateUpBias,
  kDownWeight,
  kDownBias,
  kSlotsPerLayer,
};

using OptTensor = std::optional<at::Tensor>;

struct Block {
  at::Tensor kv;  // [L, 2, B, Hkv, S_max, D]
  at::Tensor cos, sin;  // [B, T, 1, D], the model dtype
  at::Tensor kv_rows;  // [B*T*Hkv] int64
  at::Tensor seqlens;  // [B] int32
  OptTensor tree_mask;  // [B, past+T, past+T] bool
  int64_t past, Hq, Hkv, D;
  double eps, sm_scale;
};

// eagle.models.llama.RMSNorm.forward (rms_norm.cpp, which the module calls too outside autograd)
using rms::rms_norm;

at::Tensor rotate(const at::Tensor& x, const Block& blk) {  // eagle.models.llama.apply_rope
  return x * blk.cos + x.roll({x.size(-1) / 2}, {-1}) * blk.sin;
}

// at::linear, or for a packed copy made by eagle/models/cpu_packed.py what its linear() calls: the
// AMX kernel for a weight in tiles, oneDNN's linear for an mkldnn-layout weight.
at::Tensor project(const at::Tensor& x, const at::Tensor& w, const OptTensor& b) {
  if (amx::is_tiled_weight(w)) return amx::linear_bf16(x, w, b);
  if (!w.is_mkldnn()) return at::linear(x, w, b);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, b, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                                 std::optional<std::string>(std::string())};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

OptTensor slot(const c10::List<OptTensor>& weights, int64_t layer, Slot s) {
  return weights.get(layer * kSlotsPerLayer + s);
}

// eagle.models.llama.Attention.forward (project + cache write + tree attention + o_proj)
at::Tensor attention(const at::Tensor& x, const c10::List<OptTensor>& weights, int64_t layer, const Block& blk) {
  const int64_t B = x.size(0), T = x.size(1), Hq = blk.Hq, Hkv = blk.Hkv, D = blk.D;
  const at::Tensor qkv = project(x, *slot(weights, layer, kQkvWeight), slot(weights, layer, kQkvBias));
  auto parts = qkv.view({B, T, Hq + 2 * Hkv, D}).split_with_sizes({Hq + Hkv, Hkv}, 2);
  at::Tensor qk = parts[0], v = parts[1];
  const OptTensor q_norm = slot(weights, layer, kQNorm);
  if (q_norm.has_value()) {
    auto qk_parts = qk.split_with_sizes({Hq, Hkv}, 2);
    qk = at::cat({rms_norm(qk_parts[0], *q_norm, blk.eps),
                  rms_norm(qk_parts[1], *slot(weights, layer, kKNorm), blk.eps)},
                 2);
  }
  auto rotated = rotate(qk, blk).split_with_sizes({Hq, Hkv}, 2);
  at::Tensor q = rotated[0], k = rotated[1];
  const at::Tensor k_cache = blk.kv.select(0, layer).select(0, 0);
  const at::Tensor v_cache = blk.kv.select(0, layer).select(0, 1);
  k_cache.view({-1, D}).index_copy_(0, blk.kv_rows, k.reshape({-1, D}));
  v_cache.view({-1, D}).index_copy_(0, blk.kv_rows, v.reshape({-1, D}));
  if (blk.past) q = at::cat({q.new_zeros({B, blk.past, q.size(2), q.size(3)}), q}, 1);
  const at::Tensor out = tree_attn::tree_attention_cpu(q, k_cache, v_cache, blk.seqlens, blk.tree_mask, blk.sm_scale);
  return project(out.slice(1, blk.past).reshape({B, T, -1}), *slot(weights, layer, kOWeight),
                    slot(weights, layer, kOBias));
}

// eagle.models.llama.MLP.forward
at::Tensor mlp(const at::Tensor& x, const c10::List<OptTensor>& weights, int64_t layer) {
  const at::Tensor gate_up_w = *slot(weights, layer, kGateUpWeight);
  const int64_t inter = (amx::is_tiled_weight(gate_up_w) ? gate_up_w.size(0) * 16 : gate_up_w.size(0)) / 2;
  auto gate_up = project(x, gate_up_w, slot(weights, layer, kGateUpBias)).split(inter, -1);
  return project(at::silu(gate_up[0]) * gate_up[1], *slot(weights, layer, kDownWeight),
                    slot(weights, layer, kDownBias));
}

// eagle.models.llama.DecoderLayer.forward (Eagle2Layer without input_layernorm; Eagle3Layer with
// attn_input).
at::Tensor decoder_layer(const at::Tensor& x, const OptTensor& attn_input, const c10::List<OptTensor>& weights,
                         int64_t layer, const Block& blk) {
  const OptTensor in_norm = slot(weights, layer, kInputNorm);
  at::Tensor a;
  if (attn_input.has_value()) {
    a = *attn_input;
  } else if (in_norm.has_value()) {
    a = rms_norm(x, *in_norm, blk.eps);
  } else {
    a = x;
  }
  const at::Tensor h = x + attention(a, weights, layer, blk);
  return h + mlp(rms_norm(h, *slot(weights, layer, kPostNorm), blk.eps), weights, layer);
}

void check_args(const at::Tensor& x, const OptTensor& attn_input, const c10::List<OptTensor>& weights,
                const at::Tensor& kv, int64_t num_heads, int64_t num_kv_heads, at::IntArrayRef capture) {
  TORCH_CHECK_VALUE(x.dim() == 3, "llama_layers: x must be [B, T, H], got ", x.sizes());
  TORCH_CHECK_VALUE(kv.dim() == 6 && kv.size(2) == x.size(0) && kv.size(3) == num_kv_heads,
                    "llama_layers: kv must be [L, 2, B, Hkv, S_max, D] with B=", x.size(0), ", Hkv=", num_kv_heads,
                    ", got ", kv.sizes());
  TORCH_CHECK_VALUE(kv.is_contiguous(), "llama_layers: kv must be contiguous");
  TORCH_CHECK_VALUE(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
                    "llama_layers: num_heads=", num_heads, " must be a positive multiple of num_kv_heads=",
                    num_kv_heads);
  const int64_t n = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(n > 0 && n % kSlotsPerLayer == 0, "llama_layers: weights must hold ", kSlotsPerLayer,
                    " entries per layer, got ", n);
  const int64_t layers = n / kSlotsPerLayer;
  TORCH_CHECK_VALUE(layers <= kv.size(0), "llama_layers: ", layers, " layers but the cache has ", kv.size(0));
  TORCH_CHECK_VALUE(!attn_input.has_value() || layers == 1, "llama_layers: attn_input needs exactly one layer");
  for (int64_t i = 0; i < layers; ++i) {
    for (Slot s : {kQkvWeight, kOWeight, kPostNorm, kGateUpWeight, kDownWeight}) {
      TORCH_CHECK_VALUE(weights.get(i * kSlotsPerLayer + s).has_value(), "llama_layers: layer ", i,
                        " lacks required weight slot ", static_cast<int64_t>(s));
    }
    TORCH_CHECK_VALUE(weights.get(i * kSlotsPerLayer + kQNorm).has_value() ==
                          weights.get(i * kSlotsPerLayer + kKNorm).has_value(),
                      "llama_layers: layer ", i, " has only one of q_norm / k_norm");
  }
  for (int64_t c : capture) {
    TORCH_CHECK_VALUE(c >= 0 && c <= layers, "llama_layers: capture index ", c, " outside [0, ", layers, "]");
  }
}

// Returns [output, *inputs of the layers in `capture`] (capture index L = the output).
std::vector<at::Tensor> llama_layers_cpu(const at::Tensor& x, const OptTensor& attn_input,
                                         const c10::List<OptTensor>& weights, const at::Tensor& kv,
                                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kv_rows,
                                         const at::Tensor& cache_seqlens, const OptTensor& tree_mask, int64_t past,
                                         int64_t num_heads, int64_t num_kv_heads, double eps,
                                         at::IntArrayRef capture) {
  check_args(x, attn_input, weights, kv, num_heads, num_kv_heads, capture);
  const int64_t D = kv.size(5);
  // Python's `D ** -0.5` (a float power of an int) is C's pow on doubles.
  Block blk{kv, cos, sin, kv_rows, cache_seqlens, tree_mask, past, num_heads, num_kv_heads, D, eps,
            std::pow(static_cast<double>(D), -0.5)};
  const int64_t layers = static_cast<int64_t>(weights.size()) / kSlotsPerLayer;
  std::vector<at::Tensor> captured(capture.size());
  at::Tensor h = x;
  for (int64_t i = 0; i <= layers; ++i) {
    for (size_t c = 0; c < capture.size(); ++c)
      if (capture[c] == i) captured[c] = h;
    if (i < layers) h = decoder_layer(h, attn_input, weights, i, blk);
  }
  std::vector<at::Tensor> result{h};
  result.insert(result.end(), captured.begin(), captured.end());
  return result;
}

}  // namespace llama_layers
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "llama_layers(Tensor x, Tensor? attn_input, Tensor?[] weights, Tensor(a!) kv, Tensor cos, Tensor sin, "
      "Tensor kv_rows, Tensor cache_seqlens, Tensor? tree_mask, int past, int num_heads, int num_kv_heads, "
      "float eps, int[] capture) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) { m.impl("llama_layers", &eagle::llama_layers::llama_layers_cpu); }
// Packed (mkldnn-layout) weights in the list make the dispatcher pick this key; same CPU kernel.
TORCH_LIBRARY_IMPL(eagle_C, MkldnnCPU, m) { m.impl("llama_layers", &eagle::llama_layers::llama_layers_cpu); }
