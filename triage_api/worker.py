"""The scoring worker: claim a batch of jobs, decode, score them in one forward pass, finish.

The same code runs in the API process (the embedded default) and as separate
``triage worker`` processes. Leases, fencing, dead letters and heartbeats are the job
queue's (:mod:`triage_api.jobs`); this module is the scoring loop around it. With
``decode_workers`` set, studies are decoded in a pool of processes
(:mod:`triage_api.decoding`) one batch ahead of the forward pass.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.orm import Session, sessionmaker

from audit.log import Outcome
from models.bundle import Bundle, load_bundle
from triage_api import jobs, live, webhooks
from triage_api.blobs import blob_path
from triage_api.decoding import Decoded, DecodePool, DecodeTask, Gate, decode_study
from triage_api.ingest import DICOM
from triage_api.jobs import Claim
from triage_api.priority import rescored_deadline, tier_of
from triage_api.settings import Settings
from triage_api.tables import Prediction
from triage_api.vocab import CaseStatus

log = logging.getLogger("triage.worker")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Upper bounds of the batch-size histogram a worker reports (``TRIAGE_BATCH_SIZE`` <= 1024)."""


def batch_bucket(size: int) -> str:
    """The histogram bucket of a batch of ``size`` studies: its upper bound, as text."""
    return next((str(bound) for bound in BATCH_BUCKETS if size <= bound), "+Inf")


@dataclass(frozen=True)
class Result:
    status: CaseStatus  # scored | not_analyzed | failed
    reason: str | None = None
    risk: float | None = None
    inference_ms: float | None = None


@dataclass(frozen=True)
class _Ahead:
    """A batch claimed and being decoded while the batch before it is scored."""

    claims: list[Claim]
    decoded: Future[list[Decoded]]


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


class Worker:
    """Claims and scores batches of jobs against the shared database and blob store."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        settings: Settings,
        bundle: Bundle,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.factory = factory
        self.settings = settings
        self.bundle = bundle
        self.clock = clock
        """Now, for leases and timestamps; tests pass a clock that moves only when told."""
        self.name = f"worker:{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self.started_at = clock()
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
        """Take up to ``limit`` jobs under this worker's lease (see :func:`triage_api.jobs.claim`)."""
        return jobs.claim(
            self.factory,
            worker=self.name,
            limit=limit,
            lease=timedelta(seconds=self.settings.lease_seconds),
            max_attempts=self.settings.max_attempts,
            now=self.clock(),
        )

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
                str(blob_path(self.settings.blob_dir, claim.sha256)), claim.media_type == DICOM, self.gate
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
            Result(
                CaseStatus.NOT_ANALYZED if d.status == "not_analyzed" else CaseStatus.FAILED, reason=d.reason
            )
            for d in decoded
        ]
        scored = [(index, d.pixels) for index, d in enumerate(decoded) if d.pixels is not None]
        if scored:
            start = time.perf_counter()
            risks = self.bundle.predict(np.stack([pixels for _, pixels in scored]))
            per_study_ms = (time.perf_counter() - start) * 1000 / len(scored)
            for (index, _), risk in zip(scored, risks, strict=True):
                results[index] = Result(CaseStatus.SCORED, risk=float(risk), inference_ms=per_study_ms)
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
        by_claim = dict(zip(claims, results, strict=True))
        with jobs.finishing(self.factory, claims, worker=self.name) as (session, held):
            for claim, case in held:
                result = by_claim[claim]
                case.status, case.reason = result.status, result.reason
                details: dict[str, object] = {"attempt": claim.attempt, "status": result.status}
                if result.status == CaseStatus.SCORED and result.risk is not None:
                    tier = tier_of(result.risk, card.thresholds)
                    session.add(
                        Prediction(
                            case_id=case.id,
                            attempt=claim.attempt,
                            model_ref=card.ref,
                            risk=result.risk,
                            tier=tier,
                            inference_ms=result.inference_ms or 0.0,
                            created_at=self.clock(),
                        )
                    )
                    case.risk, case.tier, case.model_ref = result.risk, tier, card.ref
                    case.deadline = rescored_deadline(case.deadline, case.received_at, tier, self.settings)
                    details.update(risk=round(result.risk, 6), tier=tier, model=card.ref)
                else:
                    details["reason"] = result.reason
                webhooks.case_scored(session, case, now=self.clock())
                live.publish(session, case, now=self.clock())
                outcome = Outcome.SUCCESS if result.status != CaseStatus.FAILED else Outcome.MINOR_FAILURE
                jobs.audit_scoring(session, self.name, case, f"study.score.{result.status}", outcome, details)
            return len(held)

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
        jobs.heartbeat(
            self.factory,
            worker=self.name,
            device=str(self.bundle.device),
            model_ref=self.bundle.card.ref,
            started_at=self.started_at,
            batches=self.batches,
            studies=self.studies,
            batch_sizes=self.batch_sizes,
            now=self.clock(),
        )
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
        listener: jobs.Listener | None = None
        try:
            listener = jobs.Listener.open(self.factory)
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
