// llama_layers: a stack of Llama decoder layers on the in-place KV cache, for CPU tensors, in C++.
//
// The op computes what the Python modules in eagle/models/llama.py (RMSNorm, Attention, MLP,
// DecoderLayer) compute, bit for bit: the same kernels for the linears, norms, silu and attention,
// and for the RoPE, the cache writes, the MLP product and the residual adds loops with exactly the
// rounding of the ATen ops they replace. The Python overhead and most per-op dispatch and
// allocation disappear. The attention calls the tree_attention CPU kernel directly (the model
// has already validated the block; the kernel re-checks shapes and lengths itself).
//
// weights holds kSlotsPerLayer optional tensors per layer, in the order of the Slot enum. A missing
// input_layernorm means the layer's attention reads its input directly (EAGLE-1/2 head);
// `attn_input` (one layer only) replaces the attention input altogether (EAGLE-3 midlayer, whose
// input is cat(input_layernorm(emb), hidden_norm(h)) while the residual stream is h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "amx_linear.h"
#include "panel_linear.h"
#include "skinny_linear.h"
#include "fused_draft_input.h"
#include "llama_layers.h"
#include "half_convert.h"
#include "tensor_pool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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

struct Block {
  at::Tensor kv;  // [L, 2, B, Hkv, S_max, D]
  at::Tensor cos, sin;  // [B, T, 1, D], the model dtype
  at::Tensor seqlens;  // [B] int32
  OptTensor tree_mask;  // [B, past+T, past+T] bool
  int64_t past, Hq, Hkv, D;
  double eps, sm_scale;
};

// eagle.models.llama.RMSNorm.forward (rms_norm.cpp, which the module calls too outside autograd)
using rms::rms_norm;

// What eagle/models/cpu_packed.py's linear() calls: the AMX kernel for a weight in tiles, the float32
// or bfloat16 panel kernel for a weight in panels, this package's float32 kernel for a few rows of an unpacked
// weight (skinny_linear.cpp), oneDNN's linear for an mkldnn-layout weight, else at::linear.
at::Tensor project(const at::Tensor& x, const at::Tensor& w, const OptTensor& b) {
  if (amx::is_tiled_weight(w)) return amx::linear_bf16(x, w, b);
  if (panel::is_panel_weight(w)) return panel::linear_f32(x, w, b);
  if (panel::is_bf16_panel_weight(w)) return panel::linear_bf16(x, w, b);
  if (skinny::applies(x, w, b)) return skinny::linear_f32(x, w, b);
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

// ---- Elementwise steps done in place of ATen ops, with ATen's rounding ----
// A layer of a small model spends more time dispatching and allocating for ~20 tiny ATen ops than
// computing them; these loops replace the RoPE (mul, roll, mul, add), the two cache writes
// (index_copy_), the MLP's product and the residual adds. Each reproduces the replaced ops element
// for element: half types compute each op in float and round its result to the dtype, as ATen's
// kernels do; float/double compute natively, and a product is never fused with the following sum
// into an FMA (ATen rounds the product first), hence fp-contract off.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

template <typename T>
inline T mul_rounded(T a, T b) {
  using M = convert::Math<T>;
  return M::store(M::load(a) * M::load(b));
}

template <typename T>
inline T add_rounded(T a, T b) {
  using M = convert::Math<T>;
  return M::store(M::load(a) + M::load(b));
}

// y = x * cos + roll(x, D/2) * signed_sin for one head row (eagle.models.llama.apply_rope); the two
// halves are separate loops so that each vectorises.
template <typename T>
inline void rope_row(const T* __restrict x, const T* __restrict c, const T* __restrict s, int64_t D,
                     T* __restrict y) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) y[d] = add_rounded(mul_rounded(x[d], c[d]), mul_rounded(x[d + half], s[d]));
  for (int64_t d = half; d < D; ++d) y[d] = add_rounded(mul_rounded(x[d], c[d]), mul_rounded(x[d - half], s[d]));
}

// Strided [B, T, H, D] rows with a contiguous last dim.
struct Rows4 {
  const void* data;
  int64_t sb, st, sh;
};

Rows4 rows_of(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "llama_layers: internal: rows need a contiguous last dim");
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// q rows -> q_out[b, past + t] (rotated); k rows -> the K cache at position seqlens[b] + past + t
// (rotated; the op checked that it fits); v rows -> the same position of the V cache. cos/sin:
// contiguous [B, T, 1, D].
template <typename T>
EAGLE_AVX512_CLONE void rope_and_write_cache(const Rows4& q, const Rows4& k, const Rows4& v, const Block& blk, int64_t B, int64_t Tn,
                          T* q_out, T* k_cache, T* v_cache, int64_t S_max) {
  const int64_t Hq = blk.Hq, Hkv = blk.Hkv, D = blk.D, rows_out = blk.past + Tn;
  const T* cos = blk.cos.const_data_ptr<T>();
  const T* sin = blk.sin.const_data_ptr<T>();
  const int32_t* seqlens = blk.seqlens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < Tn; ++t) {
      const T* c = cos + (b * Tn + t) * D;
      const T* s = sin + (b * Tn + t) * D;
      for (int64_t h = 0; h < Hq; ++h) {
        const T* x = static_cast<const T*>(q.data) + b * q.sb + t * q.st + h * q.sh;
        rope_row(x, c, s, D, q_out + ((b * rows_out + blk.past + t) * Hq + h) * D);
      }
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t row = (b * Hkv + h) * S_max + seqlens[b] + blk.past + t;
        const T* xk = static_cast<const T*>(k.data) + b * k.sb + t * k.st + h * k.sh;
        rope_row(xk, c, s, D, k_cache + row * D);
        const T* xv = static_cast<const T*>(v.data) + b * v.sb + t * v.st + h * v.sh;
        std::memcpy(v_cache + row * D, xv, D * sizeof(T));
      }
    }
  }
}

// dst = dst * other (eagle.models.llama.MLP: silu(gate) * up), both [rows, n], other's rows `stride` apart.
template <typename T>
EAGLE_AVX512_CLONE void multiply_into(T* __restrict dst, const T* __restrict other, int64_t rows, int64_t n, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) dst[r * n + i] = mul_rounded(dst[r * n + i], other[r * stride + i]);
}

// dst = residual + dst (the decoder layer's x + attn(x) and h + mlp(h); addition commutes exactly).
template <typename T>
EAGLE_AVX512_CLONE void add_into(T* __restrict dst, const T* __restrict residual, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = add_rounded(residual[i], dst[i]);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// `out` + `residual` in place in `out` (a fresh result of project), or ATen's add when the layouts
// do not allow the loop.
at::Tensor add_residual(const at::Tensor& residual, at::Tensor out) {
  if (!(out.is_contiguous() && residual.is_contiguous() && out.sizes() == residual.sizes() &&
        out.scalar_type() == residual.scalar_type() && !out.is_mkldnn())) {
    return residual + out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "llama_layers_add", [&] {
    add_into(out.mutable_data_ptr<scalar_t>(), residual.const_data_ptr<scalar_t>(), out.numel());
  });
  return out;
}

// eagle.models.llama.Attention.forward (project + RoPE + cache write + tree attention + o_proj)
at::Tensor attention(const at::Tensor& x, const c10::List<OptTensor>& weights, int64_t layer, const Block& blk) {
  const int64_t B = x.size(0), T = x.size(1), Hq = blk.Hq, Hkv = blk.Hkv, D = blk.D;
  const at::Tensor qkv =
      project(x, *slot(weights, layer, kQkvWeight), slot(weights, layer, kQkvBias)).contiguous().view(
          {B, T, Hq + 2 * Hkv, D});
  // q, k and v rows are heads [0, Hq), [Hq, Hq + Hkv) and [Hq + Hkv, Hq + 2 Hkv) of qkv: addressed
  // directly (narrowed views cost ATen calls that matter at decode sizes), normed copies for Qwen3.
  const char* base = static_cast<const char*>(qkv.const_data_ptr());
  const int64_t head_bytes = qkv.stride(2) * static_cast<int64_t>(qkv.element_size());
  Rows4 qr{base, qkv.stride(0), qkv.stride(1), qkv.stride(2)};
  Rows4 kr{base + Hq * head_bytes, qkv.stride(0), qkv.stride(1), qkv.stride(2)};
  const Rows4 vr{base + (Hq + Hkv) * head_bytes, qkv.stride(0), qkv.stride(1), qkv.stride(2)};
  at::Tensor q_normed, k_normed;  // keep the normed rows alive until the rotation has read them
  const OptTensor q_norm = slot(weights, layer, kQNorm);
  if (q_norm.has_value()) {  // Qwen3: per-head RMSNorm of q and k before the rotation
    q_normed = rms_norm(qkv.narrow(2, 0, Hq), *q_norm, blk.eps);
    k_normed = rms_norm(qkv.narrow(2, Hq, Hkv), *slot(weights, layer, kKNorm), blk.eps);
    qr = rows_of(q_normed), kr = rows_of(k_normed);
  }
  const at::Tensor kv_layer = blk.kv.select(0, layer);  // [2, B, Hkv, S_max, D], contiguous
  const at::Tensor k_cache = kv_layer.select(0, 0), v_cache = kv_layer.select(0, 1);
  // Rows of an earlier part of the block (past > 0) are zero queries whose outputs are dropped, as
  // in the Python module.
  const at::Tensor q = blk.past ? at::zeros({B, blk.past + T, Hq, D}, qkv.options())
                                : pool::empty({B, T, Hq, D}, qkv.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "llama_layers_rope", [&] {
    rope_and_write_cache<scalar_t>(qr, kr, vr, blk, B, T, q.mutable_data_ptr<scalar_t>(),
                                   k_cache.mutable_data_ptr<scalar_t>(), v_cache.mutable_data_ptr<scalar_t>(),
                                   k_cache.size(2));
  });
  const at::Tensor out = tree_attn::tree_attention_cpu(q, k_cache, v_cache, blk.seqlens, blk.tree_mask, blk.sm_scale);
  const at::Tensor rows = blk.past ? out.slice(1, blk.past).reshape({B, T, Hq * D}) : out.view({B, T, Hq * D});
  return project(rows, *slot(weights, layer, kOWeight), slot(weights, layer, kOBias));
}

// Output features of a weight in any of the layouts project() takes (tiled and panel ones: 16 per row).
int64_t output_features(const at::Tensor& w) {
  return amx::is_tiled_weight(w) || panel::is_panel_weight(w) || panel::is_bf16_panel_weight(w) ? w.size(0) * 16
                                                                                                 : w.size(0);
}

// eagle.models.llama.MLP.forward
at::Tensor mlp(const at::Tensor& x, const c10::List<OptTensor>& weights, int64_t layer) {
  const at::Tensor gate_up_w = *slot(weights, layer, kGateUpWeight);
  const int64_t inter = output_features(gate_up_w) / 2;  // (checked even and > 0 by check_args)
  const at::Tensor gate_up = project(x, gate_up_w, slot(weights, layer, kGateUpBias)).contiguous();
  const at::Tensor gate = gate_up.narrow(-1, 0, inter);
  at::Tensor act = pool::empty(gate.sizes(), gate.scalar_type());
  at::silu_out(act, gate);  // ATen's silu (its exp)
  if (act.is_contiguous()) {  // up = gate_up[..., inter:], rows 2 * inter apart
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "llama_layers_mul", [&] {
      multiply_into(act.mutable_data_ptr<scalar_t>(), gate_up.const_data_ptr<scalar_t>() + inter,
                    act.numel() / inter, inter, 2 * inter);
    });
  } else {
    act = act * gate_up.narrow(-1, inter, inter);
  }
  return project(act, *slot(weights, layer, kDownWeight), slot(weights, layer, kDownBias));
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
  const at::Tensor h = add_residual(x, attention(a, weights, layer, blk));
  return add_residual(h, mlp(rms_norm(h, *slot(weights, layer, kPostNorm), blk.eps), weights, layer));
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
  if (attn_input.has_value()) {  // its rows are the ones written to the cache: x's [B, T] (and dtype)
    const at::Tensor& a = *attn_input;
    TORCH_CHECK_VALUE(a.dim() == 3 && a.size(0) == x.size(0) && a.size(1) == x.size(1),
                      "llama_layers: attn_input must be [B, T, *] with x's B and T, got ", a.sizes(), " for x ",
                      x.sizes());
    TORCH_CHECK_TYPE(a.scalar_type() == x.scalar_type() && a.device() == x.device(),
                     "llama_layers: attn_input must have x's dtype and device");
  }
  for (int64_t i = 0; i < layers; ++i) {
    for (Slot s : {kQkvWeight, kOWeight, kPostNorm, kGateUpWeight, kDownWeight}) {
      TORCH_CHECK_VALUE(weights.get(i * kSlotsPerLayer + s).has_value(), "llama_layers: layer ", i,
                        " lacks required weight slot ", static_cast<int64_t>(s));
    }
    // Checked before any layer writes the cache (an intermediate width of 0 divided by zero).
    const int64_t gate_up = output_features(*weights.get(i * kSlotsPerLayer + kGateUpWeight));
    TORCH_CHECK_VALUE(gate_up > 0 && gate_up % 2 == 0, "llama_layers: the fused gate_up weight of layer ", i,
                      " must have an even, positive number of outputs (gate, then up), got ", gate_up);
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
                                         const at::Tensor& cos, const at::Tensor& sin,
                                         const at::Tensor& cache_seqlens, const OptTensor& tree_mask, int64_t past,
                                         int64_t num_heads, int64_t num_kv_heads, double eps,
                                         at::IntArrayRef capture) {
  check_args(x, attn_input, weights, kv, num_heads, num_kv_heads, capture);
  const int64_t D = kv.size(5), B = x.size(0), T = x.size(1);
  const std::vector<int64_t> rope_shape{B, T, 1, D};  // (a transposed table has the same numel)
  TORCH_CHECK_VALUE(cos.scalar_type() == kv.scalar_type() && sin.scalar_type() == kv.scalar_type() &&
                        cos.sizes() == at::IntArrayRef(rope_shape) && sin.sizes() == at::IntArrayRef(rope_shape),
                    "llama_layers: cos and sin must be [B, T, 1, D] = [", B, ", ", T, ", 1, ", D, "] in ",
                    kv.scalar_type(), ", got ", cos.sizes(), " ", cos.scalar_type(), " and ", sin.sizes(), " ",
                    sin.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                        cache_seqlens.size(0) == B,
                    "llama_layers: cache_seqlens must be int32 [B] = [", B, "], got ", cache_seqlens.scalar_type(),
                    " ", cache_seqlens.sizes());
  TORCH_CHECK_VALUE(past >= 0, "llama_layers: past must be >= 0, got ", past);
  const at::Tensor seqlens = cache_seqlens.contiguous();
  const int32_t* lens = seqlens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {  // the block's rows go to positions seqlens[b] + past + t
    TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] + past + T <= kv.size(4), "llama_layers: cache_seqlens[", b, "]=",
                      lens[b], " + past=", past, " + T=", T, " does not fit S_max=", kv.size(4));
  }
  // Python's `D ** -0.5` (a float power of an int) is C's pow on doubles.
  Block blk{kv, cos.contiguous(), sin.contiguous(), seqlens, tree_mask, past, num_heads, num_kv_heads, D, eps,
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

// lm_head(h) at the rows of logits_index [B, K] (all rows when absent): eagle.models.draft._rows and
// LlamaModel._logits_at, then project() as eagle.models.cpu_packed.linear.
static at::Tensor logits_at(const at::Tensor& h, const at::Tensor& lm_head, const OptTensor& logits_index) {
  if (!logits_index.has_value()) return project(h, lm_head, std::nullopt);
  const int64_t B = h.size(0), T = h.size(1);
  const at::Tensor& index = *logits_index;
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(0) == B &&
                        (index.scalar_type() == at::kLong || index.scalar_type() == at::kInt),
                    "logits_index must be an int tensor [", B, ", K], got ", index.scalar_type(), " ", index.sizes());
  const at::Tensor positions = index.to(at::kLong).contiguous();
  const int64_t* p = positions.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(std::all_of(p, p + positions.numel(), [T](int64_t i) { return i >= 0 && i < T; }),
                    "logits_index holds positions outside the block [0, ", T, ")");
  return project(h.gather(1, positions.unsqueeze(-1).expand({B, index.size(1), h.size(2)})), lm_head, std::nullopt);
}

// eagle.models.draft.Eagle2Head.forward on the CPU fast path in one call: the fused draft input
// (fused_draft_input.cpp), the decoder layer (llama_layers_cpu) and the lm_head (project(), as
// eagle.models.cpu_packed.linear) at the rows of logits_index [B, K] (all rows when absent).
// Returns [h] or [h, logits]. A draft level is small enough that the Python between these calls
// cost as much as the layer.
std::vector<at::Tensor> eagle2_head_cpu(const at::Tensor& hidden, const at::Tensor& token_ids,
                                        const at::Tensor& embed_weight, const at::Tensor& fc_weight,
                                        const OptTensor& fc_bias, const c10::List<OptTensor>& weights,
                                        const at::Tensor& kv, const at::Tensor& cos, const at::Tensor& sin,
                                        const at::Tensor& cache_seqlens, const OptTensor& tree_mask, int64_t past,
                                        int64_t num_heads, int64_t num_kv_heads, double eps, const OptTensor& lm_head,
                                        const OptTensor& logits_index) {
  TORCH_CHECK_VALUE(hidden.dim() == 3, "eagle2_head: hidden must be [B, T, H], got ", hidden.sizes());
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  TORCH_CHECK_VALUE(token_ids.dim() == 2 && token_ids.size(0) == B && token_ids.size(1) == T,
                    "eagle2_head: token_ids must be [B, T] = [", B, ", ", T, "], got ", token_ids.sizes());
  at::Tensor x = pool::empty({B, T, fc_weight.size(0)}, hidden.scalar_type());
  fused_draft_input_cpu(hidden.reshape({B * T, H}), token_ids.reshape({B * T}), embed_weight, fc_weight, fc_bias,
                        x.view({B * T, fc_weight.size(0)}));
  const at::Tensor h = llama_layers_cpu(x, std::nullopt, weights, kv, cos, sin, cache_seqlens, tree_mask, past,
                                        num_heads, num_kv_heads, eps, {})[0];
  if (!lm_head.has_value()) return {h};
  return {h, logits_at(h, *lm_head, logits_index)};
}

// eagle.models.llama.LlamaModel.forward on the CPU fast path after its checks and RoPE tables: the
// embedding (ATen's, as nn.Embedding), the layers (llama_layers_cpu), the final RMSNorm (rms_norm, as
// RMSNorm.forward on CPU) and, with lm_head, the logits at logits_index (as LlamaModel._logits_at).
// Returns [hidden after the norm, logits (undefined without lm_head), *hidden states entering the
// layers in capture]. After the layers' weights stream through the caches, every Python-level call
// costs tens of microseconds more than warm: this saves three per forward.
std::vector<at::Tensor> llama_forward_cpu(const at::Tensor& input_ids, const at::Tensor& embed_weight,
                                          const c10::List<OptTensor>& weights, const at::Tensor& kv,
                                          const at::Tensor& cos, const at::Tensor& sin,
                                          const at::Tensor& cache_seqlens, const OptTensor& tree_mask, int64_t past,
                                          int64_t num_heads, int64_t num_kv_heads, double eps,
                                          at::IntArrayRef capture, const at::Tensor& norm_weight,
                                          const OptTensor& lm_head, const OptTensor& logits_index) {
  TORCH_CHECK_VALUE(input_ids.dim() == 2, "llama_forward: input_ids must be [B, T], got ", input_ids.sizes());
  const at::Tensor x = at::embedding(embed_weight, input_ids);
  std::vector<at::Tensor> layers = llama_layers_cpu(x, std::nullopt, weights, kv, cos, sin, cache_seqlens,
                                                    tree_mask, past, num_heads, num_kv_heads, eps, capture);
  const at::Tensor hidden = rms_norm(layers[0], norm_weight, eps);
  std::vector<at::Tensor> result{hidden, lm_head.has_value() ? logits_at(hidden, *lm_head, logits_index)
                                                             : at::Tensor()};
  result.insert(result.end(), layers.begin() + 1, layers.end());
  return result;
}

// eagle.models.llama.block_context's RoPE tables in one call: positions [B, T] (default
// cache_seqlens[b] + past + t), then eagle.models.llama.rope_cos_sin's values: angles =
// float(position) * cat(inv_freq, inv_freq) (one float product, as ATen's mul), ATen's cos and sin
// of them, the sin times the signs, both rounded to `dtype` (round to nearest even, as ATen's to()).
// Only cos and sin are ATen calls: the positions, angles, signs and casts are loops, which at decode
// sizes cost less than the ~12 small ATen calls they replace. [B, T, 1, D] each.
namespace {

template <typename T>
void signed_cast(const float* cos, const float* sin, const float* signs, int64_t rows, int64_t D, T* cos_out,
                 T* sin_out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) {
      cos_out[r * D + d] = static_cast<T>(cos[r * D + d]);
      sin_out[r * D + d] = static_cast<T>(sin[r * D + d] * signs[d]);
    }
}

}  // namespace

std::vector<at::Tensor> rope_cos_sin_cpu(const std::optional<at::Tensor>& positions, const at::Tensor& cache_seqlens,
                                         int64_t past, int64_t T, const at::Tensor& doubled_inv_freq,
                                         const at::Tensor& signs, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(past >= 0 && T > 0, "rope_cos_sin: past must be >= 0 and T > 0, got past=", past, ", T=", T);
  TORCH_CHECK_VALUE(doubled_inv_freq.dim() == 1 && signs.sizes() == doubled_inv_freq.sizes() &&
                        doubled_inv_freq.scalar_type() == at::kFloat && signs.scalar_type() == at::kFloat,
                    "rope_cos_sin: the frequency and sign tables must be float32 [D]");
  TORCH_CHECK_VALUE(doubled_inv_freq.device().is_cpu() && signs.device().is_cpu() && cache_seqlens.device().is_cpu(),
                    "rope_cos_sin: CPU tensors expected");
  const int64_t D = doubled_inv_freq.size(0);
  std::vector<int64_t> pos;
  int64_t B = 0;
  if (positions.has_value()) {
    const at::Tensor& given = *positions;
    TORCH_CHECK_VALUE(given.dim() == 2 && given.size(1) == T &&
                          (given.scalar_type() == at::kLong || given.scalar_type() == at::kInt),
                      "rope_cos_sin: positions must be int [B, ", T, "], got ", given.scalar_type(), " ",
                      given.sizes());
    TORCH_CHECK_VALUE(given.device().is_cpu(), "rope_cos_sin: positions must be a CPU tensor");
    B = given.size(0);
    const at::Tensor p = given.to(at::kLong).contiguous();
    pos.assign(p.const_data_ptr<int64_t>(), p.const_data_ptr<int64_t>() + B * T);
    for (int64_t v : pos) TORCH_CHECK_VALUE(v >= 0, "positions must be >= 0");
  } else {
    TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && at::isIntegralType(cache_seqlens.scalar_type(), false),
                      "rope_cos_sin: cache_seqlens must be int [B], got ", cache_seqlens.scalar_type(), " ",
                      cache_seqlens.sizes());
    B = cache_seqlens.size(0);
    const at::Tensor lens = cache_seqlens.to(at::kLong).contiguous();
    pos.resize(B * T);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) pos[b * T + t] = lens.const_data_ptr<int64_t>()[b] + past + t;
  }
  const at::Tensor freq = doubled_inv_freq.contiguous(), sign = signs.contiguous();
  const float* f = freq.const_data_ptr<float>();
  at::Tensor angles = pool::empty({B, T, 1, D}, at::kFloat);
  float* a = angles.mutable_data_ptr<float>();
  for (int64_t r = 0; r < B * T; ++r) {
    const float p = static_cast<float>(pos[r]);  // as ATen's int64 -> float32 cast
    for (int64_t d = 0; d < D; ++d) a[r * D + d] = p * f[d];
  }
  at::Tensor cos = pool::empty(angles.sizes(), at::kFloat), sin = pool::empty(angles.sizes(), at::kFloat);
  at::cos_out(cos, angles), at::sin_out(sin, angles);  // ATen's cos and sin
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) {
    return {cos.to(dtype), (sin * signs).to(dtype)};  // float64 and the rest: ATen's casts
  }
  at::Tensor cos_out = dtype == at::kFloat ? cos : pool::empty(cos.sizes(), dtype);
  at::Tensor sin_out = dtype == at::kFloat ? sin : pool::empty(sin.sizes(), dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rope_cos_sin", [&] {
    signed_cast<scalar_t>(cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), sign.const_data_ptr<float>(),
                          B * T, D, cos_out.mutable_data_ptr<scalar_t>(), sin_out.mutable_data_ptr<scalar_t>());
  });
  return {cos_out, sin_out};
}

}  // namespace llama_layers
}  // namespace eagle

TORCH_LIBRARY_FRAGMENT(eagle_C, m) {
  m.def(
      "llama_layers(Tensor x, Tensor? attn_input, Tensor?[] weights, Tensor(a!) kv, Tensor cos, Tensor sin, "
      "Tensor cache_seqlens, Tensor? tree_mask, int past, int num_heads, int num_kv_heads, "
      "float eps, int[] capture) -> Tensor[]");
  m.def(
      "llama_forward(Tensor input_ids, Tensor embed_weight, Tensor?[] weights, Tensor(a!) kv, Tensor cos, "
      "Tensor sin, Tensor cache_seqlens, Tensor? tree_mask, int past, int num_heads, int num_kv_heads, float eps, "
      "int[] capture, Tensor norm_weight, Tensor? lm_head, Tensor? logits_index) -> Tensor[]");
  m.def(
      "rope_cos_sin(Tensor? positions, Tensor cache_seqlens, int past, int T, Tensor doubled_inv_freq, "
      "Tensor signs, ScalarType dtype) -> Tensor[]");
  m.def(
      "eagle2_head(Tensor hidden, Tensor token_ids, Tensor embed_weight, Tensor fc_weight, Tensor? fc_bias, "
      "Tensor?[] weights, Tensor(a!) kv, Tensor cos, Tensor sin, Tensor cache_seqlens, Tensor? tree_mask, "
      "int past, int num_heads, int num_kv_heads, float eps, Tensor? lm_head, Tensor? logits_index) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(eagle_C, CPU, m) {
  m.impl("llama_layers", &eagle::llama_layers::llama_layers_cpu);
  m.impl("llama_forward", &eagle::llama_layers::llama_forward_cpu);
  m.impl("rope_cos_sin", &eagle::llama_layers::rope_cos_sin_cpu);
  m.impl("eagle2_head", &eagle::llama_layers::eagle2_head_cpu);
}
// Packed (mkldnn-layout) weights in the list make the dispatcher pick this key; same CPU kernel.
TORCH_LIBRARY_IMPL(eagle_C, MkldnnCPU, m) {
  m.impl("llama_layers", &eagle::llama_layers::llama_layers_cpu);
  m.impl("llama_forward", &eagle::llama_layers::llama_forward_cpu);
  m.impl("eagle2_head", &eagle::llama_layers::eagle2_head_cpu);
}
