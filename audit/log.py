"""The audit log: one append-only table, each row chained to the previous by sha256.

``hash = sha256(prev_hash || canonical JSON of the row)``; the first row chains to 64 zeros.
Writers are serialised so the chain never forks: on PostgreSQL by a transaction-scoped
advisory lock, on SQLite by the write transaction itself (the service opens every SQLite
transaction with ``BEGIN IMMEDIATE``). The event is added to the caller's session, so it
commits, or fails, together with the change it records.
"""

from __future__ import annotations

import enum
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Integer, String, Text, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

GENESIS_HASH = "0" * 64
_ADVISORY_LOCK_KEY = 0x7472696167  # "triag"


class EventCode(enum.StrEnum):
    """DICOM PS3.15 A.5 / IHE ATNA event IDs used by the service."""

    IMPORT = "110107"
    ACCESS = "110103"
    QUERY = "110112"
    DELETE = "110105"
    EXPORT = "110106"
    LOGIN = "110114"
    SECURITY_ALERT = "110113"
    AUDIT_LOG_USED = "110101"


class Outcome(int, enum.Enum):
    """DICOM event outcome indicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class AuditBase(DeclarativeBase):
    pass


class AuditEvent(AuditBase):
    """One audit row. ``at`` is stored as the exact ISO-8601 text that was hashed."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[str] = mapped_column(String(40), index=True)
    actor: Mapped[str] = mapped_column(String(100), index=True)
    action: Mapped[str] = mapped_column(String(60), index=True)
    event_code: Mapped[str] = mapped_column(String(10))
    object_type: Mapped[str] = mapped_column(String(40))
    object_id: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[int] = mapped_column(Integer)
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


def canonical(row: dict[str, Any]) -> bytes:
    """The bytes that are hashed: sorted-key compact JSON of every column but ``hash``."""
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """``sha256(prev_hash || canonical(row))`` as hex."""
    return hashlib.sha256(prev_hash.encode() + canonical(row)).hexdigest()


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    code: EventCode,
    object_type: str,
    object_id: str,
    outcome: Outcome = Outcome.SUCCESS,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append an audit event to the caller's transaction.

    The caller commits; if the commit fails, neither the change nor its event is stored.
    ``details`` must never hold patient data (names, IDs, dates of birth, accession numbers).

    Args:
        session: the session of the change being recorded.
        actor: who acted, e.g. ``user:12`` or ``worker:host:pid``.
        action: a short verb phrase, e.g. ``study.upload``.
        code: the DICOM audit event ID.
        object_type: what was acted on, e.g. ``case``.
        object_id: its identifier.
        outcome: the DICOM outcome indicator.
        details: extra facts, JSON-serialisable, free of PHI.

    Returns:
        The new event, flushed (its ``seq`` and ``hash`` are set).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
    head = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
    row: dict[str, Any] = {
        "seq": seq,
        "at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "actor": actor,
        "action": action,
        "event_code": code.value,
        "object_type": object_type,
        "object_id": object_id,
        "outcome": int(outcome),
        "details": json.dumps(details or {}, sort_keys=True, separators=(",", ":")),
        "prev_hash": prev_hash,
    }
    event = AuditEvent(**row, hash=chain_hash(prev_hash, row))
    session.add(event)
    session.flush()
    return event


def first_broken(session: Session) -> int | None:
    """Walk the chain in order; return the first sequence number that does not verify.

    A row breaks the chain if its ``seq`` is not the previous plus one, its ``prev_hash`` is
    not the previous row's hash, or its own hash does not match its content. Tail deletion
    needs signed checkpoints to detect (a later issue).
    """
    expected_seq, prev_hash = 1, GENESIS_HASH
    for event in session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars():
        row = {c.name: getattr(event, c.name) for c in AuditEvent.__table__.columns if c.name != "hash"}
        if event.seq != expected_seq or event.prev_hash != prev_hash:
            return expected_seq
        if chain_hash(prev_hash, row) != event.hash:
            return event.seq
        expected_seq, prev_hash = event.seq + 1, event.hash
    return None
