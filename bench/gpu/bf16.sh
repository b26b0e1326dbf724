#!/usr/bin/env bash
# bf16 on a GPU machine, in one call through the device tool (the worker is built here by
# `make gpu-worker` and carried in .gpu/):
#   1. the engine check in bf16 (every primitive, GPT, TGN and JODIE steps on CUDA against the
#      CPU's emulation of the same bf16 rounding) and in TF32;
#   2. GPT-2 small (12 layers, 768 wide, context 1024, vocabulary 50257, batch 8): the engine in
#      TF32 and bf16 (unfused and fused attention), then PyTorch eager with SDPA and
#      torch.compile, each in TF32 and bf16: step time, tokens/s, MFU against the H200's dense
#      peaks (989.4 TFLOP/s bf16, 494.7 TF32: the H100 SXM's tensor cores, which the H200
#      shares);
#   3. the fused element-wise kernels (bias + GELU, residual + layer norm): the engine in bf16
#      with and without them, each with its per-primitive profile, in the same run (a fusion
#      is turned on in jobs only when this profile shows its gain).
# PARTS (default "1,2") picks the parts; parts 1 and 2 fill most of one 600 s device call, so
# part 3 is a call of its own (PARTS=3). Writes $OUT/bf16-gpu.log.
set -u
out=${OUT:-/tmp}/bf16-gpu.log
exec > >(tee "$out") 2>&1
. "$(dirname "$0")/env.sh"
parts=${PARTS:-1,2}
part() { [[ ",$parts," == *",$1,"* ]]; }
if part 1; then
  echo "== 1. engine check: bf16 against the CPU's bf16 emulation, then TF32"
  timeout 150 $bin bench engine-check --precision bf16
  timeout 150 $bin bench engine-check --precision tf32
fi
vocab=${VOCAB:-50257}
batch=${BATCH:-8}
if part 2; then
  echo "== 2. GPT-2 small, context 1024, batch $batch, vocab $vocab"
  for p in tf32:494.7 bf16:989.4; do
    for attn in ${ATTENTION:-unfused fused}; do
      flag=""; [ "$attn" = fused ] && flag="--fused-attention"
      echo "-- engine ${p%%:*}, $attn attention"
      timeout 240 $bin bench gpt --device cuda --layers 12 --heads 12 --embed 768 --seq 1024 \
        --batch "$batch" --vocab "$vocab" --warmup 3 --steps 10 --precision "${p%%:*}" \
        --peak-tflops "${p##*:}" $flag
    done
  done
  pvocab=$(( (vocab + 63) / 64 * 64 ))
  for compile in "" --compile; do
    timeout 400 python3 bench/gpu/torch_gpt.py --layers 12 --width 768 --heads 12 --context 1024 \
      --batch "$batch" --vocab "$pvocab" --precisions tf32,bf16 --attention sdpa --warmup 5 \
      --steps 10 --peak-tflops 989.4 $compile
  done
fi
if part 3; then
  echo "== 3. fused element-wise kernels, engine bf16, profiled"
  for flag in "" --fused-ops; do
    echo "-- engine bf16 ${flag:-without fusions}"
    timeout 240 $bin bench gpt --device cuda --layers 12 --heads 12 --embed 768 --seq 1024 \
      --batch "$batch" --vocab "$vocab" --warmup 3 --steps 10 --precision bf16 \
      --peak-tflops 989.4 --profile $flag
  done
fi
