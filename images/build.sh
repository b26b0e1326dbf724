#!/usr/bin/env bash
# `make images`: builds OCI images of the operator and the CPU worker here, with no Docker daemon
# and no base image pulled from a registry. The binaries are built by cargo; the base is made of
# Debian packages (libc6, libgcc-s1, ca-certificates: what the binaries link against, as in
# distroless/cc) unpacked with dpkg-deb; umoci writes the OCI image layouts. Each image is then
# checked: it is unpacked, and its binary runs `--help` with the image's own dynamic loader and
# libraries, not the host's.
#
# Output (target/images/): an OCI layout per image, and an OCI archive of it, which
#   skopeo copy oci-archive:target/images/lockstep-operator-<version>.oci.tar docker://REGISTRY/lockstep-operator:<version>
# pushes (skopeo is a Debian package; `podman load -i` takes the archive too).
#   IMAGES   which to build (default: "operator worker")
#   OUT      output folder (default: target/images)
#   PROFILE  cargo profile of the binaries (default: release). `make test` packs its own build's
#            binaries (dev: the worker and the engine optimised, the rest not) to spare CI a
#            release build of its own (13.5 minutes cold on 2 cores).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cache=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
out=${OUT:-$root/target/images}
want=${IMAGES:-"operator worker"}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
epoch=$(git log -1 --format=%ct 2>/dev/null || date +%s)
log() { printf '[images] %s\n' "$*" >&2; }

need() { command -v "$1" >/dev/null 2>&1; }
if ! need umoci; then
  [ "$(id -u)" = 0 ] || { log "umoci is missing: apt-get install umoci"; exit 1; }
  log "installing umoci (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends umoci >/dev/null
fi

# 1. The binaries, stripped (the release profile keeps line tables for backtraces; an image does
#    not need them).
pkgs=()
for i in $want; do pkgs+=(-p "lockstep-$i"); done
profile=${PROFILE:-release}
log "building ${pkgs[*]} ($profile)"
cargo build --profile "$profile" --locked -q "${pkgs[@]}"
profile_dir=$profile
[ "$profile" = dev ] && profile_dir=debug

# 2. The base: Debian packages of this machine's release, downloaded once into the cache.
debs=$cache/images/debs
mkdir -p "$debs"
base_pkgs="libc6 libgcc-s1 ca-certificates"
for p in $base_pkgs; do
  if ! ls "$debs/${p}_"*.deb >/dev/null 2>&1; then
    (cd "$debs" && apt-get download "$p" >/dev/null 2>&1) || {
      [ "$(id -u)" = 0 ] && apt-get update -qq && (cd "$debs" && apt-get download "$p" >/dev/null)
    } || { log "cannot download the Debian package $p"; exit 1; }
  fi
done
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
base=$work/base
mkdir -p "$base"
for p in $base_pkgs; do dpkg-deb -x "$(ls "$debs/${p}_"*.deb | head -1)" "$base"; done
rm -rf "$base"/usr/share/{doc,man,info,lintian,locale} "$base"/usr/sbin "$base"/etc/ca-certificates.conf
# What update-ca-certificates would make: one bundle, where Rust's and Go's TLS stacks look.
mkdir -p "$base/etc/ssl/certs"
cat "$base"/usr/share/ca-certificates/mozilla/*.crt > "$base/etc/ssl/certs/ca-certificates.crt"
rm -rf "$base/usr/share/ca-certificates"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$base/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$base/etc/group"
printf 'hosts: files dns\n' > "$base/etc/nsswitch.conf"
mkdir -p "$base/tmp" "$base/usr/local/bin"
chmod 1777 "$base/tmp"
deb_versions=$(for p in $base_pkgs; do basename "$(ls "$debs/${p}_"*.deb | head -1)" .deb; done | paste -sd' ')

mkdir -p "$out"
for name in $want; do
  bin=lockstep-$name
  image=lockstep-$name
  rootfs=$work/$name/rootfs
  mkdir -p "$rootfs"
  cp -a "$base/." "$rootfs/"
  install -m 0755 "$CARGO_TARGET_DIR/$profile_dir/$bin" "$rootfs/usr/local/bin/$bin"
  strip "$rootfs/usr/local/bin/$bin"
  # Directories the non-root user owns: its home, and for the worker the checkpoint folder
  # (the operator mounts a volume there; this is the fallback when none is mounted).
  owned=(home/nonroot)
  [ "$name" = worker ] && owned+=(var/lib/lockstep/checkpoints)
  for d in "${owned[@]}"; do mkdir -p "$rootfs/$d"; done
  # The worker starts in /opt/lockstep, which holds the repository's small data sets (data/), so
  # the examples' relative data paths work in a cluster as they do with `make local`.
  workdir=/home/nonroot
  if [ "$name" = worker ]; then
    workdir=/opt/lockstep
    mkdir -p "$rootfs/opt/lockstep/data"
    cp data/*.gz data/README.md "$rootfs/opt/lockstep/data/"
  fi
  # One reproducible layer: sorted, fixed times, root-owned, then the non-root directories.
  layer=$work/$name/layer.tar
  excludes=()
  for d in "${owned[@]}"; do excludes+=(--exclude "./$d"); done
  tar -C "$rootfs" --sort=name --mtime="@$epoch" --numeric-owner --owner=0 --group=0 \
    "${excludes[@]}" -cf "$layer" .
  tar -C "$rootfs" --sort=name --mtime="@$epoch" --numeric-owner --owner=65532 --group=65532 \
    --no-recursion -rf "$layer" "${owned[@]/#/./}"
  layout=$out/$image
  rm -rf "$layout"
  umoci init --layout "$layout"
  umoci new --image "$layout:$version"
  created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
  umoci raw add-layer --image "$layout:$version" --history.created "$created" --history.created_by "images/build.sh: $bin on $deb_versions" "$layer"
  umoci config --image "$layout:$version" --os linux --architecture amd64 --created "$created" \
    --config.user 65532:65532 --config.workingdir "$workdir" \
    --config.env PATH=/usr/local/bin:/usr/bin:/bin --config.entrypoint "/usr/local/bin/$bin" \
    --config.label "org.opencontainers.image.title=$image" \
    --config.label "org.opencontainers.image.version=$version" \
    --config.label "org.opencontainers.image.source=https://github.com/lockstep-dev/lockstep" \
    --config.label "org.opencontainers.image.licenses=Apache-2.0" \
    --config.label "org.opencontainers.image.base.name=debian-packages: $deb_versions" \
    --history.created "$created" --history.created_by "images/build.sh: config"
  umoci gc --layout "$layout"

  # The check: unpack the image as it was written and run its binary with the image's libraries.
  check=$work/$name/check
  umoci unpack --rootless --image "$layout:$version" "$check" >/dev/null
  r=$check/rootfs
  loader=$r/lib64/ld-linux-x86-64.so.2
  [ -e "$loader" ] || { log "$image: no dynamic loader in the image"; exit 1; }
  help=$("$loader" --library-path "$r/lib/x86_64-linux-gnu:$r/usr/lib/x86_64-linux-gnu" \
    "$r/usr/local/bin/$bin" --help 2>&1) || { log "$image: $bin --help failed in the image: $help"; exit 1; }
  echo "$help" | grep -qi usage || { log "$image: unexpected --help output: $help"; exit 1; }
  user=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["process"]["user"]["uid"])' "$check/config.json" 2>/dev/null || echo "?")
  archive=$out/$image-$version.oci.tar
  tar -C "$layout" --sort=name --mtime="@$epoch" --numeric-owner --owner=0 --group=0 -cf "$archive" .
  manifest=$(umoci stat --image "$layout:$version" --json | python3 -c 'import json,sys; h=json.load(sys.stdin)["history"]; print(len(h))')
  size=$(du -sh "$archive" | cut -f1)
  log "$image:$version  $archive ($size, ${manifest} history entries); its $bin runs with the image's own libraries; runs as uid $user"
done
