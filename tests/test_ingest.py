"""Upload contract: accepted types, idempotency, and every refusal as a precise 4xx."""

from __future__ import annotations

import io
import re
import struct
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import func, select

from models.preprocess import age_band
from tests.conftest import DATA, MakeKey, bearer, runtime_of, shared_data, upload, wait_for
from triage_api.app import create_app
from triage_api.errors import InvalidStudy
from triage_api.ingest import validate
from triage_api.settings import Settings
from triage_api.tables import Case, Job


def count_cases(client: TestClient) -> int:
    with runtime_of(client).factory() as session:
        return session.execute(select(func.count()).select_from(Case)).scalar_one()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_dicom_upload_is_queued_then_scored(client: TestClient, make_key: MakeKey) -> None:
    key = make_key("uploader", "north")
    response = upload(client, key, (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes())
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "queued"
    case = wait_for(client, make_key("radiologist", "north"), body["id"])
    assert case["status"] == "scored"
    assert 0.0 <= case["risk"] <= 1.0
    assert case["model_version"] == "tiny-test@0.0.1"
    assert case["prediction"]["inference_ms"] > 0


def test_png_and_jpeg_uploads_are_scored(client: TestClient, make_key: MakeKey) -> None:
    key = make_key("uploader", "north")
    gradient = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (200, 1))
    for data, name in (
        (png_bytes(gradient), "x.png"),
        ((DATA / "cxr_normal.jpeg").read_bytes(), "x.jpeg"),
    ):
        response = upload(client, key, data, name)
        assert response.status_code == 201, response.text
        assert wait_for(client, key, response.json()["id"])["status"] == "scored"


def test_colour_picture_is_not_analyzed(client: TestClient, make_key: MakeKey) -> None:
    key = make_key("uploader", "north")
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    case_id = upload(client, key, png_bytes(colour), "c.png").json()["id"]
    case = wait_for(client, key, case_id)
    assert case["status"] == "not_analyzed"
    assert "colour" in case["reason"]
    assert case["tier"] == "routine"


def test_same_bytes_same_case_under_concurrent_retries(client: TestClient, make_key: MakeKey) -> None:
    key = make_key("uploader", "north")
    data = (DATA / "cr_chest_pa_monochrome1_siim.dcm").read_bytes()
    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(lambda _: upload(client, key, data), range(10)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(201) == 1 and codes.count(200) == 9, codes
    assert len({r.json()["id"] for r in responses}) == 1
    assert count_cases(client) == 1
    with runtime_of(client).factory() as session:
        assert session.execute(select(func.count()).select_from(Job)).scalar_one() == 1


def test_same_bytes_from_another_clinic_is_another_case(client: TestClient, make_key: MakeKey) -> None:
    data = (DATA / "dx_thorax_dog_monochrome1.dcm").read_bytes()
    first = upload(client, make_key("uploader", "north"), data).json()["id"]
    second = upload(client, make_key("uploader", "south"), data).json()["id"]
    assert first != second


def test_oversized_body_is_413_and_stores_nothing(client: TestClient, make_key: MakeKey) -> None:
    key = make_key("uploader", "north")
    limit = runtime_of(client).settings.max_upload_bytes
    response = upload(client, key, b"\0" * (limit + 200_000))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert count_cases(client) == 0


def test_lying_content_length_is_413(client: TestClient, make_key: MakeKey) -> None:
    key = make_key("uploader", "north")
    limit = runtime_of(client).settings.max_upload_bytes
    chunks = (b"x" * 1_000_000 for _ in range(limit // 1_000_000 + 2))
    response = client.post(
        "/v1/studies",
        content=chunks,
        headers={**bearer(key), "Content-Type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 413
    assert count_cases(client) == 0


@pytest.mark.parametrize(
    "data",
    [b"GIF89a" + b"\0" * 200, b"%PDF-1.4" + b"\0" * 200, b"", b"\0" * 128 + b"DICX" + b"\0" * 64],
    ids=["gif", "pdf", "empty", "no-dicm"],
)
def test_wrong_type_is_415(client: TestClient, make_key: MakeKey, data: bytes) -> None:
    response = upload(client, make_key("uploader", "north"), data)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert count_cases(client) == 0


def dicom_header_declaring(rows: int, columns: int) -> bytes:
    """A small Part-10 file whose header declares ``rows`` x ``columns`` 16-bit pixels."""

    def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    ts = b"1.2.840.10008.1.2.1\0"
    meta_body = element(0x0002, 0x0001, b"OB", b"\0\1") + element(0x0002, 0x0010, b"UI", ts)
    meta = element(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta_body))) + meta_body
    body = (
        element(0x0008, 0x0060, b"CS", b"CR")
        + element(0x0028, 0x0002, b"US", struct.pack("<H", 1))
        + element(0x0028, 0x0010, b"US", struct.pack("<H", rows))
        + element(0x0028, 0x0011, b"US", struct.pack("<H", columns))
        + element(0x0028, 0x0100, b"US", struct.pack("<H", 16))
        + element(0x7FE0, 0x0010, b"OW", b"\0" * 16)
    )
    return b"\0" * 128 + b"DICM" + meta + body


def test_pixel_bomb_header_is_422_without_allocating(client: TestClient, make_key: MakeKey) -> None:
    data = dicom_header_declaring(65535, 65535)
    assert len(data) < 1024
    response = upload(client, make_key("uploader", "north"), data)
    assert response.status_code == 422
    assert "over the limit" in response.json()["error"]["message"]
    assert count_cases(client) == 0


def test_pixel_bomb_is_refused_from_the_header_alone() -> None:
    """Validation of a 65535 x 65535 declaration allocates nothing near its 8 GiB."""
    data = dicom_header_declaring(65535, 65535)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidStudy):
            validate(data, Settings())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024 * 1024


def test_png_bomb_is_422(client: TestClient, make_key: MakeKey) -> None:
    # A 1-bit 40000 x 40000 PNG compresses to a few hundred KB but decodes to 1.6 GB.
    buffer = io.BytesIO()
    Image.new("1", (40000, 40000)).save(buffer, format="PNG")
    response = upload(client, make_key("uploader", "north"), buffer.getvalue(), "bomb.png")
    assert response.status_code == 422
    assert count_cases(client) == 0


@pytest.mark.parametrize(
    "name", ["rtplan.dcm", "MR_truncated.dcm", "ExplVR_BigEndNoMeta.dcm", "badVR.dcm", "UN_sequence.dcm"]
)
def test_broken_pydicom_files_never_500(client: TestClient, make_key: MakeKey, name: str) -> None:
    key = make_key("uploader", "north")
    path = get_testdata_file(name, download=False)
    assert path is not None
    data = Path(path).read_bytes()
    response = upload(client, key, data)
    assert response.status_code in (201, 415, 422), response.text
    if response.status_code == 201:
        assert wait_for(client, key, response.json()["id"])["status"] in ("failed", "not_analyzed")
    else:
        assert set(response.json()["error"]) == {"code", "message"}


def test_truncated_dicom_mutations_never_500(client: TestClient, make_key: MakeKey) -> None:
    key = make_key("uploader", "north")
    data = (DATA / "dx_thorax_dog_monochrome1.dcm").read_bytes()
    rng = np.random.default_rng(7)
    for cut in sorted(set(rng.integers(132, len(data), 40).tolist())):
        response = upload(client, key, data[:cut])
        assert response.status_code in (200, 201, 422), (cut, response.status_code)
    for _ in range(40):
        mutated = bytearray(data)
        for position in rng.integers(132, 2000, 8):
            mutated[position] = int(rng.integers(0, 256))
        response = upload(client, key, bytes(mutated))
        assert response.status_code in (200, 201, 422), response.status_code


def test_missing_file_field_is_422_json(client: TestClient, make_key: MakeKey) -> None:
    response = client.post("/v1/studies", data={"other": "x"}, headers=bearer(make_key("uploader", "north")))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    "folder,statuses",
    [
        ("chest", {"scored"}),
        ("other-bodypart", {"not_analyzed"}),
        ("non-radiograph", {"not_analyzed"}),
        ("malformed", {"failed"}),
    ],
)
def test_shared_dicom_corpus(client: TestClient, make_key: MakeKey, folder: str, statuses: set[str]) -> None:
    directory = shared_data("dicom", folder)
    key = make_key("uploader", "north")
    for path in sorted(directory.glob("*.dcm")):
        response = upload(client, key, path.read_bytes())
        assert response.status_code in (201, 422), (path.name, response.text)
        if response.status_code == 201:
            case = wait_for(client, key, response.json()["id"], timeout=120)
            assert case["status"] in statuses, (path.name, case)
            if case["status"] != "scored":
                assert case["reason"], path.name
                assert case["tier"] == "routine"
        else:
            assert folder == "malformed", path.name


def test_deflated_transfer_syntax_is_refused_before_inflating(client: TestClient, make_key: MakeKey) -> None:
    ds = pydicom.dcmread(DATA / "dx_thorax_dog_monochrome1.dcm")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    response = upload(client, make_key("uploader", "north"), buffer.getvalue())
    assert response.status_code == 422
    assert "Deflated" in response.json()["error"]["message"]
    assert count_cases(client) == 0


def test_one_clinics_burst_is_rate_limited_and_others_are_not(settings: Settings, make_key: MakeKey) -> None:
    limited = settings.model_copy(update={"upload_burst": 3, "uploads_per_minute": 1, "run_worker": False})
    with TestClient(create_app(limited)) as client:
        north, south = make_key("uploader", "north"), make_key("uploader", "south")
        codes = [
            upload(client, north, png_bytes(np.full((8, 8), n, np.uint8)), "p.png").status_code
            for n in range(5)
        ]
        assert codes == [201, 201, 201, 429, 429]
        refused = upload(client, north, png_bytes(np.full((8, 8), 99, np.uint8)), "p.png")
        assert refused.json()["error"]["code"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
        assert upload(client, south, png_bytes(np.full((8, 8), 1, np.uint8)), "p.png").status_code == 201
        assert count_cases(client) == 4


@pytest.mark.parametrize(
    ("age", "born", "seen", "band"),
    [
        ("004Y", None, None, "1–5 y"),
        ("011M", None, None, "<1 y"),
        ("012M", None, None, "1–5 y"),
        ("006Y", None, None, "6–17 y"),
        ("017Y", None, None, "6–17 y"),
        ("018Y", None, None, "18–64 y"),
        ("089Y", None, None, "65–89 y"),
        ("090Y", None, None, "90+ y"),
        ("003W", None, None, "<1 y"),
        ("62", None, "19010101", "18–64 y"),  # a bare number: years
        (None, "20200301", "20240229", "1–5 y"),
        (None, "20200301", "20260228", "1–5 y"),  # the day before the sixth birthday
        (None, "20200301", "20260301", "6–17 y"),
        ("4 years", "20200301", "20240229", "1–5 y"),  # malformed age: the dates decide
        (None, "2020-03-01", "20240229", None),
        (None, "20240301", "20200301", None),  # born after the study
        (None, None, "20240229", None),
    ],
)
def test_age_band_is_coarse_and_never_refuses(
    age: str | None, born: str | None, seen: str | None, band: str | None
) -> None:
    assert age_band(age, born, seen) == band


def test_view_and_age_band_are_kept_but_not_the_age(client: TestClient, make_key: MakeKey) -> None:
    ds = pydicom.dcmread(DATA / "cr_chest_pa_monochrome1_siim.dcm")
    ds.PatientAge, ds.PatientBirthDate, ds.StudyDate, ds.ViewPosition = "004Y", "20190613", "20230701", "PA"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    key = make_key("uploader", "north")
    case_id = upload(client, key, out.getvalue()).json()["id"]
    reader = make_key("radiologist", "north")  # the clinic's own view shows no study details
    body = client.get(f"/v1/studies/{case_id}", headers=bearer(reader)).json()
    assert body["view_position"] == "PA" and body["age_band"] == "1–5 y"
    with runtime_of(client).factory() as session:
        row = session.get_one(Case, case_id)
        values = [str(getattr(row, column.key)) for column in Case.__table__.columns]
    # The random hex digests (id, sha256, pseudonym) may hold "2019" by chance: look for the
    # birth year only in the other columns.
    readable = " ".join(v for v in values if not re.fullmatch(r"[0-9a-f]{32,64}", v))
    assert "004Y" not in " ".join(values) and "20190613" not in " ".join(values)
    assert "2019" not in readable
