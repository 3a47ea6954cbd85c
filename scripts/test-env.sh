# Sourced by test.sh and faults.sh: the servers tests start note their pids in a directory of
# this run's own, and their data lives under a root of its own, so an interrupted run ends
# exactly its own processes, removes only its files, and leaves no lab namespace behind.
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
  local pid ns victims=()
  for f in "$PATROXY_TEST_PIDS"/*; do
    [ -e "$f" ] || continue
    pid=$(basename "$f")
    mapfile -t -O "${#victims[@]}" victims < <(tree "$pid")
  done
  if [ ${#victims[@]} -gt 0 ]; then
    echo "$(basename "$0"): ending ${#victims[@]} leftover process(es) of this run"
    kill -KILL "${victims[@]}" 2>/dev/null || true
  fi
  # Fault-lab namespaces are named ptx<test pid>x<n>-<host>; those of dead tests go.
  for ns in $(ip netns list 2>/dev/null | awk '/^ptx[0-9]+x/ { print $1 }'); do
    pid=${ns#ptx}
    pid=${pid%%x*}
    [ -d "/proc/$pid" ] || ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$PATROXY_TEST_PIDS" "$PATROXY_TEST_ROOT"
}
trap cleanup EXIT
