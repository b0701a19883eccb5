"""De-identified DICOM export: PS3.15 Annex E Basic Profile, by our own action table.

Measured on the index's packages (see INTEROP.md), none is fit as is, so the actions are
ours and the rule is "keep only what is known to be safe":

- the attributes of :data:`ACTIONS` get their Annex E action: removed (X), emptied (Z,
  type 2 attributes stay present), or replaced by a deterministic pseudonym (D);
- every other attribute is judged by its value representation: person names, free text
  and unknown (UN) or opaque bytes are removed unless :data:`KEEP` names them; UIDs are
  replaced (``2.25.<HMAC of the UID>``) unless they are DICOM's own (class, transfer
  syntax and coding scheme UIDs under ``1.2.840.10008``); dates are shifted; numbers and
  code strings stay;
- private tags, overlays (groups 60xx) and curves (50xx) are removed; sequences are
  processed item by item, at any depth.

Retain Longitudinal Temporal Information with Modified Dates: every date of one patient
moves by the same number of days (keyed by the site secret and the patient ID), so
intervals survive and calendar dates do not. Patient sex and age (when well-formed) are
kept: Retain Patient Characteristics. The same study gets the same UIDs and IDs in every
export from this site. Pixels go out only when ``BurnedInAnnotation`` is ``NO``; other
studies are refused and reported, never skipped silently. Reads and AI scores go beside
the files as a CSV, each with whether the AI score was on screen when the read was made.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.log import EventCode, record
from triage_api.blobs import read_blob, write_atomically
from triage_api.ingest import DICOM
from triage_api.tables import Case, Read

DICOM_ROOT = "1.2.840.10008."
"""UIDs defined by the standard itself (SOP classes, transfer syntaxes): never identifying."""

METHOD = "PS3.15 E Basic; Modified Dates; Retain Patient Characteristics"
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
)

REMOVE, EMPTY, PSEUDONYM = "X", "Z", "D"

ACTIONS: dict[str, str] = {
    # Patient
    "PatientName": EMPTY,
    "PatientID": PSEUDONYM,
    "PatientBirthDate": EMPTY,
    "PatientBirthTime": REMOVE,
    "IssuerOfPatientID": REMOVE,
    "OtherPatientIDs": REMOVE,
    "OtherPatientIDsSequence": REMOVE,
    "OtherPatientNames": REMOVE,
    "PatientBirthName": REMOVE,
    "PatientMotherBirthName": REMOVE,
    "PatientAddress": REMOVE,
    "PatientTelephoneNumbers": REMOVE,
    "PatientComments": REMOVE,
    "ReferencedPatientSequence": REMOVE,
    "MedicalRecordLocator": REMOVE,
    # Study and request
    "AccessionNumber": PSEUDONYM,
    "StudyID": PSEUDONYM,
    "ReferringPhysicianName": EMPTY,
    "RequestAttributesSequence": REMOVE,
    "ReferencedStudySequence": REMOVE,
    "ReferencedPerformedProcedureStepSequence": REMOVE,
    "ContentSequence": REMOVE,
    "PersonIdentificationCodeSequence": REMOVE,
    # Equipment and staff
    "InstitutionName": REMOVE,
    "InstitutionAddress": REMOVE,
    "InstitutionalDepartmentName": REMOVE,
    "StationName": REMOVE,
    "DeviceSerialNumber": REMOVE,
    "DeviceUID": REMOVE,
    # Patient characteristics, retained
    "PatientSex": "K",
}
"""Annex E actions for the attributes that need more than the rule of their VR."""

KEEP = frozenset(
    {
        # codes (the items of every code sequence)
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "CodeMeaning",
        "LongCodeValue",
        "URNCodeValue",
        "ContextIdentifier",
        "MappingResource",
        # equipment make (not identity: serial numbers and station names go)
        "Manufacturer",
        "ManufacturerModelName",
        "RescaleType",
        # pixels and look-up tables
        "PixelData",
        "LUTData",
        "RedPaletteColorLookupTableData",
        "GreenPaletteColorLookupTableData",
        "BluePaletteColorLookupTableData",
        "ICCProfile",
    }
)
"""Text or byte attributes kept although their VR is removed by default."""

TEXT_VRS = frozenset({"PN", "SH", "LO", "ST", "LT", "UT", "UC", "UR", "AE", "OB", "OW", "UN"})
AGE = re.compile(r"^\d{3}[DWMY]$")


class Refused(Exception):
    """A study that cannot leave de-identified (its reason is reported, free of PHI)."""


@dataclass(frozen=True)
class Pseudonyms:
    """Deterministic replacements keyed by a site secret (same input, same output, every time)."""

    key: bytes

    @classmethod
    def of_site(cls, site_secret: bytes) -> Pseudonyms:
        return cls(hmac.new(site_secret, b"triage de-identification v1", hashlib.sha256).digest())

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        """``2.25.<integer>`` (a UUID-derived root): at most 44 characters."""
        return "2.25." + str(int.from_bytes(self._mac("uid", value)[:16], "big"))

    def ident(self, purpose: str, value: str, length: int = 16) -> str:
        return self._mac(purpose, value).hex()[:length].upper()

    def day_shift(self, patient: str) -> timedelta:
        """Between 1 and 3650 days back, the same for every study of the patient."""
        return timedelta(days=-(1 + int.from_bytes(self._mac("days", patient)[:4], "big") % 3650))


def _shift_date(value: str, shift: timedelta) -> str:
    try:
        return (date(int(value[:4]), int(value[4:6]), int(value[6:8])) + shift).strftime("%Y%m%d")
    except (ValueError, IndexError):
        return ""


def _shift_datetime(value: str, shift: timedelta) -> str:
    shifted = _shift_date(value[:8], shift)
    return shifted + value[8:] if shifted else ""


def _is_overlay_or_curve(group: int) -> bool:
    return 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF


def _values(element: DataElement) -> list[str]:
    if element.VM == 0 or element.value is None:
        return []
    raw = element.value if element.VM > 1 else [element.value]
    return [str(v) for v in raw]


class Deidentifier:
    """Applies the action table to one dataset, in place."""

    def __init__(self, pseudonyms: Pseudonyms, shift: timedelta) -> None:
        self.pseudonyms = pseudonyms
        self.shift = shift

    def dataset(self, ds: Dataset) -> None:
        for element in list(ds):
            self.element(ds, element)

    def element(self, ds: Dataset, element: DataElement) -> None:
        tag, keyword, vr = element.tag, element.keyword, element.VR
        if tag.is_private or _is_overlay_or_curve(tag.group) or not keyword:
            del ds[tag]
            return
        action = ACTIONS.get(keyword)
        if action == REMOVE:
            del ds[tag]
        elif action == EMPTY:
            element.value = None
        elif action == PSEUDONYM:
            original = "\\".join(_values(element))
            element.value = self.pseudonyms.ident(keyword, original) if original else None
        elif action == "K" or keyword in KEEP:
            pass
        elif vr == "SQ":
            for item in element.value:
                self.dataset(item)
        elif vr == "UI":
            uids = [v if v.startswith(DICOM_ROOT) else self.pseudonyms.uid(v) for v in _values(element)]
            element.value = uids if len(uids) > 1 else (uids[0] if uids else None)
        elif vr == "DA":
            element.value = "\\".join(_shift_date(v, self.shift) for v in _values(element)) or None
        elif vr == "DT":
            element.value = "\\".join(_shift_datetime(v, self.shift) for v in _values(element)) or None
        elif vr == "AS":
            if not all(AGE.match(v) for v in _values(element)):
                del ds[tag]
        elif vr in TEXT_VRS:
            del ds[tag]
        # numbers, code strings, times and attribute tags stay


def deidentify(data: bytes, pseudonyms: Pseudonyms) -> Dataset:
    """The de-identified dataset of a DICOM file's bytes.

    Raises:
        Refused: ``BurnedInAnnotation`` is not ``NO`` (text may be in the pixels).
    """
    ds = pydicom.dcmread(io.BytesIO(data))
    if str(ds.get("BurnedInAnnotation", "")).upper() != "NO":
        raise Refused("BurnedInAnnotation is not NO: pixels may carry burned-in text")
    patient = str(ds.get("PatientID", "")) or str(ds.get("StudyInstanceUID", ""))
    Deidentifier(pseudonyms, pseudonyms.day_shift(patient)).dataset(ds)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    codes = []
    for value, meaning in METHOD_CODES:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
        codes.append(code)
    ds.DeidentificationMethodCodeSequence = Sequence(codes)
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    ds.file_meta = meta
    return ds


CSV_COLUMNS = (
    "file",
    "study_uid",
    "modality",
    "body_part",
    "ai_model",
    "ai_risk",
    "ai_tier",
    "finding",
    "label_source",
    "ai_score_shown",
    "agrees_with_ai",
    "override_reason",
)


@dataclass
class ExportReport:
    """What was written, and what was refused (case ids for the site, never in the export)."""

    written: int = 0
    refused: dict[str, str] = field(default_factory=dict)


def _cases(session: Session, clinic_id: int, since: datetime | None) -> Iterator[Case]:
    query = select(Case).where(Case.clinic_id == clinic_id, Case.media_type == DICOM)
    if since is not None:
        query = query.where(Case.received_at >= since)
    yield from session.execute(query.order_by(Case.received_at, Case.id)).scalars()


def _final_read(session: Session, case_id: str) -> Read | None:
    return session.execute(
        select(Read).where(Read.case_id == case_id).order_by(Read.created_at.desc(), Read.id.desc()).limit(1)
    ).scalar_one_or_none()


def export_dicom(
    session: Session,
    *,
    actor: str,
    clinic_id: int,
    out: Path,
    blob_dir: Path,
    site_secret: bytes,
    since: datetime | None = None,
) -> ExportReport:
    """Write each DICOM study of the clinic de-identified to ``out``, with ``reads.csv``.

    Files are named by their pseudonymous study UID (the same name in every export); the
    export is audited (110106) in ``session``'s transaction.
    """
    out.mkdir(parents=True, exist_ok=True)
    pseudonyms = Pseudonyms.of_site(site_secret)
    report = ExportReport()
    rows = []
    for case in _cases(session, clinic_id, since):
        try:
            ds = deidentify(read_blob(blob_dir, case.sha256), pseudonyms)
        except Refused as refused:
            report.refused[case.id] = str(refused)
            continue
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        name = f"{ds.StudyInstanceUID}.dcm"
        write_atomically(out / name, buffer.getvalue())
        report.written += 1
        read = _final_read(session, case.id)
        rows.append(
            (
                name,
                ds.StudyInstanceUID,
                case.modality or "",
                case.body_part or "",
                case.model_ref or "",
                "" if case.risk is None else f"{case.risk:.6f}",
                case.tier if case.risk is not None else "",
                read.finding if read else "",
                read.kind if read else "",
                "" if read is None else read.ai_score_shown,
                "" if read is None or read.agrees_with_ai is None else read.agrees_with_ai,
                (read.override_reason or "") if read else "",
            )
        )
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(rows)
    write_atomically(out / "reads.csv", table.getvalue().encode())
    record(
        session,
        actor=actor,
        action="dicom.export",
        code=EventCode.EXPORT,
        object_type="dataset",
        object_id=out.name[:64],
        details={
            "clinic_id": clinic_id,
            "written": report.written,
            "refused": len(report.refused),
            "deidentified": METHOD,
            "since": since.isoformat() if since else None,
        },
    )
    return report
