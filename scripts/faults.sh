#!/usr/bin/env bash
# The full fault suite on separate hosts (network namespaces made by the tests, see
# tests/common/lab.rs): faults 1-5 and the soak (20 switchovers, 5 leader partitions, 5 etcd
# member faults in a seeded random order; PATROXY_SOAK_SEED replays one). Needs root.
# Writes bench-results/faults/: faults.log, soak.md (a table per event) and timeline.svg.
# Takes about 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "faults.sh: needs root, to make network namespaces" >&2
  exit 1
fi
bash scripts/install-deps.sh
source scripts/test-env.sh

out=bench-results/faults
mkdir -p "$out"
export PATROXY_FAULTS_OUT="$PWD/$out"
# One fault at a time: each builds a lab of eight hosts.
cargo test --locked --test faults -- --include-ignored --test-threads=1 --nocapture 2>&1 \
  | tee "$out/faults.log"
echo "faults.sh: results in $out/ (faults.log, soak.md, timeline.svg)"
