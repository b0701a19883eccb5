"""The scoring worker: claim jobs under a lease, score them in a batch, write results fenced.

The same code runs in the API process (the embedded default) and as separate
``triage worker`` processes. A worker that dies mid-job loses nothing: its lease expires
and another worker claims the job again; a late write from the dead attempt is discarded
because the result is fenced by the attempt number. With ``decode_workers`` set, studies
are decoded in a pool of processes (:mod:`triage_api.decoding`) one batch ahead of the
forward pass.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import torch
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from audit.log import EventCode, Outcome, record
from models.bundle import Bundle, ModelCard, load_bundle
from triage_api.db import transaction
from triage_api.decoding import Decoded, DecodePool, DecodeTask, Gate, decode_study
from triage_api.ingest import DICOM, JOBS_CHANNEL, blob_path
from triage_api.settings import Settings
from triage_api.tables import Case, Job, Prediction, WorkerBeat

log = logging.getLogger("triage.worker")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Upper bounds of the batch-size histogram a worker reports (``TRIAGE_BATCH_SIZE`` <= 1024)."""


def batch_bucket(size: int) -> str:
    """The histogram bucket of a batch of ``size`` studies: its upper bound, as text."""
    return next((str(bound) for bound in BATCH_BUCKETS if size <= bound), "+Inf")


@dataclass(frozen=True)
class Claim:
    job_id: int
    case_id: str
    attempt: int
    sha256: str
    media_type: str


@dataclass(frozen=True)
class Result:
    status: str  # scored | not_analyzed | failed
    reason: str | None = None
    risk: float | None = None
    inference_ms: float | None = None


@dataclass(frozen=True)
class _Ahead:
    """A batch claimed and being decoded while the batch before it is scored."""

    claims: list[Claim]
    decoded: Future[list[Decoded]]


class _Listener:
    """A dedicated PostgreSQL connection that LISTENs for new jobs."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        with factory() as session:
            url = session.get_bind().engine.url.set(drivername="postgresql")
        self.connection = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        self.connection.execute(f"LISTEN {JOBS_CHANNEL}")

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


def cpu_budget(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

    torch sizes its thread pool from the machine's cores, not from a container's quota:
    a worker limited to 4 CPUs on a 64-core host would run 32 threads on 4 CPUs' time.
    """
    cores = len(os.sched_getaffinity(0))
    try:  # cgroup v2: "max 100000" or "<quota> <period>" in microseconds
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:  # cgroup v1
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return cores
    if quota in ("max", "-1") or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return cores
    return max(1, min(cores, int(quota) // int(period)))


def load_model(settings: Settings) -> Bundle:
    """The bundle a worker serves, on ``settings.device``; on CPU, with the forward pass's
    thread count set (``settings.torch_threads``, see :func:`cpu_budget`)."""
    if torch.device(settings.device).type == "cpu":
        threads = settings.torch_threads or (None if os.environ.get("OMP_NUM_THREADS") else cpu_budget())
        if threads is not None:
            torch.set_num_threads(threads)
    return load_bundle(settings.model_path, settings.device, compile=settings.compile_model)


def _cases(session: Session, ids: list[str]) -> dict[str, Case]:
    """The cases of a batch, loaded with one query."""
    return {case.id: case for case in session.execute(select(Case).where(Case.id.in_(ids))).scalars()}


def tier_of(risk: float, card: ModelCard) -> str:
    if risk >= card.thresholds.critical:
        return "critical"
    if risk >= card.thresholds.elevated:
        return "elevated"
    return "routine"


def sla(tier: str, settings: Settings) -> timedelta:
    minutes = {
        "critical": settings.sla_critical_minutes,
        "elevated": settings.sla_elevated_minutes,
    }.get(tier, settings.sla_routine_minutes)
    return timedelta(minutes=minutes)


class Worker:
    """Claims and scores batches of jobs against the shared database and blob store."""

    def __init__(self, factory: sessionmaker[Session], settings: Settings, bundle: Bundle) -> None:
        self.factory = factory
        self.settings = settings
        self.bundle = bundle
        self.name = f"worker:{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self.started_at = datetime.now(UTC)
        self.batches = self.studies = 0
        self.batch_sizes: Counter[str] = Counter()
        """Batches finished, by :func:`batch_bucket`."""
        self._last_beat = 0.0
        self.gate = Gate.of(bundle.card)
        self.pool: DecodePool | None = None
        """Decode processes; None decodes in this thread. :meth:`run` opens one when
        ``settings.decode_workers`` > 0 and closes it when it stops."""
        self._ahead: _Ahead | None = None

    def claim(self, limit: int = 1) -> list[Claim]:
        """Take up to ``limit`` of the oldest queued jobs, or jobs whose lease expired.

        Commits at once: no transaction is held while scoring. On PostgreSQL the rows are
        locked with ``SKIP LOCKED`` so that concurrent workers take different jobs; a job
        past ``max_attempts`` becomes a dead letter and its case ``failed``, visibly.
        """
        now = datetime.now(UTC)
        claims: list[Claim] = []
        with transaction(self.factory) as session:
            query = (
                select(Job)
                .where(or_(Job.status == "queued", and_(Job.status == "running", Job.lease_until < now)))
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
                if job.attempts > self.settings.max_attempts:
                    job.status, job.lease_until = "dead", None
                    case.status = "failed"
                    case.reason = f"scoring gave up after {self.settings.max_attempts} attempts"
                    self._audit(session, case, "study.score.failed", Outcome.SERIOUS_FAILURE)
                    continue
                job.status, job.worker = "running", self.name
                job.lease_until = now + timedelta(seconds=self.settings.lease_seconds)
                case.status = "running"
                self._audit(session, case, "study.score.start", details={"attempt": job.attempts})
                claims.append(Claim(job.id, case.id, job.attempts, case.sha256, case.media_type))
        return claims

    def claim_batch(self) -> list[Claim]:
        """Claim up to ``batch_size`` jobs; if fewer were waiting, wait ``batch_wait_ms``
        once and claim more, so that a burst of uploads is scored in full batches."""
        size, wait = self.settings.batch_size, self.settings.batch_wait_ms / 1000
        claims = self.claim(size)
        if claims and len(claims) < size and wait > 0:
            time.sleep(wait)
            claims += self.claim(size - len(claims))
        return claims

    def decode(self, claims: list[Claim]) -> list[Decoded]:
        """Decode and gate claimed studies: in :attr:`pool` if there is one, else in this thread."""
        tasks = [
            DecodeTask(
                str(blob_path(self.settings.blob_dir, claim.sha256)),
                claim.media_type == DICOM,
                self.gate,
                self.settings.max_decoded_bytes,
            )
            for claim in claims
        ]
        if self.pool is not None:
            return self.pool.map(tasks)
        return [decode_study(task) for task in tasks]

    def forward(self, decoded: list[Decoded]) -> list[Result]:
        """Score the decoded studies with one forward pass; the others keep their reason.

        ``inference_ms`` is the batch's forward time divided by the studies in it.
        """
        results = [
            Result("not_analyzed" if d.status == "not_analyzed" else "failed", reason=d.reason)
            for d in decoded
        ]
        scored = [(index, d.pixels) for index, d in enumerate(decoded) if d.pixels is not None]
        if scored:
            start = time.perf_counter()
            risks = self.bundle.predict(np.stack([pixels for _, pixels in scored]))
            per_study_ms = (time.perf_counter() - start) * 1000 / len(scored)
            for (index, _), risk in zip(scored, risks, strict=True):
                results[index] = Result("scored", risk=float(risk), inference_ms=per_study_ms)
        return results

    def score(self, claims: list[Claim]) -> list[Result]:
        """Decode, gate and score claimed studies with one forward pass. Never raises for bad pixels."""
        return self.forward(self.decode(claims))

    def finish(self, claims: list[Claim], results: list[Result]) -> int:
        """Write results, in one transaction, for the attempts this worker still holds.

        Returns:
            How many were written; a claim whose lease was lost to another worker is skipped.
        """
        card = self.bundle.card
        written = 0
        with transaction(self.factory) as session:
            locked = select(Job).where(Job.id.in_([c.job_id for c in claims])).order_by(Job.id)
            jobs = {job.id: job for job in session.execute(locked.with_for_update()).scalars()}
            cases = _cases(session, [claim.case_id for claim in claims])
            for claim, result in zip(claims, results, strict=True):
                job = jobs[claim.job_id]
                if job.status != "running" or job.attempts != claim.attempt or job.worker != self.name:
                    continue
                case = cases[claim.case_id]
                case.status, case.reason = result.status, result.reason
                details: dict[str, object] = {"attempt": claim.attempt, "status": result.status}
                if result.status == "scored" and result.risk is not None:
                    tier = tier_of(result.risk, card)
                    session.add(
                        Prediction(
                            case_id=case.id,
                            attempt=claim.attempt,
                            model_ref=card.ref,
                            risk=result.risk,
                            tier=tier,
                            inference_ms=result.inference_ms or 0.0,
                            created_at=datetime.now(UTC),
                        )
                    )
                    case.risk, case.tier, case.model_ref = result.risk, tier, card.ref
                    # A rescore may move a deadline earlier, never later.
                    case.deadline = min(case.deadline, case.received_at + sla(tier, self.settings))
                    details.update(risk=round(result.risk, 6), tier=tier, model=card.ref)
                else:
                    details["reason"] = result.reason
                job.status, job.lease_until = "done", None
                outcome = Outcome.SUCCESS if result.status != "failed" else Outcome.MINOR_FAILURE
                self._audit(session, case, f"study.score.{result.status}", outcome, details)
                written += 1
        return written

    def run_once(self) -> bool:
        """Claim, score and finish one batch; False when there was nothing to do."""
        claims = self.claim_batch()
        if claims:
            self._complete(claims, self.score(claims))
        self.heartbeat()
        return bool(claims)

    def run_ahead(self, feeder: ThreadPoolExecutor) -> bool:
        """One step of the pipeline: claim batch N+1 and start decoding it, then score batch N.

        The decoding of the next batch (in :attr:`pool`, driven from ``feeder``'s thread)
        overlaps the forward pass of this one. Each batch is still claimed, leased and
        finished, fenced by attempt, exactly as in :meth:`run_once`; if this step fails,
        the batch being scored is left to its lease like any crashed attempt.

        Returns:
            False when there was nothing to do.
        """
        claims = self.claim_batch()
        upcoming = _Ahead(claims, feeder.submit(self.decode, claims)) if claims else None
        current, self._ahead = self._ahead, upcoming
        if current is not None:
            self._complete(current.claims, self.forward(current.decoded.result()))
        self.heartbeat()
        return current is not None or upcoming is not None

    def drain(self) -> None:
        """Score and finish the batch decoded ahead, if any (on stop)."""
        current, self._ahead = self._ahead, None
        if current is not None:
            self._complete(current.claims, self.forward(current.decoded.result()))

    def _complete(self, claims: list[Claim], results: list[Result]) -> None:
        self.finish(claims, results)
        self.batches += 1
        self.studies += len(claims)
        self.batch_sizes[batch_bucket(len(claims))] += 1

    def heartbeat(self, every_seconds: float = 5.0) -> None:
        """Record that this worker is alive (at most every ``every_seconds``)."""
        if time.monotonic() - self._last_beat < every_seconds:
            return
        with transaction(self.factory) as session:
            beat = session.get(WorkerBeat, self.name)
            if beat is None:
                beat = WorkerBeat(
                    name=self.name,
                    device=str(self.bundle.device),
                    model_ref=self.bundle.card.ref,
                    started_at=self.started_at,
                )
                session.add(beat)
            beat.last_seen = datetime.now(UTC)
            beat.batches, beat.studies = self.batches, self.studies
            beat.batch_sizes = json.dumps(dict(self.batch_sizes), sort_keys=True)
        self._last_beat = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; a failing iteration is logged, never fatal.

        With ``settings.decode_workers`` > 0, studies are decoded in a pool of that many
        processes, one batch ahead of the forward pass (:meth:`run_ahead`); the pool is
        closed when the worker stops. When idle it sleeps for ``poll_seconds``; on
        PostgreSQL a ``NOTIFY`` from an upload wakes it at once (polling stays the
        fallback if the listening connection drops).
        """
        workers, bound = self.settings.decode_workers, self.settings.decode_timeout_seconds
        owned = DecodePool(workers, bound) if workers else None
        self.pool = owned or self.pool
        feeder = ThreadPoolExecutor(1, thread_name_prefix="triage-decode") if self.pool else None
        listener: _Listener | None = None
        try:
            listener = _Listener(self.factory) if self._on_postgres() else None
            self.warm_up()
            while not stop.is_set():
                try:
                    busy = self.run_ahead(feeder) if feeder is not None else self.run_once()
                except Exception as exc:
                    # The type only: messages from decoders may quote header values (PHI).
                    log.error("worker iteration failed (%s); retrying", type(exc).__name__)
                    busy = False
                if busy:
                    continue
                if listener is not None:
                    if listener.wait(self.settings.poll_seconds):
                        continue
                    listener.close()  # broken: fall back to polling
                    listener = None
                stop.wait(self.settings.poll_seconds)
            try:
                self.drain()
            except Exception as exc:
                log.error("finishing the last batch failed (%s); its lease will expire", type(exc).__name__)
        finally:
            if listener is not None:
                listener.close()
            if feeder is not None:
                feeder.shutdown(wait=True, cancel_futures=True)
            if owned is not None:
                owned.close()
                self.pool = None

    def warm_up(self) -> None:
        """One forward pass of a full batch of zeros, so that the first real batch does not
        pay for kernel selection and allocations (and its latency is the steady one)."""
        size = self.bundle.card.preprocessing.input_size
        try:
            self.bundle.predict(np.zeros((self.settings.batch_size, 3, size, size), dtype=np.float32))
        except Exception as exc:
            log.error("warm-up failed (%s)", type(exc).__name__)

    def _on_postgres(self) -> bool:
        with self.factory() as session:
            return session.get_bind().dialect.name == "postgresql"

    def _audit(
        self,
        session: Session,
        case: Case,
        action: str,
        outcome: Outcome = Outcome.SUCCESS,
        details: dict[str, object] | None = None,
    ) -> None:
        record(
            session,
            actor=self.name,
            action=action,
            code=EventCode.ACCESS,
            object_type="case",
            object_id=case.id,
            outcome=outcome,
            details=details,
        )
