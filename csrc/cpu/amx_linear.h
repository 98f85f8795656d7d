// bfloat16 linear layers on Intel AMX tiles for the small row counts of decoding (see amx_linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace eagle {
namespace amx {

// True when this CPU has AMX-BF16 tiles and AVX-512 BF16, and the OS granted this process the tile
// state (Linux arch_prctl). Checked once.
bool bf16_available();

// Palette 1 for this thread's tiles tmm0-7: tile t holds rows[t] rows of 64 bytes (0: unused). Only
// where bf16_available() is true (elsewhere it throws).
void load_tile_config(const uint8_t (&rows)[8]);

// True for a weight in the tiled layout made by eagle/models/cpu_packed.py: bf16 [N/16, K/32, 16, 32].
bool is_tiled_weight(const at::Tensor& w);

// y = x @ W.T + bias with W given tiled (see is_tiled_weight); x [..., K] bf16 -> [..., N] bf16.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& tiled, const std::optional<at::Tensor>& bias);

}  // namespace amx
}  // namespace eagle
