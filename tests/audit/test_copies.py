"""The checkpoint copy outside the database catches a tail cut together with its checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from audit.checkpoint import Checkpointer, tail_status
from audit.copies import copied_head, read_copies
from audit.verify import verify
from tests.audit.helpers import append, run, tamper
from triage_api.auth import Principal, Role
from triage_api.db import transaction
from triage_api.oversight import chain_status
from triage_api.settings import Settings


def signer(factory: sessionmaker[Session], settings: Settings) -> Checkpointer:
    return Checkpointer(
        factory,
        key_path=settings.audit_key_path,
        every_events=1000,
        every_seconds=300,
        copy_path=settings.audit_copy_path,
    )


def test_a_cut_tail_with_its_checkpoints_shows_only_against_the_copy(
    factory: sessionmaker[Session], engine: Engine, settings: Settings, key: Ed25519PrivateKey
) -> None:
    checkpointer = signer(factory, settings)
    append(factory, 10)
    checkpointer.run_once(force=True)
    append(factory, 10)
    checkpointer.run_once(force=True)
    copies, problems = read_copies(settings.audit_copy_path)
    assert [c.head_seq for c in copies] == [10, 20] and problems == []
    assert settings.audit_copy_path.stat().st_mode & 0o777 == 0o600

    # Someone with the database owner's rights removes events 16..20 and the checkpoint at 20.
    tamper(
        engine, "DELETE FROM audit_events WHERE seq > 15", "DELETE FROM audit_checkpoints WHERE head_seq = 20"
    )
    with factory() as session:
        alone = verify(session, key.public_key())
        against_copy = verify(session, key.public_key(), copies=copies)
        live = tail_status(session, copied_head(settings.audit_copy_path))
    assert alone.ok  # what the database holds is consistent: the cut does not show
    assert not against_copy.ok and against_copy.first_bad_seq == 16
    assert "events from 16 were removed" in against_copy.problems[0]
    assert against_copy.copies == 2 and against_copy.signed_head == 20
    assert not live["ok"] and live["broken_at"] == 16


def test_a_forged_line_in_the_copy_is_refused(
    factory: sessionmaker[Session], settings: Settings, key: Ed25519PrivateKey
) -> None:
    append(factory, 5)
    signer(factory, settings).run_once(force=True)
    (genuine,), _ = read_copies(settings.audit_copy_path)
    forged = json.loads(settings.audit_copy_path.read_text())
    forged["head_seq"] = 99
    with settings.audit_copy_path.open("a") as fh:
        fh.write(json.dumps(forged) + "\n")
    copies, _ = read_copies(settings.audit_copy_path)
    with factory() as session:
        report = verify(session, key.public_key(), copies=copies)
    assert not report.ok and report.signed_head == 5
    assert report.problems == ["copied checkpoint (head 99) has a bad signature"]


def test_torn_and_unreadable_lines(tmp_path: Path) -> None:
    path = tmp_path / "copy.jsonl"
    line = {"at": "2026-11-27T00:00:00+00:00", "count": 3, "head_seq": 3, "head_hash": "h", "key_id": "k"}
    path.write_text(
        json.dumps({**line, "signature": "s"})
        + "\n"
        + "not json\n"
        + json.dumps(line)  # no signature
        + "\n"
        + '{"at": "2026-11-27T00:00:01+00:00", "count": 4, "head_se'  # a crash mid-append
    )
    copies, problems = read_copies(path)
    assert [c.head_seq for c in copies] == [3]
    assert problems == [
        "line 2 of the checkpoint copy cannot be read",
        "line 3 of the checkpoint copy cannot be read",
    ]
    assert copied_head(path) == 3
    assert copied_head(tmp_path / "absent.jsonl") is None


def test_the_health_check_reads_only_the_end_of_a_long_copy(tmp_path: Path) -> None:
    path = tmp_path / "copy.jsonl"
    lines = [
        json.dumps(
            {
                "at": "t",
                "count": n,
                "head_seq": n,
                "head_hash": "h" * 64,
                "key_id": "k" * 64,
                "signature": "s",
            }
        )
        for n in range(1, 2001)
    ]
    lines[0] = lines[0].replace('"head_seq": 1,', '"head_seq": 999999,')  # far from the end
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 8192
    assert copied_head(path) == 2000  # only the last 8 KB were read: the first line was not
    assert read_copies(path)[0][0].head_seq == 999999  # (a full read would have seen it)
    assert copied_head(path, tail_bytes=len(lines[-1]) + 10) == 2000  # begins inside a line


def test_cli_verify_reads_the_copy(
    cli_env: argparse.ArgumentParser,
    factory: sessionmaker[Session],
    engine: Engine,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    append(factory, 12)
    assert run(cli_env, "audit", "checkpoint") == 0
    assert run(cli_env, "audit", "verify", "--no-record") == 0
    assert "1 copied checkpoints" in capsys.readouterr().out
    tamper(engine, "DELETE FROM audit_events WHERE seq > 6", "DELETE FROM audit_checkpoints")
    assert run(cli_env, "audit", "verify", "--no-record") == 1
    captured = capsys.readouterr()
    assert "first bad sequence number: 7" in captured.out and "removed" in captured.err
    assert run(cli_env, "audit", "verify", "--no-record", "--copy", str(settings.data_dir / "none")) == 1
    assert "is missing" in capsys.readouterr().err


def test_the_auditor_desk_checks_the_copy_too(
    factory: sessionmaker[Session], engine: Engine, settings: Settings
) -> None:
    append(factory, 8)
    signer(factory, settings).run_once(force=True)
    tamper(engine, "DELETE FROM audit_events WHERE seq > 4", "DELETE FROM audit_checkpoints")
    auditor = Principal(1, Role.AUDITOR, frozenset({1}))
    with transaction(factory) as session:
        status = chain_status(
            session, principal=auditor, key_path=settings.audit_key_path, copy_path=settings.audit_copy_path
        )
    assert status.report is not None and not status.report.ok
    assert status.report.first_bad_seq == 5
