#!/usr/bin/env bash
# Benchmarks patroxy against a direct connection, HAProxy and PgBouncer, all on 127.0.0.1:
#   1. the local Patroni cluster (scripts/cluster.sh, max_connections 1200);
#   2. HAProxy with the standard Patroni REST checks on 127.0.0.1:6532;
#   3. PgBouncer in session mode on 127.0.0.1:6632, in front of HAProxy;
#   4. patroxy on 127.0.0.1:6432 (config/patroxy.toml);
# then patroxy-bench: latency (4 workloads x concurrency 1, 8, 64), idle memory (1000
# sessions), and failover (switchover, kill -9, SIGSTOP). Results: bench-results/.
#
#   bash scripts/bench.sh                    everything (about 15 minutes)
#   BENCH_SLICE=1s BENCH_ROUNDS=1 bash scripts/bench.sh latency     a quick latency run
#   bash scripts/bench.sh failover           only the failover run
#   bash scripts/bench.sh failover-pool      the failover run with 50 clients per endpoint,
#                                            patroxy through a transaction pool
#   bash scripts/bench.sh tls                TLS costs: direct and patroxy, plain and TLS
#   bash scripts/bench.sh pool               pooling: connection speed and many clients on few
#                                            servers, patroxy against direct and PgBouncer
#                                            (POOL_WORKERS=N relay threads, POOL_WORK_STEALING=true
#                                            one work-stealing runtime instead;
#                                            PGBOUNCER=/path/to/pgbouncer another PgBouncer than
#                                            Debian's: from 1.21 on, its transaction pools keep
#                                            prepared statements, max_prepared_statements = 200)
#   bash scripts/bench.sh up                 set everything up and wait (for profiling)
#   BASELINE=<git ref> bash scripts/bench.sh baseline
#                                            pooled pgbench (-S, -M prepared, -C) through this
#                                            patroxy and through the one built at <ref>, in
#                                            the same run, interleaved: tps and CPU per
#                                            transaction; and pool.verify_release's cost
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHAT=${1:-all}
DIR=${PATROXY_DEMO_DIR:-/tmp/patroxy-demo}
PGBOUNCER=${PGBOUNCER:-pgbouncer}
OUT=${BENCH_OUT:-$REPO/bench-results}
CLUSTER="bash $REPO/scripts/cluster.sh"
export PATROXY_MAX_CONNECTIONS=1200

bash scripts/install-deps.sh haproxy pgbouncer openssl
echo "bench: building (release)"
cargo build --release --locked --quiet --workspace --bins
for port in 6432 6433 6442 6443 6452 6453 6454 6455 6456 6457 6458 6532 6632 6633 6634 6635; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "bench: port $port on 127.0.0.1 is in use; stop whatever holds it" >&2
    exit 1
  fi
done

# PgBouncer refuses to run as root. A prefix array, not a function, so that $! is its pid.
AS_PG=()
[ "$(id -u)" -eq 0 ] && AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)

PIDS=()
stop_all() {
  trap - INT TERM EXIT
  echo "bench: stopping"
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  pkill -TERM -f "$DIR/(pgbouncer.ini|haproxy.cfg)" 2>/dev/null || true
  wait 2>/dev/null || true
  $CLUSTER stop
}
trap stop_all INT TERM EXIT

$CLUSTER start
mkdir -p "$OUT"

cat >"$DIR/haproxy.cfg" <<CFG
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 4s
    timeout client 30m
    timeout server 30m
    retries 2
listen primary
    bind 127.0.0.1:6532
    option httpchk GET /primary
    http-check expect status 200
    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions
    server node1 127.0.0.1:5441 maxconn 1100 check port 8011
    server node2 127.0.0.1:5442 maxconn 1100 check port 8012
    server node3 127.0.0.1:5443 maxconn 1100 check port 8013
CFG
haproxy -f "$DIR/haproxy.cfg" -db >"$DIR/haproxy.log" 2>&1 &
PIDS+=($!)

cat >"$DIR/pgbouncer.ini" <<CFG
[databases]
postgres = host=127.0.0.1 port=6532 dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 6632
unix_socket_dir =
auth_type = trust
auth_file = $DIR/userlist.txt
pool_mode = session
max_client_conn = 2000
default_pool_size = 1100
ignore_startup_parameters = extra_float_digits
logfile = $DIR/pgbouncer.log
CFG
echo '"postgres" ""' >"$DIR/userlist.txt"
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$DIR/pgbouncer.ini" "$DIR/userlist.txt"
"${AS_PG[@]}" "$PGBOUNCER" "$DIR/pgbouncer.ini" >>"$DIR/pgbouncer.out" 2>&1 &
PIDS+=($!)

"$REPO/target/release/patroxy" run --config "$REPO/config/patroxy.toml" --log warn >"$DIR/patroxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=($PROXY_PID)

conn() { echo "host=127.0.0.1 port=$1 user=postgres dbname=postgres"; }
end=$((SECONDS + 60))
for port in 6432 6532 6632; do
  until psql "$(conn $port) connect_timeout=5" -XAtc "SELECT 1" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { echo "bench: nothing answers on $port (see $DIR/*.log)" >&2; exit 1; }
    sleep 0.2
  done
done
leader_port=$((5440 + $($CLUSTER leader | tr -dc 0-9)))
echo "bench: leader on $leader_port; pgbench -i -s 10"
/usr/lib/postgresql/15/bin/pgbench -i -s 10 -q "$(conn $leader_port)" >"$DIR/pgbench-init.log" 2>&1

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "cpu: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "kernel: $(uname -r)"
  echo "postgres: $(/usr/lib/postgresql/15/bin/postgres --version)"
  echo "haproxy: $(haproxy -v | head -1)"
  echo "pgbouncer: $("$PGBOUNCER" --version | head -1)"
  echo "patroxy: $(git -C "$REPO" rev-parse --short HEAD)"
} >"$OUT/machine.txt"

BENCH="$REPO/target/release/patroxy-bench"
if [ "$WHAT" = up ]; then
  cat <<TXT
bench: everything is up; Ctrl-C stops it. patroxy's pid: $PROXY_PID
  direct    $(conn $leader_port)
  patroxy   $(conn 6432)
  haproxy   $(conn 6532)
  pgbouncer $(conn 6632)
TXT
  wait "$PROXY_PID"
  exit 0
fi
if [ "$WHAT" = all ] || [ "$WHAT" = latency ]; then
  echo "bench: latency"
  "$BENCH" latency --out "$OUT" --slice "${BENCH_SLICE:-2s}" --rounds "${BENCH_ROUNDS:-3}" \
    ${BENCH_WORKLOADS:+--workloads "$BENCH_WORKLOADS"} ${BENCH_CONCURRENCY:+--concurrency "$BENCH_CONCURRENCY"} \
    --endpoint "direct=$(conn $leader_port)" \
    --endpoint "patroxy=$(conn 6432)" \
    --endpoint "haproxy=$(conn 6532)" \
    --endpoint "pgbouncer=$(conn 6632)" | tee "$OUT/latency.txt"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = idle ]; then
  echo "bench: idle memory"
  "$BENCH" idle --out "$OUT" --endpoint "patroxy=$(conn 6432)" --pid "$PROXY_PID" --sessions 1000 | tee "$OUT/idle.txt"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = failover ]; then
  echo "bench: failover"
  "$BENCH" failover --out "$OUT" --cluster-ctl "$REPO/scripts/cluster.sh" \
    --endpoint "patroxy=$(conn 6432)" \
    --endpoint "haproxy=$(conn 6532)" \
    --endpoint "pgbouncer=$(conn 6632)" \
    --endpoint "direct=host=127.0.0.1,127.0.0.1,127.0.0.1 port=5441,5442,5443 user=postgres dbname=postgres target_session_attrs=read-write" \
    | tee "$OUT/failover.txt"
fi
if [ "$WHAT" = failover-pool ]; then
  # Issue 12's measurement: 50 clients per endpoint, a transaction pool in patroxy against
  # HAProxy, PgBouncer (session mode, behind HAProxy) and libpq's multi-host failover.
  P=$DIR/failover-pool
  mkdir -p "$P"
  cat >"$P/patroxy.toml" <<CFG
[cluster]
scope = "demo"
[[listener]]
name = "transaction"
listen = "127.0.0.1:6453"
pool_mode = "transaction"
[pool]
pool_size = ${POOL_SIZE:-8}
[auth]
trust = ["127.0.0.1/32"]
[timeouts]
connect_wait = "60s"
[report]
enabled = false
CFG
  "$REPO/target/release/patroxy" run --config "$P/patroxy.toml" --log warn >"$DIR/patroxy-failover-pool.log" 2>&1 &
  PIDS+=($!)
  until psql "$(conn 6453) connect_timeout=5" -XAtc "SELECT 1" >/dev/null 2>&1; do sleep 0.2; done
  echo "bench: failover with ${FAILOVER_CLIENTS:-50} clients per endpoint"
  mkdir -p "$OUT/failover-pool"
  "$BENCH" failover --out "$OUT/failover-pool" --cluster-ctl "$REPO/scripts/cluster.sh" \
    --clients "${FAILOVER_CLIENTS:-50}" --events "${FAILOVER_EVENTS:-switchover,crash,freeze}" \
    --endpoint "patroxy-transaction=$(conn 6453)" \
    --endpoint "haproxy=$(conn 6532)" \
    --endpoint "pgbouncer=$(conn 6632)" \
    --endpoint "direct=host=127.0.0.1,127.0.0.1,127.0.0.1 port=5441,5442,5443 user=postgres dbname=postgres target_session_attrs=read-write" \
    | tee "$OUT/failover-pool.txt"
fi
if [ "$WHAT" = tls ]; then
  # A CA and a certificate for 127.0.0.1; PostgreSQL (through Patroni) and patroxy both use it.
  T=$DIR/tls
  mkdir -p "$T"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
    -subj "/CN=patroxy bench CA" -keyout "$T/ca.key" -out "$T/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$T/server.key" -out "$T/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$T/ext.cnf"
  openssl x509 -req -in "$T/server.csr" -CA "$T/ca.crt" -CAkey "$T/ca.key" -CAcreateserial \
    -days 7 -extfile "$T/ext.cnf" -out "$T/server.crt" 2>/dev/null
  chmod 600 "$T/server.key"
  [ "$(id -u)" -eq 0 ] && chown -R postgres:postgres "$T"
  patronictl -c "$DIR/patronictl.yml" edit-config --force --pg ssl=on \
    --pg "ssl_cert_file=$T/server.crt" --pg "ssl_key_file=$T/server.key" demo >/dev/null
  end=$((SECONDS + 60))
  until psql "$(conn $leader_port) sslmode=require connect_timeout=5" -XAtc "SELECT 1" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { echo "bench: PostgreSQL did not turn TLS on" >&2; exit 1; }
    sleep 0.2
  done
  # 6442: TLS from the client, plaintext to the server; 6443: TLS on both legs.
  for leg in "6442 disable" "6443 require"; do
    set -- $leg
    cat >"$T/patroxy-$1.toml" <<CFG
[cluster]
scope = "demo"
[[listener]]
name = "tls"
listen = "127.0.0.1:$1"
tls = "require"
[tls]
cert_file = "$T/server.crt"
key_file = "$T/server.key"
[server_tls]
mode = "$2"
[report]
enabled = false
CFG
    "$REPO/target/release/patroxy" run --config "$T/patroxy-$1.toml" --log warn >"$DIR/patroxy-$1.log" 2>&1 &
    PIDS+=($!)
  done
  for port in 6442 6443; do
    until psql "$(conn $port) sslmode=require connect_timeout=5" -XAtc "SELECT 1" >/dev/null 2>&1; do
      [ $SECONDS -lt $end ] || { echo "bench: patroxy on $port does not answer" >&2; exit 1; }
      sleep 0.2
    done
  done
  echo "bench: TLS latency"
  mkdir -p "$OUT/tls"
  "$BENCH" latency --out "$OUT/tls" --ca "$T/ca.crt" --slice "${BENCH_SLICE:-2s}" --rounds "${BENCH_ROUNDS:-3}" \
    --workloads "${BENCH_WORKLOADS:-simple,select-key}" --concurrency "${BENCH_CONCURRENCY:-1,8}" \
    --endpoint "direct=$(conn $leader_port) sslmode=disable" \
    --endpoint "direct-tls=$(conn $leader_port) sslmode=require" \
    --endpoint "patroxy=$(conn 6432) sslmode=disable" \
    --endpoint "patroxy-tls=$(conn 6442) sslmode=require" \
    --endpoint "patroxy-tls-both=$(conn 6443) sslmode=require" | tee "$OUT/tls/latency.txt"
  patronictl -c "$DIR/patronictl.yml" edit-config --force --pg ssl=off demo >/dev/null
fi
if [ "$WHAT" = baseline ]; then
  # patroxy at HEAD (6456) and at $BASELINE (6457), the same transaction pool of 8 on the
  # leader, and HEAD again with pool.verify_release (6458); rounds interleaved. CPU per
  # transaction is each proxy's user+sys time (/proc/PID/stat) over pgbench's transactions.
  : "${BASELINE:?set BASELINE to the git ref to compare with}"
  B=$DIR/baseline
  mkdir -p "$B"
  if [ ! -x "$REPO/target/baseline/release/patroxy" ] || [ "$(cat "$B/ref" 2>/dev/null)" != "$(git rev-parse "$BASELINE")" ]; then
    echo "bench: building patroxy at $BASELINE"
    rm -rf "$B/src"
    git worktree add -f --detach "$B/src" "$BASELINE" >/dev/null
    (cd "$B/src" && CARGO_TARGET_DIR="$REPO/target/baseline" cargo build --release --locked --quiet --bin patroxy)
    git worktree remove --force "$B/src"
    git rev-parse "$BASELINE" >"$B/ref"
  fi
  start_proxy() { # binary, port, verify_release
    cat >"$B/patroxy-$2.toml" <<CFG
[cluster]
scope = "demo"
[[listener]]
name = "transaction"
listen = "127.0.0.1:$2"
pool_mode = "transaction"
[pool]
pool_size = ${POOL_SIZE:-8}
$([ "$3" = yes ] && echo "verify_release = true")
[auth]
auth_file = "$DIR/userlist.txt"
trust = ["127.0.0.1/32"]
[report]
enabled = false
CFG
    "$1" run --config "$B/patroxy-$2.toml" --log warn >"$B/patroxy-$2.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$2=$!"
  }
  start_proxy "$REPO/target/release/patroxy" 6456 no
  start_proxy "$REPO/target/baseline/release/patroxy" 6457 no
  start_proxy "$REPO/target/release/patroxy" 6458 yes
  for port in 6456 6457 6458; do
    end=$((SECONDS + 60))
    until psql "$(conn $port) connect_timeout=5" -XAtc "SELECT 1" >/dev/null 2>&1; do
      [ $SECONDS -lt $end ] || { echo "bench: nothing answers on $port" >&2; exit 1; }
      sleep 0.2
    done
  done
  ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
  T=${POOL_SECONDS:-10}
  measure() { # port, pgbench args... -> "tps us_per_tx"
    local pid_var=PID_$1 port=$1; shift
    local pid=${!pid_var} before after out n tps
    before=$(ticks "$pid")
    out=$(/usr/lib/postgresql/15/bin/pgbench -n -h 127.0.0.1 -p "$port" -U postgres -T "$T" "$@" postgres 2>&1 || true)
    after=$(ticks "$pid")
    n=$(awk '/number of transactions actually processed/ {print $NF}' <<<"$out" | cut -d/ -f1)
    tps=$(awk '/^tps/ {print $3; exit}' <<<"$out")
    awk -v t="$((after - before))" -v n="${n:-0}" -v hz="$(getconf CLK_TCK)" -v tps="${tps:-0}" \
      'BEGIN { printf "%.0f %.1f\n", tps, (n > 0 ? t / hz * 1e6 / n : 0) }'
  }
  median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
  {
    echo "pooled pgbench through patroxy at HEAD ($(git rev-parse --short HEAD)) and at $BASELINE ($(git rev-parse --short "$BASELINE")),"
    echo "a transaction pool of ${POOL_SIZE:-8}, -T $T, ${BASELINE_ROUNDS:-3} rounds interleaved; medians"
    printf '%-34s %12s %12s %8s %14s %14s %8s\n' workload "tps HEAD" "tps base" ratio "us/tx HEAD" "us/tx base" ratio
    for w in "-S -c 50 -j 2" "-S -M prepared -c 50 -j 2" "-C -S -c 4 -j 2" "-S -c 8 -j 2" "-c 8 -j 2"; do
      : >"$B/head.txt"; : >"$B/base.txt"; : >"$B/verify.txt"
      for round in $(seq "${BASELINE_ROUNDS:-3}"); do
        # shellcheck disable=SC2086
        measure 6456 $w >>"$B/head.txt"
        # shellcheck disable=SC2086
        measure 6457 $w >>"$B/base.txt"
        # shellcheck disable=SC2086
        measure 6458 $w >>"$B/verify.txt"
      done
      ht=$(cut -d' ' -f1 "$B/head.txt" | median); bt=$(cut -d' ' -f1 "$B/base.txt" | median)
      hc=$(cut -d' ' -f2 "$B/head.txt" | median); bc=$(cut -d' ' -f2 "$B/base.txt" | median)
      vt=$(cut -d' ' -f1 "$B/verify.txt" | median); vc=$(cut -d' ' -f2 "$B/verify.txt" | median)
      awk -v w="$w" -v ht="$ht" -v bt="$bt" -v hc="$hc" -v bc="$bc" -v vt="$vt" -v vc="$vc" 'BEGIN {
        printf "%-34s %12s %12s %8.3f %14s %14s %8.3f\n", w, ht, bt, ht / bt, hc, bc, hc / bc
        printf "%-34s %12s %12s %8.3f %14s %14s %8.3f\n", "  with verify_release", vt, bt, vt / bt, vc, bc, vc / bc
      }'
    done
  } | tee "$OUT/baseline.txt"
  exit 0
fi

if [ "$WHAT" = pool ]; then
  # patroxy and PgBouncer with the same client authentication, both pointing at the leader
  # directly (neither pays for a hop the other does not): trust, and SCRAM against a stored
  # verifier for a "bench" user (as pg_authid holds it).
  #   trust: patroxy 6452 (session) 6453 (transaction); PgBouncer 6632, 6633
  #   SCRAM: patroxy 6454 (session) 6455 (transaction); PgBouncer 6634, 6635
  P=$DIR/pool
  mkdir -p "$P"
  psql "$(conn $leader_port)" -Xq -c "DROP ROLE IF EXISTS bench" -c \
    "SET password_encryption = 'scram-sha-256'" -c "CREATE ROLE bench LOGIN SUPERUSER PASSWORD 'bench'" >/dev/null
  verifier=$(psql "$(conn $leader_port)" -XAtc "SELECT rolpassword FROM pg_authid WHERE rolname = 'bench'")
  printf '"postgres" ""\n"bench" "%s"\n' "$verifier" >"$P/userlist.txt"
  # From PgBouncer 1.21 on, a transaction pool can keep prepared statements.
  prepared=""
  if "$PGBOUNCER" --version | awk 'NR == 1 { split($2, v, "."); exit !(v[1] > 1 || v[2] >= 21) }'; then
    prepared="max_prepared_statements = 200"
  fi
  for auth in trust scram; do
    base=6452; [ $auth = scram ] && base=6454
    trust='[]'; [ $auth = trust ] && trust='["127.0.0.1/32"]'
    cat >"$P/patroxy-$auth.toml" <<CFG
[cluster]
scope = "demo"
[[listener]]
name = "session"
listen = "127.0.0.1:$base"
pool_mode = "session"
[[listener]]
name = "transaction"
listen = "127.0.0.1:$((base + 1))"
pool_mode = "transaction"
[pool]
pool_size = ${POOL_SIZE:-8}
[auth]
auth_file = "$P/userlist.txt"
trust = $trust
[runtime]
worker_threads = ${POOL_WORKERS:-0}
work_stealing = ${POOL_WORK_STEALING:-false}
[report]
enabled = false
CFG
    "$REPO/target/release/patroxy" run --config "$P/patroxy-$auth.toml" --log warn >"$DIR/patroxy-pool-$auth.log" 2>&1 &
    PIDS+=($!)
    [ $auth = trust ] && POOL_PID=$!
    port=6632; [ $auth = scram ] && port=6634
    for mode in session transaction; do
      type=trust; [ $auth = scram ] && type=scram-sha-256
      cat >"$P/pgbouncer-$auth-$mode.ini" <<CFG
[databases]
postgres = host=127.0.0.1 port=$leader_port dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = $type
auth_file = $P/userlist.txt
pool_mode = $mode
max_client_conn = 2000
default_pool_size = ${POOL_SIZE:-8}
ignore_startup_parameters = extra_float_digits
logfile = $P/pgbouncer-$auth-$mode.log
$prepared
CFG
      port=$((port + 1))
    done
  done
  [ "$(id -u)" -eq 0 ] && chown -R postgres:postgres "$P"
  # The session-mode PgBouncer of the other runs goes through HAProxy, and holds 6632.
  pkill -TERM -f "$DIR/pgbouncer.ini" 2>/dev/null || true
  while (exec 3<>/dev/tcp/127.0.0.1/6632) 2>/dev/null; do sleep 0.2; done
  for ini in "$P"/pgbouncer-*.ini; do
    "${AS_PG[@]}" "$PGBOUNCER" "$ini" >>"$ini.out" 2>&1 &
    PIDS+=($!)
  done
  end=$((SECONDS + 60))
  for check in 6452:postgres 6453:postgres 6632:postgres 6633:postgres 6454:bench 6455:bench 6634:bench 6635:bench; do
    port=${check%:*} user=${check#*:}
    until PGPASSWORD=bench psql "host=127.0.0.1 port=$port user=$user dbname=postgres connect_timeout=5" -XAtc "SELECT 1" >/dev/null 2>&1; do
      [ $SECONDS -lt $end ] || { echo "bench: nothing answers on $port" >&2; exit 1; }
      sleep 0.2
    done
  done
  PGBENCH=/usr/lib/postgresql/15/bin/pgbench
  T=${POOL_SECONDS:-8}
  # The proxy's CPU (user + system, from /proc) over the transactions pgbench counted: the
  # process listening on the port, none for the leader itself.
  ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
  listener_pid() { ss -Hltnp "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }
  run() { # name, port, user, pgbench args...
    local name=$1 port=$2 user=$3; shift 3
    local out tps aborted pid="" before=0 after=0 n cpu="-"
    [ "$port" != "$leader_port" ] && pid=$(listener_pid "$port")
    [ -n "$pid" ] && before=$(ticks "$pid")
    # A run whose clients fail (PgBouncer before 1.21 has no prepared statements in transaction
    # mode: pgbench aborts those clients) says how many, and the benchmark goes on.
    out=$(PGPASSWORD=bench "$PGBENCH" -n -h 127.0.0.1 -p "$port" -U "$user" -T "$T" "$@" postgres 2>&1 || true)
    [ -n "$pid" ] && after=$(ticks "$pid")
    tps=$(awk '/^tps/ {print $3; exit}' <<<"$out")
    n=$(awk '/number of transactions actually processed/ {print $NF}' <<<"$out" | cut -d/ -f1)
    if [ -n "$pid" ] && [ "${n:-0}" -gt 0 ]; then
      cpu=$(awk -v t="$((after - before))" -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    fi
    aborted=$(grep -c "aborted in command" <<<"$out" || true)
    printf '%-46s %10s tps %8s us/tx%s\n' "$name" "${tps:-failed}" "$cpu" "$([ "$aborted" -gt 0 ] && echo " ($aborted clients aborted)")"
    # A run with no result says why: pgbench's last words.
    [ -n "$tps" ] || grep -m 3 -iE 'error|fatal|could not' <<<"$out" | sed 's/^/    /' || true
  }
  {
    echo "connection speed: pgbench -C -S -c 4 -j 2 -T $T (a new connection per transaction)"
    for round in 1 2; do
      echo "round $round"
      run "direct (trust)" $leader_port postgres -C -S -c 4 -j 2
      run "patroxy, no pool (trust)" 6432 postgres -C -S -c 4 -j 2
      run "patroxy session pool (trust)" 6452 postgres -C -S -c 4 -j 2
      run "pgbouncer session (trust)" 6632 postgres -C -S -c 4 -j 2
      run "patroxy transaction pool (trust)" 6453 postgres -C -S -c 4 -j 2
      run "pgbouncer transaction (trust)" 6633 postgres -C -S -c 4 -j 2
      run "direct (SCRAM)" $leader_port bench -C -S -c 4 -j 2
      run "patroxy session pool (SCRAM)" 6454 bench -C -S -c 4 -j 2
      run "pgbouncer session (SCRAM)" 6634 bench -C -S -c 4 -j 2
      run "patroxy transaction pool (SCRAM)" 6455 bench -C -S -c 4 -j 2
      run "pgbouncer transaction (SCRAM)" 6635 bench -C -S -c 4 -j 2
    done
    echo
    echo "many clients on few servers: pgbench -S -c 50 and -c 200 -j 2 -T $T, pools of ${POOL_SIZE:-8}"
    for round in 1 2; do
      echo "round $round"
      run "patroxy transaction pool -c 50" 6453 postgres -S -c 50 -j 2
      run "pgbouncer transaction -c 50" 6633 postgres -S -c 50 -j 2
      run "patroxy, no pool -c 8 (unpooled relay)" 6432 postgres -S -c 8 -j 2
      run "haproxy -c 8 (TCP)" 6532 postgres -S -c 8 -j 2
      run "direct (200 backends)" $leader_port postgres -S -c 200 -j 2
      run "patroxy transaction pool" 6453 postgres -S -c 200 -j 2
      run "pgbouncer transaction" 6633 postgres -S -c 200 -j 2
      run "direct -M prepared" $leader_port postgres -S -M prepared -c 200 -j 2
      run "patroxy transaction -M prepared" 6453 postgres -S -M prepared -c 200 -j 2
      run "pgbouncer transaction -M prepared" 6633 postgres -S -M prepared -c 200 -j 2
    done
  } | tee "$OUT/pool.txt"
  # The table only (CPU per transaction beside tps), without the latency and idle runs.
  [ "${POOL_TABLE_ONLY:-}" = 1 ] && exit 0
  echo "bench: latency with the pooled modes"
  "$BENCH" latency --out "$OUT/pool" --slice "${BENCH_SLICE:-2s}" --rounds "${BENCH_ROUNDS:-3}" \
    --workloads "${BENCH_WORKLOADS:-simple,select-key}" --concurrency "${BENCH_CONCURRENCY:-1,8}" \
    --endpoint "direct=$(conn $leader_port)" \
    --endpoint "patroxy=$(conn 6432)" \
    --endpoint "patroxy-session=$(conn 6452)" \
    --endpoint "patroxy-transaction=$(conn 6453)" \
    --endpoint "pgbouncer-session=$(conn 6632)" | tee "$OUT/pool-latency.txt"
  echo "bench: idle memory of pooled clients"
  mkdir -p "$OUT/pool"
  "$BENCH" idle --out "$OUT/pool" --endpoint "patroxy-transaction=$(conn 6453)" --pid "$POOL_PID" --sessions 1000 \
    | tee "$OUT/pool-idle.txt"
fi
echo "bench: results in $OUT"
