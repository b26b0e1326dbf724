#!/usr/bin/env bash
# PRES benchmark: TGN and JODIE on CollegeMsg and bitcoin-otc, temporal batch B and 4B, plain and
# with PRES, several seeds; PyTorch Geometric's TGN (bench/pres/pyg_tgn.py) side by side on the
# same split, batch sizes and machine, in the same run. Prints one JSON line per run, then the
# table (bench/pres/table.py). Results go to bench/results/pres-<machine>-<date>.jsonl.
#
#   bench/pres/run.sh                     # EPOCHS=5 SEEDS="0 1 2" B=200 DATA="collegemsg bitcoin-otc"
#   EPOCHS=2 SEEDS=0 PYG=0 bench/pres/run.sh
#   PRES_ONLY=1 PRES_GAMMA=0.1 bench/pres/run.sh   # only the PRES runs, another gamma
#
# PyG comes from a venv of PyPI wheels (torch 2.5.1 as worker/tests/hf pins it, torch_geometric
# 2.6.1, scikit-learn), built once into $LOCKSTEP_CACHE/pyg-venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
EPOCHS=${EPOCHS:-5}
SEEDS=${SEEDS:-0 1 2}
B=${B:-200}
DATA=${DATA:-collegemsg bitcoin-otc}
PYG=${PYG:-1}
PRES_GAMMA=${PRES_GAMMA:-0.9}
PRES_ONLY=${PRES_ONLY:-0}
MACHINE=${MACHINE:-cpu}
CACHE=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
OUT=bench/results/pres-$MACHINE-$(date +%F).jsonl
[ "$PRES_ONLY" = 1 ] && { OUT=bench/results/pres-only-gamma-$PRES_GAMMA-$MACHINE-$(date +%F).jsonl; PYG=0; }
cargo build --release --locked -q -p lockstep-worker
WORKER=$CARGO_TARGET_DIR/release/lockstep-worker
if [ "$PYG" = 1 ]; then
  VENV=$CACHE/pyg-venv
  if ! "$VENV/bin/python" -c 'import torch_geometric, sklearn' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r worker/tests/hf/requirements.txt torch_geometric==2.6.1 scikit-learn==1.9.1
  fi
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
: > "$OUT"

file_of() { case $1 in collegemsg) echo data/collegemsg.txt.gz ;; bitcoin-otc) echo data/bitcoin-otc.csv.gz ;; *) echo "$1" ;; esac; }

ours() { # data model batch pres seed
  local data=$1 model=$2 batch=$3 pres=$4 seed=$5 beta=0
  [ "$pres" = true ] && beta=0.1
  cat > "$tmp/job.yaml" <<YAML
apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata: {name: bench-pres}
spec:
  parallelism: {dataParallel: 1}
  training:
    workload: Pres
    model: {tgn: {memoryDim: 172, timeDim: 100, embeddingDim: 100, neighbors: 10, heads: 2, memoryModel: $model}}
    data: {kind: TemporalGraph, path: $(file_of "$data")}
    optimizer: {learningRate: 0.0001, schedule: Constant}
    epochs: $EPOCHS
    seed: $seed
    pres: {temporalBatch: $batch, predictionCorrection: $pres, gamma: $PRES_GAMMA, coherenceWeight: $beta}
    evaluation: {everySteps: 100000000}
  template:
    spec:
      containers: [{name: worker, image: lockstep/worker:0.1.0}]
YAML
  local log=$tmp/log
  "$WORKER" local "$tmp/job.yaml" > "$log" 2>&1 || { cat "$log" >&2; exit 1; }
  python3 - "$log" "$data" "$model" "$batch" "$pres" "$seed" "$EPOCHS" <<'PY'
import json, re, sys
log, data, model, batch, pres, seed, epochs = sys.argv[1:]
text = open(log).read()
def field(name):
    return float(re.findall(rf"\b{name}=([0-9.eE+-]+)", text)[-1])
print(json.dumps({"system": "lockstep", "data": data, "model": model.upper(), "batch": int(batch),
                  "pres": pres == "true", "seed": int(seed), "epochs": int(epochs),
                  "gamma": float(re.findall(r"gamma=([0-9.]+)", text)[0]),
                  "epoch_s": field("train_s") / int(epochs), "val_ap": field("val_ap"),
                  "test_ap": field("test_ap"), "test_auc": field("test_auc"),
                  "test_ap_inductive": field("test_ap_inductive")}))
PY
}

pyg() { # data batch seed
  "$CACHE/pyg-venv/bin/python" bench/pres/pyg_tgn.py --data "$(file_of "$1")" --batch "$2" \
    --epochs "$EPOCHS" --seed "$3" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); r["data"] = sys.argv[1]; r["model"] = "TGN"; r["pres"] = False
r["epoch_s"] = sum(r["epoch_s"]) / len(r["epoch_s"]); print(json.dumps(r))' "$1"
}

for data in $DATA; do
  for seed in $SEEDS; do
    for model in Tgn Jodie; do
      if [ "$PRES_ONLY" != 1 ]; then
        ours "$data" $model "$B" false "$seed" | tee -a "$OUT"
        ours "$data" $model $((4 * B)) false "$seed" | tee -a "$OUT"
      fi
      ours "$data" $model $((4 * B)) true "$seed" | tee -a "$OUT"
    done
    if [ "$PYG" = 1 ]; then
      pyg "$data" "$B" "$seed" | tee -a "$OUT"
      pyg "$data" $((4 * B)) "$seed" | tee -a "$OUT"
    fi
  done
done
python3 bench/pres/table.py "$OUT" | tee "${OUT%.jsonl}.table"
