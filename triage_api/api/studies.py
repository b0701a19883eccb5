"""Routes for studies: upload (``POST /v1/studies``) and one case (``GET /v1/studies/{id}``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from triage_api import appeals, cases, golive, ingest, reading
from triage_api.auth import Role
from triage_api.db import transaction
from triage_api.deps import Reader, RuntimeDep, Uploader
from triage_api.schemas import CaseRead, ClinicCase, StudyCreated, case_read

router = APIRouter()


@router.post(
    "/v1/studies",
    response_model=StudyCreated,
    status_code=201,
    responses={200: {"model": StudyCreated, "description": "The same bytes were uploaded before"}},
)
def upload_study(runtime: RuntimeDep, principal: Uploader, file: Annotated[UploadFile, File()]) -> Any:
    """Upload one study (DICOM Part 10, PNG or JPEG) for scoring."""
    for clinic_id in principal.clinic_ids:
        runtime.limiter.take(clinic_id)
    limit = runtime.settings.max_upload_bytes
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise StarletteHTTPException(413, f"file over {limit} bytes")
    case, created = ingest.accept_study(
        runtime.factory,
        reads=runtime.reads,
        principal=principal,
        data=data,
        settings=runtime.settings,
        pseudonym_key=runtime.pseudonym_key,
    )
    body = StudyCreated(
        id=case.id,
        status=case.status,
        sha256=case.sha256,
        received_at=case.received_at,
        deadline=case.deadline,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=201 if created else 200)


@router.get("/v1/studies/{case_id}", response_model=CaseRead | ClinicCase)
def get_study(runtime: RuntimeDep, principal: Reader, case_id: str) -> CaseRead | ClinicCase:
    """One case with its current prediction; a clinic sees where it stands and its result."""
    with transaction(runtime.factory) as session:
        case, prediction = cases.read_case(session, principal=principal, case_id=case_id)
        if principal.role is Role.UPLOADER:
            return appeals.clinic_view(session, [case])[0]
        shown = bool(golive.shown_cases(session, [case]))
        result = appeals.current_result(appeals.result_history(session, case.id))
        return case_read(case, prediction, reading.primary_read(session, case.id), shown, result)
