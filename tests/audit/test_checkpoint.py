"""Checkpoint key, scheduling, the background thread, and ``triage audit ...`` commands."""

from __future__ import annotations

import argparse
import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from audit.checkpoint import Checkpointer, is_due, latest_checkpoint
from audit.keys import (
    AuditKeyError,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
    public_key_pem,
)
from audit.log import AuditEvent
from tests.audit.helpers import append, run, tamper
from triage_api.settings import Settings


def test_the_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "audit.key"
    first = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_signing_key(path).public_key() == first.public_key()
    os.chmod(path, 0o640)
    with pytest.raises(AuditKeyError, match="group/others"):
        load_signing_key(path)
    path.write_text("not a key")
    os.chmod(path, 0o600)
    with pytest.raises(AuditKeyError, match="not a PEM"):
        load_signing_key(path)
    with pytest.raises(AuditKeyError, match="cannot read"):
        load_signing_key(tmp_path / "absent.key")


def test_a_checkpoint_is_due_every_n_events_or_t_seconds(factory: sessionmaker[Session]) -> None:
    with factory() as session:
        assert not is_due(session, every_events=5, every_seconds=60)  # nothing to sign
    append(factory, 4)
    with factory() as session:
        assert not is_due(session, every_events=5, every_seconds=60)
        later = datetime.now(UTC) + timedelta(seconds=61)
        assert is_due(session, every_events=5, every_seconds=60, now=later)
    append(factory, 1)
    with factory() as session:
        assert is_due(session, every_events=5, every_seconds=60)


def test_the_checkpointer_thread_signs_and_signs_the_rest_when_stopped(
    factory: sessionmaker[Session], settings: Settings
) -> None:
    checkpointer = Checkpointer(
        factory, key_path=settings.audit_key_path, every_events=3, every_seconds=3600, poll_seconds=0.02
    )
    stop = threading.Event()
    thread = checkpointer.start(stop)
    append(factory, 3)
    for _ in range(500):
        with factory() as session:  # a fresh transaction each time: SQLite's writer waits on ours
            last = latest_checkpoint(session)
        if last is not None:
            break
        stop.wait(0.01)
    assert last is not None and (last.count, last.head_seq) == (3, 3)
    append(factory, 1)  # below the threshold: signed only at shutdown
    stop.set()
    thread.join(timeout=10)
    with factory() as session:
        last = latest_checkpoint(session)
        head = session.execute(select(AuditEvent.seq).order_by(AuditEvent.seq.desc())).scalars().first()
    assert last is not None and last.head_seq == head == 4 and last.count == 4


def test_cli_checkpoint_public_key_and_verify(
    cli_env: argparse.ArgumentParser,
    factory: sessionmaker[Session],
    engine: Engine,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    append(factory, 12)
    assert run(cli_env, "audit", "checkpoint") == 0
    assert "12 events, head 12" in capsys.readouterr().out
    assert run(cli_env, "audit", "checkpoint") == 0
    assert "nothing to sign" in capsys.readouterr().out
    public = tmp_path / "audit.pub"
    assert run(cli_env, "audit", "public-key", "--out", str(public)) == 0
    load_public_key(public)
    assert run(cli_env, "audit", "verify", "--public-key", str(public)) == 0
    assert "ok: 12 events verified" in capsys.readouterr().out
    with factory() as session:  # the verification itself was audited
        last = session.execute(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).scalar_one()
        assert (last.action, last.event_code) == ("audit.verify", "110101")

    tamper(engine, "DELETE FROM audit_events WHERE seq > 9")  # includes the verify event
    assert run(cli_env, "audit", "verify", "--public-key", str(public), "--no-record") == 1
    captured = capsys.readouterr()
    assert "first bad sequence number: 10" in captured.out
    assert "removed" in captured.err

    other = tmp_path / "other.pub"
    other.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    tamper(engine, "DELETE FROM audit_events WHERE seq > 0")
    assert run(cli_env, "audit", "verify", "--public-key", str(other), "--no-record") == 1
    assert "signed by another key" in capsys.readouterr().err
    assert run(cli_env, "audit", "verify", "--public-key", str(tmp_path / "missing.pub")) == 2
