"""Service settings, read from ``TRIAGE_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "bundles" / "cxr-pneumonia-lite0"


class Settings(BaseSettings):
    """Everything a site can configure. Nothing here is read at import time."""

    model_config = SettingsConfigDict(env_prefix="TRIAGE_", extra="forbid")

    data_dir: Path = Path("./var")
    database_url: str | None = None
    """SQLAlchemy URL; empty means SQLite at ``<data_dir>/triage.db``."""
    model_path: Path = DEFAULT_BUNDLE
    device: str = "cpu"
    compile_model: bool = False
    """``torch.compile`` the served network (worth it on a GPU for long-running workers)."""
    torch_threads: int = Field(0, ge=0, le=1024)
    """CPU threads for the forward pass; 0: ``OMP_NUM_THREADS`` if set, else the cores this
    process may use (its CPU affinity, capped by a container's cgroup CPU quota)."""

    host: str = "127.0.0.1"
    port: int = 8000

    max_upload_bytes: int = Field(64 * 1024 * 1024, gt=0)
    """Largest request body accepted by ``POST /v1/studies``."""
    max_decoded_bytes: int = Field(256 * 1024 * 1024, gt=0)
    """Pixel budget: Rows x Columns x Frames x Samples x bytes per sample, from the header."""

    uploads_per_minute: float = Field(1200, gt=0)
    """Per clinic, per API process; bursts up to ``upload_burst``."""
    upload_burst: int = Field(200, ge=1)

    outbox_poll_seconds: float = Field(1.0, gt=0, le=3600)
    """How often due outbox deliveries (DICOM SR, webhooks) are sent."""

    run_worker: bool = True
    """Run the scoring worker inside the API process (the embedded default)."""
    lease_seconds: float = Field(120.0, gt=0)
    poll_seconds: float = Field(0.5, gt=0)
    max_attempts: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1, le=1024)
    """Jobs a worker claims and scores in one forward pass."""
    batch_wait_ms: float = Field(10.0, ge=0, le=10_000)
    """When fewer than ``batch_size`` jobs are waiting, how long a worker waits once for
    more before scoring what it has (0: never waits)."""
    decode_workers: int = Field(0, ge=0, le=256)
    """Processes that decode studies, one batch ahead of the forward pass; 0 decodes in
    the worker's thread (no time bound then). See the README's "Workers"."""
    decode_timeout_seconds: float = Field(60.0, gt=0)
    """Per study, in a decode process: beyond it the study fails and the process is replaced."""

    sla_critical_minutes: float = Field(30, gt=0)
    sla_elevated_minutes: float = Field(240, gt=0)
    sla_routine_minutes: float = Field(1440, gt=0)

    appeal_due_hours: float = Field(72, gt=0)

    claim_expiry_minutes: float = Field(30, gt=0)
    """A reader's claim on a case older than this no longer blocks others (audited when it lapses)."""

    monitor_interval_seconds: float = Field(900, gt=0)
    """How often the service checks the monitoring bounds below."""
    monitor_window_hours: float = Field(168, gt=0)
    alert_override_rate: float = Field(0.3, gt=0, le=1)
    alert_drift_psi: float = Field(0.25, gt=0)
    alert_min_reads: int = Field(20, ge=1)

    audit_key_file: Path | None = None
    """Ed25519 key that signs audit checkpoints; empty means ``<data_dir>/secrets/audit-ed25519.key``.
    Keep it outside the database (and its backups)."""
    audit_checkpoint_copy: Path | None = None
    """Append-only copy of every checkpoint, outside the database; empty means
    ``audit-checkpoints.jsonl`` next to the key file. Back it up apart from the database."""
    audit_checkpoint_events: int = Field(1000, ge=1)
    audit_checkpoint_seconds: float = Field(300, gt=0)

    web_idle_minutes: float = Field(30, gt=0)
    """A browser session ends after this long without a request."""
    web_session_hours: float = Field(12, gt=0)
    """A browser session ends this long after login, however active."""
    web_secure_cookie: bool = False
    """Mark the session cookie Secure even when the app sees plain http (TLS ends at a proxy);
    it is always Secure when the request itself is https."""
    web_login_failures: int = Field(5, ge=1)
    """Failed logins per username within ``web_login_window_minutes`` before it is throttled."""
    web_login_window_minutes: float = Field(15, gt=0)

    @model_validator(mode="after")
    def _slas_ordered(self) -> Settings:
        if not self.sla_critical_minutes <= self.sla_elevated_minutes <= self.sla_routine_minutes:
            raise ValueError("SLAs must satisfy critical <= elevated <= routine")
        return self

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def secret_dir(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def audit_key_path(self) -> Path:
        return self.audit_key_file or self.secret_dir / "audit-ed25519.key"

    @property
    def audit_copy_path(self) -> Path:
        return self.audit_checkpoint_copy or self.audit_key_path.parent / "audit-checkpoints.jsonl"

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'triage.db').resolve()}"
