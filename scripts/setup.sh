#!/usr/bin/env bash
# Sets up this machine for Touchstone: system packages, the Docker engine, Redis, PostgreSQL,
# the virtual environment and the local base image. Idempotent; run as root on Debian 12.
# Sourced by scripts/test.sh and scripts/demo.sh; exports the TOUCHSTONE_TEST_* variables.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*" >&2; }

APT_PACKAGES=(docker.io docker-compose redis-server postgresql mmdebstrap chromium python3-venv ca-certificates)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Every service is started detached from the caller's session (setsid, stdin from /dev/null), so
# a Ctrl-C to `touchstone demo` or to a test runner never reaches the engine or the databases.

# --- Docker engine ---------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  log "starting containerd and dockerd"
  bash scripts/start-dockerd.sh
fi

# --- Redis -----------------------------------------------------------------------------------
REDIS_PORT="${TOUCHSTONE_TEST_REDIS_PORT:-6379}"
if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  log "starting redis-server on :$REDIS_PORT"
  setsid redis-server --port "$REDIS_PORT" --daemonize yes --save '' --appendonly no </dev/null >/dev/null
  for _ in $(seq 1 30); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.2; done
fi
export TOUCHSTONE_TEST_REDIS_URL="${TOUCHSTONE_TEST_REDIS_URL:-redis://127.0.0.1:$REDIS_PORT/0}"

# --- PostgreSQL ------------------------------------------------------------------------------
PG_VERSION="$(ls /usr/lib/postgresql | sort -n | tail -1)"
if ! pg_lsclusters -h 2>/dev/null | grep -q online; then
  pg_lsclusters -h | grep -q . || pg_createcluster "$PG_VERSION" main >/dev/null
  log "starting PostgreSQL $PG_VERSION"
  setsid pg_ctlcluster "$PG_VERSION" main start </dev/null
fi
for _ in $(seq 1 30); do su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1 && break; sleep 0.5; done
su postgres -c "psql -qAtc \"select 1 from pg_roles where rolname='touchstone'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"create role touchstone login superuser password 'touchstone'\""
su postgres -c "psql -qAtc \"select 1 from pg_database where datname='touchstone_test'\"" | grep -q 1 ||
  su postgres -c "createdb -O touchstone touchstone_test"
export TOUCHSTONE_TEST_POSTGRES_URL="${TOUCHSTONE_TEST_POSTGRES_URL:-postgresql+psycopg://touchstone:touchstone@127.0.0.1:5432/touchstone_test}"

# --- Python environment ----------------------------------------------------------------------
# Reinstall only when pyproject.toml changed since the last install (its hash is kept in the venv).
if [ ! -x .venv/bin/python ] || ! sha256sum -c --status .venv/.pyproject.sha256 2>/dev/null; then
  log "installing touchstone[dev] into .venv"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  sha256sum pyproject.toml > .venv/.pyproject.sha256
fi

# --- The local base image for algorithm containers -------------------------------------------
export TOUCHSTONE_BASE_IMAGE="${TOUCHSTONE_BASE_IMAGE:-touchstone/base:bookworm}"
bash scripts/build-base-image.sh "$TOUCHSTONE_BASE_IMAGE"
log "ready"
