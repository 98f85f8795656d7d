#!/usr/bin/env bash
# Build one binary wheel per CUDA toolkit given on the command line, e.g.
#     bash scripts/build_wheels.sh 12.4 12.8
# Each toolkit must be installed at /usr/local/cuda-X.Y (or set CUDA_ROOT_PATTERN, '%s' = version), and
# the active torch must be a CUDA build compatible with it. Wheels land in dist/ with local versions
# +cu{XY}torch{A.B}. With no arguments, builds a single wheel for the current toolchain (+cpu... or +cu...).
# PYTHON (default python3) is the interpreter whose torch the wheels are built against (make wheels
# passes its PY).
set -euo pipefail
cd "$(dirname "$0")/.."
# PYTHON may be a command with arguments (uv run python), as the Makefile's PY: split into words
read -r -a py <<< "${PYTHON:-python3}"
pattern=${CUDA_ROOT_PATTERN:-/usr/local/cuda-%s}
if [ "$#" -eq 0 ]; then
  "${py[@]}" -m build --wheel --no-isolation --outdir dist
  exit 0
fi
for v in "$@"; do
  root=$(printf "$pattern" "$v")
  if [ ! -x "$root/bin/nvcc" ]; then
    echo "build_wheels: no nvcc at $root/bin/nvcc for CUDA $v" >&2
    exit 1
  fi
  echo "build_wheels: CUDA $v from $root"
  rm -rf build
  CUDA_HOME="$root" PATH="$root/bin:$PATH" EAGLE_FORCE_CUDA=1 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0+PTX}" \
    "${py[@]}" -m build --wheel --no-isolation --outdir dist
done
ls -l dist
