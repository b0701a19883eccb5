"""Signed webhooks: tell a clinic's systems (paging, RIS, dashboards) what happened, at once.

A subscription names a clinic, a target URL and the events it wants (:class:`WebhookEvent`).
Deliveries go through the one outbox (:mod:`triage_api.outbox`): they are written in the
transaction of the change that causes them (``case.critical`` and ``case.not_analyzed`` in
the scoring transaction) or by the periodic :func:`sweep` (``case.overdue``,
``appeal.decided``, ``model.alert``), then sent by :class:`Sender` with retries, dead
letter and an audit event per attempt.

Each delivery is signed by the Standard Webhooks scheme: ``webhook-id`` (the outbox row,
the same on every retry, so receivers can drop repeats), ``webhook-timestamp`` (seconds)
and ``webhook-signature: v1,<base64 HMAC-SHA256(secret, "id.timestamp.body")>``, where the
secret is the base64 part of ``whsec_...``. During a rotation both the new and the
previous secret sign (space-separated entries) until the overlap ends.

Targets are ``https://`` on public addresses, or, only where the admin allows it
explicitly, a loopback or site-internal (private) address over http or https. The address
is resolved and checked again at every send and the connection goes to that checked
address (no DNS rebinding); redirects are never followed. Payloads carry ids, tier,
deadline and model version, never patient data.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import socket
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import String, cast, exists, select
from sqlalchemy.orm import Session, sessionmaker

from audit.log import EventCode, record
from triage_api import outbox
from triage_api.auth import Principal
from triage_api.errors import InvalidRequest, NotFound
from triage_api.settings import Settings
from triage_api.tables import Alert, Appeal, Case, Clinic, OutboxItem, WebhookNotice, WebhookSubscription
from triage_api.vocab import CaseStatus, Tier, WebhookEvent

KIND = "webhook"
"""The outbox kind of webhook deliveries."""

SECRET_PREFIX = "whsec_"
MAX_URL = 500
HOST = re.compile(r"[a-z0-9.-]+|[0-9a-f:.]+")
"""A host name (urlsplit lowercases it) or an IP literal; nothing else reaches the resolver."""

Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> addresses``; tests pass their own, the service uses DNS."""


# --- secrets -------------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh signing secret, ``whsec_`` + base64 of 32 random bytes (shown once)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _sealing_key(site_secret: bytes) -> bytes:
    # A key of its own, derived from the site secret (kept outside the database).
    return hmac.new(site_secret, b"triage webhook secrets v1", hashlib.sha256).digest()


def seal(site_secret: bytes, secret: str) -> str:
    """Encrypt a signing secret for the database (AES-256-GCM, random nonce)."""
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_sealing_key(site_secret)).encrypt(nonce, secret.encode(), b"webhook")
    return base64.b64encode(nonce + sealed).decode()


def unseal(site_secret: bytes, sealed: str) -> str:
    """The signing secret sealed by :func:`seal`.

    Raises:
        outbox.DeliveryFailed: (permanent) the site secret changed since it was sealed.
    """
    raw = base64.b64decode(sealed)
    try:
        return AESGCM(_sealing_key(site_secret)).decrypt(raw[:12], raw[12:], b"webhook").decode()
    except InvalidTag:
        raise outbox.DeliveryFailed(
            "signing secret unreadable (site secret changed)", permanent=True
        ) from None


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One Standard Webhooks signature entry, ``v1,<base64 HMAC-SHA256>``."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


# --- targets -------------------------------------------------------------------------------


def address_allowed(address: str, *, allow_insecure_local: bool) -> bool:
    """Whether a resolved address is in the class the subscription may reach.

    Public addresses by default; with ``allow_insecure_local`` only loopback and private
    (site-internal) ones. Link-local (cloud metadata), multicast, reserved and unspecified
    addresses never.
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return False
    if allow_insecure_local:
        return ip.is_loopback or ip.is_private
    return ip.is_global


def check_target(url: str, *, allow_insecure_local: bool) -> None:
    """Refuse a target URL that could never be sent to.

    Raises:
        InvalidRequest: not http(s); http without ``allow_insecure_local``; user info in
            the URL; no host; an IP literal outside the allowed class; too long.
    """
    if len(url) > MAX_URL:
        raise InvalidRequest(f"url longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidRequest("url is not a valid URL") from None
    if parts.scheme not in ("https", "http"):
        raise InvalidRequest("url must be https:// (or http:// to an allowed local host)")
    if parts.scheme == "http" and not allow_insecure_local:
        raise InvalidRequest("http:// is allowed only with allow_insecure_local for a local host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidRequest("url must not carry user information")
    if not parts.hostname or port == 0:
        raise InvalidRequest("url has no host")
    if not HOST.fullmatch(parts.hostname):
        raise InvalidRequest("url host must be a DNS name or an IP address")
    try:
        literal = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return  # a name: checked when resolved, at every send
    if not address_allowed(str(literal), allow_insecure_local=allow_insecure_local):
        raise InvalidRequest(
            "address not allowed: public addresses only, or loopback/private with allow_insecure_local"
        )


def dns_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (all must be allowed, not just the first)."""
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


# --- subscriptions -------------------------------------------------------------------------


def clinic_by_name(session: Session, name: str) -> Clinic:
    """Raises NotFound for an unknown clinic."""
    clinic = session.execute(select(Clinic).where(Clinic.name == name)).scalar_one_or_none()
    if clinic is None:
        raise NotFound("no such clinic")
    return clinic


def subscription_of(session: Session, clinic: Clinic, subscription_id: int) -> WebhookSubscription:
    """A live subscription of ``clinic``; NotFound otherwise (also when it is another clinic's)."""
    sub = session.get(WebhookSubscription, subscription_id)
    if sub is None or sub.clinic_id != clinic.id or sub.deleted_at is not None:
        raise NotFound("no such webhook")
    return sub


def subscribe(
    session: Session,
    *,
    principal: Principal,
    clinic: Clinic,
    url: str,
    events: Sequence[WebhookEvent],
    allow_insecure_local: bool,
    site_secret: bytes,
    now: datetime,
) -> tuple[WebhookSubscription, str]:
    """Create a subscription, audited; returns it with its secret (never shown again)."""
    check_target(url, allow_insecure_local=allow_insecure_local)
    if not events:
        raise InvalidRequest("events must name at least one event")
    secret = new_secret()
    sub = WebhookSubscription(
        clinic_id=clinic.id,
        url=url,
        events=" ".join(sorted(set(events))),
        allow_insecure_local=allow_insecure_local,
        sealed_secret=seal(site_secret, secret),
        created_by=principal.user_id,
        created_at=now,
    )
    session.add(sub)
    session.flush()
    _audit(
        session,
        principal,
        "webhook.create",
        sub,
        {"events": sub.events.split(), "local": allow_insecure_local},
    )
    return sub, secret


def rotate(
    session: Session,
    *,
    principal: Principal,
    sub: WebhookSubscription,
    overlap: timedelta,
    site_secret: bytes,
    now: datetime,
) -> str:
    """A new secret; the current one keeps signing too until ``now + overlap``."""
    secret = new_secret()
    sub.sealed_previous = sub.sealed_secret if overlap > timedelta(0) else None
    sub.previous_until = now + overlap if overlap > timedelta(0) else None
    sub.sealed_secret = seal(site_secret, secret)
    _audit(session, principal, "webhook.rotate", sub, {"overlap_seconds": int(overlap.total_seconds())})
    return secret


def unsubscribe(session: Session, *, principal: Principal, sub: WebhookSubscription, now: datetime) -> None:
    """Stop sending to ``sub``; its log stays, pending deliveries fail permanently at send."""
    sub.deleted_at = now
    _audit(session, principal, "webhook.delete", sub, None)


def subscriptions(session: Session, clinic: Clinic) -> list[WebhookSubscription]:
    """The clinic's live subscriptions, oldest first."""
    return list(
        session.execute(
            select(WebhookSubscription)
            .where(WebhookSubscription.clinic_id == clinic.id, WebhookSubscription.deleted_at.is_(None))
            .order_by(WebhookSubscription.id)
        ).scalars()
    )


def event_of(item: OutboxItem) -> str | None:
    """The event name of a webhook delivery (from its payload)."""
    event = json.loads(item.payload).get("event")
    return event if isinstance(event, str) else None


def deliveries(session: Session, sub: WebhookSubscription, *, limit: int = 100) -> list[OutboxItem]:
    """The subscription's delivery log, newest first."""
    return list(
        session.execute(
            select(OutboxItem)
            .where(OutboxItem.kind == KIND, OutboxItem.target == str(sub.id))
            .order_by(OutboxItem.id.desc())
            .limit(limit)
        ).scalars()
    )


def send_again(
    session: Session, *, principal: Principal, sub: WebhookSubscription, delivery_id: int, now: datetime
) -> OutboxItem:
    """Queue one delivery of ``sub`` again ("send again"), audited by the outbox."""
    item = session.get(OutboxItem, delivery_id)
    if item is None or item.kind != KIND or item.target != str(sub.id):
        raise NotFound("no such delivery")
    if item.status == outbox.PENDING:
        raise InvalidRequest("the delivery is still pending")
    resent = outbox.resend(session, item.id, actor=principal.actor, now=now)
    if resent is None:
        raise NotFound("no such delivery")
    return resent


def _audit(
    session: Session,
    principal: Principal,
    action: str,
    sub: WebhookSubscription,
    details: dict[str, Any] | None,
) -> None:
    record(
        session,
        actor=principal.actor,
        action=action,
        code=EventCode.SECURITY_ALERT,
        object_type="webhook",
        object_id=str(sub.id),
        details={"clinic_id": sub.clinic_id, **(details or {})},
    )


# --- events --------------------------------------------------------------------------------


def _listeners(session: Session, clinic_id: int, event: WebhookEvent) -> list[WebhookSubscription]:
    subs = session.execute(
        select(WebhookSubscription).where(
            WebhookSubscription.clinic_id == clinic_id, WebhookSubscription.deleted_at.is_(None)
        )
    ).scalars()
    return [sub for sub in subs if event in sub.events.split()]


def _enqueue(
    session: Session,
    sub: WebhookSubscription,
    event: WebhookEvent,
    fields: dict[str, Any],
    *,
    now: datetime,
    case_id: str | None,
) -> None:
    clinic = session.get(Clinic, sub.clinic_id)
    payload = {"event": str(event), "clinic": clinic.name if clinic else None, "occurred_at": now.isoformat()}
    outbox.enqueue(
        session,
        kind=KIND,
        target=str(sub.id),
        payload={**payload, **fields},
        now=now,
        case_id=case_id,
        clinic_id=sub.clinic_id,
    )


def _case_fields(case: Case) -> dict[str, Any]:
    return {
        "case_id": case.id,
        "tier": case.tier,
        "status": case.status,
        "deadline": case.deadline.isoformat(),
        "model_version": case.model_ref,
    }


def case_scored(session: Session, case: Case, *, now: datetime) -> None:
    """In the scoring transaction: ``case.critical`` or ``case.not_analyzed`` to subscribers."""
    if case.status == CaseStatus.SCORED and case.tier == Tier.CRITICAL:
        event = WebhookEvent.CASE_CRITICAL
    elif case.status == CaseStatus.NOT_ANALYZED:
        event = WebhookEvent.CASE_NOT_ANALYZED
    else:
        return
    for sub in _listeners(session, case.clinic_id, event):
        _enqueue(session, sub, event, _case_fields(case), now=now, case_id=case.id)


def _unnoticed(sub: WebhookSubscription, event: WebhookEvent, object_id: Any) -> Any:
    return ~exists().where(
        WebhookNotice.subscription_id == sub.id,
        WebhookNotice.event == event,
        WebhookNotice.object_id == object_id,
    )


def sweep(session: Session, *, settings: Settings, now: datetime, limit: int = 200) -> int:
    """Queue the events found by looking (overdue cases, decided appeals, model alerts).

    Each is sent once per subscription (a :class:`WebhookNotice` row), and only for what
    happened after the subscription was made. Returns how many deliveries were queued.
    """
    queued = 0
    late = timedelta(minutes=settings.webhook_overdue_minutes)
    subs = session.execute(
        select(WebhookSubscription).where(WebhookSubscription.deleted_at.is_(None))
    ).scalars()
    for sub in list(subs):
        wanted = set(sub.events.split())
        found: list[tuple[WebhookEvent, str, dict[str, Any], str | None]] = []
        if WebhookEvent.CASE_OVERDUE in wanted:
            overdue = select(Case).where(
                Case.clinic_id == sub.clinic_id,
                Case.read_at.is_(None),
                Case.deadline <= now - late,
                Case.deadline >= sub.created_at - late,
                _unnoticed(sub, WebhookEvent.CASE_OVERDUE, Case.id),
            )
            for case in session.execute(overdue.order_by(Case.deadline).limit(limit)).scalars():
                fields = {**_case_fields(case), "overdue_minutes": settings.webhook_overdue_minutes}
                found.append((WebhookEvent.CASE_OVERDUE, case.id, fields, case.id))
        if WebhookEvent.APPEAL_DECIDED in wanted:
            decided = select(Appeal).where(
                Appeal.clinic_id == sub.clinic_id,
                Appeal.decided_at >= sub.created_at,
                _unnoticed(sub, WebhookEvent.APPEAL_DECIDED, cast(Appeal.id, String)),
            )
            for appeal in session.execute(decided.order_by(Appeal.id).limit(limit)).scalars():
                fields = {"case_id": appeal.case_id, "appeal_id": appeal.id, "outcome": appeal.outcome}
                found.append((WebhookEvent.APPEAL_DECIDED, str(appeal.id), fields, appeal.case_id))
        if WebhookEvent.MODEL_ALERT in wanted:
            alerts = select(Alert).where(
                Alert.clinic_id == sub.clinic_id,
                Alert.created_at >= sub.created_at,
                _unnoticed(sub, WebhookEvent.MODEL_ALERT, cast(Alert.id, String)),
            )
            for alert in session.execute(alerts.order_by(Alert.id).limit(limit)).scalars():
                fields = {
                    "alert_id": alert.id,
                    "model_version": alert.model_ref,
                    "alert": alert.kind,
                    "value": alert.value,
                    "bound": alert.bound,
                }
                found.append((WebhookEvent.MODEL_ALERT, str(alert.id), fields, None))
        for event, object_id, fields, case_id in found:
            session.add(
                WebhookNotice(subscription_id=sub.id, event=event, object_id=object_id, created_at=now)
            )
            _enqueue(session, sub, event, fields, now=now, case_id=case_id)
            queued += 1
    return queued


# --- sending -------------------------------------------------------------------------------


class Sender:
    """The outbox sender of kind ``webhook``: sign, check the address, POST, judge the answer."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        site_secret: bytes,
        timeout: float,
        clock: Callable[[], datetime],
        resolver: Resolver = dns_resolver,
    ) -> None:
        self.factory = factory
        self.site_secret = site_secret
        self.timeout = timeout
        self.clock = clock
        self.resolver = resolver

    def signature(self, sub: WebhookSubscription, msg_id: str, timestamp: int, body: bytes) -> str:
        """The ``webhook-signature`` header: the current secret, and the previous during overlap."""
        entries = [sign(unseal(self.site_secret, sub.sealed_secret), msg_id, timestamp, body)]
        if sub.sealed_previous and sub.previous_until and self.clock() < sub.previous_until:
            entries.append(sign(unseal(self.site_secret, sub.sealed_previous), msg_id, timestamp, body))
        return " ".join(entries)

    def __call__(self, delivery: outbox.Delivery) -> str:
        with self.factory() as session:
            sub = session.get(WebhookSubscription, int(delivery.target))
            if sub is None or sub.deleted_at is not None:
                raise outbox.DeliveryFailed("subscription deleted", permanent=True)
            session.expunge(sub)
        msg_id = f"msg_{delivery.id}"
        timestamp = int(self.clock().timestamp())
        body = json.dumps(delivery.payload, sort_keys=True, separators=(",", ":")).encode()
        headers = {
            "content-type": "application/json",
            "user-agent": "triage-webhooks/1",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signature(sub, msg_id, timestamp, body),
        }
        return self._post(sub, headers, body)

    def _post(self, sub: WebhookSubscription, headers: dict[str, str], body: bytes) -> str:
        try:
            check_target(sub.url, allow_insecure_local=sub.allow_insecure_local)
        except InvalidRequest as refused:
            raise outbox.DeliveryFailed(refused.message, permanent=True) from None
        url = httpx.URL(sub.url)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = list(self.resolver(url.host, port))
        except OSError:
            raise outbox.DeliveryFailed("host did not resolve") from None
        if not addresses:
            raise outbox.DeliveryFailed("host did not resolve")
        if not all(address_allowed(a, allow_insecure_local=sub.allow_insecure_local) for a in addresses):
            raise outbox.DeliveryFailed("host resolves to an address that is not allowed", permanent=True)
        # Connect to the address just checked (not a second lookup that could differ);
        # the name still goes in Host and, for TLS, in SNI and the certificate check.
        pinned = url.copy_with(host=addresses[0])
        headers = {**headers, "host": url.netloc.decode("ascii")}
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        try:
            with httpx.Client(timeout=self.timeout, follow_redirects=False, trust_env=False) as client:
                response = client.post(pinned, content=body, headers=headers, extensions=extensions)
        except httpx.TimeoutException:
            raise outbox.DeliveryFailed("timed out") from None
        except httpx.HTTPError as exc:
            raise outbox.DeliveryFailed(f"connection failed ({type(exc).__name__})") from None
        status = response.status_code
        if 200 <= status < 300:
            return f"HTTP {status}"
        if 300 <= status < 400:
            raise outbox.DeliveryFailed(f"HTTP {status}: redirects are not followed", permanent=True)
        raise outbox.DeliveryFailed(f"HTTP {status}", permanent=status == 410)
