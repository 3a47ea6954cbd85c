#!/usr/bin/env bash
# Installs, only when missing, what patroxy's build, tests, demo and benchmarks need on
# Debian 12: protoc (etcd-client's build), libclang (pg_query's bindings), etcd, PostgreSQL
# 15, Patroni, the test clients (psycopg, asyncpg, pgjdbc, prometheus-pgbouncer-exporter),
# and the Rust toolchain.
# Package scripts must not start the distro's own etcd (2379) or Postgres (5432), so a
# policy-rc.d that refuses service starts is in place while apt runs.
set -euo pipefail

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

for p in protobuf-compiler libprotobuf-dev libclang-dev etcd-server etcd-client postgresql-15 postgresql-client-15 \
         patroni python3-etcd python3-kazoo python3-pysyncobj zookeeperd python3-psycopg2 python3-psycopg python3-asyncpg python3-yaml iproute2 procps; do
  pkg_installed "$p" || need_pkgs+=("$p")
done
# pgjdbc, a real JDBC client for the pooling tests; java runs its test program from source.
pkg_installed libpostgresql-jdbc-java || need_pkgs+=(libpostgresql-jdbc-java)
have javac || need_pkgs+=(default-jdk-headless)
# Node.js and npm, for node-postgres (below).
have npm || need_pkgs+=(nodejs npm)
# Debian's PgBouncer exporter, a third-party client of the admin console.
pkg_installed prometheus-pgbouncer-exporter || need_pkgs+=(prometheus-pgbouncer-exporter)
for p in "$@"; do                      # extra packages a caller asks for (bench: haproxy pgbouncer)
  pkg_installed "$p" || need_pkgs+=("$p")
done

if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "install-deps: installing ${need_pkgs[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  policy=/usr/sbin/policy-rc.d
  placed_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    placed_policy=1
  fi
  trap '[ $placed_policy -eq 1 ] && $SUDO rm -f "$policy"' EXIT
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# A package install may still have started the distro's own services; our tests use their
# own ports, but stop the default cluster so it holds no resources.
if have pg_lsclusters && pg_lsclusters -h 2>/dev/null | grep -q online; then
  pg_lsclusters -h | awk '$4=="online"{print $1, $2}' | while read -r v c; do
    pg_ctlcluster "$v" "$c" stop || true
  done
fi

# node-postgres, a real client of the pooling tests (the lock file pins its version).
node_tests="$(cd "$(dirname "$0")/.." && pwd)/tests/node"
if [ ! -d "$node_tests/node_modules/pg" ]; then
  echo "install-deps: installing node-postgres (npm ci in tests/node)"
  npm ci --prefix "$node_tests" --no-audit --no-fund >/dev/null
fi

if ! have cargo; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "install-deps: cargo is missing; installing Debian's cargo and rustc"
    apt-get install -y -qq --no-install-recommends cargo rustc >/dev/null
  fi
fi
echo "install-deps: ok"
