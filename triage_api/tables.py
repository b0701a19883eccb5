"""ORM tables (SQLAlchemy 2). The schema itself is created by Alembic migrations."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from triage_api.vocab import (
    AiMode,
    AppealCategory,
    AppealOutcome,
    AppealStatus,
    CalibrationStatus,
    CaseStatus,
    Finding,
    JobStatus,
    OverrideReason,
    PriorityReason,
    ReadKind,
    Tier,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class Clinic(Base):
    __tablename__ = "clinics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ai_mode: Mapped[AiMode] = mapped_column(String(10), default=AiMode.LIVE, server_default="live")
    """``live`` by default, so that a deployed clinic keeps today's behaviour (:mod:`triage_api.golive`)."""
    blind_sample_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    """In ``live``: the share of studies scored but read without the AI (the feedback-loop guard);
    None: the site's ``Settings.blind_sample_rate``."""


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    password_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)
    """Argon2id hash for the web login; None means the user signs in with API keys only."""
    clinics: Mapped[list[Clinic]] = relationship(secondary="user_clinics", lazy="selectin")


class UserClinic(Base):
    """Which clinics a user acts for: one for an uploader, several for readers."""

    __tablename__ = "user_clinics"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), primary_key=True)


class ApiKey(Base):
    """An API key: a public lookup prefix and the sha256 of the secret part, nothing else."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    user: Mapped[User] = relationship(lazy="joined")


class WebSession(Base):
    """A browser session: only the sha256 of its 256-bit token is stored, never the token."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)


class Case(Base):
    """One uploaded study and where it stands. Never deleted: triage reorders, it never removes."""

    __tablename__ = "cases"
    __table_args__ = (
        UniqueConstraint("clinic_id", "sha256", name="uq_cases_clinic_content"),
        Index("ix_cases_clinic_deadline", "clinic_id", "deadline"),
        # The worklist's order, and its "unread" subset (migration 0007).
        Index("ix_cases_worklist_order", "deadline", "received_at", "id"),
        Index(
            "ix_cases_unread_deadline",
            "deadline",
            "received_at",
            "id",
            postgresql_where=text("read_at IS NULL"),
            sqlite_where=text("read_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(40))
    size_bytes: Mapped[int] = mapped_column(Integer)
    status: Mapped[CaseStatus] = mapped_column(String(20), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deadline: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    tier: Mapped[Tier] = mapped_column(String(20))
    risk: Mapped[float | None] = mapped_column(Float, nullable=True)
    model_ref: Mapped[str | None] = mapped_column(String(100), nullable=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    body_part: Mapped[str | None] = mapped_column(String(64), nullable=True)
    view_position: Mapped[str | None] = mapped_column(String(16), nullable=True)
    age_band: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """Coarse band (``ingest.AGE_BANDS``); no exact age or date of birth is stored."""
    patient_pseudonym: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True)
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    study_description: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """DICOM StudyDescription (migration 0015): shown to the case's readers only, like the
    accession number; it may hold free text, so it goes into no log, audit detail or API answer."""
    uploaded_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    claimed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    """When the primary read was recorded; None while unread."""
    ai_hidden: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    """Scored with the AI withheld (shadow mode or the AI-blind sample): its reads are AI-blind."""
    calibration_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """The site calibration the shown risk was computed under; None: the model card's own."""


class Job(Base):
    """The scoring work item of a case, claimed by a worker under a lease."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), unique=True)
    status: Mapped[JobStatus] = mapped_column(String(20), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    available_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Prediction(Base):
    """One model output for one attempt; ``(case_id, attempt)`` is unique (fencing)."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("case_id", "attempt", name="uq_predictions_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    model_ref: Mapped[str] = mapped_column(String(100))
    risk: Mapped[float] = mapped_column(Float)
    tier: Mapped[Tier] = mapped_column(String(20))
    inference_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    logit: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Log-odds of the model card's probability, before any site calibration: a calibration
    applies to it later without running the network again."""
    calibration_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ai_hidden: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class Read(Base):
    """A radiologist's final read of a case: the primary read, or an appeal's second read."""

    __tablename__ = "reads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[ReadKind] = mapped_column(String(20))
    appeal_id: Mapped[int | None] = mapped_column(ForeignKey("appeals.id"), nullable=True)
    finding: Mapped[Finding] = mapped_column(String(30))
    agrees_with_ai: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    override_reason: Mapped[OverrideReason | None] = mapped_column(String(30), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    ai_score_shown: Mapped[bool] = mapped_column(Boolean)
    ai_risk: Mapped[float | None] = mapped_column(Float, nullable=True)
    """The risk the case carried when read (what the reader was shown, if shown)."""
    model_ref: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Reprioritisation(Base):
    """A deadline moved by hand: always with a reason."""

    __tablename__ = "reprioritisations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    old_deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    new_deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    reason: Mapped[PriorityReason] = mapped_column(String(30))
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Appeal(Base):
    """A clinic's appeal, on behalf of its patient, for an independent second read."""

    __tablename__ = "appeals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), index=True)
    filed_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    category: Mapped[AppealCategory] = mapped_column(String(40))
    grounds: Mapped[str] = mapped_column(Text)
    contact_reference: Mapped[str] = mapped_column(String(100))
    status: Mapped[AppealStatus] = mapped_column(String(20), index=True)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    assigned_to: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True, index=True)
    outcome: Mapped[AppealOutcome | None] = mapped_column(String(20), nullable=True)
    rationale: Mapped[str | None] = mapped_column(Text, nullable=True)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Alert(Base):
    """A monitoring bound crossed: override rate or score drift, per clinic and model version."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), index=True)
    model_ref: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(30))
    value: Mapped[float] = mapped_column(Float)
    bound: Mapped[float] = mapped_column(Float)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    window_end: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class WorkerBeat(Base):
    """A worker's heartbeat: who it is, what it runs, how much it did."""

    __tablename__ = "worker_beats"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    device: Mapped[str] = mapped_column(String(40))
    model_ref: Mapped[str] = mapped_column(String(100))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    batches: Mapped[int] = mapped_column(Integer)
    studies: Mapped[int] = mapped_column(Integer)
    batch_sizes: Mapped[str | None] = mapped_column(Text)
    """JSON ``{bucket upper bound: batches}`` over :data:`BATCH_BUCKETS` (``"+Inf"`` last)."""


class OutboxItem(Base):
    """One delivery leaving the service (an SR to a PACS, a webhook), see ``outbox.py``."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(30))
    target: Mapped[str] = mapped_column(String(200))
    """Which destination of that kind, e.g. a PACS peer or a webhook subscription id."""
    case_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    clinic_id: Mapped[int | None] = mapped_column(ForeignKey("clinics.id"), nullable=True)
    payload: Mapped[str] = mapped_column(Text)
    """JSON, free of patient data."""
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Calibration(Base):
    """A site calibration of one model version for one clinic: proposed, then decided by another person.

    ``risk = sigmoid((logit + bias) / temperature)`` on :attr:`Prediction.logit`, and tiers by
    ``critical``/``elevated``. A row with ``challenger_id`` set proposes promoting that
    challenger (with this calibration) instead.
    """

    __tablename__ = "calibrations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), index=True)
    model_ref: Mapped[str] = mapped_column(String(100))
    temperature: Mapped[float] = mapped_column(Float)
    bias: Mapped[float] = mapped_column(Float)
    critical: Mapped[float] = mapped_column(Float)
    elevated: Mapped[float] = mapped_column(Float)
    report: Mapped[str] = mapped_column(Text)
    """JSON: the targets, counts and the cross-validated before/after metrics (no PHI)."""
    status: Mapped[CalibrationStatus] = mapped_column(String(20), index=True)
    proposed_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    proposed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    decided_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    decision_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    previous_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """The calibration in force when this one was approved: what a rollback returns to."""
    challenger_id: Mapped[int | None] = mapped_column(ForeignKey("challengers.id"), nullable=True)


class Challenger(Base):
    """A second model version scoring a clinic's studies in shadow, next to the live one."""

    __tablename__ = "challengers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), index=True)
    model_ref: Mapped[str] = mapped_column(String(100))
    bundle_path: Mapped[str] = mapped_column(String(500))
    active: Mapped[bool] = mapped_column(Boolean)
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ChallengerScore(Base):
    """A challenger's score of one case: stored, never shown to a reader."""

    __tablename__ = "challenger_scores"
    __table_args__ = (UniqueConstraint("case_id", "challenger_id", name="uq_challenger_scores_case"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    challenger_id: Mapped[int] = mapped_column(ForeignKey("challengers.id"), index=True)
    model_ref: Mapped[str] = mapped_column(String(100))
    risk: Mapped[float] = mapped_column(Float)
    logit: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DicomPeer(Base):
    """A DICOM sender allowed to C-STORE studies for a clinic (calling AE title, optional address).

    Studies it sends are accepted as uploads of ``user_id``, a service user created with the
    peer (the uploader role, that clinic only), so every door records who sent a study the same way.
    """

    __tablename__ = "dicom_peers"
    __table_args__ = (UniqueConstraint("ae_title", "host", name="uq_dicom_peers_ae_host"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), index=True)
    ae_title: Mapped[str] = mapped_column(String(16), index=True)
    host: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The peer's IP address; None: any address."""
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PacsDestination(Base):
    """Where a clinic's AI results (DICOM SR) are C-STOREd: one PACS per clinic."""

    __tablename__ = "pacs_destinations"

    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WebhookSubscription(Base):
    """A clinic's endpoint subscribed to events; see ``webhooks.py``.

    The signing secret is stored sealed (AES-GCM under a key derived from the site secret,
    which lives outside the database), so a database dump cannot forge deliveries. During
    a rotation the previous secret signs too, until ``previous_until``.
    """

    __tablename__ = "webhook_subscriptions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), index=True)
    url: Mapped[str] = mapped_column(String(500))
    events: Mapped[str] = mapped_column(String(200))
    """Space-separated event names."""
    allow_insecure_local: Mapped[bool] = mapped_column(Boolean)
    sealed_secret: Mapped[str] = mapped_column(String(200))
    sealed_previous: Mapped[str | None] = mapped_column(String(200), nullable=True)
    previous_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    """Deleted subscriptions are kept (their delivery log stays readable) but never sent to."""


class WebhookNotice(Base):
    """An event found by the periodic sweep (overdue, appeal decided, model alert) that a
    subscription was already given: the primary key makes it once per subscription."""

    __tablename__ = "webhook_notices"

    subscription_id: Mapped[int] = mapped_column(ForeignKey("webhook_subscriptions.id"), primary_key=True)
    event: Mapped[str] = mapped_column(String(30), primary_key=True)
    object_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class LiveEvent(Base):
    """One change the live worklist streams (``live.py``); its id is the SSE event id."""

    __tablename__ = "live_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), index=True)
    case_id: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(30))
    tier: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
