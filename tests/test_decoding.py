"""Decoding at the resolution the model needs, bounded by what each codestream says it holds.

The hostile files are built here from real codestreams (OpenJPEG and Pillow encode them):
only their DICOM header, or the size in their own SIZ/SOF marker, lies.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from openjpeg.utils import encode_array
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from models import jpeg2000, preprocess
from models.preprocess import (
    DecodeError,
    Preprocessing,
    codestream,
    decode_dicom,
    decode_gray,
    open_picture,
    to_input,
)
from tests.conftest import shared_data
from triage_api import imaging
from triage_api.blobs import blob_path
from triage_api.decoding import DecodeTask, Gate, decode_study
from triage_api.errors import InvalidStudy
from triage_api.imaging import case_pixels, case_png
from triage_api.ingest import DICOM
from triage_api.settings import Settings
from triage_api.tables import Case

GATE = Gate(Preprocessing(input_size=32), ("CR",), ("CHEST",))


def radiograph(rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """A smooth 12-bit picture with some texture (a J2K or JPEG of it is a real codestream)."""
    y, x = np.mgrid[0:rows, 0:columns]
    rng = np.random.default_rng(seed)
    values = 2000 + 1500 * np.sin(x / 37.0) * np.cos(y / 23.0) + rng.normal(0, 40, (rows, columns))
    picture: np.ndarray = np.clip(values, 0, 4095).astype(np.uint16)
    return picture


def dicom(
    pixel_data: bytes,
    syntax: str,
    rows: int,
    columns: int,
    *,
    bits: int = 16,
    stored: int = 12,
    modality: str = "CR",
) -> bytes:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.1")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = modality, "CHEST"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, 0
    ds.PixelData = pixel_data
    if pydicom.uid.UID(syntax).is_compressed:
        ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def j2k_dicom(pixels: np.ndarray, rows: int | None = None, columns: int | None = None) -> bytes:
    stream = encode_array(pixels, bits_stored=12)
    return dicom(encapsulate([stream]), JPEG2000Lossless, rows or pixels.shape[0], columns or pixels.shape[1])


def jpeg_frame(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="JPEG", quality=92)
    return out.getvalue()


def with_size(frame: bytes, marker: bytes, rows: int, columns: int) -> bytes:
    """``frame`` whose own SIZ (J2K) or SOF (JPEG) marker claims ``rows`` x ``columns``."""
    at = frame.index(marker)
    data = bytearray(frame)
    if marker == b"\xff\x51":  # Xsiz, Ysiz after Lsiz, Rsiz
        struct.pack_into(">II", data, at + 6, columns, rows)
    else:  # SOFn: length, precision, then Y, X
        struct.pack_into(">HH", data, at + 5, rows, columns)
    return bytes(data)


# --- the codestream's own size is what is bounded ---------------------------------------------


def test_a_header_that_understates_a_j2k_frame_is_refused_before_decoding() -> None:
    """Row 4 of the security review: the header says 1024x1024, the frame 20000x20000."""
    frame = with_size(encode_array(radiograph(64, 64), bits_stored=12), b"\xff\x51", 20000, 20000)
    data = dicom(encapsulate([frame]), JPEG2000Lossless, 1024, 1024)
    assert codestream(JPEG2000Lossless, frame).rows == 20000
    for min_side in (0, 224):
        with pytest.raises(
            DecodeError, match="compressed frame is 20000x20000x1, the header declares 1024x1024x1"
        ):
            decode_dicom(data, min_side=min_side)


def test_a_header_that_understates_a_jpeg_frame_is_refused() -> None:
    frame = with_size(jpeg_frame(np.full((48, 64), 128, np.uint8)), b"\xff\xc0", 20000, 20000)
    data = dicom(encapsulate([frame]), JPEGBaseline8Bit, 48, 64, bits=8, stored=8)
    with pytest.raises(DecodeError, match="compressed frame is 20000x20000x1, the header declares 64x48x1"):
        decode_dicom(data, min_side=16)


def test_a_true_frame_over_the_budget_is_refused_before_decoding(tmp_path: Path) -> None:
    pixels = radiograph(300, 200)
    data = j2k_dicom(pixels)
    assert decode_dicom(data, max_bytes=300 * 200 * 2)[1].shape == (300, 200)
    with pytest.raises(DecodeError, match="over the limit of 119999"):
        decode_dicom(data, max_bytes=300 * 200 * 2 - 1)
    path = tmp_path / "study.dcm"
    path.write_bytes(data)
    refused = decode_study(DecodeTask(str(path), True, GATE, max_decoded_bytes=1000))
    assert refused.status == "failed" and refused.reason is not None and "over the limit" in refused.reason


def test_the_worker_reports_the_mismatch_as_a_failure_not_a_crash(tmp_path: Path) -> None:
    frame = with_size(encode_array(radiograph(64, 64), bits_stored=12), b"\xff\x51", 20000, 20000)
    path = tmp_path / "lying.dcm"
    path.write_bytes(dicom(encapsulate([frame]), JPEG2000Lossless, 1024, 1024))
    decoded = decode_study(DecodeTask(str(path), True, GATE))
    assert decoded.status == "failed" and decoded.pixels is None
    assert decoded.reason == "the compressed frame is 20000x20000x1, the header declares 1024x1024x1"


def test_a_jpeg_without_its_height_or_a_j2k_without_siz_is_refused() -> None:
    frame = with_size(jpeg_frame(np.full((16, 16), 9, np.uint8)), b"\xff\xc0", 0, 16)  # height in DNL
    with pytest.raises(DecodeError, match="without its height"):
        decode_dicom(dicom(encapsulate([frame]), JPEGBaseline8Bit, 16, 16, bits=8, stored=8))
    with pytest.raises(DecodeError, match="without a SIZ marker"):
        decode_dicom(dicom(encapsulate([b"\x00" * 64]), JPEG2000Lossless, 16, 16))
    truncated = encode_array(radiograph(64, 64), bits_stored=12)[:20]
    with pytest.raises(DecodeError, match="truncated header"):
        decode_dicom(dicom(encapsulate([truncated]), JPEG2000Lossless, 16, 16))


def test_a_picture_over_the_budget_is_refused_from_its_header() -> None:
    data = jpeg_frame(np.zeros((100, 120), np.uint8))
    assert open_picture(data, max_bytes=12000).size == (120, 100)
    with pytest.raises(DecodeError, match="12000 bytes, over the limit of 11999"):
        open_picture(data, max_bytes=11999)


def test_the_viewer_does_not_decode_a_failed_study_again(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    frame = with_size(encode_array(radiograph(64, 64), bits_stored=12), b"\xff\x51", 20000, 20000)
    data = dicom(encapsulate([frame]), JPEG2000Lossless, 1024, 1024)
    case = Case(sha256="ab" * 32, media_type=DICOM)
    blob = blob_path(settings.blob_dir, case.sha256)
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    with pytest.raises(InvalidStudy, match="the header declares 1024x1024x1") as first:
        case_png(case, settings)
    blob.unlink()  # a second decode would now fail differently (no file): it must not happen
    with pytest.raises(InvalidStudy) as second:
        case_png(case, settings)
    assert str(second.value) == str(first.value)
    with pytest.raises(InvalidStudy) as pixels:  # the viewer's full-depth values: same memory
        case_pixels(case, settings)
    assert str(pixels.value) == str(first.value)


# --- decoding at the resolution the model needs -----------------------------------------------


@pytest.mark.parametrize(
    ("rows", "columns", "min_side", "shape"), [(245, 230, 50, (62, 58)), (256, 256, 32, (32, 32))]
)
def test_j2k_decodes_the_smallest_resolution_level_still_large_enough(
    rows: int, columns: int, min_side: int, shape: tuple[int, int]
) -> None:
    """Uneven sizes too (Pillow's own ``reduce`` refuses 1841x1955 at level 2 and beyond)."""
    pixels = radiograph(rows, columns)
    reduced = decode_dicom(j2k_dicom(pixels), min_side=min_side)[1]
    assert reduced.shape == shape and min(shape) >= min_side and min(shape) // 2 < min_side
    # The wavelet's low band is a smoothed average: it follows the block means of the image.
    k = -(-rows // shape[0])
    h, w = rows // k, columns // k
    means = pixels[: h * k, : w * k].astype(np.float64).reshape(h, k, w, k).mean(axis=(1, 3))
    assert np.corrcoef(means[1:-1, 1:-1].ravel(), reduced[1 : h - 1, 1 : w - 1].ravel())[0, 1] > 0.97


def test_j2k_full_decode_is_exact_and_signed_samples_keep_their_sign() -> None:
    pixels = radiograph(70, 90)
    assert np.array_equal(decode_dicom(j2k_dicom(pixels))[1], pixels)
    signed = (pixels.astype(np.int16) - 2048).astype(np.int16)
    stream = encode_array(signed, bits_stored=12)
    assert codestream(JPEG2000Lossless, stream).signed
    assert np.array_equal(jpeg2000.decode(stream, 0), signed)


def test_jpeg_decodes_with_dct_scaling_to_twice_the_input_size() -> None:
    pixels = (radiograph(512, 400) >> 4).astype(np.uint8)
    data = dicom(encapsulate([jpeg_frame(pixels)]), JPEGBaseline8Bit, 512, 400, bits=8, stored=8)
    assert decode_dicom(data, min_side=50)[1].shape == (128, 100)  # 1/4: 1/8 would go under 100
    assert decode_dicom(data)[1].shape == (512, 400)


def test_uncompressed_and_rle_are_averaged_over_whole_blocks() -> None:
    pixels = radiograph(100, 70)
    plain = dicom(pixels.tobytes(), ExplicitVRLittleEndian, 100, 70)
    reduced = decode_dicom(plain, min_side=20)[1]
    expected = pixels[:99, :69].astype(np.float64).reshape(33, 3, 23, 3).mean(axis=(1, 3))
    assert reduced.shape == (33, 23) and np.allclose(reduced, expected, atol=1e-2)
    ds = pydicom.dcmread(io.BytesIO(plain))
    ds.compress(RLELossless)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert np.allclose(decode_dicom(out.getvalue(), min_side=20)[1], expected, atol=1e-2)


def test_jpeg_ls_decodes_as_libjpeg_does() -> None:
    path = shared_data("dicom", "chest", "cr_chest_pa_jpegls_nearlossless_RG1_JLSN.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEGLSNearLossless
    reference = pydicom.pixels.pixel_array(ds, decoding_plugin="pylibjpeg")  # type: ignore[attr-defined]
    assert np.array_equal(decode_dicom(path.read_bytes())[1], reference)


def test_the_trainer_and_the_service_decode_alike(tmp_path: Path) -> None:
    """:func:`decode_gray` (the trainer's entry) and the worker give the same model input."""
    pixels = radiograph(300, 260)
    data = j2k_dicom(pixels)
    path = tmp_path / "s.dcm"
    path.write_bytes(data)
    served = decode_study(DecodeTask(str(path), True, GATE))
    assert served.status == "ok" and served.pixels is not None
    trained = to_input(decode_gray(data, GATE.preprocessing, dicom=True), GATE.preprocessing)
    assert np.array_equal(served.pixels, trained)


def test_a_jp2_wrapper_is_bounded_by_its_codestream_box_not_by_a_decoy() -> None:
    """JP2 is non-conformant in DICOM but decoders read it: the size is the ``jp2c`` box's."""
    pixels = radiograph(96, 80)
    jp2 = encode_array(pixels, bits_stored=12, codec_format=1)
    assert np.array_equal(decode_dicom(dicom(encapsulate([jp2]), JPEG2000Lossless, 96, 80))[1], pixels)
    decoy = encode_array(radiograph(32, 32), bits_stored=12)[:60]  # a SOC + SIZ saying 32x32
    box = struct.pack(">I4s", 8 + len(decoy), b"xml ") + decoy
    signature = jp2.index(b"ftyp") - 4  # after the 12-byte signature box
    hostile = jp2[:signature] + box + jp2[signature:]
    with pytest.raises(DecodeError, match="frame is 80x96x1, the header declares 32x32x1"):
        decode_dicom(dicom(encapsulate([hostile]), JPEG2000Lossless, 32, 32))


def test_samples_wider_than_the_header_allocates_are_refused() -> None:
    frame = encode_array(radiograph(64, 64), bits_stored=12)
    with pytest.raises(DecodeError, match="12-bit samples, the header allocates 8 bits"):
        decode_dicom(dicom(encapsulate([frame]), JPEG2000Lossless, 64, 64, bits=8, stored=8))


def test_the_viewer_decodes_a_large_j2k_only_as_far_as_the_display_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 2200x2048 J2K study is decoded one resolution level down (1100x1024), not in full,
    then boxed to 1024 on its long side; the spacing follows the header's size."""
    pixels = radiograph(2200, 2048)
    ds = pydicom.dcmread(io.BytesIO(j2k_dicom(pixels)))
    ds.PixelSpacing = [0.15, 0.15]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    asked: list[int] = []
    real = preprocess.dicom_pixels

    def spy(dataset: pydicom.Dataset, **kwargs: int) -> np.ndarray:
        asked.append(kwargs["min_side"])
        decoded = real(dataset, **kwargs)
        assert decoded.shape == (1100, 1024)  # the first level down: the decoder skipped the rest
        return decoded

    monkeypatch.setattr(imaging, "dicom_pixels", spy)
    shown = imaging.display_pixels(out.getvalue(), DICOM)
    info = shown.info()
    assert asked == [954] and (info["height"], info["width"]) == (1024, 953)
    assert info["spacing_mm"] == pytest.approx([0.15 * 2200 / 1024, 0.15 * 2048 / 953], rel=1e-3)
    # Against a full decode boxed to the same size: the same picture.
    full = imaging._shrink(pixels.astype(np.float32))
    values = np.frombuffer(shown.body(), dtype="<u2").reshape(1024, 953).astype(np.float64)
    assert np.corrcoef(full[1:-1, 1:-1].ravel(), values[1:-1, 1:-1].ravel())[0, 1] > 0.99
