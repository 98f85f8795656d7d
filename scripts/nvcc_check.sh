#!/usr/bin/env bash
# Compile-check every CUDA source with nvcc (no GPU and no CUDA build of torch needed: the .cu files
# carry no torch headers). Skips with a message when nvcc is absent; fails if any file fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc-check: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
mapfile -t files < <(find csrc -name '*.cu' | sort)
if [ "${#files[@]}" -eq 0 ]; then
  echo "nvcc-check: no .cu files under csrc/ (nothing to check)"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
arch=${NVCC_CHECK_ARCH:-sm_90}
# torch's BuildExtension picks the standard (C++20 in recent releases, C++17 in older ones): the
# sources must compile under both.
for std in c++17 c++20; do
  for f in "${files[@]}"; do
    nvcc -c -std="$std" -O2 --expt-relaxed-constexpr -arch="$arch" -Icsrc "$f" -o "$out/$(basename "$f").o"
    echo "nvcc-check: ok $f ($std)"
  done
done
echo "nvcc-check: ${#files[@]} CUDA file(s) compiled for $arch"

# The torch bindings (csrc/cuda/*_binding.cpp) compile for real only against a CUDA build of torch; on a
# CPU build their syntax, and each call into a .cu file's C ABI launcher, is checked with the host
# compiler against torch's headers, the toolkit's runtime headers and two stand-ins for what a CPU wheel
# lacks (scripts/cuda_binding_stubs). An argument added to a launcher but not to its binding fails here.
# PYTHON may be a command with arguments (uv run python), as the Makefile's PY: split into words
read -r -a py <<< "${PYTHON:-python3}"
if ! torch_inc=$("${py[@]}" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))" 2>/dev/null); then
  echo "nvcc-check: torch not importable with ${py[*]}, skipping the bindings' syntax check"
  exit 0
fi
cuda_inc=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | grep -o -- '-I"\?[^" ]*include' | head -1 | sed 's/^-I"\?//')
mapfile -t bindings < <(find csrc/cuda -name '*_binding.cpp' | sort)
for f in "${bindings[@]}"; do
  # shellcheck disable=SC2086  # torch_inc is a list of -I flags
  ${CXX:-c++} -std=c++20 -fsyntax-only -Iscripts/cuda_binding_stubs $torch_inc -I"$cuda_inc" "$f"
  echo "nvcc-check: syntax ok $f (host compiler, CPU torch)"
done
