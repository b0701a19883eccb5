"""Route for the model's heat map (``GET /v1/studies/{case_id}/heatmap``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import Response

from triage_api import imaging
from triage_api.auth import Principal, Role
from triage_api.db import transaction
from triage_api.deps import RuntimeDep, allow

router = APIRouter()

Unblinded = Annotated[Principal, allow(Role.RADIOLOGIST, Role.AUDITOR)]
"""The heat map is the AI's result: readers and auditors, not the clinic (see ``ClinicCase``)."""


@router.get("/v1/studies/{case_id}/heatmap", response_class=Response)
def study_heatmap(runtime: RuntimeDep, principal: Unblinded, case_id: str) -> Response:
    """The model's Grad-CAM heat map over the study, as a PNG overlay (computed once, cached)."""
    with transaction(runtime.factory) as session:
        case = imaging.heatmap_case(session, principal=principal, case_id=case_id)
    png = imaging.heatmap_png(case, runtime.settings)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
