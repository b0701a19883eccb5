"""Webhook subscriptions of a clinic (admin): create, list, delete, rotate, delivery log, send again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from triage_api import webhooks
from triage_api.db import transaction
from triage_api.deps import Admin, RuntimeDep
from triage_api.tables import OutboxItem, WebhookSubscription
from triage_api.vocab import WebhookEvent

router = APIRouter(prefix="/v1/clinics/{clinic}/webhooks", tags=["webhooks"])


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=webhooks.MAX_URL)
    events: list[WebhookEvent] = Field(min_length=1, max_length=len(WebhookEvent))
    allow_insecure_local: bool = False
    """Allow a loopback or private (site-internal) host, over http too; public hosts then refused."""


class WebhookRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_minutes: float = Field(60, ge=0, le=7 * 24 * 60)
    """How long the previous secret keeps signing too (receivers switch over meanwhile)."""


class WebhookSecret(BaseModel):
    id: int
    secret: str
    """``whsec_...``: shown once, in this answer only."""


class WebhookRead(BaseModel):
    id: int
    url: str
    events: list[str]
    allow_insecure_local: bool
    created_at: datetime
    previous_secret_until: datetime | None


class DeliveryRead(BaseModel):
    id: int
    event: str | None
    case_id: str | None
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


def _read(sub: WebhookSubscription) -> WebhookRead:
    return WebhookRead(
        id=sub.id,
        url=sub.url,
        events=sub.events.split(),
        allow_insecure_local=sub.allow_insecure_local,
        created_at=sub.created_at,
        previous_secret_until=sub.previous_until,
    )


def _delivery(item: OutboxItem) -> DeliveryRead:
    return DeliveryRead(
        id=item.id,
        event=webhooks.event_of(item),
        case_id=item.case_id,
        status=item.status,
        attempts=item.attempts,
        last_error=item.last_error,
        created_at=item.created_at,
        delivered_at=item.delivered_at,
    )


@router.post("", response_model=WebhookSecret, status_code=201)
def create_webhook(runtime: RuntimeDep, principal: Admin, clinic: str, body: WebhookCreate) -> WebhookSecret:
    """Subscribe an endpoint to a clinic's events; the signing secret is shown once."""
    with transaction(runtime.factory) as session:
        sub, secret = webhooks.subscribe(
            session,
            principal=principal,
            clinic=webhooks.clinic_by_name(session, clinic),
            url=body.url,
            events=body.events,
            allow_insecure_local=body.allow_insecure_local,
            site_secret=runtime.pseudonym_key,
            now=datetime.now(UTC),
        )
        return WebhookSecret(id=sub.id, secret=secret)


@router.get("", response_model=list[WebhookRead])
def list_webhooks(runtime: RuntimeDep, principal: Admin, clinic: str) -> list[WebhookRead]:
    """The clinic's live subscriptions (never their secrets)."""
    with transaction(runtime.factory) as session:
        subs = webhooks.subscriptions(session, webhooks.clinic_by_name(session, clinic))
        return [_read(sub) for sub in subs]


@router.delete("/{webhook_id}", status_code=204)
def delete_webhook(runtime: RuntimeDep, principal: Admin, clinic: str, webhook_id: int) -> Response:
    """Stop a subscription; its delivery log stays."""
    with transaction(runtime.factory) as session:
        sub = webhooks.subscription_of(session, webhooks.clinic_by_name(session, clinic), webhook_id)
        webhooks.unsubscribe(session, principal=principal, sub=sub, now=datetime.now(UTC))
    return Response(status_code=204)


@router.post("/{webhook_id}/rotate", response_model=WebhookSecret)
def rotate_secret(
    runtime: RuntimeDep, principal: Admin, clinic: str, webhook_id: int, body: WebhookRotate
) -> WebhookSecret:
    """A new signing secret (shown once); the old one also signs during the overlap."""
    with transaction(runtime.factory) as session:
        sub = webhooks.subscription_of(session, webhooks.clinic_by_name(session, clinic), webhook_id)
        secret = webhooks.rotate(
            session,
            principal=principal,
            sub=sub,
            overlap=timedelta(minutes=body.overlap_minutes),
            site_secret=runtime.pseudonym_key,
            now=datetime.now(UTC),
        )
        return WebhookSecret(id=sub.id, secret=secret)


@router.get("/{webhook_id}/deliveries", response_model=list[DeliveryRead])
def list_deliveries(
    runtime: RuntimeDep,
    principal: Admin,
    clinic: str,
    webhook_id: int,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[DeliveryRead]:
    """The subscription's deliveries, newest first: status, attempts, last error."""
    with transaction(runtime.factory) as session:
        sub = webhooks.subscription_of(session, webhooks.clinic_by_name(session, clinic), webhook_id)
        return [_delivery(item) for item in webhooks.deliveries(session, sub, limit=limit)]


@router.post("/{webhook_id}/deliveries/{delivery_id}/resend", response_model=DeliveryRead, status_code=202)
def resend_delivery(
    runtime: RuntimeDep, principal: Admin, clinic: str, webhook_id: int, delivery_id: int
) -> DeliveryRead:
    """Send a delivered or dead-lettered delivery again."""
    with transaction(runtime.factory) as session:
        sub = webhooks.subscription_of(session, webhooks.clinic_by_name(session, clinic), webhook_id)
        item = webhooks.send_again(
            session, principal=principal, sub=sub, delivery_id=delivery_id, now=datetime.now(UTC)
        )
        return _delivery(item)
