"""Operations: ``GET /healthz`` (liveness), ``GET /v1/health`` (JSON), ``GET /metrics`` (Prometheus).

Both read the shared database, so they describe the whole fleet, not one process. They
carry counts and timings only, never patient data.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from audit.checkpoint import tail_status
from audit.copies import copied_head
from triage_api.auth import Principal, Role
from triage_api.deps import Runtime, RuntimeDep, allow
from triage_api.jobs import BATCH_BUCKETS
from triage_api.tables import Case, Job, Prediction, Read, WorkerBeat
from triage_api.vocab import CaseStatus, JobStatus

router = APIRouter()

Operator = Annotated[Principal, allow(Role.ADMIN, Role.AUDITOR)]
ALIVE_SECONDS = 30.0


def _counts(session: Session, column: Any, statuses: type[StrEnum]) -> dict[str, int]:
    rows = session.execute(select(column, func.count().label("n")).group_by(column))
    found = {str(row[0]): int(row.n) for row in rows}
    return {str(status): found.get(status, 0) for status in statuses}


def _fleet(session: Session, now: datetime) -> list[dict[str, Any]]:
    workers = []
    for beat in session.execute(select(WorkerBeat).order_by(WorkerBeat.name)).scalars():
        age = (now - beat.last_seen).total_seconds()
        uptime = max((beat.last_seen - beat.started_at).total_seconds(), 1e-9)
        workers.append(
            {
                "name": beat.name,
                "device": beat.device,
                "model_ref": beat.model_ref,
                "last_seen": beat.last_seen,
                "alive": age <= ALIVE_SECONDS,
                "batches": beat.batches,
                "studies": beat.studies,
                "batches_per_second": beat.batches / uptime,
                "mean_batch_size": beat.studies / beat.batches if beat.batches else None,
                "batch_sizes": _buckets(beat.batch_sizes),
            }
        )
    return workers


def _buckets(stored: str | None) -> dict[str, int]:
    """Batches per bucket upper bound (not cumulative), every bucket present."""
    counts = json.loads(stored) if stored else {}
    return {bucket: int(counts.get(bucket, 0)) for bucket in (*map(str, BATCH_BUCKETS), "+Inf")}


def _batch_size_histogram(workers: list[dict[str, Any]]) -> list[str]:
    lines = [
        "# HELP triage_worker_batch_size Studies per batch the worker scored.",
        "# TYPE triage_worker_batch_size histogram",
    ]
    for w in workers:
        cumulative = 0
        for bucket, count in w["batch_sizes"].items():
            cumulative += count
            lines.append(
                f'triage_worker_batch_size_bucket{{worker="{w["name"]}",le="{bucket}"}} {cumulative}'
            )
        lines.append(f'triage_worker_batch_size_sum{{worker="{w["name"]}"}} {w["studies"]}')
        lines.append(f'triage_worker_batch_size_count{{worker="{w["name"]}"}} {w["batches"]}')
    return lines


def _age(now: datetime, since: datetime | None) -> float:
    """Seconds from ``since`` (naive: UTC, as SQLite returns it) to ``now``; 0 for None."""
    if since is None:
        return 0.0
    return max(0.0, (now - (since if since.tzinfo else since.replace(tzinfo=UTC))).total_seconds())


def _oldest_queued(session: Session) -> datetime | None:
    """When the longest-waiting queued job became claimable (None: the queue is empty)."""
    return session.execute(select(func.min(Job.available_at)).where(Job.status == JobStatus.QUEUED)).scalar()


def _reads_by_agreement(session: Session) -> dict[str, int]:
    """Reads since the start by how they relate to the AI: agreed, overrode, or AI not shown."""
    counts = dict(
        session.execute(select(Read.agrees_with_ai, func.count()).group_by(Read.agrees_with_ai)).all()
    )
    return {"agree": counts.get(True, 0), "override": counts.get(False, 0), "no_ai": counts.get(None, 0)}


def _time_to_score(session: Session, now: datetime) -> list[float]:
    rows = session.execute(
        select(Prediction.created_at, Case.received_at)
        .join(Case, Case.id == Prediction.case_id)
        .where(Prediction.created_at >= now - timedelta(hours=1))
    ).all()
    return [(created - received).total_seconds() for created, received in rows]


@router.get("/healthz", include_in_schema=False)
def healthz() -> dict[str, str]:
    """Liveness for a load balancer: answers while the process serves, without a database."""
    return {"status": "ok"}


@router.get("/v1/health")
def health(runtime: RuntimeDep, principal: Operator) -> dict[str, Any]:
    """Queue depth, workers' heartbeats and the model they run."""
    return report(runtime)


def report(runtime: Runtime) -> dict[str, Any]:
    """The fleet's health (``GET /v1/health``, the admin page): status, jobs by status,
    the oldest queued job's wait, the audit tail and each worker's heartbeat."""
    now = datetime.now(UTC)
    with runtime.reads() as session:
        jobs = _counts(session, Job.status, JobStatus)
        workers = _fleet(session, now)
        oldest = _oldest_queued(session)
        audit = tail_status(session, copied_head(runtime.settings.audit_copy_path))
    alive = any(w["alive"] for w in workers)
    return {
        "status": "ok" if (alive or jobs[JobStatus.QUEUED] == 0) and audit["ok"] else "degraded",
        "database": "ok",
        "audit": audit,
        "jobs": jobs,
        "oldest_queued_seconds": (now - oldest).total_seconds() if oldest else None,
        "workers": workers,
    }


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(runtime: RuntimeDep, principal: Operator) -> str:
    """Prometheus exposition: queue depth and age, cases by status, reads by agreement with
    the AI, workers, batch sizes, time to score."""
    now = datetime.now(UTC)
    with runtime.reads() as session:
        jobs = _counts(session, Job.status, JobStatus)
        oldest = _oldest_queued(session)
        reads = _reads_by_agreement(session)
        cases = _counts(session, Case.status, CaseStatus)
        workers = _fleet(session, now)
        waits = _time_to_score(session, now)
        audit = tail_status(session, copied_head(runtime.settings.audit_copy_path))
    lines = [
        "# HELP triage_audit_tail_ok 1 if the audit events since the last signed checkpoint verify.",
        "# TYPE triage_audit_tail_ok gauge",
        f"triage_audit_tail_ok {int(audit['ok'])}",
        "# HELP triage_audit_unsigned_events Audit events not yet covered by a signed checkpoint.",
        "# TYPE triage_audit_unsigned_events gauge",
        f"triage_audit_unsigned_events {audit['unsigned']}",
        "# HELP triage_jobs Scoring jobs by status.",
        "# TYPE triage_jobs gauge",
        *(f'triage_jobs{{status="{s}"}} {n}' for s, n in jobs.items()),
        "# HELP triage_queue_oldest_seconds How long the oldest queued study has waited (0: none).",
        "# TYPE triage_queue_oldest_seconds gauge",
        f"triage_queue_oldest_seconds {_age(now, oldest):.3f}",
        "# HELP triage_reads_total Reads by agreement with the AI (override rate: override over"
        " agree + override).",
        "# TYPE triage_reads_total counter",
        *(f'triage_reads_total{{agreement="{a}"}} {n}' for a, n in reads.items()),
        "# HELP triage_cases Cases by status.",
        "# TYPE triage_cases gauge",
        *(f'triage_cases{{status="{s}"}} {n}' for s, n in cases.items()),
        "# HELP triage_worker_up 1 if the worker's heartbeat is recent.",
        "# TYPE triage_worker_up gauge",
        *(
            f'triage_worker_up{{worker="{w["name"]}",device="{w["device"]}"}} {int(w["alive"])}'
            for w in workers
        ),
        "# HELP triage_worker_batches_total Batches scored by the worker.",
        "# TYPE triage_worker_batches_total counter",
        *(f'triage_worker_batches_total{{worker="{w["name"]}"}} {w["batches"]}' for w in workers),
        "# HELP triage_worker_studies_total Studies scored by the worker.",
        "# TYPE triage_worker_studies_total counter",
        *(f'triage_worker_studies_total{{worker="{w["name"]}"}} {w["studies"]}' for w in workers),
        *_batch_size_histogram(workers),
        "# HELP triage_time_to_score_seconds Upload to committed prediction, last hour.",
        "# TYPE triage_time_to_score_seconds summary",
    ]
    if waits:
        for q in (0.5, 0.9, 0.99):
            lines.append(f'triage_time_to_score_seconds{{quantile="{q}"}} {float(np.quantile(waits, q)):.6f}')
    lines += [
        f"triage_time_to_score_seconds_count {len(waits)}",
        f"triage_time_to_score_seconds_sum {sum(waits):.6f}",
    ]
    return "\n".join(lines) + "\n"
