"""Monitoring routes (``GET /v1/metrics/model``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select

from audit.log import EventCode, record
from triage_api import monitoring
from triage_api.db import transaction
from triage_api.deps import Auditor, RuntimeDep
from triage_api.errors import InvalidRequest
from triage_api.params import Id, Instant
from triage_api.tables import Alert

router = APIRouter()


@router.get("/v1/metrics/model")
def model_metrics(
    runtime: RuntimeDep,
    principal: Auditor,
    model: Annotated[str | None, Query(max_length=100)] = None,
    clinic_id: Id | None = None,
    since: Instant | None = None,
    until: Instant | None = None,
) -> dict[str, Any]:
    """AI against final reads, overrides, appeals, time to read, gating and drift, per model version."""
    until = until or datetime.now(UTC)
    since = since or until - timedelta(days=30)
    if since >= until:
        raise InvalidRequest("since must be before until")
    window = monitoring.Window(since, until)
    with transaction(runtime.factory) as session:
        models = monitoring.model_metrics(
            session,
            principal=principal,
            window=window,
            model_ref=model,
            clinic_id=clinic_id,
            validation=monitoring.validation_histograms(runtime.settings.model_path),
        )
        alerts = session.execute(
            select(Alert)
            .where(
                Alert.clinic_id.in_(principal.clinic_ids), Alert.created_at >= since, Alert.created_at < until
            )
            .order_by(Alert.created_at.desc())
        ).scalars()
        record(
            session,
            actor=principal.actor,
            action="metrics.model",
            code=EventCode.QUERY,
            object_type="metrics",
            object_id=model or "all",
            details={"clinic": clinic_id, "since": since.isoformat(), "until": until.isoformat()},
        )
        return {
            "window": {"since": since, "until": until},
            "models": models,
            "alerts": [{c.name: getattr(alert, c.name) for c in Alert.__table__.columns} for alert in alerts],
        }
