#!/usr/bin/env bash
# Operator benchmark (issue: operator): a private fake cluster of NODES nodes (default 200), JOBS
# ParallelJobs (default 100) of RANKS ranks (default 8) through the release-built operator, and
# every write the design asks for made directly with no operator (the design's floor), and the
# same pods created directly (the API floor), in one run. Prints the figures; REQUESTS=1 adds
# the API requests and CPU seconds per process of each phase, TIMELINE=1 the pod counts per second.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p lockstep-operator -p lockstep-e2e --bin lockstep-operator --bin bench-operator
target=${CARGO_TARGET_DIR:-target}
"$target/release/bench-operator" "$target/release/lockstep-operator"
