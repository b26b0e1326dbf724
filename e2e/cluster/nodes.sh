#!/usr/bin/env bash
# Prints a List of N fake GPU nodes for kwok: cpu, memory, pods and nvidia.com/gpu (8 each) in
# capacity and allocatable, and topology labels: zone, rack and NVLink domain (NODES_PER_RACK
# nodes to a rack, two racks to a zone), hostname.
set -euo pipefail
n=${1:-4}
per_rack=${NODES_PER_RACK:-2}
gpus=${GPUS_PER_NODE:-8}
echo "apiVersion: v1"
echo "kind: List"
echo "items:"
for ((i = 0; i < n; i++)); do
  rack=$((i / per_rack)); zone=$((rack / 2))
  name=$(printf 'node-%04d' "$i")
  cat <<NODE
- apiVersion: v1
  kind: Node
  metadata:
    name: $name
    annotations:
      kwok.x-k8s.io/node: fake
      node.alpha.kubernetes.io/ttl: "0"
    labels:
      kubernetes.io/hostname: $name
      kubernetes.io/os: linux
      kubernetes.io/arch: amd64
      type: kwok
      topology.kubernetes.io/zone: zone-$zone
      topology.lockstep.dev/rack: rack-$rack
      topology.lockstep.dev/nvlink-domain: nvl-$rack
      nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3
  spec: {}
  status:
    allocatable: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "$gpus"}
    capacity: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "$gpus"}
NODE
done
