"""Row 1: oversized integers and extreme dates are refused (404/422), never a 500.

The routes are walked from the app's own route table, so a new route with an integer or
date parameter is covered the day it is added.
"""

from __future__ import annotations

import datetime as dt
import inspect
import typing
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import AwareDatetime, BaseModel, NaiveDatetime

from tests.conftest import app_of
from tests.security.conftest import Site, api_routes

HUGE = 10**23
EXTREME_DATES = ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z")


def _kind(annotation: Any) -> str | None:
    """``"int"`` or ``"date"`` when ``annotation`` (through Optional and Annotated) is one."""
    if typing.get_origin(annotation) is not None:
        kinds = {
            _kind(arg)
            for arg in typing.get_args(annotation)[
                : 1 if typing.get_origin(annotation) is typing.Annotated else None
            ]
        }
        return next((k for k in ("date", "int") if k in kinds), None)
    if not inspect.isclass(annotation) or issubclass(annotation, bool):
        return None
    if issubclass(annotation, dt.datetime) or annotation in (AwareDatetime, NaiveDatetime):
        return "date"
    return "int" if issubclass(annotation, int) else None


def _params(dependant: Dependant, kind: str) -> list[Any]:
    """Every ``kind`` (path_params, query_params, body_params) field of a route and its dependencies."""
    found = list(getattr(dependant, kind))
    for sub in dependant.dependencies:
        found += _params(sub, kind)
    return found


def _cases(route: APIRoute) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(where, name, path values, query, json body) with one hostile value each."""
    path_params = _params(route.dependant, "path_params")
    path = {p.name: "1" for p in path_params}
    for param in path_params:
        if _kind(param.field_info.annotation) == "int":
            yield "path", param.name, {**path, param.name: str(HUGE)}, {}, {}
    for param in _params(route.dependant, "query_params"):
        kind = _kind(param.field_info.annotation)
        if kind == "int":
            yield "query", param.name, path, {param.alias: str(HUGE)}, {}
        elif kind == "date":
            for value in EXTREME_DATES:
                yield "query", param.name, path, {param.alias: value}, {}
    for param in _params(route.dependant, "body_params"):
        model = param.field_info.annotation
        if inspect.isclass(model) and issubclass(model, BaseModel):
            for name, field in model.model_fields.items():
                if _kind(field.annotation) == "int":
                    yield "body", name, path, {}, {name: HUGE}


def hostile_requests(client: TestClient) -> list[tuple[str, str, str, str, dict[str, Any], dict[str, Any]]]:
    found = []
    for route in api_routes(app_of(client)):
        for where, name, path, query, body in _cases(route):
            url = route.path_format.format(**path)
            for method in sorted(route.methods or ()):
                found.append((method, url, where, name, query, body))
    return found


def test_the_walk_finds_the_known_hostile_parameters(client: TestClient) -> None:
    walked = {(m, u, n) for m, u, _, n, _, _ in hostile_requests(client)}
    assert ("GET", f"/v1/appeals/{HUGE}", "appeal_id") in walked
    assert ("POST", "/v1/appeals/1/assign", "reader_id") in walked
    assert ("GET", "/v1/audit", "after_seq") in walked
    assert ("GET", "/v1/audit", "since") in walked
    assert ("GET", f"/web/appeals/{HUGE}", "appeal_id") in walked


@pytest.mark.parametrize("kind", ["api", "web"])
def test_no_route_answers_500_to_huge_numbers_or_extreme_dates(site: Site, kind: str) -> None:
    users = list(site.keys)
    callers = (
        [(u, site.client, site.headers(u)) for u in users]
        if kind == "api"
        else [(u, site.web(u), {}) for u in users]
    )
    failures = []
    for method, url, where, name, query, body in hostile_requests(site.client):
        if url.startswith("/v1/") != (kind == "api"):
            continue
        for user, caller, headers in callers:
            answer = caller.request(
                method, url, params=query, json=body or None, headers=headers, follow_redirects=False
            )
            if answer.status_code >= 500 or (answer.status_code < 400 and where != "query"):
                failures.append(f"{user} {method} {url} {where}:{name} -> {answer.status_code}")
            elif answer.status_code >= 400 and url.startswith("/v1/"):
                assert answer.json()["error"]["code"]
    assert not failures, "\n".join(failures)
