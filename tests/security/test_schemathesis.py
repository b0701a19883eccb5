"""Schemathesis against the app's own ``/openapi.json``: generated requests, as a user of
every role, never get a 5xx. Examples are bounded so the run stays short on two cores."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.conftest import app_of
from tests.security.conftest import Site

EXAMPLES_PER_OPERATION = 10


def test_no_generated_request_gets_a_5xx(site: Site) -> None:
    schema = schemathesis.openapi.from_dict(app_of(site.client).openapi())
    users = sorted(site.keys)
    failures: list[str] = []
    sent: list[int] = []
    # Event streams stay open for minutes by design; tests/test_live.py drives them.
    operations = [
        operation
        for operation in (result.ok() for result in schema.get_all_operations())  # type: ignore[union-attr]
        if not operation.path.endswith("/stream")
    ]
    assert len(operations) >= 20
    for operation in operations:

        @given(case=operation.as_strategy(), user=st.sampled_from(users))
        @hsettings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any, user: str) -> None:
            kwargs = case.as_transport_kwargs(base_url="http://testserver")
            kwargs["headers"] = {**(kwargs.get("headers") or {}), **site.headers(user)}
            kwargs.pop("cookies", None)
            answer = site.client.request(**kwargs)
            sent.append(answer.status_code)
            if answer.status_code >= 500:
                failures.append(f"{user} {case.method} {case.formatted_path} -> {answer.status_code}")

        check()
    assert len(sent) >= 3 * len(operations)  # the run did exercise the API
    if failures:
        pytest.fail("\n".join(sorted(set(failures))))
