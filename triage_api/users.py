"""Managing users and API keys, audited: the service behind ``/v1/users`` and ``/v1/keys``."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.log import EventCode, record
from triage_api import auth, passwords
from triage_api.auth import Role
from triage_api.errors import NotFound
from triage_api.tables import ApiKey, User


def create_user(
    session: Session,
    *,
    actor: str,
    name: str,
    role: Role,
    clinics: list[str],
    password: str | None = None,
) -> tuple[User, str]:
    """Create a user (and the clinics it names) with a first API key, in the caller's transaction.

    Args:
        actor: who does it, for the audit event (``user:<id>`` or ``cli``).

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
        actor=actor,
        action="user.create",
        code=EventCode.SECURITY_ALERT,
        object_type="user",
        object_id=str(user.id),
        details={"role": role.value, "clinics": clinics, "password": password is not None},
    )
    return user, key


def revoke_key(session: Session, *, actor: str, prefix: str) -> datetime:
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
        actor=actor,
        action="key.revoke",
        code=EventCode.SECURITY_ALERT,
        object_type="api_key",
        object_id=prefix,
    )
    end_sessions(session, actor=actor, key=key)
    return revoked_at


def end_sessions(session: Session, *, actor: str, key: ApiKey) -> int:
    """After a key's revocation, end its user's web sessions too (audited); returns how many."""
    ended = auth.end_sessions(session, key.user_id)
    record(
        session,
        actor=actor,
        action="user.sessions_end",
        code=EventCode.SECURITY_ALERT,
        object_type="user",
        object_id=str(key.user_id),
        details={"why": "key.revoke", "sessions": ended},
    )
    return ended


def set_disabled(
    session: Session, *, actor: str, user_id: int | None = None, name: str | None = None, disabled: bool
) -> tuple[User, int]:
    """Disable or re-enable a user (by id or name), audited; a disable ends their web sessions.

    Returns:
        The user, and how many web sessions ended.

    Raises:
        NotFound: no such user.
    """
    user = find_user(session, user_id=user_id, name=name)
    ended = auth.set_disabled(session, user, disabled)
    record(
        session,
        actor=actor,
        action="user.disable" if disabled else "user.enable",
        code=EventCode.SECURITY_ALERT,
        object_type="user",
        object_id=str(user.id),
        details={"sessions_ended": ended} if disabled else {},
    )
    return user, ended


def set_password(
    session: Session, *, actor: str, user_id: int | None = None, name: str | None = None, password: str
) -> User:
    """Set or reset a user's (by id or name) web-login password (audited); their open web
    sessions end.

    Raises:
        NotFound: no such user.
        InvalidRequest: the password is too short or too long.
    """
    user = find_user(session, user_id=user_id, name=name)
    passwords.set_password(session, user, password)
    ended = auth.end_sessions(session, user.id)
    record(
        session,
        actor=actor,
        action="user.set_password",
        code=EventCode.SECURITY_ALERT,
        object_type="user",
        object_id=str(user.id),
        details={"sessions_ended": ended},
    )
    return user


def find_user(session: Session, *, user_id: int | None = None, name: str | None = None) -> User:
    """The user with ``user_id`` (or, without one, ``name``).

    Raises:
        NotFound: no such user.
    """
    query = (
        select(User).where(User.id == user_id)
        if user_id is not None
        else select(User).where(User.name == name)
    )
    user = session.execute(query).scalar_one_or_none()
    if user is None:
        raise NotFound("no such user")
    return user


def issue_key(session: Session, *, actor: str, user_id: int) -> tuple[User, str]:
    """Give a user another API key (audited), e.g. to replace one about to be revoked.

    Returns:
        The user and the new key, which is shown once and stored only as a hash.

    Raises:
        NotFound: no such user.
    """
    user = find_user(session, user_id=user_id)
    key = auth.issue_key(session, user)
    record(
        session,
        actor=actor,
        action="key.issue",
        code=EventCode.SECURITY_ALERT,
        object_type="user",
        object_id=str(user.id),
        details={"prefix": key.split("_")[1]},
    )
    return user, key


def set_clinics(session: Session, *, actor: str, user_id: int, clinics: list[str]) -> User:
    """Grant a user exactly these clinics (created if new), audited; takes effect at the
    user's next request, since every request reads the user's clinics afresh.

    Raises:
        NotFound: no such user.
        NotPermitted: the role and the clinics do not fit (see :func:`triage_api.auth.clinics_for`).
    """
    user = find_user(session, user_id=user_id)
    before = sorted(c.name for c in user.clinics)
    user.clinics = auth.clinics_for(session, role=Role(user.role), clinics=clinics)
    session.flush()
    record(
        session,
        actor=actor,
        action="user.clinics",
        code=EventCode.SECURITY_ALERT,
        object_type="user",
        object_id=str(user.id),
        details={"before": before, "after": sorted(c.name for c in user.clinics)},
    )
    return user


def directory(session: Session) -> list[tuple[User, list[ApiKey]]]:
    """Every user by name, with their API keys (newest first): the admin's list."""
    people = list(session.execute(select(User).order_by(User.name)).scalars())
    keys: dict[int, list[ApiKey]] = {}
    for key in session.execute(select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id.desc())).scalars():
        keys.setdefault(key.user_id, []).append(key)
    return [(user, keys.get(user.id, [])) for user in people]
