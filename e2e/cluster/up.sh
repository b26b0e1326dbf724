#!/usr/bin/env bash
# Starts the test control plane as local processes on 127.0.0.1 (ports chosen free at start):
# etcd, kube-apiserver (TLS, static admin token, RBAC, the gang-scheduling feature gates),
# kube-controller-manager, kube-scheduler, and kwok with N fake nodes. Writes the kubeconfig to
# $STATE/kubeconfig and logs to $STATE/logs/. `down.sh` stops it all.
#   STATE   state folder (default: .cluster at the repository root)
#   NODES   fake nodes (default 4)
#   ONLY_APISERVER=1   start etcd and kube-apiserver only
#   REAL_NODES=1       also start one real node (realnode.sh: kubelet, containerd, CoreDNS; root)
#   KWOK_COMPLETE_JOB_PODS=0   pods a Job owns run on (kwok completes them at once by default)
#   NODE_LEASE_SECONDS=40      the fake nodes' lease duration (kwok renews at a quarter of it)
#   KWOK_POD_PARALLELISM=N     how many pods kwok moves through their stages at once (unset:
#                      kwok's default, 4; a real cluster has a kubelet per node)
#   NODE_MONITOR_GRACE=50s     how long the node-lifecycle controller waits for a renewal before
#                      it marks a node NotReady. The operator benchmark raises both: 1,000 nodes
#                      renewing every 10 s are 100 writes a second, more than kwok keeps up with
#                      on 2 cores, and the late nodes flap NotReady under the pods being timed.
#   SCHEDULERS=kueue,volcano,coscheduling   also start these (any of them), each with its CRDs:
#                      Kueue's controllers and scheduler with topology-aware scheduling
#                      (minimalkueue, no webhooks), Volcano's
#                      scheduler with a `default` Queue, scheduler-plugins' kube-scheduler with the
#                      Coscheduling plugin (scheduler name scheduler-plugins-scheduler)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
state=${STATE:-$root/.cluster}
nodes=${NODES:-4}
# shellcheck source=versions.env
source "$here/versions.env"
schedulers=$(echo "${SCHEDULERS:-}" | tr ',' ' ')
for s in $schedulers; do
  case "$s" in kueue|volcano|coscheduling) ;; *) echo "SCHEDULERS: unknown $s (kueue, volcano, coscheduling)" >&2; exit 2 ;; esac
done
bin=$("$here/build.sh" 2>/dev/null)
[ -z "$schedulers" ] || COMPONENTS="$schedulers" "$here/build.sh" >/dev/null
if [ -e "$state/pids" ] && "$here/status.sh" >/dev/null 2>&1; then
  for s in $schedulers; do
    grep -qx "$s" "$state/schedulers" 2>/dev/null ||
      echo "the running cluster has no $s: stop it (make cluster-down) and start it again with SCHEDULERS" >&2
  done
  echo "cluster already running: KUBECONFIG=$state/kubeconfig"; exit 0
fi
# A cluster of this state that died without down.sh: stop what is left of it first (a real
# node's pods, shims and iptables rules would outlive the folder).
[ -e "$state/pids" ] && { STATE="$state" "$here/down.sh" >/dev/null 2>&1 || true; }
rm -rf "$state"; mkdir -p "$state/logs" "$state/pki" "$state/etcd"
# A failed start leaves nothing running.
trap 'rc=$?; [ $rc = 0 ] || STATE="$state" "$here/down.sh" >/dev/null; exit $rc' EXIT
started=$(date +%s.%N)
log() { printf '[cluster-up] %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
spawn() { # name, command...: start in its own process group, remember the pid
  local name=$1; shift
  setsid "$@" >"$state/logs/$name.log" 2>&1 < /dev/null &
  echo "$name $!" >> "$state/pids"
}

# --- PKI: a CA, the apiserver's serving cert (IP SAN 127.0.0.1), the service-account key pair.
pki=$state/pki
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=lockstep-test-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$pki/apiserver.key" \
  -out "$pki/apiserver.csr" 2>/dev/null
# 10.96.0.1: the `kubernetes` Service, how pods on a real node reach the API server.
printf 'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' > "$pki/san.ext"
openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
  -days 3650 -extfile "$pki/san.ext" -out "$pki/apiserver.crt" 2>/dev/null
openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
token=$(openssl rand -hex 16)
echo "$token,admin,admin,system:masters" > "$pki/tokens.csv"

# --- etcd
etcd_client=$(free_port); etcd_peer=$(free_port)
spawn etcd "$bin/etcd" --data-dir "$state/etcd" --name test \
  --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "test=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync --quota-backend-bytes=4294967296

# --- kube-apiserver
api_port=$(free_port)
gates="GenericWorkload=true,GangScheduling=true"
spawn kube-apiserver "$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_client" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" \
  --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-cluster-ip-range 10.96.0.0/16 --allow-privileged=true \
  --feature-gates "$gates" --runtime-config "scheduling.k8s.io/v1alpha2=true" \
  --enable-priority-and-fairness=false --max-requests-inflight 2000 --max-mutating-requests-inflight 1000 \
  --kubelet-preferred-address-types InternalIP,Hostname

cat > "$state/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: lockstep-test
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: lockstep-test
  context: {cluster: lockstep-test, user: admin}
current-context: lockstep-test
KC
export KUBECONFIG=$state/kubeconfig
kubectl="$bin/kubectl"
for _ in $(seq 1 240); do
  "$kubectl" get --raw /readyz >/dev/null 2>&1 && break
  sleep 0.5
done
"$kubectl" get --raw /readyz >/dev/null || { log "kube-apiserver not ready; see $state/logs/kube-apiserver.log"; exit 1; }
log "kube-apiserver ready on 127.0.0.1:$api_port after $(python3 -c "import time; print(round(time.time()-$started,1))")s"
[ "${ONLY_APISERVER:-0}" = 1 ] && { echo "export KUBECONFIG=$state/kubeconfig"; exit 0; }

# --- kube-controller-manager: garbage collection, namespaces, service accounts, endpoints, and
# node lifecycle (it lifts the not-ready taint once kwok reports a node Ready; kwok keeps the node
# leases fresh, so nodes stay Ready while kwok runs).
spawn kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig "$state/kubeconfig" --authentication-kubeconfig "$state/kubeconfig" \
  --authorization-kubeconfig "$state/kubeconfig" \
  --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false \
  --controllers '*,-service-lb-controller,-cloud-node-lifecycle,-node-route-controller' \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --use-service-account-credentials=false --feature-gates "$gates" \
  --kube-api-qps 500 --kube-api-burst 1000 --concurrent-gc-syncs 20 --concurrent-job-syncs 32 \
  --node-monitor-grace-period "${NODE_MONITOR_GRACE:-50s}" \
  --flex-volume-plugin-dir "$state/flexvolume"

# --- kube-scheduler with the gang-scheduling gates.
spawn kube-scheduler "$bin/kube-scheduler" \
  --kubeconfig "$state/kubeconfig" --authentication-kubeconfig "$state/kubeconfig" \
  --authorization-kubeconfig "$state/kubeconfig" \
  --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false --feature-gates "$gates" \
  --kube-api-qps 500 --kube-api-burst 1000

# --- kwok: fake nodes and pod lifecycles. Its Stage definitions ship inside its Go module.
kwok_dir=$(GOWORK=off GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kwok@v$KWOK_VERSION" \
  | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
stages="$kwok_dir/kustomize/stage"
{
  # pod-complete ends the pods a Job owns as soon as they run; KWOK_COMPLETE_JOB_PODS=0 (the
  # operator benchmark) leaves it out, so that JobSet's pods run on like every other gang's.
  complete=pod/fast/pod-complete.yaml
  [ "${KWOK_COMPLETE_JOB_PODS:-1}" = 0 ] && complete=
  # KWOK_POD_PARALLELISM: kwok's own options (its flags below take precedence). Given a
  # configuration, kwok v0.8.0 defaults none of its options, so the others are its defaults.
  if [ -n "${KWOK_POD_PARALLELISM:-}" ]; then
    case "$KWOK_POD_PARALLELISM" in ''|*[!0-9]*) echo "KWOK_POD_PARALLELISM: a number" >&2; exit 2 ;; esac
    printf -- '---\napiVersion: config.kwok.x-k8s.io/v1alpha1\nkind: KwokConfiguration\noptions:\n  podPlayStageParallelism: %s\n  nodePlayStageParallelism: 4\n  nodeLeaseParallelism: 4\n  podsOnNodeSyncParallelism: 1\n  enableDebuggingHandlers: true\n  enableProfilingHandler: true\n  enablePodsOnNodeSyncListPager: true\n' \
      "$KWOK_POD_PARALLELISM"
  fi
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml $complete pod/fast/pod-delete.yaml; do
    echo "---"; cat "$stages/$f"
  done
} > "$state/kwok.yaml"
spawn kwok "$bin/kwok" --kubeconfig "$state/kubeconfig" --config "$state/kwok.yaml" \
  --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
  --node-lease-duration-seconds "${NODE_LEASE_SECONDS:-40}" --server-address "127.0.0.1:$(free_port)" --cidr 10.0.0.0/16

# --- fake nodes: NODES nodes with 8 GPUs each, NODES_PER_RACK to a rack (and NVLink domain),
# two racks to a zone.
"$here/nodes.sh" "$nodes" | "$kubectl" apply -f - >/dev/null
for _ in $(seq 1 240); do
  # Ready and no longer tainted not-ready by the node-lifecycle controller.
  ready=$("$kubectl" get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{.spec.taints}{"\n"}{end}' 2>/dev/null | grep -c '^True $' || true)
  [ "$ready" -ge "$nodes" ] && break
  sleep 0.5
done
[ "$ready" -ge "$nodes" ] || { log "only $ready of $nodes nodes Ready; see $state/logs/kwok.log"; exit 1; }
# The controller-manager creates the default ServiceAccount in each namespace; wait for it in
# `default` so the first pod does not race it.
for _ in $(seq 1 240); do
  "$kubectl" get serviceaccount default -n default >/dev/null 2>&1 && break
  sleep 0.5
done
# --- external schedulers. Their CRDs come from their Go modules, like kwok's stages.
module_dir() { GOWORK=off GOFLAGS=-mod=mod go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'; }
wait_http() { # name, url: up to 120 s
  for _ in $(seq 1 240); do curl -skf "$2" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "$1 not ready; see $state/logs/$1.log"; return 1
}
for s in $schedulers; do
  s_start=$(date +%s.%N)
  case "$s" in
    kueue)
      dir=$(module_dir "sigs.k8s.io/kueue@v$KUEUE_VERSION")
      for f in "$dir"/config/components/crd/bases/*.yaml; do
        "$kubectl" apply --server-side -f "$f" >/dev/null
      done
      "$kubectl" wait --for condition=Established crd --all --timeout 60s >/dev/null
      port=$(free_port)
      spawn kueue "$bin/minimalkueue-v$KUEUE_VERSION" \
        --metricsPort "$port" --zap-log-level info --enableTAS
      # controller-runtime serves metrics once the manager runs: Kueue is up then. (minimalkueue
      # binds them on every interface: its one flag is the port.)
      wait_http kueue "http://127.0.0.1:$port/metrics" ;;
    volcano)
      dir=$(module_dir "volcano.sh/volcano@v$VOLCANO_VERSION")
      for f in "$dir"/installer/helm/chart/volcano/crd/bases/*.yaml; do
        "$kubectl" apply --server-side -f "$f" >/dev/null
      done
      "$kubectl" wait --for condition=Established crd --all --timeout 60s >/dev/null
      "$kubectl" apply -f - >/dev/null <<Q
apiVersion: scheduling.volcano.sh/v1beta1
kind: Queue
metadata: {name: default}
spec: {weight: 1, reclaimable: true}
Q
      port=$(free_port)
      spawn volcano "$bin/vc-scheduler-v$VOLCANO_VERSION" --kubeconfig "$state/kubeconfig" \
        --scheduler-name volcano --leader-elect=false --schedule-period 200ms \
        --listen-address "127.0.0.1:$(free_port)" --enable-healthz --healthz-address "127.0.0.1:$port" \
        --kube-api-qps 500 --kube-api-burst 1000 --cache-dumper=false
      wait_http volcano "http://127.0.0.1:$port/healthz" ;;
    coscheduling)
      dir=$(module_dir "sigs.k8s.io/scheduler-plugins@v$SCHEDULER_PLUGINS_VERSION")
      "$kubectl" apply --server-side -f "$dir/manifests/coscheduling/crd.yaml" >/dev/null
      "$kubectl" wait --for condition=Established crd --all --timeout 60s >/dev/null
      cat > "$state/coscheduling.yaml" <<CFG
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
leaderElection: {leaderElect: false}
clientConnection: {kubeconfig: "$state/kubeconfig", qps: 500, burst: 1000}
profiles:
- schedulerName: scheduler-plugins-scheduler
  plugins:
    multiPoint:
      enabled: [{name: Coscheduling}]
    queueSort:
      enabled: [{name: Coscheduling}]
      disabled: [{name: "*"}]
  pluginConfig:
  - name: Coscheduling
    args: {permitWaitingTimeSeconds: 10}
CFG
      port=$(free_port)
      spawn coscheduling "$bin/scheduler-plugins-v$SCHEDULER_PLUGINS_VERSION" \
        --config "$state/coscheduling.yaml" --authentication-kubeconfig "$state/kubeconfig" \
        --authorization-kubeconfig "$state/kubeconfig" --bind-address 127.0.0.1 --secure-port "$port"
      wait_http coscheduling "https://127.0.0.1:$port/healthz" ;;
  esac
  log "$s ready after $(python3 -c "import time; print(round(time.time()-$s_start,1))")s"
  echo "$s" >> "$state/schedulers"   # what the tests read to know which schedulers run
done

if [ "${REAL_NODES:-0}" = 1 ]; then
  "$here/realnode.sh" up "$state" "$api_port"
fi
log "cluster up with $nodes nodes after $(python3 -c "import time; print(round(time.time()-$started,1))")s"
echo "export KUBECONFIG=$state/kubeconfig"
