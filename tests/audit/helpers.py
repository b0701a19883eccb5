"""The audit tests' tools: write events, sign, and tamper as someone with the owner's rights."""

from __future__ import annotations

import argparse

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from audit.checkpoint import write_checkpoint
from audit.log import EventCode, record
from triage_api.db import transaction


def append(factory: sessionmaker[Session], n: int, *, actor: str = "test") -> None:
    """``n`` events in one transaction."""
    with transaction(factory) as session:
        for i in range(n):
            record(
                session,
                actor=actor,
                action="test.write",
                code=EventCode.ACCESS,
                object_type="test",
                object_id=str(i),
                details={"i": i},
            )


def checkpoint(factory: sessionmaker[Session], key: Ed25519PrivateKey) -> None:
    with transaction(factory) as session:
        if write_checkpoint(session, key) is None:
            raise RuntimeError("nothing was signed")


def drop_guards(engine: Engine) -> None:
    """What someone with the owner's rights can do: switch the append-only triggers off."""
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            for table in ("audit_events", "audit_checkpoints"):
                connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
        else:
            for table in ("audit_events", "audit_checkpoints"):
                for verb in ("update", "delete"):
                    connection.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{verb}"))


def tamper(engine: Engine, *statements: str) -> None:
    """Drop the guards, then run ``statements`` in one transaction, as superuser/owner."""
    drop_guards(engine)
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))


def run(parser: argparse.ArgumentParser, *argv: str) -> int:
    """Run one command of a parser from the ``cli_env`` fixture; its exit status."""
    args = parser.parse_args(list(argv))
    return int(args.func(args))
