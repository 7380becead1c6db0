#!/usr/bin/env bash
# What the tests need beside the Python packages, set up idempotently (`make test` runs this first; so does CI):
#   * PostgreSQL, Redis and RabbitMQ answering on 127.0.0.1 (each one that is down is started);
#   * the redis-server binary (the fault suite and the broker tests start private Redis servers);
#   * Chromium and chromedriver (tests/browser) and PgBouncer (tests/test_pgbouncer.py), installed with apt-get
#     when missing.
# Starting services and installing packages needs root (or passwordless sudo). Without it this script says what is
# missing and how to get it, and exits 1: the tests would fail on it anyway.
set -uo pipefail

say() { printf 'setup: %s\n' "$*"; }
problems=()
missing() { problems+=("$1"); say "MISSING: $1"; }

if [ "$(id -u)" = 0 ]; then SUDO=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"
else SUDO=none
fi
as_root() {  # run a command as root, or report that we cannot
  if [ "$SUDO" = none ]; then return 1; fi
  $SUDO "$@"
}

wait_for() {  # seconds, command...: true once the command succeeds
  local seconds=$1; shift
  for _ in $(seq 1 "$seconds"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  return 1
}

postgres_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping; }
rabbitmq_up() { as_root rabbitmqctl -q status || rabbitmqctl -q status; }

ensure_service() {  # name, check, start command...
  local name=$1 check=$2; shift 2
  if $check >/dev/null 2>&1; then say "$name: running"; return; fi
  say "$name: not answering on 127.0.0.1, starting it"
  if ! as_root "$@" >/dev/null 2>&1 && [ "$SUDO" = none ]; then
    missing "$name is down and starting it needs root: run as root: $*"; return
  fi
  if wait_for 60 $check; then say "$name: started"; else missing "$name did not come up (tried: $*)"; fi
}

apt_install() {  # packages...: installs them with apt-get (refreshing the index once if needed)
  if ! command -v apt-get >/dev/null; then return 1; fi
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y -q "$@" >/dev/null 2>&1 \
    || { as_root apt-get update -q >/dev/null 2>&1 && as_root apt-get install -y -q "$@" >/dev/null 2>&1; }
}

ensure_program() {  # what it is for, packages, programs...
  local purpose=$1 packages=$2; shift 2
  local absent=()
  for program in "$@"; do command -v "$program" >/dev/null || absent+=("$program"); done
  if [ ${#absent[@]} = 0 ]; then say "$packages: installed"; return; fi
  say "${absent[*]} not found ($purpose): installing $packages"
  # shellcheck disable=SC2086
  if apt_install $packages; then say "$packages: installed now"
  else missing "${absent[*]} ($purpose): install the Debian packages '$packages' as root"; fi
}

ensure_service PostgreSQL postgres_up \
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql 2>/dev/null | head -n1)" main start
mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
ensure_service Redis redis_up \
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
ensure_service RabbitMQ rabbitmq_up rabbitmq-server -detached
command -v redis-server >/dev/null && say "redis-server binary: found" \
  || missing "redis-server (the fault suite starts private Redis servers): install the Debian package 'redis-server'"
ensure_program "the browser tests" "chromium chromium-driver" chromium chromedriver
ensure_program "the PgBouncer test" pgbouncer pgbouncer

if [ ${#problems[@]} -gt 0 ]; then
  say "${#problems[@]} thing(s) missing; the tests that need them will fail:"
  for p in "${problems[@]}"; do printf '  - %s\n' "$p"; done
  exit 1
fi
say "everything the tests need is here"
