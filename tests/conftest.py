"""Shared fixtures: a database per test (SQLite, or PostgreSQL when
``TRIAGE_TEST_DATABASE_URL`` is set), a tiny CPU model bundle, and a running app."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from tests.bundles import save_tiny_bundle
from triage_api import auth
from triage_api.app import create_app
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction
from triage_api.deps import Runtime
from triage_api.settings import Settings

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path in ../shared/data; skips the test (visibly) when the corpus is absent.

    ``.ci/run`` sets ``TRIAGE_REQUIRE_SHARED=1``: there a missing corpus fails instead.
    """
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("TRIAGE_REQUIRE_SHARED") == "1":
            pytest.fail(f"{path} is required in CI but missing")
        pytest.skip(f"needs the shared corpus at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real timm network with seeded random weights at 64 px: plumbing, not accuracy."""
    return save_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    url = os.environ.get("TRIAGE_TEST_DATABASE_URL")
    if not url:
        yield f"sqlite:///{tmp_path / 'triage.db'}"
        return
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    admin.dispose()
    yield url


@pytest.fixture
def settings(tmp_path: Path, database_url: str, tiny_bundle: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        model_path=tiny_bundle,
        poll_seconds=0.05,
        blind_sample_rate=0.0,  # scores stay visible; tests/test_golive*.py covers the AI-blind sample
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


MakeKey = Callable[..., str]


@pytest.fixture
def make_key(settings: Settings) -> Iterator[MakeKey]:
    """``make_key(role, *clinics) -> bearer key`` for a new user in the test database."""
    engine = make_engine(settings.sqlalchemy_url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    counter = iter(range(1_000_000))

    def make(role: str, *clinics: str) -> str:
        with transaction(factory) as session:
            _, key = auth.add_user(
                session, name=f"{role}-{next(counter)}", role=auth.Role(role), clinics=list(clinics)
            )
        return key

    yield make
    engine.dispose()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(client: TestClient, key: str, data: bytes, name: str = "study.dcm"):  # type: ignore[no-untyped-def]
    return client.post("/v1/studies", files={"file": (name, data)}, headers=bearer(key))


def app_of(client: TestClient) -> FastAPI:
    """The app a test client drives (typed: ``client.app`` is any ASGI app)."""
    if not isinstance(client.app, FastAPI):
        raise TypeError("the test client does not drive a FastAPI app")
    return client.app


def runtime_of(client: TestClient) -> Runtime:
    """The running app's engine, sessions and settings."""
    runtime: Runtime = app_of(client).state.runtime
    return runtime


OVERRIDE_READ = {
    "finding": "normal",
    "agrees_with_ai": False,
    "override_reason": "other",
    "ai_score_shown": True,
}
"""A final read that overrides the AI: valid whatever tier the random tiny model gave."""


def claim_and_override(
    client: TestClient, headers: dict[str, str], case_id: str, finding: str = "normal"
) -> Any:
    """Claim ``case_id`` and save :data:`OVERRIDE_READ` (with ``finding``); the read's JSON."""
    claim = client.post(f"/v1/studies/{case_id}/claim", headers=headers)
    assert claim.status_code == 200, claim.text
    read = client.post(
        f"/v1/studies/{case_id}/reads", json={**OVERRIDE_READ, "finding": finding}, headers=headers
    )
    assert read.status_code == 201, read.text
    return read.json()


def wait_for(client: TestClient, key: str, case_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll a case until it leaves queued/running (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/v1/studies/{case_id}", headers=bearer(key)).json()
        if body["status"] not in ("queued", "running"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"case {case_id} still {body['status']} after {timeout}s")
