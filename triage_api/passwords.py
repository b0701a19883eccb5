"""Web-login passwords: Argon2id hashes (argon2-cffi's RFC 9106 defaults), never the password.

A password is checked against a dummy hash when the user is unknown or has none, so the
time an answer takes does not tell which usernames exist.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.orm import Session

from triage_api.errors import InvalidRequest
from triage_api.tables import User

MIN_LENGTH = 12
MAX_LENGTH = 200

_hasher = PasswordHasher()  # Argon2id; stateless, so sharing it is safe
_dummy_hash: str | None = None


def hash_password(password: str) -> str:
    """The Argon2id hash (PHC string) of ``password``.

    Raises:
        InvalidRequest: shorter than ``MIN_LENGTH`` or longer than ``MAX_LENGTH`` characters.
    """
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise InvalidRequest(f"a password has {MIN_LENGTH} to {MAX_LENGTH} characters")
    return _hasher.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """True if ``password`` matches ``stored``; spends the same work when ``stored`` is None
    or the password is longer than any stored one could be."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = _hasher.hash("not a password of anyone")
    matched: bool
    try:
        matched = _hasher.verify(stored or _dummy_hash, password[:MAX_LENGTH])
    except (VerificationError, InvalidHashError):
        matched = False
    return matched and stored is not None and len(password) <= MAX_LENGTH


def set_password(session: Session, user: User, password: str) -> None:
    """Give ``user`` a web-login password (replacing any previous one).

    Raises:
        InvalidRequest: the password is too short or too long.
    """
    user.password_hash = hash_password(password)
    session.flush()
