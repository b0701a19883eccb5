"""AI results back to the PACS: a Comprehensive 3D SR (TID 1500), sent through the outbox.

The scoring transaction writes an outbox row (:func:`enqueue_result`) when the case is DICOM
and its clinic has a PACS; the outbox thread later calls :func:`sender`'s function, which
builds the SR from the stored source header and C-STOREs it. The SR's UIDs derive from the
case and scoring attempt, so a retried delivery replaces the same instance in the PACS
rather than adding a copy. The payload holds no patient data: the SR's patient and study
modules are copied from the source image at send time.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import validate_value
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage  # type: ignore[attr-defined]
from sqlalchemy.orm import Session

from models.bundle import ModelCard
from triage_api import outbox
from triage_api.blobs import read_blob
from triage_api.errors import InvalidStudy
from triage_api.ingest import DICOM, read_dicom_header
from triage_api.settings import Settings
from triage_api.tables import Case, PacsDestination
from triage_api.vocab import Tier

KIND = "dicom_sr"

PROBABILITY = Code("122157", "DCM", "Probability")
UNITLESS = Code("1", "UCUM", "no units")
_FINDINGS = {"pneumonia": Code("233604007", "SCT", "Pneumonia")}
_TRIAGE_SCHEME = "99TRIAGE"
TIER = Code("TIER", _TRIAGE_SCHEME, "Triage priority tier")
_TIERS = {tier: Code(tier.value.upper(), _TRIAGE_SCHEME, tier.value.capitalize()) for tier in Tier}
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."
"""pydicom's root: UIDs from hashed entropy sources, unique without a registered root of our own."""


@dataclass(frozen=True)
class Result:
    """What the SR says, as stored in the outbox payload (no patient data)."""

    case_id: str
    attempt: int
    sha256: str
    risk: float
    tier: Tier
    finding_present: bool
    label: str
    model_name: str
    model_version: str
    weights_sha256: str

    def payload(self, destination: PacsDestination) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "attempt": self.attempt,
            "sha256": self.sha256,
            "risk": self.risk,
            "tier": self.tier.value,
            "finding_present": self.finding_present,
            "label": self.label,
            "model": {
                "name": self.model_name,
                "version": self.model_version,
                "weights_sha256": self.weights_sha256,
            },
            "pacs": {"ae_title": destination.ae_title, "host": destination.host, "port": destination.port},
        }

    @classmethod
    def of(cls, payload: dict[str, Any]) -> Result:
        model = payload["model"]
        return cls(
            case_id=payload["case_id"],
            attempt=int(payload["attempt"]),
            sha256=payload["sha256"],
            risk=float(payload["risk"]),
            tier=Tier(payload["tier"]),
            finding_present=bool(payload["finding_present"]),
            label=payload["label"],
            model_name=model["name"],
            model_version=model["version"],
            weights_sha256=model["weights_sha256"],
        )


def enqueue_result(session: Session, *, case: Case, attempt: int, card: ModelCard, now: Any) -> None:
    """In the scoring transaction: queue the SR of a scored DICOM case if its clinic has a PACS."""
    if case.media_type != DICOM or case.risk is None:
        return
    destination = session.get(PacsDestination, case.clinic_id)
    if destination is None:
        return
    tier = Tier(case.tier)
    result = Result(
        case_id=case.id,
        attempt=attempt,
        sha256=case.sha256,
        risk=case.risk,
        tier=tier,
        finding_present=tier != Tier.ROUTINE,
        label=card.positive_label,
        model_name=card.name,
        model_version=card.version,
        weights_sha256=card.weights_sha256,
    )
    outbox.enqueue(
        session,
        kind=KIND,
        target=f"{destination.ae_title}@{destination.host}:{destination.port}",
        payload=result.payload(destination),
        now=now,
        case_id=case.id,
        clinic_id=case.clinic_id,
    )


def build_sr(source: Dataset, result: Result, *, device_name: str) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report of one AI result on ``source`` (a header is enough).

    One TID 1501 group: the probability (DCM 122157, UCUM "1") with TID 4019 algorithm
    identification (name, version, weights checksum), the finding present/absent and the
    tier as qualitative evaluations, and the source image reference. Preliminary and
    unverified: an AI result is not a read.
    """
    source = _without_invalid_values(source)
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model_name, version=result.model_version, parameters=[f"sha256:{result.weights_sha256}"]
    )
    finding = _FINDINGS.get(result.label, Code(result.label.upper()[:16], _TRIAGE_SCHEME, result.label))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(_UID_PREFIX, [result.case_id, "tracking"]), identifier="AI triage"
        ),
        finding_type=finding,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=[
            hd.sr.Measurement(
                name=PROBABILITY, value=round(result.risk, 6), unit=UNITLESS, algorithm_id=algorithm
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=finding, value=codes.SCT.Present if result.finding_present else codes.SCT.Absent
            ),
            hd.sr.QualitativeEvaluation(name=TIER, value=_TIERS[result.tier]),
        ],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(_UID_PREFIX, [device_name, "device"]),
            name=device_name,
            model_name=f"{result.model_name} {result.model_version}",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=Code("363679005", "SCT", "Imaging procedure"),
        imaging_measurements=[group],
    )
    with warnings.catch_warnings():
        # highdicom's warnings about the copied patient module quote its values (PHI).
        warnings.simplefilter("ignore")
        report_sr = hd.sr.Comprehensive3DSR(
            evidence=[source],
            content=report,
            series_instance_uid=generate_uid(_UID_PREFIX, [result.case_id, "sr-series"]),
            series_number=9001,
            sop_instance_uid=generate_uid(_UID_PREFIX, [result.case_id, str(result.attempt), "sr"]),
            instance_number=result.attempt,
            manufacturer="Triage",
            series_description="AI triage result - preliminary, not a read",
            is_complete=True,
            is_final=False,
            is_verified=False,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            coding_schemes=[CodingSchemeIdentificationItem(_TRIAGE_SCHEME, name="Triage local codes")],
        )
    return report_sr


def _without_invalid_values(source: Dataset) -> Dataset:
    """A copy of the source header with the top-level values that break their VR emptied (a
    source's faults: an age of "62" with no unit, an over-long accession number): the SR
    copies the patient and study modules and must validate; the PACS files it by UIDs."""
    clean = copy.deepcopy(source)
    for element in clean:
        if element.VR == "SQ" or element.value in (None, ""):
            continue
        try:
            validate_value(element.VR, element.value, config.RAISE)
        except (ValueError, TypeError):
            element.value = ""  # empty, not absent: several are type 2 in the SR
    return clean


def quiet_highdicom() -> None:
    """highdicom logs and warns with header values; silence it (process-wide, at start-up)."""
    logging.getLogger("highdicom").setLevel(logging.CRITICAL)


def store(dataset: Dataset, *, calling: str, ae_title: str, host: str, port: int, timeout: float = 30) -> int:
    """C-STORE one dataset; returns the peer's status.

    Raises:
        outbox.DeliveryFailed: no association (retried later).
    """
    ae = AE(ae_title=calling)
    ae.add_requested_context(Comprehensive3DSRStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise outbox.DeliveryFailed(f"association with {ae_title} refused or unreachable")
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    if "Status" not in status:
        raise outbox.DeliveryFailed(f"no C-STORE response from {ae_title}")
    return int(status.Status)


def sender(settings: Settings) -> outbox.Sender:
    """The outbox sender of :data:`KIND`: build the SR from the stored source, C-STORE it."""
    quiet_highdicom()

    def send(delivery: outbox.Delivery) -> str:
        result = Result.of(delivery.payload)
        pacs = delivery.payload["pacs"]
        try:
            source = read_dicom_header(read_blob(settings.blob_dir, result.sha256))
        except (OSError, InvalidStudy):
            raise outbox.DeliveryFailed("source study unreadable", permanent=True) from None
        report = build_sr(source, result, device_name=settings.dicom_ae_title)
        status = store(
            report,
            calling=settings.dicom_ae_title,
            ae_title=pacs["ae_title"],
            host=pacs["host"],
            port=int(pacs["port"]),
        )
        if status in (0x0000, 0xB000, 0xB007, 0xB006):
            return f"C-STORE status 0x{status:04X}"
        # Out of resources (0xA7xx) may pass; anything else will fail again the same way.
        raise outbox.DeliveryFailed(f"C-STORE status 0x{status:04X}", permanent=(status & 0xFF00) != 0xA700)

    return send
