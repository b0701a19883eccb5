"""PHI canaries: planted identities never reach logs, errors or another clinic."""

from __future__ import annotations

import io
import logging

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from audit.log import AuditEvent
from tests.conftest import DATA, MakeKey, bearer, runtime_of, upload, wait_for
from triage_api.tables import Case

CANARIES = ("Zebulon^Canaryfield", "CANARY-PID-98765", "CANARY-ACC-4321", "19990909", "CANARY-DESC Zebulon")


def with_canaries(path: str, *, drop_rows: bool = False, break_pixels: bool = False) -> bytes:
    ds = pydicom.dcmread(DATA / path)
    ds.PatientName = CANARIES[0]
    ds.PatientID = CANARIES[1]
    ds.AccessionNumber = CANARIES[2]
    ds.PatientBirthDate = CANARIES[3]
    ds.InstitutionName = CANARIES[0]
    ds.StudyDescription = CANARIES[4]  # kept for the case's readers' pages only (migration 0015)
    if drop_rows:
        del ds.Rows
    if break_pixels:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_canaries_appear_in_no_log_and_no_response(
    client: TestClient, make_key: MakeKey, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    north, south = make_key("uploader", "north"), make_key("uploader", "south")
    north_reader = make_key("radiologist", "north")
    responses = []
    good = upload(client, north, with_canaries("cr_chest_pa_jpeg_baseline_siim.dcm"))
    broken = upload(client, north, with_canaries("dx_thorax_dog_monochrome1.dcm", break_pixels=True))
    refused = upload(client, north, with_canaries("dx_thorax_dog_monochrome1.dcm", drop_rows=True))
    responses += [good, broken, refused]
    assert good.status_code == 201 and refused.status_code == 422
    for response in (good, broken):
        case_id = response.json()["id"]
        wait_for(client, north_reader, case_id)
        responses.append(client.get(f"/v1/studies/{case_id}", headers=bearer(north_reader)))
        responses.append(client.get(f"/v1/studies/{case_id}", headers=bearer(south)))
    responses.append(client.get("/v1/worklist", headers=bearer(north_reader)))
    responses.append(client.get("/v1/worklist", headers=bearer(south)))

    out, err = capfd.readouterr()
    texts = [r.text for r in responses] + [r.getMessage() for r in caplog.records] + [out, err]
    with runtime_of(client).factory() as session:
        texts += [e.details for e in session.execute(select(AuditEvent)).scalars()]
        cases = list(session.execute(select(Case)).scalars())
        texts += [c.reason or "" for c in cases]
    for canary in CANARIES:
        for text in texts:
            assert canary not in text
    # The study description is stored (its readers' pages show it), and went nowhere else.
    assert CANARIES[4] in {c.study_description for c in cases}
    # What is stored: a keyed pseudonym of the patient ID, never the ID itself.
    stored = {c.patient_pseudonym for c in cases}
    assert len(stored) == 1 and CANARIES[1] not in (stored.pop() or "")
