"""Orthanc as the hospital PACS: it C-STOREs a study to our SCP, we score it, and our SR
(through the outbox) lands in Orthanc, where its QIDO finds it in the image's study.

Orthanc binds 0.0.0.0, so the scenario runs in a private network namespace: the outer test
re-runs this module under ``unshare --net --fork`` (root, as in CI) with only ``lo`` up.
Inside, the database is SQLite (a PostgreSQL server outside the namespace is unreachable).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from fastapi.testclient import TestClient
from sqlalchemy import select

from audit.log import AuditEvent
from tests import orthanc_pacs
from tests.conftest import DATA, MakeKey, bearer, wait_for
from triage_api import cli
from triage_api.app import create_app
from triage_api.db import transaction
from triage_api.dicom import sr
from triage_api.settings import Settings
from triage_api.tables import OutboxItem

SCP_PORT = 11112


def test_orthanc_round_trip_in_a_private_network() -> None:
    if orthanc_pacs.private_network():
        pytest.skip("inside the namespace the scenario test below runs instead")
    if shutil.which("unshare") is None or shutil.which("Orthanc") is None:
        pytest.skip("needs unshare and Orthanc (Debian packages)")
    env = {k: v for k, v in os.environ.items() if k != "TRIAGE_TEST_DATABASE_URL"}
    command = (
        f"ip link set lo up && exec {sys.executable} -m pytest -q -p no:cacheprovider "
        f"{Path(__file__)}::test_scenario"
    )
    probe = subprocess.run(
        ["unshare", "--net", "--fork", "true"], capture_output=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        pytest.skip("unshare --net is not permitted here (needs root)")
    run = subprocess.run(
        ["unshare", "--net", "--fork", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
        cwd=Path(__file__).parents[1],
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout


def test_scenario(
    settings: Settings, make_key: MakeKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not orthanc_pacs.private_network():
        pytest.skip("runs only inside the private network namespace (see the test above)")
    settings = settings.model_copy(update={"dicom_port": SCP_PORT, "outbox_poll_seconds": 0.2})
    uploader = make_key("uploader", "north")
    reader = make_key("radiologist", "north")
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TRIAGE_DATABASE_URL", settings.sqlalchemy_url)
    assert (
        cli.main(
            ["dicom", "peers", "add", "--clinic", "north", "--ae-title", "ORTHANC", "--host", "127.0.0.1"]
        )
        == 0
    )
    assert (
        cli.main(
            ["dicom", "pacs", "set", "--clinic", "north", "--ae-title", "ORTHANC"]
            + ["--host", "127.0.0.1", "--port", str(orthanc_pacs.DICOM_PORT)]
        )
        == 0
    )
    assert cli.main(["dicom", "peers", "add", "--clinic", "nowhere", "--ae-title", "X"]) == 2
    del uploader

    source = DATA / "cr_chest_pa_jpeg_baseline_siim.dcm"
    import pydicom

    study_uid = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
    with (
        TestClient(create_app(settings)) as client,
        orthanc_pacs.orthanc(tmp_path / "pacs", triage_port=SCP_PORT) as root,
    ):
        stored = orthanc_pacs.upload(root, source.read_bytes())
        orthanc_pacs.send_to_triage(root, stored["ParentStudy"])
        worklist = client.get("/v1/worklist", headers=bearer(reader)).json()
        assert len(worklist) == 1
        case = wait_for(client, reader, worklist[0]["id"])
        assert case["status"] == "scored", case

        deadline = time.monotonic() + 60
        found: list[dict[str, object]] = []
        while time.monotonic() < deadline and not found:
            found = orthanc_pacs.sr_instances(root, study_uid)
            time.sleep(0.2)
        assert len(found) == 1, "the SR did not reach Orthanc"

        # The SR as Orthanc holds it passes dsrdump and dciodvfy.
        (orthanc_id,) = requests.post(
            f"{root}/tools/find", json={"Level": "Instance", "Query": {"Modality": "SR"}}, timeout=30
        ).json()
        sr_file = tmp_path / "sr.dcm"
        sr_file.write_bytes(requests.get(f"{root}/instances/{orthanc_id}/file", timeout=30).content)

    dump = subprocess.run(
        ["dsrdump", "+Pt", str(sr_file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert dump.returncode == 0 and "TID 1500" in dump.stdout and "Probability" in dump.stdout
    check = subprocess.run(
        ["dciodvfy", str(sr_file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert "Error" not in check.stdout + check.stderr
    with transaction(client.app.state.runtime.factory) as session:  # type: ignore[attr-defined]
        (item,) = session.execute(select(OutboxItem)).scalars()
        assert (item.kind, item.status, item.attempts) == (sr.KIND, "delivered", 1)
        exports = session.execute(select(AuditEvent).where(AuditEvent.event_code == "110106")).scalars().all()
        assert [e.action for e in exports] == ["outbox.delivered"]
