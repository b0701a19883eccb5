"""Routes for studies: upload (``POST /v1/studies``) and one case (``GET /v1/studies/{id}``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from triage_api import appeals, cases, golive, ingest, reading
from triage_api.auth import Principal, Role
from triage_api.db import transaction
from triage_api.deps import Reader, Runtime, RuntimeDep, Uploader
from triage_api.schemas import CaseRead, ClinicCase, StudyCreated, case_read
from triage_api.tables import Case

router = APIRouter()


@router.post(
    "/v1/studies",
    response_model=StudyCreated,
    status_code=201,
    responses={200: {"model": StudyCreated, "description": "The same bytes were uploaded before"}},
)
def upload_study(runtime: RuntimeDep, principal: Uploader, file: Annotated[UploadFile, File()]) -> Any:
    """Upload one study (DICOM Part 10, PNG or JPEG) for scoring."""
    limit = admit(runtime, principal)
    case, created = accept(runtime, principal, file.file.read(limit + 1))
    body = StudyCreated(
        id=case.id,
        status=case.status,
        sha256=case.sha256,
        received_at=case.received_at,
        deadline=case.deadline,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=201 if created else 200)


def admit(runtime: Runtime, principal: Principal) -> int:
    """Take one upload from the clinic's rate limit, before a byte of the study is read.

    Returns:
        The most bytes a study may have (read one more to tell an oversized one).

    Raises:
        TooManyRequests: the clinic sent too many studies lately.
    """
    for clinic_id in principal.clinic_ids:
        runtime.limiter.take(clinic_id)
    return runtime.settings.max_upload_bytes


def accept(runtime: Runtime, principal: Principal, data: bytes) -> tuple[Case, bool]:
    """The one way an uploaded study comes in, from the REST API or the clinic's page.

    Returns:
        The case and whether it is new (see :func:`triage_api.ingest.accept_study`).

    Raises:
        HTTPException: 413, the study is over ``max_upload_bytes``.
        UnsupportedMediaType, InvalidStudy, NotPermitted: refused; nothing is stored.
    """
    limit = runtime.settings.max_upload_bytes
    if len(data) > limit:
        raise StarletteHTTPException(413, f"file over {limit} bytes")
    return ingest.accept_study(
        runtime.factory,
        reads=runtime.reads,
        principal=principal,
        data=data,
        settings=runtime.settings,
        pseudonym_key=runtime.pseudonym_key,
    )


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
