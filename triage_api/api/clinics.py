"""Routes for taking a clinic live: AI mode, local validation, site calibrations, challengers.

The rules live in :mod:`triage_api.golive`; these routes check roles and clinic scope,
validate bodies and answer errors in the usual ``{"error": ...}`` shape.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from models.bundle import BundleError, ModelCard, read_card
from triage_api import golive
from triage_api.auth import Principal, Role
from triage_api.db import transaction
from triage_api.deps import Admin, RuntimeDep, allow
from triage_api.errors import Conflict, NotFound
from triage_api.settings import Settings
from triage_api.tables import Calibration, Clinic
from triage_api.vocab import AiMode

router = APIRouter()

Governor = Annotated[Principal, allow(Role.AUDITOR, Role.ADMIN)]
"""Auditors (for their clinics) and admins: read the evidence, decide another person's proposal."""

Reason = Field(min_length=1, max_length=1000)


class ModeChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: AiMode
    reason: str = Reason
    override_reason: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="Go live although the local validation is insufficient; recorded in the audit log.",
    )
    blind_sample_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of a live clinic's studies read without the AI."
    )


class ModeOut(BaseModel):
    clinic: str
    ai_mode: AiMode
    blind_sample_rate: float


class CalibrationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    critical_sensitivity: float = Field(0.95, gt=0.0, le=1.0)
    elevated_sensitivity: float = Field(0.99, gt=0.0, le=1.0)
    model: str | None = Field(
        None, max_length=100, description="A challenger's name@version: propose promoting it."
    )


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Reason


def live_card(settings: Settings) -> ModelCard:
    """The card of the model this site serves.

    Raises:
        Conflict: the bundle's card cannot be read.
    """
    try:
        return read_card(settings.model_path)
    except BundleError:
        raise Conflict("the served model's card cannot be read") from None


def _clinic(session: Any, principal: Principal, name: str) -> Clinic:
    clinic = golive.clinic_named(session, name)
    if not golive.in_scope(principal, clinic.id):
        raise NotFound("no such clinic")
    return clinic


def _now() -> datetime:
    return datetime.now(UTC)


@router.put("/v1/clinics/{clinic}/ai-mode", response_model=ModeOut)
def set_ai_mode(runtime: RuntimeDep, principal: Admin, clinic: str, body: ModeChange) -> ModeOut:
    """Put a clinic in ``shadow``, ``live`` or ``off``; going live needs a sufficient validation."""
    card = live_card(runtime.settings)
    with transaction(runtime.factory) as session:
        row = golive.set_mode(
            session,
            actor=principal.actor,
            clinic_name=clinic,
            mode=body.mode,
            reason=body.reason,
            override_reason=body.override_reason,
            card=card,
            settings=runtime.settings,
            blind_sample_rate=body.blind_sample_rate,
        )
        rate = golive.blind_rate(row, runtime.settings)
        return ModeOut(clinic=row.name, ai_mode=row.ai_mode, blind_sample_rate=rate)


@router.get("/v1/clinics/{clinic}/validation")
def get_validation(
    runtime: RuntimeDep,
    principal: Governor,
    clinic: str,
    model: Annotated[str | None, Query(max_length=100)] = None,
) -> dict[str, Any]:
    """Local validation on the clinic's AI-blind reads (default: the live model)."""
    card = live_card(runtime.settings)
    with transaction(runtime.factory) as session:
        report = golive.validation(
            session, clinic=_clinic(session, principal, clinic), card=card, model_ref=model
        )
        golive.audit_view(session, principal, "clinic.validation", report)
        return report


@router.get("/v1/clinics/{clinic}/comparison")
def get_comparison(
    runtime: RuntimeDep,
    principal: Governor,
    clinic: str,
    challenger: Annotated[str, Query(min_length=1, max_length=100)],
) -> dict[str, Any]:
    """A challenger against the live model on the same AI-blind reads, with a paired CI."""
    card = live_card(runtime.settings)
    with transaction(runtime.factory) as session:
        report = golive.compare(
            session, clinic=_clinic(session, principal, clinic), card=card, challenger_ref=challenger
        )
        golive.audit_view(session, principal, "clinic.comparison", report)
        return report


@router.post("/v1/clinics/{clinic}/calibrations", status_code=201)
def propose_calibration(
    runtime: RuntimeDep, principal: Admin, clinic: str, body: CalibrationRequest
) -> dict[str, Any]:
    """Fit a site calibration (or propose a challenger's promotion) for another person to decide."""
    card = live_card(runtime.settings)
    with transaction(runtime.factory) as session:
        row = golive.propose(
            session,
            principal=principal,
            clinic_name=clinic,
            card=card,
            critical_sensitivity=body.critical_sensitivity,
            elevated_sensitivity=body.elevated_sensitivity,
            model_ref=body.model,
            now=_now(),
        )
        return golive.calibration_out(row)


@router.get("/v1/clinics/{clinic}/calibrations")
def list_calibrations(runtime: RuntimeDep, principal: Governor, clinic: str) -> list[dict[str, Any]]:
    """The clinic's calibrations, newest first, with their decisions."""
    with runtime.reads() as session:
        found = _clinic(session, principal, clinic)
        rows = golive.calibrations_of(session, found.id)
        return [golive.calibration_out(row) for row in rows]


def _decide(
    runtime: Any, principal: Principal, calibration_id: int, body: Decision, approve: bool
) -> Calibration:
    card = live_card(runtime.settings)
    with transaction(runtime.factory) as session:
        return golive.decide(
            session,
            principal=principal,
            calibration_id=calibration_id,
            approve=approve,
            reason=body.reason,
            card=card,
            settings=runtime.settings,
            now=_now(),
        )


@router.post("/v1/calibrations/{calibration_id}/approve")
def approve(runtime: RuntimeDep, principal: Governor, calibration_id: int, body: Decision) -> dict[str, Any]:
    """Approve a proposal (not your own): it applies to new scores and re-tiers open cases."""
    return golive.calibration_out(_decide(runtime, principal, calibration_id, body, approve=True))


@router.post("/v1/calibrations/{calibration_id}/reject")
def reject(runtime: RuntimeDep, principal: Governor, calibration_id: int, body: Decision) -> dict[str, Any]:
    """Reject a proposal (not your own), with a reason."""
    return golive.calibration_out(_decide(runtime, principal, calibration_id, body, approve=False))


@router.post("/v1/calibrations/{calibration_id}/rollback")
def rollback(runtime: RuntimeDep, principal: Governor, calibration_id: int, body: Decision) -> dict[str, Any]:
    """Take the calibration in force out of force; the one before it (or the card's own) returns."""
    card = live_card(runtime.settings)
    with transaction(runtime.factory) as session:
        restored = golive.rollback(
            session,
            principal=principal,
            calibration_id=calibration_id,
            reason=body.reason,
            card=card,
            settings=runtime.settings,
            now=_now(),
        )
        row = session.get_one(Calibration, calibration_id)
        return {
            "rolled_back": golive.calibration_out(row),
            "in_force": golive.calibration_out(restored) if restored is not None else None,
        }
