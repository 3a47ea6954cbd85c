#!/usr/bin/env bash
# Runs patroxy's whole test suite on Debian 12: formatting, lints, the fuzz targets' build,
# unit tests, integration tests against real etcd and PostgreSQL, end-to-end tests with real
# Patroni, and the CLI. Installs what it needs first (only what is missing). Everything
# listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

# The servers tests start note their pids here, and their data lives under a root of this
# run's own: an interrupted run ends exactly its own processes and removes only its files.
PATROXY_TEST_PIDS=$(mktemp -d /tmp/patroxy-pids-XXXXXX)
PATROXY_TEST_ROOT=$(mktemp -d /tmp/patroxy-run-XXXXXX)
chmod 755 "$PATROXY_TEST_ROOT"
export PATROXY_TEST_PIDS PATROXY_TEST_ROOT

# A process and everything below it.
tree() {
  local pid=$1 child
  for child in $(pgrep -P "$pid" 2>/dev/null); do tree "$child"; done
  echo "$pid"
}
cleanup() {
  local pid victims=()
  for f in "$PATROXY_TEST_PIDS"/*; do
    [ -e "$f" ] || continue
    pid=$(basename "$f")
    mapfile -t -O "${#victims[@]}" victims < <(tree "$pid")
  done
  if [ ${#victims[@]} -gt 0 ]; then
    echo "test.sh: ending ${#victims[@]} leftover process(es) of this run"
    kill -KILL "${victims[@]}" 2>/dev/null || true
  fi
  rm -rf "$PATROXY_TEST_PIDS" "$PATROXY_TEST_ROOT"
}
trap cleanup EXIT

cargo fmt --all -- --check
cargo clippy --workspace --locked --all-targets -- -D warnings
# The fuzz targets are a workspace of their own (cargo fuzz builds them); keep them building.
cargo check --quiet --manifest-path fuzz/Cargo.toml --target-dir target/fuzz-check --bins
log=$(mktemp)
# --no-fail-fast: one failing test binary must not hide the others' results.
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f; exit (p == 0 || f > 0) }' "$log" || status=1
rm -f "$log"
exit "$status"
