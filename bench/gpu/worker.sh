#!/usr/bin/env bash
# The worker's GPU path on a GPU machine, in one call through the device tool (built here by
# `make gpu-worker`, carried in .gpu/): every NCCL collective against the CPU reference and the
# NCCL all-reduce table (one rank per GPU), the TCP ring on the same machine for comparison, and
# the NVML metrics of a running rank on /metrics. Writes $OUT/worker-gpu.log.
set -u
out=${OUT:-/tmp}/worker-gpu.log
exec > >(tee "$out") 2>&1
bin=./.gpu/lockstep-worker
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
gpus=$(nvidia-smi -L | wc -l)
nv=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]) + '/nvidia')" 2>/dev/null)
# cudarc tries libnccl.so and libnccl.so.<major> but not NCCL's soname libnccl.so.2: link it.
shim=$(mktemp -d); [ -e "$nv/nccl/lib/libnccl.so.2" ] && ln -s "$nv/nccl/lib/libnccl.so.2" "$shim/libnccl.so"
export LD_LIBRARY_PATH="$shim:$nv/nccl/lib:$nv/cublas/lib:$nv/cuda_nvrtc/lib:$nv/cuda_runtime/lib:${LD_LIBRARY_PATH:-}"
echo "== NCCL: collectives vs the CPU reference, then all_reduce ($gpus GPU(s))"
timeout 180 $bin bench allreduce --backend nccl --ranks "$gpus" --sizes 1K:256M
echo "== TCP ring on this machine, 2 and 4 ranks"
timeout 120 $bin bench allreduce --backend tcp --ranks 2 --sizes 1K:256M --factor 4
timeout 120 $bin bench allreduce --backend tcp --ranks 4 --sizes 1K:256M --factor 4
echo "== NVML metrics of a running rank, and NCCL set up through the rendezvous (one-rank gang, gpusPerWorker 1)"
work=$(mktemp -d)
cat > "$work/job.yaml" <<'YAML'
apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata: {name: gpu-metrics}
spec:
  parallelism: {dataParallel: 1, gpusPerWorker: 1}
  training:
    workload: Ddp
    model: {mlp: {hiddenSizes: [256]}}
    data: {kind: Digits, path: data/digits.csv.gz}
    batchSize: 32
    maxSteps: 100000
  template:
    spec:
      containers: [{name: worker, image: lockstep/worker:0.1.0}]
YAML
$bin local "$work/job.yaml" --workdir "$work/run" --no-progress > "$work/local.log" 2>&1 &
launcher=$!
python3 - <<'PY'
import glob, os, re, time, urllib.request
# Find rank 0's metrics port from its environment.
port = None
for _ in range(100):
    for env in glob.glob("/proc/[0-9]*/environ"):
        try:
            e = open(env, "rb").read().split(b"\0")
        except OSError:
            continue
        if b"LOCKSTEP_JOB=gpu-metrics" in e and b"LOCKSTEP_RANK=0" in e:
            port = [v for v in e if v.startswith(b"LOCKSTEP_METRICS_PORT=")][0].split(b"=")[1].decode()
    if port:
        break
    time.sleep(0.1)
time.sleep(7)
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
for l in text.splitlines():
    if re.match(r"lockstep_worker_(gpu_|step |loss |samples_per_second)", l):
        print(l)
print("NVML metrics present:", "lockstep_worker_gpu_utilization_ratio" in text)
PY
kill -INT $launcher 2>/dev/null; sleep 2; kill -9 $launcher 2>/dev/null
echo "== the NCCL communicator made from the rendezvous id"
grep -E "NCCL|gang formed|aborted|failed" "$work/local.log" | head -5
