"""A site with one user per role in two clinics, reachable by API key and by web session."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute

from tests.conftest import claim_and_override, runtime_of
from triage_api import auth, passwords
from triage_api.auth import Role
from triage_api.db import transaction

PASSWORD = "a long test password"
CLINICS = ("north", "south")


def api_routes(app: FastAPI) -> list[APIRoute]:
    """Every route of the app, REST and web, with included routers opened up."""

    def walk(routes: list[BaseRoute]) -> list[APIRoute]:
        found: list[APIRoute] = []
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:
                if route.include_context.prefix:  # type: ignore[attr-defined]
                    raise AssertionError("a router included with a prefix: teach api_routes about it")
                found += walk(included.routes)
            elif isinstance(route, APIRoute):
                found.append(route)
        return found

    return walk(app.routes)


@dataclass
class Site:
    """Users ``<role>-<clinic>`` (the admin: ``site-admin``), each with an API key and a password.

    ``client`` answers a server error as a 500 response (it does not raise), as a real
    client would see it."""

    client: TestClient
    keys: dict[str, str]
    ids: dict[str, int]

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}

    def read_and_appeal(self, case_id: str) -> int:
        """``radiologist-north`` claims and reads (overriding the AI) a scored north case, then
        ``uploader-north`` files an appeal against it; the appeal's id."""
        claim_and_override(self.client, self.headers("radiologist-north"), case_id)
        appeal = self.client.post(
            "/v1/appeals",
            json={
                "case_id": case_id,
                "category": "disagree_with_result",
                "grounds": "Symptoms persist.",
                "contact_reference": "REF-1",
            },
            headers=self.headers("uploader-north"),
        )
        assert appeal.status_code == 201, appeal.text
        return int(appeal.json()["id"])

    def web(self, user: str) -> TestClient:
        """A second client on the same app, signed in to the web pages as ``user``."""
        browser = TestClient(self.client.app, raise_server_exceptions=False)
        form = browser.get("/login").text
        token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', form)
        if token is None:
            raise AssertionError("the login page has no CSRF token")
        answer = browser.post(
            "/login",
            data={"username": user, "password": PASSWORD, "csrf_token": token.group(1)},
            follow_redirects=False,
        )
        if answer.status_code != 303:
            raise AssertionError(f"login as {user} answered {answer.status_code}")
        page = browser.get("/", follow_redirects=True).text
        csrf = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page)
        if csrf is None:
            raise AssertionError(f"{user}'s start page carries no CSRF token")
        browser.headers["X-CSRF-Token"] = csrf.group(1)
        return browser


@pytest.fixture
def site(client: TestClient) -> Iterator[Site]:
    runtime = runtime_of(client)
    keys: dict[str, str] = {}
    ids: dict[str, int] = {}
    people: list[tuple[str, Role, list[str]]] = [("site-admin", Role.ADMIN, [])] + [
        (f"{role.value}-{clinic}", role, [clinic])
        for clinic in CLINICS
        for role in (Role.UPLOADER, Role.RADIOLOGIST, Role.AUDITOR)
    ]
    hashed = passwords.hash_password(PASSWORD)
    with transaction(runtime.factory) as session:
        for name, role, clinics in people:
            user, key = auth.add_user(session, name=name, role=role, clinics=clinics)
            user.password_hash = hashed
            keys[name], ids[name] = key, user.id
    yield Site(TestClient(client.app, raise_server_exceptions=False), keys, ids)
