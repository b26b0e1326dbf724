#!/usr/bin/env bash
# Fetches NVRTC (the CUDA runtime compiler, a shared library that needs no GPU) from PyPI into
# the build cache and prints the directory holding libnvrtc.so.13, so the test that compiles the
# engine's CUDA kernels runs on machines without CUDA:
#   export LD_LIBRARY_PATH=$(worker/fetch-nvrtc.sh):$LD_LIBRARY_PATH LOCKSTEP_REQUIRE_NVRTC=1
# The version and the wheel's hash are the CUDA image's (images/cuda-wheels.txt), so the tests
# compile the kernels with the NVRTC that image carries.
set -euo pipefail
pin=$(grep '^nvidia-cuda-nvrtc==' "$(dirname "$0")/../images/cuda-wheels.txt")
version=${pin#nvidia-cuda-nvrtc==}
version=${version%% *}
dir=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}/nvrtc/$version
if [ ! -e "$dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  tmp=$(mktemp -d)
  echo "$pin" > "$tmp/pin.txt"
  python3 -m pip download --quiet --no-deps --require-hashes --dest "$tmp" -r "$tmp/pin.txt" >&2
  mkdir -p "$dir"
  python3 -m zipfile -e "$tmp"/nvidia_cuda_nvrtc-*.whl "$dir" >&2
  rm -rf "$tmp"
fi
echo "$dir/nvidia/cu13/lib"
