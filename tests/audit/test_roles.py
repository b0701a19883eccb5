"""PostgreSQL: the application role may append to and read the audit tables, nothing more."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from audit.log import EventCode, first_broken, record
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction

ROLES_SQL = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "roles.sql"


def run_roles_sql(engine: Engine) -> None:
    """As the superuser, the way psql would run the file (no client-side placeholders)."""
    with engine.begin() as connection:
        connection.connection.driver_connection.execute(ROLES_SQL.read_text())  # type: ignore[union-attr]


@pytest.fixture
def app_engine(engine: Engine) -> Iterator[Engine]:
    """The schema migrated (by the superuser), then ``roles.sql`` applied; an engine that
    logs in as ``triage_app``."""
    if engine.dialect.name != "postgresql":
        pytest.skip("database roles and privileges need PostgreSQL (set TRIAGE_TEST_DATABASE_URL)")
    run_roles_sql(engine)
    url = make_url(str(engine.url.render_as_string(hide_password=False))).set(
        username="triage_app", password=None
    )
    app = make_engine(url.render_as_string(hide_password=False))
    yield app
    app.dispose()


def test_roles_sql_is_idempotent_and_the_app_owns_nothing(engine: Engine, app_engine: Engine) -> None:
    run_roles_sql(engine)
    with engine.begin() as connection:
        owners: set[str] = set(
            connection.execute(
                text("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
        )
    assert owners == {"triage_owner"}


@pytest.mark.parametrize("table", ["audit_events", "audit_checkpoints"])
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE {table} SET id = id",
        "DELETE FROM {table}",
        "TRUNCATE {table}",
        "DROP TRIGGER {table}_append_only ON {table}",
        "ALTER TABLE {table} DISABLE TRIGGER USER",
    ],
)
def test_the_app_role_cannot_change_or_remove_audit_rows(
    app_engine: Engine, table: str, statement: str
) -> None:
    sql = statement.format(table=table).replace(
        "SET id = id", "SET seq = seq" if table == "audit_events" else "SET id = id"
    )
    with pytest.raises(DBAPIError) as caught, app_engine.begin() as connection:
        connection.execute(text(sql))
    assert "permission denied" in str(caught.value) or "must be owner" in str(caught.value)


def test_the_app_role_can_run_the_service(app_engine: Engine) -> None:
    """Start-up migration finds the schema current (no DDL), events append, other tables
    take normal writes."""
    migrate(app_engine)
    factory = make_sessionmaker(app_engine)
    with transaction(factory) as session:
        session.execute(text("INSERT INTO clinics (name, created_at) VALUES ('north', now())"))
        session.execute(text("UPDATE clinics SET name = 'north-2' WHERE name = 'north'"))
        record(
            session,
            actor="test",
            action="test.write",
            code=EventCode.ACCESS,
            object_type="test",
            object_id="1",
        )
    with transaction(factory) as session:
        session.execute(text("DELETE FROM clinics WHERE name = 'north-2'"))
    with factory() as session:
        assert first_broken(session) is None


def test_the_app_role_cannot_rewrite_the_schema_version(app_engine: Engine) -> None:
    with pytest.raises(DBAPIError, match="permission denied"), app_engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0001'"))
