"""``triage backup DEST`` and ``triage restore SRC``: a consistent copy of a site, and back.

A backup is a folder: the database (SQLite's online backup API, or ``pg_dump``'s snapshot),
the study blobs the database refers to, the pseudonym key (without it a restored site would
give a returning patient a new pseudonym; the blobs hold more than it reveals), the audit
checkpoint copy, the checkpoint key's
*public* half, the model bundle in use, and ``manifest.json`` with every file's sha256.

Order makes it consistent while the service runs. The checkpoint copy is read first, so it
never holds a checkpoint the database snapshot lacks (``triage audit verify`` would call that
a cut tail). Blobs are copied after the snapshot: a blob is fsynced before its case commits,
and blobs are never deleted, so every blob the snapshot names is there.

The private signing key is left out on purpose: whoever holds it can forge checkpoints, so it
is backed up apart from the data (docs/operations.md). ``restore`` refuses a target that holds
any data, checks every sha256 before it writes, and refuses a signing key at the target that
did not sign this site's checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, inspect, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

from audit.keys import load_signing_key, public_key_pem
from audit.log import AuditEvent
from triage_api.blobs import blob_path
from triage_api.db import make_engine
from triage_api.settings import Settings
from triage_api.site import current_revision, describe, sqlite_path
from triage_api.tables import Case

MANIFEST = "manifest.json"
FORMAT = 1
SQLITE_FILE = "triage.db"
PG_DUMP_FILE = "database.dump"
COPY_FILE = "audit-checkpoints.jsonl"
PUBLIC_KEY_FILE = "audit-public.pem"
PSEUDONYM_KEY = "secrets/pseudonym.key"
"""Where the service keeps its pseudonym key, relative to the data directory (and in a backup)."""
_LIBPQ_QUERY = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
}


class BackupError(Exception):
    """The backup or restore cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class Summary:
    """What a backup or restore moved, for the operator and the runbook's timings."""

    folder: Path
    cases: int
    blobs: int
    audit_events: int
    bytes: int
    seconds: float


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _copy(source: Path, target: Path) -> None:
    """Copy and fsync, so that a backup reported done survives a power cut."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with source.open("rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    target.chmod(0o600)


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise BackupError(f"{name} not found: install the PostgreSQL client (postgresql-client-15)")


def _libpq_env(url: URL) -> dict[str, str]:
    """Connection settings for pg_dump/pg_restore as PG* variables: no password on a command line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    pairs = {"PGHOST": url.host, "PGPORT": url.port, "PGUSER": url.username, "PGPASSWORD": url.password}
    pairs["PGDATABASE"] = url.database
    for option, variable in _LIBPQ_QUERY.items():
        value = url.query.get(option)
        pairs[variable] = value if isinstance(value, str) else None
    env.update({k: str(v) for k, v in pairs.items() if v is not None})
    return env


def _run(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BackupError(f"{Path(command[0]).name} failed: {result.stderr.strip()[-2000:]}")


def _checkpoint_lines(path: Path) -> bytes:
    """The complete lines of the checkpoint copy (a torn last append is left out)."""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1]


def _referenced_blobs(connection: Connection) -> tuple[list[str], int, int]:
    """The blobs a database snapshot names, with its case and audit event counts."""
    digests = list(connection.execute(select(Case.sha256).distinct()).scalars())
    cases = int(connection.execute(select(func.count()).select_from(Case)).scalar_one())
    events = int(connection.execute(select(func.count()).select_from(AuditEvent)).scalar_one())
    return digests, cases, events


def _sqlite_snapshot(database: Path, target: Path) -> tuple[list[str], int, int]:
    """Copy the database with SQLite's online backup API (one consistent snapshot while
    writers go on), then read what the copy names."""
    source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()
    engine = make_engine(f"sqlite:///{target.resolve()}", read_only=True)
    try:
        with engine.connect() as connection:
            return _referenced_blobs(connection)
    finally:
        engine.dispose()


def _pg_snapshot(url: str, target: Path) -> tuple[list[str], int, int]:
    """``pg_dump`` of a snapshot this process exports, and what that same snapshot names:
    the dump, the blob list and the counts agree exactly while uploads go on."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            connection = connection.execution_options(isolation_level="REPEATABLE READ")
            with connection.begin():
                snapshot: str = connection.execute(text("SELECT pg_export_snapshot()")).scalar_one()
                dump = [_pg_tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges"]
                _run([*dump, f"--snapshot={snapshot}", f"--file={target}"], _libpq_env(make_url(url)))
                return _referenced_blobs(connection)
    finally:
        engine.dispose()


def _previous_blobs(link_dest: Path | None) -> dict[str, Path]:
    """The blobs of an earlier backup, by name, each checked against its manifest's sha256
    when that backup was written; blobs never change, so a new backup hard-links them."""
    if link_dest is None:
        return {}
    try:
        manifest = json.loads((link_dest / MANIFEST).read_text())
    except (OSError, ValueError):
        raise BackupError(
            f"--link-dest {link_dest} is not a finished backup (no readable {MANIFEST})"
        ) from None
    return {
        name: link_dest / name
        for name, entry in manifest["files"].items()
        if name.startswith("blobs/") and Path(name).name == entry["sha256"] and (link_dest / name).is_file()
    }


def backup(settings: Settings, dest: Path, *, link_dest: Path | None = None) -> Summary:
    """Write a backup of the site into ``dest`` (absent or empty).

    Args:
        settings: the site.
        dest: the new backup's folder.
        link_dest: an earlier backup on the same file system: blobs it holds are hard-linked,
            not copied, so frequent backups cost the new studies only.

    Raises:
        BackupError: ``dest`` holds files, a tool is missing or failed, or a blob is damaged.
    """
    started = time.monotonic()
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty: give each backup a new folder")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    if settings.audit_copy_path.is_file():  # first: never ahead of the database snapshot
        (dest / COPY_FILE).write_bytes(_checkpoint_lines(settings.audit_copy_path))
    if settings.audit_key_path.is_file():
        public_key = load_signing_key(settings.audit_key_path).public_key()
        (dest / PUBLIC_KEY_FILE).write_text(public_key_pem(public_key))

    if (settings.data_dir / PSEUDONYM_KEY).is_file():
        _copy(settings.data_dir / PSEUDONYM_KEY, dest / PSEUDONYM_KEY)

    database = sqlite_path(settings)
    engine = make_engine(settings.sqlalchemy_url, read_only=True)
    try:
        revision = current_revision(engine)
    finally:
        engine.dispose()
    if database is not None:
        digests, cases, events = _sqlite_snapshot(database, dest / SQLITE_FILE)
    else:
        digests, cases, events = _pg_snapshot(settings.sqlalchemy_url, dest / PG_DUMP_FILE)

    previous = _previous_blobs(link_dest)
    blobs: dict[str, dict[str, Any]] = {}
    for digest in digests:
        name = str(blob_path(Path("blobs"), digest))
        target_blob = dest / name
        if name in previous:
            target_blob.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.link(previous[name], target_blob)
        else:
            source_blob = blob_path(settings.blob_dir, digest)
            if not source_blob.is_file():
                raise BackupError(f"blob {digest} of a case is missing from {settings.blob_dir}")
            _copy(source_blob, target_blob)
            if _sha256(target_blob) != digest:
                raise BackupError(f"blob {digest} is damaged on disk (its content has another sha256)")
        blobs[name] = {"sha256": digest, "bytes": target_blob.stat().st_size}

    model = settings.model_path.resolve()
    if model.is_dir():
        for part in sorted(p for p in model.iterdir() if p.is_file()):
            _copy(part, dest / "models" / model.name / part.name)

    files: dict[str, dict[str, Any]] = {
        str(path.relative_to(dest)): {"sha256": _sha256(path), "bytes": path.stat().st_size}
        for path in sorted(dest.rglob("*"))
        if path.is_file() and not path.is_relative_to(dest / "blobs")
    }
    files.update(blobs)
    manifest = {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        "database": "sqlite" if database is not None else "postgresql",
        "schema_revision": revision,
        "cases": cases,
        "blobs": len(digests),
        "audit_events": events,
        "model": model.name if model.is_dir() else None,
        "files": files,
    }
    written = dest / (MANIFEST + ".part")
    written.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with written.open("rb") as fh:
        os.fsync(fh.fileno())
    written.rename(dest / MANIFEST)  # a folder without manifest.json is an unfinished backup
    size = sum(int(f["bytes"]) for f in files.values())
    return Summary(dest, cases, len(digests), events, size, time.monotonic() - started)


def verify_backup(src: Path) -> dict[str, Any]:
    """The manifest of ``src`` after checking every file it lists.

    Raises:
        BackupError: no manifest, or a file missing or changed.
    """
    try:
        manifest: dict[str, Any] = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"no {MANIFEST} in {src}: not a backup, or an unfinished one") from None
    except ValueError:
        raise BackupError(f"{src / MANIFEST} is not JSON") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"backup format {manifest.get('format')!r}; this release reads {FORMAT}")
    bad = []
    for name, entry in manifest["files"].items():
        path = src / name
        if ".." in Path(name).parts or not path.is_file():
            bad.append(f"{name} missing")
        elif _sha256(path) != entry["sha256"]:
            bad.append(f"{name} changed")
    if bad:
        raise BackupError(f"the backup is damaged: {'; '.join(bad[:5])}" + (" ..." if len(bad) > 5 else ""))
    return manifest


def _target_problem(settings: Settings, kind: str) -> str | None:
    database = sqlite_path(settings)
    if (database is None) != (kind == "postgresql"):
        return f"this is a {kind} backup; the target site is configured for the other database"
    if database is not None and database.exists():
        return f"{database} exists"
    if database is None:
        engine = make_engine(settings.sqlalchemy_url)
        try:
            with engine.connect() as connection:
                tables = inspect(connection).get_table_names()
        except SQLAlchemyError as exc:
            reason = type(exc).__name__
            return f"cannot reach the target database {describe(settings)} ({reason}): create it empty"
        finally:
            engine.dispose()
        if tables:
            return f"the target database holds {len(tables)} tables"
    if settings.blob_dir.exists() and any(settings.blob_dir.iterdir()):
        return f"{settings.blob_dir} holds files"
    if settings.audit_copy_path.exists():
        return f"{settings.audit_copy_path} exists"
    if (settings.data_dir / PSEUDONYM_KEY).exists():
        return f"{settings.data_dir / PSEUDONYM_KEY} exists (a service has started here)"
    return None


def _key_problem(settings: Settings, src: Path) -> str | None:
    """A signing key at the target that did not sign this backup's checkpoints."""
    if not settings.audit_key_path.is_file() or not (src / PUBLIC_KEY_FILE).is_file():
        return None
    here = public_key_pem(load_signing_key(settings.audit_key_path).public_key())
    if here != (src / PUBLIC_KEY_FILE).read_text():
        return f"the signing key at {settings.audit_key_path} did not sign this site's checkpoints"
    return None


def restore(settings: Settings, src: Path) -> Summary:
    """Restore the backup ``src`` into the (empty) site ``settings`` describes.

    Raises:
        BackupError: a damaged backup, a non-empty target, a foreign signing key, a failed tool.
    """
    started = time.monotonic()
    manifest = verify_backup(src)
    problem = _target_problem(settings, manifest["database"]) or _key_problem(settings, src)
    if problem is not None:
        raise BackupError(f"refusing to restore: {problem}")
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    database = sqlite_path(settings)
    if database is not None:
        _copy(src / SQLITE_FILE, database)
    else:
        _run(
            [
                _pg_tool("pg_restore"),
                "--no-owner",
                "--no-privileges",
                "--exit-on-error",
                "--single-transaction",
                f"--dbname={make_url(settings.sqlalchemy_url).database}",
                str(src / PG_DUMP_FILE),
            ],
            _libpq_env(make_url(settings.sqlalchemy_url)),
        )
    for name in manifest["files"]:
        if name.startswith("blobs/"):
            _copy(src / name, settings.blob_dir / Path(name).relative_to("blobs"))
        elif name.startswith("models/") or name == PSEUDONYM_KEY:
            _copy(src / name, settings.data_dir / name)
    if (src / COPY_FILE).is_file():
        _copy(src / COPY_FILE, settings.audit_copy_path)
    if (src / PUBLIC_KEY_FILE).is_file():
        _copy(src / PUBLIC_KEY_FILE, settings.data_dir / PUBLIC_KEY_FILE)
    size = sum(int(f["bytes"]) for f in manifest["files"].values())
    return Summary(
        settings.data_dir,
        int(manifest["cases"]),
        int(manifest["blobs"]),
        int(manifest["audit_events"]),
        size,
        time.monotonic() - started,
    )
