#!/usr/bin/env bash
# Builds the pinned test control plane from Go modules (nothing prebuilt is downloaded) into a cache
# outside the clone, keyed by version, and prints the bin directory. A second run finds the cached
# binaries and costs seconds.
#   LOCKSTEP_CACHE  cache root (default ~/.cache/lockstep)
#   COMPONENTS      subset to build (default: all)
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
for c in $want; do
  if [ -x "$bin/$c" ]; then log "$c: cached"; continue; fi
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
    *) log "unknown component $c"; exit 2 ;;
  esac
  mv "$bin/$c.tmp" "$bin/$c"   # rename last: an interrupted build never leaves a half binary cached
  log "$c: built in $(( $(date +%s) - start ))s"
done
echo "$bin"
