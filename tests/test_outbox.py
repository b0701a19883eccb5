"""The outbox on the real database: delivered once, retried with backoff, dead-lettered, audited."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from audit.log import AuditEvent
from triage_api import outbox
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction
from triage_api.tables import OutboxItem

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    migrate(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def _enqueue(factory: sessionmaker[Session], **payload: object) -> int:
    with transaction(factory) as session:
        item = outbox.enqueue(session, kind="test", target="peer-1", payload=dict(payload), now=T0)
        session.flush()
        return item.id


def _item(factory: sessionmaker[Session], item_id: int) -> OutboxItem:
    with factory() as session:
        item = session.get(OutboxItem, item_id)
        assert item is not None
        return item


def _actions(factory: sessionmaker[Session]) -> list[str]:
    with factory() as session:
        return [e.action for e in session.scalars(select(AuditEvent).order_by(AuditEvent.seq))]


def test_a_delivery_is_sent_once_and_audited(factory: sessionmaker[Session]) -> None:
    item_id = _enqueue(factory, event="case.critical")
    sent: list[outbox.Delivery] = []
    clock = Clock()

    def sender(delivery: outbox.Delivery) -> str:
        sent.append(delivery)
        return "204"

    assert outbox.deliver_due(factory, {"test": sender}, now=clock) == {"delivered": 1}
    assert outbox.deliver_due(factory, {"test": sender}, now=clock) == {}
    assert [d.payload for d in sent] == [{"event": "case.critical"}]
    assert _item(factory, item_id).status == outbox.DELIVERED
    assert _actions(factory) == ["outbox.delivered"]


def test_failures_back_off_then_succeed(factory: sessionmaker[Session]) -> None:
    item_id = _enqueue(factory)
    clock = Clock()
    answers = iter([outbox.DeliveryFailed("503"), outbox.DeliveryFailed("503"), None])
    calls: list[datetime] = []

    def sender(delivery: outbox.Delivery) -> None:
        calls.append(clock.now)
        answer = next(answers)
        if answer is not None:
            raise answer

    policy = outbox.Policy(max_attempts=5, base_seconds=10, cap_seconds=100)
    rng = random.Random(1)
    for _ in range(60):  # bounded: one simulated minute per round
        outbox.deliver_due(factory, {"test": sender}, now=clock, policy=policy, rng=rng)
        clock.now += timedelta(seconds=1)
    assert len(calls) == 3
    # 1st retry after 5-10 s, 2nd after 10-20 s (jitter in [0.5, 1] of 10 * 2**(n-1))
    assert timedelta(seconds=5) <= calls[1] - calls[0] <= timedelta(seconds=11)
    assert timedelta(seconds=10) <= calls[2] - calls[1] <= timedelta(seconds=21)
    assert _item(factory, item_id).status == outbox.DELIVERED
    assert _actions(factory) == ["outbox.failed", "outbox.failed", "outbox.delivered"]


def test_a_dead_peer_is_dead_lettered_then_sent_again_on_request(factory: sessionmaker[Session]) -> None:
    item_id = _enqueue(factory)
    clock = Clock()

    def dead(delivery: outbox.Delivery) -> None:
        raise ConnectionRefusedError("no one there")

    policy = outbox.Policy(max_attempts=3, base_seconds=1, cap_seconds=1)
    for _ in range(20):
        outbox.deliver_due(factory, {"test": dead}, now=clock, policy=policy)
        clock.now += timedelta(seconds=2)
    item = _item(factory, item_id)
    assert (item.status, item.attempts) == (outbox.DEAD, 3)
    assert item.last_error == "sender error: ConnectionRefusedError"
    with transaction(factory) as session:
        outbox.resend(session, item_id, actor="user:1", now=clock.now)
    assert outbox.deliver_due(factory, {"test": lambda d: None}, now=clock) == {"delivered": 1}
    assert _actions(factory)[-3:] == ["outbox.dead_lettered", "outbox.resend", "outbox.delivered"]


def test_a_permanent_failure_is_not_retried(factory: sessionmaker[Session]) -> None:
    item_id = _enqueue(factory)

    def refuse(delivery: outbox.Delivery) -> None:
        raise outbox.DeliveryFailed("rejected by peer", permanent=True)

    assert outbox.deliver_due(factory, {"test": refuse}, now=Clock()) == {"dead": 1}
    assert _item(factory, item_id).last_error == "rejected by peer"


def test_a_claim_whose_lease_ran_out_cannot_overwrite_the_next_claim(factory: sessionmaker[Session]) -> None:
    _enqueue(factory)
    clock = Clock()
    policy = outbox.Policy(lease_seconds=30)
    outcomes: list[dict[str, int]] = []

    def slow(delivery: outbox.Delivery) -> None:
        if delivery.attempt == 1:
            # while the first sender hangs past its lease, another deliverer claims the row
            clock.now += timedelta(seconds=31)
            outcomes.append(outbox.deliver_due(factory, {"test": lambda d: None}, now=clock, policy=policy))

    first = outbox.deliver_due(factory, {"test": slow}, now=clock, policy=policy)
    assert outcomes == [{"delivered": 1}]
    assert first == {"lost_lease": 1}


def test_rows_of_kinds_without_a_sender_are_left_alone(factory: sessionmaker[Session]) -> None:
    item_id = _enqueue(factory)
    assert outbox.deliver_due(factory, {"other": lambda d: None}, now=Clock()) == {}
    assert _item(factory, item_id).status == outbox.PENDING
