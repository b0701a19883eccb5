"""``triage backup`` / ``triage restore``: a drill under upload load, and the refusals.

The drill backs up a running service (TestClient, in-process worker) while a thread keeps
uploading, restores into a fresh site and compares cases, blobs and audit events; then a
second backup of the quiet service must restore to an identical copy of every table.
Runs on PostgreSQL too when ``TRIAGE_TEST_DATABASE_URL`` is set (pg_dump / pg_restore).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from audit.checkpoint import Checkpointer
from audit.keys import load_or_create_signing_key
from audit.log import AuditBase
from tests.conftest import MakeKey, bearer, upload
from tests.test_chaos import small_dicom
from tests.test_cli import ROOT, run_triage
from triage_api.app import create_app
from triage_api.backup import BackupError, backup, restore
from triage_api.blobs import blob_path
from triage_api.db import make_engine, make_sessionmaker, migrate
from triage_api.settings import Settings
from triage_api.tables import Base, Case

IMMUTABLE_CASE_COLUMNS = (
    "id",
    "clinic_id",
    "sha256",
    "media_type",
    "size_bytes",
    "received_at",
    "uploaded_by",
)
MAX_LIVE_UPLOADS = 40


@pytest.fixture
def settings(tmp_path: Path, database_url: str, tiny_bundle: Path) -> Settings:
    """The source site, its signing key and checkpoint copy on "other storage" (another folder)."""
    return Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        model_path=tiny_bundle,
        poll_seconds=0.05,
        audit_key_file=tmp_path / "keys" / "audit-ed25519.key",
        audit_checkpoint_copy=tmp_path / "keys" / "audit-checkpoints.jsonl",
    )


@pytest.fixture
def fresh_url(tmp_path: Path, database_url: str) -> Iterator[Any]:
    """``fresh_url(name)``: an empty database of the same kind as the source's."""
    made: list[str] = []
    admin = None

    def fresh(name: str) -> str:
        nonlocal admin
        if database_url.startswith("sqlite"):
            return f"sqlite:///{tmp_path / name / 'triage.db'}"
        admin = admin or create_engine(database_url, isolation_level="AUTOCOMMIT")
        database = f"triage_restore_{name}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{database}"'))
        made.append(database)
        return make_url(database_url).set(database=database).render_as_string(hide_password=False)

    yield fresh
    if admin is not None:
        with admin.connect() as connection:
            for database in made:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()


def site(tmp_path: Path, name: str, url: str, bundle: Path, key: Path) -> Settings:
    """A restored site: its own data directory and checkpoint copy; the signing key comes
    back from its own storage (here: the source's key file)."""
    return Settings(
        data_dir=tmp_path / name,
        database_url=url,
        model_path=bundle,
        audit_key_file=key,
        audit_checkpoint_copy=tmp_path / f"{name}-keys" / "audit-checkpoints.jsonl",
    )


def rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    engine = make_engine(url, read_only=True)
    try:
        with engine.connect() as connection:
            tables = [*Base.metadata.sorted_tables, *AuditBase.metadata.sorted_tables]
            return {
                table.name: [
                    tuple(row)
                    for row in connection.execute(select(table).order_by(*table.primary_key.columns))
                ]
                for table in tables
            }
    finally:
        engine.dispose()


def verify_cli(restored: Settings) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(
        TRIAGE_DATA_DIR=str(restored.data_dir),
        TRIAGE_DATABASE_URL=restored.sqlalchemy_url,
        TRIAGE_MODEL_PATH=str(restored.model_path),
        TRIAGE_AUDIT_KEY_FILE=str(restored.audit_key_path),
        TRIAGE_AUDIT_CHECKPOINT_COPY=str(restored.audit_copy_path),
    )
    assert ROOT.is_dir()
    return run_triage(env, "audit", "verify")


def checkpoint(settings: Settings) -> None:
    engine = make_engine(settings.sqlalchemy_url)
    try:
        Checkpointer(
            make_sessionmaker(engine),
            key_path=settings.audit_key_path,
            every_events=1,
            every_seconds=1,
            copy_path=settings.audit_copy_path,
        ).run_once(force=True)
    finally:
        engine.dispose()


def test_drill_backup_under_upload_load_restores_every_case_blob_and_event(
    tmp_path: Path, settings: Settings, make_key: MakeKey, fresh_url: Any, tiny_bundle: Path
) -> None:
    key = make_key("uploader", "north")
    before_backup: list[str] = []
    during: list[str] = []
    stop = threading.Event()

    with TestClient(create_app(settings)) as client:
        for seed in range(6):
            sent = upload(client, key, small_dicom(seed))
            assert sent.status_code == 201, sent.text
            before_backup.append(sent.json()["id"])
        checkpoint(settings)  # the copy outside the database now holds a checkpoint

        def keep_uploading() -> None:
            for seed in range(100, 100 + MAX_LIVE_UPLOADS):
                if stop.is_set():
                    return
                sent = upload(client, key, small_dicom(seed))
                assert sent.status_code == 201, sent.text
                during.append(sent.json()["id"])

        uploader = threading.Thread(target=keep_uploading)
        uploader.start()
        try:
            live = backup(settings, tmp_path / "backup-live")
        finally:
            stop.set()
            uploader.join(timeout=120)
        assert not uploader.is_alive()
        checkpoint(settings)

    # Restore the live backup into a fresh site; the signing key comes back from its own storage.
    restored = site(tmp_path, "restored", fresh_url("live"), tiny_bundle, settings.audit_key_path)
    summary = restore(restored, tmp_path / "backup-live")
    assert summary.cases == live.cases >= len(before_backup)
    source, copy = rows(settings.sqlalchemy_url), rows(restored.sqlalchemy_url)
    restored_ids = {row[0] for row in copy["cases"]}
    assert len(restored_ids) == live.cases  # the manifest counts the snapshot it holds
    assert len(copy["audit_events"]) == live.audit_events
    assert set(before_backup) <= restored_ids <= set(before_backup + during)
    columns = [c.name for c in Case.__table__.columns]
    immutable = [columns.index(name) for name in IMMUTABLE_CASE_COLUMNS]
    source_cases = {row[0]: row for row in source["cases"]}
    for row in copy["cases"]:
        assert [row[i] for i in immutable] == [source_cases[row[0]][i] for i in immutable]
        blob = blob_path(restored.blob_dir, row[columns.index("sha256")])
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == row[columns.index("sha256")]
    events = copy["audit_events"]
    assert events and events == source["audit_events"][: len(events)]  # a prefix of the chain
    assert copy["audit_checkpoints"] == source["audit_checkpoints"][: len(copy["audit_checkpoints"])]
    verified = verify_cli(restored)
    assert verified.returncode == 0, verified.stderr
    assert "1 copied checkpoints" in verified.stdout or "2 copied checkpoints" in verified.stdout
    assert (restored.data_dir / "secrets" / "pseudonym.key").read_bytes() == (
        settings.data_dir / "secrets" / "pseudonym.key"
    ).read_bytes()

    # The service is quiet now: a second backup restores to an identical copy of every table.
    quiet = backup(settings, tmp_path / "backup-quiet", link_dest=tmp_path / "backup-live")
    assert quiet.cases == len(before_backup) + len(during)
    linked = [
        p for p in (tmp_path / "backup-quiet" / "blobs").rglob("*") if p.is_file() and p.stat().st_nlink == 2
    ]
    assert len(linked) == live.blobs  # the live backup's blobs are shared, not copied again
    again = site(tmp_path, "again", fresh_url("quiet"), tiny_bundle, settings.audit_key_path)
    restore(again, tmp_path / "backup-quiet")
    assert rows(again.sqlalchemy_url) == rows(settings.sqlalchemy_url)
    assert sorted(p.name for p in again.blob_dir.rglob("*") if p.is_file()) == sorted(
        p.name for p in settings.blob_dir.rglob("*") if p.is_file()
    )
    assert again.audit_copy_path.read_bytes() == settings.audit_copy_path.read_bytes()
    assert verify_cli(again).returncode == 0


@pytest.fixture
def one_backup(tmp_path: Path, settings: Settings, make_key: MakeKey) -> Path:
    key = make_key("uploader", "north")
    with TestClient(create_app(settings)) as client:
        assert upload(client, key, small_dicom(1)).status_code == 201
        assert client.get("/v1/worklist", headers=bearer(key)).status_code == 200
    checkpoint(settings)
    backup(settings, tmp_path / "backup")
    return tmp_path / "backup"


def test_restore_refuses_a_damaged_backup_and_writes_nothing(
    tmp_path: Path, settings: Settings, one_backup: Path, fresh_url: Any, tiny_bundle: Path
) -> None:
    blob = next(p for p in (one_backup / "blobs").rglob("*") if p.is_file())
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    target = site(tmp_path, "target", fresh_url("damaged"), tiny_bundle, tmp_path / "nokey" / "k")
    with pytest.raises(BackupError, match=r"damaged: blobs/.* changed"):
        restore(target, one_backup)
    assert not target.data_dir.exists()
    (one_backup / "manifest.json").unlink()
    with pytest.raises(BackupError, match="unfinished"):
        restore(target, one_backup)


def test_restore_refuses_a_site_with_data_or_a_foreign_key(
    tmp_path: Path, settings: Settings, one_backup: Path, fresh_url: Any, tiny_bundle: Path
) -> None:
    with pytest.raises(BackupError, match="refusing to restore"):
        restore(settings, one_backup)  # the source itself holds data
    foreign = tmp_path / "foreign" / "audit-ed25519.key"
    load_or_create_signing_key(foreign)
    target = site(tmp_path, "target", fresh_url("foreign"), tiny_bundle, foreign)
    with pytest.raises(BackupError, match="did not sign this site's checkpoints"):
        restore(target, one_backup)
    assert not target.data_dir.exists()
    with pytest.raises(BackupError, match="not empty"):
        backup(settings, one_backup)


def test_cli_backup_restore_then_the_service_starts(
    tmp_path: Path, settings: Settings, one_backup: Path, fresh_url: Any, tiny_bundle: Path
) -> None:
    """Through the commands, as the runbook says: restore, put the key back, verify, migrate --check."""
    target = site(tmp_path, "cli", fresh_url("cli"), tiny_bundle, tmp_path / "cli-keys" / "audit-ed25519.key")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(
        TRIAGE_DATA_DIR=str(target.data_dir),
        TRIAGE_DATABASE_URL=target.sqlalchemy_url,
        TRIAGE_MODEL_PATH=str(tiny_bundle),
        TRIAGE_AUDIT_KEY_FILE=str(target.audit_key_path),
        TRIAGE_AUDIT_CHECKPOINT_COPY=str(target.audit_copy_path),
    )
    done = run_triage(env, "restore", str(one_backup))
    assert done.returncode == 0, done.stderr
    assert "put the signing key back" in done.stdout
    public = target.data_dir / "audit-public.pem"
    verified = run_triage(env, "audit", "verify", "--public-key", str(public), "--no-record")
    assert verified.returncode == 0, verified.stderr
    target.audit_key_path.parent.mkdir(mode=0o700, exist_ok=True)
    shutil.copy2(settings.audit_key_path, target.audit_key_path)
    assert run_triage(env, "migrate", "--check").returncode == 0
    assert run_triage(env, "audit", "verify").returncode == 0
    again = run_triage(env, "restore", str(one_backup))
    assert again.returncode == 2 and "refusing to restore" in again.stderr
    with TestClient(create_app(target)) as client:
        assert client.get("/healthz").status_code == 200
    engine = make_engine(target.sqlalchemy_url)
    migrate(engine)  # a no-op: the restored schema is current
    engine.dispose()
