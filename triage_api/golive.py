"""Go-live at a new site: AI mode, who sees the AI, local validation, site calibration, challengers.

A site first runs the model silently (``shadow``), measures it against its own
radiologists' AI-blind reads, calibrates it to its scanners and prevalence, and only then
lets it rank the worklist (``live``). A calibration, and the promotion of a challenger
model, is proposed by one person and approved by another; both are audited, and the one
in force can be rolled back.

Who sees the AI is decided in one place, :func:`ai_shown`: every surface (REST, pages,
heat maps, exports) asks it. A case scored in shadow, or drawn for the AI-blind sample of
a live clinic, never gets its risk, tier or model written on the case at all: the score
lives only in its :class:`~triage_api.tables.Prediction` row, marked ``ai_hidden``.

Labels for validation are *final* reads made without the AI on screen (the feedback-loop
guard): positive = pneumonia, negative = normal; other findings do not enter the metrics,
as in :mod:`triage_api.monitoring`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit, logsumexp
from sklearn.linear_model import LogisticRegression
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from audit.log import EventCode, record
from models.bundle import BundleError, ModelCard, Thresholds, read_card
from models.calibrate import operating_points
from models.metrics import bootstrap_aurocs
from triage_api.auth import Principal, Role
from triage_api.errors import Conflict, InvalidRequest, NotFound, NotPermitted
from triage_api.monitoring import auroc, bootstrap_ci, calibration
from triage_api.priority import rescored_deadline, routine_deadline, tier_of
from triage_api.settings import Settings
from triage_api.tables import (
    Calibration,
    Case,
    Challenger,
    ChallengerScore,
    Clinic,
    Prediction,
    Read,
    Reprioritisation,
)
from triage_api.vocab import AiMode, CalibrationStatus, Finding, Tier

AI_OFF_REASON = "ai off"
"""The ``not_analyzed`` reason of a study of a clinic whose AI is ``off``."""

MIN_READS, MIN_POSITIVES, MIN_NEGATIVES = 200, 30, 30
"""Local validation suffices for a decision with at least this many AI-blind reads, positive and negative."""

FOLDS = 5
"""Cross-validation folds for a calibration's before/after report."""


# --- modes and visibility ------------------------------------------------------------------


def clinic_named(session: Session, name: str) -> Clinic:
    """The clinic called ``name``.

    Raises:
        NotFound: no clinic of that name.
    """
    clinic = session.execute(select(Clinic).where(Clinic.name == name)).scalar_one_or_none()
    if clinic is None:
        raise NotFound("no such clinic")
    return clinic


def ai_modes(session: Session, clinic_ids: Iterable[int]) -> dict[int, AiMode]:
    """The AI mode of each of ``clinic_ids``."""
    ids = set(clinic_ids)
    if not ids:
        return {}
    rows = session.execute(select(Clinic.id, Clinic.ai_mode).where(Clinic.id.in_(ids))).all()
    return {clinic_id: AiMode(mode) for clinic_id, mode in rows}


def ai_shown(case: Case, mode: AiMode) -> bool:
    """The one rule for whether a reader may see ``case``'s AI result (score, tier, heat map, card).

    Only in a ``live`` clinic, and never for a case scored with the AI withheld (shadow, or
    the AI-blind sample): such a case stays AI-blind even after its clinic goes live.
    """
    return mode is AiMode.LIVE and not case.ai_hidden and case.risk is not None


def shown_cases(session: Session, cases: Iterable[Case]) -> set[str]:
    """The ids of ``cases`` whose AI result may be shown (:func:`ai_shown`), with one query."""
    listed = list(cases)
    modes = ai_modes(session, {c.clinic_id for c in listed})
    return {c.id for c in listed if ai_shown(c, modes.get(c.clinic_id, AiMode.LIVE))}


def blind_rate(clinic: Clinic, settings: Settings) -> float:
    """The clinic's AI-blind sample rate, or the site's default."""
    return clinic.blind_sample_rate if clinic.blind_sample_rate is not None else settings.blind_sample_rate


def withhold_ai(mode: AiMode, blind_rate: float, rng: random.Random) -> bool:
    """Whether a study about to be scored is scored with the AI withheld from its readers.

    Always in shadow; in live, for a random ``blind_rate`` share (the AI-blind sample that
    keeps monitoring from running only on labels the AI influenced).
    """
    return mode is AiMode.SHADOW or (mode is AiMode.LIVE and rng.random() < blind_rate)


def set_mode(
    session: Session,
    *,
    actor: str,
    clinic_name: str,
    mode: AiMode,
    reason: str,
    override_reason: str | None,
    card: ModelCard,
    settings: Settings,
    blind_sample_rate: float | None = None,
) -> Clinic:
    """Switch a clinic's AI mode, audited.

    Going ``live`` needs a local validation that suffices (:data:`MIN_READS` ...) of the
    model in force, or an explicit ``override_reason`` (recorded in the audit log).
    Leaving ``live`` withdraws the AI from the clinic's open cases (:func:`withdraw_ai`).

    Raises:
        NotFound: no such clinic.
        Conflict: going live on an insufficient validation without ``override_reason``.
    """
    clinic = clinic_named(session, clinic_name)
    before, mode = AiMode(clinic.ai_mode), AiMode(mode)
    details: dict[str, Any] = {"from": before, "to": mode, "reason": reason[:200]}
    if mode is AiMode.LIVE and before is not AiMode.LIVE:
        report = validation(session, clinic=clinic, card=card)
        details["validation"] = {k: report[k] for k in ("n_reads", "positives", "negatives", "sufficient")}
        if not report["sufficient"]:
            if not override_reason:
                raise Conflict(
                    f"local validation is insufficient ({report['rule']}: have {report['n_reads']} reads, "
                    f"{report['positives']} positive, {report['negatives']} negative); "
                    "give override_reason to go live anyway"
                )
            details["override_reason"] = override_reason[:200]
    if before is AiMode.LIVE and mode is not AiMode.LIVE:
        details["withdrawn"] = withdraw_ai(session, clinic_id=clinic.id, settings=settings)
    clinic.ai_mode = mode
    if blind_sample_rate is not None:
        details["blind_sample_rate"] = {"from": blind_rate(clinic, settings), "to": blind_sample_rate}
        clinic.blind_sample_rate = blind_sample_rate
    record(
        session,
        actor=actor,
        action="clinic.ai_mode",
        code=EventCode.SECURITY_ALERT,
        object_type="clinic",
        object_id=str(clinic.id),
        details=details,
    )
    return clinic


def withdraw_ai(session: Session, *, clinic_id: int, settings: Settings) -> int:
    """Hide the AI from the clinic's open scored cases, and give them back their non-AI deadline.

    Their risk, tier and model leave the case (the prediction row keeps them, marked
    hidden), so their reads become AI-blind; the order falls back to the routine SLA, or
    the reader's manual priority where there is one. Returns how many cases.
    """
    open_cases = list(
        session.execute(
            select(Case).where(Case.clinic_id == clinic_id, Case.read_at.is_(None), Case.risk.is_not(None))
        ).scalars()
    )
    ids = [case.id for case in open_cases]
    moved = set(
        session.execute(select(Reprioritisation.case_id).where(Reprioritisation.case_id.in_(ids))).scalars()
    )
    for case in open_cases:
        case.risk, case.model_ref, case.calibration_id, case.ai_hidden = None, None, None, True
        if case.id not in moved:
            case.tier, case.deadline = Tier.ROUTINE, routine_deadline(case.received_at, settings)
    if ids:
        session.execute(update(Prediction).where(Prediction.case_id.in_(ids)).values(ai_hidden=True))
    return len(open_cases)


# --- scores ---------------------------------------------------------------------------------


def log_odds(logits: np.ndarray, temperature: float, positive_index: int) -> np.ndarray:
    """Log-odds of the card's probability ``softmax(logits / T)[positive]``, stably, per row.

    What :attr:`Prediction.logit` stores: ``expit`` of it is the card's risk, and a site
    calibration is a logistic function of it.
    """
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    others = np.delete(scaled, positive_index, axis=1)
    result: np.ndarray = scaled[:, positive_index] - logsumexp(others, axis=1)
    return result


def calibrated(logit: np.ndarray | float, temperature: float, bias: float) -> np.ndarray:
    """``sigmoid((logit + bias) / temperature)``: the site's risk from the card's log-odds."""
    return np.asarray(expit((np.asarray(logit, dtype=np.float64) + bias) / temperature))


@dataclass(frozen=True)
class Scoring:
    """How a clinic's new scores are made: which model (the live one or a promoted challenger),
    and under which calibration and thresholds."""

    model_ref: str
    challenger_id: int | None
    calibration_id: int | None
    temperature: float
    bias: float
    thresholds: Thresholds

    def risk(self, logit: float) -> float:
        return float(calibrated(logit, self.temperature, self.bias))


def in_force(session: Session, clinic_id: int) -> Calibration | None:
    """The approved calibration (or promotion) of a clinic, if any."""
    return session.execute(
        select(Calibration).where(
            Calibration.clinic_id == clinic_id, Calibration.status == CalibrationStatus.APPROVED
        )
    ).scalar_one_or_none()


def scoring_for(calibration_row: Calibration | None, card: ModelCard) -> Scoring:
    """The :class:`Scoring` of a clinic: its calibration in force if it is for the live model
    or a challenger, else the card's own (temperature already in the logit, no bias)."""
    if calibration_row is not None and (
        calibration_row.model_ref == card.ref or calibration_row.challenger_id is not None
    ):
        return Scoring(
            calibration_row.model_ref,
            calibration_row.challenger_id,
            calibration_row.id,
            calibration_row.temperature,
            calibration_row.bias,
            Thresholds(critical=calibration_row.critical, elevated=calibration_row.elevated),
        )
    return Scoring(card.ref, None, None, 1.0, 0.0, card.thresholds)


# --- local validation -----------------------------------------------------------------------


@dataclass(frozen=True)
class Labelled:
    """AI-blind final reads of a clinic with one model's log-odds for the same cases."""

    case_ids: list[str]
    logits: np.ndarray
    labels: np.ndarray
    excluded_ai_shown: int
    """Reads left out because the AI was on screen (labels it may have influenced)."""


def _final_reads(session: Session, clinic_id: int) -> dict[str, Read]:
    """The final (latest) read of every read case of the clinic: an appeal's second read wins."""
    rows = session.execute(
        select(Read)
        .join(Case, Case.id == Read.case_id)
        .where(Case.clinic_id == clinic_id)
        .order_by(Read.created_at, Read.id)
    ).scalars()
    return {read.case_id: read for read in rows}


def model_logits(session: Session, clinic_id: int, model_ref: str) -> dict[str, float]:
    """``{case id: log-odds}`` of ``model_ref`` for the clinic's cases (live or challenger scores)."""
    scores: dict[str, float] = {}
    live = session.execute(
        select(Prediction.case_id, Prediction.logit)
        .join(Case, Case.id == Prediction.case_id)
        .where(Case.clinic_id == clinic_id, Prediction.model_ref == model_ref, Prediction.logit.is_not(None))
        .order_by(Prediction.attempt)
    ).all()
    for case_id, logit in live:
        if logit is not None:
            scores[case_id] = float(logit)
    shadow = session.execute(
        select(ChallengerScore.case_id, ChallengerScore.logit)
        .join(Case, Case.id == ChallengerScore.case_id)
        .where(Case.clinic_id == clinic_id, ChallengerScore.model_ref == model_ref)
    ).all()
    for case_id, logit in shadow:
        scores.setdefault(case_id, float(logit))
    return scores


def labelled(session: Session, clinic_id: int, model_ref: str, *, include_ai_shown: bool = False) -> Labelled:
    """The clinic's AI-blind final reads that ``model_ref`` scored, in a stable order."""
    reads = _final_reads(session, clinic_id)
    scores = model_logits(session, clinic_id, model_ref)
    ids, logits, labels, excluded = [], [], [], 0
    for case_id in sorted(reads):
        read = reads[case_id]
        if read.finding not in (Finding.PNEUMONIA, Finding.NORMAL) or case_id not in scores:
            continue
        if read.ai_score_shown and not include_ai_shown:
            excluded += 1
            continue
        ids.append(case_id)
        logits.append(scores[case_id])
        labels.append(1 if read.finding == Finding.PNEUMONIA else 0)
    return Labelled(ids, np.asarray(logits, dtype=float), np.asarray(labels, dtype=int), excluded)


def metrics(scores: np.ndarray, labels: np.ndarray, thresholds: Thresholds) -> dict[str, Any]:
    """AUROC (95% bootstrap CI), ECE with its bins, and sensitivity/specificity at each threshold."""
    value = auroc(scores, labels) if len(scores) else None

    def at(threshold: float) -> dict[str, float | None]:
        predicted = scores >= threshold
        positives, negatives = labels == 1, labels == 0
        return {
            "threshold": threshold,
            "sensitivity": float(predicted[positives].mean()) if positives.any() else None,
            "specificity": float((~predicted[negatives]).mean()) if negatives.any() else None,
        }

    return {
        "auroc": value,
        "auroc_ci95": bootstrap_ci(scores, labels) if value is not None else None,
        "calibration": calibration(scores, labels),
        "critical": at(thresholds.critical),
        "elevated": at(thresholds.elevated),
    }


def card_of(session: Session, clinic_id: int, model_ref: str, live: ModelCard) -> ModelCard:
    """The card of ``model_ref``: the live model's, or a challenger's from its bundle folder.

    Raises:
        NotFound: neither the live model nor a challenger of this clinic.
    """
    if model_ref == live.ref:
        return live
    row = session.execute(
        select(Challenger).where(Challenger.clinic_id == clinic_id, Challenger.model_ref == model_ref)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound("no such model version for this clinic")
    try:
        return read_card(Path(row.bundle_path))
    except BundleError:
        raise NotFound("the challenger's bundle is no longer on this server") from None


def sufficient(positives: int, negatives: int) -> bool:
    """Whether this many AI-blind reads suffice for a decision (:data:`MIN_READS` ...)."""
    return positives + negatives >= MIN_READS and positives >= MIN_POSITIVES and negatives >= MIN_NEGATIVES


def validation(
    session: Session, *, clinic: Clinic, card: ModelCard, model_ref: str | None = None
) -> dict[str, Any]:
    """Local validation of one model version (default: the live one) on the clinic's AI-blind reads."""
    ref = model_ref or card.ref
    model_card = card_of(session, clinic.id, ref, card)
    data = labelled(session, clinic.id, ref)
    positives = int(data.labels.sum())
    negatives = len(data.labels) - positives
    report: dict[str, Any] = {
        "clinic": clinic.name,
        "model_ref": ref,
        "ai_mode": clinic.ai_mode,
        "n_reads": len(data.labels),
        "positives": positives,
        "negatives": negatives,
        "prevalence": positives / len(data.labels) if len(data.labels) else None,
        "excluded_ai_shown": data.excluded_ai_shown,
        "rule": f">= {MIN_READS} AI-blind reads, >= {MIN_POSITIVES} positive and >= {MIN_NEGATIVES} negative",
        "sufficient": sufficient(positives, negatives),
        "card": metrics(expit(data.logits), data.labels, model_card.thresholds),
        "site_calibration": None,
    }
    current = in_force(session, clinic.id)
    if current is not None and current.model_ref == ref:
        scoring = scoring_for(current, card)
        report["site_calibration"] = {
            "id": current.id,
            **metrics(
                calibrated(data.logits, scoring.temperature, scoring.bias), data.labels, scoring.thresholds
            ),
        }
    return report


# --- calibration ----------------------------------------------------------------------------


def fit_temperature_bias(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Temperature and bias of ``sigmoid((logit + bias) / T)``: a logistic regression on the logit.

    Raises:
        InvalidRequest: one class only, or the model does not rank the cases (slope <= 0).
    """
    if len(set(labels.tolist())) < 2:
        raise InvalidRequest("calibration needs positive and negative reads")
    model = LogisticRegression(C=1e6, solver="lbfgs", max_iter=1000)
    model.fit(logits.reshape(-1, 1), labels)
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    if slope <= 1e-6:
        raise InvalidRequest("the model does not rank this clinic's cases; no calibration can help")
    return 1.0 / slope, intercept / slope


def _folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold number per case, stratified by label, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=int)
    for value in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == value))
        fold[members] = np.arange(len(members)) % k
    return fold


def propose_fit(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    critical_sensitivity: float,
    elevated_sensitivity: float,
    folds: int = FOLDS,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit temperature, bias and tier thresholds on all reads; report before/after on held-out folds.

    Each fold is scored by a calibration and thresholds fitted on the other folds, so the
    "after" numbers are on reads the fit did not see; "before" is the card's own risk.

    Raises:
        InvalidRequest: too few reads of a class to fit or to cross-validate.
    """
    positives = int(labels.sum())
    if min(positives, len(labels) - positives) < folds:
        raise InvalidRequest(f"calibration needs at least {folds} positive and {folds} negative reads")
    if elevated_sensitivity < critical_sensitivity:
        raise InvalidRequest("the elevated tier must be at least as sensitive as the critical one")
    fold = _folds(labels, folds, seed)
    held_out = np.empty(len(labels))
    hits = {"critical": np.zeros(len(labels), dtype=bool), "elevated": np.zeros(len(labels), dtype=bool)}
    for f in range(folds):
        train, test = fold != f, fold == f
        temperature, bias = fit_temperature_bias(logits[train], labels[train])
        points = operating_points(
            calibrated(logits[train], temperature, bias),
            labels[train],
            critical_sensitivity,
            elevated_sensitivity,
        )
        held_out[test] = calibrated(logits[test], temperature, bias)
        hits["critical"][test] = held_out[test] >= points.thresholds.critical
        hits["elevated"][test] = held_out[test] >= points.thresholds.elevated
    temperature, bias = fit_temperature_bias(logits, labels)
    final = operating_points(
        calibrated(logits, temperature, bias), labels, critical_sensitivity, elevated_sensitivity
    )
    before = expit(logits)

    def rates(hit: np.ndarray) -> dict[str, float]:
        return {
            "sensitivity": float(hit[labels == 1].mean()),
            "specificity": float((~hit[labels == 0]).mean()),
        }

    return {
        "temperature": temperature,
        "bias": bias,
        "critical": final.thresholds.critical,
        "elevated": final.thresholds.elevated,
        "targets": {
            "critical_sensitivity": critical_sensitivity,
            "elevated_sensitivity": elevated_sensitivity,
        },
        "n_reads": len(labels),
        "positives": positives,
        "cross_validation": {
            "folds": folds,
            "before": {"ece": calibration(before, labels)["ece"], "auroc": auroc(before, labels)},
            "after": {
                "ece": calibration(held_out, labels)["ece"],
                "auroc": auroc(held_out, labels),
                "critical": rates(hits["critical"]),
                "elevated": rates(hits["elevated"]),
            },
        },
    }


def _audit(session: Session, principal: Principal, action: str, row: Calibration, **details: Any) -> None:
    record(
        session,
        actor=principal.actor,
        action=action,
        code=EventCode.SECURITY_ALERT,
        object_type="calibration",
        object_id=str(row.id),
        details={"clinic": row.clinic_id, "model": row.model_ref, **details},
    )


def propose(
    session: Session,
    *,
    principal: Principal,
    clinic_name: str,
    card: ModelCard,
    critical_sensitivity: float,
    elevated_sensitivity: float,
    model_ref: str | None,
    now: datetime,
) -> Calibration:
    """Propose a site calibration of the live model, or the promotion of a challenger (``model_ref``).

    Raises:
        NotFound: no such clinic or model version.
        Conflict: a challenger worse than the live model beyond the paired 95% CI.
        InvalidRequest: too few AI-blind reads to fit.
    """
    clinic = clinic_named(session, clinic_name)
    ref = model_ref or card.ref
    challenger: Challenger | None = None
    details: dict[str, Any] = {}
    if ref != card.ref:
        card_of(session, clinic.id, ref, card)  # NotFound for an unknown version
        challenger = session.execute(
            select(Challenger).where(Challenger.clinic_id == clinic.id, Challenger.model_ref == ref)
        ).scalar_one()
        comparison = compare(session, clinic=clinic, card=card, challenger_ref=ref)
        details["comparison"] = comparison
        if comparison["worse_beyond_ci"]:
            low, high = comparison["ci95"]
            raise Conflict(
                "the challenger is worse than the live model beyond the 95% CI of the AUROC difference "
                f"({comparison['auroc_difference']:.3f}, CI {low:.3f} to {high:.3f})"
            )
    data = labelled(session, clinic.id, ref)
    fit = propose_fit(
        data.logits,
        data.labels,
        critical_sensitivity=critical_sensitivity,
        elevated_sensitivity=elevated_sensitivity,
    )
    fit["excluded_ai_shown"] = data.excluded_ai_shown
    fit["sufficient"] = sufficient(fit["positives"], fit["n_reads"] - fit["positives"])
    fit.update(details)
    row = Calibration(
        clinic_id=clinic.id,
        model_ref=ref,
        temperature=fit["temperature"],
        bias=fit["bias"],
        critical=fit["critical"],
        elevated=fit["elevated"],
        report=json.dumps(fit, sort_keys=True),
        status=CalibrationStatus.PROPOSED,
        proposed_by=principal.user_id,
        proposed_at=now,
        challenger_id=challenger.id if challenger is not None else None,
    )
    session.add(row)
    session.flush()
    _audit(
        session,
        principal,
        "calibration.propose",
        row,
        temperature=round(row.temperature, 6),
        bias=round(row.bias, 6),
        promotion=challenger is not None,
        n_reads=fit["n_reads"],
    )
    return row


def in_scope(principal: Principal, clinic_id: int) -> bool:
    """An admin governs every clinic; an auditor only the clinics they act for."""
    return principal.role is Role.ADMIN or clinic_id in principal.clinic_ids


def _decidable(session: Session, principal: Principal, calibration_id: int) -> Calibration:
    row = session.get(Calibration, calibration_id)
    if row is None or not in_scope(principal, row.clinic_id):
        raise NotFound("no such calibration")
    return row


def _lock_clinic(session: Session, clinic_id: int) -> None:
    """Serialise decisions per clinic, so that two approvals at once cannot both be in force
    (PostgreSQL row lock; SQLite transactions already take the write lock at BEGIN)."""
    session.execute(select(Clinic.id).where(Clinic.id == clinic_id).with_for_update())


def decide(
    session: Session,
    *,
    principal: Principal,
    calibration_id: int,
    approve: bool,
    reason: str,
    card: ModelCard,
    settings: Settings,
    now: datetime,
) -> Calibration:
    """Approve or reject a proposal: by a different person than the one who proposed it.

    Approved, it is in force for new scores and the clinic's open cases are re-tiered
    (:func:`retier`); the one it replaces is kept for :func:`rollback`.

    Raises:
        NotFound: not a calibration of the caller's clinics.
        NotPermitted: the caller proposed it (two-person rule).
        Conflict: already decided.
    """
    row = _decidable(session, principal, calibration_id)
    _lock_clinic(session, row.clinic_id)
    session.refresh(row)  # as it is now that no other decision is under way
    if row.proposed_by == principal.user_id:
        raise NotPermitted("the proposer cannot decide their own proposal; another person must")
    if row.status != CalibrationStatus.PROPOSED:
        raise Conflict(f"the calibration is already {row.status}")
    row.decided_by, row.decided_at, row.decision_reason = principal.user_id, now, reason
    if not approve:
        row.status = CalibrationStatus.REJECTED
        _audit(session, principal, "calibration.reject", row, reason=reason[:200])
        return row
    current = in_force(session, row.clinic_id)
    if current is not None:
        current.status = CalibrationStatus.SUPERSEDED
        row.previous_id = current.id
    row.status = CalibrationStatus.APPROVED
    session.flush()
    moved = retier(session, clinic_id=row.clinic_id, card=card, settings=settings)
    _audit(
        session, principal, "calibration.approve", row, reason=reason[:200], previous=row.previous_id, **moved
    )
    return row


def rollback(
    session: Session,
    *,
    principal: Principal,
    calibration_id: int,
    reason: str,
    card: ModelCard,
    settings: Settings,
    now: datetime,
) -> Calibration | None:
    """Take the calibration in force out of force and return to the one before it (or the card's own).

    Returns:
        The calibration in force afterwards; None for the card's own.

    Raises:
        NotFound: not a calibration of the caller's clinics.
        Conflict: it is not the one in force.
    """
    row = _decidable(session, principal, calibration_id)
    _lock_clinic(session, row.clinic_id)
    session.refresh(row)  # as it is now that no other decision is under way
    if row.status != CalibrationStatus.APPROVED:
        raise Conflict(f"only the calibration in force can be rolled back; this one is {row.status}")
    row.status = CalibrationStatus.ROLLED_BACK
    previous = session.get(Calibration, row.previous_id) if row.previous_id is not None else None
    if previous is not None:
        previous.status = CalibrationStatus.APPROVED
    session.flush()
    moved = retier(session, clinic_id=row.clinic_id, card=card, settings=settings)
    _audit(
        session,
        principal,
        "calibration.rollback",
        row,
        reason=reason[:200],
        restored=previous.id if previous is not None else None,
        at=now.isoformat(),
        **moved,
    )
    return previous


def retier(session: Session, *, clinic_id: int, card: ModelCard, settings: Settings) -> dict[str, int]:
    """Re-score the clinic's open, AI-shown cases under the scoring now in force.

    Earlier, never later (:func:`triage_api.priority.rescored_deadline`); a case a reader
    moved by hand keeps the reader's tier. Uses the stored log-odds: no network runs.

    Returns:
        ``{"retiered": cases re-scored, "earlier": deadlines moved earlier}``.
    """
    scoring = scoring_for(in_force(session, clinic_id), card)
    manual = select(Reprioritisation.case_id)
    open_cases = list(
        session.execute(
            select(Case).where(
                Case.clinic_id == clinic_id,
                Case.read_at.is_(None),
                Case.risk.is_not(None),
                Case.ai_hidden.is_(False),
                Case.id.not_in(manual),
            )
        ).scalars()
    )
    logits = _scoring_logits(session, [c.id for c in open_cases], scoring)
    retiered = earlier = 0
    for case in open_cases:
        logit = logits.get(case.id)
        if logit is None:
            continue
        risk = scoring.risk(logit)
        tier = tier_of(risk, scoring.thresholds)
        deadline = rescored_deadline(case.deadline, case.received_at, tier, settings)
        earlier += deadline < case.deadline
        case.risk, case.tier, case.deadline = risk, tier, deadline
        case.model_ref, case.calibration_id = scoring.model_ref, scoring.calibration_id
        retiered += 1
    return {"retiered": retiered, "earlier": earlier}


def _scoring_logits(session: Session, case_ids: list[str], scoring: Scoring) -> dict[str, float]:
    if not case_ids:
        return {}
    if scoring.challenger_id is not None:
        rows = session.execute(
            select(ChallengerScore.case_id, ChallengerScore.logit).where(
                ChallengerScore.case_id.in_(case_ids), ChallengerScore.challenger_id == scoring.challenger_id
            )
        ).all()
        return {case_id: float(logit) for case_id, logit in rows}
    latest: dict[str, float] = {}
    for case_id, logit in session.execute(
        select(Prediction.case_id, Prediction.logit)
        .where(
            Prediction.case_id.in_(case_ids),
            Prediction.model_ref == scoring.model_ref,
            Prediction.logit.is_not(None),
        )
        .order_by(Prediction.attempt)
    ).all():
        if logit is not None:
            latest[case_id] = float(logit)
    return latest


def calibrations_of(session: Session, clinic_id: int) -> list[Calibration]:
    """A clinic's calibrations and promotions, newest first."""
    return list(
        session.execute(
            select(Calibration).where(Calibration.clinic_id == clinic_id).order_by(Calibration.id.desc())
        ).scalars()
    )


def audit_view(session: Session, principal: Principal, action: str, report: dict[str, Any]) -> None:
    """Record that ``principal`` looked at a validation or comparison report (110112)."""
    record(
        session,
        actor=principal.actor,
        action=action,
        code=EventCode.QUERY,
        object_type="clinic",
        object_id=str(report["clinic"])[:64],
        details={"n_reads": report["n_reads"]},
    )


def calibration_out(row: Calibration) -> dict[str, Any]:
    """A calibration as the API shows it (no PHI: ids, numbers, the decision)."""
    return {
        "id": row.id,
        "clinic_id": row.clinic_id,
        "model_ref": row.model_ref,
        "status": row.status,
        "temperature": row.temperature,
        "bias": row.bias,
        "thresholds": {"critical": row.critical, "elevated": row.elevated},
        "report": json.loads(row.report),
        "proposed_by": row.proposed_by,
        "proposed_at": row.proposed_at.isoformat(),
        "decided_by": row.decided_by,
        "decided_at": row.decided_at.isoformat() if row.decided_at else None,
        "decision_reason": row.decision_reason,
        "previous_id": row.previous_id,
        "challenger_id": row.challenger_id,
    }


# --- challengers ----------------------------------------------------------------------------


def add_challenger(
    session: Session, *, actor: str, clinic_name: str, bundle_path: Path, live: ModelCard, now: datetime
) -> Challenger:
    """Let the worker also score ``clinic_name``'s studies with the bundle at ``bundle_path``, in shadow.

    The challenger is scored in the live model's batch, so it must read the same input.

    Raises:
        NotFound: no such clinic.
        InvalidRequest: not a valid bundle, the live model itself, or other preprocessing.
    """
    clinic = clinic_named(session, clinic_name)
    try:
        card = read_card(bundle_path)
    except BundleError as exc:
        raise InvalidRequest(f"not a model bundle: {exc}") from None
    if card.ref == live.ref:
        raise InvalidRequest("that is the live model")
    if card.preprocessing != live.preprocessing:
        raise InvalidRequest(
            "a challenger must take the live model's preprocessing (it is scored in the same batch)"
        )
    row = session.execute(
        select(Challenger).where(Challenger.clinic_id == clinic.id, Challenger.model_ref == card.ref)
    ).scalar_one_or_none()
    if row is None:
        row = Challenger(clinic_id=clinic.id, model_ref=card.ref, created_by=actor, created_at=now)
        session.add(row)
    row.bundle_path, row.active = str(bundle_path.resolve()), True
    session.flush()
    record(
        session,
        actor=actor,
        action="challenger.add",
        code=EventCode.SECURITY_ALERT,
        object_type="challenger",
        object_id=str(row.id),
        details={"clinic": clinic.id, "model": card.ref},
    )
    return row


def stop_challenger(session: Session, *, actor: str, clinic_name: str, model_ref: str) -> Challenger:
    """Stop scoring a clinic's studies with a challenger (its scores so far are kept), audited.

    Raises:
        NotFound: no such challenger for the clinic.
        Conflict: its promotion is in force (roll that back first).
    """
    clinic = clinic_named(session, clinic_name)
    row = session.execute(
        select(Challenger).where(Challenger.clinic_id == clinic.id, Challenger.model_ref == model_ref)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound("no such challenger for this clinic")
    current = in_force(session, clinic.id)
    if current is not None and current.challenger_id == row.id:
        raise Conflict("this challenger's promotion is in force; roll it back first")
    row.active = False
    record(
        session,
        actor=actor,
        action="challenger.stop",
        code=EventCode.SECURITY_ALERT,
        object_type="challenger",
        object_id=str(row.id),
        details={"clinic": clinic.id, "model": row.model_ref},
    )
    return row


def paired_auroc_difference(
    labels: np.ndarray, challenger: np.ndarray, live: np.ndarray, rounds: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """AUROC of challenger minus live on the same cases, with a paired 95% bootstrap CI.

    Both bootstraps draw the same resamples (same seed, same labels), so each difference
    is taken on one resample of cases: the pairing.
    """
    point = (auroc(challenger, labels) or 0.0) - (auroc(live, labels) or 0.0)
    differences = bootstrap_aurocs(labels, challenger, rounds, seed) - bootstrap_aurocs(
        labels, live, rounds, seed
    )
    if len(differences) < rounds // 2:
        return {"auroc_difference": point, "ci95": None, "worse_beyond_ci": False, "better_beyond_ci": False}
    low, high = (float(v) for v in np.percentile(differences, [2.5, 97.5]))
    return {
        "auroc_difference": point,
        "ci95": [low, high],
        "worse_beyond_ci": high < 0.0,
        "better_beyond_ci": low > 0.0,
    }


def compare(session: Session, *, clinic: Clinic, card: ModelCard, challenger_ref: str) -> dict[str, Any]:
    """The challenger against the live model on the same AI-blind reads (cases both scored)."""
    card_of(session, clinic.id, challenger_ref, card)
    live = labelled(session, clinic.id, card.ref)
    other = model_logits(session, clinic.id, challenger_ref)
    keep = [i for i, case_id in enumerate(live.case_ids) if case_id in other]
    labels = live.labels[keep]
    live_scores = expit(live.logits[keep])
    challenger_scores = expit(np.asarray([other[live.case_ids[i]] for i in keep], dtype=float))
    result = {
        "clinic": clinic.name,
        "live": card.ref,
        "challenger": challenger_ref,
        "n_reads": len(keep),
        "positives": int(labels.sum()),
        "excluded_ai_shown": live.excluded_ai_shown,
        "live_auroc": auroc(live_scores, labels) if len(keep) else None,
        "challenger_auroc": auroc(challenger_scores, labels) if len(keep) else None,
    }
    if len(set(labels.tolist())) < 2:
        return {
            **result,
            "auroc_difference": None,
            "ci95": None,
            "worse_beyond_ci": False,
            "better_beyond_ci": False,
        }
    return {**result, **paired_auroc_difference(labels, challenger_scores, live_scores)}
