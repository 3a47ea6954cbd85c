#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (FUZZ_SECONDS, default 60) with cargo-fuzz
# (libFuzzer + AddressSanitizer). Findings land in fuzz/artifacts/<target>/ and fail the run.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz needs nightly flags; a stable toolchain accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
for target in first_packet frames control_messages rewriter scram_server; do
  echo "fuzz: $target for ${SECONDS_EACH}s"
  mkdir -p "fuzz/corpus/$target"
  cargo fuzz run "$target" -- -max_total_time="$SECONDS_EACH" -max_len=12000 2>&1 | tail -3
done
echo "fuzz: no crash found"
