#!/usr/bin/env bash
# The engine's CUDA backend on a GPU machine, in one call through the device tool (the binary is
# built here by `make gpu-worker` and carried in .gpu/):
#   1. every primitive and whole GPT steps on CUDA against the CPU reference (FP32, then TF32);
#   2. GPT-2-small-like training (12 layers, 768 wide, context 1024, batch 8) tokens/s and MFU,
#      the Lockstep engine and PyTorch eager on the same model and batch, one after the other;
#   3. a character GPT trained on tinyshakespeare by `lockstep-worker local` on the GPU (one
#      rank, gpusPerWorker 1: CUDA engine, NCCL gradient buckets on a communication stream).
# PARTS (default "1,2,3") picks the parts. Writes $OUT/engine-gpu.log.
set -u
out=${OUT:-/tmp}/engine-gpu.log
exec > >(tee "$out") 2>&1
. "$(dirname "$0")/env.sh"
parts=${PARTS:-1,2,3}
part() { [[ ",$parts," == *",$1,"* ]]; }
if part 1; then
echo "== 1. CUDA backend vs CPU reference"
timeout 120 $bin bench engine-check
timeout 120 $bin bench engine-check --precision tf32
fi
vocab=${VOCAB:-50257}
batch=${BATCH:-8}
if part 2; then
echo "== 2. GPT 12x768, context 1024, batch $batch, vocab $vocab (TF32 GEMMs, FP32 everything else)"
timeout 240 $bin bench gpt --device cuda --layers 12 --heads 12 --embed 768 --seq 1024 \
  --batch "$batch" --vocab "$vocab" --warmup 3 --steps 10 --peak-tflops 494.7
# PyTorch's vocabulary padded the same way as the engine's (to a multiple of 64).
pvocab=$(( (vocab + 63) / 64 * 64 ))
for attn in manual sdpa; do
  timeout 240 python3 bench/gpu/torch_gpt.py --layers 12 --width 768 --heads 12 --context 1024 \
    --batch "$batch" --vocab "$pvocab" --precisions tf32 --attention "$attn" --warmup 3 --steps 10
done
fi
if part 3; then
echo "== 3. tinyshakespeare on the GPU through local mode (CUDA engine, NCCL buckets)"
# cudarc tries libnccl.so and libnccl.so.<major> but not NCCL's soname libnccl.so.2: link it.
shim=$(mktemp -d); nccl=$(ls "$nv"/*/lib/libnccl.so.2 2>/dev/null | head -1)
[ -n "$nccl" ] && ln -s "$nccl" "$shim/libnccl.so" && export LD_LIBRARY_PATH="$shim:$LD_LIBRARY_PATH"
work=$(mktemp -d)
cat > "$work/job.yaml" <<'YAML'
apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata: {name: gpt-shakespeare-gpu}
spec:
  parallelism: {dataParallel: 1, gpusPerWorker: 1}
  training:
    workload: Ddp
    model: {gpt: {layers: 6, heads: 6, embedDim: 384, contextLength: 256}}
    data: {kind: Text, path: data/tinyshakespeare.txt.gz}
    optimizer: {learningRate: 0.001, minLearningRate: 0.0001, weightDecay: 0.1, beta2: 0.99, warmupSteps: 100, gradClipNorm: 1.0}
    batchSize: 64
    maxSteps: ${GPU_STEPS:-1000}
    seed: 1337
    checkpoint: {everySteps: 1000, keep: 2}
    evaluation: {everySteps: 250, maxBatches: 20}
  template:
    spec:
      containers: [{name: worker, image: lockstep/worker:0.1.0}]
YAML
sed -i "s/\${GPU_STEPS:-1000}/${GPU_STEPS:-1000}/" "$work/job.yaml"
start=$(date +%s.%N)
timeout 300 $bin local "$work/job.yaml" --workdir "$work/run" --no-progress 2>&1 \
  | grep -E "training on|NCCL|val_loss|finished|checkpoint written|error|failed" | cut -c1-400
echo "wall seconds: $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')"
fi
