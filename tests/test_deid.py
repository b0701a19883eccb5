"""De-identified export: planted identifiers everywhere, a scanner finds none, dciodvfy is clean."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from datetime import date
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from sqlalchemy import select

from audit.log import AuditEvent
from tests.conftest import DATA, MakeKey, bearer, claim_and_override, shared_data, upload, wait_for
from triage_api import cli
from triage_api.deid import Pseudonyms, deidentify
from triage_api.settings import Settings

STUDY_UID = "1.2.826.0.1.3680043.99.1001"
SERIES_UID = "1.2.826.0.1.3680043.99.1002"
SOP_UID = "1.2.826.0.1.3680043.99.1003"
SOURCE_UID = "1.2.826.0.1.3680043.99.1004"
FRAME_UID = "1.2.826.0.1.3680043.99.1005"

PLANTED = (
    "Zebulon^Canaryfield",
    "CANARY-PID-98765",
    "19990909",
    "Otto^Canaryother",
    "CANARY-OTHER-PID",
    "CANARYACC4321",
    "CANARYSTUDY7",
    "Canary General Hospital",
    "1 Canary Road",
    "Dr^Canaryref",
    "Canary^Operator",
    "CANARYSTATION",
    "CANARY-SERIAL-1",
    "Canary chest study",
    "CANARY-FREE-TEXT",
    "CANARY-PRIVATE-VALUE",
    "CANARY CREATOR",
    "Canary^Nested",
    "CANARY-NESTED-TEXT",
    "CANARY-OVERLAY",
    "20210305",
    "20210306",
    STUDY_UID,
    SERIES_UID,
    SOP_UID,
    SOURCE_UID,
    FRAME_UID,
)


def planted(*, burned_in: str | None = "NO", patient: str = "CANARY-PID-98765") -> bytes:
    """A real chest CR with identifiers planted in every place Annex E has to clean."""
    ds = pydicom.dcmread(DATA / "cr_chest_pa_jpeg_baseline_siim.dcm")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Zebulon^Canaryfield", patient, "19990909"
    ds.OtherPatientNames = "Otto^Canaryother"
    other = Dataset()
    other.PatientID = "CANARY-OTHER-PID"
    ds.OtherPatientIDsSequence = [other]
    ds.AccessionNumber, ds.StudyID = "CANARYACC4321", "CANARYSTUDY7"
    ds.InstitutionName, ds.InstitutionAddress = "Canary General Hospital", "1 Canary Road"
    ds.ReferringPhysicianName, ds.OperatorsName = "Dr^Canaryref", "Canary^Operator"
    ds.StationName, ds.DeviceSerialNumber = "CANARYSTATION", "CANARY-SERIAL-1"
    ds.StudyDescription, ds.ImageComments = "Canary chest study", "called back: CANARY-FREE-TEXT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = STUDY_UID, SERIES_UID, SOP_UID
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(SOP_UID)
    ds.FrameOfReferenceUID = FRAME_UID
    ds.StudyDate, ds.ContentDate, ds.SeriesDate = "20210305", "20210306", "20210305"
    ds.AcquisitionDateTime = "20210305101010"
    ds.private_block(0x0009, "CANARY CREATOR", create=True).add_new(0x01, "LO", "CANARY-PRIVATE-VALUE")
    # nested: a source image whose item holds a code sequence whose item holds a name
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        "121320",
        "DCM",
        "Uncompressed predecessor",
    )
    code.ContentCreatorName = "Canary^Nested"
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = ds.SOPClassUID, SOURCE_UID
    source.PurposeOfReferenceCodeSequence = [code]
    source.ImageComments = "CANARY-NESTED-TEXT"
    ds.SourceImageSequence = [source]
    ds.add_new(0x60000022, "LO", "CANARY-OVERLAY")
    if "PatientAge" in ds:
        del ds.PatientAge
    ds.PatientAge = "062Y"
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    elif "BurnedInAnnotation" in ds:
        del ds.BurnedInAnnotation
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_the_action_table_leaves_no_planted_identifier() -> None:
    pseudonyms = Pseudonyms.of_site(b"s" * 32)
    ds = deidentify(planted(), pseudonyms)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    for value in PLANTED:
        assert value.encode() not in data, value
    assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107", "113108"]
    assert (ds.PatientSex, ds.PatientAge) == (
        pydicom.dcmread(DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").PatientSex,
        "062Y",
    )
    assert not any(element.tag.is_private for element in ds.iterall())
    assert "PatientName" in ds and not ds.PatientName and not ds.PatientBirthDate  # type 2: present, empty
    assert "OtherPatientIDsSequence" not in ds and "InstitutionName" not in ds
    assert (
        ds.StudyInstanceUID.startswith("2.25.")
        and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    )
    # nested UIDs replaced consistently, DICOM's own UIDs kept, codes kept
    [source] = ds.SourceImageSequence
    assert source.ReferencedSOPInstanceUID == pseudonyms.uid(SOURCE_UID)
    assert source.ReferencedSOPClassUID == ds.SOPClassUID
    assert source.PurposeOfReferenceCodeSequence[0].CodeValue == "121320"
    # dates moved by the same whole number of days (intervals kept), back in time
    study, content = (date.fromisoformat(v) for v in (ds.StudyDate, ds.ContentDate))
    assert (content - study).days == 1 and study < date(2021, 3, 5)
    assert ds.AcquisitionDateTime == ds.StudyDate + "101010"
    # same patient, same shift; another patient, another shift (with overwhelming probability)
    again = deidentify(planted(), pseudonyms)
    other = deidentify(planted(patient="SOMEONE-ELSE"), pseudonyms)
    assert again.StudyDate == ds.StudyDate and other.StudyDate != ds.StudyDate
    assert (again.SOPInstanceUID, again.PatientID) == (ds.SOPInstanceUID, ds.PatientID)
    assert deidentify(planted(), Pseudonyms.of_site(b"t" * 32)).StudyInstanceUID != ds.StudyInstanceUID


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dciodvfy (apt-get install dicom3tools)")
def test_dciodvfy_finds_no_error(tmp_path: Path) -> None:
    path = tmp_path / "out.dcm"
    deidentify(planted(), Pseudonyms.of_site(b"s" * 32)).save_as(path, enforce_file_format=True)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def _errors(path: Path) -> set[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return {line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dciodvfy (apt-get install dicom3tools)")
def test_real_chest_radiographs_gain_no_dciodvfy_error(tmp_path: Path) -> None:
    """Every transfer syntax of the shared chest set: no error the original did not have."""
    for source in sorted(shared_data("dicom", "chest").glob("*.dcm")):
        ds = pydicom.dcmread(source)
        ds.BurnedInAnnotation = "NO"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out = tmp_path / source.name
        deidentify(buffer.getvalue(), Pseudonyms.of_site(b"s" * 32)).save_as(out, enforce_file_format=True)
        assert _errors(out) <= _errors(source), source.name
        assert pydicom.dcmread(out).PatientIdentityRemoved == "YES"


def test_export_dicom_writes_deidentified_studies_and_reads_twice_alike(
    client: TestClient,
    settings: Settings,
    make_key: MakeKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uploader, reader = make_key("uploader", "north"), make_key("radiologist", "north")
    make_key("uploader", "south")
    case_id = upload(client, uploader, planted()).json()["id"]
    refused_id = upload(client, uploader, planted(burned_in=None, patient="P2")).json()["id"]
    wait_for(client, reader, case_id)
    claim_and_override(client, bearer(reader), case_id)
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TRIAGE_DATABASE_URL", settings.sqlalchemy_url)
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        assert cli.main(["export-dicom", "--clinic", "north", "--out", str(out), "--deidentify"]) == 0
    printed = capsys.readouterr().out
    assert f"refused case {refused_id}: BurnedInAnnotation is not NO" in printed
    assert "1 de-identified studies written" in printed

    files = sorted(p.name for p in first.glob("*.dcm"))
    assert len(files) == 1 and files == sorted(p.name for p in second.glob("*.dcm"))
    one, two = (pydicom.dcmread(d / files[0]) for d in (first, second))
    assert (one.StudyInstanceUID, one.SeriesInstanceUID, one.SOPInstanceUID) == (
        two.StudyInstanceUID,
        two.SeriesInstanceUID,
        two.SOPInstanceUID,
    )
    for path in [*first.iterdir(), *second.iterdir()]:
        data = path.read_bytes()
        for value in PLANTED:
            assert value.encode() not in data, (path.name, value)
    [row] = list(csv.DictReader(io.StringIO((first / "reads.csv").read_text())))
    assert row["file"] == files[0] and row["study_uid"] == one.StudyInstanceUID
    assert (row["finding"], row["ai_score_shown"], row["agrees_with_ai"]) == ("normal", "True", "False")
    assert row["ai_model"] == "tiny-test@0.0.1" and float(row["ai_risk"]) >= 0
    assert case_id not in (first / "reads.csv").read_text()

    assert cli.main(["export-dicom", "--clinic", "north", "--out", str(tmp_path / "x")]) == 2
    assert (
        cli.main(["export-dicom", "--clinic", "nowhere", "--out", str(tmp_path / "x"), "--deidentify"]) == 2
    )
    with client.app.state.runtime.factory() as session:  # type: ignore[attr-defined]
        events = [e for e in session.scalars(select(AuditEvent)) if e.action == "dicom.export"]
    assert len(events) == 2 and all(e.event_code == "110106" for e in events)
    details = json.loads(events[0].details)
    assert (details["written"], details["refused"]) == (1, 1)
