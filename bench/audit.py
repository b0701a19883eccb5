"""Audit chain cost: append throughput and verify speed, against an unchained table, same run.

    python -m bench.audit                       # SQLite in a temporary directory, 1M events
    python -m bench.audit --events 200000 --url postgresql+psycopg://postgres@127.0.0.1:5432/bench

Four measurements, each printed with its baseline and the ratio:

1. append, one transaction per event (how the service writes: durability-bound, fsync per
   commit): ``audit.log.record`` vs a plain ORM insert into an unchained copy of the table;
2. append, 1000 events per transaction (the CPU cost of chaining: head lookup + sha256);
3. bulk build of the large chain (hashes computed in Python, executemany) vs the same rows
   bulk-inserted unchained;
4. ``audit.verify.verify`` over the whole chain (one signed checkpoint at the head) vs a
   plain streamed scan of the same columns.

The schema comes from the service's migrations, so the append-only triggers are in place.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Integer, String, Text, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from audit.checkpoint import write_checkpoint
from audit.keys import load_or_create_signing_key
from audit.log import GENESIS_HASH, HASHED_COLUMNS, AuditEvent, EventCode, chain_hash, record
from audit.verify import verify
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction


class _Base(DeclarativeBase):
    pass


class PlainEvent(_Base):
    """The same columns and secondary indexes as ``audit_events``, no chain: the baseline."""

    __tablename__ = "bench_plain_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[str] = mapped_column(String(40), index=True)
    actor: Mapped[str] = mapped_column(String(100), index=True)
    action: Mapped[str] = mapped_column(String(60), index=True)
    event_code: Mapped[str] = mapped_column(String(10))
    object_type: Mapped[str] = mapped_column(String(40))
    object_id: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[int] = mapped_column(Integer)
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


def _details(i: int) -> dict[str, Any]:
    return {"model": "cxr-pneumonia-lite0@1.0.0", "tier": "routine", "attempt": 1, "n": i}


def _chained(factory: sessionmaker[Session], n: int, per_txn: int) -> None:
    for start in range(0, n, per_txn):
        with transaction(factory) as session:
            for i in range(start, min(n, start + per_txn)):
                record(
                    session,
                    actor="worker:bench:1",
                    action="study.score.scored",
                    code=EventCode.ACCESS,
                    object_type="case",
                    object_id=f"{i:032x}",
                    details=_details(i),
                )


def _plain(factory: sessionmaker[Session], n: int, per_txn: int) -> None:
    for start in range(0, n, per_txn):
        with transaction(factory) as session:
            for i in range(start, min(n, start + per_txn)):
                session.add(
                    PlainEvent(
                        at=datetime.now(UTC).isoformat(timespec="microseconds"),
                        actor="worker:bench:1",
                        action="study.score.scored",
                        event_code=EventCode.ACCESS.value,
                        object_type="case",
                        object_id=f"{i:032x}",
                        outcome=0,
                        details=json.dumps(_details(i), sort_keys=True, separators=(",", ":")),
                        prev_hash="",
                        hash="",
                    )
                )


def _rows(start_seq: int, prev_hash: str, n: int, chained: bool) -> Iterator[dict[str, Any]]:
    at = datetime.now(UTC).isoformat(timespec="microseconds")
    for seq in range(start_seq, start_seq + n):
        row: dict[str, Any] = {
            "seq": seq,
            "at": at,
            "actor": "worker:bench:1",
            "action": "study.score.scored",
            "event_code": EventCode.ACCESS.value,
            "object_type": "case",
            "object_id": f"{seq:032x}",
            "outcome": 0,
            "details": json.dumps(_details(seq), sort_keys=True, separators=(",", ":")),
            "prev_hash": prev_hash if chained else "",
        }
        if chained:
            row["hash"] = prev_hash = chain_hash(prev_hash, row)
        else:
            row["hash"] = ""
            del row["seq"]
        yield row


def _bulk(engine: Engine, table: Any, n: int, chained: bool, chunk: int = 20_000) -> None:
    with engine.connect() as connection:
        head = connection.execute(
            select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc())
        ).first()
    seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
    done = 0
    while done < n:
        rows = list(_rows(seq + done, prev, min(chunk, n - done), chained))
        with engine.begin() as connection:
            connection.execute(insert(table), rows)
        if chained:
            prev = rows[-1]["hash"]
        done += len(rows)


def _scan(engine: Engine) -> int:
    table = AuditEvent.__table__
    count = 0
    with engine.connect() as connection:
        result = connection.execution_options(yield_per=10_000).execute(
            select(*[table.c[c] for c in HASHED_COLUMNS], table.c.hash).order_by(table.c.seq)
        )
        for _ in result:
            count += 1
    return count


def _timed(task: Callable[[], object]) -> float:
    start = time.perf_counter()
    task()
    return time.perf_counter() - start


def _line(label: str, n: int, audited: float, plain: float, what: str = "plain") -> None:
    print(
        f"{label:<46} audit {n / audited:>10,.0f} ev/s   {what} {n / plain:>10,.0f} ev/s   "
        f"throughput audit/{what} = {plain / audited:4.2f} ({audited / plain:4.2f}x the time)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None, help="database URL (default: SQLite in a temp dir)")
    parser.add_argument("--events", type=int, default=1_000_000, help="size of the chain to verify")
    parser.add_argument("--append", type=int, default=1000, help="events appended one per transaction")
    parser.add_argument("--batched", type=int, default=20_000, help="events appended 1000 per transaction")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        engine = make_engine(url)
        if engine.dialect.name == "postgresql":
            with engine.begin() as connection:
                connection.execute(text("DROP SCHEMA public CASCADE"))
                connection.execute(text("CREATE SCHEMA public"))
        migrate(engine)
        _Base.metadata.create_all(engine)
        factory = make_sessionmaker(engine)
        print(f"backend: {engine.dialect.name}; chain to verify: {args.events:,} events")

        n = args.append
        _line(
            "append, 1 event per transaction",
            n,
            _timed(lambda: _chained(factory, n, 1)),
            _timed(lambda: _plain(factory, n, 1)),
        )
        n = args.batched
        _line(
            "append, 1000 events per transaction",
            n,
            _timed(lambda: _chained(factory, n, 1000)),
            _timed(lambda: _plain(factory, n, 1000)),
        )
        with engine.connect() as connection:
            have = connection.execute(select(AuditEvent.seq).order_by(AuditEvent.seq.desc())).scalar() or 0
        n = max(0, args.events - have)
        _line(
            "bulk build (executemany, 20k per transaction)",
            n,
            _timed(lambda: _bulk(engine, AuditEvent.__table__, n, chained=True)),
            _timed(lambda: _bulk(engine, PlainEvent.__table__, n, chained=False)),
        )
        key = load_or_create_signing_key(Path(tmp) / "secrets" / "audit.key")
        with transaction(factory) as session:
            write_checkpoint(session, key)
        total = have + n
        reads = make_engine(url, read_only=True) if engine.dialect.name == "sqlite" else engine

        def run_verify() -> None:
            with make_sessionmaker(reads)() as session:
                report = verify(session, key.public_key())
            if not report.ok or report.events != total:
                raise RuntimeError(f"verify failed: {report.problems[:3]}")

        scanned = _timed(lambda: _scan(reads))
        _line("verify (walk + sha256 + checkpoint)", total, _timed(run_verify), scanned, what="scan")
        if reads is not engine:
            reads.dispose()
        if engine.dialect.name == "postgresql":
            with engine.begin() as connection:
                connection.execute(text("DROP SCHEMA public CASCADE"))
                connection.execute(text("CREATE SCHEMA public"))
        engine.dispose()


if __name__ == "__main__":
    main()
