"""Accepting a study: validate before any decode, store the blob, then one transaction.

Validation order (cheapest first, nothing decoded): size cap (enforced while the body
streams in, see :mod:`triage_api.app`), type by magic bytes, DICOM header read at one
boundary with every parser exception mapped to :class:`InvalidStudy`, then the pixel
budget from the header. The blob is written and fsynced under its sha256 before the case,
its job and the audit event commit together.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import struct
import uuid
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime

import pydicom
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from audit.log import EventCode, record
from models.preprocess import age_band
from triage_api import jobs
from triage_api.auth import Principal
from triage_api.blobs import store_blob
from triage_api.errors import InvalidStudy, NotPermitted, UnsupportedMediaType
from triage_api.priority import routine_deadline
from triage_api.settings import Settings
from triage_api.tables import Case
from triage_api.vocab import CaseStatus, Tier

DICOM = "application/dicom"
PNG = "image/png"
JPEG = "image/jpeg"


@dataclass(frozen=True)
class StudyFacts:
    """What the header says, kept on the case. ``patient_id`` is pseudonymised before storage."""

    media_type: str
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    age_band: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    study_uid: str | None = None
    study_description: str | None = None


def quiet_pydicom() -> None:
    """Keep pydicom from logging or warning with header values: they may be PHI.

    Process-wide, so it is called at start-up (app lifespan, worker), never at import.
    """
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")


def sniff(data: bytes) -> str:
    """The media type from magic bytes; the client's Content-Type is not trusted.

    Raises:
        UnsupportedMediaType: not DICOM Part 10, PNG or JPEG.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return DICOM
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    raise UnsupportedMediaType("expected DICOM Part 10 (with preamble), PNG or JPEG")


def read_dicom_header(data: bytes) -> pydicom.Dataset:
    """Parse a DICOM header without pixel data: the one boundary for hostile DICOM.

    Deflated transfer syntax is refused before parsing: it inflates the whole dataset in
    memory even without pixels.

    Raises:
        InvalidStudy: any parser failure, with a reason and no patient data.
    """
    try:
        # The file meta group alone (its length is the first element's value) tells the
        # transfer syntax; parsing just those bytes cannot trigger inflation.
        (meta_length,) = struct.unpack_from("<I", data, 140)
        meta = pydicom.dcmread(io.BytesIO(data[: 144 + meta_length])).file_meta
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            raise InvalidStudy("Deflated transfer syntax is not accepted")
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        for _element in ds:  # pydicom converts values lazily: force every conversion here
            pass
        return ds
    except InvalidStudy:
        raise
    except Exception as exc:  # every parser exception type lands here, by design
        raise InvalidStudy(f"unreadable DICOM header ({type(exc).__name__})") from None


def _header_int(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        raise InvalidStudy(f"DICOM header lacks {keyword}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidStudy(f"DICOM header has a non-numeric {keyword}") from None
    if number < 0:
        raise InvalidStudy(f"DICOM header has a negative {keyword}")
    return number


def check_dicom(data: bytes, budget: int) -> StudyFacts:
    """Header checks and the pixel budget for a DICOM upload.

    Raises:
        InvalidStudy: unreadable header, no image, or decoded size over ``budget`` bytes.
    """
    ds = read_dicom_header(data)
    rows = _header_int(ds, "Rows")
    columns = _header_int(ds, "Columns")
    frames = _header_int(ds, "NumberOfFrames", 1) or 1
    samples = _header_int(ds, "SamplesPerPixel", 1)
    bits = _header_int(ds, "BitsAllocated")
    if rows == 0 or columns == 0 or samples == 0 or bits == 0:
        raise InvalidStudy("DICOM header declares an empty image")
    decoded = rows * columns * frames * samples * ((bits + 7) // 8)
    if decoded > budget:
        raise InvalidStudy(f"decoded image would take {decoded} bytes, over the limit of {budget}")

    def text(keyword: str, limit: int = 64) -> str | None:
        value = ds.get(keyword)
        return str(value).strip()[:limit] or None if value is not None else None

    return StudyFacts(
        media_type=DICOM,
        modality=text("Modality", 16),
        body_part=text("BodyPartExamined"),
        view_position=text("ViewPosition", 16),
        age_band=age_band(text("PatientAge"), text("PatientBirthDate"), text("StudyDate")),
        patient_id=text("PatientID"),
        accession_number=text("AccessionNumber"),
        study_uid=text("StudyInstanceUID"),
        study_description=text("StudyDescription"),
    )


def check_picture(data: bytes, media_type: str, budget: int) -> StudyFacts:
    """Header checks and the pixel budget for PNG/JPEG, opening only the declared format.

    Raises:
        InvalidStudy: unreadable header, or decoded size over ``budget`` bytes.
    """
    fmt = "PNG" if media_type == PNG else "JPEG"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as image:
                width, height = image.size
                bands = len(image.getbands())
                depth = 2 if image.mode.startswith("I;16") else (4 if image.mode in ("I", "F") else 1)
    except Exception as exc:
        raise InvalidStudy(f"unreadable {fmt} header ({type(exc).__name__})") from None
    if width * height * bands * depth > budget:
        raise InvalidStudy(
            f"decoded image would take {width * height * bands * depth} bytes, over the limit of {budget}"
        )
    return StudyFacts(media_type=media_type)


def validate(data: bytes, settings: Settings) -> StudyFacts:
    """All checks that run before a byte is stored. Raises a 415 or 422 domain error."""
    media_type = sniff(data)
    if media_type == DICOM:
        return check_dicom(data, settings.max_decoded_bytes)
    return check_picture(data, media_type, settings.max_decoded_bytes)


def pseudonym(key: bytes, patient_id: str | None) -> str | None:
    """Keyed pseudonym of a patient ID (HMAC-SHA256): stable per site, not reversible."""
    if not patient_id:
        return None
    return hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()


def accept_study(
    factory: sessionmaker[Session],
    *,
    reads: sessionmaker[Session],
    principal: Principal,
    data: bytes,
    settings: Settings,
    pseudonym_key: bytes,
) -> tuple[Case, bool]:
    """Validate, store and register an upload.

    Returns:
        The case and whether it was created now (False: the same clinic sent the same
        bytes before, and the existing case is returned).

    Raises:
        NotPermitted: the caller does not act for exactly one clinic.
        UnsupportedMediaType, InvalidStudy: the upload is refused; nothing is stored.
    """
    if len(principal.clinic_ids) != 1:
        raise NotPermitted("an uploader key must belong to exactly one clinic")
    (clinic_id,) = principal.clinic_ids
    facts = validate(data, settings)
    digest = store_blob(settings.blob_dir, data)

    existing = _find(reads, clinic_id, digest)
    if existing is not None:
        return existing, False
    now = datetime.now(UTC)
    case = Case(
        id=uuid.uuid4().hex,
        clinic_id=clinic_id,
        sha256=digest,
        media_type=facts.media_type,
        size_bytes=len(data),
        status=CaseStatus.QUEUED,
        received_at=now,
        deadline=routine_deadline(now, settings),
        tier=Tier.ROUTINE,
        modality=facts.modality,
        body_part=facts.body_part,
        view_position=facts.view_position,
        age_band=facts.age_band,
        patient_pseudonym=pseudonym(pseudonym_key, facts.patient_id),
        accession_number=facts.accession_number,
        study_uid=facts.study_uid,
        study_description=facts.study_description,
        uploaded_by=principal.user_id,
    )
    try:
        with factory() as session, session.begin():
            session.add(case)
            session.flush()
            jobs.enqueue(session, case.id, now)
            record(
                session,
                actor=principal.actor,
                action="study.upload",
                code=EventCode.IMPORT,
                object_type="case",
                object_id=case.id,
                details={"media_type": facts.media_type, "bytes": len(data), "sha256": digest},
            )
    except IntegrityError:
        # A concurrent retry of the same upload committed first: answer with its case.
        existing = _find(reads, clinic_id, digest)
        if existing is None:
            raise
        return existing, False
    return case, True


def _find(factory: sessionmaker[Session], clinic_id: int, digest: str) -> Case | None:
    with factory() as session:
        return session.execute(
            select(Case).where(Case.clinic_id == clinic_id, Case.sha256 == digest)
        ).scalar_one_or_none()
