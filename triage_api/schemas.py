"""Request and response bodies. Requests forbid unknown fields (no mass assignment)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from triage_api.auth import Role


class StudyCreated(BaseModel):
    id: str
    status: str
    sha256: str
    received_at: datetime
    deadline: datetime


class PredictionRead(BaseModel):
    model_ref: str
    risk: float
    tier: str
    attempt: int
    inference_ms: float
    created_at: datetime


class WorklistItem(BaseModel):
    id: str
    clinic_id: int
    status: str
    reason: str | None
    risk: float | None
    tier: str
    deadline: datetime
    waited_seconds: float
    model_version: str | None


class CaseRead(WorklistItem):
    media_type: str
    modality: str | None
    body_part: str | None
    received_at: datetime
    prediction: PredictionRead | None


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._@-]+$")
    role: Role
    clinics: list[str] = Field(default_factory=list, max_length=100)


class UserCreated(BaseModel):
    id: int
    name: str
    role: Role
    clinics: list[str]
    api_key: str = Field(description="Shown once; only its hash is stored.")


class KeyRevoked(BaseModel):
    prefix: str
    revoked_at: datetime
