#!/usr/bin/env bash
# The engine's CUDA backend on a GPU machine, in one call through the device tool (the binary is
# built here by `make gpu-worker` and carried in .gpu/):
#   1. every primitive and whole GPT steps on CUDA against the CPU reference (FP32, then TF32);
#   2. GPT-2-small-like training (12 layers, 768 wide, context 1024, batch 8) tokens/s and MFU,
#      the Lockstep engine and PyTorch eager on the same model and batch, one after the other.
# Writes $OUT/engine-gpu.log.
set -u
out=${OUT:-/tmp}/engine-gpu.log
exec > >(tee "$out") 2>&1
bin=./.gpu/lockstep-worker
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
nv=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]) + '/nvidia')" 2>/dev/null)
# The wheels put the libraries in nvidia/<component>/lib (CUDA 12 style) or nvidia/cu13/lib.
for d in "$nv"/*/lib; do LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
export LD_LIBRARY_PATH
ls "$nv"/*/lib 2>/dev/null | grep -E 'libcublas\.|libnvrtc\.|libnccl' | tr '\n' ' '; echo
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "== 1. CUDA backend vs CPU reference"
timeout 120 $bin bench engine-check
timeout 120 $bin bench engine-check --tf32
vocab=${VOCAB:-50257}
batch=${BATCH:-8}
echo "== 2. GPT 12x768, context 1024, batch $batch, vocab $vocab (TF32 GEMMs, FP32 everything else)"
timeout 240 $bin bench gpt --device cuda --layers 12 --heads 12 --embed 768 --seq 1024 \
  --batch "$batch" --vocab "$vocab" --warmup 3 --steps 10 --peak-tflops 494.7
# PyTorch's vocabulary padded the same way as the engine's (to a multiple of 64).
pvocab=$(( (vocab + 63) / 64 * 64 ))
for attn in manual sdpa; do
  timeout 240 python3 bench/gpu/torch_gpt.py --layers 12 --width 768 --heads 12 --context 1024 \
    --batch "$batch" --vocab "$pvocab" --precisions tf32 --attention "$attn" --warmup 3 --steps 10
done
