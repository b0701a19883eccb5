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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
    """The audit tables' own metadata: ``audit/`` does not depend on the service's tables."""


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


HASHED_COLUMNS = (
    "seq",
    "at",
    "actor",
    "action",
    "event_code",
    "object_type",
    "object_id",
    "outcome",
    "details",
    "prev_hash",
)
"""The columns covered by ``hash``, in table order (every column but ``hash`` itself)."""


class AuditCheckpoint(AuditBase):
    """A signed statement "the chain had ``count`` events, the last one ``head_seq`` with
    ``head_hash``, at ``at``". Append-only like the events; the signing key is not in the
    database, so a checkpoint cannot be forged by someone who can only write rows."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[str] = mapped_column(String(40))
    count: Mapped[int] = mapped_column(Integer)
    head_seq: Mapped[int] = mapped_column(Integer, index=True)
    head_hash: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))


def canonical(row: dict[str, Any]) -> bytes:
    """The bytes that are hashed: sorted-key compact JSON of every column but ``hash``."""
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """``sha256(prev_hash || canonical(row))`` as hex."""
    return hashlib.sha256(prev_hash.encode() + canonical(row)).hexdigest()


def lock_writers(session: Session) -> None:
    """Queue behind other audit writers until the caller's transaction ends.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: nothing to do, the service's
    write transactions start with ``BEGIN IMMEDIATE`` and so already hold the database lock.

    Args:
        session: the session whose transaction should hold the lock.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})


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
        The new event (its ``seq`` and ``hash`` are set); it is written with the
        transaction's next flush.
    """
    seq, prev_hash = _next_link(session)
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
    session.info[_HEAD] = (session.get_transaction(), seq, event.hash)
    return event


_HEAD = "audit_head"
"""``session.info`` key: ``(transaction, seq, hash)`` of the last event this transaction appended."""


def _next_link(session: Session) -> tuple[int, str]:
    """``(seq, prev_hash)`` for the next event of the session's transaction.

    The first event of a transaction takes the writers' lock and reads the head; later
    events of the same transaction continue from the one before (the lock is still held,
    so no one else can have appended).
    """
    cached = session.info.get(_HEAD)
    if cached is not None and cached[0] is not None and cached[0] is session.get_transaction():
        return cached[1] + 1, cached[2]
    lock_writers(session)
    head = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    return (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)


@dataclass(frozen=True)
class ChainBreak:
    """Where and why the chain stops verifying. ``reason`` names sequence numbers only."""

    seq: int
    reason: str


def find_break(
    session: Session,
    *,
    on_row: Callable[[int, str], None] | None = None,
    after: tuple[int, str] = (0, GENESIS_HASH),
    batch: int = 10_000,
) -> ChainBreak | None:
    """Walk the chain in ``seq`` order and return the first place it does not verify.

    A row breaks the chain if its ``seq`` is not the previous plus one (a row was deleted),
    its ``prev_hash`` is not the previous row's hash (rows reordered, replaced or inserted),
    or its own hash does not match its content (a row was edited). The walk streams rows;
    it stops at the first break, since nothing after it can be trusted.

    Args:
        session: any session on the audit database (only reads).
        on_row: called with ``(seq, hash)`` of every row that verified, in order; the
            checkpoint verifier uses it to compare signed heads with the chain.
        after: ``(seq, hash)`` of a row taken as verified; the walk starts at the next one
            (the checkpointer checks only what it is about to sign).
        batch: rows fetched per round trip.

    Returns:
        The first break, or None when every stored row verifies.
    """
    table = AuditEvent.__table__
    columns = [table.c[name] for name in HASHED_COLUMNS]
    result = session.execute(
        select(*columns, table.c.hash).where(table.c.seq > after[0]).order_by(table.c.seq),
        execution_options={"yield_per": batch},
    )
    try:
        return _walk(result, after, on_row)
    finally:
        result.close()  # a server-side cursor left open on PostgreSQL when the walk stops early


def _walk(
    rows: Iterable[Sequence[Any]], after: tuple[int, str], on_row: Callable[[int, str], None] | None
) -> ChainBreak | None:
    expected_seq, prev_hash = after[0] + 1, after[1]
    for values in rows:
        row = dict(zip(HASHED_COLUMNS, values[:-1], strict=True))
        seq, stored = row["seq"], values[-1]
        if seq != expected_seq:
            return ChainBreak(
                expected_seq, f"event {expected_seq} is missing: the next stored event is {seq}"
            )
        if row["prev_hash"] != prev_hash:
            return ChainBreak(
                seq, f"event {seq} does not chain to event {seq - 1} (reordered, replaced or inserted)"
            )
        if chain_hash(prev_hash, row) != stored:
            return ChainBreak(seq, f"event {seq} does not match its hash (edited)")
        if on_row is not None:
            on_row(seq, stored)
        expected_seq, prev_hash = seq + 1, stored
    return None


def first_broken(session: Session) -> int | None:
    """The first sequence number that does not verify, or None (see ``find_break``).

    Tail deletion leaves a shorter chain that verifies; ``audit.verify.verify`` catches it
    against the signed checkpoints.

    Args:
        session: any session on the audit database.

    Returns:
        The sequence number of the first bad (or missing) event, or None.
    """
    found = find_break(session)
    return None if found is None else found.seq
