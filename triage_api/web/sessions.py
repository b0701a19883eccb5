"""Web login and browser sessions.

A session is a 256-bit random token in an HttpOnly, SameSite=Strict cookie; the database
keeps only its sha256, with the session's CSRF token and its times. A session ends on
logout, after ``web_idle_minutes`` without a request, or ``web_session_hours`` after login.
Failed logins are audited and throttled per (username, source address).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from audit.log import EventCode, Outcome, record
from triage_api.auth import Principal, Role
from triage_api.errors import TriageError
from triage_api.passwords import verify_password
from triage_api.settings import Settings
from triage_api.tables import User, WebSession

TOUCH_EVERY = timedelta(seconds=60)
"""``last_seen`` is rewritten at most this often, so polling pages do not write every request."""


class TooManyAttempts(TriageError):
    status, code = 429, "too_many_attempts"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class WebUser:
    """The signed-in user: the same :class:`Principal` the API uses, plus what pages show."""

    principal: Principal
    name: str
    csrf_token: str


class LoginThrottle:
    """Failed logins, per process: at most ``failures`` per (username, source address) per
    ``window`` seconds, and at most ``ceiling`` from all (username, source) pairs together.

    Why two limits and an exemption: a per-username limit lets anyone lock a user out by
    typing wrong passwords for them; per (username, source), a third party elsewhere only
    throttles itself. The ceiling stops a guesser spread over many addresses, and a pair
    that signed in successfully within the window is exempt from it, so the real user at
    their usual address still gets in while the ceiling holds (their own pair's limit
    still applies).
    """

    def __init__(
        self, failures: int, window: float, ceiling: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.window = window
        self.ceiling = ceiling
        self.clock = clock
        self._seen: dict[tuple[str, str], deque[float]] = {}
        self._all: deque[float] = deque()
        self._good: dict[tuple[str, str], float] = {}
        self._throttled = 0
        self._last_report: float | None = None
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        while self._all and self._all[0] <= now - self.window:
            self._all.popleft()
        if len(self._seen) > 10_000:  # names anyone can type: keep only recent failures
            self._seen = {k: v for k, v in self._seen.items() if v and v[-1] > now - self.window}
        if len(self._good) > 10_000:
            self._good = {k: t for k, t in self._good.items() if t > now - self.window}

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._seen.setdefault(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def check(self, name: str, source: str) -> None:
        """Raises TooManyAttempts while (``name``, ``source``) may not try."""
        now = self.clock()
        key = (name, source)
        with self._lock:
            self._prune(now)
            times = self._recent(key, now)
            if len(times) >= self.failures:
                wait = times[0] + self.window - now
            elif len(self._all) >= self.ceiling and self._good.get(key, -self.window) <= now - self.window:
                wait = self._all[0] + self.window - now
            else:
                return
            self._throttled += 1
        raise TooManyAttempts("too many failed logins; try again later", wait)

    def report_due(self) -> int | None:
        """Throttled attempts since the last report, when a report is due (at most one per
        window, so a flood of attempts is one audit event with a count); else None."""
        now = self.clock()
        with self._lock:
            if self._throttled == 0 or (
                self._last_report is not None and now - self._last_report < self.window
            ):
                return None
            count, self._throttled, self._last_report = self._throttled, 0, now
            return count

    def failed(self, name: str, source: str) -> None:
        now = self.clock()
        with self._lock:
            self._recent((name, source), now).append(now)
            self._all.append(now)

    def succeeded(self, name: str, source: str) -> None:
        with self._lock:
            self._seen.pop((name, source), None)
            self._good[(name, source)] = self.clock()


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _principal(user: User) -> Principal:
    return Principal(user.id, Role(user.role), frozenset(c.id for c in user.clinics))


def login(
    session: Session, *, name: str, password: str, source: str, throttle: LoginThrottle, settings: Settings
) -> str | TooManyAttempts | None:
    """Check a username and password; on success open a session and return its token.

    Every attempt is audited (110114 login); throttled attempts are aggregated, one 110113
    security alert with their count at most once per throttle window. The audit row names
    the user by id, never by what was typed (nor the source address). Refusals are returned, not
    raised, so that their audit rows commit.

    Returns:
        The session token (for the cookie); None when the name or password is wrong;
        :class:`TooManyAttempts` (to raise after commit) while the username is throttled.
    """
    try:
        throttle.check(name, source)
    except TooManyAttempts as exc:
        count = throttle.report_due()
        if count is not None:
            record(
                session,
                actor="anonymous",
                action="web.login_throttled",
                code=EventCode.SECURITY_ALERT,
                object_type="user",
                object_id="-",
                outcome=Outcome.MINOR_FAILURE,
                details={"throttled_attempts": count, "window_seconds": throttle.window},
            )
        return exc
    user = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
    good = verify_password(user.password_hash if user else None, password)
    if user is None or not good or user.disabled or user.password_hash is None:
        throttle.failed(name, source)
        record(
            session,
            actor="anonymous",
            action="web.login",
            code=EventCode.LOGIN,
            object_type="user",
            object_id=str(user.id) if user else "-",
            outcome=Outcome.MINOR_FAILURE,
            details={"reason": "unknown user" if user is None else "refused"},
        )
        return None
    throttle.succeeded(name, source)
    token = secrets.token_urlsafe(32)  # 256 bits
    now = datetime.now(UTC)
    # Sessions abandoned without logout are swept here, so the table stays small.
    session.execute(
        delete(WebSession).where(
            (WebSession.last_seen < now - timedelta(minutes=settings.web_idle_minutes))
            | (WebSession.created_at < now - timedelta(hours=settings.web_session_hours))
        )
    )
    session.add(
        WebSession(
            token_sha256=_sha256(token),
            user_id=user.id,
            csrf_token=secrets.token_hex(32),
            created_at=now,
            last_seen=now,
        )
    )
    record(
        session,
        actor=f"user:{user.id}",
        action="web.login",
        code=EventCode.LOGIN,
        object_type="user",
        object_id=str(user.id),
    )
    return token


def peek(session: Session, *, token: str | None, settings: Settings) -> tuple[WebUser | None, bool]:
    """Read-only look at a session: its user (None if absent or expired), and whether
    :func:`current` has something to write (an expired row to delete, ``last_seen`` due)."""
    if not token:
        return None, False
    row = session.execute(
        select(WebSession).where(WebSession.token_sha256 == _sha256(token))
    ).scalar_one_or_none()
    if row is None:
        return None, False
    now = datetime.now(UTC)
    user = session.get_one(User, row.user_id)
    expired = (
        now - row.last_seen > timedelta(minutes=settings.web_idle_minutes)
        or now - row.created_at > timedelta(hours=settings.web_session_hours)
        or user.disabled
    )
    if expired:
        return None, True
    return WebUser(_principal(user), user.name, row.csrf_token), now - row.last_seen > TOUCH_EVERY


def current(session: Session, *, token: str | None, settings: Settings) -> WebUser | None:
    """The user of a live session, or None; an expired session's row is deleted and a live
    one's ``last_seen`` is moved on (at most every ``TOUCH_EVERY``)."""
    if not token:
        return None
    row = session.execute(
        select(WebSession).where(WebSession.token_sha256 == _sha256(token))
    ).scalar_one_or_none()
    if row is None:
        return None
    now = datetime.now(UTC)
    idle = timedelta(minutes=settings.web_idle_minutes)
    user = session.get_one(User, row.user_id)
    too_old = now - row.created_at > timedelta(hours=settings.web_session_hours)
    if now - row.last_seen > idle or too_old or user.disabled:
        session.delete(row)
        return None
    if now - row.last_seen > TOUCH_EVERY:
        row.last_seen = now
    return WebUser(_principal(user), user.name, row.csrf_token)


def logout(session: Session, *, token: str, user: WebUser) -> None:
    """End the session (its row is deleted) and audit it."""
    session.execute(delete(WebSession).where(WebSession.token_sha256 == _sha256(token)))
    record(
        session,
        actor=user.principal.actor,
        action="web.logout",
        code=EventCode.LOGIN,
        object_type="user",
        object_id=str(user.principal.user_id),
    )


def login_token(site_key: bytes) -> str:
    """A pre-session CSRF token for the login form: a nonce and its HMAC under a site key.

    The double-submit cookie alone can be planted by anyone who can set a cookie for the
    host (a sibling subdomain, a plain-http hop); a token the server MACed cannot be minted
    by them, so the login form only accepts tokens this site issued.
    """
    nonce = secrets.token_hex(16)
    return nonce + _login_mac(site_key, nonce)  # 128-bit nonce, 128-bit MAC: 64 hex digits


def _login_mac(site_key: bytes, nonce: str) -> str:
    return hmac.new(site_key, b"login-csrf:" + nonce.encode(), hashlib.sha256).hexdigest()[:32]


def login_token_ok(site_key: bytes, cookie: str | None, given: str | None) -> bool:
    """The form's token equals the cookie's and was issued by this site (constant time)."""
    if not cookie or not given or len(cookie) != 64 or not csrf_ok(cookie, given):
        return False
    return hmac.compare_digest(_login_mac(site_key, cookie[:32]).encode(), cookie[32:].encode())


def csrf_ok(expected: str, given: str | None) -> bool:
    """Constant-time comparison of the session's CSRF token with the one a request sent."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())
