"""AI results as DICOM SR: valid for dciodvfy and dsrdump on real sources, queued in the
scoring transaction only when the clinic has a PACS, retried when the PACS is unreachable."""

from __future__ import annotations

import json
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.conftest import DATA, MakeKey, upload, wait_for
from triage_api import outbox
from triage_api.db import transaction
from triage_api.dicom import sr
from triage_api.dicom.peers import set_pacs
from triage_api.errors import InvalidRequest
from triage_api.ingest import read_dicom_header
from triage_api.tables import OutboxItem
from triage_api.vocab import Tier

# pynetdicom leaves its socket unclosed when a connection is refused (a ResourceWarning).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

RESULT = sr.Result(
    case_id="c" * 32,
    attempt=1,
    sha256="0" * 64,
    risk=0.8312,
    tier=Tier.ELEVATED,
    finding_present=True,
    label="pneumonia",
    model_name="cxr-pneumonia-lite0",
    model_version="1.0.0",
    weights_sha256="a" * 64,
)


@pytest.mark.parametrize(
    "name",
    [
        "cr_chest_pa_jpeg_baseline_siim.dcm",
        "cr_chest_pa_monochrome1_siim.dcm",
        "dx_thorax_dog_monochrome1.dcm",
    ],
)
def test_sr_passes_dciodvfy_and_reads_as_tid_1500(name: str, tmp_path: Path) -> None:
    source = read_dicom_header((DATA / name).read_bytes())
    report = sr.build_sr(source, RESULT, device_name="TRIAGE")
    path = tmp_path / "sr.dcm"
    report.save_as(path, enforce_file_format=True)
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert "Error" not in check.stdout + check.stderr, check.stderr[-1000:]
    dump = subprocess.run(
        ["dsrdump", "+Pt", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert dump.returncode == 0
    for expected in (
        "TID 1500",
        "PRELIMINARY",
        "UNVERIFIED",
        '"Probability")="0.8312" (1,UCUM',
        '(52101004,SCT,"Present")',
        '"Elevated"',
        "cxr-pneumonia-lite0",
    ):
        assert expected in dump.stdout, expected
    again = sr.build_sr(source, RESULT, device_name="TRIAGE")
    assert again.SOPInstanceUID == report.SOPInstanceUID  # a resend replaces, never duplicates
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert report.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == source.StudyInstanceUID


def _outbox(client: TestClient) -> list[OutboxItem]:
    with transaction(client.app.state.runtime.factory) as session:  # type: ignore[attr-defined]
        return list(session.execute(select(OutboxItem)).scalars())


def test_sr_is_queued_with_the_score_only_for_dicom_cases_of_clinics_with_a_pacs(
    client: TestClient, make_key: MakeKey
) -> None:
    north, south = make_key("uploader", "north"), make_key("uploader", "south")
    reader = make_key("radiologist", "north", "south")
    with transaction(client.app.state.runtime.factory) as session:  # type: ignore[attr-defined]
        set_pacs(session, clinic="north", ae="PACS", host="127.0.0.1", port=104, now=datetime.now(UTC))
        with pytest.raises(InvalidRequest):
            set_pacs(session, clinic="north", ae="PACS", host="127.0.0.1", port=70000, now=datetime.now(UTC))
    dicom = (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes()
    queued = upload(client, north, dicom).json()["id"]
    picture = upload(client, north, (DATA / "cxr_normal.jpeg").read_bytes(), "x.jpeg").json()["id"]
    elsewhere = upload(client, south, dicom).json()["id"]
    for case_id in (queued, picture, elsewhere):
        assert wait_for(client, reader, case_id)["status"] == "scored"
    (item,) = _outbox(client)
    assert (item.kind, item.case_id, item.target) == (sr.KIND, queued, "PACS@127.0.0.1:104")
    payload = json.loads(item.payload)
    assert set(payload) == {
        "case_id",
        "attempt",
        "sha256",
        "risk",
        "tier",
        "finding_present",
        "label",
        "model",
        "pacs",
    }
    assert pydicom.dcmread(DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").PatientID not in item.payload


def test_unreachable_pacs_is_a_retryable_failure() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    source = read_dicom_header((DATA / "dx_thorax_dog_monochrome1.dcm").read_bytes())
    with pytest.raises(outbox.DeliveryFailed) as failed:
        sr.store(
            sr.build_sr(source, RESULT, device_name="TRIAGE"),
            calling="TRIAGE",
            ae_title="PACS",
            host="127.0.0.1",
            port=port,
            timeout=5,
        )
    assert not failed.value.permanent
