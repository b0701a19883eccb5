"""Signed webhooks against a loopback receiver that checks what a careful receiver checks.

The receiver verifies the Standard Webhooks signature with the secret it was given, refuses
old timestamps and counts each ``webhook-id`` once. The app's own outbox thread is kept idle
(a one-hour interval); the tests drive ``outbox.deliver_due`` with an injected clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from audit.log import AuditEvent
from tests.bundles import save_tiny_bundle
from tests.conftest import MakeKey, bearer, upload, wait_for
from tests.test_cli import free_port
from tests.test_phi import CANARIES, with_canaries
from triage_api import outbox, webhooks
from triage_api.app import create_app, read_or_create_secret
from triage_api.db import transaction
from triage_api.settings import Settings
from triage_api.tables import Alert, Appeal, Case, OutboxItem, User, WebhookSubscription

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
TOLERANCE = timedelta(minutes=5)


def save_critical_bundle(path: Path) -> Path:
    """The tiny plumbing network with thresholds at 0: every scored study is critical."""
    return save_tiny_bundle(path, name="tiny-critical", thresholds={"critical": 0.0, "elevated": 0.0})


@pytest.fixture(scope="session")
def critical_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_critical_bundle(tmp_path_factory.mktemp("bundle") / "critical")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Receiver:
    """A loopback webhook receiver. ``answers`` are the statuses of the next requests (then 204)."""

    clock: Clock
    secrets: list[str] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    seen_ids: set[str] = field(default_factory=set)
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)
    port: int = 0

    def verify(self, headers: dict[str, str], body: bytes) -> str | None:
        """None if the request is authentic and fresh, else why not."""
        msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
        if not stamp.isdigit():
            return "no timestamp"
        if abs(self.clock.now - datetime.fromtimestamp(int(stamp), UTC)) > TOLERANCE:
            return "stale timestamp"
        given = {
            e.removeprefix("v1,") for e in headers.get("webhook-signature", "").split() if e.startswith("v1,")
        }
        for secret in self.secrets:
            key = base64.b64decode(secret.removeprefix("whsec_"))
            mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
            if base64.b64encode(mac).decode() in given:
                return None
        return "bad signature"

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        self.requests.append(headers)
        status = self.answers.pop(0) if self.answers else 204
        if status >= 300:
            return status
        problem = self.verify(headers, body)
        if problem is not None:
            self.rejected.append(problem)
            return 400
        if headers["webhook-id"] in self.seen_ids:
            self.duplicates += 1
        else:
            self.seen_ids.add(headers["webhook-id"])
            self.accepted.append(json.loads(body))
        return status


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver(Clock())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            status = found.handle({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            if status in (301, 302, 307):
                self.send_header("location", f"http://127.0.0.1:{found.port}/elsewhere")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    found.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield found
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def quiet_settings(settings: Settings, critical_bundle: Path) -> Settings:
    """The app's outbox and sweep threads stay idle: the tests deliver with their own clock."""
    return settings.model_copy(
        update={"model_path": critical_bundle, "outbox_poll_seconds": 3600, "webhook_sweep_seconds": 3600}
    )


@pytest.fixture
def app(quiet_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(quiet_settings)) as test_client:
        yield test_client


def _factory(client: TestClient) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = client.app.state.runtime.factory  # type: ignore[attr-defined]
    return factory


def _sender(client: TestClient, settings: Settings, clock: Clock, **kwargs: Any) -> webhooks.Sender:
    return webhooks.Sender(
        _factory(client),
        site_secret=read_or_create_secret(settings.secret_dir / "pseudonym.key"),
        timeout=5,
        clock=clock,
        **kwargs,
    )


def _admin(make_key: MakeKey) -> str:
    """An admin key, with the clinics north and south in existence."""
    make_key("radiologist", "north", "south")
    return make_key("admin")


def _subscribe(
    client: TestClient, admin: str, receiver: Receiver, *events: str, clinic: str = "north"
) -> int:
    response = client.post(
        f"/v1/clinics/{clinic}/webhooks",
        json={
            "url": f"http://127.0.0.1:{receiver.port}/hook",
            "events": list(events) or ["case.critical"],
            "allow_insecure_local": True,
        },
        headers=bearer(admin),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["secret"].startswith("whsec_") and len(base64.b64decode(body["secret"][6:])) == 32
    receiver.secrets.append(body["secret"])
    return int(body["id"])


def _deliver(
    client: TestClient, settings: Settings, clock: Clock, policy: outbox.Policy | None = None, rounds: int = 1
) -> list[dict[str, int]]:
    sender = _sender(client, settings, clock)
    results = []
    for _ in range(rounds):  # bounded: one simulated minute per round
        results.append(
            outbox.deliver_due(_factory(client), {webhooks.KIND: sender}, now=clock, policy=policy)
        )
        clock.now += timedelta(minutes=1)
    return results


def _critical_case(client: TestClient, make_key: MakeKey) -> str:
    uploader, reader = make_key("uploader", "north"), make_key("radiologist", "north")
    response = upload(client, uploader, with_canaries("cr_chest_pa_jpeg_baseline_siim.dcm"))
    assert response.status_code == 201, response.text
    case = wait_for(client, reader, response.json()["id"])
    assert (case["status"], case["tier"]) == ("scored", "critical")
    return str(case["id"])


def _pending_deliveries(client: TestClient) -> list[OutboxItem]:
    with _factory(client)() as session:
        return list(session.scalars(select(OutboxItem).where(OutboxItem.kind == webhooks.KIND)))


def test_a_critical_score_is_delivered_signed_once_and_without_phi(
    app: TestClient, quiet_settings: Settings, make_key: MakeKey, receiver: Receiver
) -> None:
    admin = _admin(make_key)
    _subscribe(app, admin, receiver, "case.critical", "case.not_analyzed")
    other = Receiver(receiver.clock, port=receiver.port)
    _subscribe(app, admin, other, "case.critical", clinic="south")  # another clinic: told nothing
    case_id = _critical_case(app, make_key)
    receiver.clock.now = datetime.now(UTC)

    assert _deliver(app, quiet_settings, receiver.clock) == [{"delivered": 1}]
    assert receiver.rejected == [] and receiver.duplicates == 0
    [payload] = receiver.accepted
    assert payload["event"] == "case.critical"
    assert (payload["case_id"], payload["clinic"], payload["tier"]) == (case_id, "north", "critical")
    assert payload["model_version"] == "tiny-critical@0.0.1" and payload["deadline"]
    assert set(payload) == {
        "event", "case_id", "clinic", "tier", "status", "deadline", "model_version", "occurred_at"
    }  # fmt: skip
    headers = receiver.requests[0]
    assert headers["webhook-id"].startswith("msg_") and headers["content-type"] == "application/json"
    for canary in CANARIES:
        assert canary not in json.dumps(payload) and canary not in json.dumps(headers)
    with _factory(app)() as session:
        details = [json.dumps(e.details) for e in session.scalars(select(AuditEvent))]
        stored = [item.payload for item in session.scalars(select(OutboxItem))]
        for canary in CANARIES:
            assert not any(canary in text for text in details + stored)
        secrets_in_db = [str(row) for row in session.execute(select(WebhookSubscription.sealed_secret))]
    assert receiver.secrets[0] not in " ".join(secrets_in_db)  # sealed, not stored as given


def test_503_twice_then_204_is_accepted_exactly_once(
    app: TestClient, quiet_settings: Settings, make_key: MakeKey, receiver: Receiver
) -> None:
    admin = _admin(make_key)
    hook = _subscribe(app, admin, receiver)
    _critical_case(app, make_key)
    receiver.clock.now = datetime.now(UTC)
    receiver.answers = [503, 503]
    policy = outbox.Policy(max_attempts=5, base_seconds=30, cap_seconds=60)
    _deliver(app, quiet_settings, receiver.clock, policy, rounds=10)

    assert len(receiver.requests) == 3 and len(receiver.accepted) == 1 and receiver.duplicates == 0
    assert len({h["webhook-id"] for h in receiver.requests}) == 1  # the same id on every retry
    log = app.get(f"/v1/clinics/north/webhooks/{hook}/deliveries", headers=bearer(admin)).json()
    assert [(d["event"], d["status"], d["attempts"]) for d in log] == [("case.critical", "delivered", 3)]
    with _factory(app)() as session:
        actions = [e.action for e in session.scalars(select(AuditEvent).order_by(AuditEvent.seq))]
    assert [a for a in actions if a.startswith("outbox.")] == [
        "outbox.failed",
        "outbox.failed",
        "outbox.delivered",
    ]

    # "send again": the same webhook-id, which the receiver recognises as a repeat
    again = app.post(
        f"/v1/clinics/north/webhooks/{hook}/deliveries/{log[0]['id']}/resend", headers=bearer(admin)
    )
    assert again.status_code == 202 and again.json()["status"] == "pending"
    _deliver(app, quiet_settings, receiver.clock)
    assert len(receiver.accepted) == 1 and receiver.duplicates == 1


def test_a_dead_receiver_is_dead_lettered_after_the_configured_attempts(
    app: TestClient, quiet_settings: Settings, make_key: MakeKey, receiver: Receiver
) -> None:
    admin = _admin(make_key)
    closed = free_port()  # nothing listens there
    response = app.post(
        "/v1/clinics/north/webhooks",
        json={
            "url": f"http://127.0.0.1:{closed}/",
            "events": ["case.critical"],
            "allow_insecure_local": True,
        },
        headers=bearer(admin),
    )
    hook = response.json()["id"]
    _critical_case(app, make_key)
    receiver.clock.now = datetime.now(UTC)
    policy = outbox.Policy(max_attempts=3, base_seconds=10, cap_seconds=30)
    results = _deliver(app, quiet_settings, receiver.clock, policy, rounds=10)
    assert sum(r.get("pending", 0) for r in results) == 2 and sum(r.get("dead", 0) for r in results) == 1
    [item] = app.get(f"/v1/clinics/north/webhooks/{hook}/deliveries", headers=bearer(admin)).json()
    assert (item["status"], item["attempts"]) == ("dead", 3)
    assert item["last_error"].startswith("connection failed")


def test_a_rotated_secret_signs_beside_the_old_one_during_the_overlap(
    app: TestClient, quiet_settings: Settings, make_key: MakeKey, receiver: Receiver
) -> None:
    admin = _admin(make_key)
    hook = _subscribe(app, admin, receiver)
    old = receiver.secrets[0]
    rotated = app.post(
        f"/v1/clinics/north/webhooks/{hook}/rotate", json={"overlap_minutes": 30}, headers=bearer(admin)
    )
    assert rotated.status_code == 200
    new = rotated.json()["secret"]
    assert new != old and new.startswith("whsec_")
    receiver.secrets = [old]  # a receiver that has not switched yet still verifies
    case_id = _critical_case(app, make_key)
    receiver.clock.now = datetime.now(UTC)
    _deliver(app, quiet_settings, receiver.clock)
    assert [p["case_id"] for p in receiver.accepted] == [case_id] and receiver.rejected == []
    assert len(receiver.requests[0]["webhook-signature"].split()) == 2

    # after the overlap only the new secret signs
    later = Clock()
    later.now = datetime.now(UTC) + timedelta(minutes=31)
    sender = _sender(app, quiet_settings, later)
    with _factory(app)() as session:
        sub = session.get(WebhookSubscription, hook)
        assert sub is not None
        header = sender.signature(sub, "msg_x", 1, b"{}")
    assert header.split() == [webhooks.sign(new, "msg_x", 1, b"{}")]


def test_a_redirect_is_not_followed(
    app: TestClient, quiet_settings: Settings, make_key: MakeKey, receiver: Receiver
) -> None:
    admin = _admin(make_key)
    _subscribe(app, admin, receiver)
    _critical_case(app, make_key)
    receiver.clock.now = datetime.now(UTC)
    receiver.answers = [302]
    assert _deliver(app, quiet_settings, receiver.clock) == [{"dead": 1}]
    assert len(receiver.requests) == 1  # the Location was never visited


@pytest.mark.parametrize(
    ("url", "local", "why"),
    [
        ("http://example.org/hook", False, "http://"),
        ("ftp://127.0.0.1/hook", True, "https://"),
        ("file:///etc/passwd", True, "https://"),
        ("https://user:pw@example.org/hook", False, "user information"),
        ("https://@example.org/hook", False, "user information"),
        ("https://169.254.169.254/latest/meta-data", False, "not allowed"),
        ("https://169.254.169.254/latest/meta-data", True, "not allowed"),
        ("https://10.1.2.3/hook", False, "not allowed"),
        ("https://127.0.0.1/hook", False, "not allowed"),
        ("https://[::1]/hook", False, "not allowed"),
        ("http://8.8.8.8/hook", True, "not allowed"),
        ("http://[::ffff:169.254.169.254]/", True, "not allowed"),
        ("https:///hook", False, "no host"),
        ("https://exa mple.org/hook", False, "DNS name or an IP"),
        ("https://example.org%0d%0a/hook", False, "DNS name or an IP"),
        ("https://example.org:99999/", False, "not a valid URL"),
    ],
)
def test_targets_outside_the_allowed_class_are_refused(
    app: TestClient, make_key: MakeKey, url: str, local: bool, why: str
) -> None:
    admin = _admin(make_key)
    response = app.post(
        "/v1/clinics/north/webhooks",
        json={"url": url, "events": ["case.critical"], "allow_insecure_local": local},
        headers=bearer(admin),
    )
    assert response.status_code == 422, response.text
    assert why in response.json()["error"]["message"]
    assert app.get("/v1/clinics/north/webhooks", headers=bearer(admin)).json() == []


@pytest.mark.parametrize(
    ("addresses", "local"),
    [(["169.254.169.254"], False), (["93.184.216.34", "10.0.0.5"], False), (["93.184.216.34"], True)],
)
def test_a_name_resolving_outside_the_allowed_class_is_refused_at_send_time(
    app: TestClient, quiet_settings: Settings, make_key: MakeKey, addresses: list[str], local: bool
) -> None:
    admin = _admin(make_key)
    scheme = "http" if local else "https"
    response = app.post(
        "/v1/clinics/north/webhooks",
        json={
            "url": f"{scheme}://hooks.example.test/in",
            "events": ["case.critical"],
            "allow_insecure_local": local,
        },
        headers=bearer(admin),
    )
    assert response.status_code == 201, response.text
    _critical_case(app, make_key)
    asked: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return addresses

    clock = Clock()
    clock.now = datetime.now(UTC)
    sender = _sender(app, quiet_settings, clock, resolver=resolver)
    assert outbox.deliver_due(_factory(app), {webhooks.KIND: sender}, now=clock) == {"dead": 1}
    assert asked == [("hooks.example.test", 80 if local else 443)]
    [item] = _pending_deliveries(app)
    assert item.last_error == "host resolves to an address that is not allowed"


def test_only_an_admin_manages_webhooks_and_bad_requests_change_nothing(
    app: TestClient, make_key: MakeKey, receiver: Receiver
) -> None:
    admin, reader = _admin(make_key), make_key("radiologist", "north")
    body = {
        "url": f"http://127.0.0.1:{receiver.port}/",
        "events": ["case.critical"],
        "allow_insecure_local": True,
    }
    assert app.post("/v1/clinics/north/webhooks", json=body, headers=bearer(reader)).status_code == 403
    assert app.post("/v1/clinics/north/webhooks", json=body).status_code == 401
    assert app.post("/v1/clinics/nowhere/webhooks", json=body, headers=bearer(admin)).status_code == 404
    for bad in ({**body, "clinic_id": 2}, {**body, "events": ["case.exploded"]}, {**body, "events": []}):
        response = app.post("/v1/clinics/north/webhooks", json=bad, headers=bearer(admin))
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    assert app.get("/v1/clinics/north/webhooks", headers=bearer(admin)).json() == []

    hook = _subscribe(app, admin, receiver)
    [listed] = app.get("/v1/clinics/north/webhooks", headers=bearer(admin)).json()
    assert listed["id"] == hook and "whsec_" not in json.dumps(listed) and "secret" not in listed
    assert app.delete(f"/v1/clinics/south/webhooks/{hook}", headers=bearer(admin)).status_code == 404
    assert app.delete(f"/v1/clinics/north/webhooks/{hook}", headers=bearer(admin)).status_code == 204
    assert app.get("/v1/clinics/north/webhooks", headers=bearer(admin)).json() == []
    assert app.delete(f"/v1/clinics/north/webhooks/{hook}", headers=bearer(admin)).status_code == 404


def test_the_sweep_sends_overdue_once_per_case(
    app: TestClient, quiet_settings: Settings, make_key: MakeKey, receiver: Receiver
) -> None:
    admin = _admin(make_key)
    _subscribe(app, admin, receiver, "case.overdue")
    case_id = _critical_case(app, make_key)
    factory = _factory(app)
    with factory() as session:
        case = session.get(Case, case_id)
        assert case is not None
        deadline = case.deadline
    late = timedelta(minutes=quiet_settings.webhook_overdue_minutes)
    with transaction(factory) as session:
        assert (
            webhooks.sweep(session, settings=quiet_settings, now=deadline + late - timedelta(seconds=1)) == 0
        )
    for _ in range(2):
        with transaction(factory) as session:
            webhooks.sweep(session, settings=quiet_settings, now=deadline + late)
    [item] = _pending_deliveries(app)
    assert json.loads(item.payload)["event"] == "case.overdue" and item.case_id == case_id


def test_the_sweep_sends_decided_appeals_and_model_alerts_once_without_their_free_text(
    app: TestClient, quiet_settings: Settings, make_key: MakeKey, receiver: Receiver
) -> None:
    admin = _admin(make_key)
    case_id = _critical_case(app, make_key)
    factory = _factory(app)
    now = datetime.now(UTC)
    with transaction(factory) as session:
        case = session.get(Case, case_id)
        assert case is not None
        filer = session.execute(select(User.id).where(User.role == "uploader")).scalars().first()
        assert filer is not None

        def alert(at: datetime) -> Alert:
            return Alert(
                clinic_id=case.clinic_id,
                model_ref="tiny-critical@0.0.1",
                kind="override_rate",
                value=0.5,
                bound=0.3,
                window_start=at - timedelta(days=7),
                window_end=at,
                created_at=at,
            )

        session.add(alert(now - timedelta(hours=1)))  # before the subscription: not sent
        clinic_id = case.clinic_id
    hook = _subscribe(app, admin, receiver, "appeal.decided", "model.alert")
    later = datetime.now(UTC) + timedelta(seconds=1)
    with transaction(factory) as session:
        session.add(alert(later))
        session.add(
            Appeal(
                case_id=case_id,
                clinic_id=clinic_id,
                filed_by=filer,
                category="disagree_with_result",
                grounds="CANARY-GROUNDS Zebulon^Canaryfield",
                contact_reference="CANARY-CONTACT",
                status="decided",
                due_at=later + timedelta(days=3),
                outcome="upheld",
                rationale="CANARY-RATIONALE",
                decided_at=later,
                created_at=later,
            )
        )
    for _ in range(2):
        with transaction(factory) as session:
            webhooks.sweep(session, settings=quiet_settings, now=later)
    receiver.clock.now = later
    assert _deliver(app, quiet_settings, receiver.clock) == [{"delivered": 2}]
    by_event = {p["event"]: p for p in receiver.accepted}
    assert set(by_event) == {"appeal.decided", "model.alert"}
    assert (by_event["appeal.decided"]["case_id"], by_event["appeal.decided"]["outcome"]) == (
        case_id,
        "upheld",
    )
    assert by_event["model.alert"]["alert"] == "override_rate"
    assert not any("CANARY" in json.dumps(p) for p in receiver.accepted)
    log = app.get(f"/v1/clinics/north/webhooks/{hook}/deliveries", headers=bearer(admin)).json()
    assert sorted(d["event"] for d in log) == ["appeal.decided", "model.alert"]
