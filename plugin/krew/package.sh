#!/usr/bin/env bash
# Builds kubectl-lockstep (release), packs it as krew expects (a .tar.gz with the binary), and
# writes plugin/krew/lockstep.yaml with the archive's sha256 into target/krew/.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${CARGO_TARGET_DIR:-target}
out=target/krew
cargo build --release --locked -p kubectl-lockstep
mkdir -p "$out/pack"
cp "$target/release/kubectl-lockstep" "$out/pack/"
strip "$out/pack/kubectl-lockstep" 2>/dev/null || true
archive=$out/kubectl-lockstep-linux-amd64.tar.gz
tar -C "$out/pack" -czf "$archive" kubectl-lockstep
sum=$(sha256sum "$archive" | cut -d' ' -f1)
sed "s/sha256: SHA256/sha256: $sum/" plugin/krew/lockstep.yaml > "$out/lockstep.yaml"
echo "$archive ($sum)"
echo "$out/lockstep.yaml: kubectl krew install --manifest=$out/lockstep.yaml --archive=$archive"
