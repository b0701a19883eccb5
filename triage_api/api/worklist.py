"""Route for the worklist (``GET /v1/worklist``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from triage_api import appeals, cases, golive
from triage_api.auth import Role
from triage_api.db import transaction
from triage_api.deps import Reader, RuntimeDep
from triage_api.schemas import ClinicCase, WorklistItem, worklist_item
from triage_api.vocab import CaseStatus, Tier

router = APIRouter()


@router.get("/v1/worklist", response_model=list[WorklistItem] | list[ClinicCase])
def get_worklist(
    runtime: RuntimeDep,
    principal: Reader,
    status: CaseStatus | None = None,
    tier: Tier | None = None,
    unread: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> list[WorklistItem] | list[ClinicCase]:
    """The caller's cases, earliest reading deadline first (a clinic's as :class:`ClinicCase`)."""
    with transaction(runtime.factory) as session:
        rows = cases.worklist(
            session,
            principal=principal,
            status=status,
            tier=tier,
            unread=unread,
            limit=limit,
            offset=offset,
        )
        if principal.role is Role.UPLOADER:
            return appeals.clinic_view(session, rows)
        shown = golive.shown_cases(session, rows)
        return [worklist_item(case, case.id in shown) for case in rows]
