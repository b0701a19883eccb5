"""Go-live: local validation, site calibration as a two-person decision, rollback, re-tiering,
challenger models and the feedback-loop guard, on synthetic reads written straight to the database.

The synthetic site: the card's log-odds ``s`` are stored with each prediction, and the
truth is ``P(positive) = sigmoid((s + BIAS) / TEMPERATURE)``: the model is overconfident
and the site's prevalence lower than the card assumes.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy.special import expit
from sqlalchemy import select

from audit.log import AuditEvent
from models.bundle import read_card
from tests.conftest import MakeKey, bearer, runtime_of
from tests.test_golive import web_login
from triage_api import golive
from triage_api.app import create_app
from triage_api.cli import main as triage_main
from triage_api.db import transaction
from triage_api.errors import Conflict
from triage_api.priority import sla, tier_of
from triage_api.settings import Settings
from triage_api.tables import Case, Challenger, ChallengerScore, Clinic, Prediction, Read, User
from triage_api.vocab import CaseStatus, Tier
from triage_api.worker import Result, Worker

TEMPERATURE, BIAS = 2.0, -1.5
NOW = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.5, n)
    labels = (rng.random(n) < expit((logits + BIAS) / TEMPERATURE)).astype(int)
    return logits, labels


@pytest.fixture
def quiet_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"run_worker": False}))) as test_client:
        yield test_client


def user_id(client: TestClient, role: str) -> int:
    with runtime_of(client).factory() as session:
        return session.execute(select(User.id).where(User.role == role).order_by(User.id)).scalars().first()  # type: ignore[return-value]


def seed(
    client: TestClient,
    clinic: str,
    logits: np.ndarray,
    labels: np.ndarray | None,
    *,
    ai_shown: bool = False,
    model_ref: str = "tiny-test@0.0.1",
) -> list[str]:
    """Cases scored by ``model_ref`` with these log-odds; read if labelled (AI-blind unless ``ai_shown``)."""
    settings: Settings = runtime_of(client).settings
    card = read_card(settings.model_path)
    uploader, reader = user_id(client, "uploader"), user_id(client, "radiologist")
    ids = []
    with transaction(runtime_of(client).factory) as session:
        clinic_id = session.execute(select(Clinic.id).where(Clinic.name == clinic)).scalar_one()
        for i, logit in enumerate(logits):
            case_id = uuid.uuid4().hex
            risk = float(expit(logit))
            tier = tier_of(risk, card.thresholds)
            received = NOW + timedelta(seconds=i)
            shown = labels is None or ai_shown
            session.add(
                Case(
                    id=case_id,
                    clinic_id=clinic_id,
                    sha256=case_id * 2,
                    media_type="image/png",
                    size_bytes=1,
                    status="scored",
                    received_at=received,
                    deadline=received + sla(tier if shown else Tier.ROUTINE, settings),
                    tier=tier if shown else Tier.ROUTINE,
                    risk=risk if shown else None,
                    model_ref=model_ref if shown else None,
                    ai_hidden=not shown,
                    uploaded_by=uploader,
                    read_at=None if labels is None else received + timedelta(hours=1),
                )
            )
            session.flush()
            session.add(
                Prediction(
                    case_id=case_id,
                    attempt=1,
                    model_ref=model_ref,
                    risk=risk,
                    tier=tier,
                    inference_ms=1.0,
                    created_at=received,
                    logit=float(logit),
                    ai_hidden=not shown,
                )
            )
            if labels is not None:
                session.add(
                    Read(
                        case_id=case_id,
                        reader_id=reader,
                        kind="primary",
                        finding="pneumonia" if labels[i] else "normal",
                        ai_score_shown=ai_shown,
                        created_at=received + timedelta(hours=1),
                    )
                )
            ids.append(case_id)
    return ids


def test_fit_recovers_a_known_temperature_and_bias_and_lowers_held_out_ece() -> None:
    logits, labels = synthetic(4000, seed=1)
    fit = golive.propose_fit(logits, labels, critical_sensitivity=0.95, elevated_sensitivity=0.99)
    assert fit["temperature"] == pytest.approx(TEMPERATURE, abs=0.25)
    assert fit["bias"] == pytest.approx(BIAS, abs=0.35)
    cv = fit["cross_validation"]
    assert cv["before"]["ece"] > 0.1 and cv["after"]["ece"] < 0.03
    assert cv["after"]["auroc"] == pytest.approx(cv["before"]["auroc"], abs=0.01)
    assert cv["after"]["critical"]["sensitivity"] >= 0.9  # held out, chosen for 0.95 in-fold
    assert fit["elevated"] <= fit["critical"]


def test_validation_uses_ai_blind_reads_only_and_states_its_rule(
    quiet_client: TestClient, make_key: MakeKey
) -> None:
    client = quiet_client
    make_key("uploader", "north"), make_key("radiologist", "north")
    auditor = bearer(make_key("auditor", "north"))
    logits, labels = synthetic(150, seed=2)
    seed(client, "north", logits, labels)
    seed(client, "north", *synthetic(40, seed=3), ai_shown=True)
    report = client.get("/v1/clinics/north/validation", headers=auditor).json()
    assert report["n_reads"] == 150 and report["excluded_ai_shown"] == 40
    assert report["positives"] == int(labels.sum()) and report["negatives"] == 150 - int(labels.sum())
    assert report["prevalence"] == pytest.approx(labels.mean())
    assert report["sufficient"] is False and "200" in report["rule"]
    low, high = report["card"]["auroc_ci95"]
    assert low <= report["card"]["auroc"] <= high
    assert report["card"]["calibration"]["ece"] > 0.05
    assert set(report["card"]["critical"]) == {"threshold", "sensitivity", "specificity"}
    web_login(client, runtime_of(client).factory, "auditor", "north")
    desk = client.get("/web/audit").text
    assert "Local validation" in desk and "150 reads" in desk and "40 left out" in desk
    assert "Calibration of tiny-test@0.0.1 at north, AI-blind reads" in desk and "<svg" in desk
    client.cookies.clear()
    seed(client, "north", *synthetic(100, seed=4))
    assert client.get("/v1/clinics/north/validation", headers=auditor).json()["sufficient"] is True
    assert client.get("/v1/clinics/south/validation", headers=auditor).status_code == 404
    assert (
        client.get(
            "/v1/clinics/north/validation", headers=bearer(make_key("radiologist", "north"))
        ).status_code
        == 403
    )
    page = client.get("/v1/clinics/north/validation?model=nope@1", headers=auditor)
    assert page.status_code == 404 and page.json()["error"]["code"] == "not_found"


def test_calibration_two_person_rule_approval_retiering_and_rollback(
    quiet_client: TestClient, make_key: MakeKey
) -> None:
    client = quiet_client
    make_key("uploader", "north"), make_key("radiologist", "north")
    admin, other_admin = bearer(make_key("admin")), bearer(make_key("admin"))
    auditor = bearer(make_key("auditor", "north"))
    seed(client, "north", *synthetic(400, seed=5))
    open_ids = seed(client, "north", np.linspace(-4, 4, 30), None)  # unread, AI shown, card tiers
    with runtime_of(client).factory() as session:
        before = {
            c.id: c.deadline for c in session.execute(select(Case).where(Case.id.in_(open_ids))).scalars()
        }

    bad = client.post("/v1/clinics/north/calibrations", json={"critical_sensitivity": 2}, headers=admin)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
    proposed = client.post("/v1/clinics/north/calibrations", json={}, headers=admin)
    assert proposed.status_code == 201, proposed.text
    first = proposed.json()
    assert first["status"] == "proposed" and first["temperature"] == pytest.approx(TEMPERATURE, abs=0.5)
    assert first["report"]["sufficient"] is True and first["report"]["n_reads"] == 400
    cv = first["report"]["cross_validation"]
    assert cv["after"]["ece"] < cv["before"]["ece"]

    own = client.post(f"/v1/calibrations/{first['id']}/approve", json={"reason": "looks fine"}, headers=admin)
    assert own.status_code == 403 and own.json()["error"]["code"] == "forbidden"
    assert client.post(f"/v1/calibrations/{first['id']}/approve", json={}, headers=auditor).status_code == 422
    approved = client.post(
        f"/v1/calibrations/{first['id']}/approve", json={"reason": "CV ECE 0.02"}, headers=auditor
    )
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    again = client.post(f"/v1/calibrations/{first['id']}/reject", json={"reason": "x"}, headers=other_admin)
    assert again.status_code == 409

    # Re-tiered under "earlier, never later"; the worklist shows the calibration.
    with runtime_of(client).factory() as session:
        after = {c.id: c for c in session.execute(select(Case).where(Case.id.in_(open_ids))).scalars()}
    assert all(after[i].deadline <= before[i] for i in open_ids)
    assert any(after[i].deadline < before[i] for i in open_ids)
    assert {c.calibration_id for c in after.values()} == {first["id"]}
    reader = bearer(make_key("radiologist", "north"))
    listed = client.get("/v1/worklist?unread=true", headers=reader).json()
    assert {item["calibration_id"] for item in listed} == {first["id"]}
    assert (
        client.get("/v1/clinics/north/validation", headers=auditor).json()["site_calibration"]["id"]
        == first["id"]
    )

    second = client.post(
        "/v1/clinics/north/calibrations", json={"critical_sensitivity": 0.9}, headers=other_admin
    ).json()
    rejected = client.post(f"/v1/calibrations/{second['id']}/reject", json={"reason": "no"}, headers=admin)
    assert rejected.json()["status"] == "rejected"
    third = client.post(
        "/v1/clinics/north/calibrations", json={"critical_sensitivity": 0.9}, headers=admin
    ).json()
    assert (
        client.post(
            f"/v1/calibrations/{third['id']}/approve", json={"reason": "ok"}, headers=other_admin
        ).status_code
        == 200
    )

    statuses = {
        c["id"]: c["status"] for c in client.get("/v1/clinics/north/calibrations", headers=auditor).json()
    }
    assert statuses == {first["id"]: "superseded", second["id"]: "rejected", third["id"]: "approved"}
    assert (
        client.post(
            f"/v1/calibrations/{first['id']}/rollback", json={"reason": "x"}, headers=admin
        ).status_code
        == 409
    )
    back = client.post(
        f"/v1/calibrations/{third['id']}/rollback", json={"reason": "alerts"}, headers=admin
    ).json()
    assert back["rolled_back"]["status"] == "rolled_back" and back["in_force"]["id"] == first["id"]
    back = client.post(
        f"/v1/calibrations/{first['id']}/rollback", json={"reason": "card"}, headers=auditor
    ).json()
    assert back["in_force"] is None
    with runtime_of(client).factory() as session:
        final = {c.id: c for c in session.execute(select(Case).where(Case.id.in_(open_ids))).scalars()}
        actions = [
            e.action
            for e in session.execute(
                select(AuditEvent).where(AuditEvent.object_type == "calibration").order_by(AuditEvent.seq)
            ).scalars()
        ]
    assert all(final[i].deadline <= after[i].deadline for i in open_ids)  # rollbacks never move one later
    assert {c.calibration_id for c in final.values()} == {None}
    assert actions.count("calibration.propose") == 3 and actions.count("calibration.approve") == 2
    assert actions.count("calibration.reject") == 1 and actions.count("calibration.rollback") == 2
    outside = client.post(
        f"/v1/calibrations/{first['id']}/rollback",
        json={"reason": "x"},
        headers=bearer(make_key("auditor", "south")),
    )
    assert outside.status_code == 404


def test_new_scores_apply_the_calibration_in_force(quiet_client: TestClient, make_key: MakeKey) -> None:
    client = quiet_client
    make_key("uploader", "north"), make_key("radiologist", "north")
    seed(client, "north", *synthetic(300, seed=6))
    proposal = client.post(
        "/v1/clinics/north/calibrations", json={}, headers=bearer(make_key("admin"))
    ).json()
    client.post(
        f"/v1/calibrations/{proposal['id']}/approve",
        json={"reason": "ok"},
        headers=bearer(make_key("auditor", "north")),
    )
    settings: Settings = runtime_of(client).settings
    case_id = seed(client, "north", np.array([0.0]), None)[0]
    worker = Worker(runtime_of(client).factory, settings, bundle=tiny_bundle_of(settings))
    from triage_api.jobs import Claim

    with transaction(runtime_of(client).factory) as session:
        from triage_api.tables import Job

        session.add(Job(case_id=case_id, status="running", attempts=2, worker=worker.name, available_at=NOW))
        session.flush()
        job_id = session.execute(select(Job.id).where(Job.case_id == case_id)).scalar_one()
    claim = Claim(job_id, case_id, 2, "x", "image/png")
    assert worker.finish([claim], [Result(CaseStatus.SCORED, risk=0.5, inference_ms=1.0, logit=0.0)]) == 1
    with runtime_of(client).factory() as session:
        prediction = session.execute(
            select(Prediction).where(Prediction.case_id == case_id, Prediction.attempt == 2)
        ).scalar_one()
    expected = float(expit((0.0 + proposal["bias"]) / proposal["temperature"]))
    assert prediction.risk == pytest.approx(expected) and prediction.calibration_id == proposal["id"]
    assert prediction.logit == 0.0


def tiny_bundle_of(settings: Settings):  # type: ignore[no-untyped-def]
    from models.bundle import load_bundle

    return load_bundle(settings.model_path)


def challenger_bundle(settings: Settings, tmp_path: Path, version: str = "0.0.2") -> Path:
    """The tiny bundle under another version: a challenger with the same input."""
    path = tmp_path / f"tiny-{version}"
    shutil.copytree(settings.model_path, path)
    card = json.loads((path / "card.json").read_text())
    (path / "card.json").write_text(json.dumps({**card, "version": version}))
    return path


def test_paired_auroc_difference_on_paired_synthetic_scores() -> None:
    rng = np.random.default_rng(7)
    labels = (rng.random(600) < 0.3).astype(int)
    signal = labels * 1.5 + rng.normal(0, 1, 600)
    live = expit(signal)
    worse = expit(labels * 0.4 + rng.normal(0, 1, 600))
    same = expit(signal + rng.normal(0, 0.05, 600))
    verdict = golive.paired_auroc_difference(labels, worse, live)
    assert verdict["worse_beyond_ci"] and verdict["ci95"][1] < 0 < -verdict["auroc_difference"]
    tie = golive.paired_auroc_difference(labels, same, live)
    assert not tie["worse_beyond_ci"] and tie["ci95"][0] <= 0 <= tie["ci95"][1]
    assert tie["ci95"][1] - tie["ci95"][0] < 0.02  # pairing: the shared variation cancels


def test_challenger_compared_promoted_only_when_not_worse_and_never_shown(
    quiet_client: TestClient, make_key: MakeKey, tmp_path: Path
) -> None:
    client = quiet_client
    make_key("uploader", "north"), make_key("radiologist", "north")
    admin, auditor = bearer(make_key("admin")), bearer(make_key("auditor", "north"))
    settings: Settings = runtime_of(client).settings
    logits, labels = synthetic(400, seed=8)
    ids = seed(client, "north", logits, labels)
    with transaction(runtime_of(client).factory) as session:
        live = read_card(settings.model_path)
        worse = golive.add_challenger(
            session,
            actor="test",
            clinic_name="north",
            bundle_path=challenger_bundle(settings, tmp_path),
            live=live,
            now=NOW,
        )
        better = golive.add_challenger(
            session,
            actor="test",
            clinic_name="north",
            bundle_path=challenger_bundle(settings, tmp_path, "0.0.3"),
            live=live,
            now=NOW,
        )
        rng = np.random.default_rng(9)
        for case_id, label, logit in zip(ids, labels, logits, strict=True):
            noisy = float(rng.normal(0, 3))
            sharp = float(logit + (2.0 if label else -2.0))
            for row, value in ((worse, noisy), (better, sharp)):
                session.add(
                    ChallengerScore(
                        case_id=case_id,
                        challenger_id=row.id,
                        model_ref=row.model_ref,
                        risk=float(expit(value)),
                        logit=value,
                        created_at=NOW,
                    )
                )
    comparison = client.get("/v1/clinics/north/comparison?challenger=tiny-test@0.0.2", headers=auditor).json()
    assert comparison["n_reads"] == 400 and comparison["worse_beyond_ci"] is True
    refused = client.post("/v1/clinics/north/calibrations", json={"model": "tiny-test@0.0.2"}, headers=admin)
    assert refused.status_code == 409 and "worse" in refused.json()["error"]["message"]
    promotion = client.post(
        "/v1/clinics/north/calibrations", json={"model": "tiny-test@0.0.3"}, headers=admin
    )
    assert promotion.status_code == 201 and promotion.json()["challenger_id"] == better.id
    assert promotion.json()["report"]["comparison"]["better_beyond_ci"] is True
    client.post(
        f"/v1/calibrations/{promotion.json()['id']}/approve", json={"reason": "better"}, headers=auditor
    )

    # The worker scores the challengers in the live model's batch; the promoted one now decides.
    from tests.conftest import DATA, upload

    key = make_key("uploader", "north")
    assert upload(client, key, (DATA / "cxr_normal.jpeg").read_bytes()).status_code == 201
    worker = Worker(runtime_of(client).factory, settings, tiny_bundle_of(settings))
    assert worker.run_once()
    with runtime_of(client).factory() as session:
        case = session.execute(select(Case).where(Case.read_at.is_(None))).scalar_one()
        scores = (
            session.execute(select(ChallengerScore).where(ChallengerScore.case_id == case.id)).scalars().all()
        )
        prediction = session.execute(select(Prediction).where(Prediction.case_id == case.id)).scalar_one()
    assert case.status == "scored", case.reason
    assert {s.model_ref for s in scores} == {"tiny-test@0.0.2", "tiny-test@0.0.3"}
    assert prediction.model_ref == case.model_ref == "tiny-test@0.0.3"
    body = client.get(f"/v1/studies/{case.id}", headers=bearer(make_key("radiologist", "north"))).json()
    assert body["model_version"] == "tiny-test@0.0.3" and body["calibration_id"] == promotion.json()["id"]
    assert "0.0.2" not in json.dumps(body)
    with pytest.raises(Conflict), transaction(runtime_of(client).factory) as session:
        golive.stop_challenger(session, actor="test", clinic_name="north", model_ref="tiny-test@0.0.3")


def test_cli_mode_validation_shadow_and_export_guard(
    quiet_client: TestClient,
    make_key: MakeKey,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = quiet_client
    make_key("uploader", "north"), make_key("radiologist", "north")
    seed(client, "north", *synthetic(50, seed=10))
    seed(client, "north", *synthetic(20, seed=11), ai_shown=True)
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TRIAGE_DATABASE_URL", settings.sqlalchemy_url)
    monkeypatch.setenv("TRIAGE_MODEL_PATH", str(settings.model_path))
    assert triage_main(["clinics", "mode", "north", "shadow", "--reason", "new site"]) == 0
    assert triage_main(["clinics", "mode", "north", "live", "--reason", "go"]) == 2
    assert "insufficient" in capsys.readouterr().err
    assert triage_main(["validation", "north"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["n_reads"], report["excluded_ai_shown"], report["ai_mode"]) == (50, 20, "shadow")
    assert (
        triage_main(["models", "shadow", str(challenger_bundle(settings, tmp_path)), "--clinic", "north"])
        == 0
    )
    assert "tiny-test@0.0.2" in capsys.readouterr().out
    assert triage_main(["models", "shadow", str(settings.model_path), "--clinic", "north"]) == 2
    assert triage_main(["models", "shadow", "tiny-test@0.0.2", "--clinic", "north", "--stop"]) == 0
    with runtime_of(client).factory() as session:
        assert session.execute(select(Challenger.active)).scalar_one() is False
    out = tmp_path / "reads.csv"
    assert triage_main(["export-reads", str(out)]) == 0
    assert "20 left out because the AI score was shown" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 51
