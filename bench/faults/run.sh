#!/usr/bin/env bash
# Fault suite (issue 18, "Measure"): starts a cluster of its own (TEST_STATE, default
# ~/.cache/lockstep/faults-cluster, never the default .cluster another run may use), with the real
# node when run as root (its build and the worker image first, as e2e/run-tests.sh --real-node
# does), runs bench-faults against it (the operator in that process, as in the e2e suite), and
# stops the cluster whatever happens. Without root the real-node faults print "not run".
#   KILLS    operator kills (default 50)      TRIALS   trials of every other fault (default 3)
#   FAULTS   only the faults whose name contains one of these comma-separated words
#   SEED     the pseudo-random moments of the operator kills
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}/target}
state=${TEST_STATE:-$HOME/.cache/lockstep/faults-cluster}
real=0
if [ "$(id -u)" = 0 ]; then
  real=1
  e2e/cluster/node-build.sh >/dev/null
  PROFILE=${IMAGE_PROFILE:-dev} IMAGES=worker images/build.sh
else
  echo "== not root: the real-node faults (a rank killed for real, hung, a corrupt checkpoint) will not run" >&2
fi
cargo build --locked -q -p lockstep-e2e --bin bench-faults

STATE="$state" e2e/cluster/down.sh >/dev/null 2>&1 || true
trap 'STATE="$state" e2e/cluster/down.sh >/dev/null' EXIT
started=$(date +%s)
if [ $real = 1 ]; then
  REAL_NODES=1 NODE_IMAGES=worker STATE="$state" e2e/cluster/up.sh >/dev/null
else
  STATE="$state" e2e/cluster/up.sh >/dev/null
fi
echo "== cluster up in $(( $(date +%s) - started )) s (state $state)" >&2
rc=0
KUBECONFIG="$state/kubeconfig" "$CARGO_TARGET_DIR/debug/bench-faults" || rc=$?
trap - EXIT
STATE="$state" e2e/cluster/down.sh >/dev/null
if [ $real = 1 ] && ! e2e/cluster/realnode.sh leftovers "$state"; then
  echo "== the stopped real node left the above behind" >&2
  rc=1
fi
exit $rc
