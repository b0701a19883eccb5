"""Serving benchmarks on this machine's device: efficiency, batching gain, decode headroom.

    .venv/bin/python bench/serving.py [--studies 256] [--clients 8] [--runs 3] [--batch 16] [--device cpu]
                                      [--decode-workers N] [--skip-http]

0. Rewrite gain = forward images/s of the network as served (models.inference: batch
   norms folded, padding inside the convolutions) / as trained, in alternating slices.
   Every other ratio uses the network as served as its baseline.
1. Serving efficiency = end-to-end studies/s (HTTP upload of 224x224 DICOMs by N clients
   -> prediction committed, `triage serve --workers 0` + one `triage worker`, SQLite)
   / raw batched forward images/s of the same model on the same device, same run
   (median of --runs end-to-end runs; the forward pass measured before and after them).
2. Batching gain = worker throughput with --batch B / with batch 1 on the same queued
   studies, with p50/p99 of the per-batch claim-to-commit latency.
3. Decode headroom per transfer syntax = decode+preprocess images/s with a pool of
   --decode-workers processes (default: one per core) / forward images/s (measured in the
   same alternating slices), at 2048² and
   3000² (--decode-sides), before (every pixel decoded, then the resize) and after
   (decoded at the resolution the model needs: models.preprocess), in the same run. The
   syntaxes are one real chest radiograph (../shared/data/dicom/chest when present, else
   tests/data) resized to the side and re-encoded with pydicom's encoders: uncompressed,
   RLE, JPEG 2000 lossless and lossy (ratio 20), JPEG-LS lossless and near-lossless
   (NEAR 2, CharLS); JPEG baseline is windowed to 8 bits and encoded with Pillow. Also
   printed: decode images/s in one thread (= per core: what a GPU deployment provisions
   cores by) and the pool's gain over it.
4. Decode pipeline = worker studies/s on a queue of those real radiographs (mixed
   syntaxes) with --decode-workers processes decoding one batch ahead of the forward pass
   / the same worker decoding in its own thread (``TRIAGE_DECODE_WORKERS=0``); and the
   worker's studies/s on the radiograph at 2048² as JPEG 2000 lossless / as uncompressed.

``--compare OTHER`` measures only the served cost of two bundles in one run: studies/s of
the bundle (--model or the default) / of OTHER, end to end (or, with --skip-http, the
worker alone on queued studies), runs in A B B A order, and the same ratio for the raw
batched forward pass.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import dicom_224, free_port, wait_ready  # noqa: E402
from models.bundle import Bundle, load_bundle  # noqa: E402
from models.preprocess import gray_from_dicom, to_input  # noqa: E402
from triage_api import auth  # noqa: E402
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction  # noqa: E402
from triage_api.decoding import Decoded, DecodeFn, DecodePool, DecodeTask, Gate, decode_study  # noqa: E402
from triage_api.ingest import accept_study, quiet_pydicom  # noqa: E402
from triage_api.settings import Settings  # noqa: E402
from triage_api.tables import Job, Prediction  # noqa: E402
from triage_api.worker import Worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_CHEST = ROOT.parent / "shared" / "data" / "dicom" / "chest"
SOURCE = "cr_chest_pa_j2k_lossy_RG1_J2KI.dcm"  # RG1: 1955x1841, 15 bits stored
FALLBACK = ROOT / "tests" / "data" / "cr_chest_pa_jpeg_baseline_siim.dcm"  # 1024x1024, 8 bits


def forward_rate(bundle, batch: int, seconds: float = 5.0) -> float:  # type: ignore[no-untyped-def]
    size = bundle.card.preprocessing.input_size
    inputs = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    bundle.predict(inputs)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        bundle.predict(inputs)
        done += batch
    return done / (time.perf_counter() - start)


def rewrite_gain(args: argparse.Namespace, bundle, seconds: float = 12.0) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Forward images/s of the network as served (batch norms folded, padding inside the
    convolutions) / as trained, in alternating slices, and how far their scores differ."""
    plain = load_bundle(Path(args.model) if args.model else Settings().model_path, args.device, rewrite=False)
    size = bundle.card.preprocessing.input_size
    inputs = np.random.default_rng(1).standard_normal((args.batch, 3, size, size)).astype(np.float32)
    rates = interleaved(
        {
            "as_trained": lambda: len(plain.predict(inputs)),
            "served": lambda: len(bundle.predict(inputs)),
        },
        seconds,
    )
    return {
        "as_trained_images_per_s": rates["as_trained"],
        "served_images_per_s": rates["served"],
        "gain": rates["served"] / rates["as_trained"],
        "max_score_difference": float(np.abs(plain.predict(inputs) - bundle.predict(inputs)).max()),
    }


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
        # The CLI creates no database but through migrate (or serve, or restore).
        subprocess.run([sys.executable, "-m", "triage_api.cli", "migrate"], env=env, cwd=ROOT, check=True)
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


def served_cost(args: argparse.Namespace, files: list[bytes]) -> dict[str, Any]:
    """Studies/s of the bundle and of ``--compare``, same run, A B B A order.

    End to end over HTTP, or with ``--skip-http`` the worker alone on queued studies (decode,
    gate, forward pass at ``--batch``, commit: every per-study cost that depends on the
    model); and the raw batched forward pass. A B B A: a linear drift in the shared
    machine's load hits both alike.
    """
    model = args.model or str(Settings().model_path)
    arms = {"bundle": model, "compare": args.compare}
    runs: dict[str, list[float]] = {"bundle": [], "compare": []}
    for arm in ("bundle", "compare", "compare", "bundle"):
        arm_args = argparse.Namespace(**{**vars(args), "model": arms[arm]})
        if args.skip_http:
            with queued_worker(arm_args, files, batch_size=args.batch) as (worker, _):
                start = time.perf_counter()
                while claims := worker.claim(args.batch):
                    worker.finish(claims, worker.score(claims))
                runs[arm].append(len(files) / (time.perf_counter() - start))
        else:
            runs[arm].append(end_to_end(arm_args, files))
    forward = {
        arm: forward_rate(load_bundle(Path(path), args.device), args.batch) for arm, path in arms.items()
    }
    rates = {arm: statistics.mean(values) for arm, values in runs.items()}
    return {
        "bundle": load_bundle(Path(model), args.device).card.ref,
        "compare": load_bundle(Path(args.compare), args.device).card.ref,
        "measure": "worker alone on queued studies" if args.skip_http else "end to end over HTTP",
        "runs_studies_per_s": runs,
        "studies_per_s": rates,
        "studies_ratio": rates["bundle"] / rates["compare"],
        "forward_images_per_s": forward,
        "forward_ratio": forward["bundle"] / forward["compare"],
    }


def any_age(gate: Gate) -> Gate:
    """The gate without the card's age population: the real radiographs here are adults, and
    what is measured is decoding and scoring, not the population gate."""
    return replace(gate, age_bands=())


@contextmanager
def queued_worker(
    args: argparse.Namespace, files: list[bytes], **settings_fields: Any
) -> Iterator[tuple[Worker, sessionmaker[Session]]]:
    """A worker over a fresh SQLite database in which ``files`` are accepted and queued."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            device=args.device,
            upload_burst=10 * len(files),
            **({"model_path": args.model} if args.model else {}),
            **settings_fields,
        )
        engine = make_engine(settings.sqlalchemy_url)
        migrate(engine)
        factory = make_sessionmaker(engine)
        read_engine = make_engine(settings.sqlalchemy_url, read_only=True)
        reads = make_sessionmaker(read_engine)
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
        bundle = load_bundle(settings.model_path, settings.device, compile=args.compile)
        worker = Worker(factory, settings, bundle)
        worker.gate = any_age(worker.gate)
        try:
            yield worker, reads
        finally:
            read_engine.dispose()
            engine.dispose()


def batching(args: argparse.Namespace, files: list[bytes]) -> dict[str, dict[str, float]]:
    results = {}
    for batch in (1, args.batch):
        with queued_worker(args, files, batch_size=batch) as (worker, _):
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
        q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
        results[f"batch_{batch}"] = {
            "studies_per_s": len(files) / elapsed,
            "batch_latency_p50_ms": q[49] * 1000,
            "batch_latency_p99_ms": q[98] * 1000,
        }
    return results


def syntax_corpus(out: Path, side: int) -> dict[str, Path]:
    """One real chest radiograph resized to ``side`` x ``side`` and written in each transfer
    syntax we can encode here."""
    source = SHARED_CHEST / SOURCE if (SHARED_CHEST / SOURCE).exists() else FALLBACK
    files: dict[str, Path] = {}

    def save(name: str, ds: pydicom.Dataset) -> None:
        files[name] = out / f"{side}_{name.replace(' ', '_')}.dcm"
        ds.save_as(files[name], enforce_file_format=True)

    plain = pydicom.dcmread(source)
    plain.decompress()
    picture = Image.fromarray(plain.pixel_array.astype(np.float32), mode="F")
    resized = np.asarray(picture.resize((side, side), Image.Resampling.BICUBIC))
    top = (1 << int(plain.BitsStored)) - 1
    plain.PixelData = np.clip(np.round(resized), 0, top).astype(plain.pixel_array.dtype).tobytes()
    plain.Rows = plain.Columns = side
    save("uncompressed", plain)
    encodings: tuple[tuple[str, str, dict[str, Any]], ...] = (
        ("RLE lossless", RLELossless, {}),
        ("JPEG 2000 lossless", JPEG2000Lossless, {}),
        ("JPEG 2000 lossy", JPEG2000, {"j2k_cr": [20]}),
        ("JPEG-LS lossless", JPEGLSLossless, {}),
        ("JPEG-LS near-lossless", JPEGLSNearLossless, {"jls_error": 2}),
    )
    for name, uid, options in encodings:
        ds = pydicom.dcmread(files["uncompressed"])
        ds.compress(uid, **options)
        save(name, ds)
    # JPEG baseline holds 8 bits: window the same pixels to 8 bits, encode with Pillow.
    ds = pydicom.dcmread(files["uncompressed"])
    pixels = ds.pixel_array.astype(np.float64)
    eight = np.round(255 * (pixels - pixels.min()) / max(1.0, float(np.ptp(pixels)))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(eight, mode="L").save(buffer, format="JPEG", quality=90)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    save("JPEG baseline", ds)
    return files


def decode_full_size(task: DecodeTask) -> Decoded:
    """Decoding as it was before resolution-aware decoding (the "before" arm): every pixel
    through pydicom's default decoders, then the resize; no gate, which costs nothing here."""
    pre = task.gate.preprocessing
    ds = pydicom.dcmread(io.BytesIO(Path(task.path).read_bytes()))
    return Decoded("ok", pixels=to_input(gray_from_dicom(ds, ds.pixel_array, pre), pre))


def interleaved(runs: dict[str, Callable[[], int]], seconds: float, rounds: int = 3) -> dict[str, float]:
    """Images/s of each run (a callable returning how many images it did), measured in
    alternating slices so that a change in the shared machine's load hits them alike."""
    done = dict.fromkeys(runs, 0)
    spent = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                done[name] += run()
            spent[name] += time.perf_counter() - start
    return {name: done[name] / spent[name] for name in runs}


def decode_once(decode: DecodeFn, task: DecodeTask) -> int:
    decode(task)
    return 1


def decode_pooled(pool: DecodePool, task: DecodeTask) -> int:
    return len(pool.map([task] * 2 * len(pool.pids)))


def forward_once(bundle: Bundle, inputs: np.ndarray) -> int:
    bundle.predict(inputs)
    return len(inputs)


def decode_headroom(
    gate: Gate, corpus: dict[str, Path], bundle: Bundle, batch: int, workers: int, seconds: float = 8.0
) -> dict[str, dict[str, float]]:
    """Per syntax and arm (before: :func:`decode_full_size`; after: :func:`decode_study`):
    images/s in one thread and in a pool of ``workers`` processes, and the pool's headroom
    over the forward pass, measured in the same alternating slices (the shared machine's
    load changes by the minute: a forward rate from another minute would not compare)."""
    size = bundle.card.preprocessing.input_size
    inputs = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    out: dict[str, dict[str, float]] = {}
    arms: dict[str, DecodeFn] = {"before": decode_full_size, "after": decode_study}
    pools = {arm: DecodePool(workers, timeout=600, decode=decode) for arm, decode in arms.items()}
    try:
        for name, path in corpus.items():
            task = DecodeTask(str(path), True, gate)
            row: dict[str, float] = {"size_bytes": path.stat().st_size}
            for arm, decode in arms.items():
                checked = decode(task)
                if checked.status != "ok":
                    raise RuntimeError(f"{name}: {checked.status} ({checked.reason})")
                pools[arm].map([task] * workers)  # warm: every process has started and imported
            runs: dict[str, Callable[[], int]] = {"forward": partial(forward_once, bundle, inputs)}
            for arm, decode in arms.items():
                runs[f"{arm}_one_thread"] = partial(decode_once, decode, task)
                runs[f"{arm}_pool"] = partial(decode_pooled, pools[arm], task)
            rates = interleaved(runs, seconds)
            row["forward_images_per_s"] = rates["forward"]
            for arm in arms:
                row[f"{arm}_one_thread_images_per_s"] = rates[f"{arm}_one_thread"]
                row[f"{arm}_pool_images_per_s"] = rates[f"{arm}_pool"]
                row[f"{arm}_headroom"] = rates[f"{arm}_pool"] / rates["forward"]
            row["speedup"] = row["after_pool_images_per_s"] / row["before_pool_images_per_s"]
            out[name] = row
    finally:
        for pool in pools.values():
            pool.close()
    return out


def unique_copies(corpus: dict[str, Path], count: int) -> list[bytes]:
    """``count`` distinct studies (new UIDs) cycling through the corpus's syntaxes."""
    names = sorted(corpus)
    copies = []
    for n in range(count):
        ds = pydicom.dcmread(corpus[names[n % len(names)]])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        copies.append(buffer.getvalue())
    return copies


def pipeline(args: argparse.Namespace, files: list[bytes], workers: int) -> float:
    """Studies/s of one worker scoring ``files``, decoding in ``workers`` processes (0: in its thread)."""
    with queued_worker(args, files, batch_size=args.batch, poll_seconds=0.01) as (worker, reads):
        pool = DecodePool(workers, timeout=600) if workers else None
        if pool is not None:
            worker.pool = pool  # started before the clock: a pool is made once per worker process
            pool.map([DecodeTask(str(FALLBACK), True, worker.gate)] * workers)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,))
        start = time.perf_counter()
        thread.start()
        try:
            while True:
                with reads() as session:
                    done = session.execute(
                        select(func.count()).select_from(Job).where(Job.status == "done")
                    ).scalar_one()
                if done >= len(files):
                    break
                time.sleep(0.02)
            elapsed = time.perf_counter() - start
        finally:
            stop.set()
            thread.join(timeout=120)
            if pool is not None:
                pool.close()
    return len(files) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3, help="end-to-end runs (the median is used)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="bundle folder (default: the bundled model)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (GPU)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--decode-workers", type=int, default=os.cpu_count() or 1, help="decode processes (default: cores)"
    )
    parser.add_argument("--pipeline-studies", type=int, default=32, help="real radiographs for 4.")
    parser.add_argument(
        "--decode-sides", type=int, nargs="+", default=[2048, 3000], help="radiograph sides for 3. and 4."
    )
    parser.add_argument("--skip-http", action="store_true", help="only 3. and 4. (decode)")
    parser.add_argument("--compare", default=None, help="another bundle: measure only the served-cost ratio")
    args = parser.parse_args()
    quiet_pydicom()
    if args.compare:
        cost = served_cost(args, [dicom_224(seed) for seed in range(args.studies)])
        print(json.dumps(cost, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(cost, indent=2))
        return
    bundle = load_bundle(
        Path(args.model) if args.model else Settings().model_path, args.device, compile=args.compile
    )
    results: dict[str, object] = {
        "device": args.device,
        "model": bundle.card.ref,
        "batch": args.batch,
        "decode_workers": args.decode_workers,
        "cpu_count": os.cpu_count(),
    }
    results["rewrite"] = rewrite_gain(args, bundle)
    forward = forward_rate(bundle, args.batch)
    if not args.skip_http:
        files = [dicom_224(seed) for seed in range(args.studies)]
        runs = [end_to_end(args, files) for _ in range(args.runs)]
        e2e = statistics.median(runs)
        forward = (forward + forward_rate(bundle, args.batch)) / 2
        gains = batching(args, files)
        results.update(
            studies=args.studies,
            clients=args.clients,
            end_to_end_runs=runs,
            end_to_end_studies_per_s=e2e,
            serving_efficiency=e2e / forward,
            batching=gains,
            batching_gain=gains[f"batch_{args.batch}"]["studies_per_s"] / gains["batch_1"]["studies_per_s"],
        )
    results["forward_images_per_s"] = forward
    gate = any_age(Gate.of(bundle.card))
    w = args.decode_workers
    with tempfile.TemporaryDirectory() as tmp:
        corpora = {side: syntax_corpus(Path(tmp), side) for side in args.decode_sides}
        results["decode_headroom"] = {
            str(side): decode_headroom(gate, corpus, bundle, args.batch, w)
            for side, corpus in corpora.items()
        }
        first_side = corpora[args.decode_sides[0]]
        copies = unique_copies(first_side, args.pipeline_studies)
        # The same radiograph as JPEG 2000 lossless vs uncompressed, scored by the worker.
        by_syntax = {
            name: unique_copies({name: first_side[name]}, args.pipeline_studies)
            for name in ("uncompressed", "JPEG 2000 lossless")
        }
    # A B B A: a linear drift in the shared machine's load hits both arms alike.
    first, pooled_a, pooled_b, last = (pipeline(args, copies, n) for n in (0, w, w, 0))
    in_thread, pooled = (first + last) / 2, (pooled_a + pooled_b) / 2
    results["decode_pipeline"] = {
        "studies": len(copies),
        "side": args.decode_sides[0],
        "in_thread_studies_per_s": in_thread,
        "pool_studies_per_s": pooled,
        "pool_gain": pooled / in_thread,
    }
    plain_a, j2k_a, j2k_b, plain_b = (
        pipeline(args, by_syntax[name], w)
        for name in ("uncompressed", "JPEG 2000 lossless", "JPEG 2000 lossless", "uncompressed")
    )
    results["j2k_lossless_vs_uncompressed"] = {
        "studies": args.pipeline_studies,
        "side": args.decode_sides[0],
        "uncompressed_studies_per_s": (plain_a + plain_b) / 2,
        "j2k_lossless_studies_per_s": (j2k_a + j2k_b) / 2,
        "ratio": (j2k_a + j2k_b) / (plain_a + plain_b),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
