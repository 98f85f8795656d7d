// float32 linear layers from weights packed in column panels, for CPU (see panel_linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace eagle {
namespace panel {

constexpr int64_t kPanelWidth = 16;  // output features per panel: one AVX-512 vector of float32

// True when this CPU runs the kernel (AVX-512F).
bool available();

// True for a weight in the panel layout: a contiguous float32 CPU tensor [N/16, K, 16] (not mkldnn).
bool is_panel_weight(const at::Tensor& w);

// y = x @ W.T + bias for W [N, K] given as panels [N/16, K, 16] (panel p holds W[16p + c, k] at [p, k, c]);
// x [..., K] float32 -> [..., N]. Every output element is one float32 FMA chain over k = 0..K-1 in
// order, then + bias: a row's result does not depend on the rows beside it or the thread count.
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias);

// True when this CPU runs the bfloat16 kernel (AVX-512F, AVX-512BW and AVX512-BF16).
bool bf16_available();

// True for a weight in the bf16 panel layout: a contiguous bfloat16 CPU tensor [N/16, K/2, 32] (not
// mkldnn), panel p holding W[16p + c, 2i + j] at [p, i, 2c + j].
bool is_bf16_panel_weight(const at::Tensor& w);

// y = x @ W.T + bias for W [N, K] given as bf16 panels; x [..., K] bfloat16 -> [..., N] bfloat16. Every
// output is one float32 chain over the k pairs in order (VDPBF16PS), + bias in float32, rounded once
// to bf16: a row's result does not depend on the rows beside it or the thread count.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias);

}  // namespace panel
}  // namespace eagle
