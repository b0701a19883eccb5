"""Reads and overrides: claims, agree/override with reasons, reprioritising by hand."""

from __future__ import annotations

import io
from datetime import datetime, timedelta

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from audit.log import AuditEvent
from tests.conftest import DATA, MakeKey, bearer, runtime_of, upload, wait_for
from triage_api import auth, oversight, reading
from triage_api.auth import Principal, Role
from triage_api.db import transaction
from triage_api.tables import Case, Prediction, Read
from triage_api.vocab import Tier


def scored_case(
    client: TestClient, make_key: MakeKey, name: str = "cr_chest_pa_jpeg_baseline_siim.dcm"
) -> str:
    uploader = make_key("uploader", "north")
    case_id = str(upload(client, uploader, (DATA / name).read_bytes()).json()["id"])
    assert wait_for(client, uploader, case_id)["status"] in ("scored", "not_analyzed")
    return case_id


def set_ai_tier(client: TestClient, case_id: str, tier: Tier) -> None:
    """Make the AI's result of a scored case ``tier`` (the tiny test model scores at random)."""
    with runtime_of(client).factory.begin() as session:
        for prediction in session.execute(select(Prediction).where(Prediction.case_id == case_id)).scalars():
            prediction.tier = tier
        session.get_one(Case, case_id).tier = tier


def claimed(client: TestClient, case_id: str, reader: dict[str, str]) -> None:
    assert client.post(f"/v1/studies/{case_id}/claim", headers=reader).status_code == 200


def test_claim_is_visible_and_exclusive_and_admin_can_release(client: TestClient, make_key: MakeKey) -> None:
    case_id = scored_case(client, make_key)
    first, second = bearer(make_key("radiologist", "north")), bearer(make_key("radiologist", "north"))
    claimed = client.post(f"/v1/studies/{case_id}/claim", headers=first)
    assert claimed.status_code == 200 and claimed.json()["claimed_by"] is not None
    assert client.post(f"/v1/studies/{case_id}/claim", headers=second).status_code == 409
    (item,) = client.get("/v1/worklist", headers=second).json()
    assert item["claimed_by"] == claimed.json()["claimed_by"]
    assert client.delete(f"/v1/studies/{case_id}/claim", headers=second).status_code == 403
    released = client.delete(f"/v1/studies/{case_id}/claim", headers=bearer(make_key("admin")))
    assert released.status_code == 200 and released.json()["claimed_by"] is None
    assert client.post(f"/v1/studies/{case_id}/claim", headers=second).status_code == 200


def test_agreeing_read_is_recorded_with_the_score_it_saw(client: TestClient, make_key: MakeKey) -> None:
    case_id = scored_case(client, make_key)
    set_ai_tier(client, case_id, Tier.ROUTINE)
    reader = bearer(make_key("radiologist", "north"))
    claimed(client, case_id, reader)
    response = client.post(
        f"/v1/studies/{case_id}/reads",
        json={"finding": "normal", "agrees_with_ai": True, "ai_score_shown": True},
        headers=reader,
    )
    assert response.status_code == 201, response.text
    case = client.get(f"/v1/studies/{case_id}", headers=reader).json()
    assert case["read"]["finding"] == "normal" and case["read"]["ai_score_shown"] is True
    assert case["read_at"] is not None
    with runtime_of(client).factory() as session:
        stored = session.execute(select(Read)).scalar_one()
        assert stored.ai_risk == case["risk"] and stored.model_ref == case["model_version"]
    again = client.post(
        f"/v1/studies/{case_id}/reads",
        json={"finding": "normal", "agrees_with_ai": True, "ai_score_shown": True},
        headers=reader,
    )
    assert again.status_code == 409
    unread = client.get("/v1/worklist?unread=true", headers=reader).json()
    assert unread == []


def test_override_needs_a_reason(client: TestClient, make_key: MakeKey) -> None:
    case_id = scored_case(client, make_key)
    reader = bearer(make_key("radiologist", "north"))
    claimed(client, case_id, reader)
    url = f"/v1/studies/{case_id}/reads"
    no_reason = client.post(
        url, json={"finding": "pneumonia", "agrees_with_ai": False, "ai_score_shown": True}, headers=reader
    )
    assert no_reason.status_code == 422
    assert "reason" in no_reason.json()["error"]["message"]
    no_stance = client.post(url, json={"finding": "pneumonia", "ai_score_shown": False}, headers=reader)
    assert no_stance.status_code == 422
    bad_reason = client.post(
        url,
        json={
            "finding": "pneumonia",
            "agrees_with_ai": False,
            "override_reason": "felt like it",
            "ai_score_shown": True,
        },
        headers=reader,
    )
    assert bad_reason.status_code == 422
    ok = client.post(
        url,
        json={
            "finding": "pneumonia",
            "agrees_with_ai": False,
            "override_reason": "false_negative",
            "note": "Zebulon Canaryfield's film, see prior",
            "ai_score_shown": True,
        },
        headers=reader,
    )
    assert ok.status_code == 201
    assert ok.json()["override_reason"] == "false_negative"
    with runtime_of(client).factory() as session:
        event = session.execute(select(AuditEvent).where(AuditEvent.action == "case.override")).scalar_one()
    assert (
        "false_negative" in event.details and "Canaryfield" not in event.details
    )  # notes stay out of the log


def test_agreeing_with_a_finding_the_ai_tier_contradicts_is_an_override(
    client: TestClient, make_key: MakeKey
) -> None:
    case_id = scored_case(client, make_key)
    set_ai_tier(client, case_id, Tier.CRITICAL)
    reader = bearer(make_key("radiologist", "north"))
    claimed(client, case_id, reader)
    url = f"/v1/studies/{case_id}/reads"
    normal_agree = client.post(
        url, json={"finding": "normal", "agrees_with_ai": True, "ai_score_shown": True}, headers=reader
    )
    assert normal_agree.status_code == 422
    assert "override_reason" in normal_agree.json()["error"]["message"]
    saved = client.post(
        url,
        json={
            "finding": "normal",
            "agrees_with_ai": False,
            "override_reason": "false_positive",
            "ai_score_shown": True,
        },
        headers=reader,
    )
    assert saved.status_code == 201 and saved.json()["agrees_with_ai"] is False
    with runtime_of(client).factory() as session:
        clinic = session.get_one(Case, case_id).clinic_id
        rows = oversight.overrides(session, principal=Principal(0, Role.AUDITOR, frozenset({clinic})))
    assert [(r.case_id, r.reason) for r in rows] == [(case_id, "false_positive")]


def test_routine_case_cannot_be_agreed_as_pneumonia(client: TestClient, make_key: MakeKey) -> None:
    case_id = scored_case(client, make_key)
    set_ai_tier(client, case_id, Tier.ROUTINE)
    reader = bearer(make_key("radiologist", "north"))
    claimed(client, case_id, reader)
    refused = client.post(
        f"/v1/studies/{case_id}/reads",
        json={"finding": "pneumonia", "agrees_with_ai": True, "ai_score_shown": True},
        headers=reader,
    )
    assert refused.status_code == 422


def test_a_read_needs_the_claim_and_a_stale_claim_lapses(client: TestClient, make_key: MakeKey) -> None:
    case_id = scored_case(client, make_key)
    first, second = bearer(make_key("radiologist", "north")), bearer(make_key("radiologist", "north"))
    body = {
        "finding": "other_finding",
        "agrees_with_ai": False,
        "override_reason": "other",
        "ai_score_shown": True,
    }
    url = f"/v1/studies/{case_id}/reads"
    unclaimed = client.post(url, json=body, headers=first)
    assert unclaimed.status_code == 409 and "claim" in unclaimed.json()["error"]["message"]
    claimed(client, case_id, first)
    held = client.post(url, json=body, headers=second)
    assert held.status_code == 409 and "another reader" in held.json()["error"]["message"]
    assert client.post(f"/v1/studies/{case_id}/claim", headers=second).status_code == 409
    expiry = runtime_of(client).settings.claim_expiry_minutes
    with runtime_of(client).factory.begin() as session:
        case = session.get_one(Case, case_id)
        assert case.claimed_at is not None
        case.claimed_at -= timedelta(minutes=expiry + 1)
    assert client.post(f"/v1/studies/{case_id}/claim", headers=second).status_code == 200
    assert client.post(url, json=body, headers=first).status_code == 409
    assert client.post(url, json=body, headers=second).status_code == 201
    with runtime_of(client).factory() as session:
        lapsed = session.execute(
            select(AuditEvent).where(AuditEvent.action == "case.claim_expire")
        ).scalar_one()
    assert lapsed.object_id == case_id


def test_case_without_ai_result_takes_no_agreement(client: TestClient, make_key: MakeKey) -> None:
    case_id = scored_case(client, make_key, "dx_thorax_dog_monochrome1.dcm")  # not_analyzed
    reader = bearer(make_key("radiologist", "north"))
    claimed(client, case_id, reader)
    url = f"/v1/studies/{case_id}/reads"
    refused = client.post(
        url,
        json={"finding": "other_finding", "agrees_with_ai": True, "ai_score_shown": False},
        headers=reader,
    )
    assert refused.status_code == 422
    accepted = client.post(url, json={"finding": "other_finding", "ai_score_shown": False}, headers=reader)
    assert accepted.status_code == 201


def test_reprioritise_moves_the_deadline_with_a_reason(client: TestClient, make_key: MakeKey) -> None:
    case_id = scored_case(client, make_key)
    reader = bearer(make_key("radiologist", "north"))
    settings = runtime_of(client).settings
    assert (
        client.post(f"/v1/studies/{case_id}/priority", json={"tier": "critical"}, headers=reader).status_code
        == 422
    )
    moved = client.post(
        f"/v1/studies/{case_id}/priority",
        json={"tier": "critical", "reason": "clinical_urgency"},
        headers=reader,
    )
    assert moved.status_code == 200
    body = moved.json()
    case = client.get(f"/v1/studies/{case_id}", headers=reader).json()
    waited = datetime.fromisoformat(body["deadline"]) - datetime.fromisoformat(case["received_at"])
    assert body["tier"] == "critical" and waited == timedelta(minutes=settings.sla_critical_minutes)


def test_image_is_served_to_readers_in_scope(client: TestClient, make_key: MakeKey) -> None:
    case_id = scored_case(client, make_key)
    image = client.get(f"/v1/studies/{case_id}/image", headers=bearer(make_key("radiologist", "north")))
    assert (
        image.status_code == 200
        and image.content == (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes()
    )
    assert image.headers["content-type"] == "application/dicom"
    other = client.get(f"/v1/studies/{case_id}/image", headers=bearer(make_key("radiologist", "south")))
    assert other.status_code == 404


def png(seed: int) -> bytes:
    """A small distinct grey picture (PNG uploads have no header to gate on)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def test_claim_next_claims_the_first_case_in_worklist_order_the_reader_may_read(
    client: TestClient, make_key: MakeKey
) -> None:
    uploader = make_key("uploader", "north")
    for seed in range(3):
        wait_for(client, uploader, upload(client, uploader, png(seed), "s.png").json()["id"])
    reader_key, other = make_key("radiologist", "north"), bearer(make_key("radiologist", "north"))
    reader = bearer(reader_key)
    order = [c["id"] for c in client.get("/v1/worklist?unread=true", headers=reader).json()]
    runtime = runtime_of(client)

    def claim_next() -> str | None:
        with transaction(runtime.factory) as session:
            principal = auth.authenticate(session, reader_key)
            case = reading.claim_next(session, principal=principal, settings=runtime.settings)
            return case.id if case is not None else None

    claimed(client, order[0], other)  # another reader's live claim is passed over
    assert claim_next() == order[1]
    assert client.get(f"/v1/studies/{order[1]}", headers=reader).json()["claimed_by"] is not None
    assert claim_next() == order[1]  # the case the reader holds comes first until it is read
    read = {"finding": "normal", "agrees_with_ai": False, "override_reason": "other", "ai_score_shown": True}
    assert client.post(f"/v1/studies/{order[1]}/reads", json=read, headers=reader).status_code == 201
    with runtime.factory.begin() as session:  # the other reader's claim lapses
        case = session.get_one(Case, order[0])
        assert case.claimed_at is not None
        case.claimed_at -= timedelta(minutes=runtime.settings.claim_expiry_minutes + 1)
    assert claim_next() == order[0]  # taken over, and the lapse audited
    with runtime.factory() as session:
        lapsed = session.execute(
            select(AuditEvent).where(AuditEvent.action == "case.claim_expire")
        ).scalar_one()
        assert lapsed.object_id == order[0]
    for case_id in (order[0], order[2]):
        claimed(client, case_id, reader)
        assert client.post(f"/v1/studies/{case_id}/reads", json=read, headers=reader).status_code == 201
    assert claim_next() is None  # nothing left to read
