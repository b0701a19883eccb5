"""Service settings, read from ``TRIAGE_*`` environment variables (pydantic-settings).

The ``triage`` command also reads a site's config file (:func:`load_config_file`) into its
environment first, so that every command run on the host finds the same data as the service.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "bundles" / "cxr-pneumonia"
SITE_CONFIG = Path("/etc/triage/triage.env")
"""The config file the service's systemd unit reads (``EnvironmentFile=``); the CLI reads it too."""

_ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


class ConfigFileError(Exception):
    """A config file line is not ``NAME=value``, a comment or blank."""


def read_config_file(path: Path) -> dict[str, str]:
    """The assignments in an environment file, as systemd's ``EnvironmentFile=`` reads them:
    ``NAME=value`` lines, ``#``/``;`` comments, optional matching quotes around the value,
    no variable expansion.

    Raises:
        ConfigFileError: a line is none of these (its number is named, its text is not).
        OSError: the file cannot be read.
    """
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        match = _ASSIGNMENT.match(line)
        if match is None:
            raise ConfigFileError(f"{path}, line {number}: expected NAME=value")
        name, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values


def load_config_file(path: Path) -> list[str]:
    """Put the file's assignments into this process's environment, where not already set
    (the environment wins, as a one-off ``TRIAGE_X=... triage ...`` expects).

    Returns:
        The names taken from the file.
    """
    taken = []
    for name, value in read_config_file(path).items():
        if name not in os.environ:
            os.environ[name] = value
            taken.append(name)
    return taken


class Settings(BaseSettings):
    """Everything a site can configure. Nothing here is read at import time."""

    model_config = SettingsConfigDict(env_prefix="TRIAGE_", extra="forbid")

    data_dir: Path = Path("./var")
    database_url: str | None = None
    """SQLAlchemy URL; empty means SQLite at ``<data_dir>/triage.db``."""
    database_password_file: Path | None = None
    """A file holding the password for ``database_url`` (a container secret or systemd
    credential), so that the URL, an environment variable, carries none."""
    model_path: Path = DEFAULT_BUNDLE
    device: str = "cpu"
    compile_model: bool = False
    """``torch.compile`` the served network (worth it on a GPU for long-running workers)."""
    torch_threads: int = Field(0, ge=0, le=1024)
    """CPU threads for the forward pass; 0: ``OMP_NUM_THREADS`` if set, else the cores this
    process may use (its CPU affinity, capped by a container's cgroup CPU quota)."""

    host: str = "127.0.0.1"
    port: int = 8000

    dicom_port: int | None = Field(None, ge=0, le=65535)
    """Port of the DICOM C-STORE listener that ``triage serve`` starts (on ``host``); unset: none."""
    dicom_ae_title: str = Field("TRIAGE", pattern=r"^[\x21-\x5b\x5d-\x7e]{1,16}$")
    """Our AE title: called by senders, calling when results are sent to a PACS."""

    max_upload_bytes: int = Field(64 * 1024 * 1024, gt=0)
    """Largest request body accepted by ``POST /v1/studies``."""
    max_json_bytes: int = Field(64 * 1024, gt=0, le=16 * 1024 * 1024)
    """Largest request body of every other route (JSON and web forms)."""
    max_decoded_bytes: int = Field(256 * 1024 * 1024, gt=0)
    """Pixel budget: Rows x Columns x Frames x Samples x bytes per sample, from the header."""

    uploads_per_minute: float = Field(1200, gt=0)
    """Per clinic, per API process; bursts up to ``upload_burst``."""
    upload_burst: int = Field(200, ge=1)

    outbox_poll_seconds: float = Field(1.0, gt=0, le=3600)
    """How often due outbox deliveries (DICOM SR, webhooks) are sent."""

    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60)
    """Connect + read timeout of one webhook delivery (redirects are never followed)."""
    webhook_overdue_minutes: float = Field(15, ge=0)
    """``case.overdue`` fires once when a case is still unread this long past its deadline."""
    webhook_sweep_seconds: float = Field(30, gt=0, le=3600)
    """How often overdue cases, decided appeals and model alerts are looked for."""
    live_stream_seconds: float = Field(300, gt=0, le=3600)
    """Lifetime of one live worklist stream; the browser reconnects with ``Last-Event-ID``."""
    live_poll_seconds: float = Field(1.0, gt=0, le=60)
    """How often a live stream looks for new events (on PostgreSQL a NOTIFY wakes it sooner)."""

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

    blind_sample_rate: float = Field(0.05, ge=0, le=1)
    """The AI-blind sample of a live clinic that has not set its own: the share of its studies
    scored but read without the AI, so that monitoring never runs only on AI-influenced labels."""

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
    """Ed25519 key that signs audit checkpoints; empty means ``audit-ed25519.key`` in the
    folder ``triage-audit`` beside the data directory (``/var/lib/triage-audit`` for
    ``/var/lib/triage``). Keep it off the database's storage and out of its backups."""
    audit_checkpoint_copy: Path | None = None
    """Append-only copy of every checkpoint, outside the database; empty means
    ``audit-checkpoints.jsonl`` next to the key file. Back it up apart from the database.
    Every checkpoint is also logged (logger ``triage.audit``), so it reaches the journal."""
    audit_key_in_data_dir: bool = False
    """Allow the key or the copy inside ``data_dir`` (tests, demos). Otherwise the service
    refuses to start: whoever can write the data directory could then edit events and
    re-sign them."""
    audit_checkpoint_events: int = Field(50, ge=1, le=50)
    """Sign the chain's head at the latest after this many unsigned events..."""
    audit_checkpoint_seconds: float = Field(5, gt=0, le=5)
    """...or when the oldest unsigned event is this old (and once at every start)."""

    web_idle_minutes: float = Field(30, gt=0)
    """A browser session ends after this long without a request."""
    web_session_hours: float = Field(12, gt=0)
    """A browser session ends this long after login, however active."""
    web_secure_cookie: bool = False
    """Mark the session cookie Secure even when the app sees plain http (TLS ends at a proxy);
    it is always Secure when the request itself is https."""
    web_login_failures: int = Field(5, ge=1)
    """Failed logins per (username, source address) within ``web_login_window_minutes``
    before that pair is throttled."""
    web_login_ceiling: int = Field(100, ge=1)
    """Failed logins from everyone together within the window before every pair that has
    not signed in successfully lately is throttled too."""
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
        return self.audit_key_file or self.data_dir.absolute().parent / "triage-audit" / "audit-ed25519.key"

    @property
    def audit_copy_path(self) -> Path:
        return self.audit_checkpoint_copy or self.audit_key_path.parent / "audit-checkpoints.jsonl"

    @property
    def sqlalchemy_url(self) -> str:
        if not self.database_url:
            return f"sqlite:///{(self.data_dir / 'triage.db').resolve()}"
        if self.database_password_file is None:
            return self.database_url
        password = self.database_password_file.read_text().strip()
        return make_url(self.database_url).set(password=password).render_as_string(hide_password=False)
