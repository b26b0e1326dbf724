#!/usr/bin/env bash
# Stops every process `up.sh` started, whole process groups, in reverse start order (so the
# apiserver is gone before etcd), TERM first and KILL after 10 s, and waits until each is gone;
# with a real node, its pods first and what it left outside the state folder last.
# The pid list is read into memory first: the state folder may vanish while this runs.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=${STATE:-$(cd "$here/../.." && pwd)/.cluster}
[ -e "$state/pids" ] || { echo "no cluster in $state"; exit 0; }
mapfile -t entries < <(tac "$state/pids")
# A real node's pods run under containerd's shims, outside every process group started here.
real=0
if [ -d "$state/node" ]; then real=1; "$here/realnode.sh" stop-pods "$state"; fi
alive() { kill -0 "$1" 2>/dev/null; }
for entry in "${entries[@]}"; do
  read -r name pid <<< "$entry"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
  fi
  alive "$pid" && echo "$name ($pid) survived SIGKILL" >&2
done
rm -f "$state/pids"
# ... and it leaves mounts, cgroups, a bridge and iptables rules behind.
[ $real = 1 ] && "$here/realnode.sh" clean "$state"
echo "cluster stopped"
