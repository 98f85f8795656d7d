// float32 linear layers for the few rows of a decoding step on CPU (see skinny_linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace eagle {
namespace skinny {

// Most rows (x.numel() / K) the kernel takes; 0 when it is off: no AVX-512 on this CPU, or
// EAGLE_CPU_SKINNY_LINEAR=0 (read at every call, so it can be switched at run time).
int64_t max_rows();

// True when linear_f32(x, w, b) applies: float32 CPU tensors, w a contiguous [N, K] matrix (not a
// packed copy), 1..max_rows() rows, a float32 bias of N or none.
bool applies(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// y = x @ W.T + bias, x [..., K] float32 -> [..., N]. Each output element is one fixed-order sum
// over K, whatever the number of rows or threads: a row's result does not depend on the rows
// beside it.
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);

}  // namespace skinny
}  // namespace eagle
