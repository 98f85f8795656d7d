// Stand-in for torch's ATen/cuda/CUDAContext.h, used only by scripts/nvcc_check.sh to syntax-check
// csrc/cuda/*_binding.cpp where torch is a CPU build: the real header pulls in cuSPARSE, cuBLAS and
// cuSOLVER headers that a bare CUDA toolkit may lack. It declares only what the bindings call, with
// torch's own signature. Never part of a build of the extension.
#pragma once
#include <c10/cuda/CUDAStream.h>

namespace at::cuda {
inline c10::cuda::CUDAStream getCurrentCUDAStream(c10::DeviceIndex device_index = -1) {
  return c10::cuda::getCurrentCUDAStream(device_index);
}
}  // namespace at::cuda
