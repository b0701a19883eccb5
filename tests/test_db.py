"""The migrations create exactly the schema the ORM tables describe, on every backend."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData

from audit.log import AuditBase
from triage_api.db import make_engine, migrate
from triage_api.tables import Base


def test_migrations_match_the_tables(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine)
    metadata = MetaData()
    for table in [*Base.metadata.tables.values(), *AuditBase.metadata.tables.values()]:
        table.to_metadata(metadata)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), metadata)
    engine.dispose()
    assert diff == []
