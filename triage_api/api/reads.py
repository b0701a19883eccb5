"""Routes for reading a case: claim, release, final read, reprioritise, image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import Response

from triage_api import golive, imaging, reading
from triage_api.auth import Principal, Role
from triage_api.blobs import read_blob
from triage_api.db import transaction
from triage_api.deps import Radiologist, Reader, RuntimeDep, allow
from triage_api.schemas import ClaimOut, PriorityChange, ReadCreate, ReadOut, WorklistItem, worklist_item

router = APIRouter()

RadiologistOrAdmin = Annotated[Principal, allow(Role.RADIOLOGIST, Role.ADMIN)]


def _claim_out(case_id: str, claimed_by: int | None, claimed_at: object) -> ClaimOut:
    return ClaimOut.model_validate({"case_id": case_id, "claimed_by": claimed_by, "claimed_at": claimed_at})


@router.post("/v1/studies/{case_id}/claim", response_model=ClaimOut)
def claim_case(runtime: RuntimeDep, principal: Radiologist, case_id: str) -> ClaimOut:
    """Claim a case for reading (a soft lock other readers see)."""
    with transaction(runtime.factory) as session:
        case = reading.claim(session, principal=principal, case_id=case_id, settings=runtime.settings)
        return _claim_out(case.id, case.claimed_by, case.claimed_at)


@router.delete("/v1/studies/{case_id}/claim", response_model=ClaimOut)
def release_case(runtime: RuntimeDep, principal: RadiologistOrAdmin, case_id: str) -> ClaimOut:
    """Release a claim (the reader who holds it, or an admin)."""
    with transaction(runtime.factory) as session:
        case = reading.release(session, principal=principal, case_id=case_id)
        return _claim_out(case.id, case.claimed_by, case.claimed_at)


@router.post("/v1/studies/{case_id}/reads", response_model=ReadOut, status_code=201)
def record_read(runtime: RuntimeDep, principal: Radiologist, case_id: str, body: ReadCreate) -> ReadOut:
    """Record the final read: agree with the AI, or override it with a reason code."""
    with transaction(runtime.factory) as session:
        read = reading.record_read(session, principal=principal, case_id=case_id, **body.model_dump())
        return ReadOut.model_validate(read, from_attributes=True)


@router.post("/v1/studies/{case_id}/priority", response_model=WorklistItem)
def reprioritise(
    runtime: RuntimeDep, principal: Radiologist, case_id: str, body: PriorityChange
) -> WorklistItem:
    """Move a case to another tier by hand, with a reason; its deadline follows."""
    with transaction(runtime.factory) as session:
        case = reading.reprioritise(
            session, principal=principal, case_id=case_id, settings=runtime.settings, **body.model_dump()
        )
        return worklist_item(case, bool(golive.shown_cases(session, [case])))


@router.get(
    "/v1/studies/{case_id}/image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "application/dicom": {}, "image/jpeg": {}}}},
)
def study_image(runtime: RuntimeDep, principal: Reader, case_id: str) -> Response:
    """The study: the stored original (DICOM with the patient's identity) for radiologists,
    who read it; a rendered grey PNG (pixels only) for uploaders and auditors."""
    original = principal.role is Role.RADIOLOGIST
    with transaction(runtime.factory) as session:
        case = imaging.image_case(session, principal=principal, case_id=case_id, original=original)
    if original:
        return Response(read_blob(runtime.settings.blob_dir, case.sha256), media_type=case.media_type)
    return Response(imaging.case_png(case, runtime.settings), media_type="image/png")
