#!/usr/bin/env bash
# The local demo cluster: etcd plus three Patroni members (PostgreSQL 15, synchronous mode),
# all on 127.0.0.1. Used by demo.sh, bench.sh and patroxy-bench's failover events.
#
#   cluster.sh start               start etcd and node1..3; wait for a leader and a sync standby
#   cluster.sh stop                stop everything (Patroni stops PostgreSQL)
#   cluster.sh leader              print the leader's name
#   cluster.sh switchover          planned switchover to the synchronous standby
#   cluster.sh crash NODE          kill -9 of NODE's Patroni and postmaster
#   cluster.sh freeze NODE         SIGSTOP every process of NODE (silent loss)
#   cluster.sh thaw NODE           SIGCONT them
#   cluster.sh fence NODE          kill -9 of a (frozen) NODE, its leftover processes resumed so
#                                  they exit; then `restart` brings it back as a replica
#   cluster.sh restart NODE        start NODE's Patroni again (it rejoins as a replica)
#   cluster.sh wait-healthy [N]    wait for a leader, N running members (default 3), a sync standby
#
# Ports: etcd 2379 (peer 2380), PostgreSQL 5441-5443, Patroni REST 8011-8013.
# Data and logs: $PATROXY_DEMO_DIR (default /tmp/patroxy-demo). PostgreSQL's max_connections
# is $PATROXY_MAX_CONNECTIONS (default 100).
set -euo pipefail

DIR=${PATROXY_DEMO_DIR:-/tmp/patroxy-demo}
SCOPE=demo
ETCD_PORT=2379
ETCD_PEER=2380
PG_BIN=/usr/lib/postgresql/15/bin
MAX_CONNECTIONS=${PATROXY_MAX_CONNECTIONS:-100}
ETCDCTL=(etcdctl --endpoints "127.0.0.1:$ETCD_PORT")

# PostgreSQL and Patroni refuse to run as root: run them as postgres with a clean environment.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    setpriv --reuid=postgres --regid=postgres --init-groups -- \
      env -i PATH="$PG_BIN:/usr/bin:/bin" HOME=/var/lib/postgresql LANG=C.UTF-8 "$@"
  else
    env -u PGPASSWORD "$@"
  fi
}

wait_until() { # seconds, description, command...
  local limit=$1 what=$2
  shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then
      echo "cluster: timed out waiting for $what (see $DIR/*.log)" >&2
      return 1
    fi
    sleep 0.1
  done
}

leader() { "${ETCDCTL[@]}" get --print-value-only "/service/$SCOPE/leader"; }
has_leader() { [ -n "$(leader)" ]; }
running_members() {
  "${ETCDCTL[@]}" get --prefix --print-value-only "/service/$SCOPE/members/" |
    grep -c '"state": *"running"' || true
}
has_sync() {
  "${ETCDCTL[@]}" get --print-value-only "/service/$SCOPE/sync" | grep -q '"sync_standby": *"[^"]'
}
healthy() { has_leader && [ "$(running_members)" -ge "$1" ] && { [ "$1" -eq 1 ] || has_sync; }; }

# The member's Patroni settings, from the template the end-to-end tests use too.
member_yaml() { # name pg_port api_port
  sed -e "s|@SCOPE@|$SCOPE|g" -e "s|@NAME@|$1|g" -e "s|@PG_PORT@|$2|g" -e "s|@API_PORT@|$3|g" \
    -e "s|@ETCD_PORT@|$ETCD_PORT|g" -e "s|@DIR@|$DIR/$1|g" -e "s|@PG_BIN@|$PG_BIN|g" \
    -e "s|@MAX_CONNECTIONS@|$MAX_CONNECTIONS|g" -e "s|@FSYNC@|on|g" \
    "$(dirname "$0")/patroni-member.yml"
}

start_member() { # name
  local name=$1 i=${1#node} dir="$DIR/$1"
  mkdir -p "$dir"
  [ -f "$dir/patroni.yml" ] || member_yaml "$name" $((5440 + i)) $((8010 + i)) >"$dir/patroni.yml"
  [ "$(id -u)" -eq 0 ] && chown -R postgres:postgres "$dir"
  # setsid: the member outlives this script; its processes are found by their paths later.
  setsid bash -c "$(declare -f as_pg); PG_BIN=$PG_BIN; as_pg patroni '$dir/patroni.yml'" \
    >>"$DIR/$name.log" 2>&1 </dev/null &
}

# Every process of a member: Patroni and the postmaster (found by their paths), and their
# children (backends, walsender...), whose titles do not name the path.
member_pids() { # name
  local roots
  roots=$(pgrep -f "$DIR/$1/" || true)
  [ -n "$roots" ] || return 0
  ps -eo pid=,ppid= | awk -v roots="$roots" '
    BEGIN { n = split(roots, r, "\n"); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
    { parent[$1] = $2; pids[NR] = $1 }
    END {
      do { changed = 0
        for (i in pids) { p = pids[i]; if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } }
      } while (changed)
      for (p in keep) print p
    }'
}

cmd=${1:-}
case "$cmd" in
start)
  for port in $ETCD_PORT $ETCD_PEER 5441 5442 5443 8011 8012 8013; do
    if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
      echo "cluster: port $port on 127.0.0.1 is in use; stop whatever holds it (scripts/cluster.sh stop?)" >&2
      exit 1
    fi
  done
  rm -rf "$DIR"
  mkdir -p "$DIR"
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$DIR"
  setsid etcd --name demo --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "demo=http://127.0.0.1:$ETCD_PEER" --log-level error >"$DIR/etcd.log" 2>&1 </dev/null &
  wait_until 30 "etcd" "${ETCDCTL[@]}" endpoint health
  printf 'scope: %s\nnamespace: /service/\netcd3:\n  hosts: 127.0.0.1:%s\n' "$SCOPE" "$ETCD_PORT" >"$DIR/patronictl.yml"
  start_member node1
  wait_until 90 "the first member to bootstrap" has_leader
  start_member node2
  start_member node3
  wait_until 120 "three running members and a sync standby" healthy 3
  echo "cluster: up (leader $(leader))"
  ;;
stop)
  for n in node1 node2 node3; do
    for pid in $(member_pids $n); do kill -CONT "$pid" 2>/dev/null || true; done
    pkill -TERM -f "$DIR/$n/patroni.yml" 2>/dev/null || true
  done
  end=$((SECONDS + 20))
  while pgrep -f "$DIR/node" >/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
  pkill -KILL -f "$DIR/node" 2>/dev/null || true
  pkill -TERM -f "$DIR/etcd" 2>/dev/null || true
  ;;
leader) leader ;;
wait-healthy) wait_until 120 "a healthy cluster" healthy "${2:-3}" ;;
switchover)
  wait_until 60 "a sync standby" has_sync
  old=$(leader)
  # patronictl 3.0 exits 0 even when a switchover fails: read what it says.
  out=$(patronictl -c "$DIR/patronictl.yml" switchover --leader "$old" --force "$SCOPE" 2>&1 || true)
  if ! grep -q "Successfully switched over" <<<"$out"; then
    echo "$out" >&2
    exit 1
  fi
  ;;
crash)
  for pid in $(pgrep -f "$DIR/$2/" || true); do kill -KILL "$pid" 2>/dev/null || true; done
  ;;
freeze) for pid in $(member_pids "$2"); do kill -STOP "$pid" 2>/dev/null || true; done ;;
thaw) for pid in $(member_pids "$2"); do kill -CONT "$pid" 2>/dev/null || true; done ;;
fence)
  # A frozen node must not simply resume: Patroni 3.0.2 was seen taking the leader key back
  # from the new leader on SIGCONT, which loses the new leader's writes (BENCHMARKS.md).
  pids=$(member_pids "$2")
  for pid in $(pgrep -f "$DIR/$2/" || true); do kill -KILL "$pid" 2>/dev/null || true; done
  # Backends left stopped would keep the old shared memory: let them see the postmaster gone.
  for pid in $pids; do kill -CONT "$pid" 2>/dev/null || true; done
  end=$((SECONDS + 20))
  while [ -n "$(member_pids "$2")" ] && [ $SECONDS -lt $end ]; do sleep 0.1; done
  ;;

restart) start_member "$2" ;;
*)
  sed -n '2,19p' "$0" >&2
  exit 2
  ;;
esac
