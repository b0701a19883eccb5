"""Appeals: filed by the clinic, read blind by a radiologist who did not read the case."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select

from audit.log import AuditEvent
from tests.conftest import DATA, MakeKey, bearer, runtime_of, upload, wait_for


def read_case(client: TestClient, make_key: MakeKey) -> tuple[str, str, dict[str, str]]:
    uploader = make_key("uploader", "north")
    case_id = str(
        upload(client, uploader, (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes()).json()["id"]
    )
    wait_for(client, uploader, case_id)
    first = bearer(make_key("radiologist", "north"))
    read = client.post(
        f"/v1/studies/{case_id}/reads",
        json={"finding": "normal", "agrees_with_ai": True, "ai_score_shown": True},
        headers=first,
    )
    assert read.status_code == 201
    return case_id, uploader, first


def file(client: TestClient, uploader: str, case_id: str) -> dict:  # type: ignore[type-arg]
    response = client.post(
        "/v1/appeals",
        json={
            "case_id": case_id,
            "category": "disagree_with_result",
            "grounds": "Symptoms persist.",
            "contact_reference": "REF-17",
        },
        headers=bearer(uploader),
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_full_appeal_with_a_blinded_independent_second_read(client: TestClient, make_key: MakeKey) -> None:
    case_id, uploader, first = read_case(client, make_key)
    appeal = file(client, uploader, case_id)
    assert appeal["status"] == "open" and appeal["due_at"] > appeal["created_at"]

    # The first reader may not take it.
    refused = client.post(f"/v1/appeals/{appeal['id']}/take", headers=first)
    assert refused.status_code == 409 and "first reader" in refused.json()["error"]["message"]

    second = bearer(make_key("radiologist", "north"))
    taken = client.post(f"/v1/appeals/{appeal['id']}/take", headers=second)
    assert taken.status_code == 200 and taken.json()["status"] == "assigned"

    # Blinded: the second reader's view has no AI score and no first read, and the open
    # case route and worklist do not show it to them.
    view = client.get(f"/v1/appeals/{appeal['id']}/case", headers=second)
    assert view.status_code == 200
    assert set(view.json()) == {
        "appeal_id",
        "case_id",
        "media_type",
        "modality",
        "body_part",
        "view_position",
        "age_band",
        "received_at",
    }
    assert client.get(f"/v1/studies/{case_id}", headers=second).status_code == 403
    assert client.get(f"/v1/studies/{case_id}/image", headers=second).status_code == 403
    assert case_id not in [i["id"] for i in client.get("/v1/worklist", headers=second).json()]
    image = client.get(f"/v1/appeals/{appeal['id']}/image", headers=second)
    assert image.status_code == 200 and len(image.content) > 1000

    # Admins and auditors see but cannot decide; only the assigned reader can.
    decision = {"finding": "pneumonia", "outcome": "overturned", "rationale": "Right lower lobe opacity."}
    for role_key in (make_key("admin"), make_key("auditor", "north")):
        assert (
            client.post(
                f"/v1/appeals/{appeal['id']}/decision", json=decision, headers=bearer(role_key)
            ).status_code
            == 403
        )
        assert client.get(f"/v1/appeals/{appeal['id']}", headers=bearer(role_key)).status_code == 200
    assert (
        client.post(f"/v1/appeals/{appeal['id']}/decision", json=decision, headers=first).status_code == 404
    )
    decided = client.post(f"/v1/appeals/{appeal['id']}/decision", json=decision, headers=second)
    assert decided.status_code == 200
    assert decided.json()["status"] == "decided" and decided.json()["outcome"] == "overturned"

    # The outcome goes back to the clinic.
    outcome = client.get(f"/v1/appeals/{appeal['id']}", headers=bearer(uploader)).json()
    assert outcome["outcome"] == "overturned" and outcome["second_read_finding"] == "pneumonia"
    assert outcome["rationale"] == decision["rationale"]

    with runtime_of(client).factory() as session:
        actions = [
            e.action
            for e in session.execute(select(AuditEvent).where(AuditEvent.object_type == "appeal")).scalars()
        ]
    assert actions == [
        "appeal.file",
        "appeal.assign",
        "appeal.case_view",
        "appeal.case_view",
        "appeal.decide",
    ]


def test_clinic_b_cannot_see_clinic_a_appeals(client: TestClient, make_key: MakeKey) -> None:
    case_id, uploader, _ = read_case(client, make_key)
    appeal = file(client, uploader, case_id)
    for key in (
        make_key("uploader", "south"),
        make_key("auditor", "south"),
        make_key("radiologist", "south"),
    ):
        assert client.get(f"/v1/appeals/{appeal['id']}", headers=bearer(key)).status_code == 404
        assert client.get("/v1/appeals", headers=bearer(key)).json() == []
    south = make_key("uploader", "south")
    cross = client.post(
        "/v1/appeals",
        json={"case_id": case_id, "category": "other", "grounds": "x", "contact_reference": "y"},
        headers=bearer(south),
    )
    assert cross.status_code == 404
    assert [a["id"] for a in client.get("/v1/appeals", headers=bearer(uploader)).json()] == [appeal["id"]]


def test_one_appeal_in_progress_per_case_and_admin_assignment_rules(
    client: TestClient, make_key: MakeKey
) -> None:
    case_id, uploader, first = read_case(client, make_key)
    appeal = file(client, uploader, case_id)
    duplicate = client.post(
        "/v1/appeals",
        json={"case_id": case_id, "category": "other", "grounds": "again", "contact_reference": "R"},
        headers=bearer(uploader),
    )
    assert duplicate.status_code == 409
    admin = bearer(make_key("admin"))
    first_id = client.get(f"/v1/studies/{case_id}", headers=first).json()["read"]["reader_id"]
    refused = client.post(f"/v1/appeals/{appeal['id']}/assign", json={"reader_id": first_id}, headers=admin)
    assert refused.status_code == 409
    south_id = client.post(
        "/v1/users", json={"name": "south-dr", "role": "radiologist", "clinics": ["south"]}, headers=admin
    ).json()["id"]
    wrong_clinic = client.post(
        f"/v1/appeals/{appeal['id']}/assign", json={"reader_id": south_id}, headers=admin
    )
    assert wrong_clinic.status_code == 422
