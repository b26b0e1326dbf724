#!/usr/bin/env bash
# Exits 0 when every process of the cluster in $STATE is alive.
here=$(cd "$(dirname "$0")" && pwd)
state=${STATE:-$(cd "$here/../.." && pwd)/.cluster}
[ -e "$state/pids" ] || exit 1
while read -r name pid; do kill -0 "$pid" 2>/dev/null || { echo "$name ($pid) is not running"; exit 1; }; done < "$state/pids"
echo "running: $(cut -d' ' -f1 "$state/pids" | tr '\n' ' ')"
