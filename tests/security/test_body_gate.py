"""Row 3: no request body is read before the caller is authenticated, and JSON bodies are small."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import app_of, bearer
from tests.security.conftest import Site

SIXTY_MB = 60 * 1024 * 1024


def _send(client: TestClient, path: str, headers: dict[str, str], chunks: int) -> tuple[int, int]:
    """Drive the app directly with a chunked body of ``chunks`` x 1 MiB; returns (status,
    chunks the app pulled)."""
    app = app_of(client)
    pulled = 0
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b" " * (1 << 20), "more_body": pulled < chunks}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")]
        + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "app": app,
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return status, pulled


def test_a_huge_json_body_without_a_key_is_refused_unread(client: TestClient) -> None:
    status, pulled = _send(client, "/v1/users", {}, chunks=60)
    assert (status, pulled) == (401, 0)
    status, pulled = _send(client, "/web/appeals", {"Cookie": "triage_session=forged"}, chunks=60)
    assert (status, pulled) == (303, 0)


def test_a_declared_huge_body_is_refused_before_authentication(client: TestClient) -> None:
    answer = client.post(
        "/v1/users",
        content=b"{}",
        headers={"Content-Length": str(SIXTY_MB), "Content-Type": "application/json"},
    )
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "body_too_large"


def test_an_admin_json_body_is_capped(site: Site) -> None:
    big = {"name": "x", "role": "radiologist", "clinics": ["a" * 90] * 100, "password": "p" * 200}
    padded = json.dumps(big) + " " * (70 * 1024)
    answer = site.client.post(
        "/v1/users",
        content=padded,
        headers={**site.headers("site-admin"), "Content-Type": "application/json"},
    )
    assert answer.status_code == 413
    status, pulled = _send(site.client, "/v1/users", site.headers("site-admin"), chunks=60)
    assert status == 413 and pulled <= 1


def test_uploads_keep_their_own_cap(site: Site) -> None:
    answer = site.client.post(
        "/v1/studies",
        files={"file": ("s.png", b"\x89PNG" + b"\0" * (100 * 1024))},
        headers=site.headers("uploader-north"),
    )
    assert answer.status_code == 415  # read in full and judged as a study, not refused for size


def test_the_login_form_is_open_but_small(client: TestClient) -> None:
    assert client.post("/login", data={"username": "u", "password": "p"}).status_code != 401
    assert client.post("/login", content=b"a" * (80 * 1024)).status_code == 413


def test_an_authenticated_json_call_still_works(site: Site) -> None:
    answer = site.client.post(
        "/v1/users",
        json={"name": "new-reader", "role": "radiologist", "clinics": ["north"]},
        headers=site.headers("site-admin"),
    )
    assert answer.status_code == 201
    assert bearer(answer.json()["api_key"])
