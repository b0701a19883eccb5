"""DICOMweb services: STOW-RS through the one accept function, and a read-only QIDO/WADO subset.

Each case is one instance. Queries run on the case table (study level) and on stored
headers (series and instance level), always inside the caller's clinics, and answer with
an allow-list of attributes (:data:`PUBLIC_KEYWORDS`): UIDs, image geometry and display
attributes, modality, body part, view, accession number. No patient name, ID, birth date or
other identifying attribute leaves by these routes, and retrieved instances are rebuilt from
the same allow-list around the pixel data as stored (never transcoded).
"""

from __future__ import annotations

import io
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragmented_frames
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.log import EventCode, record
from triage_api.auth import Principal
from triage_api.blobs import read_blob
from triage_api.errors import InvalidRequest, InvalidStudy, NotFound, TriageError, UnsupportedMediaType
from triage_api.ingest import DICOM, read_dicom_header
from triage_api.tables import Case

DICOM_JSON = "application/dicom+json"
MAX_PARTS = 1000

PUBLIC_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "AccessionNumber",
    "SeriesNumber",
    "InstanceNumber",
    "ImageType",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "WindowCenter",
    "WindowWidth",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "VOILUTFunction",
    "PresentationLUTShape",
    "LossyImageCompression",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "FrameOfReferenceUID",
)
"""What DICOMweb reads return: enough to list and display an image, nothing identifying."""

FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_OUT_OF_RESOURCES = 0xA700


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a ``multipart/related; type="application/dicom"`` request.

    Raises:
        UnsupportedMediaType: not multipart/related of application/dicom.
        InvalidRequest: no boundary, no parts, or more than :data:`MAX_PARTS`.
    """
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/related":
        raise UnsupportedMediaType('expected multipart/related; type="application/dicom"')
    fields = dict(_params(params))
    if fields.get("type", DICOM).lower() != DICOM:
        raise UnsupportedMediaType('only type="application/dicom" parts are accepted')
    boundary = fields.get("boundary")
    if not boundary or len(boundary) > 200:
        raise InvalidRequest("multipart/related without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    segments = body.split(delimiter)
    parts: list[bytes] = []
    for segment in segments[1:]:
        if segment.startswith(b"--"):
            break
        headers, separator, content = segment.partition(b"\r\n\r\n")
        if not separator:
            raise InvalidRequest("a multipart part has no header/body separator")
        part_type = re.search(rb"(?im)^content-type:\s*([^;\r\n]+)", headers)
        if part_type is not None and part_type.group(1).strip().lower() != DICOM.encode():
            raise UnsupportedMediaType("every part must be application/dicom")
        parts.append(content.removesuffix(b"\r\n"))
        if len(parts) > MAX_PARTS:
            raise InvalidRequest(f"more than {MAX_PARTS} parts")
    if not parts:
        raise InvalidRequest("multipart body without parts")
    return parts


def _params(text: str) -> Iterable[tuple[str, str]]:
    for item in text.split(";"):
        key, _, value = item.strip().partition("=")
        if key:
            yield key.strip().lower(), value.strip().strip('"')


@dataclass
class StowOutcome:
    """What a STOW-RS request stored and refused, as DICOM JSON."""

    referenced: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    def add(self, data: bytes, accept: Callable[[bytes], Case], retrieve_root: str) -> None:
        """Accept one part with ``accept``; a refused part becomes a FailedSOPSequence item."""
        try:
            case = accept(data)
        except TriageError as error:
            item = _uids(data)
            too_big = " over " in error.message and "bytes" in error.message
            item.FailureReason = FAILURE_OUT_OF_RESOURCES if too_big else FAILURE_CANNOT_UNDERSTAND
            self.failed.append(item.to_json_dict())
            return
        item = _uids(data)
        item.RetrieveURL = f"{retrieve_root}/studies/{case.study_uid}" if case.study_uid else retrieve_root
        self.referenced.append(item.to_json_dict())

    def status_code(self) -> int:
        """200 all stored, 202 some refused, 409 none stored (PS3.18 10.5.3)."""
        if not self.failed:
            return 200
        return 202 if self.referenced else 409

    def body(self) -> dict[str, Any]:
        response = Dataset()
        response.ReferencedSOPSequence = []
        body = response.to_json_dict()
        if self.referenced:
            body["00081199"] = {"vr": "SQ", "Value": self.referenced}
        else:
            body.pop("00081199", None)
        if self.failed:
            body["00081198"] = {"vr": "SQ", "Value": self.failed}
        return body


def _uids(data: bytes) -> Dataset:
    """Referenced SOP Class/Instance UIDs of a part, where its header is readable."""
    item = Dataset()
    try:
        header = read_dicom_header(data)
    except InvalidStudy:
        return item
    for keyword, target in (
        ("SOPClassUID", "ReferencedSOPClassUID"),
        ("SOPInstanceUID", "ReferencedSOPInstanceUID"),
    ):
        value = header.get(keyword)
        if value and len(str(value)) <= 64 and re.fullmatch(r"[0-9.]+", str(value)):
            setattr(item, target, str(value))
    return item


@dataclass(frozen=True)
class Instance:
    """A stored DICOM case and its header."""

    case: Case
    header: Dataset


def studies(
    session: Session,
    principal: Principal,
    *,
    filters: dict[str, str],
    limit: int,
    offset: int,
) -> list[dict[str, Any]]:
    """QIDO-RS studies: the caller's DICOM cases grouped by Study Instance UID (audited, 110112).

    Matching on StudyInstanceUID, AccessionNumber and ModalitiesInStudy (exact values).
    """
    query = select(Case).where(
        Case.clinic_id.in_(principal.clinic_ids), Case.media_type == DICOM, Case.study_uid.is_not(None)
    )
    if "StudyInstanceUID" in filters:
        query = query.where(Case.study_uid.in_(filters["StudyInstanceUID"].split(",")))
    if "AccessionNumber" in filters:
        query = query.where(Case.accession_number == filters["AccessionNumber"])
    if "ModalitiesInStudy" in filters:
        query = query.where(Case.modality == filters["ModalitiesInStudy"])
    grouped: dict[str, list[Case]] = {}
    for case in session.execute(query.order_by(Case.received_at.desc(), Case.id)).scalars():
        grouped.setdefault(str(case.study_uid), []).append(case)
    page = list(grouped.items())[offset : offset + limit]
    _audit(session, principal, EventCode.QUERY, "dicomweb.query", "study", str(len(page)))
    results = []
    for study_uid, members in page:
        ds = Dataset()
        ds.StudyInstanceUID = study_uid
        ds.ModalitiesInStudy = sorted({c.modality for c in members if c.modality}) or ""
        ds.AccessionNumber = members[0].accession_number or ""
        ds.NumberOfStudyRelatedInstances = len(members)
        results.append(ds.to_json_dict())
    return results


def instances(
    session: Session,
    principal: Principal,
    blob_dir: Any,
    *,
    study: str,
    series: str | None = None,
    sop: str | None = None,
) -> list[Instance]:
    """The caller's stored instances of a study (optionally one series, one instance).

    Raises:
        NotFound: nothing matches inside the caller's clinics.
    """
    cases = session.execute(
        select(Case)
        .where(Case.clinic_id.in_(principal.clinic_ids), Case.media_type == DICOM, Case.study_uid == study)
        .order_by(Case.received_at, Case.id)
        .limit(1000)
    ).scalars()
    found = []
    for case in cases:
        header = read_dicom_header(read_blob(blob_dir, case.sha256))
        if series is not None and header.get("SeriesInstanceUID") != series:
            continue
        if sop is not None and header.get("SOPInstanceUID") != sop:
            continue
        found.append(Instance(case, header))
    if not found:
        raise NotFound("no such study, series or instance")
    return found


def public(header: Dataset) -> Dataset:
    """The allow-listed attributes of a header (:data:`PUBLIC_KEYWORDS`)."""
    out = Dataset()
    for keyword in PUBLIC_KEYWORDS:
        if keyword in header:
            out[keyword] = header[keyword]
    return out


def series_of(found: list[Instance]) -> list[dict[str, Any]]:
    """QIDO-RS series of a study."""
    by_series: dict[str, list[Instance]] = {}
    for instance in found:
        by_series.setdefault(str(instance.header.get("SeriesInstanceUID", "")), []).append(instance)
    results = []
    for series_uid, members in by_series.items():
        ds = Dataset()
        ds.StudyInstanceUID = str(members[0].header.get("StudyInstanceUID", ""))
        ds.SeriesInstanceUID = series_uid
        ds.Modality = str(members[0].header.get("Modality", ""))
        if "SeriesNumber" in members[0].header:
            ds.SeriesNumber = members[0].header.SeriesNumber
        ds.NumberOfSeriesRelatedInstances = len(members)
        results.append(ds.to_json_dict())
    return results


def instance_rows(found: list[Instance]) -> list[dict[str, Any]]:
    """QIDO-RS instances."""
    keep = (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "NumberOfFrames",
    )
    rows = []
    for instance in found:
        ds = Dataset()
        for keyword in keep:
            if keyword in instance.header:
                ds[keyword] = instance.header[keyword]
        rows.append(ds.to_json_dict())
    return rows


def metadata(found: list[Instance]) -> list[dict[str, Any]]:
    """WADO-RS metadata: the allow-listed header of each instance."""
    rows = []
    for instance in found:
        ds = public(instance.header)
        body = ds.to_json_dict()
        body["00020010"] = {"vr": "UI", "Value": [str(instance.header.file_meta.TransferSyntaxUID)]}
        rows.append(body)
    return rows


def audit_access(session: Session, principal: Principal, found: list[Instance], action: str) -> None:
    """An access event (110103) per case retrieved."""
    for instance in found:
        _audit(session, principal, EventCode.ACCESS, action, "case", instance.case.id)


def _audit(
    session: Session, principal: Principal, code: EventCode, action: str, kind: str, object_id: str
) -> None:
    record(session, actor=principal.actor, action=action, code=code, object_type=kind, object_id=object_id)


def part10(found: Instance, blob_dir: Any) -> bytes:
    """The instance as Part 10: allow-listed header around the pixel data as stored."""
    full = pydicom.dcmread(io.BytesIO(read_blob(blob_dir, found.case.sha256)))
    out = public(full)
    out.PixelData = full.PixelData
    out["PixelData"].VR = full["PixelData"].VR
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = full.SOPClassUID
    meta.MediaStorageSOPInstanceUID = full.SOPInstanceUID
    meta.TransferSyntaxUID = full.file_meta.TransferSyntaxUID
    out.file_meta = meta
    buffer = io.BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def frames(found: Instance, blob_dir: Any, numbers: list[int], *, as_stored: bool) -> tuple[list[bytes], str]:
    """Frames ``numbers`` (1-based): as stored (``as_stored``, or when uncompressed), else decoded
    to native little-endian samples. Returns the frames and their transfer syntax UID.

    Raises:
        NotFound: a frame number beyond the instance.
    """
    full = pydicom.dcmread(io.BytesIO(read_blob(blob_dir, found.case.sha256)))
    syntax = full.file_meta.TransferSyntaxUID
    count = int(full.get("NumberOfFrames", 1) or 1)
    if any(n < 1 or n > count for n in numbers):
        raise NotFound("no such frame")
    if syntax.is_encapsulated and as_stored:
        stored = list(generate_fragmented_frames(full.PixelData, number_of_frames=count))
        return [b"".join(stored[n - 1]) for n in numbers], str(syntax)
    if not syntax.is_encapsulated and syntax.is_little_endian:
        size = len(full.PixelData) // count
        return [full.PixelData[(n - 1) * size : n * size] for n in numbers], str(syntax)
    pixels = full.pixel_array if count > 1 else full.pixel_array[np.newaxis]
    native = [
        np.ascontiguousarray(pixels[n - 1]).astype(pixels.dtype.newbyteorder("<")).tobytes() for n in numbers
    ]
    return native, "1.2.840.10008.1.2.1"


def multipart(parts: list[tuple[bytes, str]]) -> tuple[bytes, str]:
    """A multipart/related body of ``(content, content type)`` parts; returns it and its boundary."""
    boundary = secrets.token_hex(16)
    chunks = []
    for content, media in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {media}\r\n\r\n".encode() + content + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), boundary
