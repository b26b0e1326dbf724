#!/usr/bin/env bash
# Builds the pinned test control plane from Go modules (nothing prebuilt is downloaded) into a cache
# outside the clone, keyed by version, and prints the bin directory. A second run finds the cached
# binaries and costs seconds.
#   LOCKSTEP_CACHE  cache root (default ~/.cache/lockstep)
#   COMPONENTS      subset to build (default: the control plane; the external schedulers,
#                   kueue, volcano and coscheduling, are built when named here or by up.sh; the
#                   benchmark's peers, jobset and training-operator, when named here)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}
bin="$cache/cluster/k$KUBE_VERSION-e$ETCD_VERSION-w$KWOK_VERSION-h$HELM_VERSION/bin"
mkdir -p "$bin"
export GOWORK=off CGO_ENABLED=0 GOFLAGS="-mod=mod -trimpath"
minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
kube_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v$KUBE_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=v$KUBE_VERSION \
 -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"

want=${COMPONENTS:-"etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm"}
log() { printf '[build] %s\n' "$*" >&2; }
# module@version, package, output: builds a main package of a module as that module's own build
# does, in a writable copy of its source, so that its go.mod's replace directives apply (they do
# not through `go install pkg@version`).
build_module() {
  local dir tmp
  dir=$(go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [ -n "$dir" ] || { log "cannot download $1"; return 1; }
  tmp=$(mktemp -d); cp -r "$dir/." "$tmp"; chmod -R u+w "$tmp"
  (cd "$tmp" && go build -ldflags "-s -w" -o "$3" "$2") || { rm -rf "$tmp"; return 1; }
  rm -rf "$tmp"
}
# The cached file name of each external scheduler carries its version.
ext_name() {
  case "$1" in
    kueue) echo "minimalkueue-v$KUEUE_VERSION" ;;
    volcano) echo "vc-scheduler-v$VOLCANO_VERSION" ;;
    coscheduling) echo "scheduler-plugins-v$SCHEDULER_PLUGINS_VERSION" ;;
    jobset) echo "jobset-v$JOBSET_VERSION" ;;
    training-operator) echo "training-operator-v$TRAINING_OPERATOR_VERSION" ;;
  esac
}
for c in $want; do
  out=$c
  case "$c" in kueue|volcano|coscheduling|jobset|training-operator) out=$(ext_name "$c") ;; esac
  if [ -x "$bin/$out" ]; then log "$c: cached"; continue; fi
  start=$(date +%s)
  case "$c" in
    etcd)
      (cd "$here/etcd" && go build -ldflags "-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3) ;;
    kube-apiserver|kube-controller-manager|kube-scheduler|kubectl)
      (cd "$here/kube" && go build -ldflags "$kube_ldflags" -o "$bin/$c.tmp" "k8s.io/kubernetes/cmd/$c") ;;
    kwok)
      GOBIN="$bin/.gobin" go install -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION"
      mv "$bin/.gobin/kwok" "$bin/kwok.tmp" ;;
    helm)
      GOBIN="$bin/.gobin" go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION" \
        "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
      mv "$bin/.gobin/helm" "$bin/helm.tmp" ;;
    # Kueue's controllers and scheduler without its webhooks (minimalkueue, the entry point of
    # Kueue's own performance tests): no certificates to make, and the operator writes complete
    # Workloads, which is what the webhooks would default and check.
    kueue)
      build_module "sigs.k8s.io/kueue@v$KUEUE_VERSION" ./test/performance/scheduler/minimalkueue "$bin/$out.tmp" ;;
    volcano)
      build_module "volcano.sh/volcano@v$VOLCANO_VERSION" ./cmd/scheduler "$bin/$out.tmp" ;;
    # scheduler-plugins' kube-scheduler, which has the Coscheduling plugin.
    coscheduling)
      build_module "sigs.k8s.io/scheduler-plugins@v$SCHEDULER_PLUGINS_VERSION" ./cmd/scheduler "$bin/$out.tmp" ;;
    # The benchmark's peers: JobSet's controller manager, and the Training Operator (v1) with
    # every job kind it serves.
    jobset)
      build_module "sigs.k8s.io/jobset@v$JOBSET_VERSION" . "$bin/$out.tmp" ;;
    training-operator)
      build_module "github.com/kubeflow/training-operator@v$TRAINING_OPERATOR_VERSION" \
        ./cmd/training-operator.v1 "$bin/$out.tmp" ;;
    *) log "unknown component $c"; exit 2 ;;
  esac
  mv "$bin/$out.tmp" "$bin/$out"   # rename last: an interrupted build never leaves a half binary cached
  log "$c: built in $(( $(date +%s) - start ))s"
done
echo "$bin"
