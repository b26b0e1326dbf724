#!/usr/bin/env bash
# Runs `cargo test` with the arguments given, against the cluster of `make cluster-up` when it
# runs, else against a cluster this script starts and stops around the tests (so nothing is left
# running afterwards, whatever happens to the tests).
#   --real-node       first build the real node and the images (root), start the cluster with
#                     REAL_NODES=1, and after `cargo test ARGS` run the real-node tests
#                     (e2e/tests/e2e/real_node.rs, ignored in a plain `cargo test`). Without root
#                     they cannot run: it says so, and runs the rest.
#   --real-node-only  the same, but only the real-node tests (`make e2e-real`)
#   TEST_STATE        the state folder of the cluster it starts (default target/test-cluster)
#   SCHEDULERS        the external schedulers the cluster it starts runs (default all three:
#                     kueue,volcano,coscheduling; see e2e/cluster/up.sh). Against a cluster of
#                     `make cluster-up` started without one, its tests say NOT RUN and pass.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
real=0 only=0
case "${1:-}" in
  --real-node) real=1; shift ;;
  --real-node-only) real=1; only=1; shift ;;
esac
real_tests=(cargo test -p lockstep-e2e --locked --test e2e -- --ignored real_node::)
if [ $real = 1 ] && [ "$(id -u)" != 0 ]; then
  echo "== NOT RUN: the real-node tests (e2e/tests/e2e/real_node.rs) need root (kubelet, containerd, a bridge)" >&2
  [ $only = 1 ] && exit 1
  real=0
fi
if [ $real = 1 ]; then
  # What the real node runs, and the images it imports: built (or found cached) before the
  # cluster starts, so that their time shows apart from the tests'.
  # The images carry this build's binaries (the dev profile, IMAGE_PROFILE to change it): a
  # release build of their own would add 13.5 minutes to a cold CI run.
  "$root/e2e/cluster/node-build.sh" >/dev/null || exit 1
  PROFILE=${IMAGE_PROFILE:-dev} IMAGES="worker operator" "$root/images/build.sh" || exit 1
fi

run() { # KUBECONFIG: cargo test ARGS, then the real-node tests when asked
  local rc=0
  if [ $only = 0 ]; then cargo test "$@" || rc=$?; fi
  if [ $real = 1 ]; then
    echo "== the real-node tests" >&2
    "${real_tests[@]}" || rc=$?
  fi
  return $rc
}

if STATE="$root/.cluster" "$root/e2e/cluster/status.sh" >/dev/null 2>&1; then
  if [ $real = 1 ] && [ ! -d "$root/.cluster/node" ]; then
    echo "== NOT RUN: the real-node tests: the cluster of make cluster-up has no real node (make cluster-down, then make cluster-up REAL_NODES=1)" >&2
    [ $only = 1 ] && exit 1
    real=0
  fi
  export KUBECONFIG="$root/.cluster/kubeconfig"
  run "$@"; exit $?
fi
state=${TEST_STATE:-$root/target/test-cluster}
STATE="$state" "$root/e2e/cluster/down.sh" >/dev/null 2>&1
[ $real = 1 ] && export REAL_NODES=1
export SCHEDULERS=${SCHEDULERS-kueue,volcano,coscheduling}
STATE="$state" "$root/e2e/cluster/up.sh" >/dev/null || exit 1
trap 'STATE="$state" "$root/e2e/cluster/down.sh" >/dev/null' EXIT
export KUBECONFIG="$state/kubeconfig"
run "$@"
rc=$?
trap - EXIT
STATE="$state" "$root/e2e/cluster/down.sh" >/dev/null
if [ $real = 1 ]; then
  # The real node's own test: a stopped cluster leaves no process, mount, cgroup, bridge,
  # iptables rule or file outside its state folder.
  if "$root/e2e/cluster/realnode.sh" leftovers "$state"; then
    echo "== the stopped real node left nothing behind" >&2
  else
    echo "== FAILED: the stopped real node left the above behind" >&2
    rc=1
  fi
fi
exit $rc
