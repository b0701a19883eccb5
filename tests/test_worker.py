"""Scoring worker: leases, crash recovery, fencing, dead letters, tiers and deadlines."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from models.bundle import load_bundle
from models.preprocess import Preprocessing
from tests.conftest import (
    DATA,
    MakeKey,
    bearer,
    claim_and_override,
    runtime_of,
    shared_data,
    upload,
    wait_for,
)
from tests.misbehaving_decoder import CRASH, HANG, decode_or_misbehave
from triage_api.app import create_app
from triage_api.decoding import DecodePool, DecodeTask, Gate, decode_study
from triage_api.jobs import Claim
from triage_api.settings import Settings
from triage_api.tables import Case, Job, Prediction
from triage_api.vocab import CaseStatus, JobStatus
from triage_api.worker import Result, Worker, cpu_budget, load_model


@pytest.fixture
def manual(settings: Settings) -> Settings:
    """No in-process worker and a short lease: the test drives workers itself."""
    return settings.model_copy(update={"run_worker": False, "lease_seconds": 0.5, "max_attempts": 3})


@pytest.fixture
def quiet_client(manual: Settings):  # type: ignore[no-untyped-def]
    with TestClient(create_app(manual)) as test_client:
        yield test_client


class Clock:
    """A clock that moves only when told: a lease runs out when the test says, however slow the machine."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def new_worker(client: TestClient, settings: Settings, clock: Clock | None = None) -> Worker:
    bundle = load_bundle(settings.model_path)
    factory = runtime_of(client).factory
    worker = Worker(factory, settings, bundle) if clock is None else Worker(factory, settings, bundle, clock)
    worker.name += f":{id(worker)}"  # two workers in one thread must differ
    return worker


def queue_study(client: TestClient, key: str, name: str = "cr_chest_pa_jpeg_baseline_siim.dcm") -> str:
    response = upload(client, key, (DATA / name).read_bytes())
    assert response.status_code == 201
    return str(response.json()["id"])


def rows(client: TestClient, table: type) -> list:  # type: ignore[type-arg]
    with runtime_of(client).factory() as session:
        return list(session.execute(select(table)).scalars())


def test_expired_lease_is_reclaimed_and_late_write_discarded(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    client = quiet_client
    case_id = queue_study(client, make_key("uploader", "north"))
    clock = Clock()
    crashed, rescuer = new_worker(client, manual, clock), new_worker(client, manual, clock)
    (first,) = crashed.claim()
    assert first.attempt == 1
    assert rescuer.claim() == []  # the lease still holds
    clock.advance(manual.lease_seconds + 0.2)
    (second,) = rescuer.claim()
    assert second.case_id == case_id and second.attempt == 2
    assert rescuer.finish([second], rescuer.score([second])) == 1
    # The "crashed" worker wakes up and tries to write its stale result: fenced out.
    assert crashed.finish([first], [Result(CaseStatus.SCORED, risk=0.99, inference_ms=1.0)]) == 0
    predictions = rows(client, Prediction)
    assert [(p.case_id, p.attempt) for p in predictions] == [(case_id, 2)]
    (case,) = rows(client, Case)
    assert case.status == "scored" and case.risk == predictions[0].risk


def test_killed_worker_process_loses_nothing(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    """A real process claims the job and is SIGKILLed mid-job; the case is scored anyway."""
    client = quiet_client
    case_id = queue_study(client, make_key("uploader", "north"))
    script = textwrap.dedent(
        f"""
        import sys, time
        from models.bundle import load_bundle
        from triage_api.db import make_engine, make_sessionmaker
        from triage_api.settings import Settings
        from triage_api.worker import Worker
        settings = Settings.model_validate_json({manual.model_dump_json()!r})
        factory = make_sessionmaker(make_engine(settings.sqlalchemy_url))
        worker = Worker(factory, settings, load_bundle(settings.model_path))
        claims = worker.claim()
        print("claimed" if claims else "nothing", flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "claimed"
            (job,) = rows(client, Job)
            assert job.status == "running" and job.attempts == 1
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    clock = Clock()  # the killed process leased the job on the real clock, before now
    clock.advance(manual.lease_seconds + 0.2)
    assert new_worker(client, manual, clock).run_once() is True
    (case,) = rows(client, Case)
    assert case.id == case_id and case.status == "scored"
    (job,) = rows(client, Job)
    assert job.status == "done" and job.attempts == 2


def test_job_that_keeps_crashing_ends_failed_and_visible(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    client = quiet_client
    key = make_key("uploader", "north")
    case_id = queue_study(client, key)
    clock = Clock()
    worker = new_worker(client, manual, clock)
    for _ in range(manual.max_attempts):
        assert len(worker.claim()) == 1
        clock.advance(manual.lease_seconds + 0.1)
    assert worker.claim() == []
    (case,) = rows(client, Case)
    assert case.status == "failed" and "gave up after 3 attempts" in (case.reason or "")
    listed = client.get("/v1/worklist", headers=bearer(make_key("radiologist", "north"))).json()
    assert [(item["id"], item["status"]) for item in listed] == [(case_id, "failed")]


def test_tiers_set_deadlines_and_a_rescore_never_moves_one_later(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    client = quiet_client
    key = make_key("uploader", "north")
    worker = new_worker(client, manual)
    names = ["cr_chest_pa_jpeg_baseline_siim.dcm", "cr_chest_pa_monochrome1_siim.dcm", "cxr_normal.jpeg"]
    risks = {}
    for name, risk in zip(names, (0.2, 0.95, 0.6), strict=False):
        case_id = queue_study(client, key, name)
        (claim,) = worker.claim()
        assert claim.case_id == case_id
        assert worker.finish([claim], [Result(CaseStatus.SCORED, risk=risk, inference_ms=1.0)]) == 1
        risks[case_id] = risk
    cases = {c.id: c for c in rows(client, Case)}
    for case in cases.values():
        expected = {
            0.2: ("routine", manual.sla_routine_minutes),
            0.95: ("critical", manual.sla_critical_minutes),
            0.6: ("elevated", manual.sla_elevated_minutes),
        }[risks[case.id]]
        assert case.tier == expected[0]
        assert case.deadline - case.received_at == timedelta(minutes=expected[1])
    listed = client.get("/v1/worklist", headers=bearer(make_key("radiologist", "north"))).json()
    assert [risks[item["id"]] for item in listed] == [0.95, 0.6, 0.2]
    assert [item["tier"] for item in listed] == ["critical", "elevated", "routine"]

    # Rescore the critical case as routine: the tier follows the model, the deadline stays.
    critical_id = listed[0]["id"]
    with runtime_of(client).factory() as session, session.begin():
        job = session.execute(select(Job).where(Job.case_id == critical_id)).scalar_one()
        job.status = JobStatus.QUEUED
    (claim,) = worker.claim()
    assert claim.case_id == critical_id
    assert worker.finish([claim], [Result(CaseStatus.SCORED, risk=0.1, inference_ms=1.0)]) == 1
    rescored = next(c for c in rows(client, Case) if c.id == critical_id)
    assert rescored.tier == "routine"
    assert rescored.deadline == cases[critical_id].deadline


def test_queued_case_is_on_the_worklist_at_routine_priority(
    quiet_client: TestClient, make_key: MakeKey
) -> None:
    client = quiet_client
    case_id = queue_study(client, make_key("uploader", "north"))
    (item,) = client.get("/v1/worklist", headers=bearer(make_key("radiologist", "north"))).json()
    assert item["id"] == case_id and item["status"] == "queued" and item["tier"] == "routine"
    assert item["waited_seconds"] >= 0


def test_worklist_filters(quiet_client: TestClient, make_key: MakeKey) -> None:
    client = quiet_client
    queue_study(client, make_key("uploader", "north"))
    headers = bearer(make_key("radiologist", "north"))
    assert len(client.get("/v1/worklist?status=queued", headers=headers).json()) == 1
    assert client.get("/v1/worklist?status=scored", headers=headers).json() == []
    assert client.get("/v1/worklist?tier=critical", headers=headers).json() == []
    bad = client.get("/v1/worklist?status=deleted", headers=headers)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


def test_no_prediction_rows_are_duplicated(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    client = quiet_client
    key = make_key("uploader", "north")
    for name in ("cr_chest_pa_jpeg_baseline_siim.dcm", "cr_chest_pa_monochrome1_siim.dcm"):
        queue_study(client, key, name)
    worker = new_worker(client, manual)
    while worker.run_once():
        pass
    with runtime_of(client).factory() as session:
        assert session.execute(select(func.count()).select_from(Prediction)).scalar_one() == 2


def claim_the_test_studies(
    client: TestClient, manual: Settings, make_key: MakeKey
) -> tuple[Worker, list[Claim]]:
    """Queue the four studies of tests/data (three chest, one dog) and claim them in one batch."""
    key = make_key("uploader", "north")
    for name in (
        "cr_chest_pa_jpeg_baseline_siim.dcm",
        "cr_chest_pa_monochrome1_siim.dcm",
        "cxr_normal.jpeg",
        "dx_thorax_dog_monochrome1.dcm",
    ):
        queue_study(client, key, name)
    worker = new_worker(client, manual)
    claims = worker.claim(limit=10)
    assert len(claims) == 4
    return worker, claims


def test_batched_scores_equal_one_at_a_time(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    client = quiet_client
    worker, claims = claim_the_test_studies(client, manual, make_key)
    batched = worker.score(claims)
    single = [worker.score([claim])[0] for claim in claims]
    assert [r.status for r in batched] == ["scored", "scored", "scored", "not_analyzed"]
    for b, s in zip(batched, single, strict=True):
        assert b.status == s.status and b.reason == s.reason
        if b.risk is not None:
            assert b.risk == pytest.approx(s.risk, abs=1e-5)
    assert worker.finish(claims, batched) == 4
    assert {c.status for c in rows(client, Case)} == {"scored", "not_analyzed"}


def test_batch_sizes_are_reported_as_a_histogram(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    client = quiet_client
    worker, claims = claim_the_test_studies(client, manual, make_key)
    worker._complete(claims, worker.score(claims))  # a batch of 4
    picture = io.BytesIO()
    Image.fromarray(np.full((64, 64), 90, dtype=np.uint8)).save(picture, format="PNG")
    assert upload(client, make_key("uploader", "north"), picture.getvalue()).status_code == 201
    assert worker.run_once()  # a batch of 1
    worker.heartbeat(every_seconds=0)
    admin = bearer(make_key("admin"))
    (beat,) = client.get("/v1/health", headers=admin).json()["workers"]
    assert {k: v for k, v in beat["batch_sizes"].items() if v} == {"1": 1, "4": 1}
    text = client.get("/metrics", headers=admin).text
    name = worker.name
    for le, count in (("1", 1), ("2", 1), ("4", 2), ("8", 2), ("+Inf", 2)):
        assert f'triage_worker_batch_size_bucket{{worker="{name}",le="{le}"}} {count}' in text
    assert f'triage_worker_batch_size_sum{{worker="{name}"}} 5' in text
    assert f'triage_worker_batch_size_count{{worker="{name}"}} 2' in text


def test_a_partial_batch_waits_once_for_more_jobs(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = quiet_client
    key = make_key("uploader", "north")
    queue_study(client, key)
    waits: list[float] = []

    def two_more_arrive(seconds: float) -> None:  # stands in for the worker's wait
        waits.append(seconds)
        for name in ("cr_chest_pa_monochrome1_siim.dcm", "cxr_normal.jpeg"):
            queue_study(client, key, name)

    monkeypatch.setattr("triage_api.worker.time.sleep", two_more_arrive)
    clock = Clock()  # stands still: no lease runs out, however long the machine takes
    worker = new_worker(client, manual.model_copy(update={"batch_size": 4, "batch_wait_ms": 50}), clock)
    assert len(worker.claim_batch()) == 3  # one waiting, two more during the 50 ms
    assert waits == [0.05]
    assert worker.claim_batch() == []  # nothing waiting: no wait either
    assert waits == [0.05]
    impatient = new_worker(client, manual.model_copy(update={"batch_size": 4, "batch_wait_ms": 0}), clock)
    queue_study(client, key, "dx_thorax_dog_monochrome1.dcm")
    assert len(impatient.claim_batch()) == 1 and waits == [0.05]


def test_health_and_prometheus_metrics_describe_the_fleet(client: TestClient, make_key: MakeKey) -> None:
    key = make_key("uploader", "north")
    case_id = queue_study(client, key)
    wait_for(client, key, case_id)
    admin = bearer(make_key("admin"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the heartbeat lands after the batch commits
        health = client.get("/v1/health", headers=admin).json()
        if health["workers"] and health["workers"][0]["studies"] >= 1:
            break
        time.sleep(0.1)
    assert health["status"] == "ok" and health["jobs"]["done"] == 1
    (worker,) = health["workers"]
    assert worker["alive"] and worker["device"] == "cpu" and worker["model_ref"] == "tiny-test@0.0.1"
    text = client.get("/metrics", headers=admin).text
    assert 'triage_jobs{status="done"} 1' in text
    assert 'triage_cases{status="scored"} 1' in text
    assert "triage_time_to_score_seconds_count 1" in text
    assert "triage_queue_oldest_seconds 0.000" in text  # nothing waits
    assert 'triage_reads_total{agreement="agree"} 0' in text
    claim_and_override(client, bearer(make_key("radiologist", "north")), case_id)
    text = client.get("/metrics", headers=admin).text
    assert 'triage_reads_total{agreement="override"} 1' in text
    assert 'triage_reads_total{agreement="agree"} 0' in text
    name = worker["name"]
    assert worker["batch_sizes"]["1"] == 1 and sum(worker["batch_sizes"].values()) == 1
    assert f'triage_worker_batch_size_bucket{{worker="{name}",le="1"}} 1' in text
    assert f'triage_worker_batch_size_bucket{{worker="{name}",le="+Inf"}} 1' in text
    assert f'triage_worker_batch_size_count{{worker="{name}"}} 1' in text
    assert client.get("/metrics").status_code == 401


@pytest.mark.skipif(not os.environ.get("TRIAGE_TEST_DATABASE_URL"), reason="LISTEN/NOTIFY is PostgreSQL's")
def test_notify_wakes_an_idle_worker_long_before_its_poll(manual: Settings, make_key: MakeKey) -> None:
    slow_poll = manual.model_copy(update={"poll_seconds": 8.0})
    with TestClient(create_app(slow_poll)) as client:
        key = make_key("uploader", "north")
        worker = new_worker(client, slow_poll)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,))
        thread.start()
        try:
            time.sleep(1.0)  # the worker has found nothing and sleeps on LISTEN
            started = time.monotonic()
            case_id = queue_study(client, key)
            wait_for(client, key, case_id, timeout=6)
            assert time.monotonic() - started < 6  # well before the 8 s poll would fire
        finally:
            stop.set()
            thread.join(timeout=20)


# --- decoding in a pool of processes -------------------------------------------------


def marked(marker: bytes) -> bytes:
    """A real chest DICOM carrying ``marker`` in its header (distinct bytes, so a new case)."""
    ds = pydicom.dcmread(DATA / "cr_chest_pa_jpeg_baseline_siim.dcm")
    ds.SeriesDescription = marker.decode()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def pool_scores_equal_in_thread_scores(worker: Worker, claims: list[Claim]) -> None:
    """Batched with the pool vs one at a time in this thread; then the claiming worker finishes."""
    with DecodePool(2, timeout=120) as pool:
        worker.pool = pool
        batched = worker.score(claims)
    worker.pool = None
    single = [worker.score([claim])[0] for claim in claims]
    assert [r.status for r in batched] == [r.status for r in single]
    for b, s in zip(batched, single, strict=True):
        assert b.reason == s.reason
        if b.status == "scored":
            assert b.risk == pytest.approx(s.risk, abs=1e-5)
    assert worker.finish(claims, batched) == len(claims)


def test_pool_scores_equal_in_thread_scores(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    client = quiet_client
    worker, claims = claim_the_test_studies(client, manual, make_key)
    pool_scores_equal_in_thread_scores(worker, claims)
    statuses = {c.id: c.status for c in rows(client, Case)}
    assert sorted(statuses.values()) == ["not_analyzed", "scored", "scored", "scored"]


def test_pool_scores_equal_in_thread_scores_on_every_transfer_syntax(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    """JPEG baseline, JPEG-LS near-lossless, JPEG 2000 lossy and lossless chest radiographs."""
    client = quiet_client
    key = make_key("uploader", "north")
    files = sorted(shared_data("dicom", "chest").glob("*.dcm"))
    assert len(files) >= 4
    for path in files:
        assert upload(client, key, path.read_bytes()).status_code == 201
    worker = new_worker(client, manual)
    claims = worker.claim(limit=len(files))
    assert len(claims) == len(files)
    pool_scores_equal_in_thread_scores(worker, claims)
    assert {c.status for c in rows(client, Case)} == {"scored"}


def test_a_hanging_or_crashing_decode_fails_that_case_only(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    client = quiet_client
    key = make_key("uploader", "north")
    good = queue_study(client, key)
    hangs = upload(client, key, marked(HANG)).json()["id"]
    crashes = upload(client, key, marked(CRASH)).json()["id"]
    also_good = queue_study(client, key, "cr_chest_pa_monochrome1_siim.dcm")
    worker = new_worker(client, manual)
    claims = worker.claim(limit=10)
    with DecodePool(2, timeout=2.0, decode=decode_or_misbehave) as pool:
        worker.pool = pool
        before = set(pool.pids)
        started = time.monotonic()
        results = dict(zip([c.case_id for c in claims], worker.score(claims), strict=True))
        assert time.monotonic() - started < 30  # bounded: not the hour the hanging decode asks for
        # Both misbehaving processes were killed and replaced, and the pool still works.
        assert len(pool.pids) == 2 and not set(pool.pids) & before
        assert not any(alive(pid) for pid in before)
        assert [r.status for r in worker.score(claims[:1])] == ["scored"]
        assert worker.finish(claims, [results[c.case_id] for c in claims]) == 4
    assert results[good].status == results[also_good].status == "scored"
    assert results[hangs].status == "failed"
    assert results[hangs].reason == "decoding took longer than 2 s"
    assert results[crashes].status == "failed"
    assert results[crashes].reason == "the decoder process died on this study"
    listed = client.get("/v1/worklist", headers=bearer(make_key("radiologist", "north"))).json()
    failed = {item["id"]: item for item in listed if item["status"] == "failed"}
    assert set(failed) == {hangs, crashes}


def test_worker_decodes_ahead_in_its_pool_and_shuts_it_down_on_stop(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    client = quiet_client
    key = make_key("uploader", "north")
    ids = [
        queue_study(client, key, name) for name in ("cr_chest_pa_jpeg_baseline_siim.dcm", "cxr_normal.jpeg")
    ]
    ids += [upload(client, key, marked(f"STUDY-{n}".encode())).json()["id"] for n in range(5)]
    settings = manual.model_copy(
        update={"decode_workers": 2, "batch_size": 2, "lease_seconds": 60, "poll_seconds": 0.05}
    )
    worker = new_worker(client, settings)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while worker.pool is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.pool is not None
        pids = worker.pool.pids
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        while time.monotonic() < deadline:
            if {c.status for c in rows(client, Case)} == {"scored"}:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert worker.pool is None and not any(alive(pid) for pid in pids)
    cases = rows(client, Case)
    assert {c.id for c in cases} == set(ids) and {c.status for c in cases} == {"scored"}
    predictions = rows(client, Prediction)
    assert sorted((p.case_id, p.attempt) for p in predictions) == sorted((i, 1) for i in ids)
    assert worker.batches == 4 and worker.studies == 7


def test_a_batch_decoded_ahead_is_still_fenced_by_its_attempt(
    quiet_client: TestClient, manual: Settings, make_key: MakeKey
) -> None:
    """The pipelined worker's lease on the batch it decoded ahead expires; its late write is discarded."""
    client = quiet_client
    case_id = queue_study(client, make_key("uploader", "north"))
    clock = Clock()
    slow, rescuer = new_worker(client, manual, clock), new_worker(client, manual, clock)
    with DecodePool(1, timeout=60) as pool, ThreadPoolExecutor(1) as feeder:
        slow.pool = pool
        assert slow.run_ahead(feeder) is True  # claimed (attempt 1) and decoding ahead
        clock.advance(manual.lease_seconds + 0.2)
        (second,) = rescuer.claim()
        assert second.attempt == 2
        assert rescuer.finish([second], rescuer.score([second])) == 1
        assert slow.run_ahead(feeder) is True  # scores its stale batch: the write is fenced out
        assert slow.run_ahead(feeder) is False
    assert [(p.case_id, p.attempt) for p in rows(client, Prediction)] == [(case_id, 2)]
    (job,) = rows(client, Job)
    assert job.status == "done" and job.attempts == 2 and job.worker == rescuer.name


def test_a_pool_process_killed_while_idle_is_replaced() -> None:
    gate = Gate(Preprocessing(input_size=64), modalities=("CR", "DX"), body_parts=("CHEST",))
    task = DecodeTask(str(DATA / "cr_chest_pa_jpeg_baseline_siim.dcm"), True, gate)
    expected = decode_study(task)
    assert expected.status == "ok" and expected.pixels is not None
    with DecodePool(1, timeout=60) as pool:
        assert pool.map([task])[0].status == "ok"
        (victim,) = pool.pids
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
        (result,) = pool.map([task])
        assert pool.pids != [victim]
    assert result.status == "ok" and result.pixels is not None
    assert np.array_equal(result.pixels, expected.pixels)


@pytest.mark.parametrize(
    ("age", "status", "reason"),
    [
        ("004Y", "ok", None),
        ("030Y", "not_analyzed", "age band 18–64 y is outside the model's intended population (1–5 y)"),
        ("62", "not_analyzed", "age band 18–64 y is outside the model's intended population (1–5 y)"),
        (None, "ok", None),  # no usable age: analysed, and the reader is told "age not checked"
    ],
)
def test_a_card_with_an_age_population_gates_on_the_header_age(
    tmp_path: Path, age: str | None, status: str, reason: str | None
) -> None:
    ds = pydicom.dcmread(DATA / "cr_chest_pa_monochrome1_siim.dcm")
    for keyword in ("PatientAge", "PatientBirthDate"):
        if keyword in ds:
            delattr(ds, keyword)
    if age is not None:
        ds.PatientAge = age
    path = tmp_path / "study.dcm"
    ds.save_as(path, enforce_file_format=True)
    gate = Gate(Preprocessing(input_size=64), ("CR", "DX"), ("CHEST",), ("1–5 y",))
    decoded = decode_study(DecodeTask(str(path), True, gate))
    assert (decoded.status, decoded.reason) == (status, reason)
    assert (
        decode_study(DecodeTask(str(path), True, Gate(gate.preprocessing, ("CR",), ("CHEST",)))).status
        == "ok"
    )


def test_the_default_card_is_for_children_aged_1_to_5() -> None:
    from models.bundle import read_card
    from triage_api.settings import DEFAULT_BUNDLE

    card = read_card(DEFAULT_BUNDLE)
    assert Gate.of(card).age_bands == ("1–5 y",)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "100000 100000\n"}, 1),
        ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU still gets one thread
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cpu_budget_follows_affinity_and_a_container_quota(
    tmp_path: Path, files: dict[str, str], expected: int | None
) -> None:
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    affinity = len(os.sched_getaffinity(0))
    assert cpu_budget(tmp_path) == (affinity if expected is None else expected)


def test_a_cpu_worker_sets_its_thread_count(settings: Settings) -> None:
    before = torch.get_num_threads()
    try:
        bundle = load_model(settings.model_copy(update={"torch_threads": 1}))
        assert torch.get_num_threads() == 1 and bundle.device.type == "cpu"
    finally:
        torch.set_num_threads(before)
