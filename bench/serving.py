"""Serving benchmarks on this machine's device: efficiency, batching gain, decode headroom.

    .venv/bin/python bench/serving.py [--studies 256] [--clients 8] [--batch 16] [--device cpu]

1. Serving efficiency = end-to-end studies/s (HTTP upload of 224x224 DICOMs by N clients
   -> prediction committed, `triage serve --workers 0` + one `triage worker`, SQLite)
   / raw batched forward images/s of the same model on the same device, same run.
2. Batching gain = worker throughput with --batch B / with batch 1 on the same queued
   studies, with p50/p99 of the per-batch claim-to-commit latency.
3. Decode headroom per transfer syntax = decode+preprocess images/s (one process)
   / forward images/s, on the real chest DICOMs in ../shared/data/dicom when present.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import dicom_224, free_port, wait_ready  # noqa: E402
from models.bundle import load_bundle  # noqa: E402
from triage_api import auth  # noqa: E402
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction  # noqa: E402
from triage_api.ingest import accept_study, quiet_pydicom  # noqa: E402
from triage_api.settings import Settings  # noqa: E402
from triage_api.tables import Prediction  # noqa: E402
from triage_api.worker import Worker, model_input  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_CHEST = ROOT.parent / "shared" / "data" / "dicom" / "chest"


def forward_rate(bundle, batch: int, seconds: float = 5.0) -> float:  # type: ignore[no-untyped-def]
    size = bundle.card.preprocessing.input_size
    inputs = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    bundle.predict(inputs)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        bundle.predict(inputs)
        done += batch
    return done / (time.perf_counter() - start)


def end_to_end(args: argparse.Namespace, files: list[bytes]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update(
            TRIAGE_DATA_DIR=str(Path(tmp) / "var"),
            TRIAGE_PORT=str(port),
            TRIAGE_DEVICE=args.device,
            TRIAGE_POLL_SECONDS="0.01",
            TRIAGE_UPLOAD_BURST=str(10 * len(files)),
        )
        if args.model:
            env["TRIAGE_MODEL_PATH"] = args.model
        key = (
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "triage_api.cli",
                    "users",
                    "add",
                    "--clinic",
                    "b",
                    "--role",
                    "uploader",
                    "--name",
                    "bench",
                ],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        api = subprocess.Popen(
            [sys.executable, "-m", "triage_api.cli", "serve", "--workers", "0"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        worker = subprocess.Popen(
            [sys.executable, "-m", "triage_api.cli", "worker", "--batch", str(args.batch)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        engine = make_engine(f"sqlite:///{Path(tmp) / 'var' / 'triage.db'}", read_only=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}/healthz")
            time.sleep(8)  # let the worker load its model
            headers = {"Authorization": f"Bearer {key}"}
            start = time.perf_counter()
            with (
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http,
                ThreadPoolExecutor(args.clients) as pool,
            ):
                list(
                    pool.map(
                        lambda d: http.post("/v1/studies", headers=headers, files={"file": ("s.dcm", d)}),
                        files,
                    )
                )
            while True:
                with engine.connect() as connection:
                    done = connection.execute(select(func.count()).select_from(Prediction)).scalar_one()
                if done >= len(files):
                    break
                time.sleep(0.02)
            return len(files) / (time.perf_counter() - start)
        finally:
            for process in (worker, api):
                os.kill(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
            engine.dispose()


def batching(args: argparse.Namespace, files: list[bytes]) -> dict[str, dict[str, float]]:
    results = {}
    for batch in (1, args.batch):
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(
                data_dir=Path(tmp),
                device=args.device,
                batch_size=batch,
                upload_burst=10 * len(files),
                **({"model_path": args.model} if args.model else {}),
            )
            engine = make_engine(settings.sqlalchemy_url)
            migrate(engine)
            factory = make_sessionmaker(engine)
            reads = make_sessionmaker(make_engine(settings.sqlalchemy_url, read_only=True))
            with transaction(factory) as session:
                _, key = auth.add_user(session, name="b", role=auth.Role.UPLOADER, clinics=["b"])
                principal = auth.authenticate(session, key)
            for data in files:
                accept_study(
                    factory,
                    reads=reads,
                    principal=principal,
                    data=data,
                    settings=settings,
                    pseudonym_key=b"k" * 32,
                )
            worker = Worker(
                factory, settings, load_bundle(settings.model_path, settings.device, compile=args.compile)
            )
            latencies = []
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                claims = worker.claim(batch)
                if not claims:
                    break
                worker.finish(claims, worker.score(claims))
                latencies.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - start
            engine.dispose()
        q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
        results[f"batch_{batch}"] = {
            "studies_per_s": len(files) / elapsed,
            "batch_latency_p50_ms": q[49] * 1000,
            "batch_latency_p99_ms": q[98] * 1000,
        }
    return results


def decode_headroom(card, forward: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import pydicom

    out: dict[str, float] = {}
    for path in sorted(SHARED_CHEST.glob("*.dcm")) if SHARED_CHEST.exists() else []:
        data = path.read_bytes()
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 3.0:
            model_input(data, "application/dicom", card)
            n += 1
        rate = n / (time.perf_counter() - start)
        out[f"{path.name} ({syntax})"] = rate / forward
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="bundle folder (default: the bundled model)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (GPU)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    quiet_pydicom()
    bundle = load_bundle(
        Path(args.model) if args.model else Settings().model_path, args.device, compile=args.compile
    )
    files = [dicom_224(seed) for seed in range(args.studies)]
    forward = forward_rate(bundle, args.batch)
    e2e = end_to_end(args, files)
    forward_after = forward_rate(bundle, args.batch)
    raw = (forward + forward_after) / 2
    gains = batching(args, files)
    headroom = decode_headroom(bundle.card, raw)
    results = {
        "device": args.device,
        "model": bundle.card.ref,
        "studies": args.studies,
        "clients": args.clients,
        "batch": args.batch,
        "forward_images_per_s": raw,
        "end_to_end_studies_per_s": e2e,
        "serving_efficiency": e2e / raw,
        "batching": gains,
        "batching_gain": gains[f"batch_{args.batch}"]["studies_per_s"] / gains["batch_1"]["studies_per_s"],
        "decode_headroom": headroom,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
