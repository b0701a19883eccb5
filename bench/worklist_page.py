"""Worklist page against the raw JSON API, same server, same data, same run.

    python -m bench.worklist_page                  # 10,000 open cases, SQLite in a temp dir
    python -m bench.worklist_page --cases 10000 --rounds 7

Starts ``triage serve --workers 0`` on loopback over a database filled with ``--cases``
open (unread, scored) cases of one clinic, signs a radiologist in with Debian's Chromium
(``/usr/bin/chromium``, headless) and measures, each as a median over ``--rounds``:

1. baseline: ``GET /v1/worklist?unread=true&limit=200`` with an API key (httpx, the raw
   JSON call for the same list the page shows);
2. first render: navigation to ``/web/worklist`` until the first row is on screen;
3. live update: one poll cycle of the page (its ``/web/api/worklist`` fetch, from the
   browser's resource timing, plus the DOM render it triggers);
4. arrival to screen: a new case with the earliest deadline is committed at a random
   point of the poll cycle, until its row shows (dominated by the page's 3 s polling
   interval: about 1.5 s on average by design).

Prints each with its ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from triage_api import auth, passwords
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction
from triage_api.tables import Case

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "benchmark password"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _case(clinic_id: int, user_id: int, now: datetime, rng: np.random.Generator, minutes: float) -> Case:
    risk = float(rng.random())
    tier = "critical" if risk >= 0.9 else "elevated" if risk >= 0.5 else "routine"
    received = now - timedelta(minutes=float(rng.uniform(0, 600)))
    return Case(
        id=uuid.uuid4().hex,
        clinic_id=clinic_id,
        sha256=uuid.uuid4().hex * 2,
        media_type="image/png",
        size_bytes=1,
        status="scored",
        received_at=received,
        deadline=now + timedelta(minutes=minutes),
        tier=tier,
        risk=risk,
        model_ref="bench@1",
        uploaded_by=user_id,
    )


def populate(url: str, cases: int) -> tuple[str, Any]:
    """Users, and ``cases`` open cases; returns the radiologist's API key and a session factory."""
    engine = make_engine(url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    rng = np.random.default_rng(0)
    now = datetime.now(UTC)
    with transaction(factory) as session:
        uploader, _ = auth.add_user(session, name="up", role=auth.Role.UPLOADER, clinics=["north"])
        reader, key = auth.add_user(session, name="dr", role=auth.Role.RADIOLOGIST, clinics=["north"])
        passwords.set_password(session, reader, PASSWORD)
        clinic_id, user_id = uploader.clinics[0].id, uploader.id
    for start in range(0, cases, 2000):
        with transaction(factory) as session:
            session.add_all(
                _case(clinic_id, user_id, now, rng, float(rng.uniform(10, 1440)))
                for _ in range(min(2000, cases - start))
            )
    return key, (factory, clinic_id, user_id)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--url", default=None, help="database URL (default: SQLite in a temp dir)")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'triage.db'}"
        key, (factory, clinic_id, user_id) = populate(url, args.cases)
        port = _port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update(TRIAGE_DATA_DIR=str(Path(tmp) / "var"), TRIAGE_DATABASE_URL=url, TRIAGE_PORT=str(port))
        server = subprocess.Popen(
            [sys.executable, "-m", "triage_api.cli", "serve", "--workers", "0"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("server did not start")
                time.sleep(0.2)

            api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"})
            api.get("/v1/worklist", params={"unread": True, "limit": 200})  # warm
            baseline = []
            for _ in range(args.rounds * 2):
                t0 = time.perf_counter()
                response = api.get("/v1/worklist", params={"unread": True, "limit": 200})
                response.raise_for_status()
                _ = response.json()
                baseline.append(time.perf_counter() - t0)

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium",
                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
                )
                page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
                page.goto(f"{base}/login")
                page.fill("#username", "dr")
                page.fill("#password", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_selector("#worklist tbody tr[data-case]")
                first, poll, arrival = [], [], []
                phase = np.random.default_rng(1)
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    page.goto(f"{base}/web/worklist")
                    page.wait_for_selector("#worklist tbody tr[data-case]")
                    first.append(time.perf_counter() - t0)
                    polls = int(page.evaluate("document.body.dataset.polls || '0'"))
                    page.wait_for_function(
                        f"Number(document.body.dataset.polls || 0) > {polls}", timeout=10_000
                    )
                    fetch_ms = page.evaluate(
                        """() => { const e = performance.getEntriesByType('resource')
                              .filter(r => r.name.includes('/web/api/worklist')).pop();
                              return e.responseEnd - e.startTime; }"""
                    )
                    poll.append((fetch_ms + float(page.evaluate("document.body.dataset.renderMs"))) / 1000)
                    time.sleep(float(phase.uniform(0, 3)))  # arrive at a random point of the poll cycle
                    with transaction(factory) as session:
                        new = _case(clinic_id, user_id, datetime.now(UTC), np.random.default_rng(), 1)
                        session.add(new)
                    t0 = time.perf_counter()
                    page.wait_for_selector(f"#worklist tbody tr[data-case='{new.id}']", timeout=15_000)
                    arrival.append(time.perf_counter() - t0)
                browser.close()
        finally:
            os.kill(server.pid, signal.SIGTERM)
            server.wait(timeout=30)

    base_ms = statistics.median(baseline) * 1000
    print(f"open cases: {args.cases}; list shown: 200 rows; rounds: {args.rounds}")
    print(f"baseline  GET /v1/worklist (raw JSON, 200 rows)   {base_ms:8.1f} ms")
    for name, values in (
        ("page first render (navigation to first row)", first),
        ("live update (one poll: fetch + render)", poll),
        ("arrival to screen (incl. 3 s poll wait)", arrival),
    ):
        ms = statistics.median(values) * 1000
        print(f"{name:46s} {ms:8.1f} ms   ratio {ms / base_ms:6.2f}x")


if __name__ == "__main__":
    main()
