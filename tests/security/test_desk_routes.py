"""The admin's, auditor's and clinic's desks without a browser: who may call them, CSRF, the
one-time key, audit events, precise refusals that change nothing, and the upload route's gate."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from audit.log import AuditEvent
from tests.conftest import DATA, app_of, runtime_of, wait_for
from tests.security.conftest import PASSWORD, Site, api_routes
from triage_api.tables import ApiKey, Case, User, WebSession

PNG = (DATA / "cxr_normal.jpeg").read_bytes()


def _admin_routes(site: Site) -> list[tuple[str, str]]:
    found = [
        (method, route.path)
        for route in api_routes(app_of(site.client))
        for method in route.methods or ()
        if route.path.startswith("/web/admin")
    ]
    assert len(found) >= 8, found
    return found


def _fill(path: str, site: Site) -> str:
    return path.format(user_id=site.ids["uploader-north"], prefix=site.keys["uploader-north"].split("_")[1])


def _count(site: Site, model: type[User] | type[ApiKey]) -> int:
    with runtime_of(site.client).reads() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def _actions(site: Site, actor: str) -> list[str]:
    with runtime_of(site.client).reads() as session:
        return list(
            session.execute(
                select(AuditEvent.action).where(AuditEvent.actor == actor).order_by(AuditEvent.seq)
            ).scalars()
        )


def test_every_admin_route_refuses_every_other_role(site: Site) -> None:
    routes = _admin_routes(site)
    users, keys = _count(site, User), _count(site, ApiKey)
    for user in ("uploader-north", "radiologist-north", "auditor-north", "auditor-south"):
        web = site.web(user)
        for method, path in routes:
            form = {"name": "mallory", "role": "admin", "password": "x" * 20, "clinics": "north"}
            answer = web.request(method, _fill(path, site), data=form, follow_redirects=False)
            assert answer.status_code == 403, (user, method, path, answer.status_code)
    assert (_count(site, User), _count(site, ApiKey)) == (users, keys)
    with runtime_of(site.client).reads() as session:
        assert not session.get_one(User, site.ids["uploader-north"]).disabled


def test_admin_forms_without_the_csrf_token_are_refused(site: Site) -> None:
    web = site.web("site-admin")
    del web.headers["X-CSRF-Token"]
    users = _count(site, User)
    for method, path in _admin_routes(site):
        if method != "POST":
            continue
        form = {"name": "nocsrf", "role": "radiologist", "clinics": "north", "password": "p" * 14}
        answer = web.post(_fill(path, site), data=form, follow_redirects=False)
        assert answer.status_code == 403 and "CSRF" in answer.text, (path, answer.status_code)
        wrong = web.post(_fill(path, site), data={**form, "csrf_token": "0" * 64}, follow_redirects=False)
        assert wrong.status_code == 403, path
    assert _count(site, User) == users
    with runtime_of(site.client).reads() as session:
        north = session.get_one(User, site.ids["uploader-north"])
        assert not north.disabled and north.clinics[0].name == "north"


def _created_key(admin: TestClient, form: dict[str, str]) -> str:
    answer = admin.post("/web/admin/users", data=form, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/web/admin?done=created", answer.text
    assert "trg_" not in answer.headers["location"] and "trg_" not in answer.text
    page = admin.get("/web/admin")
    found = re.search(r'<code id="new-key-value">(trg_[0-9a-f]{12}_[A-Za-z0-9_-]+)</code>', page.text)
    assert found is not None, page.text
    again = admin.get("/web/admin")  # shown once
    assert found.group(1) not in again.text and 'id="new-key"' not in again.text
    return found.group(1)


def test_admin_manages_a_user_through_the_pages_and_every_step_is_audited(site: Site) -> None:
    admin = site.web("site-admin")
    api = site.client
    key = _created_key(
        admin, {"name": "dr-new", "role": "radiologist", "clinics": "north, south", "password": ""}
    )
    assert api.get("/v1/worklist", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with runtime_of(api).reads() as session:
        made = session.execute(select(User).where(User.name == "dr-new")).scalar_one()
        user_id = made.id
        assert sorted(c.name for c in made.clinics) == ["north", "south"] and made.password_hash is None

    # A password lets them sign in; a reset ends their sessions and the new one works.
    assert admin.post(f"/web/admin/users/{user_id}/password", data={"password": PASSWORD}).status_code == 200
    them = site.web("dr-new")
    assert them.get("/web/worklist").status_code == 200
    reset = admin.post(f"/web/admin/users/{user_id}/password", data={"password": "another long password"})
    assert reset.status_code == 200 and "Password set" in reset.text
    assert them.get("/web/worklist", follow_redirects=False).status_code == 401  # signed out

    # Disable: sessions end and the key stops; enable restores both.
    them = TestClient(api.app)
    form = them.get("/login").text
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', form)
    assert token is not None
    them.post(
        "/login",
        data={"username": "dr-new", "password": "another long password", "csrf_token": token.group(1)},
    )
    assert them.get("/web/worklist").status_code == 200
    assert admin.post(f"/web/admin/users/{user_id}/disable").status_code == 200
    with runtime_of(api).reads() as session:
        assert session.execute(select(func.count()).where(WebSession.user_id == user_id)).scalar_one() == 0
    assert them.get("/web/worklist", follow_redirects=False).status_code == 303
    assert api.get("/v1/worklist", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert admin.post(f"/web/admin/users/{user_id}/enable").status_code == 200
    assert api.get("/v1/worklist", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    # Another key, then revoke the first: it answers 401, the new one works.
    assert admin.post(f"/web/admin/users/{user_id}/keys", follow_redirects=False).status_code == 303
    second = re.search(r'<code id="new-key-value">(trg_[^<]+)</code>', admin.get("/web/admin").text)
    assert second is not None and second.group(1) != key
    assert admin.post(f"/web/admin/keys/{key.split('_')[1]}/revoke").status_code == 200
    assert api.get("/v1/worklist", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert api.get("/v1/worklist", headers={"Authorization": f"Bearer {second.group(1)}"}).status_code == 200

    # Clinics: exactly those listed, at once.
    assert admin.post(f"/web/admin/users/{user_id}/clinics", data={"clinics": "south"}).status_code == 200
    with runtime_of(api).reads() as session:
        assert [c.name for c in session.get_one(User, user_id).clinics] == ["south"]

    assert [a for a in _actions(site, f"user:{site.ids['site-admin']}") if a != "web.login"] == [
        "user.create",
        "user.set_password",
        "user.set_password",
        "user.disable",
        "user.enable",
        "key.issue",
        "key.revoke",
        "user.sessions_end",
        "user.clinics",
    ]
    page = admin.get("/web/admin").text
    assert "dr-new" in page and key.split("_")[1] in page and "revoked" in page
    assert 'id="queue-depth"' in page and 'id="health-status"' in page


def test_bad_admin_input_says_why_and_changes_nothing(site: Site) -> None:
    admin = site.web("site-admin")
    users, keys = _count(site, User), _count(site, ApiKey)
    north = site.ids["uploader-north"]
    for path, form, reason in (
        ("/web/admin/users", {"name": "bad name!", "role": "radiologist"}, "name: String should match"),
        ("/web/admin/users", {"name": "x", "role": "pope"}, "role: Input should be"),
        ("/web/admin/users", {"name": "x", "role": "uploader", "clinics": "a, b"}, "exactly one clinic"),
        ("/web/admin/users", {"name": "x", "role": "admin", "clinics": "a"}, "reads no clinic"),
        ("/web/admin/users", {"name": "x", "role": "auditor", "password": "short"}, "at least 12"),
        ("/web/admin/users", {"name": "site-admin", "role": "admin"}, "a user named site-admin exists"),
        (f"/web/admin/users/{north}/password", {"password": "short"}, "a password has 12 to 200"),
        (f"/web/admin/users/{north}/clinics", {"clinics": "north, south"}, "exactly one clinic"),
        (f"/web/admin/users/{north}/clinics", {"clinics": "<b>"}, "clinics:"),
    ):
        answer = admin.post(path, data=form, follow_redirects=False)
        assert answer.status_code in (409, 422), (path, form, answer.status_code)
        assert 'id="admin-error"' in answer.text and reason in answer.text, (path, form)
        if "name" in form:
            assert f'value="{form["name"]}"' in answer.text.replace("&#34;", '"') or "!" in form["name"]
    assert (_count(site, User), _count(site, ApiKey)) == (users, keys)
    with runtime_of(site.client).reads() as session:
        assert session.get_one(User, north).password_hash is not None
        assert [c.name for c in session.get_one(User, north).clinics] == ["north"]
    assert admin.post("/web/admin/users/999999/disable").status_code == 404
    assert admin.post("/web/admin/keys/0123456789ab/revoke").status_code == 404


def test_the_key_cookie_only_opens_for_the_session_it_was_made_in(site: Site) -> None:
    admin = site.web("site-admin")
    admin.post(
        "/web/admin/users", data={"name": "k1", "role": "auditor", "clinics": "north"}, follow_redirects=False
    )
    sealed = admin.cookies.get("triage_new_key")
    assert sealed and "trg_" not in sealed
    other = site.web("site-admin")  # another session of the same admin
    other.cookies.set("triage_new_key", sealed, path="/web/admin")
    assert 'id="new-key"' not in other.get("/web/admin").text
    assert 'id="new-key"' in admin.get("/web/admin").text


def test_the_audit_log_page_filters_pages_newest_first_and_is_audited(site: Site) -> None:
    auditor = site.web("auditor-north")
    for n in range(3):
        site.web("site-admin").post(
            "/web/admin/users", data={"name": f"log-{n}", "role": "radiologist", "clinics": "north"}
        )
    page = auditor.get("/web/audit/log", params={"actor": "site-admin", "action": "user.create"}).text
    rows = re.findall(r'<tr data-seq="(\d+)">', page)
    assert len(rows) == 3 and rows == sorted(rows, key=int, reverse=True)
    assert page.count("site-admin <span") == 3
    assert 'value="user.create"' in page and 'value="site-admin"' in page
    empty = auditor.get("/web/audit/log", params={"action": "user.create", "until": "2000-01-01"}).text
    assert "No events match." in empty
    bad = auditor.get("/web/audit/log", params={"since": "2026-05-02", "until": "2026-05-01"})
    assert bad.status_code == 422 and "after the" in bad.text
    assert auditor.get("/web/audit/log", params={"since": "yesterday"}).status_code == 422
    with runtime_of(site.client).reads() as session:
        last = (
            session.execute(
                select(AuditEvent).where(AuditEvent.action == "audit.query").order_by(AuditEvent.seq.desc())
            )
            .scalars()
            .first()
        )
    assert last is not None and last.actor == f"user:{site.ids['auditor-north']}"


def test_the_upload_route_is_gated_before_the_body_and_scoped_to_the_clinic(site: Site) -> None:
    anonymous = TestClient(site.client.app, raise_server_exceptions=False)
    refused = anonymous.post("/web/clinic/upload", content=PNG, headers={"X-CSRF-Token": "0" * 64})
    assert refused.status_code == 401
    south = site.web("uploader-south")
    token = south.headers.pop("X-CSRF-Token")
    assert south.post("/web/clinic/upload", content=PNG).status_code == 403  # no CSRF token
    limit = runtime_of(site.client).settings.max_upload_bytes
    huge = south.post("/web/clinic/upload", content=b"\0" * (limit + 1), headers={"X-CSRF-Token": token})
    assert huge.status_code == 413
    bad = south.post("/web/clinic/upload", content=b"not a study", headers={"X-CSRF-Token": token})
    assert bad.status_code == 415 and bad.json()["error"]["message"]
    with runtime_of(site.client).reads() as session:
        assert session.execute(select(func.count()).select_from(Case)).scalar_one() == 0
    made = south.post("/web/clinic/upload", content=PNG, headers={"X-CSRF-Token": token})
    assert made.status_code == 201, made.text
    case_id = made.json()["case_id"]
    again = south.post("/web/clinic/upload", content=PNG, headers={"X-CSRF-Token": token})
    assert again.status_code == 200 and again.json()["case_id"] == case_id
    wait_for(site.client, site.keys["uploader-south"], case_id)
    with runtime_of(site.client).reads() as session:
        assert session.get_one(Case, case_id).clinic_id == site_clinic(site, "south")
    assert case_id in south.get("/web/clinic").text
    assert case_id[:12] not in site.web("uploader-north").get("/web/clinic").text


def site_clinic(site: Site, name: str) -> int:
    with runtime_of(site.client).reads() as session:
        user = session.get_one(User, site.ids[f"uploader-{name}"])
        return user.clinics[0].id
