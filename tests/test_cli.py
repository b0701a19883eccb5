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

ROOT = Path(__file__).resolve().parents[1]


def triage_env(tmp_path: Path, database_url: str, bundle: Path, port: int = 0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(
        TRIAGE_DATA_DIR=str(tmp_path / "var"),
        TRIAGE_DATABASE_URL=database_url,
        TRIAGE_MODEL_PATH=str(bundle),
        TRIAGE_PORT=str(port),
        TRIAGE_POLL_SECONDS="0.05",
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


def read_until(process: subprocess.Popen[str], marker: str, timeout: float = 90) -> list[str]:
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
            assert worker.wait(timeout=30) == 0  # a clean stop: the loop ends, the engine closes
            stop(api)
