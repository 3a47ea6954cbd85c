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
SCOPE=demo
ETCD_PORT=2379
ETCD_PEER=2380
PG_BIN=/usr/lib/postgresql/15/bin
PROXY=127.0.0.1:6432

bash scripts/install-deps.sh
echo "demo: building patroxy (release)"
cargo build --release --locked --quiet

for port in $ETCD_PORT $ETCD_PEER 5441 5442 5443 8011 8012 8013 6432 6433; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "demo: port $port on 127.0.0.1 is already in use; stop whatever holds it (an earlier demo?)" >&2
    exit 1
  fi
done

# PostgreSQL and Patroni refuse to run as root: run them as postgres with a clean environment.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    setpriv --reuid=postgres --regid=postgres --init-groups -- \
      env -i PATH="$PG_BIN:/usr/bin:/bin" HOME=/var/lib/postgresql LANG=C.UTF-8 "$@"
  else
    env -u PGPASSWORD "$@"
  fi
}

rm -rf "$DIR"
mkdir -p "$DIR"
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$DIR"

PIDS=()
stop_all() {
  trap - INT TERM EXIT
  echo
  echo "demo: stopping"
  # patroxy first (it drains its sessions), then Patroni (it stops PostgreSQL), then etcd.
  [ -n "${PROXY_PID:-}" ] && kill -TERM "$PROXY_PID" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && break
    sleep 0.2
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  pkill -KILL -f "$DIR/node" 2>/dev/null || true
  [ -n "${ETCD_PID:-}" ] && kill -TERM "$ETCD_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  echo "demo: stopped (data and logs stay in $DIR)"
}
trap stop_all INT TERM EXIT

etcd --name demo --data-dir "$DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "demo=http://127.0.0.1:$ETCD_PEER" --log-level error >"$DIR/etcd.log" 2>&1 &
ETCD_PID=$!

wait_until() { # seconds, description, command...
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then echo "demo: timed out waiting for $what (see $DIR/*.log)" >&2; exit 1; fi
    sleep 0.2
  done
}
wait_until 30 "etcd" etcdctl --endpoints "127.0.0.1:$ETCD_PORT" endpoint health

cat >"$DIR/patronictl.yml" <<YAML
scope: $SCOPE
namespace: /service/
etcd3:
  hosts: 127.0.0.1:$ETCD_PORT
YAML

member_yaml() { # name pg_port api_port
  local name=$1 pg=$2 api=$3 dir="$DIR/$1"
  cat <<YAML
scope: $SCOPE
namespace: /service/
name: $name
log:
  level: WARNING
restapi:
  listen: 127.0.0.1:$api
  connect_address: 127.0.0.1:$api
etcd3:
  hosts: 127.0.0.1:$ETCD_PORT
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 2
    retry_timeout: 4
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_log_hints: 'on'
  initdb:
  - encoding: UTF8
  - auth-local: trust
  pg_hba:
  - local all all trust
  - host all all 127.0.0.1/32 trust
  - host replication replicator 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:$pg
  connect_address: 127.0.0.1:$pg
  data_dir: $dir/data
  bin_dir: $PG_BIN
  pgpass: $dir/pgpass
  authentication:
    replication: {username: replicator, password: rep-pass}
    superuser: {username: postgres, password: postgres}
  parameters:
    unix_socket_directories: '$dir'
YAML
}

start_member() { # index
  local i=$1 name="node$1" dir="$DIR/node$1"
  mkdir -p "$dir"
  member_yaml "$name" $((5440 + i)) $((8010 + i)) >"$dir/patroni.yml"
  [ "$(id -u)" -eq 0 ] && chown -R postgres:postgres "$dir"
  as_pg patroni "$dir/patroni.yml" >"$DIR/$name.log" 2>&1 &
  PIDS+=($!)
}

leader() { etcdctl --endpoints "127.0.0.1:$ETCD_PORT" get --print-value-only "/service/$SCOPE/leader"; }
has_leader() { [ -n "$(leader)" ]; }
running_members() {
  etcdctl --endpoints "127.0.0.1:$ETCD_PORT" get --prefix --print-value-only "/service/$SCOPE/members/" |
    grep -c '"state": *"running"' || true
}
all_running() { [ "$(running_members)" -ge 3 ]; }
# Synchronous mode: a switchover needs a synchronous standby, chosen a loop or two after start.
has_sync() {
  etcdctl --endpoints "127.0.0.1:$ETCD_PORT" get --print-value-only "/service/$SCOPE/sync" |
    grep -q '"sync_standby": *"[^"]'
}

echo "demo: starting etcd and 3 Patroni members"
start_member 1
wait_until 90 "the first member to bootstrap" has_leader
start_member 2
start_member 3
wait_until 120 "all three members to run" all_running
wait_until 60 "a synchronous standby" has_sync

echo "demo: starting patroxy on $PROXY"
"$REPO/target/release/patroxy" run --config "$REPO/config/patroxy.toml" \
  --etcd "http://127.0.0.1:$ETCD_PORT" --scope "$SCOPE" --primary "$PROXY" >"$DIR/patroxy.log" 2>&1 &
PROXY_PID=$!
psql_proxy() { psql "host=127.0.0.1 port=${PROXY#*:} user=postgres dbname=postgres connect_timeout=20" -XAtc "$1"; }
psql_reads() { psql "host=127.0.0.1 port=6433 user=postgres dbname=postgres connect_timeout=20" -XAtc "$1"; }
wait_until 30 "patroxy" psql_proxy "SELECT 1"

if [ $SMOKE -eq 1 ]; then
  before=$(leader)
  echo "demo: through patroxy: $(psql_proxy "SELECT 'port ' || inet_server_port() || ', in recovery: ' || pg_is_in_recovery()") (leader $before)"
  for _ in 1 2; do
    echo "demo: reads through patroxy: $(psql_reads "SELECT 'port ' || inet_server_port() || ', in recovery: ' || pg_is_in_recovery()")"
  done
  [ "$(psql_reads "SELECT pg_is_in_recovery()")" = "t" ] || { echo "demo: a read reached the primary" >&2; exit 1; }
  # patronictl 3.0 exits 0 even when a switchover fails: read what it says.
  patronictl -c "$DIR/patronictl.yml" switchover --leader "$before" --force "$SCOPE" >"$DIR/switchover.log" 2>&1 || true
  if ! grep -q "Successfully switched over" "$DIR/switchover.log"; then
    cat "$DIR/switchover.log" >&2
    exit 1
  fi
  new_leader() { l=$(leader); [ -n "$l" ] && [ "$l" != "$before" ]; }
  wait_until 60 "a new leader" new_leader
  wait_until 60 "patroxy to reach the new primary" psql_proxy "CREATE TABLE IF NOT EXISTS smoke(x int)"
  echo "demo: after switchover: $(psql_proxy "SELECT 'port ' || inet_server_port() || ', in recovery: ' || pg_is_in_recovery()") (leader $(leader))"
  echo "demo: smoke test passed"
  exit 0
fi

cat <<TXT

patroxy demo is up: etcd, 3 Patroni members, patroxy in front.

  Connect through patroxy (always the primary):
    psql "host=127.0.0.1 port=6432 user=postgres dbname=postgres"
  Read-only sessions, balanced over the replicas:
    psql "host=127.0.0.1 port=6433 user=postgres dbname=postgres"

  See the cluster:
    patronictl -c $DIR/patronictl.yml list
  Planned switchover (sessions on the old primary end with 57P01; new ones go to the new one):
    patronictl -c $DIR/patronictl.yml switchover --force $SCOPE
  Crash the leader (kill -9 of its Patroni and PostgreSQL; a new leader within ttl = 10 s):
    pkill -9 -f "$DIR/\$(etcdctl get --print-value-only /service/$SCOPE/leader)/"
  Logs: $DIR/patroxy.log, $DIR/node*.log

Ctrl-C stops everything.
TXT
wait "$PROXY_PID"
