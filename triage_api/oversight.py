"""Oversight queries: overrides of the AI, the readers behind them, the override rate by day,
and the audit chain's status; scoped like every read, to cases in the caller's clinics.

The auditor's desk (:mod:`triage_api.web.views`) shows them; they are a service, not web
code, so that a REST route can serve them too.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.checkpoint import latest_checkpoint
from audit.copies import load_copies
from audit.keys import AuditKeyError, load_signing_key
from audit.log import AuditCheckpoint, EventCode, record
from audit.verify import Report, verify
from triage_api.auth import Principal
from triage_api.tables import Case, Read, User
from triage_api.vocab import ReadKind


@dataclass(frozen=True)
class OverrideRow:
    read_id: int
    case_id: str
    reader: str
    finding: str
    reason: str | None
    model_ref: str | None
    ai_risk: float | None
    created_at: datetime


def overrides(
    session: Session,
    *,
    principal: Principal,
    reason: str | None = None,
    reader_id: int | None = None,
    model_ref: str | None = None,
    limit: int = 200,
) -> list[OverrideRow]:
    """Primary reads that disagreed with the AI, newest first, in the caller's clinics.

    The query is audited (110112). Notes are not returned: they are free text.
    """
    query = (
        select(Read, User.name)
        .join(Case, Case.id == Read.case_id)
        .join(User, User.id == Read.reader_id)
        .where(
            Case.clinic_id.in_(principal.clinic_ids),
            Read.kind == ReadKind.PRIMARY,
            Read.agrees_with_ai.is_(False),
        )
    )
    if reason is not None:
        query = query.where(Read.override_reason == reason)
    if reader_id is not None:
        query = query.where(Read.reader_id == reader_id)
    if model_ref is not None:
        query = query.where(Read.model_ref == model_ref)
    rows = session.execute(query.order_by(Read.created_at.desc(), Read.id.desc()).limit(limit)).all()
    record(
        session,
        actor=principal.actor,
        action="overrides.query",
        code=EventCode.QUERY,
        object_type="metrics",
        object_id="overrides",
        details={"reason": reason, "reader": reader_id, "model": model_ref, "count": len(rows)},
    )
    return [
        OverrideRow(r.id, r.case_id, name, r.finding, r.override_reason, r.model_ref, r.ai_risk, r.created_at)
        for r, name in rows
    ]


def readers(session: Session, principal: Principal) -> list[tuple[int, str]]:
    """Users who made a primary read in the caller's clinics (for the reader filter)."""
    rows = session.execute(
        select(User.id, User.name)
        .join(Read, Read.reader_id == User.id)
        .join(Case, Case.id == Read.case_id)
        .where(Case.clinic_id.in_(principal.clinic_ids))
        .distinct()
        .order_by(User.name)
    ).all()
    return [(i, n) for i, n in rows]


def override_rate_by_day(
    session: Session, *, principal: Principal, days: int = 14, now: datetime | None = None
) -> list[tuple[str, int, int]]:
    """``(day, reads with an AI result, overrides)`` per UTC day, oldest first."""
    now = now or datetime.now(UTC)
    start = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    rows = session.execute(
        select(Read.created_at, Read.agrees_with_ai)
        .join(Case, Case.id == Read.case_id)
        .where(
            Case.clinic_id.in_(principal.clinic_ids),
            Read.kind == ReadKind.PRIMARY,
            Read.agrees_with_ai.is_not(None),
            Read.created_at >= start,
        )
    ).all()
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for created, agrees in rows:
        day = created.astimezone(UTC).date().isoformat()
        counts[day][0] += 1
        counts[day][1] += agrees is False
    out = []
    for i in range(days):
        day = (start + timedelta(days=i)).date().isoformat()
        reads, over = counts.get(day, [0, 0])
        out.append((day, reads, over))
    return out


@dataclass(frozen=True)
class ChainStatus:
    report: Report | None
    """None when the checkpoint key cannot be read here."""
    checkpoint: AuditCheckpoint | None
    key_problem: str | None = None


def chain_status(session: Session, *, principal: Principal, key_path: Path, copy_path: Path) -> ChainStatus:
    """Verify the whole chain, every checkpoint and the checkpoint copy now (audited 110101)."""
    checkpoint = latest_checkpoint(session)
    try:
        public = load_signing_key(key_path).public_key()
    except AuditKeyError as exc:
        return ChainStatus(None, checkpoint, str(exc))
    copies, unreadable = load_copies(copy_path)
    report = verify(session, public, copies=copies)
    report.problems += unreadable
    record(
        session,
        actor=principal.actor,
        action="audit.verify",
        code=EventCode.AUDIT_LOG_USED,
        object_type="audit",
        object_id="audit_events",
        details={"ok": report.ok, "events": report.events},
    )
    return ChainStatus(report, checkpoint)
