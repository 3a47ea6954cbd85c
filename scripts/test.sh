#!/usr/bin/env bash
# Runs patroxy's whole test suite on Debian 12: unit tests, integration tests against real
# etcd and PostgreSQL, end-to-end tests with real Patroni, and the CLI. Installs what it needs
# first (only what is missing). Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

# Servers left over by an interrupted run live under /tmp/patroxy-test-*: stop and remove them.
cleanup() {
  pkill -KILL -f '/tmp/patroxy-test-' 2>/dev/null || true
  rm -rf /tmp/patroxy-test-* 2>/dev/null || true
}
cleanup
trap cleanup EXIT

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
log=$(mktemp)
cargo test --locked 2>&1 | tee "$log"
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f; exit (p == 0 || f > 0) }' "$log"
rm -f "$log"
