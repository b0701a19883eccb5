"""DICOMweb against a real HTTP server with the dicomweb-client package: STOW-RS through the
accept function, QIDO/WADO scoped to the caller's clinics and free of identifying attributes."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator

import pydicom
import pytest
import requests
import uvicorn
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient

from tests.conftest import DATA, MakeKey, bearer
from tests.test_dicom_listener import _bomb
from triage_api.app import create_app
from triage_api.settings import Settings


@pytest.fixture
def base_url(settings: Settings) -> Iterator[str]:
    """The app served by uvicorn on an ephemeral loopback port, stopped after the test."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def web(base_url: str, key: str) -> DICOMwebClient:
    return DICOMwebClient(url=f"{base_url}/dicom-web", headers=bearer(key))


def test_stow_qido_wado_round_trip(base_url: str, make_key: MakeKey) -> None:
    source = pydicom.dcmread(DATA / "cr_chest_pa_jpeg_baseline_siim.dcm")
    uploader = web(base_url, make_key("uploader", "north"))
    response = uploader.store_instances(datasets=[source])
    (stored,) = response.ReferencedSOPSequence
    assert stored.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "FailedSOPSequence" not in response

    reader = web(base_url, make_key("radiologist", "north"))
    (study,) = reader.search_for_studies()
    assert study["0020000D"]["Value"] == [source.StudyInstanceUID]
    assert "00100010" not in study and "00100020" not in study
    (series,) = reader.search_for_series(source.StudyInstanceUID)
    assert series["0020000E"]["Value"] == [source.SeriesInstanceUID]
    (instance,) = reader.search_for_instances(source.StudyInstanceUID, source.SeriesInstanceUID)
    assert instance["00080018"]["Value"] == [source.SOPInstanceUID]

    (metadata,) = reader.retrieve_series_metadata(source.StudyInstanceUID, source.SeriesInstanceUID)
    assert metadata["00280010"]["Value"] == [source.Rows]
    for identifying in ("00100010", "00100020", "00100030", "00080090", "00080080"):
        assert identifying not in metadata

    retrieved = reader.retrieve_instance(
        source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID
    )
    assert retrieved.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert retrieved.PixelData == source.PixelData  # as stored, not transcoded
    assert "PatientName" not in retrieved and "PatientID" not in retrieved

    (frame,) = reader.retrieve_instance_frames(
        source.StudyInstanceUID,
        source.SeriesInstanceUID,
        source.SOPInstanceUID,
        frame_numbers=[1],
        media_types=(("application/octet-stream", "*"),),
    )
    assert frame[:2] == b"\xff\xd8"  # the JPEG codestream as stored

    other = web(base_url, make_key("radiologist", "south"))
    assert other.search_for_studies() == []
    with pytest.raises(requests.HTTPError) as missing:
        other.retrieve_study_metadata(source.StudyInstanceUID)
    assert missing.value.response is not None and missing.value.response.status_code == 404


def _multipart(*parts: bytes) -> tuple[bytes, str]:
    body = b"".join(b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in parts)
    return body + b"--XyZ--\r\n", 'multipart/related; type="application/dicom"; boundary=XyZ'


def count_cases(client: TestClient, key: str) -> int:
    return len(client.get("/v1/worklist", headers=bearer(key)).json())


def test_stow_refuses_hostile_parts_with_reasons_and_stores_nothing_of_them(
    client: TestClient, make_key: MakeKey
) -> None:
    key = make_key("uploader", "north")
    reader = make_key("radiologist", "north")
    good = (DATA / "dx_thorax_dog_monochrome1.dcm").read_bytes()
    buffer = io.BytesIO()
    _bomb().save_as(buffer, enforce_file_format=True)
    bomb = buffer.getvalue()
    body, content_type = _multipart(good, good[:700], bomb)
    response = client.post(
        "/dicom-web/studies", content=body, headers={**bearer(key), "Content-Type": content_type}
    )
    assert response.status_code == 202
    assert response.headers["content-type"].startswith("application/dicom+json")
    result = response.json()
    assert len(result["00081199"]["Value"]) == 1
    reasons = [item["00081197"]["Value"][0] for item in result["00081198"]["Value"]]
    assert reasons == [0xC000, 0xA700]
    assert count_cases(client, reader) == 1

    body, content_type = _multipart(bomb)
    response = client.post(
        "/dicom-web/studies", content=body, headers={**bearer(key), "Content-Type": content_type}
    )
    assert response.status_code == 409
    assert count_cases(client, reader) == 1

    wrong = client.post(
        "/dicom-web/studies", content=good, headers={**bearer(key), "Content-Type": "application/dicom"}
    )
    assert wrong.status_code == 415
    assert set(wrong.json()["error"]) == {"code", "message"}
    no_parts = client.post(
        "/dicom-web/studies", content=b"nothing", headers={**bearer(key), "Content-Type": content_type}
    )
    assert no_parts.status_code == 422
    forbidden = client.post(
        "/dicom-web/studies", content=body, headers={**bearer(reader), "Content-Type": content_type}
    )
    assert forbidden.status_code == 403
    assert client.get("/dicom-web/studies", headers=bearer(key)).status_code == 403
    assert count_cases(client, reader) == 1
