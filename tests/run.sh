#!/usr/bin/env bash
# Install everything, lint and type-check, then run the whole suite twice: on SQLite,
# and on a real PostgreSQL 15 started here on loopback (Debian's package) and stopped by
# its pid. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python3.11 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'

# The browser tests drive Debian's Chromium (never `playwright install`, which downloads).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }
  else
    sudo apt-get install -y chromium
  fi
fi

echo "== lint and types"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# tests/models is left out until its torch typing is cleaned up (its own follow-up).
.venv/bin/mypy --explicit-package-bases --exclude '^tests/models/' tests bench

echo "== tests on SQLite"
.venv/bin/python -m pytest "$@"

PGBIN=/usr/lib/postgresql/15/bin
if [ ! -x "$PGBIN/postgres" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y postgresql || { apt-get update && apt-get install -y postgresql; }
  else
    sudo apt-get install -y postgresql
  fi
fi

# PostgreSQL refuses to run as root: use Debian's postgres account then.
as_db_user=()
if [ "$(id -u)" = 0 ]; then as_db_user=(runuser -u postgres --); fi
pgdir=$(mktemp -d /tmp/triage-pg.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres "$pgdir"
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${as_db_user[@]}" "$PGBIN/initdb" --pgdata="$pgdir/data" --username=postgres --auth=trust >/dev/null
"${as_db_user[@]}" "$PGBIN/pg_ctl" --pgdata="$pgdir/data" --wait --log="$pgdir/log" \
  --options="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$pgdir -c max_connections=200" start >/dev/null
pgpid=$(head -n 1 "$pgdir/data/postmaster.pid")
stop_pg() { kill -INT "$pgpid" 2>/dev/null || true; for _ in $(seq 1 50); do kill -0 "$pgpid" 2>/dev/null || break; sleep 0.2; done; rm -rf "$pgdir"; }
trap stop_pg EXIT
"$PGBIN/createdb" -h 127.0.0.1 -p "$port" -U postgres triage_test

echo "== tests on PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') (127.0.0.1:$port)"
TRIAGE_TEST_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:$port/triage_test" .venv/bin/python -m pytest "$@"
