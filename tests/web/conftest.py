"""Browser tests: the app served by uvicorn on loopback, driven by Debian's Chromium.

Never ``playwright install``: the browser is ``/usr/bin/chromium`` (``apt-get install
chromium``). Without it these tests skip, or fail where ``TRIAGE_REQUIRE_SHARED=1`` (CI).
Every request a page makes must go to 127.0.0.1; anything else fails the test.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.test_cli import ROOT, free_port, triage_env
from triage_api import auth, passwords
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
PASSWORD = "a long test password"


def _need_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.environ.get("TRIAGE_REQUIRE_SHARED") == "1":
        pytest.fail(f"{CHROMIUM} is required in CI but missing (apt-get install chromium)")
    pytest.skip(f"needs Debian's Chromium at {CHROMIUM}")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    _need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


def picture(seed: int, size: int = 192) -> bytes:
    """A distinct grey PNG: a diagonal gradient with seeded noise (so W/L has work to do)."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(size), np.arange(size)) * (255.0 / (2 * size - 2))
    pixels = np.clip(ramp + rng.normal(0, 6, (size, size)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


@dataclass
class Site:
    """A running server with one user per role (all with the password ``PASSWORD``)."""

    base: str
    keys: dict[str, str]
    ids: dict[str, int]
    external: list[str] = field(default_factory=list)

    def api(self, user: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {self.keys[user]}"}, timeout=30
        )

    def upload(self, user: str, seed: int) -> str:
        with self.api(user) as client:
            response = client.post("/v1/studies", files={"file": (f"s{seed}.png", picture(seed))})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def wait_scored(self, user: str, case_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.api(user) as client:
            while time.monotonic() < deadline:
                body: dict[str, Any] = client.get(f"/v1/studies/{case_id}").json()
                if body["status"] not in ("queued", "running"):
                    return body
                time.sleep(0.1)
        raise AssertionError(f"case {case_id} not scored in {timeout}s")

    def context(self, browser: Any) -> Any:
        """A fresh browser context whose every request must stay on loopback."""
        context = browser.new_context(viewport={"width": 1366, "height": 900})
        context.set_default_timeout(15_000)

        def guard(route: Any) -> None:
            url = route.request.url
            if url.startswith(("http://127.0.0.1:", "data:", "blob:")):
                route.continue_()
            else:
                self.external.append(url)
                route.abort()

        context.route("**/*", guard)
        return context

    def login(self, browser: Any, user: str) -> Any:
        page = self.context(browser).new_page()
        page.goto(f"{self.base}/login")
        page.get_by_label("Username").fill(user)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_load_state()
        return page


USERS = {
    # name: (role, clinics)
    "up-north": ("uploader", ["north"]),
    "up-south": ("uploader", ["south"]),
    "dr-north": ("radiologist", ["north"]),
    "dr-second": ("radiologist", ["north"]),
    "dr-south": ("radiologist", ["south"]),
    "auditor": ("auditor", ["north"]),
    "admin": ("admin", []),
}


def _stop(process: subprocess.Popen[str]) -> None:
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def site(tmp_path: Path, database_url: str, tiny_bundle: Path) -> Iterator[Site]:
    _need_chromium()
    engine = make_engine(database_url)
    migrate(engine)
    keys, ids = {}, {}
    with transaction(make_sessionmaker(engine)) as session:
        for name, (role, clinics) in USERS.items():
            user, key = auth.add_user(session, name=name, role=auth.Role(role), clinics=clinics)
            passwords.set_password(session, user, PASSWORD)
            keys[name], ids[name] = key, user.id
    engine.dispose()
    port = free_port()
    env = triage_env(tmp_path, database_url, tiny_bundle, port)
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "triage_api.cli", "serve"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise AssertionError((tmp_path / "server.log").read_text())
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not start in 90 s")
            time.sleep(0.2)
        found = Site(base, keys, ids)
        yield found
        assert found.external == [], f"requests left loopback: {found.external}"
    finally:
        _stop(process)
        log.close()


def shot(page: Any, name: str) -> None:
    """Save a full-page screenshot into ``tests/web/artifacts/`` (gitignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
