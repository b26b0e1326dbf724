#!/usr/bin/env bash
# Checkpoints against Hugging Face transformers (worker/tests/hf/roundtrip.py): PyTorch and
# transformers from PyPI, in a virtual environment cached in $LOCKSTEP_CACHE/hf-venv and made
# again only when requirements.txt changes. PyPI's PyTorch wheel brings the CUDA libraries as
# dependencies (about 3 GB to download, 5 GB installed); the test runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/../../.."
cache=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}
venv=$cache/hf-venv
req=worker/tests/hf/requirements.txt
stamp=$(sha256sum "$req" | cut -c1-16)
# The pinned PyTorch 2.5.1 has wheels for CPython 3.9 to 3.12 on x86_64 Linux.
python3 -c 'import platform, sys; sys.exit(0 if (3, 9) <= sys.version_info[:2] <= (3, 12) and platform.machine() == "x86_64" else 1)' || {
  echo "worker/tests/hf: needs CPython 3.9 to 3.12 on x86_64 for the pinned PyTorch (found $(python3 --version 2>&1), $(uname -m))" >&2
  exit 1
}
if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "== making $venv (PyTorch and transformers from PyPI)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --no-cache-dir --quiet --requirement "$req"
  echo "$stamp" > "$venv/.stamp"
fi
cargo build --locked --quiet -p lockstep-worker --bin lockstep-worker
exec "$venv/bin/python" worker/tests/hf/roundtrip.py \
  "${CARGO_TARGET_DIR:-target}/debug/lockstep-worker" data/tinyshakespeare.txt.gz
