"""Upgrades: a database at every released schema revision, holding rows in every table,
migrates to head without losing a row, and the current code reads it.

The rows are made from the reflected schema of that revision (a value for every column,
foreign keys pointing at the parent's rows), so each new migration is exercised against
the data of every older release without a hand-written fixture per revision.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Boolean, Column, DateTime, Float, Integer, MetaData, String, func, select
from sqlalchemy.engine import Connection

from audit.log import AuditEvent
from triage_api.db import MIGRATIONS, make_engine, make_sessionmaker, migrate
from triage_api.site import current_revision, head_revision
from triage_api.tables import Case, Job, User

REVISIONS = sorted(path.name.split("_")[0] for path in (MIGRATIONS / "versions").glob("0*.py"))
ROWS = 3
WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def upgrade_to(url: str, revision: str) -> None:
    engine = make_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()


def key_value(table: str, row: int, length: int | None) -> str:
    return f"{table[:8]}{row}"[: length or None]


def value(column: Column[Any], row: int) -> Any:
    """A value for ``column`` in row ``row``: unique per row, referencing row ``row`` of a parent."""
    for foreign in column.foreign_keys:
        parent = foreign.column
        if isinstance(parent.type, Integer):
            return row
        return key_value(parent.table.name, row, getattr(parent.type, "length", None))
    kind = column.type
    if isinstance(kind, Boolean):
        return False
    if isinstance(kind, Integer):
        return row
    if isinstance(kind, Float):
        return 0.5
    if isinstance(kind, DateTime):
        return WHEN
    if isinstance(kind, String) and kind.length is not None:
        return key_value(column.table.name, row, kind.length)
    return "{}"  # Text: JSON-shaped, as every text column the service writes is


def fill(connection: Connection) -> dict[str, int]:
    tables = MetaData()
    tables.reflect(connection)
    counts = {}
    for table in tables.sorted_tables:
        if table.name == "alembic_version":
            continue
        for row in range(1, ROWS + 1):
            connection.execute(table.insert().values({c.name: value(c, row) for c in table.columns}))
        counts[table.name] = ROWS
    return counts


def count(connection: Connection, name: str) -> int:
    tables = MetaData()
    tables.reflect(connection, only=[name])
    return int(connection.execute(select(func.count()).select_from(tables.tables[name])).scalar_one())


@pytest.mark.parametrize("revision", REVISIONS)
def test_every_released_schema_upgrades_with_its_data(database_url: str, revision: str) -> None:
    upgrade_to(database_url, revision)
    engine = make_engine(database_url)
    with engine.begin() as connection:
        filled = fill(connection)
    assert {"cases", "users", "audit_events"} <= set(filled)
    assert current_revision(engine) == revision

    migrate(engine)

    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        assert {name: count(connection, name) for name in filled} == filled
    with make_sessionmaker(engine)() as session:
        cases = session.execute(select(Case).order_by(Case.id)).scalars().all()
        assert [case.received_at for case in cases] == [WHEN] * ROWS
        assert len(session.execute(select(Job)).scalars().all()) == ROWS
        assert len(session.execute(select(User)).scalars().all()) == ROWS
        assert [e.seq for e in session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()] == [
            1,
            2,
            3,
        ]
    engine.dispose()


def test_revisions_are_a_single_chain_ending_at_head() -> None:
    """A second head (two helpers' migrations both after one parent) would stop `migrate`."""
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(config)
    assert script.get_heads() == [head_revision()] == [REVISIONS[-1]]
    chain = [rev.revision for rev in script.walk_revisions()]
    assert chain == REVISIONS[::-1]
