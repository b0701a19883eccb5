"""Request dependencies that read as types: the runtime, the caller, and role gates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from triage_api import auth
from triage_api.auth import Principal, Role
from triage_api.errors import NotAuthenticated
from triage_api.ratelimit import ClinicRateLimiter
from triage_api.settings import Settings


@dataclass
class Runtime:
    """What the lifespan builds; routes reach it through ``request.app.state.runtime``."""

    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    reads: sessionmaker[Session]
    """Read-only sessions: on SQLite they never take the write lock; elsewhere the same pool."""
    read_engine: Engine
    pseudonym_key: bytes
    limiter: ClinicRateLimiter


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


def _principal(runtime: RuntimeDep, authorization: Annotated[str | None, Header()] = None) -> Principal:
    if not authorization or not authorization.startswith("Bearer "):
        raise NotAuthenticated("missing bearer API key")
    with runtime.reads() as session:
        return auth.authenticate(session, authorization.removeprefix("Bearer ").strip())


CurrentPrincipal = Annotated[Principal, Depends(_principal)]


def allow(*roles: Role) -> Any:
    """A dependency admitting only ``roles``; it runs before the body is validated."""

    def dependency(principal: CurrentPrincipal) -> Principal:
        principal.require(*roles)
        return principal

    return Depends(dependency)


Uploader = Annotated[Principal, allow(Role.UPLOADER)]
Reader = Annotated[Principal, allow(Role.UPLOADER, Role.RADIOLOGIST, Role.AUDITOR)]
Admin = Annotated[Principal, allow(Role.ADMIN)]
Radiologist = Annotated[Principal, allow(Role.RADIOLOGIST)]
Auditor = Annotated[Principal, allow(Role.AUDITOR)]
