#!/usr/bin/env bash
# Builds what a real node of the test cluster runs (REAL_NODES=1), from Go modules and Debian's
# C toolchain, nothing prebuilt: kubelet (from the control plane's Kubernetes module), containerd
# 2 with its runc shim and ctr, runc, the CNI plugins (bridge, host-local, loopback, portmap),
# CoreDNS (coredns/, only the plugins the cluster needs) and the pause image (pause.c from the
# Kubernetes module, linked statically, packed as an OCI archive with umoci under the tag 3.10:
# imported as registry.k8s.io/pause:3.10, the sandbox image of the node's containerd). Cached
# outside the clone keyed by version, like build.sh; prints the bin directory.
#   LOCKSTEP_CACHE  cache root (default ~/.cache/lockstep)
#   COMPONENTS      subset to build (default: all)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}
bin="$cache/node/k$KUBE_VERSION-c$CONTAINERD_VERSION-r$RUNC_VERSION-n$CNI_PLUGINS_VERSION-d$COREDNS_VERSION/bin"
mkdir -p "$bin"
export GOWORK=off GOFLAGS="-mod=mod -trimpath"
log() { printf '[node-build] %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
  [ "$(id -u)" = 0 ] || { log "missing $*: apt-get install $*"; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
kube_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v$KUBE_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean"
gobin() { GOBIN="$bin/.gobin" CGO_ENABLED=${CGO:-0} go install "$@"; }

want=${COMPONENTS:-"kubelet containerd runc cni coredns pause"}
for c in $want; do
  case "$c" in
    containerd) done_file=containerd-shim-runc-v2 ;;
    cni) done_file=cni/portmap ;;
    pause) done_file=pause.oci.tar ;;
    *) done_file=$c ;;
  esac
  if [ -e "$bin/$done_file" ]; then log "$c: cached"; continue; fi
  start=$(date +%s)
  case "$c" in
    kubelet)
      (cd "$here/kube" && CGO_ENABLED=0 go build -ldflags "$kube_ldflags" -o "$bin/kubelet.tmp" \
        k8s.io/kubernetes/cmd/kubelet)
      mv "$bin/kubelet.tmp" "$bin/kubelet" ;;
    containerd)
      m=github.com/containerd/containerd/v2
      flags="-s -w -X $m/version.Version=v$CONTAINERD_VERSION -X $m/version.Package=$m"
      gobin -tags "no_btrfs no_devmapper no_zfs" -ldflags "$flags" \
        "$m/cmd/containerd@v$CONTAINERD_VERSION" "$m/cmd/ctr@v$CONTAINERD_VERSION" \
        "$m/cmd/containerd-shim-runc-v2@v$CONTAINERD_VERSION"
      mv "$bin/.gobin/containerd" "$bin/.gobin/ctr" "$bin/"
      mv "$bin/.gobin/containerd-shim-runc-v2" "$bin/" ;;
    runc)
      need pkg-config && [ -e /usr/include/seccomp.h ] || apt_install libseccomp-dev pkg-config
      CGO=1 gobin -tags "seccomp urfave_cli_no_docs" -ldflags "-s -w -X main.version=$RUNC_VERSION" \
        "github.com/opencontainers/runc@v$RUNC_VERSION"
      mv "$bin/.gobin/runc" "$bin/runc" ;;
    cni)
      mkdir -p "$bin/.gobin/cni" "$bin/cni"
      for p in main/bridge main/loopback ipam/host-local meta/portmap; do
        GOBIN="$bin/.gobin/cni" CGO_ENABLED=0 go install -ldflags "-s -w" \
          "github.com/containernetworking/plugins/plugins/$p@v$CNI_PLUGINS_VERSION"
      done
      mv "$bin/.gobin/cni/"* "$bin/cni/" ;;
    coredns)
      (cd "$here/coredns" && CGO_ENABLED=0 go build -ldflags "-s -w" -o "$bin/coredns.tmp" .)
      mv "$bin/coredns.tmp" "$bin/coredns" ;;
    pause)
      need gcc || apt_install gcc libc6-dev
      need umoci || apt_install umoci
      kdir=$(cd "$here/kube" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)
      work=$(mktemp -d)
      gcc -Os -static -DVERSION="v$KUBE_VERSION" -o "$work/pause" "$kdir/build/pause/linux/pause.c"
      strip "$work/pause"
      umoci init --layout "$work/oci" >/dev/null
      umoci new --image "$work/oci:3.10" >/dev/null
      umoci unpack --rootless --image "$work/oci:3.10" "$work/bundle" >/dev/null
      install -m 0755 "$work/pause" "$work/bundle/rootfs/pause"
      umoci repack --image "$work/oci:3.10" "$work/bundle" >/dev/null
      umoci config --image "$work/oci:3.10" --config.entrypoint /pause --config.user 65535:65535 \
        --os linux --architecture amd64 >/dev/null
      tar -C "$work/oci" -cf "$bin/pause.oci.tar.tmp" .
      chmod -R u+w "$work"; rm -rf "$work"
      mv "$bin/pause.oci.tar.tmp" "$bin/pause.oci.tar" ;;
    *) log "unknown component $c"; exit 2 ;;
  esac
  log "$c: built in $(( $(date +%s) - start ))s"
done
rm -rf "$bin/.gobin"
echo "$bin"
