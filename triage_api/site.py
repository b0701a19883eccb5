"""The site a ``triage`` command acts on: finding its database, refusing a wrong one, and
``triage doctor``'s checks of the host.

A command run from the wrong directory used to create an empty database there and, for
``users add``, print a key the running service rejects. Every command but ``serve`` and
``migrate`` now requires an existing database at the current schema (:func:`site_problem`).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from audit.log import AuditCheckpoint, AuditEvent
from triage_api.db import MIGRATIONS, make_engine
from triage_api.settings import Settings

MIN_FREE_BYTES = 2 * 1024**3
"""Below this much free space under the data directory, uploads will soon fail."""
CLOCK_SLACK_SECONDS = 5.0


def head_revision() -> str:
    """The newest schema revision this release ships."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None  # the package ships migrations
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision; None for a database without the Triage schema.

    Alembic announces every context it opens at INFO; a look-up is not news, so the
    announcement is held back (``triage migrate`` still logs the upgrades it runs).
    """
    announcer = logging.getLogger("alembic.runtime.migration")
    level = announcer.level
    announcer.setLevel(logging.WARNING)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        announcer.setLevel(level)


def sqlite_path(settings: Settings) -> Path | None:
    """The SQLite database file, or None when the site runs on a server database."""
    url = make_url(settings.sqlalchemy_url)
    if url.get_backend_name() != "sqlite":
        return None
    return Path(url.database or "")


def describe(settings: Settings) -> str:
    """Where the database is, without a password: for messages."""
    path = sqlite_path(settings)
    if path is not None:
        return f"SQLite at {path}"
    return f"{make_url(settings.sqlalchemy_url).render_as_string(hide_password=True)}"


def site_problem(settings: Settings) -> str | None:
    """Why this is not a usable site (no database, unreachable, schema not current), or None.

    Never creates anything: a missing SQLite file is reported, not opened.
    """
    path = sqlite_path(settings)
    if path is not None and not path.is_file():
        return f"no Triage database: {describe(settings)} does not exist"
    engine = make_engine(settings.sqlalchemy_url, read_only=True)
    try:
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        return f"cannot reach the database {describe(settings)} ({type(exc).__name__})"
    finally:
        engine.dispose()
    head = head_revision()
    if current is None:
        return f"{describe(settings)} has no Triage schema"
    if current != head:
        return f"the schema of {describe(settings)} is at {current}, this release needs {head}"
    return None


@dataclass(frozen=True)
class Finding:
    """One check of ``triage doctor``: ``level`` is ok, warn or fail; ``fix`` says what to do."""

    name: str
    level: str
    message: str
    fix: str = ""


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def _data_dir(settings: Settings) -> list[Finding]:
    data = settings.data_dir.resolve()
    if not data.is_dir():
        return [Finding("data directory", "fail", f"{data} does not exist", "set TRIAGE_DATA_DIR")]
    if not os.access(data, os.W_OK | os.X_OK):
        return [
            Finding(
                "data directory",
                "fail",
                f"{data} is not writable by uid {os.getuid()}",
                f"chown -R <service user> {data}; run the command as the service user",
            )
        ]
    if not _private(data):
        return [
            Finding(
                "data directory",
                "warn",
                f"{data} may be read by other users (it holds studies)",
                f"chmod 700 {data}",
            )
        ]
    return [Finding("data directory", "ok", f"{data}, writable, private")]


def _disk(settings: Settings) -> list[Finding]:
    data = settings.data_dir.resolve()
    if not data.is_dir():
        return []
    usage = shutil.disk_usage(data)
    message = f"{usage.free / 1024**3:.1f} GiB free of {usage.total / 1024**3:.1f} GiB under {data}"
    if usage.free < MIN_FREE_BYTES:
        return [Finding("disk space", "fail", message, "free space or grow the volume (uploads need room)")]
    if usage.free < usage.total * 0.1:
        return [Finding("disk space", "warn", message, "plan more storage: under 10% free")]
    return [Finding("disk space", "ok", message)]


def _keys(settings: Settings, checkpoints: int | None) -> list[Finding]:
    key = settings.audit_key_path.resolve()
    findings = []
    if not key.is_file():
        if checkpoints:
            findings.append(
                Finding(
                    "signing key",
                    "fail",
                    f"{key} is missing but {checkpoints} checkpoints were signed: the service "
                    "would start a new key",
                    "restore the key from its own backup (or set TRIAGE_AUDIT_KEY_FILE) before starting",
                )
            )
        else:
            findings.append(Finding("signing key", "ok", f"none yet; created at {key} on first start"))
    elif not _private(key):
        findings.append(Finding("signing key", "fail", f"{key} is readable by others", f"chmod 600 {key}"))
    else:
        findings.append(Finding("signing key", "ok", f"{key}, mode 0600"))
    if key.is_relative_to(settings.data_dir.resolve()):
        findings.append(
            Finding(
                "key placement",
                "warn",
                "the signing key lives in the data directory: whoever holds a copy of the data "
                "can forge checkpoints",
                "move it to other storage and set TRIAGE_AUDIT_KEY_FILE (see docs/operations.md)",
            )
        )
    database = sqlite_path(settings)
    copy = settings.audit_copy_path.resolve()
    if (
        database is not None
        and copy.parent.is_dir()
        and database.parent.is_dir()
        and copy.parent.stat().st_dev == database.parent.stat().st_dev
    ):
        findings.append(
            Finding(
                "checkpoint copy",
                "warn",
                f"{copy} is on the same file system as the database",
                "set TRIAGE_AUDIT_CHECKPOINT_COPY to a path on other storage",
            )
        )
    return findings


def _database(settings: Settings, now: datetime) -> tuple[list[Finding], int | None]:
    """Reachability, schema, and the clock against the database and the newest audit event."""
    problem = site_problem(settings)
    if problem is not None:
        fix = "check TRIAGE_DATA_DIR / TRIAGE_DATABASE_URL; `triage migrate` creates or upgrades"
        return [Finding("database", "fail", problem, fix)], None
    engine = make_engine(settings.sqlalchemy_url, read_only=True)
    try:
        with engine.connect() as connection:
            newest_at = connection.execute(
                select(AuditEvent.at).order_by(AuditEvent.seq.desc()).limit(1)
            ).scalar()
            signed = connection.execute(select(func.count()).select_from(AuditCheckpoint)).scalar_one()
            server_now = None
            if engine.dialect.name == "postgresql":
                server_now = connection.execute(text("SELECT now()")).scalar()
    finally:
        engine.dispose()
    findings = [Finding("database", "ok", f"{describe(settings)}, schema {head_revision()} (current)")]
    newest = datetime.fromisoformat(newest_at) if newest_at else None
    if newest is not None and (newest - now).total_seconds() > CLOCK_SLACK_SECONDS:
        findings.append(
            Finding(
                "clock",
                "fail",
                f"the newest audit event is {(newest - now).total_seconds():.0f} s in the future: "
                "this host's clock is behind or was set back",
                "enable NTP (timedatectl set-ntp true / chrony) before starting the service",
            )
        )
    elif server_now is not None and abs((server_now - now).total_seconds()) > CLOCK_SLACK_SECONDS:
        findings.append(
            Finding(
                "clock",
                "fail",
                f"this host and the database server differ by {(server_now - now).total_seconds():.0f} s",
                "synchronise both with the same NTP source",
            )
        )
    else:
        against = "the audit trail and the server" if server_now else "the audit trail"
        findings.append(Finding("clock", "ok", f"not behind {against}"))
    return findings, int(signed)


def _model(settings: Settings) -> list[Finding]:
    from models.bundle import BundleError, verify_bundle

    try:
        card = verify_bundle(settings.model_path)
    except BundleError as exc:
        return [Finding("model", "fail", str(exc), "reinstall the bundle (`triage models import`)")]
    return [Finding("model", "ok", f"{card.ref}: weights match the card's sha256")]


def _settings_names() -> list[Finding]:
    known = {f"TRIAGE_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(n for n in os.environ if n.startswith("TRIAGE_") and n not in known)
    if unknown:
        return [Finding("settings", "warn", f"unknown (ignored): {', '.join(unknown)}", "fix the spelling")]
    return []


def doctor(settings: Settings, now: datetime | None = None) -> list[Finding]:
    """Every check, in the order an operator would fix them."""
    now = now or datetime.now(UTC)
    database, checkpoints = _database(settings, now)
    return [
        *_settings_names(),
        *_data_dir(settings),
        *_disk(settings),
        *database,
        *_keys(settings, checkpoints),
        *_model(settings),
    ]
