// Stand-in for the header a CUDA build of torch generates at configure time (a CPU wheel does not
// ship it), used only by scripts/nvcc_check.sh's syntax check of csrc/cuda/*_binding.cpp. Its macros
// only select shared-library export attributes, which a syntax check does not need.
#pragma once
