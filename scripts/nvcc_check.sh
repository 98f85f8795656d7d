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
