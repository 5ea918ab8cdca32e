#!/bin/sh
# Mirrors the official image's contract: POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, PGDATA.
# UTF8 like the official image (an SQL_ASCII cluster hands psycopg bytes instead of text).
set -eu
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
mkdir -p "$PGDATA" /run/postgresql
chown -R postgres:postgres "$PGDATA" /run/postgresql
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile="$(mktemp)"; printf '%s' "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}" > "$pwfile"; chown postgres "$pwfile"
  su postgres -s /bin/sh -c "$BIN/initdb -D '$PGDATA' -U '${POSTGRES_USER:-postgres}' --pwfile='$pwfile' --auth-host=scram-sha-256 --auth-local=trust --encoding=UTF8 --locale=C.UTF-8"
  rm -f "$pwfile"
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  su postgres -s /bin/sh -c "$BIN/pg_ctl -D '$PGDATA' -o \"-c listen_addresses=''\" -w start" >/dev/null
  if [ -n "${POSTGRES_DB:-}" ] && [ "${POSTGRES_DB}" != "postgres" ]; then
    su postgres -s /bin/sh -c "$BIN/psql -h /run/postgresql -p 5432 -U '${POSTGRES_USER:-postgres}' -d postgres -qc 'create database \"${POSTGRES_DB}\"'"
  fi
  su postgres -s /bin/sh -c "$BIN/pg_ctl -D '$PGDATA' -m fast -w stop" >/dev/null
fi
exec su postgres -s /bin/sh -c "exec $BIN/postgres -D '$PGDATA' -c listen_addresses='*'"
