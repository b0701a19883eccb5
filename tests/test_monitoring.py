"""Monitoring metrics on a small scenario computed by hand, and alerts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.log import AuditEvent
from tests.conftest import MakeKey, bearer, runtime_of
from triage_api import monitoring
from triage_api.db import transaction
from triage_api.tables import Alert, Appeal, Case, Clinic, Read, User

NOW = datetime.now(UTC)


def add_case(
    session: Session,
    clinic_id: int,
    user_id: int,
    risk: float | None,
    tier: str,
    read_after: float | None,
    status: str = "scored",
    reason: str | None = None,
) -> Case:
    received = NOW - timedelta(hours=2)
    case = Case(
        id=uuid.uuid4().hex,
        clinic_id=clinic_id,
        sha256=uuid.uuid4().hex * 2,
        media_type="application/dicom",
        size_bytes=1,
        status=status,
        reason=reason,
        received_at=received,
        deadline=received + timedelta(hours=1),
        tier=tier,
        risk=risk,
        model_ref="m@1" if risk is not None else None,
        uploaded_by=user_id,
        read_at=received + timedelta(seconds=read_after) if read_after is not None else None,
    )
    session.add(case)
    return case


def add_read(
    session: Session, case: Case, reader_id: int, finding: str, agrees: bool, reason: str | None = None
) -> None:
    session.add(
        Read(
            case_id=case.id,
            reader_id=reader_id,
            kind="primary",
            finding=finding,
            agrees_with_ai=agrees,
            override_reason=reason,
            ai_score_shown=True,
            ai_risk=case.risk,
            model_ref=case.model_ref,
            created_at=NOW - timedelta(hours=1),
        )
    )


@pytest.fixture
def scenario(client: TestClient, make_key: MakeKey) -> str:
    auditor = make_key("auditor", "north")
    make_key("radiologist", "north")
    make_key("uploader", "north")
    with transaction(runtime_of(client).factory) as session:
        clinic = session.execute(select(Clinic).where(Clinic.name == "north")).scalar_one()
        reader = session.execute(select(User).where(User.role == "radiologist")).scalar_one()
        uploader = session.execute(select(User).where(User.role == "uploader")).scalar_one()
        c1 = add_case(session, clinic.id, uploader.id, 0.9, "critical", 600)
        c2 = add_case(session, clinic.id, uploader.id, 0.8, "critical", 1200)
        c3 = add_case(session, clinic.id, uploader.id, 0.3, "routine", 3600)
        c4 = add_case(session, clinic.id, uploader.id, 0.2, "routine", None)
        add_case(session, clinic.id, uploader.id, None, "routine", None, "not_analyzed", "modality MR")
        session.flush()
        add_read(session, c1, reader.id, "pneumonia", True)
        add_read(session, c2, reader.id, "normal", False, "false_positive")
        add_read(session, c3, reader.id, "pneumonia", False, "false_negative")
        add_read(session, c4, reader.id, "normal", True)
        session.add(
            Appeal(
                case_id=c4.id,
                clinic_id=clinic.id,
                filed_by=uploader.id,
                category="other",
                grounds="g",
                contact_reference="r",
                status="decided",
                due_at=NOW,
                outcome="upheld",
                created_at=NOW,
            )
        )
    return auditor


def test_metrics_match_the_hand_computed_scenario(client: TestClient, scenario: str) -> None:
    response = client.get("/v1/metrics/model", headers=bearer(scenario))
    assert response.status_code == 200, response.text
    by_model = {m["model_ref"]: m for m in response.json()["models"]}
    m = by_model["m@1"]
    assert m["cases"] == 4
    ai = m["ai_vs_final_read"]
    # positives {0.9, 0.3}, negatives {0.8, 0.2}: 3 of 4 pairs ordered right.
    assert ai["n"] == 4 and ai["positives"] == 2 and ai["auroc"] == pytest.approx(0.75)
    low, high = ai["auroc_ci95"]
    assert 0.0 <= low <= 0.75 <= high <= 1.0
    # ECE = (|0.9-1| + |0.8-0| + |0.3-1| + |0.2-0|) / 4
    assert ai["calibration"]["ece"] == pytest.approx(0.45)
    assert m["overrides"] == {
        "reads_with_ai": 4,
        "rate": 0.5,
        "by_reason": {"false_positive": 1, "false_negative": 1},
    }
    assert m["appeals"] == {"filed": 1, "rate": 0.25, "decided": 1, "overturn_rate": 0.0}
    assert m["time_to_first_read"]["critical"]["median_seconds"] == pytest.approx(900)
    assert m["time_to_first_read"]["routine"]["n"] == 1
    assert m["drift"]["psi"] is None  # nothing in the previous window
    gated = by_model["none"]
    assert gated["not_analyzed"] == {"share": 1.0, "by_reason": {"modality MR": 1}}


def test_metrics_are_scoped_and_audited(client: TestClient, scenario: str, make_key: MakeKey) -> None:
    other = client.get("/v1/metrics/model", headers=bearer(make_key("auditor", "south")))
    assert other.status_code == 200 and other.json()["models"] == []
    assert client.get("/v1/metrics/model?clinic_id=999", headers=bearer(scenario)).status_code == 404
    assert (
        client.get("/v1/metrics/model", headers=bearer(make_key("radiologist", "north"))).status_code == 403
    )
    with runtime_of(client).factory() as session:
        actions = [e.action for e in session.execute(select(AuditEvent)).scalars()]
    assert "metrics.model" in actions


def test_override_rate_over_its_bound_raises_one_audited_alert(client: TestClient, scenario: str) -> None:
    settings = runtime_of(client).settings.model_copy(
        update={"alert_min_reads": 4, "alert_override_rate": 0.3}
    )
    factory = runtime_of(client).factory
    with transaction(factory) as session:
        raised = monitoring.check_alerts(session, settings=settings)
    assert [(a.kind, a.value) for a in raised] == [("override_rate", 0.5)]
    with transaction(factory) as session:
        assert monitoring.check_alerts(session, settings=settings) == []
        assert len(list(session.execute(select(Alert)).scalars())) == 1
        event = session.execute(select(AuditEvent).where(AuditEvent.action == "model.alert")).scalar_one()
        assert event.event_code == "110113"
    shown = client.get("/v1/metrics/model", headers=bearer(scenario)).json()["alerts"]
    assert [a["kind"] for a in shown] == ["override_rate"]


def test_psi_is_zero_for_the_same_distribution_and_grows_with_shift() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    reference = rng.beta(2, 5, 5000)
    assert monitoring.psi(reference, reference) == pytest.approx(0.0)
    shifted = monitoring.psi(rng.beta(5, 2, 5000), reference)
    assert shifted is not None and shifted > 1.0


def test_export_reads_marks_ai_influence_and_holds_back_open_appeals(
    client: TestClient, scenario: str, tmp_path: Path
) -> None:
    import csv

    from triage_api.export import export_reads

    factory = runtime_of(client).factory
    with transaction(factory) as session:
        appealed = session.execute(select(Case).where(Case.risk == 0.9)).scalar_one()
        user = session.execute(select(User).where(User.role == "uploader")).scalar_one()
        session.add(
            Appeal(
                case_id=appealed.id,
                clinic_id=appealed.clinic_id,
                filed_by=user.id,
                category="other",
                grounds="g",
                contact_reference="r",
                status="open",
                due_at=NOW,
                created_at=NOW,
            )
        )
    out = tmp_path / "reads.csv"
    with transaction(factory) as session:
        summary = export_reads(session, actor="test", out=out, include_ai_shown=True)
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert (summary.rows, summary.held_back_open_appeal) == (2, 1)  # 3 read cases, one under open appeal
    assert {r["label"] for r in rows} == {"normal", "pneumonia"}
    assert all(r["ai_score_shown"] == "True" and r["label_source"] == "primary" for r in rows)
    assert appealed.id not in {r["case_id"] for r in rows}
    with factory() as session:
        event = session.execute(select(AuditEvent).where(AuditEvent.action == "reads.export")).scalar_one()
    assert event.event_code == "110106"


def test_drift_against_the_cards_validation_scores(client: TestClient, scenario: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    import numpy as np

    from models.bundle import save_bundle
    from triage_api.auth import Principal, Role

    # A card "m@1" whose validation risks sit where the scenario's do: {0.2, 0.3, 0.8, 0.9}.
    counts = [0, 0, 5, 5, 0, 0, 0, 0, 5, 5]
    card = json.loads((runtime_of(client).settings.model_path / "card.json").read_text())
    card |= {
        "name": "m",
        "version": "1",
        "validation_metrics": {"risk_histogram": {"edges": [i / 10 for i in range(11)], "counts": counts}},
    }
    card.pop("weights_sha256")
    save_bundle(tmp_path / "m", card, {})
    validation = monitoring.validation_histograms(tmp_path / "m")
    assert list(validation) == ["m@1"] and validation["m@1"].tolist() == counts

    with runtime_of(client).factory() as session:
        clinic = session.execute(select(Clinic).where(Clinic.name == "north")).scalar_one()
        auditor = Principal(user_id=1, role=Role.AUDITOR, clinic_ids=frozenset({clinic.id}))
        window = monitoring.Window(NOW - timedelta(days=1), NOW + timedelta(minutes=1))
        same = monitoring.model_metrics(session, principal=auditor, window=window, validation=validation)
        shifted = {"m@1": np.asarray([20, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=float)}
        moved = monitoring.model_metrics(session, principal=auditor, window=window, validation=shifted)
    drift = {m["model_ref"]: m["drift"]["validation"] for m in same}
    assert drift["m@1"] == {"n": 20, "psi": pytest.approx(0.0)}
    assert {m["model_ref"]: m["drift"]["validation"]["psi"] for m in moved}["m@1"] > 1.0
    assert drift["none"] == {"n": 0, "psi": None}  # no card for unscored cases


def test_the_default_card_carries_its_validation_scores() -> None:
    from pathlib import Path

    default = Path(__file__).parents[1] / "models" / "bundles" / "cxr-pneumonia-lite0"
    validation = monitoring.validation_histograms(default)
    assert validation["cxr-pneumonia-lite0@1.0.0"].sum() == 776  # the validation split's images
