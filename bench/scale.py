"""Scale-out benchmark: `triage worker` processes sharing one PostgreSQL queue.

    .venv/bin/python bench/scale.py --url postgresql+psycopg://postgres@127.0.0.1:55432/scale \\
        [--workers 1,2,4] [--studies 256] [--batch 16] [--device cpu] [--decode-workers 0]

For each N in --workers, in one run: a fresh schema (``bench_scale``, created and dropped
in the given database; nothing else in it is touched), the same number of queued 224x224
DICOM studies, N worker processes started and loaded (each has written its heartbeat)
*before* the queue is released in one UPDATE + NOTIFY, then studies/s from the release
until every job is done. Prints throughput(N) / (N x throughput(1)), the scaling
efficiency; 1.0 is linear. The one-worker baseline is measured first and again last,
and their mean is the baseline, so that a drift in a shared machine's load shows.

Each worker gets ``--threads`` torch threads (default: cores // N, at least 1), as a site
running several workers on one machine should; on one GPU per worker, pass --device.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import Engine, Select, create_engine, func, select, text, update

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import dicom_224  # noqa: E402
from triage_api import auth  # noqa: E402
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction  # noqa: E402
from triage_api.ingest import accept_study, quiet_pydicom  # noqa: E402
from triage_api.jobs import JOBS_CHANNEL  # noqa: E402
from triage_api.settings import Settings  # noqa: E402
from triage_api.tables import Job, WorkerBeat  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "bench_scale"
HELD = "held"  # a status no worker claims: the queue is filled first, then released at once


def in_schema(url: str) -> str:
    """``url`` with the bench schema first on the search path (for us and the workers)."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{SCHEMA}"


def fresh_schema(admin: Engine) -> None:
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        connection.execute(text(f"CREATE SCHEMA {SCHEMA}"))


def fill_queue(settings: Settings, files: list[bytes]) -> Engine:
    engine = make_engine(settings.sqlalchemy_url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    with transaction(factory) as session:
        _, key = auth.add_user(session, name="bench", role=auth.Role.UPLOADER, clinics=["bench"])
        principal = auth.authenticate(session, key)
    for data in files:
        accept_study(
            factory, reads=factory, principal=principal, data=data, settings=settings, pseudonym_key=b"k" * 32
        )
    with transaction(factory) as session:
        session.execute(update(Job).where(Job.status == "queued").values(status=HELD))
    return engine


def count(engine: Engine, query: Select[int]) -> int:
    with engine.connect() as connection:
        return connection.execute(query).scalar_one()


def one_round(args: argparse.Namespace, n: int, files: list[bytes], admin: Engine) -> float:
    """Studies/s of ``n`` worker processes on a fresh queue of ``files``."""
    fresh_schema(admin)
    with tempfile.TemporaryDirectory() as tmp:
        url = in_schema(args.url)
        settings = Settings(
            data_dir=Path(tmp), database_url=url, **({"model_path": args.model} if args.model else {})
        )
        engine = fill_queue(settings, files)
        threads = args.threads or max(1, (os.cpu_count() or 1) // n)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update(
            TRIAGE_DATA_DIR=tmp,
            TRIAGE_DATABASE_URL=url,
            TRIAGE_DEVICE=args.device,
            TRIAGE_BATCH_SIZE=str(args.batch),
            TRIAGE_DECODE_WORKERS=str(args.decode_workers),
            TRIAGE_POLL_SECONDS="0.05",
            OMP_NUM_THREADS=str(threads),
        )
        if args.model:
            env["TRIAGE_MODEL_PATH"] = args.model
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "triage_api.cli", "worker"],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(n)
        ]
        try:
            deadline = time.monotonic() + 300
            while count(engine, select(func.count()).select_from(WorkerBeat)) < n:
                if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                    raise RuntimeError("the workers did not start")
                time.sleep(0.1)
            with engine.begin() as connection:
                start = time.perf_counter()
                connection.execute(update(Job).where(Job.status == HELD).values(status="queued"))
                connection.execute(text(f"NOTIFY {JOBS_CHANNEL}"))
            done_query = select(func.count()).select_from(Job).where(Job.status == "done")
            while count(engine, done_query) < len(files):
                time.sleep(0.02)
            elapsed = time.perf_counter() - start
        finally:
            for worker in workers:
                os.kill(worker.pid, signal.SIGTERM)
            for worker in workers:
                worker.wait(timeout=60)
            engine.dispose()
    return len(files) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="PostgreSQL URL (a bench_scale schema is made in it)")
    parser.add_argument("--workers", default="1,2,4", help="worker process counts, comma-separated")
    parser.add_argument("--studies", type=int, default=256, help="queued studies per round")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decode-workers", type=int, default=0, help="decode processes per worker")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores // N)")
    parser.add_argument("--model", default=None, help="bundle folder (default: the bundled model)")
    args = parser.parse_args()
    if not args.url.startswith("postgresql"):
        parser.error("scale-out needs PostgreSQL: SQLite is one machine, one writer")
    counts = [int(n) for n in args.workers.split(",")]
    if 1 not in counts:
        counts.insert(0, 1)
    quiet_pydicom()
    files = [dicom_224(seed) for seed in range(args.studies)]
    admin = create_engine(args.url, isolation_level="AUTOCOMMIT")
    try:
        rates = {n: one_round(args, n, files, admin) for n in counts}
        again = one_round(args, 1, files, admin)
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
    finally:
        admin.dispose()
    base = (rates[1] + again) / 2
    cores = os.cpu_count()
    print(
        f"{args.studies} queued 224x224 DICOM studies per round, batch {args.batch}, device {args.device}, "
        f"{cores} cores, decode workers {args.decode_workers}"
    )
    print(f"1 worker: {rates[1]:.1f} studies/s first, {again:.1f} last; baseline {base:.1f}")
    for n in counts:
        threads = args.threads or max(1, (cores or 1) // n)
        print(
            f"{n} worker(s) x {threads} thread(s): {rates[n]:7.1f} studies/s   "
            f"scaling efficiency {rates[n] / (n * base):.2f}   speed-up {rates[n] / base:.2f}"
        )


if __name__ == "__main__":
    main()
