"""Fixtures for the audit tests: the app without a worker, a migrated database, a signing key."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from audit.keys import load_or_create_signing_key
from triage_api import audit_cli
from triage_api.db import make_engine, make_sessionmaker, migrate
from triage_api.settings import Settings


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """No in-process worker: these tests need no model."""
    return Settings(data_dir=tmp_path / "var", database_url=database_url, run_worker=False)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.sqlalchemy_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


@pytest.fixture
def key(settings: Settings) -> Ed25519PrivateKey:
    return load_or_create_signing_key(settings.audit_key_path)


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The ``triage audit`` commands, reading ``Settings()`` from the environment as ``triage`` does."""
    for name in list(os.environ):
        if name.startswith("TRIAGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TRIAGE_DATABASE_URL", settings.sqlalchemy_url)
    parser = argparse.ArgumentParser(prog="triage")
    audit_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser
