"""Appeals: filed by the clinic, read blind by a radiologist who did not read the case."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select

from audit.log import AuditEvent
from tests.conftest import DATA, MakeKey, bearer, claim_and_override, runtime_of, upload, wait_for
from triage_api.appeals import outcome_of
from triage_api.vocab import AppealOutcome, Finding


def read_case(client: TestClient, make_key: MakeKey) -> tuple[str, str, dict[str, str]]:
    uploader = make_key("uploader", "north")
    case_id = str(
        upload(client, uploader, (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes()).json()["id"]
    )
    wait_for(client, uploader, case_id)
    first = bearer(make_key("radiologist", "north"))
    claim_and_override(client, first, case_id)
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
    decision = {"finding": "pneumonia", "rationale": "Right lower lobe opacity."}
    verdict = client.post(
        f"/v1/appeals/{appeal['id']}/decision", json={**decision, "outcome": "upheld"}, headers=second
    )
    assert verdict.status_code == 422  # the second reader reads; they do not rate a read they cannot see
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

    # The overturning read is the case's current result; the first read stays as history.
    case = client.get(f"/v1/studies/{case_id}", headers=first).json()
    assert case["read"]["finding"] == "normal" and case["read"]["kind"] == "primary"
    assert case["result"]["finding"] == "pneumonia" and case["result"]["kind"] == "appeal"
    # The clinic sees the result and the outcome, never the AI score, the model or the readers.
    mine = client.get(f"/v1/studies/{case_id}", headers=bearer(uploader)).json()
    assert mine["result"]["finding"] == "pneumonia" and mine["result"]["on_appeal"] is True
    assert mine["appeal_outcome"] == "overturned" and mine["status"] == "scored"
    listed = client.get("/v1/worklist", headers=bearer(uploader)).json()
    assert [row["result"]["finding"] for row in listed] == ["pneumonia"]
    for body in (mine, *listed):
        assert not {"risk", "prediction", "model_version", "claimed_by", "read"} & set(body)
        assert "reader_id" not in str(body)
    assert client.get(f"/v1/studies/{case_id}/heatmap", headers=bearer(uploader)).status_code == 403

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


def test_a_second_read_with_the_same_finding_upholds_and_the_result_stands(
    client: TestClient, make_key: MakeKey
) -> None:
    case_id, uploader, _ = read_case(client, make_key)
    appeal = file(client, uploader, case_id)
    second = bearer(make_key("radiologist", "north"))
    assert client.post(f"/v1/appeals/{appeal['id']}/take", headers=second).status_code == 200
    decided = client.post(
        f"/v1/appeals/{appeal['id']}/decision",
        json={"finding": "normal", "rationale": "Clear."},
        headers=second,
    )
    assert decided.status_code == 200 and decided.json()["outcome"] == "upheld"
    case = client.get(f"/v1/studies/{case_id}", headers=bearer(uploader)).json()
    assert case["result"] == {
        "finding": "normal",
        "on_appeal": False,
        "created_at": case["result"]["created_at"],
    }
    assert case["appeal_outcome"] == "upheld"


def test_outcome_is_derived_from_the_two_findings() -> None:
    assert outcome_of(Finding.NORMAL, Finding.NORMAL) is AppealOutcome.UPHELD
    assert outcome_of(Finding.NORMAL, Finding.PNEUMONIA) is AppealOutcome.OVERTURNED
    assert outcome_of(Finding.PNEUMONIA, Finding.OTHER_FINDING) is AppealOutcome.OVERTURNED
    assert outcome_of(Finding.NORMAL, Finding.OTHER_FINDING) is AppealOutcome.PARTIALLY
    assert outcome_of(Finding.PNEUMONIA, Finding.NON_DIAGNOSTIC) is AppealOutcome.PARTIALLY


def test_an_unread_case_cannot_be_appealed(client: TestClient, make_key: MakeKey) -> None:
    uploader = make_key("uploader", "north")
    case_id = str(
        upload(client, uploader, (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes()).json()["id"]
    )
    wait_for(client, uploader, case_id)
    refused = client.post(
        "/v1/appeals",
        json={"case_id": case_id, "category": "other", "grounds": "g", "contact_reference": "r"},
        headers=bearer(uploader),
    )
    assert refused.status_code == 409 and "no result" in refused.json()["error"]["message"]
