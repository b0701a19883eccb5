"""Identity, roles and tenancy, driven from the app's own route list."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.conftest import DATA, MakeKey, app_of, bearer, runtime_of, upload, wait_for

# Every API route, classified. A new route fails test_every_route_is_classified until added.
ALLOWED: dict[tuple[str, str], set[str]] = {
    ("POST", "/v1/studies"): {"uploader"},
    ("GET", "/v1/studies/{case_id}"): {"uploader", "radiologist", "auditor"},
    ("GET", "/v1/worklist"): {"uploader", "radiologist", "auditor"},
    ("POST", "/v1/users"): {"admin"},
    ("POST", "/v1/users/{user_id}/disable"): {"admin"},
    ("POST", "/v1/users/{user_id}/enable"): {"admin"},
    ("DELETE", "/v1/keys/{prefix}"): {"admin"},
    ("POST", "/v1/studies/{case_id}/claim"): {"radiologist"},
    ("DELETE", "/v1/studies/{case_id}/claim"): {"radiologist", "admin"},
    ("POST", "/v1/studies/{case_id}/reads"): {"radiologist"},
    ("POST", "/v1/studies/{case_id}/priority"): {"radiologist"},
    ("GET", "/v1/studies/{case_id}/image"): {"uploader", "radiologist", "auditor"},
    ("GET", "/v1/studies/{case_id}/heatmap"): {"radiologist", "auditor"},
    ("POST", "/v1/appeals"): {"uploader"},
    ("GET", "/v1/appeals"): {"uploader", "radiologist", "auditor", "admin"},
    ("GET", "/v1/appeals/{appeal_id}"): {"uploader", "radiologist", "auditor", "admin"},
    ("POST", "/v1/appeals/{appeal_id}/take"): {"radiologist"},
    ("POST", "/v1/appeals/{appeal_id}/assign"): {"admin"},
    ("GET", "/v1/appeals/{appeal_id}/case"): {"radiologist"},
    ("GET", "/v1/appeals/{appeal_id}/image"): {"radiologist"},
    ("POST", "/v1/appeals/{appeal_id}/decision"): {"radiologist"},
    ("GET", "/v1/metrics/model"): {"auditor"},
    ("GET", "/v1/audit"): {"auditor"},
    ("GET", "/v1/health"): {"admin", "auditor"},
    ("GET", "/metrics"): {"admin", "auditor"},
    ("PUT", "/v1/clinics/{clinic}/ai-mode"): {"admin"},
    ("GET", "/v1/clinics/{clinic}/validation"): {"admin", "auditor"},
    ("GET", "/v1/clinics/{clinic}/comparison"): {"admin", "auditor"},
    ("POST", "/v1/clinics/{clinic}/calibrations"): {"admin"},
    ("GET", "/v1/clinics/{clinic}/calibrations"): {"admin", "auditor"},
    ("POST", "/v1/calibrations/{calibration_id}/approve"): {"admin", "auditor"},
    ("POST", "/v1/calibrations/{calibration_id}/reject"): {"admin", "auditor"},
    ("POST", "/v1/calibrations/{calibration_id}/rollback"): {"admin", "auditor"},
    ("POST", "/dicom-web/studies"): {"uploader"},
    ("GET", "/dicom-web/studies"): {"radiologist", "auditor"},
    ("GET", "/dicom-web/studies/{study}/series"): {"radiologist", "auditor"},
    ("GET", "/dicom-web/studies/{study}/instances"): {"radiologist", "auditor"},
    ("GET", "/dicom-web/studies/{study}/series/{series}/instances"): {"radiologist", "auditor"},
    ("GET", "/dicom-web/studies/{study}/metadata"): {"radiologist", "auditor"},
    ("GET", "/dicom-web/studies/{study}/series/{series}/metadata"): {"radiologist", "auditor"},
    ("GET", "/dicom-web/studies/{study}/series/{series}/instances/{sop}"): {"radiologist", "auditor"},
    ("GET", "/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}"): {
        "radiologist",
        "auditor",
    },
    ("GET", "/v1/worklist/stream"): {"uploader", "radiologist", "auditor"},
    ("POST", "/v1/clinics/{clinic}/webhooks"): {"admin"},
    ("GET", "/v1/clinics/{clinic}/webhooks"): {"admin"},
    ("DELETE", "/v1/clinics/{clinic}/webhooks/{webhook_id}"): {"admin"},
    ("POST", "/v1/clinics/{clinic}/webhooks/{webhook_id}/rotate"): {"admin"},
    ("GET", "/v1/clinics/{clinic}/webhooks/{webhook_id}/deliveries"): {"admin"},
    ("POST", "/v1/clinics/{clinic}/webhooks/{webhook_id}/deliveries/{delivery_id}/resend"): {"admin"},
}
ROLES = ("uploader", "radiologist", "auditor", "admin")


def api_routes(client: TestClient) -> list[tuple[str, str]]:
    """Every (method, path) of the OpenAPI document: the routes a client can discover."""
    paths = app_of(client).openapi()["paths"]
    return sorted((method.upper(), path) for path, item in paths.items() for method in item)


def call(client: TestClient, method: str, path: str, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    url = (
        path.replace("{case_id}", uuid.uuid4().hex)
        .replace("{prefix}", "0123456789ab")
        .replace("{appeal_id}", "987654")
        .replace("{clinic}", "north")
        .replace("{calibration_id}", "987654")
        .replace("{study}", "1.2.3")
        .replace("{series}", "1.2.3.4")
        .replace("{sop}", "1.2.3.4.5")
        .replace("{frame_list}", "1")
        .replace("{webhook_id}", "987654")
        .replace("{delivery_id}", "987654")
        .replace("{user_id}", "987654")
    )
    if path.endswith("/stream"):  # an open event stream: the status line is the answer
        with client.stream(method, url, headers=headers) as response:
            if response.status_code != 200:
                response.read()
            return response
    if (method, path) == ("POST", "/v1/studies"):
        return client.post(
            url,
            files={"file": ("x.dcm", (DATA / "dx_thorax_dog_monochrome1.dcm").read_bytes())},
            headers=headers,
        )
    if (method, path) == ("POST", "/v1/users"):
        return client.post(
            url,
            json={"name": f"u{uuid.uuid4().hex[:8]}", "role": "uploader", "clinics": ["east"]},
            headers=headers,
        )
    return client.request(method, url, headers=headers)


def test_every_route_is_classified(client: TestClient) -> None:
    assert set(api_routes(client)) == set(ALLOWED)


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer trg_0123456789ab_nope"}, {"Authorization": "Basic abc"}]
)
def test_every_route_needs_a_valid_credential(client: TestClient, headers: dict[str, str]) -> None:
    for method, path in api_routes(client):
        response = call(client, method, path, headers)
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.json()["error"]["code"] == "not_authenticated"


def test_role_route_matrix(client: TestClient, make_key: MakeKey) -> None:
    keys = {
        "uploader": make_key("uploader", "north"),
        "radiologist": make_key("radiologist", "north"),
        "auditor": make_key("auditor", "north"),
        "admin": make_key("admin"),
    }
    for method, path in api_routes(client):
        for role in ROLES:
            response = call(client, method, path, bearer(keys[role]))
            if role in ALLOWED[(method, path)]:
                assert response.status_code not in (401, 403), (role, method, path, response.text)
            else:
                assert response.status_code == 403, (role, method, path, response.status_code)
                assert response.json()["error"]["code"] == "forbidden"


def test_revoked_key_is_refused(client: TestClient, make_key: MakeKey) -> None:
    key = make_key("radiologist", "north")
    prefix = key.split("_")[1]
    assert client.get("/v1/worklist", headers=bearer(key)).status_code == 200
    revoked = client.delete(f"/v1/keys/{prefix}", headers=bearer(make_key("admin")))
    assert revoked.status_code == 200
    assert client.get("/v1/worklist", headers=bearer(key)).status_code == 401


def test_admin_creates_user_whose_key_works_and_is_stored_hashed(
    client: TestClient, make_key: MakeKey
) -> None:
    response = client.post(
        "/v1/users",
        json={"name": "dr-who", "role": "radiologist", "clinics": ["north", "south"]},
        headers=bearer(make_key("admin")),
    )
    assert response.status_code == 201
    key = response.json()["api_key"]
    secret = key.split("_", 2)[2]
    assert len(secret) >= 32  # 32 random bytes, urlsafe base64: 256 bits
    assert client.get("/v1/worklist", headers=bearer(key)).status_code == 200
    from sqlalchemy import text

    with runtime_of(client).engine.connect() as connection:
        dump = " ".join(str(row) for row in connection.execute(text("SELECT * FROM api_keys")))
    assert secret not in dump
    duplicate = client.post(
        "/v1/users",
        json={"name": "dr-who", "role": "auditor", "clinics": ["north"]},
        headers=bearer(make_key("admin")),
    )
    assert duplicate.status_code == 409


@pytest.mark.parametrize("extra", [{"risk": 0.1}, {"clinic_id": 1}, {"api_key": "x"}])
def test_request_bodies_forbid_extra_fields(client: TestClient, make_key: MakeKey, extra: dict) -> None:  # type: ignore[type-arg]
    body = {"name": "someone", "role": "uploader", "clinics": ["north"], **extra}
    response = client.post("/v1/users", json=body, headers=bearer(make_key("admin")))
    assert response.status_code == 422


def test_clinic_cannot_see_another_clinics_case_or_worklist(client: TestClient, make_key: MakeKey) -> None:
    north_up = make_key("uploader", "north")
    case_id = upload(client, north_up, (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes()).json()[
        "id"
    ]
    wait_for(client, north_up, case_id)
    for key in (
        make_key("uploader", "south"),
        make_key("radiologist", "south"),
        make_key("auditor", "south"),
    ):
        response = client.get(f"/v1/studies/{case_id}", headers=bearer(key))
        assert response.status_code == 404
        assert response.json() == {"error": {"code": "not_found", "message": "no such case"}}
        assert client.get("/v1/worklist", headers=bearer(key)).json() == []
    # A radiologist granted both clinics sees it.
    both = make_key("radiologist", "north", "south")
    assert client.get(f"/v1/studies/{case_id}", headers=bearer(both)).status_code == 200
    assert [item["id"] for item in client.get("/v1/worklist", headers=bearer(both)).json()] == [case_id]


def test_random_ids_are_404(client: TestClient, make_key: MakeKey) -> None:
    key = make_key("radiologist", "north")

    @hsettings(max_examples=60, deadline=None)
    @given(st.text(alphabet="0123456789abcdefxyzABC-_~", min_size=1, max_size=80))
    def check(case_id: str) -> None:
        response = client.get(f"/v1/studies/{case_id}", headers=bearer(key))
        assert response.status_code == 404

    check()


def test_admin_and_uploader_constraints(client: TestClient, make_key: MakeKey) -> None:
    admin = bearer(make_key("admin"))
    two_clinics = client.post(
        "/v1/users", json={"name": "up2", "role": "uploader", "clinics": ["a", "b"]}, headers=admin
    )
    assert two_clinics.status_code == 403
    admin_with_clinic = client.post(
        "/v1/users", json={"name": "ad2", "role": "admin", "clinics": ["a"]}, headers=admin
    )
    assert admin_with_clinic.status_code == 403
