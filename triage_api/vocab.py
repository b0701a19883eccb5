"""The service's vocabularies: every status, tier and reason a case, job, read or appeal can have.

One home, so that table columns, request and response schemas, query parameters, web
forms, charts and the health view agree, and the type checker sees a misspelt value.
Each is a :class:`~enum.StrEnum`: a member *is* its string, so the database and the API
keep the plain strings they always had.
"""

from __future__ import annotations

from enum import StrEnum


class CaseStatus(StrEnum):
    """Where a case is on its way to a score."""

    QUEUED = "queued"
    RUNNING = "running"
    SCORED = "scored"
    NOT_ANALYZED = "not_analyzed"
    """Outside the model's intended use (modality, body part): no score, a reason."""
    FAILED = "failed"


class JobStatus(StrEnum):
    """A scoring job in the queue (:mod:`triage_api.jobs`)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    DEAD = "dead"
    """Gave up after ``max_attempts``: a dead letter, its case ``failed``."""


class Tier(StrEnum):
    """Reading priority; each tier has its deadline (:mod:`triage_api.priority`)."""

    CRITICAL = "critical"
    ELEVATED = "elevated"
    ROUTINE = "routine"


class Finding(StrEnum):
    """A radiologist's finding."""

    NORMAL = "normal"
    PNEUMONIA = "pneumonia"
    OTHER_FINDING = "other_finding"
    NON_DIAGNOSTIC = "non_diagnostic"


class OverrideReason(StrEnum):
    """Why a reader disagreed with the AI."""

    FALSE_POSITIVE = "false_positive"
    FALSE_NEGATIVE = "false_negative"
    IMAGE_QUALITY = "image_quality"
    OUTSIDE_INTENDED_USE = "outside_intended_use"
    CLINICAL_CONTEXT = "clinical_context"
    OTHER = "other"


class PriorityReason(StrEnum):
    """Why a reader moved a case to another tier by hand."""

    CLINICAL_URGENCY = "clinical_urgency"
    CLINICAL_CONTEXT = "clinical_context"
    IMAGE_QUALITY = "image_quality"
    REQUESTED_BY_CLINIC = "requested_by_clinic"
    OTHER = "other"


class ReadKind(StrEnum):
    PRIMARY = "primary"
    APPEAL = "appeal"


class AppealCategory(StrEnum):
    READ_TOO_LATE = "read_too_late"
    DISAGREE_WITH_RESULT = "disagree_with_result"
    AI_SHOULD_NOT_HAVE_BEEN_APPLIED = "ai_should_not_have_been_applied"
    OTHER = "other"


class AppealStatus(StrEnum):
    OPEN = "open"
    ASSIGNED = "assigned"
    DECIDED = "decided"


class AppealOutcome(StrEnum):
    """About the original result: upheld (it stands), overturned (changed), partially (amended)."""

    UPHELD = "upheld"
    OVERTURNED = "overturned"
    PARTIALLY = "partially"


class AiMode(StrEnum):
    """What a clinic's readers get from the AI (:mod:`triage_api.golive`)."""

    LIVE = "live"
    """Scored, shown, and the score sets the tier (except the AI-blind sample)."""
    SHADOW = "shadow"
    """Scored and stored, never shown; the worklist keeps its non-AI order."""
    OFF = "off"
    """Not scored: the case is ``not_analyzed`` with the reason "ai off"."""


class CalibrationStatus(StrEnum):
    """A site calibration (or model promotion) on its way through the two-person rule."""

    PROPOSED = "proposed"
    APPROVED = "approved"
    """The one in force for its clinic and model version."""
    REJECTED = "rejected"
    SUPERSEDED = "superseded"
    """Was in force until a later one was approved."""
    ROLLED_BACK = "rolled_back"


class WebhookEvent(StrEnum):
    """What a webhook subscription can be told (``webhooks.py``); never patient data."""

    CASE_CRITICAL = "case.critical"
    """Scored critical (sent from the scoring transaction)."""
    CASE_NOT_ANALYZED = "case.not_analyzed"
    """Outside the model's intended use: a person must look without an AI score."""
    CASE_OVERDUE = "case.overdue"
    """Still unread ``webhook_overdue_minutes`` after its deadline (once per case)."""
    APPEAL_DECIDED = "appeal.decided"
    MODEL_ALERT = "model.alert"
    """A monitoring bound crossed (override rate, score drift)."""
