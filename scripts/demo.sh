#!/usr/bin/env bash
# The patroxy demo: etcd, three Patroni members (PostgreSQL 15) and patroxy, all on 127.0.0.1.
#
#   bash scripts/demo.sh           start everything, print how to use it, stop on Ctrl-C
#   bash scripts/demo.sh --smoke   start, query through patroxy, switch over, query again, stop
#
# Ports: etcd 2379 (peer 2380), PostgreSQL 5441-5443, Patroni REST 8011-8013, patroxy 6432
# (primary) and 6433 (replicas), as in config/patroxy.toml.
# Data and logs: $PATROXY_DEMO_DIR (default /tmp/patroxy-demo), recreated at each start.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
DIR=${PATROXY_DEMO_DIR:-/tmp/patroxy-demo}
CLUSTER="bash $REPO/scripts/cluster.sh"

bash scripts/install-deps.sh
echo "demo: building patroxy (release)"
cargo build --release --locked --quiet

for port in 6432 6433 9187; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "demo: port $port on 127.0.0.1 is already in use; stop whatever holds it (an earlier demo?)" >&2
    exit 1
  fi
done

stop_all() {
  trap - INT TERM EXIT
  echo
  echo "demo: stopping"
  # patroxy first (it drains its sessions), then Patroni (it stops PostgreSQL), then etcd.
  if [ -n "${PROXY_PID:-}" ]; then
    kill -TERM "$PROXY_PID" 2>/dev/null || true
    wait "$PROXY_PID" 2>/dev/null || true
  fi
  $CLUSTER stop
  echo "demo: stopped (data and logs stay in $DIR)"
}
trap stop_all INT TERM EXIT

echo "demo: starting etcd and 3 Patroni members"
$CLUSTER start

echo "demo: starting patroxy on 127.0.0.1:6432 (primary) and 127.0.0.1:6433 (replicas)"
"$REPO/target/release/patroxy" run --config "$REPO/config/patroxy.toml" --admin 127.0.0.1:9187 >"$DIR/patroxy.log" 2>&1 &
PROXY_PID=$!
psql_at() { psql "host=127.0.0.1 port=$1 user=postgres dbname=postgres connect_timeout=20" -XAtc "$2"; }
status() { "$REPO/target/release/patroxy" status --config "$REPO/config/patroxy.toml"; }
where() { psql_at "$1" "SELECT 'port ' || inet_server_port() || ', in recovery: ' || pg_is_in_recovery()"; }
end=$((SECONDS + 30))
until psql_at 6432 "SELECT 1" >/dev/null 2>&1; do
  [ $SECONDS -lt $end ] || { echo "demo: patroxy did not answer (see $DIR/patroxy.log)" >&2; exit 1; }
  sleep 0.2
done

if [ $SMOKE -eq 1 ]; then
  before=$($CLUSTER leader)
  echo "demo: through patroxy: $(where 6432) (leader $before)"
  for _ in 1 2; do echo "demo: reads through patroxy: $(where 6433)"; done
  [ "$(psql_at 6433 "SELECT pg_is_in_recovery()")" = "t" ] || { echo "demo: a read reached the primary" >&2; exit 1; }
  $CLUSTER switchover
  end=$((SECONDS + 60))
  until [ "$(psql_at 6432 "SELECT pg_is_in_recovery()" 2>/dev/null)" = "f" ] && [ "$($CLUSTER leader)" != "$before" ]; do
    [ $SECONDS -lt $end ] || { echo "demo: no new primary through patroxy" >&2; exit 1; }
    sleep 0.2
  done
  after=$($CLUSTER leader)
  echo "demo: after switchover: $(where 6432) (leader $after)"
  # patroxy's report in etcd follows the new leader: `patroxy status` shows who routes where.
  end=$((SECONDS + 30))
  until status_out=$(status) && echo "$status_out" | grep -E "^\| $after .*/primary" >/dev/null; do
    [ $SECONDS -lt $end ] || { echo "demo: patroxy status does not show $after routed by patroxy:" >&2; echo "$status_out" >&2; exit 1; }
    sleep 0.2
  done
  echo "$status_out"
  echo "demo: smoke test passed"
  exit 0
fi

cat <<TXT

patroxy demo is up: etcd, 3 Patroni members, patroxy in front.

  Connect through patroxy (always the primary):
    psql "host=127.0.0.1 port=6432 user=postgres dbname=postgres"
  Read-only sessions, balanced over the replicas:
    psql "host=127.0.0.1 port=6433 user=postgres dbname=postgres"
  See the cluster, and which patroxy listener routes to each member:
    target/release/patroxy status --config config/patroxy.toml
    target/release/patroxy status --admin 127.0.0.1:9187 --json
    patronictl -c $DIR/patronictl.yml list
  Admin endpoint: http://127.0.0.1:9187/ health, ready, metrics, topology
  Reload config/patroxy.toml without dropping sessions:
    kill -HUP $PROXY_PID
  Planned switchover (sessions on the old primary end with 57P01; new ones go to the new one):
    bash scripts/cluster.sh switchover
  Crash the leader (kill -9; a new leader within ttl = 10 s), then bring it back:
    bash scripts/cluster.sh crash \$(bash scripts/cluster.sh leader)
    bash scripts/cluster.sh restart node1     # the crashed node's name
  Logs: $DIR/patroxy.log, $DIR/node*.log

Ctrl-C stops everything.
TXT
wait "$PROXY_PID"
