#!/usr/bin/env bash
# `make images`: builds OCI images of the operator and the CPU worker here, with no Docker daemon
# and no base image pulled from a registry; `make image-cuda` builds the CUDA worker the same way.
# The binaries are built by cargo; the base is made of Debian packages (libc6, libgcc-s1,
# ca-certificates: what the binaries link against, as in distroless/cc) unpacked with dpkg-deb;
# umoci writes the OCI image layouts. Each image is then checked: it is unpacked, its binary's
# libraries must all resolve inside it, and the binary runs `--help` with the image's own dynamic
# loader and libraries, not the host's.
#
# worker-cuda is the same worker binary for NVIDIA GPU nodes, on the same base plus libstdc++6,
# with the CUDA libraries it opens at run time (cuBLAS and its cuBLASLt, NVRTC, NCCL) and the CUDA
# runtime (libcudart, 0.7 MB, which the worker itself does not open: cudarc uses the driver API)
# from NVIDIA's wheels on PyPI, pinned with their hashes in images/cuda-wheels.txt. They are in
# /usr/local/cuda/lib64 (on the image's LD_LIBRARY_PATH), with a libnccl.so link, and the wheels'
# licenses in /usr/local/cuda/licenses, all in a layer of their own (which a new worker version
# leaves as it is). The driver's libraries (libcuda, libnvidia-ml) are not in it: the NVIDIA
# container toolkit mounts them from the node. Its check: every shipped library resolves all it
# needs inside the image (none needs libcuda), and the worker's `bench cuda-libs` opens the
# libraries from the image, at the pinned versions, and compiles the engine's kernels with the
# image's NVRTC for sm_90, which needs no GPU. Only its archive is kept, not its OCI layout (a
# second copy of about 670 MiB).
#
# Output (target/images/): an OCI layout per image, and an OCI archive of it, which
#   skopeo copy oci-archive:target/images/lockstep-operator-<version>.oci.tar docker://REGISTRY/lockstep-operator:<version>
# pushes (skopeo is a Debian package; `podman load -i` takes the archive too).
#   IMAGES   which to build: operator, worker, worker-cuda (default: "operator worker")
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

for i in $want; do
  case $i in operator | worker | worker-cuda) ;; *) log "unknown image $i: operator, worker or worker-cuda"; exit 1 ;; esac
done
bin_of() { case $1 in worker-cuda) echo lockstep-worker ;; *) echo "lockstep-$1" ;; esac; }

# 1. The binaries, stripped (the release profile keeps line tables for backtraces; an image does
#    not need them).
pkgs=()
for i in $want; do
  case " ${pkgs[*]} " in *" $(bin_of "$i") "*) ;; *) pkgs+=(-p "$(bin_of "$i")") ;; esac
done
profile=${PROFILE:-release}
log "building ${pkgs[*]} ($profile)"
cargo build --profile "$profile" --locked -q "${pkgs[@]}"
profile_dir=$profile
[ "$profile" = dev ] && profile_dir=debug

# 2. The base: Debian packages of this machine's release, downloaded once into the cache.
debs=$cache/images/debs
mkdir -p "$debs"
base_pkgs="libc6 libgcc-s1 ca-certificates"
# What the CUDA libraries link against beyond the base (libnccl and libnvrtc-builtins need it).
cuda_pkgs="libstdc++6"
cuda=false
case " $want " in *" worker-cuda "*) cuda=true ;; esac
fetch_pkgs=$base_pkgs
if $cuda; then fetch_pkgs="$base_pkgs $cuda_pkgs"; fi
for p in $fetch_pkgs; do
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
deb_version() { for p in "$@"; do basename "$(ls "$debs/${p}_"*.deb | head -1)" .deb; done | paste -sd' '; }
deb_versions=$(deb_version $base_pkgs)

# 3. The CUDA libraries (worker-cuda): the pinned wheels, downloaded once into the cache and
#    checked against their hashes at every build.
pins=$root/images/cuda-wheels.txt
wheels=$cache/images/cuda-wheels
cuda_lib=/usr/local/cuda/lib64
# The files the image takes from the wheels: what the worker opens and what those open in turn
# (libcublasLt by libcublas, libnvrtc-builtins by libnvrtc); not the static libraries, nvblas or
# NVRTC's .alt variants.
nvrtc_cuda=$(sed -n 's/^nvidia-cuda-nvrtc==\([0-9]*\.[0-9]*\).*/\1/p' "$pins")
cuda_files="libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libnvrtc-builtins.so.$nvrtc_cuda libnccl.so.2"
wheel_of() { # PIN: the cached wheel of a `name==version --hash=sha256:...` line, if any
  local name=${1%%==*} version=${1#*==}
  version=${version%% *}
  ls "$wheels/${name//-/_}-$version-"*.whl 2>/dev/null | head -1
}
cuda_wheels=
if $cuda; then
  mkdir -p "$wheels"
  missing=$(grep '^nvidia-' "$pins" | while read -r pin; do [ -n "$(wheel_of "$pin")" ] || echo "$pin"; done)
  if [ -n "$missing" ]; then
    log "downloading the CUDA wheels: $(echo "$missing" | cut -d' ' -f1 | paste -sd' ')"
    echo "$missing" > "$work/pins.txt"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
      --dest "$wheels" -r "$work/pins.txt" >&2
  fi
  while read -r pin; do
    w=$(wheel_of "$pin")
    [ "$(sha256sum < "$w" | cut -d' ' -f1)" = "${pin##*sha256:}" ] ||
      { log "$w does not match its hash in $pins: delete it to download it again"; exit 1; }
  done < <(grep '^nvidia-' "$pins")
  cuda_wheels=$(grep '^nvidia-' "$pins" | cut -d' ' -f1 | paste -sd' ')
fi

mkdir -p "$out"
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
for name in $want; do
  bin=$(bin_of "$name")
  image=lockstep-$name
  rootfs=$work/$name/rootfs
  mkdir -p "$rootfs"
  cp -a "$base/." "$rootfs/"
  install -m 0755 "$CARGO_TARGET_DIR/$profile_dir/$bin" "$rootfs/usr/local/bin/$bin"
  strip "$rootfs/usr/local/bin/$bin"
  # Directories the non-root user owns: its home, and for the worker the checkpoint folder
  # (the operator mounts a volume there; this is the fallback when none is mounted).
  owned=(home/nonroot)
  case $name in worker*) owned+=(var/lib/lockstep/checkpoints) ;; esac
  for d in "${owned[@]}"; do mkdir -p "$rootfs/$d"; done
  # The worker starts in /opt/lockstep, which holds the repository's small data sets (data/), so
  # the examples' relative data paths work in a cluster as they do with `make local`.
  workdir=/home/nonroot
  case $name in worker*)
    workdir=/opt/lockstep
    mkdir -p "$rootfs/opt/lockstep/data"
    cp data/*.gz data/README.md "$rootfs/opt/lockstep/data/"
  esac
  image_debs=$deb_versions
  cuda_config=()
  licenses=Apache-2.0
  if [ "$name" = worker-cuda ]; then
    for p in $cuda_pkgs; do dpkg-deb -x "$(ls "$debs/${p}_"*.deb | head -1)" "$rootfs"; done
    rm -rf "$rootfs"/usr/share/{doc,gdb,lintian}
    image_debs=$(deb_version $base_pkgs $cuda_pkgs)
    # The driver's folder comes after the image's: GKE's device plugin mounts libcuda and
    # libnvidia-ml in /usr/local/nvidia/lib64 (the NVIDIA container toolkit puts them in
    # /usr/lib/x86_64-linux-gnu, where the loader looks anyway), as NVIDIA's CUDA images expect.
    cuda_config=(
      --config.env "LD_LIBRARY_PATH=$cuda_lib:/usr/local/nvidia/lib64:/usr/local/nvidia/lib"
      --config.env NVIDIA_VISIBLE_DEVICES=all
      --config.env NVIDIA_DRIVER_CAPABILITIES=compute,utility
      --config.env "NVIDIA_REQUIRE_CUDA=cuda>=13.0"
      --config.label "dev.lockstep.cuda.wheels=$cuda_wheels"
    )
    licenses="Apache-2.0 AND LicenseRef-NVIDIA-Proprietary"
  fi
  layout=$out/$image
  rm -rf "$layout"
  umoci init --layout "$layout"
  umoci new --image "$layout:$version"
  if [ "$name" = worker-cuda ]; then
    # The CUDA libraries, a layer of their own (first, as they change least), streamed from the
    # wheels into umoci: this is the image's bulk (about 930 MB unpacked).
    libs=$work/$name/cuda
    mkdir -p "$libs$cuda_lib" "$libs/usr/local/cuda/licenses"
    # The libraries, and each wheel's license (NCCL's asks for its notice with the binaries).
    python3 - "$libs$cuda_lib" "$libs/usr/local/cuda/licenses" "$cuda_files" \
      $(while read -r pin; do wheel_of "$pin"; done < <(grep '^nvidia-' "$pins")) <<'PY'
import os, shutil, sys, zipfile
dest, licenses, want = sys.argv[1], sys.argv[2], set(sys.argv[3].split())
unlicensed = []
for wheel in sys.argv[4:]:
    with zipfile.ZipFile(wheel) as z:
        if not any(m.endswith(".dist-info/licenses/License.txt") for m in z.namelist()):
            unlicensed.append(os.path.basename(wheel))
        for m in z.namelist():
            base = os.path.basename(m)
            if base in want and "/lib/" in m:
                to = os.path.join(dest, base)
                want.discard(base)
            elif m.endswith(".dist-info/licenses/License.txt"):
                to = os.path.join(licenses, m.split(".dist-info/")[0] + ".txt")
            else:
                continue
            with z.open(m) as i, open(to, "wb") as o:
                shutil.copyfileobj(i, o)
if want:
    sys.exit("not in the wheels of images/cuda-wheels.txt: " + " ".join(sorted(want)))
if unlicensed:
    sys.exit("no .dist-info/licenses/License.txt in " + " ".join(unlicensed) + ": the image ships each wheel's license")
PY
    chmod 0644 "$libs$cuda_lib"/* "$libs/usr/local/cuda/licenses"/*
    # cudarc opens NCCL as libnccl.so (or libnccl.so.<CUDA major>); the wheel has its soname only.
    ln -s libnccl.so.2 "$libs$cuda_lib/libnccl.so"
    tar -C "$libs" --sort=name --mtime="@$epoch" --numeric-owner --owner=0 --group=0 -cf - . |
      umoci raw add-layer --image "$layout:$version" --history.created "$created" \
        --history.created_by "images/build.sh: CUDA libraries from PyPI: $cuda_wheels" /dev/stdin
    rm -rf "$libs"
  fi
  # A reproducible layer: sorted, fixed times, root-owned, then the non-root directories.
  layer=$work/$name/layer.tar
  excludes=()
  for d in "${owned[@]}"; do excludes+=(--exclude "./$d"); done
  tar -C "$rootfs" --sort=name --mtime="@$epoch" --numeric-owner --owner=0 --group=0 \
    "${excludes[@]}" -cf "$layer" .
  tar -C "$rootfs" --sort=name --mtime="@$epoch" --numeric-owner --owner=65532 --group=65532 \
    --no-recursion -rf "$layer" "${owned[@]/#/./}"
  umoci raw add-layer --image "$layout:$version" --history.created "$created" --history.created_by "images/build.sh: $bin on $image_debs" "$layer"
  rm -rf "$rootfs" "$layer"
  umoci config --image "$layout:$version" --os linux --architecture amd64 --created "$created" \
    --config.user 65532:65532 --config.workingdir "$workdir" \
    --config.env PATH=/usr/local/bin:/usr/bin:/bin --config.entrypoint "/usr/local/bin/$bin" \
    "${cuda_config[@]}" \
    --config.label "org.opencontainers.image.title=$image" \
    --config.label "org.opencontainers.image.version=$version" \
    --config.label "org.opencontainers.image.source=https://github.com/lockstep-dev/lockstep" \
    --config.label "org.opencontainers.image.licenses=$licenses" \
    --config.label "org.opencontainers.image.base.name=debian-packages: $image_debs" \
    --history.created "$created" --history.created_by "images/build.sh: config"
  umoci gc --layout "$layout"

  # The check: unpack the image as it was written, resolve its binary's libraries (and the CUDA
  # image's own) with the image's loader and library path, which must find them all inside the
  # image, and run the binary with them.
  check=$work/$name/check
  umoci unpack --rootless --image "$layout:$version" "$check" >/dev/null
  r=$check/rootfs
  loader=$r/lib64/ld-linux-x86-64.so.2
  [ -e "$loader" ] || { log "$image: no dynamic loader in the image"; exit 1; }
  # The image's LD_LIBRARY_PATH (its folders that exist), then the loader's default folders.
  libpath=$(python3 -c '
import json, sys
env = dict(e.split("=", 1) for e in json.load(open(sys.argv[1]))["process"]["env"])
print(env.get("LD_LIBRARY_PATH", ""))' "$check/config.json" | tr ':' '\n' |
    while read -r d; do if [ -n "$d" ] && [ -d "$r$d" ]; then echo "$r$d"; fi; done | paste -sd:)
  libpath=${libpath:+$libpath:}$r/lib/x86_64-linux-gnu:$r/usr/lib/x86_64-linux-gnu
  in_image() { env -u LD_LIBRARY_PATH "$loader" --library-path "$libpath" "$@"; }
  resolves() { # FILE: every library it needs resolves inside the image
    local list bad
    list=$(in_image --list "$1" 2>&1) || { log "$image: ${1#"$r"}: ${list//$r/}"; return 1; }
    bad=$(echo "$list" | awk -v r="$r/" '/=>/ && index($3, r) != 1')
    [ -z "$bad" ] || { log "$image: ${1#"$r"} needs libraries the image lacks:"; echo "$bad" >&2; return 1; }
  }
  resolves "$r/usr/local/bin/$bin" || exit 1
  help=$(in_image "$r/usr/local/bin/$bin" --help 2>&1) || { log "$image: $bin --help failed in the image: $help"; exit 1; }
  echo "$help" | grep -qi usage || { log "$image: unexpected --help output: $help"; exit 1; }
  ran="its $bin runs with the image's own libraries"
  if [ "$name" = worker-cuda ]; then
    n=0
    for f in "$r$cuda_lib"/*; do
      [ -L "$f" ] && continue
      # None links the driver's libcuda (they open it at run time); one that did could not be
      # checked here, without a GPU.
      if in_image --list "$f" 2>&1 | grep -q 'libcuda\.so'; then
        log "$image: ${f#"$r"} links the driver's libcuda, which only GPU nodes have"
        exit 1
      fi
      resolves "$f" || exit 1
      n=$((n + 1))
    done
    # The worker opens the CUDA libraries as it does on a GPU node, from the image, at the pinned
    # versions, and compiles the engine's kernels with the image's NVRTC. No GPU: the driver's
    # libraries are reported missing, which is expected here.
    report=$(cd "$r/opt/lockstep" && in_image "$r/usr/local/bin/$bin" bench cuda-libs --arch sm_90 2>&1) ||
      { log "$image: bench cuda-libs failed in the image:"; echo "${report//$r/}" >&2; exit 1; }
    echo "${report//$r/}" | sed 's/^/[images]   /' >&2
    want_version() { # PACKAGE FIELDS: the pinned version, its first FIELDS parts
      grep "^$1==" "$pins" | sed 's/^[^=]*==\([^ ]*\).*/\1/' | cut -d. -f1-"$2"
    }
    for lib in "cublas $(want_version nvidia-cublas 3)" "cublasLt -" "nvrtc $(want_version nvidia-cuda-nvrtc 2)" \
      "nccl $(want_version nvidia-nccl-cu13 3)"; do
      read -r l v <<< "$lib"
      echo "$report" | awk -v n="$l" -v v="$v" -v d="$r$cuda_lib/" \
        '$1 == n && $2 == "loaded" && $3 == v && index($4, d) == 1 { ok = 1 } END { exit !ok }' ||
        { log "$image: the worker did not open lib$l ${v/#-/} from $cuda_lib"; exit 1; }
    done
    ran="$n CUDA libraries resolve inside it, and its $bin opens them at the pinned versions and compiles the kernels for sm_90"
  fi
  user=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["process"]["user"]["uid"])' "$check/config.json" 2>/dev/null || echo "?")
  chmod -R u+w "$check" && rm -rf "$check"
  archive=$out/$image-$version.oci.tar
  tar -C "$layout" --sort=name --mtime="@$epoch" --numeric-owner --owner=0 --group=0 -cf "$archive" .
  manifest=$(umoci stat --image "$layout:$version" --json | python3 -c 'import json,sys; h=json.load(sys.stdin)["history"]; print(len(h))')
  # The CUDA image's layout would be a second copy of its archive: only the archive is kept.
  if [ "$name" = worker-cuda ]; then rm -rf "$layout"; fi
  size=$(du -sh "$archive" | cut -f1)
  log "$image:$version  $archive ($size, ${manifest} history entries); $ran; runs as uid $user"
done
