// How many column blocks of a linear one at::parallel_for task takes (its grain).
#pragma once

#include <cstdint>

namespace eagle {

// Each task holds at least ~1M multiply-adds (a smaller one costs more to hand out than to run), or,
// where that would leave the weight in one task, at least linear_grain_bytes() of it (64 KB unless
// EAGLE_CPU_LINEAR_GRAIN_BYTES or eagle_C::linear_grain_set_bytes say otherwise; 0: multiply-adds
// only): a linear of a few rows (a decode step, a draft level) is bound by streaming its weight from
// memory, and each core streams its share with its own bandwidth. Every output column is computed
// the same way whatever the split, so results do not depend on it.
int64_t linear_grain(int64_t macs_per_block, int64_t weight_bytes_per_block);

}  // namespace eagle
