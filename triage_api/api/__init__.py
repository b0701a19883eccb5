"""The REST API: one module per resource, each with an ``APIRouter``.

Routes are thin: they parse the request, call one service function (which raises domain
errors, mapped to HTTP in :mod:`triage_api.errors`) and shape the response. The web pages
(:mod:`triage_api.web`) call the same services.

- :mod:`.studies`: upload a study, read one case
- :mod:`.worklist`: the caller's cases, by deadline
- :mod:`.users`: users and API keys (admin)
- :mod:`.reads`: claim, read, reprioritise, the study image
- :mod:`.images`: the model's heat map
- :mod:`.appeals`: file, assign, take and decide appeals
- :mod:`.audit`: the audit log, scoped by role
- :mod:`.monitoring`: model performance metrics
- :mod:`.health`: liveness, health and Prometheus metrics
- :mod:`.dicomweb`: DICOMweb STOW-RS in, a read-only QIDO-RS/WADO-RS subset
- :mod:`.webhooks`: a clinic's signed webhook subscriptions and their deliveries
- :mod:`.live`: the worklist as server-sent events
- :mod:`.clinics`: a clinic's AI mode, local validation, site calibrations, challengers
"""

from __future__ import annotations

from fastapi import APIRouter

from triage_api.api import (
    appeals,
    audit,
    clinics,
    dicomweb,
    health,
    images,
    live,
    monitoring,
    reads,
    studies,
    users,
    webhooks,
    worklist,
)

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    studies.router,
    worklist.router,
    users.router,
    reads.router,
    appeals.router,
    monitoring.router,
    audit.router,
    images.router,
    clinics.router,
    dicomweb.router,
    webhooks.router,
    live.router,
)
"""Every REST router, in the order their routes are matched."""
