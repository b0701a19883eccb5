"""The job queue: one row per study to score, in the shared database.

Enqueue commits with the upload (and, on PostgreSQL, a ``NOTIFY`` wakes idle workers).
A worker claims jobs under a lease; a worker that dies loses nothing, because its lease
expires and another worker claims the job again, with the attempt number raised. Results
are fenced by that number: a late write from a dead attempt is discarded. A job past
``max_attempts`` becomes a dead letter and its case ``failed``, visibly. Workers record a
heartbeat so that the health view can tell the living from the dead.

No task-queue library: the queue is the table, so a job commits or rolls back with the
case it belongs to (see the README).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from sqlalchemy import and_, or_, select, text
from sqlalchemy.orm import Session, sessionmaker

from audit.log import EventCode, Outcome, record
from triage_api.db import transaction
from triage_api.tables import Case, Job, WorkerBeat
from triage_api.vocab import CaseStatus, JobStatus

JOBS_CHANNEL = "triage_jobs"
"""PostgreSQL NOTIFY channel that wakes idle workers when a job is queued."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Upper bounds of the batch-size histogram a worker reports (``TRIAGE_BATCH_SIZE`` <= 1024)."""


def batch_bucket(size: int) -> str:
    """The histogram bucket of a batch of ``size`` studies: its upper bound, as text."""
    return next((str(bound) for bound in BATCH_BUCKETS if size <= bound), "+Inf")


@dataclass(frozen=True)
class Claim:
    """One attempt at a job, held by one worker until its lease runs out."""

    job_id: int
    case_id: str
    attempt: int
    sha256: str
    media_type: str


def enqueue(session: Session, case_id: str, now: datetime) -> None:
    """Queue the scoring of a case in the caller's transaction.

    On PostgreSQL, idle workers are notified; the notification is delivered on commit, so
    a worker never wakes for a job it cannot see yet.
    """
    session.add(Job(case_id=case_id, status=JobStatus.QUEUED, attempts=0, available_at=now))
    session.flush()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {JOBS_CHANNEL}"))


def claim(
    factory: sessionmaker[Session],
    *,
    worker: str,
    limit: int,
    lease: timedelta,
    max_attempts: int,
    now: datetime,
) -> list[Claim]:
    """Take up to ``limit`` of the oldest queued jobs, or jobs whose lease expired.

    Commits at once: no transaction is held while scoring. On PostgreSQL the rows are
    locked with ``SKIP LOCKED`` so that concurrent workers take different jobs; a job
    past ``max_attempts`` becomes a dead letter and its case ``failed``, visibly.
    """
    claims: list[Claim] = []
    with transaction(factory) as session:
        query = (
            select(Job)
            .where(
                or_(
                    Job.status == JobStatus.QUEUED,
                    and_(Job.status == JobStatus.RUNNING, Job.lease_until < now),
                )
            )
            .order_by(Job.id)
            .limit(limit)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        jobs = session.execute(query).scalars().all()
        cases = _cases(session, [job.case_id for job in jobs])
        for job in jobs:
            case = cases[job.case_id]
            job.attempts += 1
            if job.attempts > max_attempts:
                job.status, job.lease_until = JobStatus.DEAD, None
                case.status = CaseStatus.FAILED
                case.reason = f"scoring gave up after {max_attempts} attempts"
                audit_scoring(session, worker, case, "study.score.failed", Outcome.SERIOUS_FAILURE)
                continue
            job.status, job.worker = JobStatus.RUNNING, worker
            job.lease_until = now + lease
            case.status = CaseStatus.RUNNING
            audit_scoring(session, worker, case, "study.score.start", details={"attempt": job.attempts})
            claims.append(Claim(job.id, case.id, job.attempts, case.sha256, case.media_type))
    return claims


@contextmanager
def finishing(
    factory: sessionmaker[Session], claims: list[Claim], *, worker: str
) -> Iterator[tuple[Session, list[tuple[Claim, Case]]]]:
    """One transaction in which ``worker`` writes the results of its claims, fenced.

    Yields the session and the claims ``worker`` still holds, each with its case; a claim
    whose lease was lost to another worker (or whose attempt was superseded) is left out.
    Their jobs are marked done when the block ends; if it raises, nothing is written.
    """
    with transaction(factory) as session:
        locked = select(Job).where(Job.id.in_([c.job_id for c in claims])).order_by(Job.id)
        jobs = {job.id: job for job in session.execute(locked.with_for_update()).scalars()}
        held = [
            claim
            for claim in claims
            if (job := jobs[claim.job_id]).status == JobStatus.RUNNING
            and job.attempts == claim.attempt
            and job.worker == worker
        ]
        cases = _cases(session, [claim.case_id for claim in held])
        yield session, [(claim, cases[claim.case_id]) for claim in held]
        for claim in held:
            jobs[claim.job_id].status, jobs[claim.job_id].lease_until = JobStatus.DONE, None


def audit_scoring(
    session: Session,
    worker: str,
    case: Case,
    action: str,
    outcome: Outcome = Outcome.SUCCESS,
    details: dict[str, object] | None = None,
) -> None:
    """An audit event of the scoring of ``case``, by ``worker``, in the caller's transaction."""
    record(
        session,
        actor=worker,
        action=action,
        code=EventCode.ACCESS,
        object_type="case",
        object_id=case.id,
        outcome=outcome,
        details=details,
    )


def heartbeat(
    factory: sessionmaker[Session],
    *,
    worker: str,
    device: str,
    model_ref: str,
    started_at: datetime,
    batches: int,
    studies: int,
    batch_sizes: Mapping[str, int],
    now: datetime,
) -> None:
    """Record that ``worker`` is alive, with its counters (read by the health view)."""
    with transaction(factory) as session:
        beat = session.get(WorkerBeat, worker)
        if beat is None:
            beat = WorkerBeat(name=worker, device=device, model_ref=model_ref, started_at=started_at)
            session.add(beat)
        beat.last_seen = now
        beat.batches, beat.studies = batches, studies
        beat.batch_sizes = json.dumps(dict(batch_sizes), sort_keys=True)


class Listener:
    """A dedicated PostgreSQL connection that LISTENs for new jobs (or on another ``channel``)."""

    def __init__(self, factory: sessionmaker[Session], channel: str = JOBS_CHANNEL) -> None:
        with factory() as session:
            url = session.get_bind().engine.url.set(drivername="postgresql")
        self.connection = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        self.connection.execute(f"LISTEN {channel}")

    @classmethod
    def open(cls, factory: sessionmaker[Session], channel: str = JOBS_CHANNEL) -> Listener | None:
        """A listener on PostgreSQL; None on a database without LISTEN (SQLite: poll)."""
        with factory() as session:
            if session.get_bind().dialect.name != "postgresql":
                return None
        return cls(factory, channel)

    def wait(self, timeout: float) -> bool:
        """Block until a notification or ``timeout``; False if the connection is unusable."""
        try:
            for _ in self.connection.notifies(timeout=timeout, stop_after=1):
                pass
            return True
        except psycopg.Error:
            return False

    def close(self) -> None:
        self.connection.close()


def _cases(session: Session, ids: list[str]) -> dict[str, Case]:
    """The cases of a batch, loaded with one query."""
    return {case.id: case for case in session.execute(select(Case).where(Case.id.in_(ids))).scalars()}
