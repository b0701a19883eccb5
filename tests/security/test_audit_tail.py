"""Row 5: the audit tail is signed soon (and at start), the signing key lives outside the
data directory, and every checkpoint also goes to the system log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from audit.checkpoint import latest_checkpoint
from audit.log import AuditEvent
from tests.conftest import runtime_of
from triage_api.app import create_app
from triage_api.settings import Settings


def test_tail_intervals_are_short_and_capped(settings: Settings) -> None:
    assert settings.audit_checkpoint_events <= 50 and settings.audit_checkpoint_seconds <= 5
    with pytest.raises(ValidationError):
        Settings(audit_checkpoint_events=1000)
    with pytest.raises(ValidationError):
        Settings(audit_checkpoint_seconds=300)


def test_the_default_key_and_copy_are_outside_the_data_dir(settings: Settings) -> None:
    data = settings.data_dir.resolve()
    assert not settings.audit_key_path.resolve().is_relative_to(data)
    assert not settings.audit_copy_path.resolve().is_relative_to(data)


def test_start_refuses_a_key_inside_the_data_dir_unless_allowed(settings: Settings) -> None:
    inside = settings.model_copy(update={"audit_key_file": settings.data_dir / "secrets" / "k.key"})
    with pytest.raises(RuntimeError, match="inside the data directory"), TestClient(create_app(inside)):
        pass
    allowed = inside.model_copy(update={"audit_key_in_data_dir": True})
    with TestClient(create_app(allowed)) as client:
        assert client.get("/healthz").status_code == 200


def test_start_signs_the_head_and_logs_the_checkpoint(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage.audit")
    with TestClient(create_app(settings)) as client, runtime_of(client).reads() as session:
        head = max(e.seq for e in session.query(AuditEvent))
        checkpoint = latest_checkpoint(session)
        assert checkpoint is not None and checkpoint.head_seq == head  # the bootstrap event, signed
    logged = [r.getMessage() for r in caplog.records if r.name == "triage.audit"]
    assert any(checkpoint.head_hash in line for line in logged)
    assert Path(settings.audit_copy_path).read_text().count(checkpoint.head_hash) == 1
