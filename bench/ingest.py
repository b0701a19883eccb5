"""Ingest benchmark: Triage's POST /v1/studies against a bare Starlette upload endpoint.

Both servers run in this run, on loopback, one uvicorn process each; the bare endpoint
reads the multipart file and writes it to disk with fsync (what Triage must do at least).
Triage runs with no in-process worker so that only ingest is measured, on SQLite.

    .venv/bin/python bench/ingest.py [--uploads 400] [--clients 8]

Prints uploads/s and p50/p99 latency of each, and the ratio triage / bare.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]

BARE_APP = textwrap.dedent(
    """
    import os, uuid
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    OUT = os.environ["BENCH_OUT"]

    async def upload(request):
        form = await request.form()
        data = await form["file"].read()
        path = os.path.join(OUT, uuid.uuid4().hex)
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return JSONResponse({"id": os.path.basename(path)}, status_code=201)

    app = Starlette(routes=[Route("/upload", upload, methods=["POST"])])
    """
)


def dicom_224(seed: int) -> bytes:
    """A 224x224 16-bit uncompressed CR chest with unique pixels (no dedupe)."""
    rng = np.random.default_rng(seed)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.1")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.PatientID = "CR", "CHEST", f"BENCH{seed}"
    ds.Rows = ds.Columns = 224
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (224, 224), dtype=np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not start")


def hammer(url: str, files: list[bytes], headers: dict[str, str], clients: int) -> tuple[float, list[float]]:
    latencies: list[float] = []

    def one(client: httpx.Client, data: bytes) -> None:
        start = time.perf_counter()
        response = client.post(url, files={"file": ("s.dcm", data)}, headers=headers)
        latencies.append(time.perf_counter() - start)
        if response.status_code not in (200, 201):
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")

    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        list(pool.map(lambda d: one(client, d), files))
        elapsed = time.perf_counter() - start
    return len(files) / elapsed, latencies


def summary(name: str, rate: float, latencies: list[float]) -> str:
    q = statistics.quantiles(latencies, n=100)
    return f"{name:8s} {rate:8.1f} uploads/s   p50 {q[49] * 1000:7.1f} ms   p99 {q[98] * 1000:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uploads", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    files = [dicom_224(seed) for seed in range(args.uploads)]
    warm = [dicom_224(10_000 + seed) for seed in range(20)]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "bare").mkdir()
        (work / "bare_app.py").write_text(BARE_APP)
        bare_port, triage_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        bare = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(work),
                "bare_app:app",
                "--port",
                str(bare_port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env={**env, "BENCH_OUT": str(work / "bare")},
            stdout=subprocess.DEVNULL,
        )
        triage_env = {
            **env,
            "TRIAGE_DATA_DIR": str(work / "var"),
            "TRIAGE_PORT": str(triage_port),
            "TRIAGE_UPLOAD_BURST": str(10 * args.uploads),  # measure ingest, not the rate limit
        }
        # The CLI creates no database but through migrate (or serve, or restore).
        migrate = [sys.executable, "-m", "triage_api.cli", "migrate"]
        subprocess.run(migrate, env=triage_env, cwd=ROOT, check=True)
        users = subprocess.run(
            [
                sys.executable,
                "-m",
                "triage_api.cli",
                "users",
                "add",
                "--clinic",
                "bench",
                "--role",
                "uploader",
                "--name",
                "bench",
            ],
            env=triage_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        key = users.stdout.strip().splitlines()[-1]
        triage = subprocess.Popen(
            [sys.executable, "-m", "triage_api.cli", "serve", "--workers", "0"],
            env=triage_env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(f"http://127.0.0.1:{bare_port}/")
            wait_ready(f"http://127.0.0.1:{triage_port}/healthz")
            bare_url, triage_url = (
                f"http://127.0.0.1:{bare_port}/upload",
                f"http://127.0.0.1:{triage_port}/v1/studies",
            )
            auth = {"Authorization": f"Bearer {key}"}
            hammer(bare_url, warm, {}, args.clients)
            hammer(triage_url, warm, auth, args.clients)
            bare_rate, bare_lat = hammer(bare_url, files, {}, args.clients)
            triage_rate, triage_lat = hammer(triage_url, files, auth, args.clients)
        finally:
            for process in (bare, triage):
                os.kill(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
    print(f"{args.uploads} uploads of 224x224 16-bit uncompressed DICOM, {args.clients} concurrent clients")
    print(summary("bare", bare_rate, bare_lat))
    print(summary("triage", triage_rate, triage_lat))
    print(f"ratio triage/bare uploads/s: {triage_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
