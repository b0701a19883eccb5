"""Go-live: shadow mode hides the AI everywhere, the AI-blind sample, going live, ``off``.

The shadow test plants a canary: a distinctive risk the worker stores for a shadow case,
which must not appear in any REST body, page or page source a reader or clinic can reach,
nor in an export; a live case carrying the same canary shows it (so the check can fail).
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from audit.log import AuditEvent
from models.bundle import load_bundle
from tests.conftest import DATA, MakeKey, bearer, runtime_of, upload
from triage_api import golive, passwords
from triage_api.app import create_app
from triage_api.export import export_reads
from triage_api.settings import Settings
from triage_api.tables import Case, Clinic, Prediction, Read, User
from triage_api.vocab import AiMode, CaseStatus
from triage_api.worker import Result, Worker

CANARY = 0.9876543
"""A risk no real score will show by chance; in any rendering it starts with these digits."""
CANARY_TEXTS = ("0.987654", "98.8%", "98.77")
PASSWORD = "a long test password"


@pytest.fixture
def manual(settings: Settings) -> Settings:
    return settings.model_copy(update={"run_worker": False})


@pytest.fixture
def quiet_client(manual: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(manual)) as test_client:
        yield test_client


def new_worker(client: TestClient, settings: Settings, rng: random.Random | None = None) -> Worker:
    worker = Worker(runtime_of(client).factory, settings, load_bundle(settings.model_path), rng=rng)
    worker.name += f":{id(worker)}"
    return worker


def score_next(worker: Worker, client: TestClient, key: str, risk: float = CANARY) -> str:
    """Upload a study and finish its scoring with ``risk`` (the test decides the model's output)."""
    response = upload(client, key, (DATA / "cxr_normal.jpeg").read_bytes())
    assert response.status_code in (200, 201), response.text
    (claim,) = worker.claim()
    assert worker.finish([claim], [Result(CaseStatus.SCORED, risk=risk, inference_ms=1.0)]) == 1
    return claim.case_id


def set_mode(client: TestClient, admin: str, clinic: str, mode: str, **extra: object):  # type: ignore[no-untyped-def]
    return client.put(
        f"/v1/clinics/{clinic}/ai-mode",
        json={"mode": mode, "reason": "site go-live plan", **extra},
        headers=bearer(admin),
    )


def web_login(client: TestClient, factory, role: str, clinic: str) -> None:  # type: ignore[no-untyped-def]
    from triage_api import auth
    from triage_api.db import transaction

    name = f"web-{role}-{clinic}"
    with transaction(factory) as session:
        user, _ = auth.add_user(session, name=name, role=auth.Role(role), clinics=[clinic])
        passwords.set_password(session, user, PASSWORD)
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page.text)
    assert token is not None
    response = client.post(
        "/login",
        data={"username": name, "password": PASSWORD, "csrf_token": token.group(1)},
        follow_redirects=False,
    )
    assert response.status_code == 303


def assert_no_canary(text: str, where: str) -> None:
    for needle in CANARY_TEXTS:
        assert needle not in text, f"the shadow score leaked in {where}"


def test_shadow_hides_the_ai_everywhere(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey, tmp_path: Path
) -> None:
    client, factory = quiet_client, runtime_of(quiet_client).factory
    admin = make_key("admin")
    north, south = make_key("uploader", "north"), make_key("uploader", "south")
    assert set_mode(client, admin, "north", "shadow").status_code == 200
    worker = new_worker(client, manual)
    hidden = score_next(worker, client, north)
    shown = score_next(worker, client, south)
    reader = bearer(make_key("radiologist", "north"))

    # The live control: the same canary is visible there, so the checks below can fail.
    control = client.get(f"/v1/studies/{shown}", headers=bearer(make_key("radiologist", "south"))).text
    assert "0.987654" in control

    # Stored, hidden, and the order untouched: the routine deadline, not the critical one.
    with factory() as session:
        case = session.get_one(Case, hidden)
        prediction = session.execute(select(Prediction).where(Prediction.case_id == hidden)).scalar_one()
        assert (
            prediction.risk == pytest.approx(CANARY)
            and prediction.tier == "critical"
            and prediction.ai_hidden
        )
        assert (case.risk, case.model_ref, case.tier, case.ai_hidden) == (None, None, "routine", True)
        assert case.deadline - case.received_at == timedelta(minutes=manual.sla_routine_minutes)
        events = session.execute(select(AuditEvent).where(AuditEvent.object_id == hidden)).scalars()
        assert_no_canary(" ".join(str(e.details) for e in events), "the audit log")

    bodies = {
        "GET study (reader)": client.get(f"/v1/studies/{hidden}", headers=reader),
        "GET study (clinic)": client.get(f"/v1/studies/{hidden}", headers=bearer(north)),
        "worklist": client.get("/v1/worklist", headers=reader),
        "worklist critical": client.get("/v1/worklist?tier=critical", headers=reader),
    }
    for where, response in bodies.items():
        assert response.status_code == 200, where
        assert_no_canary(response.text, where)
    study = bodies["GET study (reader)"].json()
    assert (study["risk"], study["prediction"], study["model_version"], study["ai_shown"]) == (
        None,
        None,
        None,
        False,
    )
    assert bodies["worklist critical"].json() == []
    assert client.get(f"/v1/studies/{hidden}/heatmap", headers=reader).status_code == 404

    # A read in shadow is AI-blind by the server's word, whatever the client says.
    assert client.post(f"/v1/studies/{hidden}/claim", headers=reader).status_code == 200
    agreed = client.post(
        f"/v1/studies/{hidden}/reads",
        json={"finding": "pneumonia", "agrees_with_ai": True, "ai_score_shown": True},
        headers=reader,
    )
    assert agreed.status_code == 422  # there is no AI result to agree with
    read = client.post(
        f"/v1/studies/{hidden}/reads", json={"finding": "pneumonia", "ai_score_shown": True}, headers=reader
    )
    assert read.status_code == 201 and read.json()["ai_score_shown"] is False
    with factory() as session:
        stored = session.execute(select(Read).where(Read.case_id == hidden)).scalar_one()
        assert (stored.ai_score_shown, stored.ai_risk, stored.model_ref) == (False, None, None)

    # Pages and their sources.
    web_login(client, factory, "radiologist", "north")
    for path in (
        f"/web/cases/{hidden}",
        "/web/worklist",
        "/web/api/worklist?unread=false",
        "/static/worklist.js",
    ):
        page = client.get(path)
        assert page.status_code == 200, path
        assert_no_canary(page.text, path)
    assert "Model card" not in client.get(f"/web/cases/{hidden}").text
    assert client.get(f"/web/cases/{hidden}/heatmap.png").status_code == 404
    client.cookies.clear()
    web_login(client, factory, "uploader", "north")
    assert_no_canary(client.get("/web/clinic").text, "the clinic page")

    # Exports, even when asked for everything.
    out = tmp_path / "reads.csv"
    from triage_api.db import transaction

    with transaction(factory) as session:
        export_reads(session, actor="test", out=out, include_ai_shown=True)
    exported = list(csv.DictReader(out.read_text().splitlines()))
    assert [r["case_id"] for r in exported] == [hidden] and exported[0]["ai_score_shown"] == "False"
    assert_no_canary(out.read_text(), "the export")


def test_leaving_live_withdraws_the_ai_from_open_cases(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    client = quiet_client
    admin, north = make_key("admin"), make_key("uploader", "north")
    case_id = score_next(new_worker(client, manual), client, north)
    reader = bearer(make_key("radiologist", "north"))
    before = client.get(f"/v1/studies/{case_id}", headers=reader).json()
    assert before["tier"] == "critical" and before["risk"] == pytest.approx(CANARY)
    assert set_mode(client, admin, "north", "shadow").status_code == 200
    after = client.get(f"/v1/studies/{case_id}", headers=reader)
    assert_no_canary(after.text, "a case scored live, after the clinic went to shadow")
    body = after.json()
    assert (body["tier"], body["ai_shown"]) == ("routine", False)
    received = client.get(f"/v1/studies/{case_id}", headers=reader).json()
    assert body["deadline"] == received["deadline"]


def test_going_live_needs_a_sufficient_validation_or_an_override(
    quiet_client: TestClient, make_key: MakeKey
) -> None:
    client = quiet_client
    admin = make_key("admin")
    make_key("uploader", "north")
    assert set_mode(client, admin, "north", "shadow").json()["ai_mode"] == "shadow"
    refused = set_mode(client, admin, "north", "live")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "conflict"
    assert ">= 200 AI-blind reads" in refused.json()["error"]["message"]
    with runtime_of(client).factory() as session:
        assert session.execute(select(Clinic.ai_mode).where(Clinic.name == "north")).scalar_one() == "shadow"
    forced = set_mode(client, admin, "north", "live", override_reason="board decision 12, accepted risk")
    assert forced.status_code == 200 and forced.json()["ai_mode"] == "live"
    with runtime_of(client).factory() as session:
        event = (
            session.execute(
                select(AuditEvent)
                .where(AuditEvent.action == "clinic.ai_mode")
                .order_by(AuditEvent.seq.desc())
            )
            .scalars()
            .first()
        )
        assert event is not None and "board decision 12" in str(event.details)
    assert set_mode(client, make_key("auditor", "north"), "north", "off").status_code == 403
    assert set_mode(client, admin, "nowhere", "off").status_code == 404
    bad = client.put("/v1/clinics/north/ai-mode", json={"mode": "loud", "reason": "x"}, headers=bearer(admin))
    assert bad.status_code == 422 and "error" in bad.json()


def test_off_means_not_scored(quiet_client: TestClient, manual: Settings, make_key: MakeKey) -> None:
    client = quiet_client
    north = make_key("uploader", "north")
    assert set_mode(client, make_key("admin"), "north", "off").status_code == 200
    worker = new_worker(client, manual)
    finished = score_next(worker, client, north)  # switched off while its scoring ran: nothing stored
    response = upload(client, north, (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes())
    assert worker.run_once()  # neither decoded nor scored
    with runtime_of(client).factory() as session:
        for case_id in (finished, response.json()["id"]):
            case = session.get_one(Case, case_id)
            assert (case.status, case.reason, case.risk) == ("not_analyzed", golive.AI_OFF_REASON, None)
        assert session.execute(select(Prediction)).first() is None


def test_the_ai_blind_sample_rate_is_within_its_binomial_bounds() -> None:
    rng = random.Random(20261202)
    drawn = sum(golive.withhold_ai(AiMode.LIVE, 0.05, rng) for _ in range(2000))
    # mean 100, sd 9.75: 4.5 sd either side fails once in ~150,000 seeds
    assert 56 <= drawn <= 144
    assert all(golive.withhold_ai(AiMode.SHADOW, 0.0, rng) for _ in range(10))
    assert not any(golive.withhold_ai(AiMode.OFF, 1.0, rng) for _ in range(10))
    assert not any(golive.withhold_ai(AiMode.LIVE, 0.0, rng) for _ in range(100))


def test_a_live_clinic_sample_is_read_ai_blind_and_audited(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    client = quiet_client
    north = make_key("uploader", "north")
    admin = make_key("admin")
    assert set_mode(client, admin, "north", "shadow").status_code == 200
    assert set_mode(
        client, admin, "north", "live", override_reason="pilot", blind_sample_rate=1.0
    ).json() == {
        "clinic": "north",
        "ai_mode": "live",
        "blind_sample_rate": 1.0,
    }
    case_id = score_next(new_worker(client, manual, rng=random.Random(1)), client, north)
    reader = bearer(make_key("radiologist", "north"))
    assert_no_canary(client.get(f"/v1/studies/{case_id}", headers=reader).text, "an AI-blind sample case")
    with runtime_of(client).factory() as session:
        event = session.execute(
            select(AuditEvent).where(
                AuditEvent.object_id == case_id, AuditEvent.action == "study.score.scored"
            )
        ).scalar_one()
        assert event.details is not None and "blind_sample" in str(event.details)
        user = session.execute(select(User).where(User.role == "radiologist")).scalar_one()
    assert client.post(f"/v1/studies/{case_id}/claim", headers=reader).status_code == 200
    read = client.post(
        f"/v1/studies/{case_id}/reads", json={"finding": "normal", "ai_score_shown": True}, headers=reader
    )
    assert read.status_code == 201 and read.json()["ai_score_shown"] is False
    assert read.json()["reader_id"] == user.id
