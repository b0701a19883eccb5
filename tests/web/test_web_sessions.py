"""Web login and sessions without a browser: what is stored, expiry, CSRF, throttling,
passwords from the API and the CLI, and the heat-map route."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from audit.log import AuditEvent
from tests.conftest import DATA, MakeKey, bearer, claim_and_override, runtime_of, upload, wait_for
from tests.test_cli import run_triage, triage_env
from triage_api import auth, passwords
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction
from triage_api.errors import InvalidRequest
from triage_api.settings import Settings
from triage_api.tables import Case, User, WebSession

PASSWORD = "a long test password"


@pytest.fixture
def factory(settings: Settings):  # type: ignore[no-untyped-def]
    engine = make_engine(settings.sqlalchemy_url)
    migrate(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def add_user(factory, name: str, role: str = "radiologist", clinics: tuple[str, ...] = ("north",)) -> str:  # type: ignore[no-untyped-def]
    with transaction(factory) as session:
        user, key = auth.add_user(session, name=name, role=auth.Role(role), clinics=list(clinics))
        passwords.set_password(session, user, PASSWORD)
    return key


def login_token(client: TestClient) -> str:
    page = client.get("/login")
    found = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page.text)
    assert found is not None
    return found.group(1)


def login(client: TestClient, name: str, password: str = PASSWORD):  # type: ignore[no-untyped-def]
    return client.post(
        "/login",
        data={"username": name, "password": password, "csrf_token": login_token(client)},
        follow_redirects=False,
    )


def csrf(client: TestClient, path: str = "/web/worklist") -> str:
    found = re.search(r'name="csrf-token" content="([0-9a-f]{64})"', client.get(path).text)
    assert found is not None
    return found.group(1)


def test_only_the_token_hash_is_stored_and_the_cookie_is_locked_down(client: TestClient, factory) -> None:  # type: ignore[no-untyped-def]
    add_user(factory, "dr")
    response = login(client, "dr")
    assert response.status_code == 303 and response.headers["location"] == "/"
    set_cookie = response.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie and "Secure" not in set_cookie
    token = client.cookies["triage_session"]
    assert len(token) >= 43  # 256 bits, url-safe base64
    with factory() as session:
        row = session.execute(select(WebSession)).scalar_one()
        assert row.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
        stored = session.get_one(User, row.user_id).password_hash
        assert stored is not None and stored.startswith("$argon2id$") and PASSWORD not in stored
    assert client.get("/web/api/worklist").status_code == 200


def test_the_cookie_is_secure_over_https(settings: Settings, factory) -> None:  # type: ignore[no-untyped-def]
    from triage_api.app import create_app

    add_user(factory, "dr")
    with TestClient(create_app(settings), base_url="https://testserver") as client:
        assert "Secure" in login(client, "dr").headers["set-cookie"]


def test_idle_and_old_sessions_end(client: TestClient, factory, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    add_user(factory, "dr")
    for column, age in (
        ("last_seen", timedelta(minutes=settings.web_idle_minutes + 1)),
        ("created_at", timedelta(hours=13)),
    ):
        login(client, "dr")
        assert client.get("/web/api/worklist").status_code == 200
        with transaction(factory) as session:
            row = session.execute(select(WebSession)).scalar_one()
            setattr(row, column, datetime.now(UTC) - age)
        refused = client.get("/web/api/worklist")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "not_authenticated"
        page = client.get("/web/worklist", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Fweb%2Fworklist"
        with factory() as session:
            assert session.execute(select(func.count()).select_from(WebSession)).scalar_one() == 0


def test_abandoned_sessions_are_swept_at_the_next_login(settings: Settings, factory) -> None:  # type: ignore[no-untyped-def]
    from triage_api.app import create_app

    add_user(factory, "dr")
    add_user(factory, "other")
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        login(first, "dr")
        with transaction(factory) as session:
            session.execute(select(WebSession)).scalar_one().last_seen = datetime.now(UTC) - timedelta(days=1)
        login(second, "other")
    with factory() as session:
        rows = list(session.execute(select(WebSession)).scalars())
    assert len(rows) == 1  # only the fresh session of "other" is left


def test_login_and_logout_need_their_csrf_token(client: TestClient, factory) -> None:  # type: ignore[no-untyped-def]
    add_user(factory, "dr")
    login_token(client)
    refused = client.post("/login", data={"username": "dr", "password": PASSWORD}, follow_redirects=False)
    assert refused.status_code == 403 and "triage_session" not in client.cookies
    login(client, "dr")
    assert client.post("/logout", follow_redirects=False).status_code == 403
    assert client.get("/web/api/worklist").status_code == 200
    out = client.post("/logout", data={"csrf_token": csrf(client)}, follow_redirects=False)
    assert out.status_code == 303
    with factory() as session:
        assert session.execute(select(func.count()).select_from(WebSession)).scalar_one() == 0


def test_failed_logins_are_audited_and_throttled_per_username(client: TestClient, factory) -> None:  # type: ignore[no-untyped-def]
    add_user(factory, "dr")
    add_user(factory, "other")
    for _ in range(5):
        assert login(client, "dr", "wrong password!").status_code == 401
    throttled = login(client, "dr")  # even the right password waits now
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) > 0
    assert login(client, "other").status_code == 303  # another username is unaffected
    with factory() as session:
        outcomes = [
            (e.action, e.event_code, e.outcome, e.actor)
            for e in session.execute(select(AuditEvent).where(AuditEvent.action.like("web.login%"))).scalars()
        ]
    assert outcomes.count(("web.login", "110114", 4, "anonymous")) == 5
    assert ("web.login_throttled", "110113", 4, "anonymous") in outcomes
    assert outcomes[-1][2] == 0
    with factory() as session:  # what was typed is never stored
        details = " ".join(e.details for e in session.execute(select(AuditEvent)).scalars())
    assert "wrong password" not in details and PASSWORD not in details


def test_passwords_are_argon2id_and_bounded() -> None:
    stored = passwords.hash_password(PASSWORD)
    assert stored.startswith("$argon2id$")
    assert passwords.verify_password(stored, PASSWORD)
    assert not passwords.verify_password(stored, PASSWORD + "x")
    assert not passwords.verify_password(None, PASSWORD)
    long = "p" * 200
    assert passwords.verify_password(passwords.hash_password(long), long)
    assert not passwords.verify_password(passwords.hash_password(long), long + "more")
    with pytest.raises(InvalidRequest):
        passwords.hash_password("short")


def test_admin_sets_a_password_through_the_api(client: TestClient, make_key: MakeKey) -> None:
    admin = bearer(make_key("admin"))
    made = client.post(
        "/v1/users",
        json={"name": "dr-new", "role": "radiologist", "clinics": ["north"], "password": PASSWORD},
        headers=admin,
    )
    assert made.status_code == 201, made.text
    assert login(client, "dr-new").status_code == 303
    short = client.post(
        "/v1/users", json={"name": "dr-short", "role": "radiologist", "password": "short"}, headers=admin
    )
    assert short.status_code == 422


def test_users_add_takes_a_password_from_the_environment(tmp_path, database_url: str, tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    env = triage_env(tmp_path, database_url, tiny_bundle)
    assert run_triage(env, "migrate").returncode == 0
    made = run_triage(
        {**env, "TRIAGE_NEW_PASSWORD": PASSWORD},
        *("users", "add", "--name", "dr-cli", "--role", "radiologist", "--clinic", "north", "--password"),
    )
    assert made.returncode == 0, made.stderr
    assert PASSWORD not in made.stdout + made.stderr
    short = run_triage(
        {**env, "TRIAGE_NEW_PASSWORD": "short"},
        *("users", "add", "--name", "dr-short", "--role", "radiologist", "--clinic", "north", "--password"),
    )
    assert short.returncode == 2 and "12 to 200 characters" in short.stderr
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session:
        users = {u.name: u.password_hash for u in session.execute(select(User)).scalars()}
    engine.dispose()
    assert users["dr-cli"] is not None and passwords.verify_password(users["dr-cli"], PASSWORD)
    assert "dr-short" not in users


def test_heatmap_route_follows_the_image_rules(
    client: TestClient, make_key: MakeKey, settings: Settings
) -> None:
    uploader = make_key("uploader", "north")
    reader = make_key("radiologist", "north")
    stranger = make_key("radiologist", "south")
    case_id = upload(client, uploader, (DATA / "cxr_normal.jpeg").read_bytes(), "x.jpeg").json()["id"]
    assert wait_for(client, uploader, case_id)["status"] == "scored"
    first = client.get(f"/v1/studies/{case_id}/heatmap", headers=bearer(reader))
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.content.startswith(b"\x89PNG")
    cached = list(settings.blob_dir.rglob("*.heatmap.*.png"))
    assert len(cached) == 1
    assert client.get(f"/v1/studies/{case_id}/heatmap", headers=bearer(reader)).content == first.content
    assert client.get(f"/v1/studies/{case_id}/heatmap", headers=bearer(uploader)).status_code == 403
    assert client.get(f"/v1/studies/{case_id}/heatmap", headers=bearer(stranger)).status_code == 404
    dog = upload(client, uploader, (DATA / "dx_thorax_dog_monochrome1.dcm").read_bytes()).json()["id"]
    assert wait_for(client, uploader, dog)["status"] == "not_analyzed"
    missing = client.get(f"/v1/studies/{dog}/heatmap", headers=bearer(reader))
    assert missing.status_code == 404 and "no AI result" in missing.json()["error"]["message"]
    # The blinded appeal reader gets no heat map.
    second = make_key("radiologist", "north")
    claim_and_override(client, bearer(reader), case_id)
    appeal = client.post(
        "/v1/appeals",
        json={"case_id": case_id, "category": "other", "grounds": "g", "contact_reference": "r"},
        headers=bearer(uploader),
    ).json()
    assert client.post(f"/v1/appeals/{appeal['id']}/take", headers=bearer(second)).status_code == 200
    assert client.get(f"/v1/studies/{case_id}/heatmap", headers=bearer(second)).status_code == 403
    with runtime_of(client).reads() as session:
        assert session.get_one(Case, case_id).risk is not None


def test_worklist_polls_are_audited_when_what_they_show_changes(  # type: ignore[no-untyped-def]
    client: TestClient, factory, make_key: MakeKey
) -> None:
    uploader = make_key("uploader", "north")
    first = upload(client, uploader, (DATA / "cxr_normal.jpeg").read_bytes(), "a.jpeg").json()["id"]
    assert wait_for(client, uploader, first)["status"] == "scored"
    add_user(factory, "dr")
    assert login(client, "dr").status_code == 303

    def poll_events() -> int:
        with factory() as session:
            query = select(func.count()).where(AuditEvent.action == "worklist.query")
            return int(session.execute(query.select_from(AuditEvent)).scalar_one())

    before = poll_events()
    for _ in range(3):  # the same list three times: one event
        assert [i["id"] for i in client.get("/web/api/worklist").json()["items"]] == [first]
    assert poll_events() == before + 1
    second = upload(client, uploader, (DATA / "cr_chest_pa_monochrome1_siim.dcm").read_bytes()).json()["id"]
    assert wait_for(client, uploader, second)["status"] == "scored"
    shown = {i["id"] for i in client.get("/web/api/worklist").json()["items"]}
    assert shown == {first, second} and poll_events() == before + 2  # a new case: a new event
    assert {i["id"] for i in client.get("/web/api/worklist?tier=critical").json()["items"]} <= shown
    assert poll_events() == before + 3  # another filter is another view


def test_disabling_a_user_ends_their_sessions_and_enabling_restores_access(  # type: ignore[no-untyped-def]
    client: TestClient, factory, make_key: MakeKey
) -> None:
    key = add_user(factory, "dr-off")
    assert login(client, "dr-off").status_code == 303
    assert client.get("/web/api/worklist").status_code == 200
    admin = bearer(make_key("admin"))
    with factory() as session:
        user_id = session.execute(select(User.id).where(User.name == "dr-off")).scalar_one()
    assert client.post(f"/v1/users/{user_id}/disable", headers=bearer(key)).status_code == 403
    disabled = client.post(f"/v1/users/{user_id}/disable", headers=admin)
    assert disabled.status_code == 200
    assert disabled.json() == {"id": user_id, "name": "dr-off", "disabled": True, "sessions_ended": 1}
    assert client.get("/web/api/worklist").status_code == 401  # the open session is gone
    assert client.get("/v1/worklist", headers=bearer(key)).status_code == 401
    assert login(client, "dr-off").status_code == 401
    with factory() as session:
        assert session.execute(select(func.count()).select_from(WebSession)).scalar_one() == 0
    assert client.post("/v1/users/999999/disable", headers=admin).status_code == 404
    enabled = client.post(f"/v1/users/{user_id}/enable", headers=admin)
    assert enabled.status_code == 200 and enabled.json()["disabled"] is False
    assert client.get("/v1/worklist", headers=bearer(key)).status_code == 200
    assert login(client, "dr-off").status_code == 303
    with factory() as session:
        actions = [
            e.action
            for e in session.execute(
                select(AuditEvent).where(
                    AuditEvent.object_type == "user", AuditEvent.object_id == str(user_id)
                )
            ).scalars()
        ]
    assert [a for a in actions if a.startswith("user.")] == ["user.disable", "user.enable"]


def test_revoking_a_key_ends_the_users_web_sessions(client: TestClient, factory, make_key: MakeKey) -> None:  # type: ignore[no-untyped-def]
    key = add_user(factory, "dr-key")
    assert login(client, "dr-key").status_code == 303
    assert client.get("/web/api/worklist").status_code == 200
    prefix = key.split("_")[1]
    assert client.delete(f"/v1/keys/{prefix}", headers=bearer(make_key("admin"))).status_code == 200
    assert client.get("/web/api/worklist").status_code == 401
    with factory() as session:
        ended = session.execute(
            select(AuditEvent).where(AuditEvent.action == "user.sessions_end")
        ).scalar_one()
    assert json.loads(ended.details) == {"why": "key.revoke", "sessions": 1}


def test_cli_disables_enables_and_resets_a_password(
    tmp_path: Path, database_url: str, tiny_bundle: Path
) -> None:
    env = triage_env(tmp_path, database_url, tiny_bundle)
    assert run_triage(env, "migrate").returncode == 0
    made = run_triage(
        {**env, "TRIAGE_NEW_PASSWORD": PASSWORD},
        *("users", "add", "--name", "dr-cli", "--role", "radiologist", "--clinic", "north", "--password"),
    )
    assert made.returncode == 0, made.stderr
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)

    def user() -> User:
        with factory() as session:
            found: User = session.execute(select(User).where(User.name == "dr-cli")).scalar_one()
            return found

    assert run_triage(env, "users", "disable", "dr-cli").returncode == 0 and user().disabled
    assert run_triage(env, "users", "enable", "dr-cli").returncode == 0 and not user().disabled
    missing = run_triage(env, "users", "disable", "nobody")
    assert missing.returncode == 2 and "no such user" in missing.stderr
    new = "a different long password"
    reset = run_triage({**env, "TRIAGE_NEW_PASSWORD": new}, "users", "set-password", "dr-cli")
    assert reset.returncode == 0, reset.stderr
    assert new not in reset.stdout + reset.stderr
    stored = user().password_hash
    assert stored is not None and passwords.verify_password(stored, new)
    assert not passwords.verify_password(stored, PASSWORD)
    engine.dispose()


def test_the_read_form_needs_the_claim_and_lapsed_claims_are_cleared(  # type: ignore[no-untyped-def]
    client: TestClient, factory, settings: Settings
) -> None:
    holder = add_user(factory, "dr-holder")
    add_user(factory, "dr-other")
    uploader = add_user(factory, "up", role="uploader")
    case_id = upload(client, uploader, (DATA / "cxr_normal.jpeg").read_bytes(), "x.jpeg").json()["id"]
    wait_for(client, uploader, case_id)
    assert client.post(f"/v1/studies/{case_id}/claim", headers=bearer(holder)).status_code == 200
    assert login(client, "dr-other").status_code == 303
    page = client.get(f"/web/cases/{case_id}").text
    assert 'id="read-form"' not in page and re.search(r"Claimed by dr-holder \d+ min ago", page)
    token = csrf(client, f"/web/cases/{case_id}")
    form = {"finding": "pneumonia", "agreement": "override", "override_reason": "other", "csrf_token": token}
    refused = client.post(f"/web/cases/{case_id}/read", data=form, headers={"Accept": "application/json"})
    assert refused.status_code == 409
    (row,) = client.get("/web/api/worklist").json()["items"]
    assert row["claimed_by"] == "dr-holder" and row["claimed_at"] is not None
    with transaction(factory) as session:
        case = session.get_one(Case, case_id)
        assert case.claimed_at is not None
        case.claimed_at -= timedelta(minutes=settings.claim_expiry_minutes + 1)
    (row,) = client.get("/web/api/worklist").json()["items"]
    assert row["claimed_by"] is None
    with factory() as session:
        lapsed = session.execute(
            select(AuditEvent).where(AuditEvent.action == "case.claim_expire")
        ).scalar_one()
        assert lapsed.object_id == case_id and session.get_one(Case, case_id).claimed_by is None
    client.post(f"/web/cases/{case_id}/claim", headers={"X-CSRF-Token": token})
    assert 'id="read-form"' in client.get(f"/web/cases/{case_id}").text


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/x",
        "https://evil.example/",
        "/\\evil.example",
        "\\\\evil.example",
        "javascript:alert(1)",
        "/web/cases/x\r\nSet-Cookie: a=b",
        "web/worklist",
        "",
    ],
)
def test_login_never_returns_to_another_site(client: TestClient, factory, target: str) -> None:  # type: ignore[no-untyped-def]
    add_user(factory, "dr")
    form = client.get("/login", params={"next": target}).text
    assert 'name="next"' not in form
    response = client.post(
        "/login",
        data={"username": "dr", "password": PASSWORD, "csrf_token": login_token(client), "next": target},
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == "/"


def test_login_returns_to_the_page_asked_for(client: TestClient, factory) -> None:  # type: ignore[no-untyped-def]
    add_user(factory, "dr")
    asked = client.get("/web/cases/abc?x=1", follow_redirects=False)
    assert (
        asked.status_code == 303 and asked.headers["location"] == "/login?next=%2Fweb%2Fcases%2Fabc%3Fx%3D1"
    )
    form = client.get(asked.headers["location"]).text
    assert 'name="next" value="/web/cases/abc?x=1"' in form
    response = client.post(
        "/login",
        data={
            "username": "dr",
            "password": PASSWORD,
            "csrf_token": login_token(client),
            "next": "/web/cases/abc?x=1",
        },
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == "/web/cases/abc?x=1"
    # A form posted after the session ended sends the reader back to the page the form was on.
    client.cookies.clear()
    posted = client.post(
        "/web/cases/abc/read",
        data={"finding": "normal"},
        headers={"Referer": "http://testserver/web/cases/abc"},
        follow_redirects=False,
    )
    assert posted.status_code == 303 and posted.headers["location"] == "/login?next=%2Fweb%2Fcases%2Fabc"
    elsewhere = client.post(
        "/web/cases/abc/read", headers={"Referer": "https://evil.example/web/x"}, follow_redirects=False
    )
    assert elsewhere.headers["location"] == "/login"


def test_monitoring_says_not_enough_reads_and_the_worklist_gives_the_no_ai_reason(  # type: ignore[no-untyped-def]
    client: TestClient, factory
) -> None:
    reader = add_user(factory, "dr")
    add_user(factory, "aud", role="auditor")
    uploader = add_user(factory, "up", role="uploader")
    case_id = upload(client, uploader, (DATA / "cxr_normal.jpeg").read_bytes(), "x.jpeg").json()["id"]
    dog = upload(client, uploader, (DATA / "dx_thorax_dog_monochrome1.dcm").read_bytes()).json()["id"]
    wait_for(client, uploader, case_id)
    wait_for(client, uploader, dog)
    claim_and_override(client, bearer(reader), case_id, finding="pneumonia")
    assert login(client, "dr").status_code == 303
    (row,) = client.get("/web/api/worklist").json()["items"]
    assert row["id"] == dog and row["risk"] is None and row["reason"]
    assert login(client, "aud").status_code == 303
    page = client.get("/web/audit/monitoring").text
    assert "not enough reads for an AUROC (1 of the 20 needed)" in page
