"""The live worklist: server-sent events of scored cases, scoped to the caller's clinics.

The scoring transaction writes a :class:`LiveEvent` row (:func:`publish`), so an event
exists exactly when its score does, whichever process scored it; the row id is the SSE
event id, monotonic, and a browser that reconnects with ``Last-Event-ID`` gets what it
missed. On PostgreSQL a ``NOTIFY`` (sent on commit) wakes the streams of every API
process through one ``LISTEN`` connection per process (:class:`Feed`); on SQLite, and as
the fallback, streams look every ``live_poll_seconds``. A stream ends after
``live_stream_seconds`` (the browser reconnects), so no connection lives forever.

Events carry ids, tier, status and deadline, never patient data. With every batch comes a
``summary`` event: how many unread critical cases are due within the next 15 minutes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import anyio.to_thread
import psycopg
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from triage_api import jobs
from triage_api.auth import Principal, Role
from triage_api.tables import Appeal, Case, Clinic, LiveEvent
from triage_api.vocab import AppealStatus, CaseStatus, Tier

log = logging.getLogger("triage.live")

LIVE_CHANNEL = "triage_live"
DUE_SOON = timedelta(minutes=15)
BATCH = 100
KEEPALIVE_SECONDS = 15.0


def publish(session: Session, case: Case, *, now: datetime) -> None:
    """In the scoring transaction: the live event of ``case``'s new state."""
    critical = case.status == CaseStatus.SCORED and case.tier == Tier.CRITICAL
    session.add(
        LiveEvent(
            clinic_id=case.clinic_id,
            case_id=case.id,
            kind="case.critical" if critical else "case.updated",
            tier=case.tier,
            status=case.status,
            deadline=case.deadline,
            created_at=now,
        )
    )
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {LIVE_CHANNEL}"))


class Feed:
    """Wakes this process's streams when new events may be there (PostgreSQL NOTIFY).

    Without PostgreSQL (or while its listening connection is down) nothing wakes them
    early and they poll; :meth:`wait` never waits longer than it is told.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def wake(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, timeout: float) -> None:
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter[1].wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    def listen(
        self, factory: sessionmaker[Session], stop: threading.Event, retry_seconds: float = 5.0
    ) -> None:
        """Run in a thread: LISTEN on PostgreSQL and wake the streams until ``stop``."""
        while not stop.is_set():
            listener = jobs.Listener.open(factory, channel=LIVE_CHANNEL)
            if listener is None:
                return  # SQLite: the streams poll
            try:
                while not stop.is_set():
                    for _ in listener.connection.notifies(timeout=1.0):
                        self.wake()
            except psycopg.Error as exc:
                log.error("live listener lost its connection (%s); streams poll", type(exc).__name__)
            finally:
                listener.close()
            stop.wait(retry_seconds)  # the connection broke: poll meanwhile, then listen again


def _scope(session: Session, principal: Principal) -> tuple[list[int], set[str]]:
    """The caller's clinics, and the cases they must not see live (blinded appeal reads)."""
    blinded: set[str] = set()
    if principal.role is Role.RADIOLOGIST:
        blinded = set(
            session.execute(
                select(Appeal.case_id).where(
                    Appeal.assigned_to == principal.user_id, Appeal.status == AppealStatus.ASSIGNED
                )
            ).scalars()
        )
    return sorted(principal.clinic_ids), blinded


def latest_id(factory: sessionmaker[Session]) -> int:
    """The newest event id (a fresh stream starts after it: no history replayed)."""
    with factory() as session:
        return int(session.execute(select(func.coalesce(func.max(LiveEvent.id), 0))).scalar_one())


def events_after(
    factory: sessionmaker[Session], principal: Principal, after: int, *, now: datetime
) -> tuple[list[dict[str, Any]], int, int]:
    """Events in scope after id ``after``, the last id looked at, and the due-soon count."""
    with factory() as session:
        clinics, blinded = _scope(session, principal)
        rows = session.execute(
            select(LiveEvent, Clinic.name)
            .join(Clinic, Clinic.id == LiveEvent.clinic_id)
            .where(LiveEvent.id > after)
            .order_by(LiveEvent.id)
            .limit(BATCH)
        ).all()
        found = [
            {
                "id": event.id,
                "kind": event.kind,
                "case_id": event.case_id,
                "clinic": clinic,
                "tier": event.tier,
                "status": event.status,
                "deadline": event.deadline.isoformat(),
            }
            for event, clinic in rows
            if event.clinic_id in clinics and event.case_id not in blinded
        ]
        due = session.execute(
            select(Case.id).where(
                Case.clinic_id.in_(clinics),
                Case.tier == Tier.CRITICAL,
                Case.read_at.is_(None),
                Case.deadline <= now + DUE_SOON,
            )
        ).scalars()
        due_soon = sum(1 for case_id in due if case_id not in blinded)
        last = rows[-1][0].id if rows else after
        return found, last, due_soon


def _frame(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def stream(
    factory: sessionmaker[Session],
    feed: Feed,
    principal: Principal,
    *,
    last_event_id: int | None,
    lifetime: float,
    poll: float,
    clock: Callable[[], datetime],
) -> AsyncIterator[str]:
    """The SSE body: events after ``last_event_id`` (or from now on), then new ones as they come.

    Ends after ``lifetime`` seconds; ``retry`` tells the browser to reconnect after 2 s.
    """
    after = last_event_id if last_event_id is not None else await anyio.to_thread.run_sync(latest_id, factory)
    yield "retry: 2000\n\n"
    ends = time.monotonic() + lifetime
    quiet_since = time.monotonic()
    summary: int | None = None
    while True:
        found, after, due_soon = await anyio.to_thread.run_sync(
            partial(events_after, factory, principal, after, now=clock())
        )
        for event in found:
            yield _frame("case", event, event["id"])
        if found or due_soon != summary:
            summary = due_soon
            yield _frame("summary", {"critical_due_15min": due_soon})
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"  # proxies close connections that say nothing
            quiet_since = time.monotonic()
        left = ends - time.monotonic()
        if left <= 0:
            return
        await feed.wait(min(poll, left))
