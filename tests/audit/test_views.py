"""``GET /v1/audit``: auditors only, their clinics' events and site events, filters, paging,
and every read of the log is itself an audited event (110101)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from audit.log import HASHED_COLUMNS, AuditEvent, EventCode, chain_hash
from tests.conftest import DATA, MakeKey, bearer, runtime_of, upload

STUDY = DATA / "cr_chest_pa_jpeg_baseline_siim.dcm"


@pytest.fixture
def two_clinics(client: TestClient, make_key: MakeKey) -> dict[str, str]:
    """A case in north and one in south; an auditor of north."""
    north, south = make_key("uploader", "north"), make_key("uploader", "south")
    keys = {"auditor": make_key("auditor", "north")}
    keys["north_case"] = upload(client, north, STUDY.read_bytes()).json()["id"]
    keys["south_case"] = upload(client, south, STUDY.read_bytes()).json()["id"]
    return keys


def get(client: TestClient, key: str, **params: str | int) -> Any:
    return client.get("/v1/audit", params=params, headers=bearer(key))


@pytest.mark.parametrize("role", ["uploader", "radiologist", "admin"])
def test_only_auditors_read_the_log(client: TestClient, make_key: MakeKey, role: str) -> None:
    key = make_key(role) if role == "admin" else make_key(role, "north")
    response = get(client, key)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


def test_an_auditor_sees_its_clinics_cases_and_site_events_only(
    client: TestClient, two_clinics: dict[str, str]
) -> None:
    response = get(client, two_clinics["auditor"], limit=1000)
    assert response.status_code == 200
    items = response.json()["items"]
    object_ids = {item["object_id"] for item in items}
    assert two_clinics["north_case"] in object_ids
    assert two_clinics["south_case"] not in object_ids
    assert {"user.create"} <= {item["action"] for item in items}  # site security events
    assert get(client, two_clinics["auditor"], case_id=two_clinics["south_case"]).json()["items"] == []
    # Every item carries what is needed to re-check its hash.
    for item in items:
        row = {name: item[name] for name in HASHED_COLUMNS}
        assert chain_hash(item["prev_hash"], row) == item["hash"]


def test_filters_and_cursor(client: TestClient, two_clinics: dict[str, str]) -> None:
    auditor = two_clinics["auditor"]
    by_case = get(client, auditor, case_id=two_clinics["north_case"]).json()["items"]
    assert [(i["action"], i["event_code"]) for i in by_case] == [("study.upload", EventCode.IMPORT.value)]
    uploader_actor = by_case[0]["actor"]
    assert {i["actor"] for i in get(client, auditor, actor=uploader_actor).json()["items"]} == {
        uploader_actor
    }
    assert {i["action"] for i in get(client, auditor, action="user.create").json()["items"]} == {
        "user.create"
    }
    now = datetime.now(UTC)
    assert get(client, auditor, since=(now + timedelta(hours=1)).isoformat()).json()["items"] == []
    assert get(client, auditor, until=(now - timedelta(days=1)).isoformat()).json()["items"] == []
    assert get(client, auditor, since="2026-01-01T00:00:00").status_code == 422  # no time zone
    # Paging: reads of the log add events as we go, so freeze the window first.
    frozen = datetime.now(UTC).isoformat()
    everything = [i["seq"] for i in get(client, auditor, limit=1000, until=frozen).json()["items"]]
    pages, after = [], 0
    while True:
        page = get(client, auditor, limit=2, after_seq=after, until=frozen).json()
        pages += [i["seq"] for i in page["items"]]
        if page["next_after_seq"] is None:
            break
        after = page["next_after_seq"]
    assert pages == everything and len(everything) >= 3


def test_reading_the_log_is_audited(client: TestClient, two_clinics: dict[str, str]) -> None:
    get(client, two_clinics["auditor"], case_id=two_clinics["north_case"])
    with runtime_of(client).factory() as session:
        last = session.execute(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).scalar_one()
    assert (last.action, last.event_code, last.object_type) == ("audit.query", "110101", "audit")
    assert last.actor.startswith("user:")
    assert two_clinics["north_case"] in last.details
    # The auditor sees its own (and other auditors') reads of the log.
    mine = get(client, two_clinics["auditor"], action="audit.query").json()["items"]
    assert mine and mine[-1]["seq"] == last.seq
