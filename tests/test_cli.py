"""The ``triage`` command: first-start admin, ``users add``, and ``serve`` end to end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import DATA
from triage_api.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def triage_env(tmp_path: Path, database_url: str, bundle: Path, port: int = 0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(
        TRIAGE_DATA_DIR=str(tmp_path / "var"),
        TRIAGE_DATABASE_URL=database_url,
        TRIAGE_MODEL_PATH=str(bundle),
        TRIAGE_PORT=str(port),
        TRIAGE_POLL_SECONDS="0.05",
        TRIAGE_BLIND_SAMPLE_RATE="0",
    )
    return env


def run_triage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triage_api.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_users_add_prints_a_working_key_once(tmp_path: Path, database_url: str, tiny_bundle: Path) -> None:
    env = triage_env(tmp_path, database_url, tiny_bundle)
    assert run_triage(env, "migrate").returncode == 0
    result = run_triage(
        env,
        "users",
        "add",
        "--clinic",
        "north",
        "--clinic",
        "south",
        "--role",
        "radiologist",
        "--name",
        "dr-a",
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("trg_") and len(key) > 50
    refused = run_triage(
        env, "users", "add", "--clinic", "a", "--clinic", "b", "--role", "uploader", "--name", "up"
    )
    assert refused.returncode == 2 and "exactly one clinic" in refused.stderr
    revoked = run_triage(env, "users", "revoke", key.split("_")[1])
    assert revoked.returncode == 0


def start_server(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "triage_api.cli", "serve"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(process: subprocess.Popen[str], marker: str, timeout: float = 300) -> list[str]:
    """Lines up to ``marker``. The bound is generous: on a loaded 2-core machine the first
    line alone (imports) was seen to take over 90 s."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} not seen; output: {lines}")


def stop(process: subprocess.Popen[str]) -> None:
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def test_serve_end_to_end_on_loopback(tmp_path: Path, database_url: str, tiny_bundle: Path) -> None:
    port = free_port()
    env = triage_env(tmp_path, database_url, tiny_bundle, port)
    with start_server(env) as server:
        try:
            lines = read_until(server, "Uvicorn running on")
            told = next(line for line in lines if line.startswith("Created the first admin."))
            key_file = Path(told.split(" is in ", 1)[1].removesuffix(" (mode 0600)."))
            assert key_file.stat().st_mode & 0o777 == 0o600
            admin_key = key_file.read_text().strip()
            assert admin_key not in "\n".join(lines)
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=30) as http:
                made = http.post(
                    "/v1/users",
                    json={"name": "north-pacs", "role": "uploader", "clinics": ["north"]},
                    headers={"Authorization": f"Bearer {admin_key}"},
                )
                assert made.status_code == 201
                uploader = {"Authorization": f"Bearer {made.json()['api_key']}"}
                sent = http.post(
                    "/v1/studies",
                    headers=uploader,
                    files={"file": ("x.dcm", (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes())},
                )
                assert sent.status_code == 201
                case_id = sent.json()["id"]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    case = http.get(f"/v1/studies/{case_id}", headers=uploader).json()
                    if case["status"] == "scored":
                        break
                    time.sleep(0.1)
                assert case["status"] == "scored"
                worklist = http.get("/v1/worklist", headers=uploader).json()
                assert [item["id"] for item in worklist] == [case_id]
        finally:
            stop(server)
        # uvicorn shuts down gracefully, then re-raises SIGTERM (exit status -15).
        assert server.stdout is not None
        assert "Application shutdown complete." in server.stdout.read()
    # A second start on the same database creates no second admin and prints no key.
    with start_server(env) as again:
        try:
            lines = read_until(again, "Uvicorn running on")
            assert not any("first admin" in line for line in lines)
        finally:
            stop(again)


def test_separate_worker_process_scores_and_stops_on_sigterm(
    tmp_path: Path, database_url: str, tiny_bundle: Path
) -> None:
    """`triage serve --workers 0` takes uploads; a `triage worker` process scores them."""
    port = free_port()
    env = triage_env(tmp_path, database_url, tiny_bundle, port)
    assert run_triage(env, "migrate").returncode == 0
    key = run_triage(
        env, "users", "add", "--clinic", "north", "--role", "uploader", "--name", "pacs"
    ).stdout.strip()
    api = subprocess.Popen(
        [sys.executable, "-m", "triage_api.cli", "serve", "--workers", "0"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "triage_api.cli", "worker", "--batch", "4"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with api, worker:
        try:
            read_until(api, "Uvicorn running on")
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                ids = [
                    http.post(
                        "/v1/studies", headers=headers, files={"file": (name, (DATA / name).read_bytes())}
                    ).json()["id"]
                    for name in ("cr_chest_pa_jpeg_baseline_siim.dcm", "cr_chest_pa_monochrome1_siim.dcm")
                ]
                deadline = time.monotonic() + 60
                statuses: list[str] = []
                while time.monotonic() < deadline:
                    statuses = [http.get(f"/v1/studies/{i}", headers=headers).json()["status"] for i in ids]
                    if statuses == ["scored", "scored"]:
                        break
                    time.sleep(0.1)
                assert statuses == ["scored", "scored"]
        finally:
            os.kill(worker.pid, signal.SIGTERM)
            try:
                assert worker.wait(timeout=30) == 0  # a clean stop: the loop ends, the engine closes
            finally:
                stop(api)  # even when the worker did not stop cleanly: never leave the API running


def test_commands_refuse_a_site_without_a_database(
    tmp_path: Path, database_url: str, tiny_bundle: Path
) -> None:
    """`users add` from the wrong place used to create an empty database and print a dead key."""
    env = triage_env(tmp_path, database_url, tiny_bundle)
    for command in (("users", "add", "--name", "a", "--role", "admin"), ("worker",), ("audit", "verify")):
        refused = run_triage(env, *command)
        assert refused.returncode == 2, (command, refused.stderr)
        assert "triage migrate" in refused.stderr and "--config" in refused.stderr
        assert "trg_" not in refused.stdout
    assert not (tmp_path / "var").exists()  # nothing created, not even the data directory
    assert run_triage(env, "migrate", "--check").returncode == 1


def test_config_file_finds_the_site_from_anywhere(
    tmp_path: Path, database_url: str, tiny_bundle: Path
) -> None:
    site = triage_env(tmp_path, database_url, tiny_bundle)
    assert run_triage(site, "migrate").returncode == 0
    config = tmp_path / "triage.env"
    config.write_text(
        "# the service's settings\n"
        f"TRIAGE_DATA_DIR={site['TRIAGE_DATA_DIR']}\n"
        f"TRIAGE_DATABASE_URL='{database_url}'\n"
        f'export TRIAGE_MODEL_PATH="{tiny_bundle}"\n'
    )
    bare = {k: v for k, v in site.items() if k not in ("TRIAGE_DATA_DIR", "TRIAGE_DATABASE_URL")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    made = subprocess.run(
        [sys.executable, "-m", "triage_api.cli", "--config", str(config), "users", "add", "--name", "x"]
        + ["--role", "uploader", "--clinic", "north"],
        env={**bare, "PYTHONPATH": str(ROOT)},
        cwd=elsewhere,  # another directory, without the site's ./var
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    assert list(elsewhere.iterdir()) == []
    # The key printed is one the site's database knows: revoking its prefix finds it.
    assert run_triage(site, "users", "revoke", made.stdout.strip().split("_")[1]).returncode == 0

    config.write_text("TRIAGE_DATA_DIR /nowhere\n")
    broken = run_triage(bare, "--config", str(config), "doctor")
    assert broken.returncode == 2 and "line 1: expected NAME=value" in broken.stderr


def test_migrate_check_reports_a_schema_behind(tmp_path: Path, database_url: str, tiny_bundle: Path) -> None:
    from alembic import command
    from alembic.config import Config

    from triage_api.db import MIGRATIONS, make_engine

    env = triage_env(tmp_path, database_url, tiny_bundle)
    (tmp_path / "var").mkdir()
    engine = make_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0008")
    engine.dispose()
    behind = run_triage(env, "migrate", "--check")
    assert behind.returncode == 1 and "is at 0008" in behind.stdout
    assert run_triage(env, "users", "revoke", "abc").returncode == 2  # refused on an old schema
    upgraded = run_triage(env, "migrate")
    assert upgraded.returncode == 0 and "0008 -> " in upgraded.stdout
    assert run_triage(env, "migrate", "--check").returncode == 0


def test_doctor_names_what_to_fix(tmp_path: Path, database_url: str, tiny_bundle: Path) -> None:
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    env = triage_env(tmp_path, database_url, bundle)
    missing = run_triage(env, "doctor")
    assert missing.returncode == 1 and "FAIL  data directory" in missing.stdout
    assert run_triage(env, "migrate").returncode == 0
    (tmp_path / "var").chmod(0o700)
    healthy = run_triage(env, "doctor")
    assert healthy.returncode == 0, healthy.stdout
    assert "OK    database" in healthy.stdout and "OK    model: tiny-test" in healthy.stdout
    assert "WARN  key placement" not in healthy.stdout  # the default key lives outside the data
    inside = {**env, "TRIAGE_AUDIT_KEY_FILE": str(tmp_path / "var" / "audit.key")}
    assert "WARN  key placement" in run_triage(inside, "doctor").stdout  # a key beside the data

    (tmp_path / "var").chmod(0o755)
    weights = bundle / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    (tmp_path / "typo.env").write_text("TRIAGE_DATA_DIRR=/x\n")
    sick = run_triage(env, "--config", str(tmp_path / "typo.env"), "doctor")
    assert sick.returncode == 1
    assert "FAIL  model" in sick.stdout and "WARN  data directory" in sick.stdout
    assert "chmod 700" in sick.stdout and "TRIAGE_DATA_DIRR" in sick.stdout
    invalid = run_triage({**env, "TRIAGE_PORT": "eighty"}, "doctor")
    assert invalid.returncode == 1 and "FAIL  settings: TRIAGE_PORT:" in invalid.stdout


def test_doctor_catches_a_clock_set_back(settings: Settings) -> None:
    """An audit event newer than "now" means this host's clock is behind (clock injected)."""
    from datetime import UTC, datetime, timedelta

    from audit.log import EventCode, record
    from triage_api.db import make_engine, make_sessionmaker, migrate, transaction
    from triage_api.site import doctor

    engine = make_engine(settings.sqlalchemy_url)
    migrate(engine)
    with transaction(make_sessionmaker(engine)) as session:
        record(session, actor="test", action="t", code=EventCode.QUERY, object_type="t", object_id="1")
    engine.dispose()
    now = datetime.now(UTC)
    assert [f.level for f in doctor(settings, now) if f.name == "clock"] == ["ok"]
    late = [f for f in doctor(settings, now - timedelta(hours=1)) if f.name == "clock"]
    assert late[0].level == "fail" and "NTP" in late[0].fix
