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
import random
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
from scipy.special import expit
from scipy.special import logit as log_odds_of
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from audit.log import Outcome
from models.bundle import Bundle, load_bundle
from triage_api import golive, jobs, live, webhooks
from triage_api.blobs import blob_path
from triage_api.decoding import Decoded, DecodePool, DecodeTask, Gate, decode_study
from triage_api.dicom import sr
from triage_api.ingest import DICOM
from triage_api.jobs import Claim, batch_bucket
from triage_api.priority import rescored_deadline, tier_of
from triage_api.settings import Settings
from triage_api.tables import Case, Challenger, ChallengerScore, Clinic, Prediction
from triage_api.vocab import AiMode, CaseStatus

log = logging.getLogger("triage.worker")


@dataclass(frozen=True)
class Result:
    status: CaseStatus  # scored | not_analyzed | failed
    reason: str | None = None
    risk: float | None = None
    """The model card's probability."""
    inference_ms: float | None = None
    logit: float | None = None
    """Log-odds of ``risk`` (:func:`triage_api.golive.log_odds`); derived from ``risk`` if None."""
    challengers: tuple[tuple[int, str, float], ...] = ()
    """``(challenger id, model ref, log-odds)`` of each active challenger on this study."""

    def log_odds(self) -> float:
        if self.logit is not None:
            return self.logit
        return float(log_odds_of(min(max(self.risk or 0.0, 1e-12), 1 - 1e-12)))


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
        rng: random.Random | None = None,
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
        """Batches finished, by :func:`triage_api.jobs.batch_bucket`."""
        self._last_beat = 0.0
        self.gate = Gate.of(bundle.card)
        self.pool: DecodePool | None = None
        """Decode processes; None decodes in this thread. :meth:`run` opens one when
        ``settings.decode_workers`` > 0 and closes it when it stops."""
        self._ahead: _Ahead | None = None
        self.rng = rng or random.SystemRandom()
        """Draws the AI-blind sample (:func:`triage_api.golive.withhold_ai`); tests pass a seeded one."""
        self._challengers: dict[str, Bundle] = {}
        """Challenger bundles by folder, loaded on first use."""

    def challengers(self) -> list[tuple[int, str, Bundle]]:
        """The active challengers ``(id, model ref, bundle)``; one that cannot be loaded is skipped."""
        with self.factory() as session:
            rows = session.execute(select(Challenger).where(Challenger.active.is_(True))).scalars().all()
        loaded = []
        for row in rows:
            if row.bundle_path not in self._challengers:
                try:
                    self._challengers[row.bundle_path] = load_bundle(
                        Path(row.bundle_path), self.settings.device
                    )
                except Exception as exc:
                    log.error("challenger %s cannot be loaded (%s)", row.id, type(exc).__name__)
                    continue
            loaded.append((row.id, row.model_ref, self._challengers[row.bundle_path]))
        return loaded

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
        """Decode and gate claimed studies: in :attr:`pool` if there is one, else in this thread.

        A study of a clinic whose AI is ``off`` is not decoded (nor scored): it is
        ``not_analyzed`` with :data:`~triage_api.golive.AI_OFF_REASON`.
        """
        off = self._ai_off(claims)
        tasks = [
            DecodeTask(
                str(blob_path(self.settings.blob_dir, claim.sha256)),
                claim.media_type == DICOM,
                self.gate,
                self.settings.max_decoded_bytes,
            )
            for claim in claims
            if claim.case_id not in off
        ]
        done = iter(self.pool.map(tasks) if self.pool is not None else [decode_study(task) for task in tasks])
        skipped = Decoded("not_analyzed", reason=golive.AI_OFF_REASON)
        return [skipped if claim.case_id in off else next(done) for claim in claims]

    def _ai_off(self, claims: list[Claim]) -> set[str]:
        """The claimed cases whose clinic's AI is ``off``."""
        if not claims:
            return set()
        with self.factory() as session:
            rows = session.execute(
                select(Case.id)
                .join(Clinic, Clinic.id == Case.clinic_id)
                .where(Case.id.in_([c.case_id for c in claims]), Clinic.ai_mode == AiMode.OFF)
            ).scalars()
            return set(rows)

    def forward(self, decoded: list[Decoded]) -> list[Result]:
        """Score the decoded studies with one forward pass; the others keep their reason.

        Active challengers score the same batch right after the live model (their time is
        not in ``inference_ms``, the live model's forward time divided by the studies).
        """
        results = [
            Result(
                CaseStatus.NOT_ANALYZED if d.status == "not_analyzed" else CaseStatus.FAILED, reason=d.reason
            )
            for d in decoded
        ]
        scored = [(index, d.pixels) for index, d in enumerate(decoded) if d.pixels is not None]
        if scored:
            batch = np.stack([pixels for _, pixels in scored])
            card = self.bundle.card
            start = time.perf_counter()
            logits = golive.log_odds(self.bundle.logits(batch).numpy(), card.temperature, card.positive_index)
            per_study_ms = (time.perf_counter() - start) * 1000 / len(scored)
            others = [
                (
                    cid,
                    ref,
                    golive.log_odds(b.logits(batch).numpy(), b.card.temperature, b.card.positive_index),
                )
                for cid, ref, b in self.challengers()
            ]
            for row, ((index, _), logit) in enumerate(zip(scored, logits, strict=True)):
                results[index] = Result(
                    CaseStatus.SCORED,
                    risk=float(expit(logit)),
                    inference_ms=per_study_ms,
                    logit=float(logit),
                    challengers=tuple((cid, ref, float(values[row])) for cid, ref, values in others),
                )
        return results

    def score(self, claims: list[Claim]) -> list[Result]:
        """Decode, gate and score claimed studies with one forward pass. Never raises for bad pixels."""
        return self.forward(self.decode(claims))

    def finish(self, claims: list[Claim], results: list[Result]) -> int:
        """Write results, in one transaction, for the attempts this worker still holds.

        Each clinic's AI mode decides here: ``off`` stores no score; ``shadow``, and the
        AI-blind sample of ``live``, store the prediction marked hidden and leave the case's
        risk, tier, model and deadline as they were (:mod:`triage_api.golive`). A shown
        score is computed under the clinic's calibration in force.

        Returns:
            How many were written; a claim whose lease was lost to another worker is skipped.
        """
        card = self.bundle.card
        by_claim = dict(zip(claims, results, strict=True))
        with jobs.finishing(self.factory, claims, worker=self.name) as (session, held):
            clinic_ids = {case.clinic_id for _, case in held}
            clinics = {
                c.id: c for c in session.execute(select(Clinic).where(Clinic.id.in_(clinic_ids))).scalars()
            }
            scorings = {cid: golive.scoring_for(golive.in_force(session, cid), card) for cid in clinic_ids}
            challengers: dict[int, set[int]] = {cid: set() for cid in clinic_ids}
            for challenger_id, clinic_id in session.execute(
                select(Challenger.id, Challenger.clinic_id).where(
                    Challenger.clinic_id.in_(clinic_ids), Challenger.active.is_(True)
                )
            ).all():
                challengers[clinic_id].add(challenger_id)
            for claim, case in held:
                clinic, result = clinics[case.clinic_id], by_claim[claim]
                mode = AiMode(clinic.ai_mode)
                if mode is AiMode.OFF and result.status == CaseStatus.SCORED:
                    result = Result(CaseStatus.NOT_ANALYZED, reason=golive.AI_OFF_REASON)
                case.status, case.reason = result.status, result.reason
                details: dict[str, object] = {"attempt": claim.attempt, "status": result.status}
                if result.status == CaseStatus.SCORED and result.risk is not None:
                    scoring = scorings[case.clinic_id]
                    stored = self._store(
                        session, claim, case, result, scoring, clinic, challengers[clinic.id]
                    )
                    details.update(stored)
                    sr.enqueue_result(session, case=case, attempt=claim.attempt, card=card, now=self.clock())
                else:
                    details["reason"] = result.reason
                webhooks.case_scored(session, case, now=self.clock())
                live.publish(session, case, now=self.clock())
                outcome = Outcome.SUCCESS if result.status != CaseStatus.FAILED else Outcome.MINOR_FAILURE
                jobs.audit_scoring(session, self.name, case, f"study.score.{result.status}", outcome, details)
            return len(held)

    def _store(
        self,
        session: Session,
        claim: Claim,
        case: Case,
        result: Result,
        scoring: golive.Scoring,
        clinic: Clinic,
        challenger_ids: set[int],
    ) -> dict[str, object]:
        """The prediction (and challenger scores) of a scored case; the case itself only if shown."""
        card = self.bundle.card
        logit = result.log_odds()
        promoted = {cid: value for cid, _, value in result.challengers}.get(scoring.challenger_id or -1)
        if scoring.challenger_id is not None:
            if promoted is None:  # the promoted challenger did not score: the live model, uncalibrated
                scoring = golive.scoring_for(None, card)
            else:
                logit = promoted
        risk = scoring.risk(logit)
        tier = tier_of(risk, scoring.thresholds)
        mode = AiMode(clinic.ai_mode)
        hidden = golive.withhold_ai(mode, golive.blind_rate(clinic, self.settings), self.rng)
        session.add(
            Prediction(
                case_id=case.id,
                attempt=claim.attempt,
                model_ref=scoring.model_ref,
                risk=risk,
                tier=tier,
                inference_ms=result.inference_ms or 0.0,
                created_at=self.clock(),
                logit=logit,
                calibration_id=scoring.calibration_id,
                ai_hidden=hidden,
            )
        )
        for challenger_id, ref, value in result.challengers:
            if challenger_id in challenger_ids:
                session.add(
                    ChallengerScore(
                        case_id=case.id,
                        challenger_id=challenger_id,
                        model_ref=ref,
                        risk=float(expit(value)),
                        logit=value,
                        created_at=self.clock(),
                    )
                )
        details: dict[str, object] = {"model": scoring.model_ref, "calibration": scoring.calibration_id}
        if hidden:  # the score stays in its prediction row, out of every log
            case.ai_hidden = True
            details["ai_withheld"] = "shadow" if mode is AiMode.SHADOW else "blind_sample"
            return details
        details.update(risk=round(risk, 6), tier=tier)
        case.risk, case.tier, case.model_ref = risk, tier, scoring.model_ref
        case.calibration_id = scoring.calibration_id
        case.deadline = rescored_deadline(case.deadline, case.received_at, tier, self.settings)
        return details

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
