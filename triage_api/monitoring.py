"""Model monitoring: how the AI does against final reads, and whether its inputs drift.

Everything is computed from the database for one window (received time), per model
version, within the caller's clinics. The *final* read of a case is its latest read: an
appeal's second read supersedes the primary read. Positive = ``pneumonia``; reads that
found something else or a non-diagnostic image do not enter AUROC or calibration.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.log import EventCode, Outcome, record
from models.bundle import BundleError, read_card
from models.calibrate import RISK_BIN_EDGES
from models.metrics import bootstrap_aurocs, reliability
from triage_api.auth import Principal, Role
from triage_api.errors import NotFound
from triage_api.settings import Settings
from triage_api.tables import Alert, Appeal, Case, Read
from triage_api.vocab import AppealStatus, CaseStatus, ReadKind, Tier

RISK_BINS = np.asarray(RISK_BIN_EDGES)  # exact decimal edges: 0.3 falls in [0.3, 0.4)


@dataclass(frozen=True)
class Window:
    since: datetime
    until: datetime


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """AUROC of scores against 0/1 labels; None without both classes."""
    if len(set(labels.tolist())) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def bootstrap_ci(
    scores: np.ndarray, labels: np.ndarray, rounds: int = 1000, seed: int = 0
) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of the AUROC (resampling cases)."""
    values = bootstrap_aurocs(labels, scores, rounds, seed)
    if len(values) < rounds // 2:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def calibration(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Expected calibration error over the 10 risk bins (:func:`models.metrics.reliability`).

    Only non-empty bins are listed.
    """
    ece, table = reliability(labels, scores, len(RISK_BINS) - 1)
    bins = [
        {
            "low": b["low"],
            "high": b["high"],
            "n": b["count"],
            "mean_risk": b["confidence"],
            "observed_rate": b["frequency"],
        }
        for b in table
        if b["count"]
    ]
    return {"ece": ece if len(scores) else None, "bins": bins}


def psi(current: np.ndarray, reference: np.ndarray, *, reference_counts: bool = False) -> float | None:
    """Population stability index between two risk samples over the 10 risk bins.

    Args:
        current: risks of this window.
        reference: risks of the reference, or with ``reference_counts`` its 10 bin counts.
        reference_counts: ``reference`` is already a histogram (a card's validation scores).
    """
    ref_hist = (
        np.asarray(reference, dtype=float) if reference_counts else np.histogram(reference, RISK_BINS)[0]
    )
    if len(current) == 0 or ref_hist.sum() == 0:
        return None
    cur = np.histogram(current, RISK_BINS)[0] / len(current)
    ref = ref_hist / ref_hist.sum()
    cur, ref = np.clip(cur, 1e-4, None), np.clip(ref, 1e-4, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def _quantiles(seconds: list[float]) -> dict[str, float | int | None]:
    if not seconds:
        return {"n": 0, "median_seconds": None, "p90_seconds": None}
    values = np.asarray(seconds)
    return {
        "n": len(seconds),
        "median_seconds": float(np.median(values)),
        "p90_seconds": float(np.percentile(values, 90)),
    }


def _final_reads(session: Session, case_ids: list[str]) -> dict[str, Read]:
    final: dict[str, Read] = {}
    if not case_ids:
        return final
    reads = session.execute(
        select(Read).where(Read.case_id.in_(case_ids)).order_by(Read.created_at, Read.id)
    ).scalars()
    for read in reads:
        final[read.case_id] = read
    return final


def _scoped_clinics(principal: Principal, clinic_id: int | None) -> frozenset[int]:
    if clinic_id is None:
        return principal.clinic_ids
    if clinic_id not in principal.clinic_ids:
        raise NotFound("no such clinic")
    return frozenset({clinic_id})


def model_metrics(
    session: Session,
    *,
    principal: Principal,
    window: Window,
    model_ref: str | None = None,
    clinic_id: int | None = None,
    validation: dict[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """Per model version: AI vs final reads, overrides, appeals, time to read, gating, drift.

    Args:
        validation: per model ref, the risk histogram of its validation set (from
            :func:`validation_histograms`); drift is also measured against it.

    Raises:
        NotFound: ``clinic_id`` is not one of the caller's clinics.
    """
    clinics = _scoped_clinics(principal, clinic_id)
    query = select(Case).where(
        Case.clinic_id.in_(clinics), Case.received_at >= window.since, Case.received_at < window.until
    )
    all_cases = list(session.execute(query).scalars())
    previous = _previous_window_risks(session, clinics, window)
    groups: dict[str, list[Case]] = defaultdict(list)
    for case in all_cases:
        groups[case.model_ref or "none"].append(case)
    results = []
    for ref, cases in sorted(groups.items()):
        if model_ref is not None and ref != model_ref:
            continue
        metrics = _metrics_for(session, ref, cases, previous.get(ref, np.array([])))
        reference = (validation or {}).get(ref)
        risks = np.asarray([c.risk for c in cases if c.risk is not None], dtype=float)
        metrics["drift"]["validation"] = {
            "n": int(reference.sum()) if reference is not None else 0,
            "psi": psi(risks, reference, reference_counts=True) if reference is not None else None,
        }
        results.append(metrics)
    return results


def validation_histograms(model_path: Path) -> dict[str, np.ndarray]:
    """``{model ref: validation risk bin counts}`` from the served bundle's card, if it has them.

    The alert stays on week-over-week drift: a site's prevalence differs from the training
    data's, so drift against validation is expected at any new site and is reported, not
    alerted on.
    """
    try:
        card = read_card(model_path)
    except BundleError:
        return {}
    histogram = card.validation_metrics.get("risk_histogram")
    if not isinstance(histogram, dict) or histogram.get("edges") != list(RISK_BIN_EDGES):
        return {}
    return {card.ref: np.asarray(histogram["counts"], dtype=float)}


def _previous_window_risks(
    session: Session, clinics: frozenset[int], window: Window
) -> dict[str, np.ndarray]:
    length = window.until - window.since
    rows = session.execute(
        select(Case.model_ref, Case.risk).where(
            Case.clinic_id.in_(clinics),
            Case.received_at >= window.since - length,
            Case.received_at < window.since,
            Case.risk.is_not(None),
        )
    ).all()
    by_model: dict[str, list[float]] = defaultdict(list)
    for ref, risk in rows:
        if risk is not None:
            by_model[ref or "none"].append(float(risk))
    return {ref: np.asarray(values) for ref, values in by_model.items()}


def _metrics_for(session: Session, ref: str, cases: list[Case], previous: np.ndarray) -> dict[str, Any]:
    ids = [c.id for c in cases]
    final = _final_reads(session, ids)
    primary = (
        {
            r.case_id: r
            for r in session.execute(
                select(Read).where(Read.case_id.in_(ids), Read.kind == ReadKind.PRIMARY)
            ).scalars()
        }
        if ids
        else {}
    )
    pairs = [
        (read.ai_risk if read.ai_risk is not None else case.risk, 1 if read.finding == "pneumonia" else 0)
        for case in cases
        if (read := final.get(case.id)) is not None
        and read.finding in ("pneumonia", "normal")
        and (read.ai_risk is not None or case.risk is not None)
    ]
    scores = np.asarray([p[0] for p in pairs], dtype=float)
    labels = np.asarray([p[1] for p in pairs], dtype=int)
    with_ai = [r for r in primary.values() if r.agrees_with_ai is not None]
    overrides = [r for r in with_ai if r.agrees_with_ai is False]
    appeals = list(session.execute(select(Appeal).where(Appeal.case_id.in_(ids))).scalars()) if ids else []
    decided = [a for a in appeals if a.status == AppealStatus.DECIDED]
    to_read: dict[str, list[float]] = defaultdict(list)
    for case in cases:
        if case.read_at is not None:
            to_read[case.tier].append((case.read_at - case.received_at).total_seconds())
    not_analyzed = Counter(c.reason or "unknown" for c in cases if c.status == CaseStatus.NOT_ANALYZED)
    risks = np.asarray([c.risk for c in cases if c.risk is not None], dtype=float)
    value = auroc(scores, labels) if len(scores) else None
    return {
        "model_ref": ref,
        "cases": len(cases),
        "status_counts": dict(Counter(c.status for c in cases)),
        "ai_vs_final_read": {
            "n": len(scores),
            "positives": int(labels.sum()) if len(labels) else 0,
            "auroc": value,
            "auroc_ci95": bootstrap_ci(scores, labels) if value is not None else None,
            "calibration": calibration(scores, labels),
        },
        "overrides": {
            "reads_with_ai": len(with_ai),
            "rate": len(overrides) / len(with_ai) if with_ai else None,
            "by_reason": dict(Counter(r.override_reason for r in overrides)),
        },
        "appeals": {
            "filed": len(appeals),
            "rate": len(appeals) / len(cases) if cases else None,
            "decided": len(decided),
            "overturn_rate": (
                sum(a.outcome in ("overturned", "partially") for a in decided) / len(decided)
                if decided
                else None
            ),
        },
        "time_to_first_read": {tier: _quantiles(to_read.get(tier, [])) for tier in Tier},
        "not_analyzed": {
            "share": sum(not_analyzed.values()) / len(cases) if cases else None,
            "by_reason": dict(not_analyzed),
        },
        "drift": {
            "reference": "previous window",
            "n": len(risks),
            "reference_n": len(previous),
            "psi": psi(risks, previous),
        },
    }


def check_alerts(session: Session, *, settings: Settings, now: datetime | None = None) -> list[Alert]:
    """Raise alerts where the override rate or the score drift crossed its bound.

    Looks at the last ``monitor_window_hours`` across all clinics, per clinic and model
    version. An alert already raised for the same clinic, model and kind within the window
    is not raised again. Each new alert is audited (110113).
    """
    now = now or datetime.now(UTC)
    window = Window(now - timedelta(hours=settings.monitor_window_hours), now)
    raised = []
    clinic_ids = {c for (c,) in session.execute(select(Case.clinic_id).distinct())}
    for clinic in sorted(clinic_ids):
        system = Principal(user_id=0, role=Role.AUDITOR, clinic_ids=frozenset({clinic}))
        for metrics in model_metrics(session, principal=system, window=window):
            rate = metrics["overrides"]["rate"]
            drift = metrics["drift"]["psi"]
            checks = [
                (
                    "override_rate",
                    rate,
                    settings.alert_override_rate,
                    metrics["overrides"]["reads_with_ai"] >= settings.alert_min_reads,
                ),
                (
                    "score_drift_psi",
                    drift,
                    settings.alert_drift_psi,
                    min(metrics["drift"]["n"], metrics["drift"]["reference_n"]) >= settings.alert_min_reads,
                ),
            ]
            for kind, value, bound, enough in checks:
                if value is None or not enough or value <= bound or math.isnan(value):
                    continue
                if _recent(session, clinic, metrics["model_ref"], kind, window.since):
                    continue
                alert = Alert(
                    clinic_id=clinic,
                    model_ref=metrics["model_ref"],
                    kind=kind,
                    value=float(value),
                    bound=float(bound),
                    window_start=window.since,
                    window_end=window.until,
                    created_at=now,
                )
                session.add(alert)
                session.flush()
                record(
                    session,
                    actor="monitor",
                    action="model.alert",
                    code=EventCode.SECURITY_ALERT,
                    object_type="alert",
                    object_id=str(alert.id),
                    outcome=Outcome.MINOR_FAILURE,
                    details={
                        "kind": kind,
                        "value": round(float(value), 4),
                        "bound": bound,
                        "model": metrics["model_ref"],
                        "clinic": clinic,
                    },
                )
                raised.append(alert)
    return raised


def _recent(session: Session, clinic: int, model_ref: str, kind: str, since: datetime) -> bool:
    return (
        session.execute(
            select(Alert.id).where(
                Alert.clinic_id == clinic,
                Alert.model_ref == model_ref,
                Alert.kind == kind,
                Alert.created_at >= since,
            )
        ).first()
        is not None
    )
