"""Reading the audit log: filters and a sequence-number cursor over ``audit_events``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from audit.log import AuditEvent


def _stored_time(moment: datetime) -> str:
    """``at`` is ISO-8601 UTC text of one fixed shape, so text order is time order."""
    if moment.tzinfo is None:
        raise ValueError("a time filter needs a time zone")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def search(
    session: Session,
    *,
    visible: ColumnElement[bool] | None = None,
    object_type: str | None = None,
    object_id: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_seq: int = 0,
    before_seq: int | None = None,
    newest_first: bool = False,
    limit: int = 100,
) -> Sequence[AuditEvent]:
    """Events matching every given filter, in ``seq`` order, between the cursors.

    Args:
        session: any session on the audit database.
        visible: the caller's scope as a SQL condition on ``AuditEvent`` (the service builds
            it from the credential; None means everything).
        object_type: e.g. ``case``.
        object_id: e.g. a case id.
        actor: e.g. ``user:12``.
        action: e.g. ``case.view``.
        since: events at or after this time (time-zone aware).
        until: events before this time (time-zone aware).
        after_seq: return events with a larger sequence number (0 = from the start).
        before_seq: return events with a smaller sequence number (None = to the end); the
            cursor for paging newest first.
        newest_first: order by descending ``seq`` (the newest ``limit`` events that match).
        limit: at most this many.

    Returns:
        The events, oldest first (newest first with ``newest_first``).

    Raises:
        ValueError: a naive ``since``/``until``, or a ``limit`` below 1.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    query = select(AuditEvent).where(AuditEvent.seq > after_seq)
    if before_seq is not None:
        query = query.where(AuditEvent.seq < before_seq)
    if visible is not None:
        query = query.where(visible)
    if object_type is not None:
        query = query.where(AuditEvent.object_type == object_type)
    if object_id is not None:
        query = query.where(AuditEvent.object_id == object_id)
    if actor is not None:
        query = query.where(AuditEvent.actor == actor)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if since is not None:
        query = query.where(AuditEvent.at >= _stored_time(since))
    if until is not None:
        query = query.where(AuditEvent.at < _stored_time(until))
    order = AuditEvent.seq.desc() if newest_first else AuditEvent.seq
    return list(session.execute(query.order_by(order).limit(limit)).scalars())
