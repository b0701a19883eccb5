"""Tamper evidence: every way of altering the stored trail is caught and located."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from audit.checkpoint import ChainBroken, signature_valid, signed_bytes, write_checkpoint
from audit.log import AuditCheckpoint, AuditEvent, EventCode, chain_hash, first_broken, record
from audit.verify import Report, verify
from tests.audit.helpers import append, checkpoint, drop_guards, tamper
from triage_api.db import transaction


def check(factory: sessionmaker[Session], key: Ed25519PrivateKey) -> Report:
    with factory() as session:
        return verify(session, key.public_key())


@pytest.fixture
def signed(factory: sessionmaker[Session], key: Ed25519PrivateKey) -> sessionmaker[Session]:
    """Events 1..20 signed by two checkpoints (10 and 20), then 21..25 not yet signed."""
    append(factory, 10)
    checkpoint(factory, key)
    append(factory, 10)
    checkpoint(factory, key)
    append(factory, 5)
    return factory


def test_an_untouched_trail_verifies(signed: sessionmaker[Session], key: Ed25519PrivateKey) -> None:
    report = check(signed, key)
    assert report.ok, report.problems
    assert (report.events, report.checkpoints, report.signed_head, report.first_bad_seq) == (25, 2, 20, None)


@pytest.mark.parametrize(
    ("statements", "first_bad", "words"),
    [
        pytest.param(
            ["UPDATE audit_events SET details = '{}' WHERE seq = 7"], 7, "edited", id="edit-details"
        ),
        pytest.param(
            ["UPDATE audit_events SET actor = 'someone-else' WHERE seq = 23"],
            23,
            "edited",
            id="edit-unsigned",
        ),
        pytest.param(["DELETE FROM audit_events WHERE seq = 7"], 7, "missing", id="delete-middle"),
        pytest.param(["DELETE FROM audit_events WHERE seq > 15"], 16, "removed", id="delete-tail"),
        pytest.param(
            [
                "UPDATE audit_events SET seq = -1 WHERE seq = 7",
                "UPDATE audit_events SET seq = 7 WHERE seq = 8",
                "UPDATE audit_events SET seq = 8 WHERE seq = -1",
            ],
            7,
            "does not chain",
            id="swap-two-rows",
        ),
        pytest.param(["DELETE FROM audit_events"], 1, "removed", id="truncate"),
    ],
)
def test_tampering_is_caught_and_located(
    signed: sessionmaker[Session],
    engine: Engine,
    key: Ed25519PrivateKey,
    statements: list[str],
    first_bad: int,
    words: str,
) -> None:
    if statements == ["DELETE FROM audit_events"] and engine.dialect.name == "postgresql":
        statements = ["TRUNCATE audit_events"]
    tamper(engine, *statements)
    report = check(signed, key)
    assert not report.ok
    assert report.first_bad_seq == first_bad, report.problems
    assert words in " ".join(report.problems)


def test_a_consistent_rewrite_is_caught_by_the_checkpoint(
    signed: sessionmaker[Session], engine: Engine, key: Ed25519PrivateKey
) -> None:
    """The attacker edits event 14 and recomputes every hash after it: the chain links again,
    but no longer ends in what checkpoint 2 signed."""
    drop_guards(engine)
    with transaction(signed) as session:
        rows = list(
            session.execute(select(AuditEvent).where(AuditEvent.seq >= 13).order_by(AuditEvent.seq)).scalars()
        )
        prev_hash = rows[0].hash
        for event in rows[1:]:
            if event.seq == 14:
                event.details = json.dumps({"i": 1234})
            event.prev_hash = prev_hash
            row = {c.name: getattr(event, c.name) for c in AuditEvent.__table__.columns if c.name != "hash"}
            event.hash = prev_hash = chain_hash(prev_hash, row)
    with signed() as session:
        assert first_broken(session) is None  # the chain alone no longer shows it
    report = check(signed, key)
    assert report.first_bad_seq == 11, report.problems  # after the last head still vouched for
    assert "rewritten" in report.problems[0]


def test_tail_deletion_with_its_checkpoint_and_a_forged_one_is_caught(
    signed: sessionmaker[Session], engine: Engine, key: Ed25519PrivateKey
) -> None:
    tamper(
        engine, "DELETE FROM audit_events WHERE seq > 15", "DELETE FROM audit_checkpoints WHERE head_seq = 20"
    )
    with transaction(signed) as session:
        head = session.get_one(AuditEvent, 15)
        at = "2030-01-01T00:00:00.000000+00:00"
        forged = Ed25519PrivateKey.generate().sign(
            signed_bytes(count=15, head_seq=15, head_hash=head.hash, at=at)
        )
        session.add(
            AuditCheckpoint(
                at=at,
                count=15,
                head_seq=15,
                head_hash=head.hash,
                key_id="0" * 64,
                signature=base64.b64encode(forged).decode(),
            )
        )
    report = check(signed, key)
    assert not report.ok
    assert any("bad signature (signed by another key)" in p for p in report.problems)
    assert report.first_bad_seq == 15


def test_an_edited_checkpoint_fails_its_signature(
    signed: sessionmaker[Session], engine: Engine, key: Ed25519PrivateKey
) -> None:
    with signed() as session:
        genuine = session.execute(select(AuditCheckpoint).order_by(AuditCheckpoint.id)).scalars().all()
        assert all(signature_valid(c, key.public_key()) for c in genuine)
        assert not signature_valid(genuine[0], Ed25519PrivateKey.generate().public_key())
    tamper(engine, "UPDATE audit_checkpoints SET count = 9 WHERE head_seq = 10")
    report = check(signed, key)
    assert report.first_bad_seq == 10
    assert "bad signature" in report.problems[0]


def test_the_guards_refuse_update_and_delete_even_for_the_owner(
    signed: sessionmaker[Session], engine: Engine
) -> None:
    statements = [
        "UPDATE audit_events SET actor = 'x' WHERE seq = 1",
        "DELETE FROM audit_events WHERE seq = 25",
        "DELETE FROM audit_events WHERE seq = 9999",  # no row matches: still refused on PostgreSQL
        "UPDATE audit_checkpoints SET count = 1",
        "DELETE FROM audit_checkpoints",
    ]
    if engine.dialect.name == "postgresql":
        statements += ["TRUNCATE audit_events", "TRUNCATE audit_checkpoints"]
    else:
        statements.remove("DELETE FROM audit_events WHERE seq = 9999")  # row triggers: nothing fires
    for statement in statements:
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
            connection.execute(text(statement))
    with signed() as session:
        assert first_broken(session) is None
        assert session.execute(select(AuditEvent.seq).order_by(AuditEvent.seq.desc())).scalars().first() == 25


def test_the_checkpointer_refuses_to_sign_over_a_break(
    signed: sessionmaker[Session], engine: Engine, key: Ed25519PrivateKey
) -> None:
    tamper(engine, "UPDATE audit_events SET details = '{}' WHERE seq = 22")
    with pytest.raises(ChainBroken) as caught, transaction(signed) as session:
        write_checkpoint(session, key)
    assert caught.value.seq == 22


def test_concurrent_writers_and_checkpointers_keep_one_verifiable_chain(
    factory: sessionmaker[Session], key: Ed25519PrivateKey
) -> None:
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            with transaction(factory) as session:
                record(
                    session,
                    actor=f"test:{n}",
                    action="test.write",
                    code=EventCode.ACCESS,
                    object_type="test",
                    object_id=str(n),
                )
        except BaseException as exc:  # asserted below
            errors.append(exc)

    def sign() -> None:
        try:
            for _ in range(5):
                with transaction(factory) as session:
                    write_checkpoint(session, key)
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(50)]
    threads += [threading.Thread(target=sign) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    if _unsigned(factory):
        checkpoint(factory, key)
    report = check(factory, key)
    assert report.ok, report.problems
    assert report.events == 50 and report.signed_head == 50


def _unsigned(factory: sessionmaker[Session]) -> bool:
    with factory() as session:
        last = session.execute(
            select(AuditCheckpoint.head_seq).order_by(AuditCheckpoint.head_seq.desc())
        ).first()
        return last is None or last[0] < 50


def test_one_session_over_many_transactions_keeps_one_chain(
    factory: sessionmaker[Session], key: Ed25519PrivateKey
) -> None:
    """A transaction's later events continue from its earlier ones without reading the head
    again; a rolled-back transaction or another writer in between must not leave a gap."""

    def event(session: Session, n: int) -> AuditEvent:
        return record(
            session,
            actor="test",
            action="test.write",
            code=EventCode.ACCESS,
            object_type="test",
            object_id=str(n),
        )

    with factory() as session:
        with session.begin():
            assert [event(session, n).seq for n in range(3)] == [1, 2, 3]
        with pytest.raises(RuntimeError), session.begin():
            event(session, 3)
            raise RuntimeError("rolled back")
        append(factory, 2, actor="other")  # seq 4 and 5, from another session
        with session.begin():
            assert [event(session, n).seq for n in (4, 5)] == [6, 7]
    checkpoint(factory, key)
    report = check(factory, key)
    assert report.ok, report.problems
    assert report.events == 7
