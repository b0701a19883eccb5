"""Row 11: browser-protection headers on every response, ``no-store`` on everything with
patient data, and pages that satisfy their own Content-Security-Policy."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from tests.security.conftest import Site

PROTECTIONS = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


def _protected(answer: object) -> None:
    headers = answer.headers  # type: ignore[attr-defined]
    for name, value in PROTECTIONS.items():
        assert headers.get(name) == value, name
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "'unsafe-inline'" not in headers["content-security-policy"]


def test_api_answers_and_errors_are_protected_and_not_stored(site: Site) -> None:
    for path, headers in (
        ("/v1/worklist", site.headers("radiologist-north")),
        ("/v1/worklist", {}),
        ("/v1/appeals/99999", site.headers("radiologist-north")),
        ("/healthz", {}),
    ):
        answer = site.client.get(path, headers=headers)
        _protected(answer)
        assert answer.headers["cache-control"] == "no-store", path
    refused = site.client.post("/v1/users", content=b"x" * 100_000)
    _protected(refused)


def test_pages_are_protected_and_carry_no_inline_code(site: Site) -> None:
    pages = {
        "radiologist-north": ["/web/worklist"],
        "auditor-north": ["/web/audit", "/web/audit/log", "/web/audit/monitoring"],
        "uploader-north": ["/web/clinic"],
        "site-admin": ["/web/admin"],
    }
    for user, paths in pages.items():
        browser = site.web(user)
        for path in [*paths, "/web/cases/nope"]:
            answer = browser.get(path)
            _protected(answer)
            assert answer.headers["cache-control"] == "no-store"
            html = answer.text
            assert not re.search(r"<script(?![^>]*\bsrc=)", html), f"inline script on {path}"
            assert not re.search(r"\sstyle=|<style|\son[a-z]+=|javascript:", html), f"inline code on {path}"
    login = site.client.get("/login")
    _protected(login)


def test_static_files_may_be_cached(client: TestClient) -> None:
    answer = client.get("/static/app.css")
    assert answer.status_code == 200
    assert answer.headers.get("cache-control") != "no-store"
    assert answer.headers["x-content-type-options"] == "nosniff"
