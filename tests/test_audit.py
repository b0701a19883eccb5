"""Audit events: one per state change and per read, in the same transaction, chained."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from audit.log import AuditEvent, EventCode, first_broken, record
from tests.audit.helpers import drop_guards
from tests.conftest import DATA, MakeKey, bearer, runtime_of, upload, wait_for
from triage_api.db import transaction
from triage_api.tables import Case


def events(client: TestClient) -> list[AuditEvent]:
    with runtime_of(client).factory() as session:
        return list(session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars())


def test_upload_scoring_and_view_are_audited(client: TestClient, make_key: MakeKey) -> None:
    uploader, reader = make_key("uploader", "north"), make_key("radiologist", "north")
    case_id = upload(client, uploader, (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes()).json()[
        "id"
    ]
    wait_for(client, reader, case_id)
    client.get("/v1/worklist", headers=bearer(reader))
    trail = [(e.action, e.event_code) for e in events(client) if e.object_id == case_id]
    assert [t for t in trail if t[0] != "case.view"] == [
        ("study.upload", EventCode.IMPORT.value),
        ("study.score.start", EventCode.ACCESS.value),
        ("study.score.scored", EventCode.ACCESS.value),
    ]
    assert ("case.view", EventCode.ACCESS.value) in trail
    queries = [e for e in events(client) if e.action == "worklist.query"]
    assert queries and queries[-1].event_code == EventCode.QUERY.value
    client.get(f"/v1/studies/{case_id}", headers=bearer(reader))
    last = events(client)[-1]
    assert (last.action, last.object_id) == ("case.view", case_id) and last.actor.startswith("user:")
    scored = next(e for e in events(client) if e.action == "study.score.scored")
    assert json.loads(scored.details)["model"] == "tiny-test@0.0.1"
    assert first_broken_in(client) is None


def first_broken_in(client: TestClient) -> int | None:
    with runtime_of(client).factory() as session:
        return first_broken(session)


def test_a_refused_upload_changes_nothing_and_a_failed_audit_write_fails_the_upload(
    client: TestClient, make_key: MakeKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = make_key("uploader", "north")
    before = len(events(client))
    assert upload(client, key, b"not an image").status_code == 415
    assert len(events(client)) == before

    def broken_record(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("audit store unavailable")

    monkeypatch.setattr("triage_api.ingest.record", broken_record)
    with pytest.raises(RuntimeError):
        upload(client, key, (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes())
    with runtime_of(client).factory() as session:
        assert session.execute(select(func.count()).select_from(Case)).scalar_one() == 0


def test_concurrent_writers_keep_one_unbroken_chain(client: TestClient) -> None:
    factory = runtime_of(client).factory
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            with transaction(factory) as session:
                record(
                    session,
                    actor=f"test:{n}",
                    action="test.write",
                    code=EventCode.ACCESS,
                    object_type="test",
                    object_id=str(n),
                )
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    written = [e for e in events(client) if e.action == "test.write"]
    assert len(written) == 50
    seqs = [e.seq for e in events(client)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert first_broken_in(client) is None


def test_editing_a_row_breaks_the_chain_at_that_row(client: TestClient, make_key: MakeKey) -> None:
    key = make_key("uploader", "north")
    upload(client, key, (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes())
    upload(client, key, (DATA / "cr_chest_pa_monochrome1_siim.dcm").read_bytes())
    trail = events(client)
    assert len(trail) >= 3
    target = trail[1].seq
    drop_guards(runtime_of(client).engine)
    with transaction(runtime_of(client).factory) as session:
        session.get_one(AuditEvent, target).details = json.dumps({"edited": True})
    assert first_broken_in(client) == target


def test_health_reports_a_tampered_tail_and_a_rewritten_signed_head(
    client: TestClient, make_key: MakeKey
) -> None:
    from audit.checkpoint import write_checkpoint
    from audit.keys import load_or_create_signing_key

    runtime = runtime_of(client)
    operator = bearer(make_key("admin"))
    key = make_key("uploader", "north")
    upload(client, key, (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes())
    with transaction(runtime.factory) as session:
        signed = write_checkpoint(session, load_or_create_signing_key(runtime.settings.audit_key_path))
        assert signed is not None
        signed_seq = signed.head_seq
    upload(client, key, (DATA / "cr_chest_pa_monochrome1_siim.dcm").read_bytes())
    audit = client.get("/v1/health", headers=operator).json()["audit"]
    assert audit["ok"] and audit["signed_seq"] == signed_seq and audit["unsigned"] >= 1
    assert "triage_audit_tail_ok 1" in client.get("/metrics", headers=operator).text

    drop_guards(runtime.engine)
    tail = signed_seq + 1
    with transaction(runtime.factory) as session:
        session.get_one(AuditEvent, tail).details = json.dumps({"edited": True})
    health = client.get("/v1/health", headers=operator).json()
    assert health["status"] == "degraded" and health["audit"]["broken_at"] == tail
    assert "triage_audit_tail_ok 0" in client.get("/metrics", headers=operator).text
    with transaction(runtime.factory) as session:
        session.get_one(AuditEvent, signed_seq).details = json.dumps({"edited": True})
    assert client.get("/v1/health", headers=operator).json()["audit"]["broken_at"] == signed_seq
