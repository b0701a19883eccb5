"""Routes for users and API keys (``/v1/users``, ``/v1/keys``): admins only."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.exc import IntegrityError

from triage_api import users
from triage_api.db import transaction
from triage_api.deps import Admin, Runtime, RuntimeDep
from triage_api.errors import Conflict
from triage_api.params import Id
from triage_api.schemas import KeyRevoked, UserCreate, UserCreated, UserState

router = APIRouter()


@router.post("/v1/users", response_model=UserCreated, status_code=201)
def create_user(runtime: RuntimeDep, principal: Admin, body: UserCreate) -> UserCreated:
    """Create a user (and clinics it names) with a first API key, shown once."""
    try:
        with transaction(runtime.factory) as session:
            user, key = users.create_user(
                session,
                actor=principal.actor,
                name=body.name,
                role=body.role,
                clinics=body.clinics,
                password=body.password,
            )
            return UserCreated(id=user.id, name=user.name, role=body.role, clinics=body.clinics, api_key=key)
    except IntegrityError:
        raise Conflict("a user with that name exists") from None


@router.post("/v1/users/{user_id}/disable", response_model=UserState)
def disable_user(runtime: RuntimeDep, principal: Admin, user_id: Id) -> UserState:
    """Disable a user: no key, password or web session of theirs works; sessions end now."""
    return _set_disabled(runtime, principal.actor, user_id, disabled=True)


@router.post("/v1/users/{user_id}/enable", response_model=UserState)
def enable_user(runtime: RuntimeDep, principal: Admin, user_id: Id) -> UserState:
    """Re-enable a disabled user: their unrevoked keys and password work again."""
    return _set_disabled(runtime, principal.actor, user_id, disabled=False)


def _set_disabled(runtime: Runtime, actor: str, user_id: int, *, disabled: bool) -> UserState:
    with transaction(runtime.factory) as session:
        user, ended = users.set_disabled(session, actor=actor, user_id=user_id, disabled=disabled)
        return UserState(id=user.id, name=user.name, disabled=user.disabled, sessions_ended=ended)


@router.delete("/v1/keys/{prefix}", response_model=KeyRevoked)
def revoke_key(runtime: RuntimeDep, principal: Admin, prefix: str) -> KeyRevoked:
    """Revoke an API key by its public prefix."""
    with transaction(runtime.factory) as session:
        revoked_at = users.revoke_key(session, actor=principal.actor, prefix=prefix)
        return KeyRevoked(prefix=prefix, revoked_at=revoked_at)
