"""The live worklist stream: a critical arrival, scoped, resumable, free of patient data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.conftest import MakeKey, bearer, upload, wait_for
from tests.test_phi import CANARIES, with_canaries
from tests.test_webhooks import critical_bundle  # noqa: F401 (fixture)
from triage_api import live
from triage_api.app import create_app
from triage_api.auth import Principal, Role
from triage_api.db import transaction
from triage_api.settings import Settings
from triage_api.tables import ApiKey, Appeal, Case


@pytest.fixture
def app(settings: Settings, critical_bundle: Path) -> Iterator[TestClient]:  # noqa: F811
    short = settings.model_copy(
        update={"model_path": critical_bundle, "live_stream_seconds": 1.0, "live_poll_seconds": 0.2}
    )
    with TestClient(create_app(short)) as test_client:
        yield test_client


def _events(body: str) -> list[dict[str, Any]]:
    """Parse an SSE body into ``{"id", "event", "data"}`` dicts (comments and retry skipped)."""
    found = []
    for block in body.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":")
        )
        if "event" in fields:
            found.append(
                {"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])}
            )
    return found


def _scored(app: TestClient, make_key: MakeKey, clinic: str) -> str:
    uploader, reader = make_key("uploader", clinic), make_key("radiologist", clinic)
    response = upload(app, uploader, with_canaries("cr_chest_pa_jpeg_baseline_siim.dcm"))
    assert response.status_code == 201, response.text
    return str(wait_for(app, reader, response.json()["id"])["id"])


def test_the_stream_delivers_a_critical_arrival_in_scope_and_resumes(
    app: TestClient, make_key: MakeKey
) -> None:
    north_case = _scored(app, make_key, "north")
    _scored(app, make_key, "south")
    reader = make_key("radiologist", "north")

    response = app.get("/v1/worklist/stream", headers={**bearer(reader), "Last-Event-ID": "0"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.text.startswith("retry: ")
    events = _events(response.text)
    cases = [e for e in events if e["event"] == "case"]
    assert [e["data"]["case_id"] for e in cases] == [north_case]  # south's case is not in north's stream
    [arrival] = cases
    assert arrival["data"]["kind"] == "case.critical" and arrival["data"]["tier"] == "critical"
    assert arrival["data"]["clinic"] == "north" and int(arrival["id"]) == arrival["data"]["id"]
    assert set(arrival["data"]) == {"id", "kind", "case_id", "clinic", "tier", "status", "deadline"}
    summaries = [e["data"] for e in events if e["event"] == "summary"]
    assert summaries and set(summaries[0]) == {"critical_due_15min"}
    for canary in CANARIES:
        assert canary not in response.text

    # resuming after the last id seen: nothing is sent twice
    again = app.get("/v1/worklist/stream", headers={**bearer(reader), "Last-Event-ID": arrival["id"]})
    assert [e for e in _events(again.text) if e["event"] == "case"] == []
    # a fresh connection starts from now on, without history
    fresh = app.get("/v1/worklist/stream", headers=bearer(reader))
    assert [e for e in _events(fresh.text) if e["event"] == "case"] == []


def test_bad_requests_to_the_stream(app: TestClient, make_key: MakeKey) -> None:
    reader = make_key("radiologist", "north")
    assert app.get("/v1/worklist/stream").status_code == 401
    assert app.get("/v1/worklist/stream", headers=bearer(make_key("admin"))).status_code == 403
    bad = app.get("/v1/worklist/stream", headers={**bearer(reader), "Last-Event-ID": "not-a-number"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
    assert app.get("/web/api/worklist/stream").status_code == 401


def test_criticals_due_soon_are_counted_against_the_clock_given(app: TestClient, make_key: MakeKey) -> None:
    case_id = _scored(app, make_key, "north")
    factory = app.app.state.runtime.factory  # type: ignore[attr-defined]
    with factory() as session:
        case = session.get(Case, case_id)
        assert case is not None
        deadline, clinic_id = case.deadline, case.clinic_id
    reader = Principal(user_id=1, role=Role.RADIOLOGIST, clinic_ids=frozenset({clinic_id}))
    other = Principal(user_id=1, role=Role.RADIOLOGIST, clinic_ids=frozenset({clinic_id + 1000}))
    counts = [
        live.events_after(factory, who, 0, now=deadline - timedelta(minutes=minutes))[2]
        for who, minutes in ((reader, 16), (reader, 14), (reader, -5), (other, 0))
    ]
    assert counts == [0, 1, 1, 0]


def test_a_blinded_appeal_reader_gets_no_live_event_of_that_case(app: TestClient, make_key: MakeKey) -> None:
    case_id = _scored(app, make_key, "north")
    second = make_key("radiologist", "north")
    factory = app.app.state.runtime.factory  # type: ignore[attr-defined]
    with transaction(factory) as session:
        case = session.get(Case, case_id)
        assert case is not None
        reader_id = session.execute(
            select(ApiKey.user_id).where(ApiKey.prefix == second.split("_")[1])
        ).scalar_one()
        session.add(
            Appeal(
                case_id=case_id,
                clinic_id=case.clinic_id,
                filed_by=case.uploaded_by,
                category="disagree_with_result",
                grounds="second opinion",
                contact_reference="ref-1",
                status="assigned",
                assigned_to=reader_id,
                due_at=case.deadline + timedelta(days=3),
                created_at=case.received_at,
            )
        )
        deadline = case.deadline
    body = app.get("/v1/worklist/stream", headers={**bearer(second), "Last-Event-ID": "0"}).text
    assert case_id not in body
    blinded = Principal(user_id=reader_id, role=Role.RADIOLOGIST, clinic_ids=frozenset({case.clinic_id}))
    assert live.events_after(factory, blinded, 0, now=deadline)[2] == 0
