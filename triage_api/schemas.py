"""Request and response bodies. Requests forbid unknown fields (no mass assignment)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from triage_api.auth import Role
from triage_api.params import Id
from triage_api.tables import Appeal, Case, Prediction, Read
from triage_api.vocab import (
    AppealCategory,
    AppealOutcome,
    AppealStatus,
    CaseStatus,
    Finding,
    OverrideReason,
    PriorityReason,
    ReadKind,
    Tier,
)


class StudyCreated(BaseModel):
    id: str
    status: CaseStatus
    sha256: str
    received_at: datetime
    deadline: datetime


class PredictionRead(BaseModel):
    model_ref: str
    risk: float
    tier: Tier
    calibration_id: int | None
    attempt: int
    inference_ms: float
    created_at: datetime


class WorklistItem(BaseModel):
    id: str
    clinic_id: int
    status: CaseStatus
    reason: str | None
    ai_shown: bool = Field(
        description="Whether the AI result may be shown; false in shadow mode and for the AI-blind sample."
    )
    risk: float | None
    tier: Tier
    deadline: datetime
    waited_seconds: float
    model_version: str | None
    calibration_id: int | None = Field(description="The site calibration of the risk; null: the card's own.")
    claimed_by: int | None
    read_at: datetime | None


class CaseRead(WorklistItem):
    media_type: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    age_band: str | None
    received_at: datetime
    prediction: PredictionRead | None
    read: ReadOut | None
    result: ReadOut | None = Field(
        description="The result that stands now: an appeal's read unless the appeal upheld the first read."
    )


class ClinicResult(BaseModel):
    finding: Finding
    on_appeal: bool = Field(description="Whether an appeal's second read replaced the first read.")
    created_at: datetime


class ClinicCase(BaseModel):
    """What a clinic (uploader) sees of its case: where it stands and, once read, the result
    and any appeal's outcome. Never the AI score, the model, the heat map or who read it."""

    id: str
    clinic_id: int
    status: CaseStatus
    reason: str | None
    tier: Tier
    deadline: datetime
    received_at: datetime
    read_at: datetime | None
    result: ClinicResult | None
    appeal_outcome: AppealOutcome | None


def clinic_case(case: Case, history: list[tuple[Read, Appeal | None]], result: Read | None) -> ClinicCase:
    decided = [appeal.outcome for _, appeal in history if appeal is not None and appeal.outcome]
    return ClinicCase(
        id=case.id,
        clinic_id=case.clinic_id,
        status=case.status,
        reason=case.reason,
        tier=case.tier,
        deadline=case.deadline,
        received_at=case.received_at,
        read_at=case.read_at,
        result=ClinicResult(
            finding=result.finding, on_appeal=result.appeal_id is not None, created_at=result.created_at
        )
        if result
        else None,
        appeal_outcome=decided[-1] if decided else None,
    )


ClinicName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")]
"""A clinic's name: letters, digits, space, dot, underscore and hyphen, at most 100."""


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._@-]+$")
    role: Role
    clinics: list[ClinicName] = Field(default_factory=list, max_length=100)
    password: str | None = Field(
        None, min_length=12, max_length=200, description="Optional web-login password (stored as Argon2id)."
    )


class UserCreated(BaseModel):
    id: int
    name: str
    role: Role
    clinics: list[str]
    api_key: str = Field(description="Shown once; only its hash is stored.")


class UserState(BaseModel):
    id: int
    name: str
    disabled: bool
    sessions_ended: int = Field(description="Web sessions this change ended (a disable ends them all).")


class KeyRevoked(BaseModel):
    prefix: str
    revoked_at: datetime


class ReadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    finding: Finding
    agrees_with_ai: bool | None = None
    override_reason: OverrideReason | None = None
    note: str | None = Field(None, max_length=2000)
    ai_score_shown: bool = Field(description="Whether the AI score was on screen during the read.")


class ReadOut(BaseModel):
    id: int
    case_id: str
    reader_id: int
    kind: ReadKind
    finding: Finding
    agrees_with_ai: bool | None
    override_reason: OverrideReason | None
    ai_score_shown: bool
    created_at: datetime


class ClaimOut(BaseModel):
    case_id: str
    claimed_by: int | None
    claimed_at: datetime | None


class PriorityChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier: Tier
    reason: PriorityReason
    note: str | None = Field(None, max_length=2000)


class AppealCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    case_id: str = Field(min_length=1, max_length=32)
    category: AppealCategory
    grounds: str = Field(min_length=1, max_length=4000)
    contact_reference: str = Field(
        min_length=1,
        max_length=100,
        description="The clinic's own reference for the contact; no patient data.",
    )


class AppealAssign(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reader_id: Id


class AppealDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    finding: Finding = Field(description="The second reader's own finding; the outcome is derived from it.")
    rationale: str = Field(min_length=1, max_length=4000)


class AppealRead(BaseModel):
    id: int
    case_id: str
    clinic_id: int
    category: AppealCategory
    grounds: str
    contact_reference: str
    status: AppealStatus
    due_at: datetime
    assigned_to: int | None
    outcome: AppealOutcome | None
    rationale: str | None
    decided_at: datetime | None
    created_at: datetime
    second_read_finding: Finding | None


class BlindedCase(BaseModel):
    """The second reader's view: the study, without the AI score and without the first read."""

    appeal_id: int
    case_id: str
    media_type: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    age_band: str | None
    received_at: datetime


def worklist_item(case: Case, ai_shown: bool) -> WorklistItem:
    """A case's row; its AI fields only when ``ai_shown`` (:func:`triage_api.golive.ai_shown`)."""
    return WorklistItem(
        id=case.id,
        clinic_id=case.clinic_id,
        status=case.status,
        reason=case.reason,
        ai_shown=ai_shown,
        risk=case.risk if ai_shown else None,
        tier=case.tier,
        deadline=case.deadline,
        waited_seconds=round((datetime.now(UTC) - case.received_at).total_seconds(), 3),
        model_version=case.model_ref if ai_shown else None,
        calibration_id=case.calibration_id if ai_shown else None,
        claimed_by=case.claimed_by,
        read_at=case.read_at,
    )


def case_read(
    case: Case, prediction: Prediction | None, read: Read | None, ai_shown: bool, result: Read | None
) -> CaseRead:
    return CaseRead(
        **worklist_item(case, ai_shown).model_dump(),
        media_type=case.media_type,
        modality=case.modality,
        body_part=case.body_part,
        view_position=case.view_position,
        age_band=case.age_band,
        received_at=case.received_at,
        prediction=(
            PredictionRead.model_validate(prediction, from_attributes=True)
            if prediction is not None and ai_shown
            else None
        ),
        read=ReadOut.model_validate(read, from_attributes=True) if read else None,
        result=ReadOut.model_validate(result, from_attributes=True) if result else None,
    )
