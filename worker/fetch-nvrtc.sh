#!/usr/bin/env bash
# Fetches NVRTC (the CUDA runtime compiler, a shared library that needs no GPU) from PyPI into
# the build cache and prints the directory holding libnvrtc.so.13, so the test that compiles the
# engine's CUDA kernels runs on machines without CUDA:
#   export LD_LIBRARY_PATH=$(worker/fetch-nvrtc.sh):$LD_LIBRARY_PATH LOCKSTEP_REQUIRE_NVRTC=1
set -euo pipefail
version=13.5.37
dir=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}/nvrtc/$version
if [ ! -e "$dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --dest "$tmp" "nvidia-cuda-nvrtc==$version" >&2
  mkdir -p "$dir"
  python3 -m zipfile -e "$tmp"/nvidia_cuda_nvrtc-*.whl "$dir" >&2
  rm -rf "$tmp"
fi
echo "$dir/nvidia/cu13/lib"
