"""DICOMweb routes: STOW-RS (uploader), and a read-only QIDO-RS / WADO-RS subset (readers).

Supported: ``POST /dicom-web/studies``; QIDO ``GET /studies``, ``/studies/{study}/series``,
``/studies/{study}/instances``, ``/studies/{study}/series/{series}/instances``; WADO
``/studies/{study}/metadata``, ``/studies/{study}/series/{series}/metadata``,
``.../instances/{sop}`` and ``.../instances/{sop}/frames/{frames}``. See
:mod:`triage_api.dicom.web` for what each returns.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from triage_api import ingest
from triage_api.auth import Principal, Role
from triage_api.db import transaction
from triage_api.deps import RuntimeDep, Uploader, allow
from triage_api.dicom import web
from triage_api.errors import InvalidRequest
from triage_api.tables import Case

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])

ImageReader = Annotated[Principal, allow(Role.RADIOLOGIST, Role.AUDITOR)]
QIDO_FILTERS = ("StudyInstanceUID", "AccessionNumber", "ModalitiesInStudy")


def _json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=web.DICOM_JSON)


@router.post("/studies")
async def store_instances(request: Request, runtime: RuntimeDep, principal: Uploader) -> JSONResponse:
    """STOW-RS: store DICOM instances (multipart/related; type="application/dicom")."""
    parts = web.multipart_parts(request.headers.get("content-type", ""), await request.body())
    outcome = web.StowOutcome()
    root = str(request.base_url).rstrip("/") + "/dicom-web"

    def accept(data: bytes) -> Case:
        for clinic_id in principal.clinic_ids:
            runtime.limiter.take(clinic_id)
        case, _created = ingest.accept_study(
            runtime.factory,
            reads=runtime.reads,
            principal=principal,
            data=data,
            settings=runtime.settings,
            pseudonym_key=runtime.pseudonym_key,
        )
        return case

    for data in parts:
        await run_in_threadpool(outcome.add, data, accept, root)
    return _json(outcome.body(), outcome.status_code())


@router.get("/studies")
def search_studies(
    request: Request,
    runtime: RuntimeDep,
    principal: ImageReader,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> JSONResponse:
    """QIDO-RS: the caller's studies (matching StudyInstanceUID, AccessionNumber, ModalitiesInStudy)."""
    filters = {key: value for key, value in request.query_params.items() if key in QIDO_FILTERS}
    with transaction(runtime.factory) as session:
        return _json(web.studies(session, principal, filters=filters, limit=limit, offset=offset))


@router.get("/studies/{study}/series")
def search_series(runtime: RuntimeDep, principal: ImageReader, study: str) -> JSONResponse:
    """QIDO-RS: the series of a study."""
    with transaction(runtime.factory) as session:
        found = web.instances(session, principal, runtime.settings.blob_dir, study=study)
        return _json(web.series_of(found))


@router.get("/studies/{study}/instances")
@router.get("/studies/{study}/series/{series}/instances")
def search_instances(
    runtime: RuntimeDep, principal: ImageReader, study: str, series: str | None = None
) -> JSONResponse:
    """QIDO-RS: the instances of a study or series."""
    with transaction(runtime.factory) as session:
        found = web.instances(session, principal, runtime.settings.blob_dir, study=study, series=series)
        return _json(web.instance_rows(found))


@router.get("/studies/{study}/metadata")
@router.get("/studies/{study}/series/{series}/metadata")
def retrieve_metadata(
    runtime: RuntimeDep, principal: ImageReader, study: str, series: str | None = None
) -> JSONResponse:
    """WADO-RS: allow-listed metadata of a study or series."""
    with transaction(runtime.factory) as session:
        found = web.instances(session, principal, runtime.settings.blob_dir, study=study, series=series)
        web.audit_access(session, principal, found, "dicomweb.metadata")
        return _json(web.metadata(found))


@router.get("/studies/{study}/series/{series}/instances/{sop}")
def retrieve_instance(
    runtime: RuntimeDep, principal: ImageReader, study: str, series: str, sop: str
) -> Response:
    """WADO-RS: one instance, allow-listed header around its pixel data as stored."""
    with transaction(runtime.factory) as session:
        found = web.instances(
            session, principal, runtime.settings.blob_dir, study=study, series=series, sop=sop
        )
        web.audit_access(session, principal, found, "dicomweb.retrieve")
    body, boundary = web.multipart([(web.part10(found[0], runtime.settings.blob_dir), ingest.DICOM)])
    return Response(body, media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}")
def retrieve_frames(
    runtime: RuntimeDep,
    principal: ImageReader,
    study: str,
    series: str,
    sop: str,
    frame_list: str,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """WADO-RS: frames, as stored when the client accepts any transfer syntax, else decoded."""
    try:
        numbers = [int(n) for n in frame_list.split(",")][:64]
    except ValueError:
        raise InvalidRequest("frame numbers are integers separated by commas") from None
    as_stored = "transfer-syntax=*" in (accept or "").replace(" ", "")
    with transaction(runtime.factory) as session:
        found = web.instances(
            session, principal, runtime.settings.blob_dir, study=study, series=series, sop=sop
        )
        web.audit_access(session, principal, found, "dicomweb.frames")
    frames, syntax = web.frames(found[0], runtime.settings.blob_dir, numbers, as_stored=as_stored)
    media = f"application/octet-stream; transfer-syntax={syntax}"
    body, boundary = web.multipart([(frame, media) for frame in frames])
    return Response(
        body, media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}'
    )
