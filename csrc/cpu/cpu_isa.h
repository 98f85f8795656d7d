// EAGLE_KERNELS_CPU_ISA: the instruction-set variant forced on the CPU kernels that have several
// (tree_attention.cpp, fused_draft_input.cpp); tests and benchmarks set it. Read at every call, so one
// process can time several variants.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace eagle {

// "" (unset or "auto": each kernel picks the widest the CPU has), "amx", "avx512bf16", "avx512", "avx2"
// or "generic"; any other value raises, naming the accepted ones.
inline std::string forced_cpu_isa() {
  const char* env = std::getenv("EAGLE_KERNELS_CPU_ISA");
  const std::string isa = env == nullptr ? "" : env;
  TORCH_CHECK(isa.empty() || isa == "auto" || isa == "amx" || isa == "avx512bf16" || isa == "avx512" ||
                  isa == "avx2" || isa == "generic",
              "EAGLE_KERNELS_CPU_ISA must be amx, avx512bf16, avx512, avx2, generic or auto, got ", isa);
  return isa == "auto" ? "" : isa;
}

}  // namespace eagle
