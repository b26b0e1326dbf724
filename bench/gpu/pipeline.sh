#!/usr/bin/env bash
# Pipeline schedules on a GPU machine (16 cores, one GPU), in one call through the device tool
# (the binary is built here by `make gpu-worker` and carried in .gpu/):
#   1. p = 4 and 8 stages as threads of one process, each with its own cores (CPU engine): the
#      bubble measured against the simulator (on the measured costs) and the formula, tokens/s of
#      GPipe, 1F1B, interleaved 1F1B and ZB-H1, activation memory per stage;
#   2. the GPU engine's throughput for one stage of GPT-2 small cut into 4 (3 blocks; the first
#      and last stages also hold the 50257-token embedding and head), and the whole model.
# Writes $OUT/pipeline-gpu.log.
set -u
out=${OUT:-/tmp}/pipeline-gpu.log
exec > >(tee "$out") 2>&1
bin=./.gpu/lockstep-worker
nproc
echo "== 1. pipeline schedules, CPU engine, stages with their own cores"
for p in 4 8; do
  threads=$(( $(nproc) / p ))
  timeout 240 $bin bench pipeline --stages $p --threads $threads --micro 8,16 --layers 8 \
    --chunks 2 --steps 5 --warmup 2
done
echo "== 2. GPU engine: one stage of GPT-2 small cut into 4, then the whole model"
nv=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]) + '/nvidia')" 2>/dev/null)
for d in "$nv"/*/lib; do LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
export LD_LIBRARY_PATH
for layers in 3 12; do
  timeout 120 $bin bench gpt --device cuda --layers $layers --heads 12 --embed 768 --seq 1024 \
    --batch 8 --vocab 50257 --warmup 2 --steps 10
done
