"""The C-STORE door against real dcmtk peers and a pynetdicom sender: allow-list, kept as sent,
hostile instances refused with failure statuses while the listener keeps serving."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from sqlalchemy import func, select

from audit.log import AuditEvent
from tests.conftest import DATA, MakeKey, bearer, shared_data, wait_for
from triage_api.blobs import read_blob
from triage_api.db import transaction
from triage_api.dicom.listener import StorageListener, decodable_syntaxes
from triage_api.dicom.peers import add_peer
from triage_api.errors import InvalidRequest
from triage_api.tables import Case


@pytest.fixture
def scp(client: TestClient, make_key: MakeKey) -> Iterator[int]:
    """Our storage SCP on an ephemeral loopback port, peers MODALITY (any address) for north."""
    make_key("uploader", "north")
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    with transaction(runtime.factory) as session:
        add_peer(session, clinic="north", ae="MODALITY", host=None, now=datetime.now(UTC))
        add_peer(session, clinic="north", ae="BOUND", host="10.9.9.9", now=datetime.now(UTC))
    listener = StorageListener(
        runtime.factory, reads=runtime.reads, settings=runtime.settings, pseudonym_key=runtime.pseudonym_key
    )
    port = listener.start("127.0.0.1", 0)
    yield port
    listener.stop()


def dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False)


def cases(client: TestClient) -> list[Case]:
    with transaction(client.app.state.runtime.factory) as session:  # type: ignore[attr-defined]
        return list(session.execute(select(Case)).scalars())


def echo(port: int, ae: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    return dcmtk("echoscu", "-aet", ae, "-aec", "TRIAGE", "127.0.0.1", str(port))


def test_known_peer_echoes_and_unknown_or_misplaced_ae_is_rejected(client: TestClient, scp: int) -> None:
    assert echo(scp).returncode == 0
    refused = echo(scp, "STRANGER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr
    # BOUND is allowed only from 10.9.9.9, not from loopback.
    assert "Calling AE Title Not Recognized" in echo(scp, "BOUND").stderr
    with transaction(client.app.state.runtime.factory) as session:  # type: ignore[attr-defined]
        actions = [
            (e.action, e.event_code, e.outcome)
            for e in session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()
        ]
    assert ("dicom.association.accepted", "110114", 0) in actions
    assert actions.count(("dicom.association.rejected", "110114", 4)) == 2


def test_jpeg_study_is_kept_as_sent_and_reaches_the_worklist(
    client: TestClient, scp: int, make_key: MakeKey
) -> None:
    source = DATA / "cr_chest_pa_jpeg_baseline_siim.dcm"
    sent = dcmtk("storescu", "-xy", "-aet", "MODALITY", "-aec", "TRIAGE", "127.0.0.1", str(scp), str(source))
    assert sent.returncode == 0, sent.stderr[-500:]
    (case,) = cases(client)
    settings = client.app.state.runtime.settings  # type: ignore[attr-defined]
    data = read_blob(settings.blob_dir, case.sha256)
    header = pydicom.dcmread(io.BytesIO(data))
    assert header.file_meta.TransferSyntaxUID == pydicom.dcmread(source).file_meta.TransferSyntaxUID
    assert abs(len(data) - source.stat().st_size) < 1024  # JPEG as sent, not transcoded (~1 MB raw)
    reader = make_key("radiologist", "north")
    assert wait_for(client, reader, case.id)["status"] in ("scored", "not_analyzed")
    worklist = client.get("/v1/worklist", headers=bearer(reader)).json()
    assert [item["id"] for item in worklist] == [case.id]
    assert client.get("/v1/worklist", headers=bearer(make_key("radiologist", "south"))).json() == []


STORESCU_PROPOSAL = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
}
"""storescu proposes one compressed syntax per option (``-xy`` is JPEG baseline only)."""


def test_shared_chest_corpus_arrives_in_its_own_syntaxes(client: TestClient, scp: int) -> None:
    files = sorted(shared_data("dicom", "chest").glob("*.dcm"))
    for path in files:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        option = STORESCU_PROPOSAL.get(syntax, "-x=")
        sent = dcmtk(
            "storescu", option, "-aet", "MODALITY", "-aec", "TRIAGE", "127.0.0.1", str(scp), str(path)
        )
        assert sent.returncode == 0, (path.name, sent.stderr[-500:])
    stored = cases(client)
    assert len(stored) == len(files)
    settings = client.app.state.runtime.settings  # type: ignore[attr-defined]
    syntaxes = {
        str(
            pydicom.dcmread(
                io.BytesIO(read_blob(settings.blob_dir, case.sha256)), stop_before_pixels=True
            ).file_meta.TransferSyntaxUID
        )
        for case in stored
    }
    assert syntaxes == {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in files
    }


def _bomb() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientName = "Bomb^Pixel"
    ds.Rows = ds.Columns = 65535
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\0" * 32
    ds["PixelData"].VR = "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _send(port: int, what: Dataset | Path, syntax: str = ExplicitVRLittleEndian) -> Dataset | None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    if not assoc.is_established:
        return None
    try:
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
        if syntax not in accepted:
            return None
        return assoc.send_c_store(what)
    finally:
        assoc.release()


def test_hostile_instances_get_failure_statuses_and_nothing_is_stored(
    client: TestClient, scp: int, tmp_path: Path
) -> None:
    bomb = _send(scp, _bomb())
    assert bomb is not None and bomb.Status == 0xA700
    assert "over the limit" in bomb.ErrorComment and "Bomb" not in bomb.ErrorComment

    good = _bomb()
    good.Rows = good.Columns = 4
    path = tmp_path / "truncated.dcm"
    good.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    # Cut the file short inside the patient's name: the header cannot be read to the pixels.
    path.write_bytes(data[: data.index(b"Bomb^Pixel") + 3])
    truncated = _send(scp, path)
    assert truncated is not None and (truncated.Status & 0xF000) in (0xC000, 0xA000)

    # Deflate is never offered: the context is refused, nothing is sent.
    assert _send(scp, _bomb(), DeflatedExplicitVRLittleEndian) is None
    assert DeflatedExplicitVRLittleEndian not in decodable_syntaxes()

    assert cases(client) == []
    settings = client.app.state.runtime.settings  # type: ignore[attr-defined]
    assert not settings.blob_dir.exists() or not any(p.is_file() for p in settings.blob_dir.rglob("*"))
    with transaction(client.app.state.runtime.factory) as session:  # type: ignore[attr-defined]
        refused = session.execute(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "dicom.store.refused")
        ).scalar_one()
        details = " ".join(e.details or "" for e in session.execute(select(AuditEvent)).scalars())
    assert refused == 2
    assert "Bomb" not in details
    assert echo(scp).returncode == 0  # still serving


def test_peer_configuration_refuses_bad_values(client: TestClient, make_key: MakeKey) -> None:
    make_key("uploader", "north")
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    with transaction(runtime.factory) as session:
        add_peer(session, clinic="north", ae="OK", host=None, now=datetime.now(UTC))
    for ae, host in (("", None), ("A" * 17, None), ("BAD\\AE", None), ("OK2", "not-an-ip")):
        with pytest.raises(InvalidRequest), transaction(runtime.factory) as session:
            add_peer(session, clinic="north", ae=ae, host=host, now=datetime.now(UTC))
