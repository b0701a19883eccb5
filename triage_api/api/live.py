"""The live worklist stream (server-sent events), for API clients and the web pages."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from triage_api import live
from triage_api.auth import Principal, Role
from triage_api.deps import Reader, Runtime, RuntimeDep
from triage_api.web.views import CurrentUser

router = APIRouter(tags=["worklist"])

LastEventId = Annotated[int | None, Header(ge=0, le=2**62)]


def _stream(
    request: Request, runtime: Runtime, principal: Principal, last_event_id: int | None
) -> StreamingResponse:
    feed: live.Feed = request.app.state.live_feed
    body = live.stream(
        runtime.factory,
        feed,
        principal,
        last_event_id=last_event_id,
        lifetime=runtime.settings.live_stream_seconds,
        poll=runtime.settings.live_poll_seconds,
        clock=lambda: datetime.now(UTC),
    )
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


@router.get("/v1/worklist/stream", response_class=StreamingResponse)
def worklist_stream(
    request: Request, runtime: RuntimeDep, principal: Reader, last_event_id: LastEventId = None
) -> StreamingResponse:
    """Scored cases of the caller's clinics as server-sent events (resume with Last-Event-ID)."""
    return _stream(request, runtime, principal, last_event_id)


@router.get("/web/api/worklist/stream", include_in_schema=False)
def web_worklist_stream(
    request: Request, runtime: RuntimeDep, user: CurrentUser, last_event_id: LastEventId = None
) -> StreamingResponse:
    """The same stream for the signed-in browser (EventSource sends the session cookie)."""
    user.principal.require(Role.RADIOLOGIST, Role.UPLOADER, Role.AUDITOR)
    return _stream(request, runtime, user.principal, last_event_id)
