"""The C-STORE door: a DICOM storage SCP that hands each instance to :func:`ingest.accept_study`.

Only configured peers may associate (calling AE title, and address where the peer names one;
see :mod:`triage_api.dicom.peers`): others are rejected at association (A-ASSOCIATE-RJ,
"calling AE title not recognised"). The presentation contexts offer the radiograph storage
classes with exactly the transfer syntaxes the decoder handles, so a sender never transcodes
behind our back and never sends Deflate. The bytes are kept as sent (Part 10, the sender's
transfer syntax) and go through the same validation, blob store, case, job and audit as a
REST upload. A refused instance gets a failure status with a comment free of patient data;
the listener keeps serving. Every association decision and every refused or repeated
instance is audited (PS3.15: 110114 user authentication, 110107 import).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from audit.log import EventCode, Outcome, record
from triage_api import ingest
from triage_api.auth import Principal
from triage_api.db import transaction
from triage_api.dicom.peers import find_peer, peer_principal
from triage_api.errors import InvalidStudy, TriageError
from triage_api.settings import Settings

log = logging.getLogger("triage.dicom")

STORAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
"""What the SCP stores: radiographs (CR, DX) and secondary captures (digitised films); the
worker's gate then decides from the header whether the model is for the study."""

_CANDIDATE_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
"""Refused: the instance is over the size or pixel budget."""
STATUS_CANNOT_UNDERSTAND = 0xC000
"""Error: the instance cannot be read or is not an image we accept."""
STATUS_PROCESSING_FAILURE = 0x0110


def decodable_syntaxes() -> list[UID]:
    """The transfer syntaxes whose pixel data this installation can decode (never Deflate)."""
    return [
        uid for uid in _CANDIDATE_SYNTAXES if uid.is_encapsulated is False or get_decoder(uid).is_available
    ]


@dataclass(frozen=True)
class _Caller:
    """The peer an accepted association belongs to."""

    principal: Principal
    ae_title: str
    address: str


def failure_status(error: TriageError) -> int:
    """The C-STORE status for a refused instance: budget exceeded, or unreadable."""
    if isinstance(error, InvalidStudy) and " over " in error.message and "bytes" in error.message:
        return STATUS_OUT_OF_RESOURCES
    return STATUS_CANNOT_UNDERSTAND


class StorageListener:
    """A storage SCP (and C-ECHO) bound to the service's database and blob store.

    Args:
        factory: read-write sessions (the accept transaction, audit events).
        reads: read-only sessions (peer lookups).
        settings: AE title, bind address, size and pixel budgets.
        pseudonym_key: the site key that pseudonymises patient IDs.
        clock: now, for audit timestamps of association decisions.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        reads: sessionmaker[Session],
        settings: Settings,
        pseudonym_key: bytes,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.factory = factory
        self.reads = reads
        self.settings = settings
        self.pseudonym_key = pseudonym_key
        self.clock = clock
        self._callers: weakref.WeakKeyDictionary[Association, _Caller] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def application_entity(self) -> AE:
        """The AE with our presentation contexts and time-outs."""
        ae = AE(ae_title=self.settings.dicom_ae_title)
        syntaxes = decodable_syntaxes()
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 60
        ae.maximum_associations = 16
        return ae

    def start(self, host: str, port: int) -> int:
        """Listen on ``host``:``port`` in background threads; returns the bound port (0 picks one)."""
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO/DEBUG lines describe datasets
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        server = self.application_entity().start_server((host, port), block=False, evt_handlers=handlers)
        if server is None:
            raise RuntimeError("the DICOM listener did not start")
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        """Stop listening and end open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _audit(
        self, *, actor: str, action: str, code: EventCode, outcome: Outcome, details: dict[str, Any]
    ) -> None:
        with transaction(self.factory) as session:
            record(
                session,
                actor=actor,
                action=action,
                code=code,
                object_type="dicom_association",
                object_id=str(details.get("ae_title", "")),
                outcome=outcome,
                details=details,
            )

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title.strip()  # type: ignore[union-attr]
        address = str(assoc.requestor.address)
        try:
            with self.reads() as session:
                peer = find_peer(session, ae=calling, host=address)
        except Exception as exc:  # no database: refuse for now, the sender retries later
            log.error("peer lookup failed (%s)", type(exc).__name__)
            # Rejected transient, by the service user, no reason given.
            assoc.acse.send_reject(0x02, 0x01, 0x01)
            assoc.is_rejected = True
            assoc.kill()
            return
        caller = None if peer is None else _Caller(peer_principal(peer), calling, address)
        details: dict[str, Any] = {"ae_title": calling[:16], "address": address}
        if caller is None:
            self._audit(
                actor=f"dicom:{calling[:16]}",
                action="dicom.association.rejected",
                code=EventCode.LOGIN,
                outcome=Outcome.MINOR_FAILURE,
                details=details,
            )
            # Rejected permanent, by the service user, "calling AE title not recognised".
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.is_rejected = True
            assoc.kill()
            return
        with self._lock:
            self._callers[assoc] = caller
        details["clinic_id"] = next(iter(caller.principal.clinic_ids))
        self._audit(
            actor=caller.principal.actor,
            action="dicom.association.accepted",
            code=EventCode.LOGIN,
            outcome=Outcome.SUCCESS,
            details=details,
        )

    def _on_echo(self, _event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> Dataset | int:
        with self._lock:
            caller = self._callers.get(event.assoc)
        if caller is None:  # cannot happen after _on_requested; refuse rather than guess a clinic
            return STATUS_PROCESSING_FAILURE
        data = event.encoded_dataset(include_meta=True)
        try:
            if len(data) > self.settings.max_upload_bytes:
                raise InvalidStudy(f"instance over {self.settings.max_upload_bytes} bytes")
            case, created = ingest.accept_study(
                self.factory,
                reads=self.reads,
                principal=caller.principal,
                data=data,
                settings=self.settings,
                pseudonym_key=self.pseudonym_key,
            )
        except TriageError as error:
            status = failure_status(error)
            self._audit_instance(caller, "dicom.store.refused", Outcome.MINOR_FAILURE, status, error.message)
            return _status_comment(status, error.message)
        except Exception as exc:  # the listener keeps serving; the type only (messages may hold PHI)
            log.error("C-STORE failed (%s)", type(exc).__name__)
            self._audit_instance(
                caller, "dicom.store.failed", Outcome.SERIOUS_FAILURE, STATUS_PROCESSING_FAILURE, None
            )
            return _status_comment(STATUS_PROCESSING_FAILURE, "processing failure")
        if not created:
            self._audit_instance(
                caller, "dicom.store.duplicate", Outcome.SUCCESS, STATUS_SUCCESS, None, case.id
            )
        return STATUS_SUCCESS

    def _audit_instance(
        self,
        caller: _Caller,
        action: str,
        outcome: Outcome,
        status: int,
        reason: str | None,
        case_id: str | None = None,
    ) -> None:
        details: dict[str, Any] = {"ae_title": caller.ae_title, "status": f"0x{status:04X}"}
        if reason is not None:
            details["reason"] = reason
        with transaction(self.factory) as session:
            record(
                session,
                actor=caller.principal.actor,
                action=action,
                code=EventCode.IMPORT,
                object_type="case" if case_id else "dicom_instance",
                object_id=case_id or "",
                outcome=outcome,
                details=details,
            )


def _status_comment(status: int, reason: str) -> Dataset:
    """The status dataset: an Error Comment (LO, 64 characters) that never quotes header values."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = reason[:64]
    return ds
