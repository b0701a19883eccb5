"""Row 10: login throttle per (username, source) with a ceiling; no third-party lockout;
throttled attempts aggregated in the audit log."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from audit.log import AuditEvent
from tests.conftest import runtime_of
from tests.security.conftest import PASSWORD, Site
from triage_api.web import sessions
from triage_api.web.sessions import LoginThrottle, TooManyAttempts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_third_party_elsewhere_cannot_lock_the_user_out() -> None:
    throttle = LoginThrottle(failures=5, window=900, ceiling=100, clock=Clock())
    for _ in range(50):
        try:
            throttle.check("dr", "198.51.100.7")
            throttle.failed("dr", "198.51.100.7")
        except TooManyAttempts:
            pass
    with pytest.raises(TooManyAttempts):
        throttle.check("dr", "198.51.100.7")
    throttle.check("dr", "10.0.0.5")  # the real user, at their own address: not throttled


def test_the_ceiling_stops_a_spread_guesser_but_not_a_known_good_pair() -> None:
    clock = Clock()
    throttle = LoginThrottle(failures=5, window=900, ceiling=20, clock=clock)
    throttle.succeeded("dr", "10.0.0.5")
    for i in range(20):
        throttle.failed("dr", f"203.0.113.{i}")
    with pytest.raises(TooManyAttempts):
        throttle.check("dr", "203.0.113.200")
    with pytest.raises(TooManyAttempts):
        throttle.check("nurse", "10.0.0.9")
    throttle.check("dr", "10.0.0.5")  # signed in from there lately: exempt from the ceiling
    clock.now += 901
    throttle.check("nurse", "10.0.0.9")  # the window passed


def test_throttled_attempts_are_one_audit_event_per_window_with_a_count(site: Site) -> None:
    runtime = runtime_of(site.client)
    throttle = LoginThrottle(failures=2, window=900, ceiling=100, clock=Clock())
    outcomes = []
    for _ in range(40):
        with runtime.factory() as session, session.begin():
            outcomes.append(
                sessions.login(
                    session,
                    name="radiologist-north",
                    password="wrong password",
                    source="198.51.100.7",
                    throttle=throttle,
                    settings=runtime.settings,
                )
            )
    assert sum(isinstance(o, TooManyAttempts) for o in outcomes) == 38
    with runtime.reads() as session:
        events = list(
            session.execute(select(AuditEvent).where(AuditEvent.action.like("web.login%"))).scalars()
        )
    throttled = [e for e in events if e.action == "web.login_throttled"]
    assert len(throttled) == 1 and json.loads(throttled[0].details)["throttled_attempts"] == 1
    assert len([e for e in events if e.action == "web.login"]) == 2
    assert "198.51.100.7" not in "".join(e.details for e in events)
    # the real user, from elsewhere, signs in
    with runtime.factory() as session, session.begin():
        token = sessions.login(
            session,
            name="radiologist-north",
            password=PASSWORD,
            source="10.0.0.5",
            throttle=throttle,
            settings=runtime.settings,
        )
    assert isinstance(token, str)
