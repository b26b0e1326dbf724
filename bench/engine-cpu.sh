#!/usr/bin/env bash
# The engine on this machine's CPU: tokens/s of examples/gpt-shakespeare.yaml's GPT on 1 rank
# (bench gpt, median of 10 steps), then the example itself for STEPS steps on 2 ranks with
# `local`, whose ranks report gradient communication, the part of it exposed (not hidden behind
# backward) and the overlap ratio. Run by `make bench-engine`; BIN=path/to/lockstep-worker runs
# another build (to compare two builds side by side in one session, alternate them).
set -euo pipefail
bin=${BIN:-${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}/target/release/lockstep-worker}
steps=${STEPS:-100}
echo "== 1 rank, all cores"
"$bin" bench gpt --device cpu --layers 4 --heads 4 --embed 128 --seq 128 --batch 16 --vocab 65 \
  --warmup 2 --steps 10
echo "== 2 ranks (local), $steps steps of examples/gpt-shakespeare.yaml"
work=$(mktemp -d)
sed -e "s/maxSteps: [0-9]*/maxSteps: $steps/" examples/gpt-shakespeare.yaml > "$work/job.yaml"
"$bin" local "$work/job.yaml" --workdir "$work/run" --no-progress 2>&1 \
  | grep "training finished" | sed -e 's/.*INFO //' -e 's/params_digest=.*//'
awk -v s="$steps" 'BEGIN{print "(comm_s and exposed_comm_s are totals over " s " steps)"}'
rm -rf "$work"
