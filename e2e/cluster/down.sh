#!/usr/bin/env bash
# Stops every process `up.sh` started (whole process groups) and waits until they are gone.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=${STATE:-$(cd "$here/../.." && pwd)/.cluster}
[ -e "$state/pids" ] || { echo "no cluster in $state"; exit 0; }
tac "$state/pids" | while read -r name pid; do kill -TERM -- "-$pid" 2>/dev/null; done
for _ in $(seq 1 100); do
  alive=0
  while read -r name pid; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$state/pids"
  [ $alive = 0 ] && break
  sleep 0.1
done
while read -r name pid; do kill -KILL -- "-$pid" 2>/dev/null; done < "$state/pids"
rm -f "$state/pids"
echo "cluster stopped"
