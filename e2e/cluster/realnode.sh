#!/usr/bin/env bash
# The test cluster's real node (REAL_NODES=1): kubelet, containerd and runc running pods for real
# beside the kwok nodes, on a bridge of its own, with CoreDNS for the cluster's names. Called by
# up.sh and down.sh; the settings follow a probe of this machine kind (the project's shared notes,
# real-node.md), each commented where it is made.
#   realnode.sh up STATE API_PORT   start it (STATE/pids gets its processes), import the images of
#                                   `make images` (IMAGES_DIR, default target/images; NODE_IMAGES,
#                                   default "worker operator"), wait until the node is Ready
#   realnode.sh stop-pods STATE     kill every pod's processes and shims (before the processes stop)
#   realnode.sh clean STATE         undo what it did outside STATE (after the processes stopped)
#   realnode.sh leftovers STATE     list what a stopped node left behind; fails when anything
#
# Machine-wide: one real node per machine (the bridge, 10.96.0.1, /kubepods, port 10250). The
# cluster that runs it owns $OWNER (its state folder); another `up` waits until that cluster is
# down (REAL_NODE_WAIT seconds, default 1800), or takes the node over when its owner is gone.
# Pod traffic never leaves the machine: a FORWARD rule drops what pods send to any interface but
# their bridge, and pods reach only the API server (10.96.0.1:443, DNAT to 127.0.0.1), CoreDNS on
# the bridge, and each other.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cmd=${1:?usage: realnode.sh up|stop-pods|clean|leftovers STATE [API_PORT]}
state=${2:?state folder}
node_dir=$state/node
BRIDGE=lockstep0
GATEWAY=10.244.0.1
SUBNET=10.244.0.0/24
SERVICE_IP=10.96.0.1
NODE_NAME=lockstep-real-0
# The label and taint that keep every other pod off the real node.
NODE_LABEL=lockstep.dev/real-node
OWNER=${REAL_NODE_OWNER:-/run/lockstep-real-node.owner}
log() { printf '[real-node] %s\n' "$*" >&2; }

# Whether any process of the cluster whose state folder is $1 still runs (its command line
# names the folder, so a recycled pid does not count).
cluster_alive() {
  local name pid
  [ -r "$1/pids" ] || return 1
  while read -r name pid; do
    kill -0 "$pid" 2>/dev/null || continue
    # etcd, the apiserver, ... all take a path under the state folder.
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF "$1" && return 0
  done < "$1/pids"
  return 1
}

# Whether the machine's real node belongs to another cluster than this one (then this cluster
# must not touch what is machine-wide: the pods' cgroups, the bridge, iptables, kubelet's files).
owned_by_another() {
  local owner
  owner=$(cat "$OWNER" 2>/dev/null || true)
  [ -n "$owner" ] && [ "$owner" != "$state" ]
}

# Takes the machine's real node for this cluster: waits while another live cluster has it, and
# cleans up after one that died without `down`. The check and the claim are made under a lock.
acquire() {
  local waited=0 limit=${REAL_NODE_WAIT:-1800} owner
  exec 9>"$OWNER.lock"
  while :; do
    flock 9
    owner=$(cat "$OWNER" 2>/dev/null || true)
    if [ -n "$owner" ] && [ "$owner" != "$state" ] && cluster_alive "$owner"; then
      flock -u 9
      [ $waited = 0 ] && log "the real node belongs to the cluster in $owner (one per machine): waiting up to ${limit}s"
      [ $waited -ge "$limit" ] && { log "gave up waiting for the real node of $owner"; exit 1; }
      sleep 2; waited=$((waited + 2))
      continue
    fi
    if [ -n "$owner" ] && [ "$owner" != "$state" ]; then
      log "the cluster in $owner left the real node without stopping it: cleaning up after it"
      (state=$owner; node_dir=$owner/node; stop_pods; clean) || true
      # Its down.sh must not tear down the node this cluster is about to run.
      rm -f "$owner/pids"
    fi
    echo "$state" > "$OWNER"
    flock -u 9
    break
  done
  exec 9>&-
  [ $waited = 0 ] || log "the real node is free after ${waited}s"
}

release() {
  [ "$(cat "$OWNER" 2>/dev/null)" = "$state" ] && rm -f "$OWNER"
  return 0
}

stop_pods() {
  local sock=$node_dir/containerd.sock
  # Every process of every pod (their cgroups: machine-wide, so only while the node is this
  # cluster's), then the shims that supervise them.
  if ! owned_by_another; then
    for procs in /sys/fs/cgroup/*/kubepods/cgroup.procs /sys/fs/cgroup/*/kubepods/*/cgroup.procs \
      /sys/fs/cgroup/*/kubepods/*/*/cgroup.procs /sys/fs/cgroup/*/kubepods/*/*/*/cgroup.procs; do
      [ -r "$procs" ] || continue
      { while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done < "$procs"; } 2>/dev/null || true
    done
  fi
  # A shim's command line is `containerd-shim-runc-v2 -namespace k8s.io -id <id> -address <sock>`.
  local shims="containerd-shim-runc-v2 -namespace k8s.io .*-address $sock"
  pkill -KILL -f "$shims" 2>/dev/null || true
  for _ in $(seq 1 50); do pgrep -f "$shims" >/dev/null || break; sleep 0.1; done
}

clean() {
  # Mounts under the state folder (kubelet bind-mounts its root dir onto itself; overlays and
  # network namespaces), deepest first.
  if [ -d "$node_dir" ]; then
    awk -v d="$node_dir" '$2 ~ "^"d {print $2}' /proc/self/mounts | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
    # containerd's content store and snapshots: the images, unpacked (gigabytes with PyTorch).
    rm -rf "$node_dir/containerd" 2>/dev/null || log "could not remove $node_dir/containerd"
  fi
  # What is machine-wide belongs to the cluster that owns the node now, if another does.
  if owned_by_another; then
    log "the real node now belongs to the cluster in $(cat "$OWNER"): leaving it as it is"
    return 0
  fi
  # The pods' cgroups, depth first.
  for root in /sys/fs/cgroup/*/kubepods; do
    [ -d "$root" ] && find "$root" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  for t in 4 6; do
    ipt=iptables; [ $t = 6 ] && ipt=ip6tables
    command -v "$ipt" >/dev/null || continue
    if [ $t = 4 ]; then
      while iptables -D FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP 2>/dev/null; do :; done
      while { iptables -t nat -S PREROUTING 2>/dev/null || true; } | grep -q -- "-i $BRIDGE"; do
        rule=$(iptables -t nat -S PREROUTING | grep -- "-i $BRIDGE" | head -1 | sed 's/^-A /-D /')
        # shellcheck disable=SC2086
        iptables -t nat $rule 2>/dev/null || break
      done
    fi
    # kubelet's own chains.
    for table in filter nat mangle; do
      for chain in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do
        { $ipt -t $table -S 2>/dev/null | grep -- "-j $chain" || true; } | sed 's/^-A /-D /' |
          while read -r r; do
            # shellcheck disable=SC2086
            $ipt -t $table $r 2>/dev/null || true
          done
        $ipt -t $table -F $chain 2>/dev/null || true
        $ipt -t $table -X $chain 2>/dev/null || true
      done
    done
  done
  # What kubelet, containerd and the CNI plugins write outside their configured folders.
  # Never stop halfway (ip_forward and the node's ownership are restored below); what could not
  # be removed, `leftovers` reports.
  rm -rf /var/lib/kubelet/device-plugins /var/lib/kubelet/plugins_registry /var/lib/kubelet/plugins \
    /var/lib/kubelet/pod-resources /usr/libexec/kubernetes /var/log/containers /var/lib/cni \
    /run/containerd /run/netns || log "could not remove all that kubelet and containerd left"
  rmdir /var/lib/kubelet 2>/dev/null || true
  if [ -e "$node_dir/ip_forward" ]; then
    cat "$node_dir/ip_forward" > /proc/sys/net/ipv4/ip_forward
  fi
  release
}

# What a stopped real node may have left behind; prints each and fails when there is any.
leftovers() {
  local found=0
  say() { echo "left behind: $*"; found=1; }
  local p
  for p in $(pgrep -f "$node_dir" 2>/dev/null); do say "process $p: $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null)"; done
  awk -v d="$node_dir" '$2 ~ "^"d {print $2}' /proc/self/mounts | while read -r m; do echo "left behind: mount $m"; done
  awk -v d="$node_dir" '$2 ~ "^"d {f=1} END {exit !f}' /proc/self/mounts && found=1
  # The rest is machine-wide: another cluster's, once it owns the node.
  owned_by_another && return $found
  for d in /sys/fs/cgroup/*/kubepods; do [ -d "$d" ] && say "cgroup $d"; done
  ip link show "$BRIDGE" >/dev/null 2>&1 && say "bridge $BRIDGE"
  local rules
  rules=$({ iptables-save 2>/dev/null; ip6tables-save 2>/dev/null; } | grep -E -- "$BRIDGE|KUBE-" || true)
  [ -n "$rules" ] && say "iptables: $(echo "$rules" | tr '\n' ';')"
  [ "$(cat "$OWNER" 2>/dev/null)" = "$state" ] && say "$OWNER"
  for f in /var/lib/kubelet /usr/libexec/kubernetes /var/log/containers /var/lib/cni /run/containerd /run/netns; do
    [ -e "$f" ] && say "$f"
  done
  if [ -e "$node_dir/ip_forward" ] && [ "$(cat /proc/sys/net/ipv4/ip_forward)" != "$(cat "$node_dir/ip_forward")" ]; then
    say "net.ipv4.ip_forward changed"
  fi
  return $found
}

up() {
  local api_port=${1:?api port}
  [ "$(id -u)" = 0 ] || { log "a real node needs root (kubelet, containerd, the bridge)"; exit 1; }
  command -v iptables >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null
  }
  acquire
  local bin
  bin=$("$here/node-build.sh")
  local kbin
  kbin=$("$here/build.sh" 2>/dev/null)
  mkdir -p "$node_dir"/{cni/net.d,cni/ipam,containerd/root,containerd/state,kubelet,logs}
  # The kubelet evicts every pod when its disk runs low: say so now rather than after the tests.
  local free
  free=$(df -P --block-size=1M "$node_dir" | awk 'NR == 2 {print $4}')
  [ "$free" -ge 2048 ] || { log "only ${free} MiB free under $node_dir; the node needs 2 GiB"; exit 1; }
  cat /proc/sys/net/ipv4/ip_forward > "$node_dir/ip_forward"
  # --- the bridge, and the rules that keep pod traffic on this machine.
  ip link add "$BRIDGE" type bridge 2>/dev/null || true
  ip addr replace "$GATEWAY/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  echo 1 > "/proc/sys/net/ipv4/conf/$BRIDGE/route_localnet"
  iptables -C FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP 2>/dev/null ||
    iptables -I FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP
  iptables -t nat -A PREROUTING -i "$BRIDGE" -d "$SERVICE_IP/32" -p tcp --dport 443 \
    -j DNAT --to-destination "127.0.0.1:$api_port"
  # --- CNI: the bridge plugin on lockstep0, addresses from host-local, no masquerade.
  cat > "$node_dir/cni/net.d/10-lockstep.conflist" <<CNI
{"cniVersion": "1.0.0", "name": "lockstep", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "isDefaultGateway": true,
   "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$node_dir/cni/ipam",
            "ranges": [[{"subnet": "$SUBNET", "rangeStart": "10.244.0.10", "gateway": "$GATEWAY"}]]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
CNI
  # --- containerd: everything under the state folder; restrict_oom_score_adj because this
  # machine's sandbox lacks CAP_SYS_RESOURCE.
  local sock=$node_dir/containerd.sock
  cat > "$node_dir/containerd.toml" <<TOML
version = 3
root = '$node_dir/containerd/root'
state = '$node_dir/containerd/state'
[grpc]
  address = '$sock'
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = 'registry.k8s.io/pause:3.10'
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_cdi = false
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    BinaryName = '$bin/runc'
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['$bin/cni']
    conf_dir = '$node_dir/cni/net.d'
TOML
  setsid env PATH="$bin:$PATH" "$bin/containerd" --config "$node_dir/containerd.toml" \
    > "$state/logs/containerd.log" 2>&1 < /dev/null &
  echo "containerd $!" >> "$state/pids"
  for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || { log "containerd did not start; see $state/logs/containerd.log"; exit 1; }
  "$bin/ctr" --address "$sock" -n k8s.io images import --base-name registry.k8s.io/pause \
    "$bin/pause.oci.tar" >/dev/null
  "$bin/ctr" --address "$sock" -n k8s.io images label registry.k8s.io/pause:3.10 \
    io.cri-containerd.pinned=pinned >/dev/null
  # --- the project's images from `make images`, under the names the examples and the chart use.
  local images=${IMAGES_DIR:-$root/target/images} version
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
  # NODE_IMAGES: which (default: worker operator; `make e2e-torch`: worker pytorch, gigabytes).
  local pair name
  for name in ${NODE_IMAGES:-worker operator}; do
    case "$name" in
      worker) pair=lockstep-worker:docker.io/lockstep/worker ;;
      operator) pair=lockstep-operator:ghcr.io/lockstep-dev/lockstep-operator ;;
      pytorch) pair=lockstep-pytorch:docker.io/lockstep/pytorch ;;
      *) log "NODE_IMAGES: no image $name (worker, operator, pytorch)"; exit 1 ;;
    esac
    local archive=$images/${pair%%:*}-$version.oci.tar
    if [ -e "$archive" ]; then
      "$bin/ctr" --address "$sock" -n k8s.io images import --base-name "${pair#*:}" "$archive" >/dev/null
      log "imported ${pair#*:}:$version"
    else
      log "no $archive (make images): ${pair#*:}:$version is not on the node"
    fi
  done
  # --- CoreDNS on the bridge: the cluster's names from the API server.
  cat > "$node_dir/Corefile" <<DNS
cluster.local:53 {
  bind $GATEWAY
  errors
  cache 5
  kubernetes cluster.local {
    kubeconfig $state/kubeconfig
  }
}
DNS
  setsid "$bin/coredns" -conf "$node_dir/Corefile" > "$state/logs/coredns.log" 2>&1 < /dev/null &
  echo "coredns $!" >> "$state/pids"
  printf 'nameserver %s\nsearch svc.cluster.local cluster.local\noptions ndots:5\n' "$GATEWAY" \
    > "$node_dir/resolv.conf"
  # --- kubelet, with the admin credentials (the test cluster authorizes with RBAC only).
  cat > "$node_dir/kubelet.yaml" <<KUBELET
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$sock
address: $GATEWAY
port: 10250
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
clusterDNS: [$GATEWAY]
clusterDomain: cluster.local
resolvConf: $node_dir/resolv.conf
podLogsDir: $node_dir/pods-logs
podCIDR: $SUBNET
maxPods: 30
serializeImagePulls: false
evictionHard: {memory.available: "100Mi", nodefs.available: "512Mi", imagefs.available: "512Mi"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
registerWithTaints:
- {key: $NODE_LABEL, value: "true", effect: NoSchedule}
KUBELET
  setsid "$bin/kubelet" --config "$node_dir/kubelet.yaml" --kubeconfig "$state/kubeconfig" \
    --root-dir "$node_dir/kubelet" --cert-dir "$node_dir/kubelet/pki" \
    --hostname-override "$NODE_NAME" --node-ip "$GATEWAY" \
    --node-labels "$NODE_LABEL=true,topology.lockstep.dev/rack=real" \
    > "$state/logs/kubelet.log" 2>&1 < /dev/null &
  echo "kubelet $!" >> "$state/pids"
  for _ in $(seq 1 120); do
    ready=$("$kbin/kubectl" --kubeconfig "$state/kubeconfig" get node "$NODE_NAME" \
      -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
    [ "$ready" = True ] && break
    sleep 0.5
  done
  [ "$ready" = True ] || { log "$NODE_NAME not Ready; see $state/logs/kubelet.log"; exit 1; }
  log "$NODE_NAME Ready (label and taint $NODE_LABEL=true)"
}

case "$cmd" in
  up) up "${3:-}" ;;
  stop-pods) stop_pods ;;
  clean) clean ;;
  leftovers) leftovers ;;
  *) log "unknown command $cmd"; exit 2 ;;
esac
