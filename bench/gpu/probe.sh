#!/usr/bin/env bash
# One-call probe of a GPU machine (run through the device tool): the driver, where the CUDA
# libraries live, whether cudarc finds them (a throwaway probe binary built here and carried in
# .gpu/), and the PyTorch eager GPT baseline. Prints everything; writes nothing but $OUT/probe.log.
set -u
out=${OUT:-/tmp}/probe.log
exec > >(tee "$out") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"
nv=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]) + '/nvidia')" 2>/dev/null)
echo "nvidia python libs: $nv"; ls "$nv" 2>/dev/null | tr '\n' ' '; echo
for d in nccl cublas cuda_nvrtc cuda_runtime; do ls "$nv/$d/lib" 2>/dev/null | sed "s|^|  $d/lib/|"; done
ldconfig -p | grep -E 'libcuda\.so|libnvidia-ml|libnccl|libcublas|libnvrtc' | head
which nvcc && nvcc --version | tail -2
# cudarc tries libnccl.so and libnccl.so.<major> but not NCCL's soname libnccl.so.2: link it.
shim=$(mktemp -d); [ -e "$nv/nccl/lib/libnccl.so.2" ] && ln -s "$nv/nccl/lib/libnccl.so.2" "$shim/libnccl.so"
export LD_LIBRARY_PATH="$shim:$nv/cublas/lib:$nv/cuda_nvrtc/lib:$nv/cuda_runtime/lib:$nv/nccl/lib:${LD_LIBRARY_PATH:-}"
echo "== cudarc probe"; timeout 120 ./.gpu/gpuprobe
echo "== pytorch eager GPT-2-small-like (12x768, ctx 1024, batch 8, vocab 65)"
timeout 240 python3 bench/gpu/torch_gpt.py
