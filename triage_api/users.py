"""Managing users and API keys, audited: the service behind ``/v1/users`` and ``/v1/keys``."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from audit.log import EventCode, record
from triage_api import auth, passwords
from triage_api.auth import Principal, Role
from triage_api.errors import NotFound
from triage_api.tables import User


def create_user(
    session: Session,
    *,
    principal: Principal,
    name: str,
    role: Role,
    clinics: list[str],
    password: str | None = None,
) -> tuple[User, str]:
    """Create a user (and the clinics it names) with a first API key, in the caller's transaction.

    Returns:
        The user and its API key, which is shown once and stored only as a hash.

    Raises:
        NotPermitted: the role and the clinics do not fit (see :func:`triage_api.auth.add_user`).
        sqlalchemy.exc.IntegrityError: at flush or commit, a user with that name exists.
    """
    user, key = auth.add_user(session, name=name, role=role, clinics=clinics)
    if password is not None:
        passwords.set_password(session, user, password)
    record(
        session,
        actor=principal.actor,
        action="user.create",
        code=EventCode.SECURITY_ALERT,
        object_type="user",
        object_id=str(user.id),
        details={"role": role.value, "clinics": clinics, "password": password is not None},
    )
    return user, key


def revoke_key(session: Session, *, principal: Principal, prefix: str) -> datetime:
    """Revoke the API key with ``prefix``, in the caller's transaction.

    Returns:
        When the key was revoked (earlier, if it already was).

    Raises:
        NotFound: no key has that prefix.
    """
    key = auth.revoke_key(session, prefix)
    if key is None or key.revoked_at is None:
        raise NotFound("no such key")
    revoked_at = key.revoked_at
    record(
        session,
        actor=principal.actor,
        action="key.revoke",
        code=EventCode.SECURITY_ALERT,
        object_type="api_key",
        object_id=prefix,
    )
    return revoked_at
