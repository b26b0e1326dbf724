#!/usr/bin/env bash
# Prints the paths of the Prometheus Operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs,
# taken from its Go module (the pinned version; the module cache keeps it after the first run).
# The chart tests install them so that the API server checks the chart's optional monitors.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
dir=$(GOWORK=off GOFLAGS=-mod=mod go mod download -json \
  "github.com/prometheus-operator/prometheus-operator@v$PROMETHEUS_OPERATOR_VERSION" \
  | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
for kind in servicemonitors podmonitors prometheusrules; do
  f="$dir/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml"
  [ -f "$f" ] || { echo "missing $f" >&2; exit 1; }
  echo "$f"
done
