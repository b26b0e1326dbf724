#!/usr/bin/env bash
# Runs `cargo test` with the arguments given, against the cluster of `make cluster-up` when it
# runs, else against a cluster this script starts and stops around the tests (so nothing is left
# running afterwards, whatever happens to the tests).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if STATE="$root/.cluster" "$root/e2e/cluster/status.sh" >/dev/null 2>&1; then
  KUBECONFIG="$root/.cluster/kubeconfig" exec cargo test "$@"
fi
state="$root/target/test-cluster"
STATE="$state" "$root/e2e/cluster/down.sh" >/dev/null 2>&1
STATE="$state" "$root/e2e/cluster/up.sh" >/dev/null || exit 1
trap 'STATE="$state" "$root/e2e/cluster/down.sh" >/dev/null' EXIT
KUBECONFIG="$state/kubeconfig" cargo test "$@"
