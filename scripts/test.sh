#!/usr/bin/env bash
# Runs patroxy's whole test suite on Debian 12: formatting, lints, the fuzz targets' build,
# unit tests, integration tests against real etcd and PostgreSQL, end-to-end tests with real
# Patroni, the CLI, and the CI-sized part of the fault suite (faults 1, 3 and 4 on hosts in
# network namespaces; needs root). Installs what it needs first (only what is missing).
# Everything listens on 127.0.0.1, or on addresses inside the namespaces the tests make.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

source scripts/test-env.sh

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
