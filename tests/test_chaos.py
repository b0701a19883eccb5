"""Nothing lost: uploads while workers (and once the API) are SIGKILLed, on PostgreSQL.

Three `triage worker` processes and one `triage serve --workers 0` share a PostgreSQL
database and a blob directory on loopback. Clients upload 300 distinct studies, retrying
the same bytes when a connection drops; meanwhile a random worker is SIGKILLed and
restarted every two seconds, and the API once. At the end every upload that got a 2xx
has exactly one prediction and a worklist entry, nothing is left running, and the audit
chain is whole. Bounded in time; every process is stopped by its pid.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from audit.log import AuditEvent, first_broken
from tests.test_cli import ROOT, free_port, read_until, run_triage, stop, triage_env
from triage_api.db import make_engine, make_sessionmaker
from triage_api.tables import Case, Job, Prediction

STUDIES = 300


def small_dicom(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = (
        ds.file_meta.MediaStorageSOPClassUID,
        ds.file_meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (64, 64), dtype=np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.skipif(
    not os.environ.get("TRIAGE_TEST_DATABASE_URL"),
    reason="the chaos test runs on PostgreSQL (tests/run.sh does)",
)
def test_nothing_is_lost_when_workers_and_the_api_are_killed(
    tmp_path: Path, database_url: str, tiny_bundle: Path
) -> None:
    port = free_port()
    env = triage_env(tmp_path, database_url, tiny_bundle, port)
    env.update(
        TRIAGE_LEASE_SECONDS="3",
        TRIAGE_POLL_SECONDS="0.1",
        TRIAGE_BATCH_SIZE="8",
        TRIAGE_MAX_ATTEMPTS="20",
        TRIAGE_UPLOAD_BURST="1000",
    )
    assert run_triage(env, "migrate").returncode == 0
    key = run_triage(
        env, "users", "add", "--clinic", "north", "--role", "uploader", "--name", "pacs"
    ).stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}

    def start_api() -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "triage_api.cli", "serve", "--workers", "0"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        read_until(process, "Uvicorn running on")
        return process

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "triage_api.cli", "worker"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    api = [start_api()]
    workers = [start_worker() for _ in range(3)]
    accepted: dict[int, str] = {}
    done = threading.Event()
    kills = Counter[str]()

    def chaos() -> None:
        rng = random.Random(7)
        api_killed = False
        while not done.wait(2.0):
            victim = rng.randrange(len(workers))
            os.kill(workers[victim].pid, signal.SIGKILL)
            workers[victim].wait(timeout=10)
            workers[victim] = start_worker()
            kills["worker"] += 1
            if not api_killed and len(accepted) > STUDIES // 3:
                os.kill(api[0].pid, signal.SIGKILL)
                api[0].wait(timeout=10)
                if api[0].stdout is not None:
                    api[0].stdout.close()
                api[0] = start_api()
                kills["api"] += 1
                api_killed = True

    def send(seed: int) -> None:
        data = small_dicom(seed)
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            while time.monotonic() < deadline:
                try:
                    response = http.post("/v1/studies", headers=headers, files={"file": ("s.dcm", data)})
                except httpx.TransportError:
                    time.sleep(0.2)  # the API is down or restarting: retry the same bytes
                    continue
                if response.status_code in (200, 201):
                    accepted[seed] = response.json()["id"]
                    return
                raise AssertionError(f"upload {seed}: {response.status_code} {response.text}")
        raise AssertionError(f"upload {seed} never accepted")

    chaos_thread = threading.Thread(target=chaos)
    chaos_thread.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, range(STUDIES)))
        time.sleep(3)  # let the chaos go on a little after the last upload
        done.set()
        chaos_thread.join(timeout=60)
        engine = make_engine(database_url)
        factory = make_sessionmaker(engine)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with factory() as session:
                open_jobs = session.execute(
                    select(func.count()).select_from(Job).where(Job.status.in_(("queued", "running")))
                ).scalar_one()
            if open_jobs == 0:
                break
            time.sleep(0.5)
        assert open_jobs == 0
    finally:
        done.set()
        chaos_thread.join(timeout=60)
        for process in workers:
            os.kill(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        stop(api[0])
        if api[0].stdout is not None:
            api[0].stdout.close()

    assert kills["api"] == 1 and kills["worker"] >= 5
    assert len(accepted) == STUDIES and len(set(accepted.values())) == STUDIES
    with factory() as session:
        cases = {c.id: c for c in session.execute(select(Case)).scalars()}
        predictions = Counter(p.case_id for p in session.execute(select(Prediction)).scalars())
        events = list(session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars())
        broken = first_broken(session)
    engine.dispose()
    assert set(accepted.values()) == set(cases)
    assert {c.status for c in cases.values()} == {"scored"}
    assert all(predictions[case_id] == 1 for case_id in cases)  # one prediction, no duplicates
    uploads = Counter(e.object_id for e in events if e.action == "study.upload")
    scored = Counter(e.object_id for e in events if e.action == "study.score.scored")
    assert all(uploads[case_id] == 1 and scored[case_id] == 1 for case_id in cases)
    assert broken is None
