#!/usr/bin/env bash
# `make pytorch-image`: a plain PyTorch image, lockstep-pytorch, built here the way images/build.sh
# builds the project's images (no Docker daemon, no base pulled from a registry), so that the real
# node can run examples/torch-command.yaml ("any PyTorch image runs as a ParallelJob") with torchrun
# and Gloo. Nothing of Lockstep is in it.
#
#   base     Debian bookworm packages: python3, bash, coreutils (the example runs `bash -c` and
#            `cat`), libstdc++6 (torch links it) and ca-certificates, with everything they depend
#            on (first alternative of each dependency, as apt picks it), unpacked with dpkg-deb.
#            Left out: debconf, dpkg and awk, which only the packages' maintainer scripts use (and
#            dpkg-deb -x runs none).
#   python   torch from PyPI with its dependencies, and NumPy, pinned below, installed with this
#            machine's pip for CPython 3.11 on manylinux x86_64 (bookworm's python3 is 3.11), then
#            compiled to hash-checked .pyc files by the image's own python. PyPI's Linux torch is the CUDA build:
#            its libtorch_cuda.so links libcudart, libcublas, libcudnn, libnccl, ... (DT_NEEDED),
#            so `import torch` fails without the nvidia-* wheels, even on a machine with no GPU;
#            they are included, as in every PyTorch image. (The CPU-only wheels are on
#            download.pytorch.org, not on PyPI.)
#
# The image runs as the non-root user 65532 with HOME=/tmp (writable by any user), PATH with
# /usr/local/bin (torchrun). It is then checked: unpacked as written, its python imports torch and
# runs a Gloo all_reduce with the image's own dynamic loader and libraries, not the host's.
#
# Output: target/images/lockstep-pytorch-<version>.oci.tar (an OCI archive, as images/build.sh
# writes; the OCI layout itself is not kept: it would be another copy of about 3 GB). The real
# node imports it as docker.io/lockstep/pytorch:<version> (e2e/cluster/realnode.sh).
# The downloads and the last archive (hard-linked into target/images) are cached in
# ${LOCKSTEP_CACHE:-~/.cache/lockstep}/images/pytorch/.
#   OUT       output folder (default: target/images)
#   REBUILD   1: build even when an archive of the same inputs is cached
set -euo pipefail

TORCH_VERSION=2.5.1
# NumPy beside it, as in every PyTorch image (torch warns at import without it), at a version of
# torch 2.5's time.
NUMPY_VERSION=2.1.3
# torch's dependencies that its metadata leaves open, pinned so that a rebuild installs the same
# files (the nvidia-* wheels, triton and sympy are pinned by torch itself). Changing TORCH_VERSION
# may need these changed too: pip then says which conflicts.
PINS=(filelock==4.3.1 typing-extensions==4.16.0 networkx==3.6.1 jinja2==3.1.6 markupsafe==3.0.4
  fsspec==2026.9.0 mpmath==1.3.0)

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cache=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}/images/pytorch
out=${OUT:-$root/target/images}
image=lockstep-pytorch
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# The files' times: the last commit of this recipe (so that other commits leave the image as it is).
epoch=$(git log -1 --format=%ct -- images/pytorch 2>/dev/null || true)
epoch=${epoch:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
umask 022
SECONDS=0
log() { printf '[pytorch-image %3ds] %s\n' "$SECONDS" "$*" >&2; }

need() { command -v "$1" >/dev/null 2>&1; }
if ! need umoci; then
  [ "$(id -u)" = 0 ] || { log "umoci is missing: apt-get install umoci"; exit 1; }
  log "installing umoci (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends umoci >/dev/null
fi
py=$(command -v python3) || { log "python3 (with pip) is needed to install the wheels"; exit 1; }
"$py" -m pip --version >/dev/null 2>&1 || { log "$py has no pip: apt-get install python3-pip"; exit 1; }

work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

# --- 1. The Debian packages: the dependency closure, each at the version apt has now, downloaded
#        once into the cache.
closure() { # PACKAGE...: the packages and what they depend on, first alternatives, minus $skip
  local skip=" debconf dpkg gawk " p
  local -A seen=()
  local level=("$@") next
  while [ ${#level[@]} -gt 0 ]; do
    next=()
    for p in "${level[@]}"; do
      case "$skip" in *" $p "*) continue ;; esac
      [ -n "${seen[$p]:-}" ] || { seen[$p]=1; next+=("$p"); }
    done
    [ ${#next[@]} -gt 0 ] || break
    # `apt-cache depends` lists "  Depends: a", " |Depends: b" (b or the next one), and under a
    # virtual package "<v>" its providers, indented: keep the first choice of each group. One
    # call per level of the tree (each call reads apt's lists: half a second).
    mapfile -t level < <(apt-cache depends --no-recommends --no-suggests --no-conflicts \
      --no-breaks --no-replaces --no-enhances "${next[@]}" | awk '
        /^[^ ]/ { prev = 0; pend = 0; next }
        /^ [ |](Pre)?Depends:/ { alt = (substr($0, 2, 1) == "|"); pend = 0
          if (!prev) { if ($2 ~ /^</) pend = 1; else print $2 }
          prev = alt; next }
        /^    / { if (pend) { print $1; pend = 0 } next }' | sed 's/:.*//' | sort -u)
  done
  printf '%s\n' "${!seen[@]}" | sort
}
first() { if [ -e "$1" ]; then echo "$1"; fi; } # the first match of a glob, or nothing
mapfile -t pkgs < <(closure python3 bash coreutils libstdc++6 ca-certificates)
[ ${#pkgs[@]} -gt 10 ] || { log "could not resolve the Debian packages (apt-get update?)"; exit 1; }
declare -A candidate=()
while read -r p v; do candidate[$p]=$v; done < <(apt-cache policy "${pkgs[@]}" | awk '
  /^[^ ]/ { sub(/:$/, ""); p = $1 } /^  Candidate:/ { print p, $2 }')
deb_versions=()
for p in "${pkgs[@]}"; do
  v=${candidate[$p]:-}
  if [ -z "$v" ] || [ "$v" = "(none)" ]; then log "no candidate version of the Debian package $p"; exit 1; fi
  deb_versions+=("$p=$v")
done
log "${#pkgs[@]} Debian packages: ${deb_versions[*]}"

# The build is reproducible (the same inputs give the same archive, digest for digest), so an
# archive built from the same inputs is reused: this script, the Debian packages' versions, the
# date of the last commit of images/pytorch/ (the files' times in the layers) and the tools' own
# versions. REBUILD=1 builds anyway.
key=$(printf '%s\n' "$version" "$epoch" "$(sha256sum < "$root/images/pytorch/build.sh")" \
  "${deb_versions[@]}" "$("$py" -m pip --version | cut -d' ' -f1-2)" "$(umoci --version)" \
  | sha256sum | cut -c1-16)
built=$cache/$image-$version-$key.oci.tar
archive=$out/$image-$version.oci.tar
publish() { # the cached archive as $archive: a hard link when it can (no second 3 GB copy)
  mkdir -p "$out"
  [ "$built" -ef "$archive" ] && return 0
  rm -f "$archive.tmp"
  ln "$built" "$archive.tmp" 2>/dev/null || cp "$built" "$archive.tmp"
  mv -f "$archive.tmp" "$archive"
}
if [ -e "$built" ] && [ "${REBUILD:-0}" != 1 ]; then
  publish
  log "$image:$version  $archive ($(du -sh "$archive" | cut -f1)): unchanged inputs, the archive built and checked before (key $key)"
  exit 0
fi

debs=$cache/debs
mkdir -p "$debs"
deb_files=()
for pv in "${deb_versions[@]}"; do
  p=${pv%%=*} v=${pv#*=}
  f=$(first "$debs/${p}_${v/:/%3a}_"*.deb)
  if [ -z "$f" ]; then
    (cd "$debs" && apt-get download "$p=$v" >/dev/null 2>&1) || {
      [ "$(id -u)" = 0 ] && apt-get update -qq && (cd "$debs" && apt-get download "$p=$v" >/dev/null)
    } || { log "cannot download the Debian package $p=$v"; exit 1; }
    f=$(first "$debs/${p}_${v/:/%3a}_"*.deb)
    [ -n "$f" ] || { log "apt-get download $p=$v wrote no ${p}_*.deb"; exit 1; }
  fi
  deb_files+=("$f")
done

# --- 2. The wheels: torch and its dependencies for CPython 3.11 on manylinux x86_64, whatever
#        python runs pip here; downloaded once (a marker per pin set keeps later builds offline).
wheels=$cache/wheels
mkdir -p "$wheels"
pin_file=$work/pins.txt
printf '%s\n' "${PINS[@]}" > "$pin_file"
platform=(--only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64 --python-version 3.11 --implementation cp --abi cp311)
want=("torch==$TORCH_VERSION" "numpy==$NUMPY_VERSION")
marker=$wheels/.done-$(printf '%s\n' "${want[@]}" | cat - "$pin_file" | sha256sum | cut -c1-12)
if [ ! -e "$marker" ]; then
  log "downloading ${want[*]} and their dependencies from PyPI (about 2.8 GB)"
  "$py" -m pip download -q --no-cache-dir --disable-pip-version-check "${platform[@]}" \
    -d "$wheels" -c "$pin_file" "${want[@]}"
  touch "$marker"
fi

# --- 3. The root file system: the base, then the wheels in /usr/local.
rootfs=$work/rootfs
mkdir -p "$rootfs"
for f in "${deb_files[@]}"; do dpkg-deb -x "$f" "$rootfs"; done
rm -rf "$rootfs"/usr/share/{doc,man,info,lintian,locale,bug,menu} "$rootfs"/etc/ca-certificates.conf
# What update-ca-certificates would make: one bundle, where OpenSSL (and so Python) looks.
mkdir -p "$rootfs/etc/ssl/certs"
cat "$rootfs"/usr/share/ca-certificates/mozilla/*.crt > "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$rootfs/usr/share/ca-certificates"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$rootfs/etc/group"
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
# Debian's /bin/sh is dash (left out): bash serves (Python's shell=True, os.system).
ln -sf bash "$rootfs/bin/sh"
mkdir -p "$rootfs/tmp" "$rootfs/root"
chmod 1777 "$rootfs/tmp"
chmod 0700 "$rootfs/root"

site=usr/local/lib/python3.11/dist-packages # where Debian's python3 looks first
log "installing the wheels into /$site"
# (--no-warn-conflicts: pip would compare them with what this machine's python has installed.)
"$py" -m pip install -q --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
  --no-warn-conflicts --no-warn-script-location --no-index --find-links "$wheels" \
  "${platform[@]}" --no-compile --target "$rootfs/$site" -c "$pin_file" "${want[@]}"
# Their commands (torchrun, ...) in /usr/local/bin, run by the image's python, not this one's.
mkdir -p "$rootfs/usr/local/bin"
for s in "$rootfs/$site/bin/"*; do
  sed '1s|^#!.*python.*$|#!/usr/bin/python3|' "$s" > "$rootfs/usr/local/bin/${s##*/}"
  chmod 0755 "$rootfs/usr/local/bin/${s##*/}"
done
rm -rf "${rootfs:?}/$site/bin"
python_versions=$(for d in "$rootfs/$site/"*.dist-info; do d=${d##*/}; d=${d%.dist-info}; echo "${d/-/==}"; done | paste -sd' ')

# The image's python, run from outside with the image's loader and libraries.
image_python() { # ROOTFS ARGS...
  local r=$1
  shift
  PYTHONHOME=$r/usr PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 \
    "$r/lib64/ld-linux-x86-64.so.2" --library-path "$r/lib/x86_64-linux-gnu:$r/usr/lib/x86_64-linux-gnu" \
    "$r/usr/bin/python3.11" "$@"
}
# Byte-compiled by the image's own python, checked by source hash (not by mtime, which the layer
# fixes), and with the paths they will have in the image; Debian's postinst would do the same for
# the standard library.
log "compiling the standard library and the packages to .pyc"
compiled=$(image_python "$rootfs" -m compileall -q -j 0 --invalidation-mode checked-hash \
  -s "$rootfs" -p / "$rootfs/usr/lib/python3.11" "$rootfs/$site" 2>&1) \
  || { log "compileall failed: $compiled"; exit 1; }

# --- 4. The image: two layers (the Debian base, then Python's packages), sorted, fixed times,
#        root-owned; written to a layout, then to the OCI archive.
layout=$work/layout
umoci init --layout "$layout"
umoci new --image "$layout:$version"
layer() { # HISTORY TAR_ARGS...: one reproducible layer, streamed into the image
  local history=$1
  shift
  umoci raw add-layer --image "$layout:$version" --history.created "$created" \
    --history.created_by "$history" <(tar -C "$rootfs" --sort=name --mtime="@$epoch" \
      --numeric-owner --owner=0 --group=0 -cf - "$@")
}
log "writing the layers (gzip)"
layer "images/pytorch/build.sh: Debian bookworm packages ${deb_versions[*]}" \
  --exclude "./$site" --exclude "./usr/local/bin" .
layer "images/pytorch/build.sh: pip install torch==$TORCH_VERSION ($python_versions)" \
  "./$site" ./usr/local/bin
rm -rf "$rootfs"
umoci config --image "$layout:$version" --os linux --architecture amd64 --created "$created" \
  --config.user 65532:65532 --config.workingdir /tmp \
  --config.env PATH=/usr/local/bin:/usr/bin:/bin --config.env HOME=/tmp \
  --config.env LANG=C.UTF-8 --config.cmd python3 \
  --config.label "org.opencontainers.image.title=$image" \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.description=PyTorch $TORCH_VERSION (PyPI) on Debian bookworm's python3, for the e2e tests of workload Command" \
  --config.label "org.opencontainers.image.source=https://github.com/lockstep-dev/lockstep" \
  --config.label "org.opencontainers.image.base.name=debian-packages: bookworm" \
  --history.created "$created" --history.created_by "images/pytorch/build.sh: config"
umoci gc --layout "$layout"

# --- 5. The check: the image unpacked as written; its python imports torch and all-reduces over
#        Gloo (one rank, on loopback), with the image's libraries; torchrun is on its PATH.
check=$work/check
log "checking the image"
umoci unpack --rootless --image "$layout:$version" "$check" >/dev/null
r=$check/rootfs
[ -e "$r/lib64/ld-linux-x86-64.so.2" ] || { log "$image: no dynamic loader in the image"; exit 1; }
head -1 "$r/usr/local/bin/torchrun" | grep -qx '#!/usr/bin/python3' || { log "$image: no torchrun for /usr/bin/python3"; exit 1; }
for f in usr/bin/python3 bin/bash bin/sh bin/cat; do
  [ -x "$r/$f" ] || { log "$image: no /$f"; exit 1; }
done
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
got=$(cd "$work" && GLOO_SOCKET_IFNAME=lo image_python "$r" -c '
import sys, numpy, torch, torch.distributed as dist
assert torch.__file__.startswith(sys.argv[1]), torch.__file__
assert torch.from_numpy(numpy.ones(2)).sum().item() == 2.0
assert dist.is_available() and dist.is_gloo_available()
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
t = torch.tensor([3.0])
dist.all_reduce(t)
dist.destroy_process_group()
print(f"torch {torch.__version__}: gloo all_reduce {t.item()}")
' "$r/$site/torch/" "$port" 2>&1) || { log "$image: its python cannot run torch: $got"; exit 1; }
# Exactly that line: a warning at import (no NumPy, a library not found) fails the check too.
[[ $got =~ ^torch\ ${TORCH_VERSION}[+a-z0-9]*:\ gloo\ all_reduce\ 3\.0$ ]] || { log "$image: unexpected: $got"; exit 1; }
user=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["process"]["user"]["uid"])' "$check/config.json")
[ "$user" = 65532 ] || { log "$image: runs as uid $user, not 65532"; exit 1; }
unpacked=$(du -sh "$r" | cut -f1)
chmod -R u+w "$check"
rm -rf "$check"

tar -C "$layout" --sort=name --mtime="@$epoch" --numeric-owner --owner=0 --group=0 -cf "$built.tmp" .
rm -f "$cache/$image-"*.oci.tar # the archives of older inputs
mv "$built.tmp" "$built"
publish
log "$image:$version  $archive ($(du -sh "$archive" | cut -f1), $unpacked unpacked); $got with the image's own libraries; runs as uid $user; built in ${SECONDS}s"
