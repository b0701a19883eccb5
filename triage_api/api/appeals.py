"""Routes for appeals: file, list, assign or take, blinded second read, decision."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import Response
from sqlalchemy.orm import Session

from triage_api import appeals, imaging
from triage_api.auth import Principal, Role
from triage_api.db import transaction
from triage_api.deps import Admin, Radiologist, RuntimeDep, Uploader, allow
from triage_api.params import Id
from triage_api.schemas import AppealAssign, AppealCreate, AppealDecision, AppealRead, BlindedCase
from triage_api.tables import Appeal
from triage_api.vocab import AppealStatus

router = APIRouter()

AnyRole = Annotated[Principal, allow(Role.UPLOADER, Role.RADIOLOGIST, Role.AUDITOR, Role.ADMIN)]


def _out(session: Session, appeal: Appeal) -> AppealRead:
    second = appeals.second_read(session, appeal)
    return AppealRead.model_validate(
        {
            **{c.name: getattr(appeal, c.name) for c in Appeal.__table__.columns if c.name != "filed_by"},
            "second_read_finding": second.finding if second else None,
        }
    )


@router.post("/v1/appeals", response_model=AppealRead, status_code=201)
def file_appeal(runtime: RuntimeDep, principal: Uploader, body: AppealCreate) -> AppealRead:
    """File an appeal on one of the clinic's cases, on behalf of its patient."""
    with transaction(runtime.factory) as session:
        appeal = appeals.file_appeal(
            session, principal=principal, due_hours=runtime.settings.appeal_due_hours, **body.model_dump()
        )
        return _out(session, appeal)


@router.get("/v1/appeals", response_model=list[AppealRead])
def list_appeals(
    runtime: RuntimeDep,
    principal: AnyRole,
    status: AppealStatus | None = None,
) -> list[AppealRead]:
    """Appeals the caller may see: a clinic its own, auditors their clinics', readers theirs."""
    with runtime.reads() as session:
        return [_out(session, a) for a in appeals.list_appeals(session, principal=principal, status=status)]


@router.get("/v1/appeals/{appeal_id}", response_model=AppealRead)
def get_appeal(runtime: RuntimeDep, principal: AnyRole, appeal_id: Id) -> AppealRead:
    """One appeal, with its outcome once decided."""
    with runtime.reads() as session:
        return _out(session, appeals.visible_appeal(session, principal, appeal_id))


@router.post("/v1/appeals/{appeal_id}/take", response_model=AppealRead)
def take_appeal(runtime: RuntimeDep, principal: Radiologist, appeal_id: Id) -> AppealRead:
    """Take an open appeal as its second reader (not if you made the first read)."""
    with transaction(runtime.factory) as session:
        return _out(session, appeals.take_appeal(session, principal=principal, appeal_id=appeal_id))


@router.post("/v1/appeals/{appeal_id}/assign", response_model=AppealRead)
def assign_appeal(runtime: RuntimeDep, principal: Admin, appeal_id: Id, body: AppealAssign) -> AppealRead:
    """Assign an open appeal to a radiologist who did not make the first read."""
    with transaction(runtime.factory) as session:
        appeal = appeals.assign_appeal(
            session, principal=principal, appeal_id=appeal_id, reader_id=body.reader_id
        )
        return _out(session, appeal)


@router.get("/v1/appeals/{appeal_id}/case", response_model=BlindedCase)
def blinded_case(runtime: RuntimeDep, principal: Radiologist, appeal_id: Id) -> BlindedCase:
    """The assigned second reader's view of the case: no AI score, no first read."""
    with transaction(runtime.factory) as session:
        appeal, case = appeals.blinded_view(session, principal=principal, appeal_id=appeal_id)
        return BlindedCase(
            appeal_id=appeal.id,
            case_id=case.id,
            media_type=case.media_type,
            modality=case.modality,
            body_part=case.body_part,
            view_position=case.view_position,
            age_band=case.age_band,
            received_at=case.received_at,
        )


@router.get(
    "/v1/appeals/{appeal_id}/image", response_class=Response, responses={200: {"content": {"image/png": {}}}}
)
def blinded_image(runtime: RuntimeDep, principal: Radiologist, appeal_id: Id) -> Response:
    """The study as a grey PNG for the assigned second reader: pixels, without the DICOM
    header (its identity and any prior report text)."""
    with transaction(runtime.factory) as session:
        _, case = appeals.blinded_view(session, principal=principal, appeal_id=appeal_id)
    return Response(imaging.case_png(case, runtime.settings), media_type="image/png")


@router.post("/v1/appeals/{appeal_id}/decision", response_model=AppealRead)
def decide_appeal(
    runtime: RuntimeDep, principal: Radiologist, appeal_id: Id, body: AppealDecision
) -> AppealRead:
    """Record the second read and the outcome that goes back to the clinic."""
    with transaction(runtime.factory) as session:
        appeal, _ = appeals.decide(session, principal=principal, appeal_id=appeal_id, **body.model_dump())
        return _out(session, appeal)
