"""API keys, roles and clinic scope.

A key reads ``trg_<prefix>_<secret>``: the prefix (public, 12 hex) finds the row, the secret
(32 bytes from ``secrets``, 256 bits) is checked against its stored sha256 in constant time.
A database dump therefore holds no usable key. The clinics a caller may act for come from
the key's user, never from the path or body.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from triage_api.errors import NotAuthenticated, NotPermitted
from triage_api.tables import ApiKey, Clinic, User, WebSession


class Role(enum.StrEnum):
    UPLOADER = "uploader"
    RADIOLOGIST = "radiologist"
    AUDITOR = "auditor"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling, and for which clinics."""

    user_id: int
    role: Role
    clinic_ids: frozenset[int]

    @property
    def actor(self) -> str:
        return f"user:{self.user_id}"

    def require(self, *roles: Role) -> None:
        if self.role not in roles:
            raise NotPermitted(f"role {self.role.value} may not do this")


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue_key(session: Session, user: User) -> str:
    """Create a key for ``user`` and return it; only its hash is stored."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            user_id=user.id,
            prefix=prefix,
            secret_sha256=_sha256(secret),
            created_at=datetime.now(UTC),
        )
    )
    return f"trg_{prefix}_{secret}"


def authenticate(session: Session, token: str) -> Principal:
    """Resolve a bearer token to a principal.

    Raises:
        NotAuthenticated: malformed, unknown, revoked key or disabled user.
    """
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "trg":
        raise NotAuthenticated("malformed API key")
    key = session.execute(select(ApiKey).where(ApiKey.prefix == parts[1])).scalar_one_or_none()
    # Compare against a dummy hash when the prefix is unknown, so timing does not tell.
    expected = key.secret_sha256 if key else _sha256("")
    if not hmac.compare_digest(expected, _sha256(parts[2])) or key is None:
        raise NotAuthenticated("invalid API key")
    if key.revoked_at is not None or key.user.disabled:
        raise NotAuthenticated("API key revoked")
    user = key.user
    return Principal(user.id, Role(user.role), frozenset(c.id for c in user.clinics))


def clinics_for(session: Session, *, role: Role, clinics: list[str]) -> list[Clinic]:
    """The named clinics (created if new) for a user of ``role``.

    Raises:
        NotPermitted: an uploader must belong to exactly one clinic; an admin to none.
    """
    if role is Role.UPLOADER and len(clinics) != 1:
        raise NotPermitted("an uploader acts for exactly one clinic")
    if role is Role.ADMIN and clinics:
        raise NotPermitted("an admin manages the site and reads no clinic's cases")
    now = datetime.now(UTC)
    rows = []
    for clinic_name in dict.fromkeys(clinics):
        clinic = session.execute(select(Clinic).where(Clinic.name == clinic_name)).scalar_one_or_none()
        if clinic is None:
            clinic = Clinic(name=clinic_name, created_at=now)
            session.add(clinic)
        rows.append(clinic)
    return rows


def add_user(session: Session, *, name: str, role: Role, clinics: list[str]) -> tuple[User, str]:
    """Create a user with access to the named clinics (created if new) and its first key.

    Raises:
        NotPermitted: an uploader must belong to exactly one clinic; an admin to none.
    """
    rows = clinics_for(session, role=role, clinics=clinics)
    user = User(name=name, role=role.value, created_at=datetime.now(UTC), disabled=False, clinics=rows)
    session.add(user)
    session.flush()
    return user, issue_key(session, user)


def revoke_key(session: Session, prefix: str) -> ApiKey | None:
    """Revoke the key with ``prefix``; returns it, or None if there is none."""
    key = session.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
    if key is not None and key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
    return key


def end_sessions(session: Session, user_id: int) -> int:
    """End every web session of the user at once (their rows go); returns how many ended.

    Revoking a key or disabling a user must not leave a browser signed in on the old grant.
    """
    result = session.execute(delete(WebSession).where(WebSession.user_id == user_id))
    return int(getattr(result, "rowcount", 0) or 0)


def set_disabled(session: Session, user: User, disabled: bool) -> int:
    """Disable (no key, password or session works) or re-enable a user; returns the web
    sessions a disable ended. Keys and password are kept, so enabling restores access."""
    user.disabled = disabled
    return end_sessions(session, user.id) if disabled else 0
