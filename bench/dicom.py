"""DICOM benchmark: the C-STORE and STOW-RS doors against their baselines, and the SR round trip.

In one run, inside a private network namespace (Orthanc binds 0.0.0.0; the script re-runs
itself under ``unshare --net --fork`` as root):

- C-STORE ingest: ``storescu`` sends N distinct studies to Triage's SCP, then the same N to
  Orthanc's (baseline: a PACS storing to disk with its own index); studies/s and ratio.
- STOW-RS vs ``POST /v1/studies``: N distinct studies each, one request per study, over HTTP.
- SR round trip: for K studies scored by the in-process worker (tiny 64 px network: the
  plumbing, not the model), time from the prediction's commit to the SR being found by
  Orthanc's QIDO; p50/p99.

    .venv/bin/python -m bench.dicom [--studies 40] [--rounds 10]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import requests
import uvicorn
from fastapi import FastAPI
from pydicom.uid import generate_uid
from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import orthanc_pacs  # noqa: E402
from tests.bundles import save_tiny_bundle  # noqa: E402
from triage_api import auth  # noqa: E402
from triage_api.app import create_app  # noqa: E402
from triage_api.db import transaction  # noqa: E402
from triage_api.dicom.peers import add_peer, set_pacs  # noqa: E402
from triage_api.settings import Settings  # noqa: E402
from triage_api.tables import Prediction  # noqa: E402

SOURCE = ROOT / "tests" / "data" / "cr_chest_pa_jpeg_baseline_siim.dcm"
SCP_PORT = 11112


def copies(folder: Path, count: int) -> list[Path]:
    """``count`` distinct studies: the source with new study/series/instance UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        ds = pydicom.dcmread(SOURCE)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, called: str, files: list[Path]) -> float:
    start = time.perf_counter()
    run = subprocess.run(
        ["storescu", "-xy", "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-500:])
    return time.perf_counter() - start


def tiny_bundle(folder: Path) -> Path:
    return save_tiny_bundle(folder / "tiny", name="tiny-bench", summary="benchmark plumbing only")


def serve(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, str]:
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if not orthanc_pacs.private_network():
        if shutil.which("unshare") is None:
            raise SystemExit("needs unshare (util-linux) and root")
        command = f"ip link set lo up && exec {sys.executable} -m bench.dicom {' '.join(sys.argv[1:])}"
        return subprocess.run(
            ["unshare", "--net", "--fork", "sh", "-c", command], cwd=ROOT, check=False
        ).returncode

    work = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    settings = Settings(
        data_dir=work / "var",
        model_path=tiny_bundle(work),
        dicom_port=SCP_PORT,
        outbox_poll_seconds=0.05,
        poll_seconds=0.05,
        uploads_per_minute=1e6,
        upload_burst=100_000,
    )
    server, thread, base = serve(settings)
    app = server.config.app
    if not isinstance(app, FastAPI):
        raise TypeError("the server does not run a FastAPI app")
    factory = app.state.runtime.factory
    with transaction(factory) as session:
        _user, uploader = auth.add_user(session, name="bench", role=auth.Role.UPLOADER, clinics=["north"])
        add_peer(session, clinic="north", ae="MODALITY", host=None, now=datetime.now(UTC))
    headers = {"Authorization": f"Bearer {uploader}"}
    n = args.studies
    try:
        with orthanc_pacs.orthanc(work / "pacs", triage_port=SCP_PORT) as root:
            triage_s = storescu(SCP_PORT, "TRIAGE", copies(work / "cstore", n))
            orthanc_s = storescu(orthanc_pacs.DICOM_PORT, orthanc_pacs.AE_TITLE, copies(work / "orthanc", n))

            stow_files = [p.read_bytes() for p in copies(work / "stow", n)]
            start = time.perf_counter()
            for data in stow_files:
                body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--B--\r\n"
                content_type = 'multipart/related; type="application/dicom"; boundary=B'
                answer = requests.post(
                    f"{base}/dicom-web/studies",
                    data=body,
                    headers={**headers, "Content-Type": content_type},
                    timeout=60,
                )
                answer.raise_for_status()
            stow_s = time.perf_counter() - start
            rest_files = [p.read_bytes() for p in copies(work / "rest", n)]
            start = time.perf_counter()
            for data in rest_files:
                answer = requests.post(
                    f"{base}/v1/studies", files={"file": ("s.dcm", data)}, headers=headers, timeout=60
                )
                answer.raise_for_status()
            rest_s = time.perf_counter() - start

            # SR round trip: wait until the backlog above is scored, then one study at a time.
            with transaction(factory) as session:
                set_pacs(
                    session,
                    clinic="north",
                    ae=orthanc_pacs.AE_TITLE,
                    host="127.0.0.1",
                    port=orthanc_pacs.DICOM_PORT,
                    now=datetime.now(UTC),
                )
            trips = []
            for path in copies(work / "sr", args.rounds):
                data = path.read_bytes()
                study_uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID
                case_id = requests.post(
                    f"{base}/v1/studies", files={"file": ("s.dcm", data)}, headers=headers, timeout=60
                ).json()["id"]
                deadline = time.monotonic() + 300
                while not orthanc_pacs.sr_instances(root, study_uid):
                    if time.monotonic() > deadline:
                        raise RuntimeError("SR did not arrive")
                    time.sleep(0.02)
                arrived = datetime.now(UTC)
                with transaction(factory) as session:
                    scored = session.execute(
                        select(Prediction.created_at).where(Prediction.case_id == case_id)
                    ).scalar_one()
                trips.append((arrived - scored).total_seconds() * 1000)
    finally:
        server.should_exit = True
        thread.join(timeout=60)

    print(f"studies per door: {n}; JPEG baseline CR 1024x1024, {SOURCE.stat().st_size // 1024} KB each")
    print(f"C-STORE into Triage : {n / triage_s:7.1f} studies/s")
    print(
        f"C-STORE into Orthanc: {n / orthanc_s:7.1f} studies/s  (Triage/Orthanc {orthanc_s / triage_s:.2f}x)"
    )
    print(f"STOW-RS             : {n / stow_s:7.1f} studies/s")
    print(f"POST /v1/studies    : {n / rest_s:7.1f} studies/s  (STOW/REST {rest_s / stow_s:.2f}x)")
    print(
        f"SR round trip (scored -> SR found in Orthanc), {len(trips)} studies: "
        f"p50 {statistics.median(trips):.0f} ms, p99 {percentile(trips, 0.99):.0f} ms"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
