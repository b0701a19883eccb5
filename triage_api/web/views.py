"""Pages for radiologists, clinics and auditors, over the services the REST API uses.

A signed-in user becomes the same :class:`~triage_api.auth.Principal` an API key gives, so
clinic scope, blinding and roles are enforced by the same functions (``cases``,
``reading``, ``appeals``, ``monitoring``, ``audit``). Every POST needs the session's CSRF
token, as a ``csrf_token`` form field or an ``X-CSRF-Token`` header.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Cookie, Depends, FastAPI, Form, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.bundle import BundleError, ModelCard, read_card
from triage_api import appeals, cases, golive, imaging, monitoring, oversight, reading
from triage_api.auth import Principal, Role
from triage_api.db import transaction
from triage_api.deps import Runtime, RuntimeDep
from triage_api.errors import InvalidRequest, NotAuthenticated, TriageError
from triage_api.params import Id
from triage_api.schemas import AppealCreate, AppealDecision, PriorityChange, ReadCreate
from triage_api.tables import Case, Clinic, User
from triage_api.vocab import (
    AppealCategory,
    CaseStatus,
    Finding,
    OverrideReason,
    PriorityReason,
    Tier,
)
from triage_api.web import charts, sessions
from triage_api.web.sessions import LoginThrottle, WebUser

HERE = Path(__file__).resolve().parent
COOKIE = "triage_session"
LOGIN_COOKIE = "triage_login_csrf"

templates = Jinja2Templates(directory=str(HERE / "templates"))
CASE_ID = re.compile(r"[0-9a-f]{32}")
"""A case id as the service makes them (``uuid4().hex``)."""


def utc(moment: datetime | str) -> str:
    """The one way pages write a time: ``2026-03-01 14:05 UTC`` (worklist.js writes the same).

    The audit log keeps its times as ISO 8601 text; those are read back first.
    """
    when = datetime.fromisoformat(moment) if isinstance(moment, str) else moment
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


templates.env.filters["duration"] = charts.duration
templates.env.filters["utc"] = utc
router = APIRouter(include_in_schema=False)

HOME = {
    Role.RADIOLOGIST: "/web/worklist",
    Role.UPLOADER: "/web/clinic",
    Role.AUDITOR: "/web/audit",
    Role.ADMIN: "/web/admin",
}


class CsrfRefused(TriageError):
    status, code = 403, "csrf_refused"


REAUDIT_SECONDS = 300.0
"""A worklist poll that shows the same cases again within this time writes no new event."""


class PollAudit:
    """Which worklist views each user was shown lately, and when that was audited.

    The page polls every few seconds; an audit event per poll would bury the log (about
    1,200 events an hour per open worklist). A poll is audited (110112) when what it shows
    changed (a case came, went or changed status), and at least every ``seconds`` anyway.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._seen: dict[tuple[Any, ...], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def due(self, key: tuple[Any, ...], shown: str) -> bool:
        """Whether showing ``shown`` (a digest of the rows) under ``key`` needs an audit event."""
        with self._lock:
            last = self._seen.get(key)
        return last is None or last[0] != shown or time.monotonic() - last[1] >= self.seconds

    def audited(self, key: tuple[Any, ...], shown: str) -> None:
        """Note that the event for ``shown`` committed."""
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen = {k: v for k, v in self._seen.items() if now - v[1] < self.seconds}
            self._seen[key] = (shown, now)


class WebState:
    """Per-process web state: the login throttle and the worklist polls' audit memory."""

    def __init__(self, failures: int, window_minutes: float, ceiling: int) -> None:
        self.throttle = LoginThrottle(failures, window_minutes * 60, ceiling)
        self.polls = PollAudit(REAUDIT_SECONDS)


def _state(request: Request) -> WebState:
    state: WebState | None = getattr(request.app.state, "web", None)
    if state is None:
        runtime: Runtime = request.app.state.runtime
        state = WebState(
            runtime.settings.web_login_failures,
            runtime.settings.web_login_window_minutes,
            runtime.settings.web_login_ceiling,
        )
        request.app.state.web = state
    return state


def _user(runtime: RuntimeDep, triage_session: Annotated[str | None, Cookie(alias=COOKIE)] = None) -> WebUser:
    # Most requests only read (no write lock on SQLite); expiry and the idle clock write.
    with runtime.reads() as session:
        user, write = sessions.peek(session, token=triage_session, settings=runtime.settings)
    if write:
        with transaction(runtime.factory) as session:
            user = sessions.current(session, token=triage_session, settings=runtime.settings)
    if user is None:
        raise NotAuthenticated("please sign in")
    return user


def _maybe_user(request: Request) -> WebUser | None:
    """The signed-in user for an error page's header, if any (read-only)."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        return None
    try:
        with runtime.reads() as session:
            user, _ = sessions.peek(session, token=request.cookies.get(COOKIE), settings=runtime.settings)
    except Exception:  # an error page must not fail on its header
        return None
    return user


CurrentUser = Annotated[WebUser, Depends(_user)]


def _checked(
    user: CurrentUser,
    csrf_token: Annotated[str | None, Form()] = None,
    x_csrf_token: Annotated[str | None, Header()] = None,
) -> WebUser:
    if not sessions.csrf_ok(user.csrf_token, x_csrf_token or csrf_token):
        raise CsrfRefused("missing or wrong CSRF token; reload the page and try again")
    return user


CheckedUser = Annotated[WebUser, Depends(_checked)]


def _checked_json(user: CurrentUser, x_csrf_token: Annotated[str | None, Header()] = None) -> WebUser:
    if not sessions.csrf_ok(user.csrf_token, x_csrf_token):
        raise CsrfRefused("missing or wrong CSRF token; reload the page and try again")
    return user


def _role(signed_in: Callable[..., WebUser], *roles: Role) -> Any:
    """A dependency: the signed-in user (as ``signed_in`` checks them), who must hold one of ``roles``.

    Raises:
        NotPermitted: the user's role is not one of ``roles`` (a 403 page).
    """

    # A default, not an annotation: annotations are strings here (PEP 563), and FastAPI
    # would resolve ``signed_in`` among the module's names, not this closure's.
    def check(user: WebUser = Depends(signed_in)) -> WebUser:  # noqa: B008
        user.principal.require(*roles)
        return user

    return Depends(check)


RadiologistPage = Annotated[WebUser, _role(_user, Role.RADIOLOGIST)]
RadiologistForm = Annotated[WebUser, _role(_checked, Role.RADIOLOGIST)]
RadiologistFetch = Annotated[WebUser, _role(_checked_json, Role.RADIOLOGIST)]
UnblindedPage = Annotated[WebUser, _role(_user, Role.RADIOLOGIST, Role.AUDITOR)]
"""Pages with the AI's result (score, heat map) and readers' names: not for clinics, which
see their cases, results and appeal outcomes on their own page (as ``ClinicCase`` says)."""
UploaderPage = Annotated[WebUser, _role(_user, Role.UPLOADER)]
UploaderForm = Annotated[WebUser, _role(_checked, Role.UPLOADER)]
AuditorPage = Annotated[WebUser, _role(_user, Role.AUDITOR)]
AdminPage = Annotated[WebUser, _role(_user, Role.ADMIN)]


def _page(
    request: Request, template: str, user: WebUser | None, status: int = 200, **context: Any
) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        template,
        {"user": user, "home": HOME.get(user.principal.role) if user else "/login", **context},
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


def _back(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _fields(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())


def _names(session: Any, model: type[User] | type[Clinic], ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    return dict(session.execute(select(model.id, model.name).where(model.id.in_(ids))).all())


# --- login -------------------------------------------------------------------------------


def safe_next(target: str | None) -> str | None:
    """``target`` if it is a path on this site (``/web/...``), else None.

    Login returns to the page asked for; anything that a browser could read as another
    origin (``//host``, ``https://``, backslashes, control characters) is refused.
    """
    if not target or len(target) > 2000 or not target.startswith("/") or target.startswith("//"):
        return None
    if "\\" in target or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in target):
        return None
    return target


def login_url(request: Request) -> str:
    """Where an unauthenticated request is sent: the login page, remembering the page asked for
    (for a POST, the page the form was on)."""
    if request.method == "GET":
        asked = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    else:
        referer = urlsplit(request.headers.get("referer", ""))
        same = referer.netloc == request.url.netloc
        asked = referer.path + (f"?{referer.query}" if referer.query else "") if same else ""
    target = safe_next(asked)
    return f"/login?{urlencode({'next': target})}" if target else "/login"


@router.get("/login", response_class=HTMLResponse)
def login_form(
    request: Request,
    runtime: RuntimeDep,
    error: str | None = None,
    next_page: Annotated[str | None, Query(alias="next")] = None,
) -> HTMLResponse:
    """The login page; a pre-session CSRF token the server MACed guards the form."""
    token = sessions.login_token(runtime.pseudonym_key)
    response = _page(request, "login.html", None, token=token, error=error, next=safe_next(next_page))
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/login",
    )
    return response


@router.post("/login")
def login(
    request: Request,
    runtime: RuntimeDep,
    username: Annotated[str, Form(max_length=100)],
    password: Annotated[str, Form(max_length=200)],
    csrf_token: Annotated[str | None, Form()] = None,
    next_page: Annotated[str | None, Form(alias="next", max_length=2000)] = None,
    login_cookie: Annotated[str | None, Cookie(alias=LOGIN_COOKIE)] = None,
) -> Response:
    """Check the password, open a session and go to the page asked for (on this site only)."""
    if not sessions.login_token_ok(runtime.pseudonym_key, login_cookie, csrf_token):
        raise CsrfRefused("the login form expired; reload the page and try again")
    with transaction(runtime.factory) as session:
        outcome = sessions.login(
            session,
            name=username,
            password=password,
            source=request.client.host if request.client else "-",
            throttle=_state(request).throttle,
            settings=runtime.settings,
        )
    if isinstance(outcome, sessions.TooManyAttempts):
        raise outcome
    if outcome is None:
        return _page(
            request,
            "login.html",
            None,
            status=401,
            token=csrf_token,
            error="Wrong username or password.",
            next=safe_next(next_page),
        )
    response = _back(safe_next(next_page) or "/")
    secure = runtime.settings.web_secure_cookie or request.url.scheme == "https"
    response.set_cookie(
        COOKIE,
        outcome,
        httponly=True,
        samesite="strict",
        secure=secure,
        path="/",
        max_age=int(runtime.settings.web_session_hours * 3600),
    )
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(
    runtime: RuntimeDep, user: CheckedUser, triage_session: Annotated[str, Cookie(alias=COOKIE)]
) -> Response:
    """End the session."""
    with transaction(runtime.factory) as session:
        sessions.logout(session, token=triage_session, user=user)
    response = _back("/login")
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/")
def root(user: CurrentUser) -> Response:
    """Each role's start page."""
    return _back(HOME[user.principal.role])


# --- radiologist -------------------------------------------------------------------------


@router.get("/web/worklist", response_class=HTMLResponse)
def worklist_page(request: Request, runtime: RuntimeDep, user: RadiologistPage) -> HTMLResponse:
    """The radiologist's worklist; rows come from ``/web/api/worklist`` and refresh live."""
    with runtime.reads() as session:
        clinics = _names(session, Clinic, set(user.principal.clinic_ids))
        mine = appeals.list_appeals(session, principal=user.principal)
    return _page(
        request,
        "worklist.html",
        user,
        clinics=sorted(clinics.items(), key=lambda c: c[1]),
        tiers=list(Tier),
        statuses=list(CaseStatus),
        appeals=mine,
        message=request.query_params.get("done"),
    )


@router.get("/web/api/worklist")
def worklist_json(
    request: Request,
    runtime: RuntimeDep,
    user: UnblindedPage,
    clinic: Id | None = None,
    tier: Tier | None = None,
    status: CaseStatus | None = None,
    unread: bool | None = True,
    limit: Annotated[int, Query(ge=1, le=500)] = 200,
) -> dict[str, Any]:
    """``/v1/worklist`` for the page, with clinic and reader names (session auth)."""
    principal = user.principal
    if clinic is not None:
        if clinic not in principal.clinic_ids:
            raise InvalidRequest("not one of your clinics")
        principal = Principal(principal.user_id, principal.role, frozenset({clinic}))
    now = datetime.now(UTC)
    filters: dict[str, Any] = {"status": status, "tier": tier, "unread": unread, "limit": limit}
    with runtime.reads() as session:
        rows = cases.worklist(session, principal=principal, audit=False, **filters)
        lapsed = any(reading.claim_lapsed(c, runtime.settings, now) for c in rows)
    if lapsed:  # clear lapsed claims (audited), then list again
        with transaction(runtime.factory) as session:
            reading.expire_claims(session, principal=user.principal, settings=runtime.settings, now=now)
    card = _card(runtime, None)
    with runtime.reads() as session:
        if lapsed:
            rows = cases.worklist(session, principal=principal, audit=False, **filters)
        clinics = _names(session, Clinic, {c.clinic_id for c in rows})
        readers = _names(session, User, {c.claimed_by for c in rows if c.claimed_by is not None})
        visible = golive.shown_cases(session, rows)
        items = [
            {
                "id": c.id,
                "clinic": clinics.get(c.clinic_id, str(c.clinic_id)),
                "status": c.status,
                "reason": c.reason,
                "tier": c.tier,
                "ai_shown": c.id in visible,
                "risk": c.risk if c.id in visible else None,
                "deadline": c.deadline.isoformat(),
                "received_at": c.received_at.isoformat(),
                "study": cases.study_reference(c),
                "description": c.study_description,
                "modality": c.modality,
                "body_part": c.body_part,
                "view": c.view_position,
                "age_unchecked": age_unchecked(card, c),
                "claimed_by": readers.get(c.claimed_by) if c.claimed_by is not None else None,
                "claimed_by_me": c.claimed_by == user.principal.user_id,
                "claimed_at": c.claimed_at.isoformat() if c.claimed_at else None,
                "model_version": c.model_ref if c.id in visible else None,
                "calibration_id": c.calibration_id if c.id in visible else None,
            }
            for c in rows
        ]
    shown = hashlib.sha256("".join(f"{c.id}:{c.status}:{c.tier}," for c in rows).encode()).hexdigest()
    key = (principal.user_id, principal.clinic_ids, tier, status, unread, limit)
    polls = _state(request).polls
    if polls.due(key, shown):
        with transaction(runtime.factory) as session:
            shown_filters = {**filters, "offset": 0}
            cases.audit_worklist(session, principal=principal, filters=shown_filters, count=len(rows))
        polls.audited(key, shown)
    return {"now": now.isoformat(), "items": items}


def _card(runtime: Runtime, model_ref: str | None) -> ModelCard | None:
    try:
        card = read_card(runtime.settings.model_path)
    except (BundleError, OSError, ValueError):
        return None
    return card if model_ref is None or card.ref == model_ref else None


def age_unchecked(card: ModelCard | None, case: Case) -> str | None:
    """The model's intended age bands (``"1–5 y"``) when this study's age could not be checked
    against them (no usable age in the header, or a picture without one); else None.

    The worker scores such a study (it gates only on an age it can read), so its reader is told.
    """
    if card is None or not card.intended_use.age_bands or case.age_band is not None:
        return None
    if case.model_ref is not None and case.model_ref != card.ref:
        return None  # scored by another version, whose card is not on this server
    return ", ".join(card.intended_use.age_bands)


@router.get("/web/cases/{case_id}", response_class=HTMLResponse)
def case_page(request: Request, runtime: RuntimeDep, user: UnblindedPage, case_id: str) -> HTMLResponse:
    """The case viewer: picture, heat map, AI result with its model card, and the read."""
    with transaction(runtime.factory) as session:
        case, prediction = cases.read_case(session, principal=user.principal, case_id=case_id)
        ai = bool(golive.shown_cases(session, [case]))
        history = appeals.result_history(session, case.id)
        first = next((read for read, appeal in history if appeal is None), None)
        clinic_row = session.get_one(Clinic, case.clinic_id)
        clinic, ai_mode = clinic_row.name, clinic_row.ai_mode
        people = _names(session, User, {case.claimed_by or 0} | {read.reader_id for read, _ in history})
        agree = reading.agreeing_findings(reading.ai_tier(session, case)) if ai else []
    claimed_by = people.get(case.claimed_by) if case.claimed_by else None
    now = datetime.now(UTC)
    saved = request.query_params.get("saved", "")
    return _page(
        request,
        "case.html",
        user,
        case=case,
        ai=ai,
        ai_mode=ai_mode,
        prediction=prediction if ai else None,
        first=first,
        history=history,
        result=appeals.current_result(history),
        people=people,
        clinic=clinic,
        claimed_by=claimed_by,
        claimed_by_me=case.claimed_by == user.principal.user_id,
        claim_minutes=int((now - case.claimed_at).total_seconds() // 60) if case.claimed_at else None,
        claim_lapsed=reading.claim_lapsed(case, runtime.settings, now),
        claim_expiry=runtime.settings.claim_expiry_minutes,
        card=_card(runtime, case.model_ref) if ai else None,
        findings=list(Finding),
        reasons=list(OverrideReason),
        priority_reasons=list(PriorityReason),
        tiers=list(Tier),
        can_read=user.principal.role is Role.RADIOLOGIST,
        message=request.query_params.get("done"),
        saved=saved if CASE_ID.fullmatch(saved) else None,
        study=cases.study_reference(case),
        age_unchecked=age_unchecked(_card(runtime, None), case),
        agree_findings=agree,
    )


def _private_png(data: bytes) -> Response:
    """A picture of a study: never kept by the browser or a proxy."""
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, no-store"})


def _private_pixels(pixels: imaging.DisplayPixels) -> Response:
    """Full-depth grey values (little-endian uint16) with their geometry and windows in the
    ``X-Pixel-Info`` header (JSON); never kept by the browser or a proxy."""
    return Response(
        pixels.body(),
        media_type="application/octet-stream",
        headers={
            "Cache-Control": "private, no-store",
            "X-Pixel-Info": json.dumps(pixels.info(), separators=(",", ":")),
        },
    )


@router.get("/web/cases/{case_id}/pixels")
def case_pixels(runtime: RuntimeDep, user: CurrentUser, case_id: str) -> Response:
    """The study's full-depth grey values for the viewer (who may see the study: ``imaging.image_case``)."""
    with transaction(runtime.factory) as session:
        case = imaging.image_case(session, principal=user.principal, case_id=case_id)
    return _private_pixels(imaging.case_pixels(case, runtime.settings))


@router.get("/web/cases/{case_id}/heatmap.png")
def case_heatmap(runtime: RuntimeDep, user: UnblindedPage, case_id: str) -> Response:
    """The Grad-CAM overlay (same rules as ``GET /v1/studies/{id}/heatmap``)."""
    with transaction(runtime.factory) as session:
        case = imaging.heatmap_case(session, principal=user.principal, case_id=case_id)
    return _private_png(imaging.heatmap_png(case, runtime.settings))


@router.post("/web/cases/{case_id}/claim")
def claim(runtime: RuntimeDep, user: RadiologistFetch, case_id: str) -> dict[str, Any]:
    """Claim the case (a fetch from the viewer; CSRF token in the header)."""
    with transaction(runtime.factory) as session:
        case = reading.claim(session, principal=user.principal, case_id=case_id, settings=runtime.settings)
        return {"case_id": case.id, "claimed": True}


@router.post("/web/cases/{case_id}/release")
def release(runtime: RuntimeDep, user: RadiologistFetch, case_id: str) -> dict[str, Any]:
    """Release your claim on the case."""
    with transaction(runtime.factory) as session:
        case = reading.release(session, principal=user.principal, case_id=case_id)
        return {"case_id": case.id, "claimed": False}


@router.post("/web/cases/{case_id}/read")
def submit_read(
    runtime: RuntimeDep,
    user: RadiologistForm,
    case_id: str,
    finding: Annotated[str, Form()] = "",
    agreement: Annotated[str, Form()] = "",
    override_reason: Annotated[str, Form()] = "",
    note: Annotated[str, Form(max_length=2000)] = "",
    then: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    """Record the final read: agree with the AI, or override it with a reason code; with
    ``then=next``, go on to the next case (claimed, as ``POST /web/next`` does)."""
    try:
        body = ReadCreate.model_validate(
            {
                "finding": finding,
                "agrees_with_ai": {"agree": True, "override": False}.get(agreement),
                "override_reason": override_reason or None,
                "note": note or None,
                "ai_score_shown": True,
            }
        )
    except ValidationError as exc:
        raise InvalidRequest(_fields(exc)) from None
    with transaction(runtime.factory) as session:
        read = reading.record_read(session, principal=user.principal, case_id=case_id, **body.model_dump())
        saved = read.case_id
    if then == "next":
        return _next_case(runtime, user, saved=saved)
    return _back(f"/web/cases/{saved}?done=read")


def _next_case(runtime: Runtime, user: WebUser, *, saved: str | None) -> Response:
    """Claim the next case to read and go to it; the worklist when none is left. ``saved``:
    the case whose read was just saved (its page in this tab drops its kept draft)."""
    with transaction(runtime.factory) as session:
        case = reading.claim_next(session, principal=user.principal, settings=runtime.settings)
        next_id = case.id if case is not None else None
    if next_id is None:
        return _back("/web/worklist?done=" + ("read-last" if saved else "none-left"))
    return _back(f"/web/cases/{next_id}" + (f"?saved={saved}" if saved else ""))


@router.post("/web/next")
def next_case(runtime: RuntimeDep, user: RadiologistForm) -> Response:
    """Claim the first unclaimed case in worklist order and open it (the worklist if none)."""
    return _next_case(runtime, user, saved=None)


@router.post("/web/cases/{case_id}/priority")
def reprioritise(
    runtime: RuntimeDep,
    user: RadiologistForm,
    case_id: str,
    tier: Annotated[str, Form()] = "",
    reason: Annotated[str, Form()] = "",
    note: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """Move the case to another tier, with a reason."""
    try:
        body = PriorityChange.model_validate({"tier": tier, "reason": reason, "note": note or None})
    except ValidationError as exc:
        raise InvalidRequest(_fields(exc)) from None
    with transaction(runtime.factory) as session:
        reading.reprioritise(
            session, principal=user.principal, case_id=case_id, settings=runtime.settings, **body.model_dump()
        )
    return _back(f"/web/cases/{case_id}?done=priority")


# --- appeals: the blinded second read ------------------------------------------------------


@router.post("/web/appeals/{appeal_id}/take")
def take_appeal(runtime: RuntimeDep, user: RadiologistForm, appeal_id: Id) -> Response:
    """Take an open appeal as its second reader."""
    with transaction(runtime.factory) as session:
        appeals.take_appeal(session, principal=user.principal, appeal_id=appeal_id)
    return _back(f"/web/appeals/{appeal_id}")


@router.get("/web/appeals/{appeal_id}", response_class=HTMLResponse)
def appeal_page(request: Request, runtime: RuntimeDep, user: RadiologistPage, appeal_id: Id) -> HTMLResponse:
    """The second reader's blinded view: the study only, no AI score, heat map or first read."""
    with transaction(runtime.factory) as session:
        appeal, case = appeals.blinded_view(session, principal=user.principal, appeal_id=appeal_id)
    return _page(
        request,
        "appeal.html",
        user,
        appeal=appeal,
        case=case,
        findings=list(Finding),
    )


@router.get("/web/appeals/{appeal_id}/pixels")
def appeal_pixels(runtime: RuntimeDep, user: RadiologistPage, appeal_id: Id) -> Response:
    """The study's full-depth grey values for the assigned second reader (blinded)."""
    with transaction(runtime.factory) as session:
        _, case = appeals.blinded_view(session, principal=user.principal, appeal_id=appeal_id)
    return _private_pixels(imaging.case_pixels(case, runtime.settings))


@router.post("/web/appeals/{appeal_id}/decision")
def decide_appeal(
    runtime: RuntimeDep,
    user: RadiologistForm,
    appeal_id: Id,
    finding: Annotated[str, Form()] = "",
    rationale: Annotated[str, Form(max_length=4000)] = "",
) -> Response:
    """Record the second reader's own read; the service derives the outcome for the clinic."""
    try:
        body = AppealDecision.model_validate({"finding": finding, "rationale": rationale})
    except ValidationError as exc:
        raise InvalidRequest(_fields(exc)) from None
    with transaction(runtime.factory) as session:
        appeals.decide(session, principal=user.principal, appeal_id=appeal_id, **body.model_dump())
    return _back("/web/worklist")


# --- clinic ----------------------------------------------------------------------------------


@router.get("/web/clinic", response_class=HTMLResponse)
def clinic_page(request: Request, runtime: RuntimeDep, user: UploaderPage) -> HTMLResponse:
    """A clinic's cases (by accession number where the study had one), their results and
    appeals, and the upload form."""
    with transaction(runtime.factory) as session:
        rows = cases.worklist(session, principal=user.principal, limit=500)
        shown = appeals.clinic_view(session, rows)
        filed = appeals.list_appeals(session, principal=user.principal)
        second = {a.id: appeals.second_read(session, a) for a in filed}
    return _page(
        request,
        "clinic.html",
        user,
        cases=shown,
        accession={c.id: c.accession_number for c in rows},
        max_upload_bytes=runtime.settings.max_upload_bytes,
        appeals=filed,
        second=second,
        categories=list(AppealCategory),
        message=request.query_params.get("done"),
    )


@router.post("/web/appeals")
def file_appeal(
    runtime: RuntimeDep,
    user: UploaderForm,
    case_id: Annotated[str, Form()] = "",
    category: Annotated[str, Form()] = "",
    grounds: Annotated[str, Form(max_length=4000)] = "",
    contact_reference: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """File an appeal on one of the clinic's cases."""
    try:
        body = AppealCreate.model_validate(
            {
                "case_id": case_id,
                "category": category,
                "grounds": grounds,
                "contact_reference": contact_reference,
            }
        )
    except ValidationError as exc:
        raise InvalidRequest(_fields(exc)) from None
    with transaction(runtime.factory) as session:
        appeals.file_appeal(
            session,
            principal=user.principal,
            due_hours=runtime.settings.appeal_due_hours,
            **body.model_dump(),
        )
    return _back("/web/clinic?done=appeal")


# --- auditor ---------------------------------------------------------------------------------


def _local_validation(session: Session, runtime: Runtime, clinic_ids: frozenset[int]) -> list[dict[str, Any]]:
    """Each clinic's local validation of the live model, with its reliability diagram."""
    card = _card(runtime, None)
    if card is None:
        return []
    clinics = session.execute(select(Clinic).where(Clinic.id.in_(clinic_ids)).order_by(Clinic.name)).scalars()
    reports = [golive.validation(session, clinic=clinic, card=card) for clinic in clinics]
    return [{"report": report, "svg": charts.validation_svg(report)} for report in reports]


@router.get("/web/audit", response_class=HTMLResponse)
def audit_desk(
    request: Request,
    runtime: RuntimeDep,
    user: AuditorPage,
    reason: Annotated[str | None, Query(max_length=40)] = None,
    reader: Annotated[str | None, Query(pattern=r"^[0-9]{0,9}$")] = None,
    model: Annotated[str | None, Query(max_length=100)] = None,
) -> HTMLResponse:
    """The auditor's desk: overrides (filterable) and appeals."""
    reason, model = reason or None, model or None
    reader_id = int(reader) if reader else None  # the filter form sends "" for "any"
    with transaction(runtime.factory) as session:
        rows = oversight.overrides(
            session, principal=user.principal, reason=reason, reader_id=reader_id, model_ref=model
        )
        all_readers = oversight.readers(session, user.principal)
        models = sorted(
            {
                m
                for m in session.execute(
                    select(Case.model_ref).where(Case.clinic_id.in_(user.principal.clinic_ids)).distinct()
                ).scalars()
                if m
            }
        )
        listed = appeals.list_appeals(session, principal=user.principal)
        second = {a.id: appeals.second_read(session, a) for a in listed}
        local = _local_validation(session, runtime, user.principal.clinic_ids)
    return _page(
        request,
        "audit.html",
        user,
        local=local,
        overrides=rows,
        readers=all_readers,
        models=models,
        reasons=list(OverrideReason),
        chosen={"reason": reason, "reader": reader_id, "model": model},
        appeals=listed,
        second=second,
    )


TREND_WINDOWS = 6
"""The monitoring window is cut into this many consecutive windows for the trend charts."""


def _charts(
    session: Session, user: WebUser, runtime: Runtime, window: monitoring.Window
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The window's metrics, and the SVG charts: trends over sub-windows, then per model the
    reliability diagram and time to first read before (previous window) and after."""
    principal = user.principal
    metrics = monitoring.model_metrics(
        session,
        principal=principal,
        window=window,
        validation=monitoring.validation_histograms(runtime.settings.model_path),
    )
    length = window.until - window.since
    previous = monitoring.model_metrics(
        session, principal=principal, window=monitoring.Window(window.since - length, window.since)
    )
    step = length / TREND_WINDOWS
    payloads = []
    for i in range(TREND_WINDOWS):
        part = monitoring.Window(window.since + step * i, window.since + step * (i + 1))
        payloads.append(
            {
                "window": {"since": part.since, "until": part.until},
                "models": monitoring.model_metrics(session, principal=principal, window=part),
            }
        )
    trends = charts.charts_for_windows(
        payloads,
        override_rate_bound=runtime.settings.alert_override_rate,
        psi_bound=runtime.settings.alert_drift_psi,
    )
    out = {"override_rate": trends["override_rate"], "auroc": trends["auroc"]}
    for entry in metrics:
        before = next((m for m in previous if m["model_ref"] == entry["model_ref"]), None)
        per_model = charts.charts_for_metrics(entry, before=before, labels=("previous window", "this window"))
        for name in ("calibration", "time_to_first_read", "override_reasons"):
            out[f"{name} {entry['model_ref']}"] = per_model[name]
    return metrics, out


@router.get("/web/audit/monitoring", response_class=HTMLResponse)
def monitoring_page(
    request: Request, runtime: RuntimeDep, user: AuditorPage, days: Annotated[int, Query(ge=1, le=365)] = 30
) -> HTMLResponse:
    """Model monitoring: override rate over time, AUROC, calibration, time to first read."""
    until = datetime.now(UTC)
    window = monitoring.Window(until - timedelta(days=days), until)
    with transaction(runtime.factory) as session:
        metrics, svgs = _charts(session, user, runtime, window)
        by_day = oversight.override_rate_by_day(
            session, principal=user.principal, days=min(days, 30), now=until
        )
    return _page(
        request,
        "monitoring.html",
        user,
        metrics=metrics,
        by_day=by_day,
        days=days,
        charts=svgs,
        psi_bound=runtime.settings.alert_drift_psi,
        min_reads=runtime.settings.alert_min_reads,
    )


# --- wiring ----------------------------------------------------------------------------------


API_PATHS = ("/v1/", "/web/api/", "/healthz", "/readyz", "/metrics", "/static/")
"""Paths whose errors stay JSON (or plain) whatever the client accepts."""


def _wants_html(request: Request) -> bool:
    """Browser routes get HTML error pages; so does any other unknown path a browser asks for."""
    path = request.url.path
    if path.startswith(API_PATHS) or "x-csrf-token" in request.headers:
        return False
    return (
        path == "/"
        or path.startswith(("/web/", "/login", "/logout"))
        or ("text/html" in request.headers.get("accept", ""))
    )


async def _delegate(result: Response | Awaitable[Response]) -> Response:
    return await result if inspect.isawaitable(result) else result


def install(app: FastAPI) -> None:
    """Add the pages, their static files, and HTML error pages for browser routes."""
    from triage_api.web import desks  # it builds on this module's dependencies

    app.include_router(router)
    app.include_router(desks.router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    json_domain = app.exception_handlers[TriageError]
    json_http = app.exception_handlers[StarletteHTTPException]

    async def domain(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, TriageError) or not _wants_html(request):
            return await _delegate(json_domain(request, exc))
        if isinstance(exc, NotAuthenticated):
            return _back(login_url(request))
        user = _maybe_user(request)
        response = templates.TemplateResponse(
            request,
            "error.html",
            {
                "user": user,
                "home": HOME.get(user.principal.role, "/") if user else "/",
                "status": exc.status,
                "code": exc.code,
                "message": exc.message,
            },
            status_code=exc.status,
        )
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
        return response

    async def http(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, StarletteHTTPException) or not _wants_html(request):
            return await _delegate(json_http(request, exc))
        return templates.TemplateResponse(
            request,
            "error.html",
            {
                "user": _maybe_user(request),
                "home": "/",
                "status": exc.status_code,
                "code": "http_error",
                "message": str(exc.detail),
            },
            status_code=exc.status_code,
        )

    json_validation = app.exception_handlers[RequestValidationError]

    async def validation(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, RequestValidationError) or not _wants_html(request):
            return await _delegate(json_validation(request, exc))
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return await domain(request, InvalidRequest(fields))

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(TriageError, domain)
    app.add_exception_handler(StarletteHTTPException, http)
