"""Row 12: login CSRF bound server-side, keys never in URLs or logs, the first admin key in a
0600 file, clinic names bounded."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import app_of, runtime_of
from tests.security.conftest import PASSWORD, Site
from triage_api.app import FIRST_ADMIN_KEY


def test_a_planted_login_csrf_token_is_refused(site: Site) -> None:
    browser = TestClient(site.client.app)
    planted = "ab" * 32  # right shape, not issued by this site
    browser.cookies.set("triage_login_csrf", planted, path="/login")
    answer = browser.post(
        "/login",
        data={"username": "radiologist-north", "password": PASSWORD, "csrf_token": planted},
        follow_redirects=False,
    )
    assert answer.status_code == 403
    form = browser.get("/login").text
    issued = re.search(r'name="csrf_token" value="([0-9a-f]+)"', form)
    assert issued is not None
    signed_in = browser.post(
        "/login",
        data={"username": "radiologist-north", "password": PASSWORD, "csrf_token": issued.group(1)},
        follow_redirects=False,
    )
    assert signed_in.status_code == 303


def test_a_key_in_the_query_string_is_refused_and_blanked_before_logging(site: Site) -> None:
    key = site.keys["auditor-north"]
    for query in (f"api_key={key}", f"x={key}", "token=abc"):
        answer = site.client.get(f"/v1/audit?{query}")
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "key_in_url"
        assert key not in answer.text
    app = app_of(site.client)
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/worklist",
        "raw_path": b"/v1/worklist",
        "query_string": f"key={key}".encode(),
        "root_path": "",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "app": app,
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert scope["query_string"] == b""  # what uvicorn's access log prints


def test_the_first_admin_key_is_in_a_private_file_not_on_stdout(client: TestClient, capsys: Any) -> None:
    path = runtime_of(client).settings.secret_dir / FIRST_ADMIN_KEY
    assert path.stat().st_mode & 0o777 == 0o600
    key = path.read_text().strip()
    assert key.startswith("trg_")
    assert client.get("/v1/health", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert key not in capsys.readouterr().out


def test_clinic_names_are_bounded(site: Site) -> None:
    admin = site.headers("site-admin")
    for bad in ("x" * 101, "x" * 2_000_000, "<script>", "", "north\nsouth", " lead"):
        answer = site.client.post(
            "/v1/users", json={"name": "u1", "role": "auditor", "clinics": [bad]}, headers=admin
        )
        assert answer.status_code in (413, 422), bad[:10]
    good = site.client.post(
        "/v1/users", json={"name": "u2", "role": "auditor", "clinics": ["St. Mary_2-East"]}, headers=admin
    )
    assert good.status_code == 201
