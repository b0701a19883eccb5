"""Worklist at scale: the service's top-50 query on 1M cases against the same raw SQL.

    .venv/bin/python bench/worklist.py --url postgresql+psycopg://postgres@127.0.0.1:55432/worklist
    .venv/bin/python bench/worklist.py --url sqlite            # a temporary SQLite file
        [--cases 1000000] [--queries 300] [--before 0006]

Fills a fresh database (PostgreSQL: a ``bench_worklist`` schema created and dropped in the
given database, nothing else touched) with --cases cases in one bulk load (COPY on
PostgreSQL, executemany on SQLite): 20 clinics of Zipf-like sizes, two years of studies,
tiers 78/17/5 % routine/elevated/critical with their SLA deadlines, statuses mostly
scored (some not_analyzed, failed, queued, running), read except the last days' cases and
a 1 % backlog, 2,000 appeals of which a few are assigned to the radiologist.

Then, for a radiologist who reads for two clinics, p50/p99 of
:func:`triage_api.cases.worklist` (limit 50; what ``GET /v1/worklist`` runs, with its
audit event and commit) against the same SELECT as hand-written SQL through the driver,
interleaved in one run; for the web page's default (unread only) and for the API's
default (all cases). The schema is first migrated to --before, measured, then upgraded
to the newest revision and measured again: before/after a migration's index.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, insert, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage_api import auth  # noqa: E402
from triage_api.cases import worklist  # noqa: E402
from triage_api.db import MIGRATIONS, make_engine, make_sessionmaker, transaction  # noqa: E402
from triage_api.tables import Appeal, Case, Clinic  # noqa: E402

SCHEMA = "bench_worklist"
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CLINICS = 20
MINE = (1, 5)  # indexes of the radiologist's two clinics: the 2nd and 6th largest
SLA = {"critical": 30, "elevated": 240, "routine": 1440}  # minutes

RAW = """
SELECT cases.* FROM cases
WHERE cases.clinic_id IN ({clinics})
  AND cases.id NOT IN (
      SELECT appeals.case_id FROM appeals WHERE appeals.assigned_to = :user AND appeals.status = :assigned)
  {unread}
ORDER BY cases.deadline, cases.received_at, cases.id
LIMIT :limit OFFSET :offset
"""
"""The SELECT that :func:`triage_api.cases.worklist` builds, written by hand; bound parameters
as the service binds them (SQLite plans literals and parameters differently)."""


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str) -> None:
    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def hexes(rng: np.random.Generator, n: int, width: int) -> list[str]:
    blob = rng.bytes(n * width // 2).hex()
    return [blob[i * width : (i + 1) * width] for i in range(n)]


def timestamps(values: np.ndarray, postgres: bool) -> list[str | None]:
    """Microseconds since the epoch (NaN = NULL) -> the text each backend stores."""
    out: list[str | None] = [None] * len(values)
    known = ~np.isnan(values)
    text_values = np.datetime_as_string(values[known].astype("int64").astype("datetime64[us]"), unit="us")
    suffix = "+00:00" if postgres else ""
    for index, value in zip(np.flatnonzero(known), text_values, strict=True):
        out[index] = (value + suffix) if postgres else value.replace("T", " ")
    return out


def generate(
    n: int, clinic_ids: list[int], uploaders: list[int], reader: int, postgres: bool
) -> dict[str, list[Any]]:
    """Columns of ``n`` cases with a realistic spread (see the module docstring)."""
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, CLINICS + 1)
    clinic = rng.choice(CLINICS, size=n, p=weights / weights.sum())
    now_us = NOW.timestamp() * 1e6
    age_s = rng.uniform(0, 730 * 86400, n)
    tier = rng.choice(np.array(["routine", "elevated", "critical"]), size=n, p=[0.78, 0.17, 0.05])
    status = rng.choice(
        np.array(["scored", "not_analyzed", "failed", "queued", "running"]),
        size=n,
        p=[0.97, 0.02, 0.005, 0.004, 0.001],
    )
    pending = (status == "queued") | (status == "running")
    age_s[pending] = rng.uniform(0, 3600, int(pending.sum()))  # the queue holds recent studies
    tier[status != "scored"] = "routine"
    received = now_us - age_s * 1e6
    sla_us = np.vectorize(SLA.__getitem__)(tier) * 60e6
    deadline = received + sla_us
    recent = age_s < 3 * 86400
    unread = (recent & (rng.uniform(0, 1, n) > age_s / (3 * 86400))) | (rng.uniform(0, 1, n) < 0.01)
    read_at = np.where(unread, np.nan, received + rng.uniform(0.1, 1.0, n) * sla_us)
    claimed = unread & (rng.uniform(0, 1, n) < 0.1)
    risk = np.where(
        status == "scored",
        np.select(
            [tier == "critical", tier == "elevated"],
            [rng.uniform(0.92, 1, n), rng.uniform(0.22, 0.92, n)],
            rng.uniform(0, 0.22, n),
        ),
        np.nan,
    )
    reasons = {
        "not_analyzed": "body part KNEE is outside the model's intended use",
        "failed": "cannot decode DICOM pixels (ValueError)",
    }
    return {
        "id": hexes(rng, n, 32),
        "clinic_id": [clinic_ids[c] for c in clinic],
        "sha256": hexes(rng, n, 64),
        "media_type": ["application/dicom"] * n,
        "size_bytes": rng.integers(200_000, 30_000_000, n).tolist(),
        "status": status.tolist(),
        "reason": [reasons.get(s) for s in status.tolist()],
        "received_at": timestamps(received, postgres),
        "deadline": timestamps(deadline, postgres),
        "tier": tier.tolist(),
        "risk": [None if np.isnan(r) else float(r) for r in risk],
        "model_ref": ["cxr-pneumonia-lite0@1.0.0" if s == "scored" else None for s in status.tolist()],
        "modality": rng.choice(np.array(["CR", "DX"]), size=n).tolist(),
        "body_part": ["CHEST"] * n,
        "patient_pseudonym": hexes(rng, n, 64),
        "accession_number": [f"A{i:09d}" for i in range(n)],
        "study_uid": [f"1.2.826.0.1.3680043.10.{i}" for i in range(n)],
        "uploaded_by": [uploaders[c] for c in clinic],
        "claimed_by": [reader if c else None for c in claimed.tolist()],
        "claimed_at": timestamps(np.where(claimed, now_us - 60e6, np.nan), postgres),
        "read_at": timestamps(read_at, postgres),
    }


def bulk_load(engine: Engine, columns: dict[str, list[Any]]) -> None:
    names = [column.name for column in Case.__table__.columns]
    if set(names) != set(columns):
        raise RuntimeError(f"the generator does not fill {set(names) ^ set(columns)}")
    rows = list(zip(*(columns[name] for name in names), strict=True))
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "postgresql":
            with cursor.copy(f"COPY cases ({', '.join(names)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            cursor.execute("BEGIN")
            marks = ", ".join("?" * len(names))
            cursor.executemany(f"INSERT INTO cases ({', '.join(names)}) VALUES ({marks})", rows)
        raw.commit()
    finally:
        raw.close()


def fill(engine: Engine, n: int) -> auth.Principal:
    factory = make_sessionmaker(engine)
    with transaction(factory) as session:
        uploaders = [
            auth.add_user(session, name=f"pacs-{c}", role=auth.Role.UPLOADER, clinics=[f"clinic-{c:02d}"])[
                0
            ].id
            for c in range(CLINICS)
        ]
        clinic_ids = [
            session.execute(select(Clinic.id).where(Clinic.name == f"clinic-{c:02d}")).scalar_one()
            for c in range(CLINICS)
        ]
        reader, key = auth.add_user(
            session, name="reader", role=auth.Role.RADIOLOGIST, clinics=[f"clinic-{c:02d}" for c in MINE]
        )
        other, _ = auth.add_user(
            session,
            name="second-reader",
            role=auth.Role.RADIOLOGIST,
            clinics=[f"clinic-{c:02d}" for c in MINE],
        )
        reader_id, other_id = reader.id, other.id
    started = time.perf_counter()
    columns = generate(n, clinic_ids, uploaders, reader_id, engine.dialect.name == "postgresql")
    bulk_load(engine, columns)
    print(f"loaded {n} cases in {time.perf_counter() - started:.1f} s")
    rng = np.random.default_rng(1)
    mine = {clinic_ids[c] for c in MINE}
    picks = rng.choice(n, size=2000, replace=False)
    appeals = []
    for k, index in enumerate(picks.tolist()):
        ours = columns["clinic_id"][index] in mine
        assigned = (reader_id if k % 2 else other_id) if ours and k % 10 == 0 else None
        appeals.append(
            {
                "case_id": columns["id"][index],
                "clinic_id": columns["clinic_id"][index],
                "filed_by": columns["uploaded_by"][index],
                "category": "second_opinion",
                "grounds": "the patient asks for a second read",
                "contact_reference": f"ref-{k}",
                "status": "assigned" if assigned else "decided",
                "due_at": NOW + timedelta(hours=72),
                "assigned_to": assigned,
                "created_at": NOW - timedelta(days=1),
            }
        )
    with engine.begin() as connection:
        connection.execute(insert(Appeal), appeals)
    analyze(engine)
    with transaction(factory) as session:
        return auth.authenticate(session, key)


def analyze(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("ANALYZE"))


def quantiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100)
    return q[49] * 1000, q[98] * 1000


def measure(engine: Engine, principal: auth.Principal, queries: int) -> dict[str, dict[str, float]]:
    factory = make_sessionmaker(engine)
    params: dict[str, object] = {f"c{i}": c for i, c in enumerate(sorted(principal.clinic_ids))}
    params.update(user=principal.user_id, assigned="assigned", limit=50, offset=0)
    clinics = ", ".join(f":c{i}" for i in range(len(principal.clinic_ids)))
    out: dict[str, dict[str, float]] = {}
    for shape, unread in (("unread", True), ("all", None)):
        sql = text(RAW.format(clinics=clinics, unread="AND cases.read_at IS NULL" if unread else ""))

        def service() -> int:
            with transaction(factory) as session:
                return len(worklist(session, principal=principal, unread=unread, limit=50))  # noqa: B023

        def raw() -> int:
            with engine.connect() as connection:
                return len(connection.execute(sql, params).fetchall())  # noqa: B023

        if service() != raw():
            raise RuntimeError("the service and the raw SQL disagree")
        times: dict[str, list[float]] = {"service": [], "raw": []}
        runs: dict[str, Callable[[], int]] = {"service": service, "raw": raw}
        for _ in range(10):  # warm caches
            service(), raw()
        for _ in range(queries):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        s50, s99 = quantiles(times["service"])
        r50, r99 = quantiles(times["raw"])
        out[shape] = {"service_p50_ms": s50, "service_p99_ms": s99, "raw_p50_ms": r50, "raw_p99_ms": r99}
        explain = "EXPLAIN" if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN"
        with engine.connect() as connection:
            plan = [
                " ".join(str(v) for v in row) for row in connection.execute(text(f"{explain} {sql}"), params)
            ]
        print(f"  plan ({shape}): " + " | ".join(line.strip() for line in plan[:8]))
    return out


def report(label: str, results: dict[str, dict[str, float]]) -> None:
    for shape, r in results.items():
        s50, s99, r50, r99 = (r[k] for k in ("service_p50_ms", "service_p99_ms", "raw_p50_ms", "raw_p99_ms"))
        print(
            f"{label:>7} {shape:>6}: service p50 {s50:7.2f} ms p99 {s99:7.2f} ms | "
            f"raw SQL p50 {r50:7.2f} ms p99 {r99:7.2f} ms | ratio p50 {s50 / r50:.2f} p99 {s99 / r99:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="a PostgreSQL URL, or 'sqlite' for a temporary file")
    parser.add_argument("--cases", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300, help="per shape and per side")
    parser.add_argument(
        "--before", default="0006", help="revision measured first ('head' for one measurement)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        admin: Engine | None = None
        if args.url == "sqlite":
            url = f"sqlite:///{Path(tmp) / 'worklist.db'}"
        else:
            admin = create_engine(args.url, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
                connection.execute(text(f"CREATE SCHEMA {SCHEMA}"))
            url = f"{args.url}{'&' if '?' in args.url else '?'}options=-csearch_path%3D{SCHEMA}"
        engine = make_engine(url)
        try:
            head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
            upgrade(engine, args.before)
            print(f"{engine.dialect.name}: {args.cases} cases, schema at {args.before}")
            principal = fill(engine, args.cases)
            results = {args.before: measure(engine, principal, args.queries)}
            if head != args.before:
                started = time.perf_counter()
                upgrade(engine, "head")
                analyze(engine)
                print(f"upgraded to {head} in {time.perf_counter() - started:.1f} s")
                results[str(head)] = measure(engine, principal, args.queries)
            for label, result in results.items():
                report(label, result)
        finally:
            engine.dispose()
            if admin is not None:
                with admin.connect() as connection:
                    connection.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
                admin.dispose()


if __name__ == "__main__":
    main()
