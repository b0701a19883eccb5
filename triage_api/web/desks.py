"""The admin's, the auditor's log and the clinic's upload: pages over the services the API
and the command line use (``users``, ``api.audit``, ``api.studies``), so a change made here
is checked and audited exactly as it is there.

Forms post with the session's CSRF token and answer with a redirect (POST-redirect-GET);
bad input re-renders the page with the reason and changes nothing. A new API key is shown
once: it travels to the next page view sealed (AES-GCM, bound to the session) in a cookie
that page view deletes, never in a URL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from datetime import UTC, date, datetime, timedelta
from typing import Annotated
from urllib.parse import urlencode

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import APIRouter, Cookie, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from triage_api import oversight, users
from triage_api.api import health, studies
from triage_api.api.audit import read_log
from triage_api.auth import Role
from triage_api.db import transaction
from triage_api.deps import Runtime, RuntimeDep
from triage_api.errors import Conflict, InvalidRequest, TriageError
from triage_api.params import Id
from triage_api.schemas import ClinicName, UserCreate
from triage_api.tables import Appeal, User
from triage_api.vocab import AppealStatus
from triage_api.web.sessions import WebUser
from triage_api.web.views import (
    COOKIE,
    AdminPage,
    AuditorPage,
    _back,
    _checked,
    _checked_json,
    _fields,
    _names,
    _page,
    _role,
)

router = APIRouter(include_in_schema=False)

AdminForm = Annotated[WebUser, _role(_checked, Role.ADMIN)]
UploaderFetch = Annotated[WebUser, _role(_checked_json, Role.UPLOADER)]
SessionToken = Annotated[str, Cookie(alias=COOKIE)]


# --- a new key, shown once -------------------------------------------------------------------

KEY_COOKIE = "triage_new_key"
KEY_SECONDS = 300
"""How long a new key waits, sealed, for the page that shows it."""


def _sealer(runtime: Runtime) -> AESGCM:
    key = hmac.new(runtime.pseudonym_key, b"triage: a new API key, shown once", hashlib.sha256).digest()
    return AESGCM(key)


def _bound(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _with_key(
    response: Response, request: Request, runtime: Runtime, token: str, name: str, key: str
) -> Response:
    """Add the sealed key for the next view of the admin page (that view deletes it)."""
    nonce = os.urandom(12)
    sealed = _sealer(runtime).encrypt(
        nonce, json.dumps({"name": name, "key": key, "at": time.time()}).encode(), _bound(token)
    )
    response.set_cookie(
        KEY_COOKIE,
        base64.urlsafe_b64encode(nonce + sealed).decode(),
        max_age=KEY_SECONDS,
        httponly=True,
        samesite="strict",
        secure=runtime.settings.web_secure_cookie or request.url.scheme == "https",
        path="/web/admin",
    )
    return response


def _new_key(runtime: Runtime, token: str, sealed: str | None) -> dict[str, str] | None:
    """The key sealed for this session, if any and fresh; anything else is ignored."""
    if not sealed:
        return None
    try:
        raw = base64.urlsafe_b64decode(sealed.encode())
        opened = json.loads(_sealer(runtime).decrypt(raw[:12], raw[12:], _bound(token)))
    except (ValueError, binascii.Error, InvalidTag):
        return None
    if not isinstance(opened, dict) or time.time() - float(opened.get("at", 0)) > KEY_SECONDS:
        return None
    return {"name": str(opened["name"]), "key": str(opened["key"])}


# --- admin -----------------------------------------------------------------------------------

DONE = {
    "created": "User created.",
    "disabled": "User disabled; their web sessions ended.",
    "enabled": "User enabled again.",
    "password": "Password set; their web sessions ended.",
    "key": "New API key issued.",
    "revoked": "Key revoked; the user's web sessions ended.",
    "clinics": "Clinics saved.",
}
_clinic_names = TypeAdapter(list[ClinicName])


def _split(clinics: str) -> list[str]:
    return [name.strip() for name in clinics.replace("\n", ",").split(",") if name.strip()]


def _admin(
    request: Request,
    runtime: Runtime,
    user: WebUser,
    *,
    status: int = 200,
    error: str | None = None,
    form: dict[str, str] | None = None,
    new_key: dict[str, str] | None = None,
) -> HTMLResponse:
    with runtime.reads() as session:
        people = users.directory(session)
        open_query = select(func.count()).select_from(Appeal).where(Appeal.status == AppealStatus.OPEN)
        open_appeals = session.execute(open_query).scalar_one()
    done = request.query_params.get("done")
    return _page(
        request,
        "admin.html",
        user,
        status=status,
        people=people,
        roles=list(Role),
        health=health.report(runtime),
        open_appeals=open_appeals,
        error=error,
        form=form or {},
        new_key=new_key,
        done=DONE.get(done or "") if status == 200 else None,
    )


def _refused(
    request: Request, runtime: Runtime, user: WebUser, exc: TriageError, **form: str
) -> HTMLResponse:
    """The admin page again with the reason a change was refused (nothing was changed)."""
    status = exc.status if exc.status in (404, 409) else 422
    return _admin(request, runtime, user, status=status, error=exc.message, form=form)


@router.get("/web/admin", response_class=HTMLResponse)
def admin_page(
    request: Request,
    runtime: RuntimeDep,
    user: AdminPage,
    triage_session: SessionToken,
    sealed: Annotated[str | None, Cookie(alias=KEY_COOKIE)] = None,
) -> HTMLResponse:
    """Users, their clinics and keys, the fleet's health and queue; admins see no case data."""
    response = _admin(request, runtime, user, new_key=_new_key(runtime, triage_session, sealed))
    if sealed is not None:
        response.delete_cookie(KEY_COOKIE, path="/web/admin")
    return response


@router.post("/web/admin/users")
def create_user(
    request: Request,
    runtime: RuntimeDep,
    user: AdminForm,
    triage_session: SessionToken,
    name: Annotated[str, Form(max_length=200)] = "",
    role: Annotated[str, Form(max_length=40)] = "",
    clinics: Annotated[str, Form(max_length=4000)] = "",
    password: Annotated[str, Form(max_length=400)] = "",
) -> Response:
    """Create a user (and clinics it names) with a first API key, shown once."""
    form = {"name": name, "role": role, "clinics": clinics}
    try:
        body = UserCreate.model_validate(
            {"name": name.strip(), "role": role, "clinics": _split(clinics), "password": password or None}
        )
    except ValidationError as exc:
        return _refused(request, runtime, user, InvalidRequest(_fields(exc)), **form)
    try:
        with transaction(runtime.factory) as session:
            made, key = users.create_user(session, actor=user.principal.actor, **body.model_dump())
            made_name = made.name
    except IntegrityError:
        return _refused(request, runtime, user, Conflict(f"a user named {body.name} exists"), **form)
    except TriageError as exc:
        return _refused(request, runtime, user, exc, **form)
    return _with_key(_back("/web/admin?done=created"), request, runtime, triage_session, made_name, key)


@router.post("/web/admin/users/{user_id}/disable")
def disable_user(runtime: RuntimeDep, user: AdminForm, user_id: Id) -> Response:
    """Disable a user: no key, password or session of theirs works; their sessions end now."""
    with transaction(runtime.factory) as session:
        users.set_disabled(session, actor=user.principal.actor, user_id=user_id, disabled=True)
    return _back("/web/admin?done=disabled")


@router.post("/web/admin/users/{user_id}/enable")
def enable_user(runtime: RuntimeDep, user: AdminForm, user_id: Id) -> Response:
    """Re-enable a disabled user: their unrevoked keys and password work again."""
    with transaction(runtime.factory) as session:
        users.set_disabled(session, actor=user.principal.actor, user_id=user_id, disabled=False)
    return _back("/web/admin?done=enabled")


@router.post("/web/admin/users/{user_id}/password")
def set_password(
    request: Request,
    runtime: RuntimeDep,
    user: AdminForm,
    user_id: Id,
    password: Annotated[str, Form(max_length=400)] = "",
) -> Response:
    """Set or reset a user's web-login password; their web sessions end."""
    try:
        with transaction(runtime.factory) as session:
            users.set_password(session, actor=user.principal.actor, user_id=user_id, password=password)
    except InvalidRequest as exc:
        return _refused(request, runtime, user, exc)
    return _back("/web/admin?done=password")


@router.post("/web/admin/users/{user_id}/keys")
def issue_key(
    request: Request, runtime: RuntimeDep, user: AdminForm, triage_session: SessionToken, user_id: Id
) -> Response:
    """Issue another API key for the user, shown once."""
    with transaction(runtime.factory) as session:
        holder, key = users.issue_key(session, actor=user.principal.actor, user_id=user_id)
        name = holder.name
    return _with_key(_back("/web/admin?done=key"), request, runtime, triage_session, name, key)


@router.post("/web/admin/keys/{prefix}/revoke")
def revoke_key(
    runtime: RuntimeDep,
    user: AdminForm,
    prefix: Annotated[str, Path(min_length=1, max_length=16, pattern=r"^[0-9a-f]+$")],
) -> Response:
    """Revoke an API key by its public prefix; its user's web sessions end."""
    with transaction(runtime.factory) as session:
        users.revoke_key(session, actor=user.principal.actor, prefix=prefix)
    return _back("/web/admin?done=revoked")


@router.post("/web/admin/users/{user_id}/clinics")
def set_clinics(
    request: Request,
    runtime: RuntimeDep,
    user: AdminForm,
    user_id: Id,
    clinics: Annotated[str, Form(max_length=4000)] = "",
) -> Response:
    """Grant the user exactly the clinics listed (comma-separated; new names are created)."""
    try:
        names = _clinic_names.validate_python(_split(clinics))
    except ValidationError as exc:
        return _refused(request, runtime, user, InvalidRequest(f"clinics: {_fields(exc)}"))
    try:
        with transaction(runtime.factory) as session:
            users.set_clinics(session, actor=user.principal.actor, user_id=user_id, clinics=names)
    except TriageError as exc:
        return _refused(request, runtime, user, exc)
    return _back("/web/admin?done=clinics")


# --- auditor: the log ------------------------------------------------------------------------

LOG_PAGE = 50
"""Events per page of the audit log."""
Day = Annotated[str, Query(max_length=10, pattern=r"^(\d{4}-\d{2}-\d{2})?$")]


def _day(text: str, label: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"{label}: {text} is not a date (YYYY-MM-DD)") from None


def _actor(session: Session, text: str) -> str:
    """A user's name as its actor id (``user:<id>``); anything else (``cli``, ``user:7``) as typed."""
    found = session.execute(select(User.id).where(User.name == text)).scalar_one_or_none()
    return f"user:{found}" if found is not None else text


@router.get("/web/audit/log", response_class=HTMLResponse)
def audit_log(
    request: Request,
    runtime: RuntimeDep,
    user: AuditorPage,
    since: Day = "",
    until: Day = "",
    actor: Annotated[str, Query(max_length=100)] = "",
    case: Annotated[str, Query(max_length=64)] = "",
    action: Annotated[str, Query(max_length=60)] = "",
    before: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> HTMLResponse:
    """The audit log, newest first, filtered by dates, actor, case and action; with the chain
    verified now and the last signed checkpoint. Reading it is audited."""
    chosen = {
        "since": since,
        "until": until,
        "actor": actor.strip(),
        "case": case.strip(),
        "action": action.strip(),
    }
    error, events, names = None, [], {}
    try:
        first, last = _day(since, "from"), _day(until, "to")
        if first and last and first > last:
            raise InvalidRequest("the 'from' date is after the 'to' date")
    except InvalidRequest as exc:
        error, first, last = exc.message, None, None
    with transaction(runtime.factory) as session:
        if error is None:
            events = read_log(
                session,
                principal=user.principal,
                object_type="case" if chosen["case"] else None,
                object_id=chosen["case"] or None,
                actor=_actor(session, chosen["actor"]) if chosen["actor"] else None,
                action=chosen["action"] or None,
                since=datetime.combine(first, datetime.min.time(), UTC) if first else None,
                until=datetime.combine(last, datetime.min.time(), UTC) + timedelta(days=1) if last else None,
                before_seq=before,
                newest_first=True,
                limit=LOG_PAGE,
            )
            ids = {int(e.actor[5:]) for e in events if e.actor.startswith("user:") and e.actor[5:].isdigit()}
            names = _names(session, User, ids)
        status = oversight.chain_status(
            session,
            principal=user.principal,
            key_path=runtime.settings.audit_key_path,
            copy_path=runtime.settings.audit_copy_path,
        )
    kept = {k: v for k, v in chosen.items() if v}
    older = urlencode({**kept, "before": events[-1].seq}) if len(events) == LOG_PAGE else None
    return _page(
        request,
        "audit_log.html",
        user,
        status=422 if error else 200,
        events=events,
        names=names,
        chain=status,
        chosen=chosen,
        error=error,
        paged=before is not None,
        newest=urlencode(kept),
        older=older,
    )


# --- clinic: upload --------------------------------------------------------------------------


@router.post("/web/clinic/upload")
async def clinic_upload(request: Request, runtime: RuntimeDep, user: UploaderFetch) -> JSONResponse:
    """One study as the raw request body (the page sends each file with XMLHttpRequest);
    accepted exactly as ``POST /v1/studies`` accepts it."""
    limit = await run_in_threadpool(studies.admit, runtime, user.principal)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            break  # accept() answers 413 for anything over the limit
    case, created = await run_in_threadpool(studies.accept, runtime, user.principal, bytes(data))
    return JSONResponse(
        {"case_id": case.id, "status": case.status, "created": created}, status_code=201 if created else 200
    )
