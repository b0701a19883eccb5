"""The route x role x clinic matrix, generated from the app's own route table (REST and web).

Every route must be classified in ``ALLOWED`` (a new route fails until it is). Then every
user (each role, in the case's clinic and in another) calls every route on a case and an
appeal of clinic north: no call may answer 5xx; a role not allowed, or a user of the other
clinic, never gets a 2xx.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import DATA, app_of, upload, wait_for
from tests.security.conftest import Site, api_routes

R, U, A, ADM = "radiologist", "uploader", "auditor", "admin"
EVERYONE = {R, U, A, ADM}
PUBLIC = {"public"}
ALLOWED: dict[tuple[str, str], set[str]] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/metrics"): {ADM, A},
    ("GET", "/login"): PUBLIC,
    ("POST", "/login"): PUBLIC,
    ("POST", "/logout"): EVERYONE,
    ("GET", "/"): EVERYONE,
    ("GET", "/web/worklist"): {R},
    ("GET", "/web/api/worklist"): {R, U, A},
    ("GET", "/web/cases/{case_id}"): {R, U, A},
    ("GET", "/web/cases/{case_id}/pixels"): {R, U, A},
    ("GET", "/web/cases/{case_id}/heatmap.png"): {R, U, A},
    ("POST", "/web/cases/{case_id}/claim"): {R},
    ("POST", "/web/cases/{case_id}/release"): {R},
    ("POST", "/web/cases/{case_id}/read"): {R},
    ("POST", "/web/next"): {R},
    ("POST", "/web/cases/{case_id}/priority"): {R},
    ("POST", "/web/appeals/{appeal_id}/take"): {R},
    ("GET", "/web/appeals/{appeal_id}"): {R},
    ("GET", "/web/appeals/{appeal_id}/pixels"): {R},
    ("POST", "/web/appeals/{appeal_id}/decision"): {R},
    ("GET", "/web/clinic"): {U},
    ("POST", "/web/appeals"): {U},
    ("GET", "/web/audit"): {A},
    ("GET", "/web/audit/log"): {A},
    ("GET", "/web/audit/monitoring"): {A},
    ("GET", "/web/admin"): {ADM},
    ("POST", "/web/admin/users"): {ADM},
    ("POST", "/web/admin/users/{user_id}/disable"): {ADM},
    ("POST", "/web/admin/users/{user_id}/enable"): {ADM},
    ("POST", "/web/admin/users/{user_id}/password"): {ADM},
    ("POST", "/web/admin/users/{user_id}/keys"): {ADM},
    ("POST", "/web/admin/users/{user_id}/clinics"): {ADM},
    ("POST", "/web/admin/keys/{prefix}/revoke"): {ADM},
    ("POST", "/web/clinic/upload"): {U},
    ("POST", "/v1/studies"): {U},
    ("GET", "/v1/studies/{case_id}"): {U, R, A},
    ("GET", "/v1/worklist"): {U, R, A},
    ("POST", "/v1/users"): {ADM},
    ("DELETE", "/v1/keys/{prefix}"): {ADM},
    ("POST", "/v1/studies/{case_id}/claim"): {R},
    ("DELETE", "/v1/studies/{case_id}/claim"): {R, ADM},
    ("POST", "/v1/studies/{case_id}/reads"): {R},
    ("POST", "/v1/studies/{case_id}/priority"): {R},
    ("GET", "/v1/studies/{case_id}/image"): {U, R, A},
    ("GET", "/v1/studies/{case_id}/heatmap"): {U, R, A},
    ("POST", "/v1/appeals"): {U},
    ("GET", "/v1/appeals"): EVERYONE,
    ("GET", "/v1/appeals/{appeal_id}"): EVERYONE,
    ("POST", "/v1/appeals/{appeal_id}/take"): {R},
    ("POST", "/v1/appeals/{appeal_id}/assign"): {ADM},
    ("GET", "/v1/appeals/{appeal_id}/case"): {R},
    ("GET", "/v1/appeals/{appeal_id}/image"): {R},
    ("POST", "/v1/appeals/{appeal_id}/decision"): {R},
    ("GET", "/v1/metrics/model"): {A},
    ("GET", "/v1/audit"): {A},
    ("GET", "/v1/health"): {ADM, A},
    ("POST", "/v1/users/{user_id}/disable"): {ADM},
    ("POST", "/v1/users/{user_id}/enable"): {ADM},
    ("PUT", "/v1/clinics/{clinic}/ai-mode"): {ADM},
    ("GET", "/v1/clinics/{clinic}/validation"): {ADM, A},
    ("GET", "/v1/clinics/{clinic}/comparison"): {ADM, A},
    ("POST", "/v1/clinics/{clinic}/calibrations"): {ADM},
    ("GET", "/v1/clinics/{clinic}/calibrations"): {ADM, A},
    ("POST", "/v1/calibrations/{calibration_id}/approve"): {ADM, A},
    ("POST", "/v1/calibrations/{calibration_id}/reject"): {ADM, A},
    ("POST", "/v1/calibrations/{calibration_id}/rollback"): {ADM, A},
    ("POST", "/v1/clinics/{clinic}/webhooks"): {ADM},
    ("GET", "/v1/clinics/{clinic}/webhooks"): {ADM},
    ("DELETE", "/v1/clinics/{clinic}/webhooks/{webhook_id}"): {ADM},
    ("POST", "/v1/clinics/{clinic}/webhooks/{webhook_id}/rotate"): {ADM},
    ("GET", "/v1/clinics/{clinic}/webhooks/{webhook_id}/deliveries"): {ADM},
    ("POST", "/v1/clinics/{clinic}/webhooks/{webhook_id}/deliveries/{delivery_id}/resend"): {ADM},
    ("GET", "/v1/worklist/stream"): {U, R, A},
    ("GET", "/web/api/worklist/stream"): {R, A},
    ("POST", "/dicom-web/studies"): {U},
    ("GET", "/dicom-web/studies"): {R, A},
    ("GET", "/dicom-web/studies/{study}/series"): {R, A},
    ("GET", "/dicom-web/studies/{study}/instances"): {R, A},
    ("GET", "/dicom-web/studies/{study}/series/{series}/instances"): {R, A},
    ("GET", "/dicom-web/studies/{study}/metadata"): {R, A},
    ("GET", "/dicom-web/studies/{study}/series/{series}/metadata"): {R, A},
    ("GET", "/dicom-web/studies/{study}/series/{series}/instances/{sop}"): {R, A},
    ("GET", "/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}"): {R, A},
}
STREAMS = {("GET", "/v1/worklist/stream"), ("GET", "/web/api/worklist/stream")}
"""Event streams stay open for minutes by design: tests/test_live.py checks who may open them."""
SITE_WIDE = {("GET", "/metrics"), ("GET", "/v1/health")}
"""Allowed routes about no clinic's data (fleet counts)."""


def _routes(site: Site) -> list[tuple[str, str]]:
    return sorted(
        (method, route.path) for route in api_routes(app_of(site.client)) for method in route.methods or ()
    )


def test_every_route_is_classified(site: Site) -> None:
    unclassified = [r for r in _routes(site) if r not in ALLOWED]
    assert not unclassified, f"classify these routes in ALLOWED: {unclassified}"


@pytest.fixture
def north(site: Site) -> dict[str, str]:
    uploader = site.keys["uploader-north"]
    case_id = upload(
        site.client, uploader, (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes()
    ).json()["id"]
    wait_for(site.client, uploader, case_id)
    return {
        "case_id": case_id,
        "appeal_id": str(site.read_and_appeal(case_id)),
        "prefix": "0123456789ab",
        "clinic": "north",
        "user_id": "987654",
        "calibration_id": "987654",
        "webhook_id": "987654",
        "delivery_id": "987654",
        "study": "1.2.3",
        "series": "1.2.3.4",
        "sop": "1.2.3.4.5",
        "frame_list": "1",
    }


def _role(user: str) -> str:
    return "admin" if user == "site-admin" else user.split("-")[0]


def test_no_cell_leaks_or_fails(site: Site, north: dict[str, str]) -> None:
    failures = []
    users = list(site.keys)
    web = {user: site.web(user) for user in users}
    for method, path in _routes(site):
        allowed = ALLOWED[(method, path)]
        if allowed == PUBLIC or (method, path) in {("POST", "/v1/studies"), ("POST", "/logout")} | STREAMS:
            continue
        url = path.format(**north)
        body: dict[str, Any] | None = {} if method in ("POST", "DELETE") else None
        for user in users:
            if path.startswith(("/v1/", "/dicom-web/")) or path == "/metrics":
                answer = site.client.request(method, url, json=body, headers=site.headers(user))
            else:
                answer = web[user].request(method, url, data=body, follow_redirects=False)
            status, role = answer.status_code, _role(user)
            cell = f"{user} {method} {path} -> {status}"
            if status >= 500:
                failures.append(cell)
            elif 200 <= status < 300:
                if role not in allowed:
                    failures.append(f"role not allowed: {cell}")
                elif not user.endswith("-south") or (method, path) in SITE_WIDE:
                    continue
                elif "{" in path:  # about north's case or appeal
                    failures.append(f"other clinic: {cell}")
                elif north["case_id"] in answer.text:  # a list or page: only the caller's rows
                    failures.append(f"other clinic's case listed: {cell}")
    assert not failures, "\n".join(failures)
