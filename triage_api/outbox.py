"""The outbox: every delivery that leaves the service (DICOM SR to a PACS, webhooks).

A delivery is written as an ``outbox`` row in the same transaction as the change that
causes it (a score, a decision), so it is never lost and never sent for a change that
rolled back. ``deliver_due`` later claims due rows under a lease, calls the sender for
their kind *outside* any transaction (a slow peer never holds a database lock or blocks
scoring), then records the outcome: delivered, retried later with exponential backoff
and jitter, or dead-lettered after ``max_attempts``. Every attempt is audited (110106).

A sender is a plain callable ``(item) -> str | None`` that raises ``DeliveryFailed`` on a
failure; it returns an optional short note for the audit (e.g. the peer's status).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from audit.log import EventCode, Outcome, record
from triage_api.db import transaction
from triage_api.tables import OutboxItem

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"


class DeliveryFailed(Exception):
    """A delivery attempt failed; ``permanent`` skips the remaining retries.

    The message is stored and audited: it must never hold patient data.
    """

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason[:200]
        self.permanent = permanent


@dataclass(frozen=True)
class Delivery:
    """What a sender gets: a claimed row, detached from any session."""

    id: int
    kind: str
    target: str
    case_id: str | None
    clinic_id: int | None
    payload: dict[str, Any]
    attempt: int


Sender = Callable[[Delivery], str | None]


@dataclass(frozen=True)
class Policy:
    """Retry policy: ``base * 2**(attempt-1)`` seconds, capped, times a jitter in [0.5, 1]."""

    max_attempts: int = 8
    base_seconds: float = 5.0
    cap_seconds: float = 3600.0
    lease_seconds: float = 120.0

    def backoff(self, attempt: int, rng: random.Random) -> timedelta:
        delay = min(self.cap_seconds, self.base_seconds * 2 ** max(0, attempt - 1))
        return timedelta(seconds=delay * rng.uniform(0.5, 1.0))


def enqueue(
    session: Session,
    *,
    kind: str,
    target: str,
    payload: dict[str, Any],
    now: datetime,
    case_id: str | None = None,
    clinic_id: int | None = None,
) -> OutboxItem:
    """Add a delivery to the caller's transaction (it commits, or not, with the change)."""
    item = OutboxItem(
        kind=kind,
        target=target,
        case_id=case_id,
        clinic_id=clinic_id,
        payload=json.dumps(payload, sort_keys=True, separators=(",", ":")),
        status=PENDING,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(item)
    return item


def resend(session: Session, item_id: int, *, actor: str, now: datetime) -> OutboxItem | None:
    """Send a delivered or dead-lettered item again ("send again"), audited; None if unknown."""
    item = session.get(OutboxItem, item_id)
    if item is None:
        return None
    item.status = PENDING
    item.next_attempt_at = now
    item.attempts = 0
    record(
        session,
        actor=actor,
        action="outbox.resend",
        code=EventCode.EXPORT,
        object_type="outbox",
        object_id=str(item.id),
        details={"kind": item.kind, "target": item.target},
    )
    return item


def _claim(
    factory: sessionmaker[Session], kinds: list[str], *, now: datetime, limit: int, policy: Policy
) -> list[Delivery]:
    with transaction(factory) as session:
        query = (
            select(OutboxItem)
            .where(
                OutboxItem.status == PENDING,
                OutboxItem.next_attempt_at <= now,
                OutboxItem.kind.in_(kinds),
            )
            .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
            .limit(limit)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        claimed = []
        for item in session.scalars(query):
            item.attempts += 1
            # The lease: another deliverer skips the row until it runs out.
            item.next_attempt_at = now + timedelta(seconds=policy.lease_seconds)
            claimed.append(
                Delivery(
                    id=item.id,
                    kind=item.kind,
                    target=item.target,
                    case_id=item.case_id,
                    clinic_id=item.clinic_id,
                    payload=json.loads(item.payload),
                    attempt=item.attempts,
                )
            )
        return claimed


def _settle(
    factory: sessionmaker[Session],
    delivery: Delivery,
    *,
    error: DeliveryFailed | None,
    note: str | None,
    now: datetime,
    policy: Policy,
    rng: random.Random,
) -> str:
    if error is None:
        status, next_at, action, outcome = DELIVERED, now, "outbox.delivered", Outcome.SUCCESS
    elif error.permanent or delivery.attempt >= policy.max_attempts:
        status, next_at, action, outcome = DEAD, now, "outbox.dead_lettered", Outcome.SERIOUS_FAILURE
    else:
        status = PENDING
        next_at = now + policy.backoff(delivery.attempt, rng)
        action, outcome = "outbox.failed", Outcome.MINOR_FAILURE
    with transaction(factory) as session:
        # Fenced by the attempt number: a deliverer whose lease ran out cannot overwrite
        # the outcome of the one that claimed the row after it.
        changed = session.execute(
            update(OutboxItem)
            .returning(OutboxItem.id)
            .where(OutboxItem.id == delivery.id, OutboxItem.attempts == delivery.attempt)
            .values(
                status=status,
                next_attempt_at=next_at,
                last_error=None if error is None else error.reason,
                delivered_at=now if error is None else None,
            )
        ).first()
        if changed is None:
            return "lost_lease"
        details: dict[str, Any] = {
            "kind": delivery.kind,
            "target": delivery.target,
            "attempt": delivery.attempt,
        }
        if delivery.case_id is not None:
            details["case_id"] = delivery.case_id
        if error is not None:
            details["error"] = error.reason
        if note:
            details["note"] = note[:200]
        record(
            session,
            actor="outbox",
            action=action,
            code=EventCode.EXPORT,
            object_type="outbox",
            object_id=str(delivery.id),
            outcome=outcome,
            details=details,
        )
    return status


def deliver_due(
    factory: sessionmaker[Session],
    senders: Mapping[str, Sender],
    *,
    now: Callable[[], datetime],
    policy: Policy | None = None,
    rng: random.Random | None = None,
    limit: int = 20,
) -> dict[str, int]:
    """Claim due deliveries of the kinds in ``senders``, send each, record the outcome.

    Returns counts by outcome (``delivered``, ``pending`` for a retry, ``dead``).
    """
    policy = policy or Policy()
    rng = rng or random.Random()
    counts: dict[str, int] = {}
    if not senders:
        return counts
    for delivery in _claim(factory, list(senders), now=now(), limit=limit, policy=policy):
        error: DeliveryFailed | None = None
        note: str | None = None
        try:
            note = senders[delivery.kind](delivery)
        except DeliveryFailed as failed:
            error = failed
        except Exception as exc:  # a sender bug must not stop other deliveries
            error = DeliveryFailed(f"sender error: {type(exc).__name__}")
        status = _settle(factory, delivery, error=error, note=note, now=now(), policy=policy, rng=rng)
        counts[status] = counts.get(status, 0) + 1
    return counts
