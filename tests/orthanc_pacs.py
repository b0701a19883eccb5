"""Orthanc as the hospital PACS, for the tests and ``bench/dicom.py``.

Orthanc 1.10 binds 0.0.0.0, so whatever starts it must already run in a private network
namespace (``unshare --net --fork`` with only ``lo`` up): :func:`private_network` checks.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

HTTP_PORT = 18042
DICOM_PORT = 14242
AE_TITLE = "ORTHANC"


def private_network() -> bool:
    """True inside a network namespace whose only interface is loopback."""
    return [name for _index, name in socket.if_nameindex()] == ["lo"]


@contextmanager
def orthanc(workdir: Path, *, triage_port: int, triage_ae: str = "TRIAGE") -> Iterator[str]:
    """A foreground Orthanc knowing our SCP as modality ``triage``; yields its HTTP root."""
    if not private_network():
        raise RuntimeError("Orthanc binds 0.0.0.0: run it inside `unshare --net --fork`")
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "test-pacs",
        "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"),
        "HttpPort": HTTP_PORT,
        "DicomPort": DICOM_PORT,
        "DicomAet": AE_TITLE,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {"triage": {"AET": triage_ae, "Host": "127.0.0.1", "Port": triage_port}},
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("wb")
    process = subprocess.Popen(
        ["Orthanc", str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    root = f"http://127.0.0.1:{HTTP_PORT}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{root}/system", timeout=2).raise_for_status()
                break
            except requests.RequestException:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("Orthanc did not start") from None
                time.sleep(0.1)
        yield root
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        log.close()


def upload(root: str, data: bytes) -> dict[str, Any]:
    """Store an instance in Orthanc (REST); returns Orthanc's answer (ID, ParentStudy...)."""
    response = requests.post(f"{root}/instances", data=data, timeout=30)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def send_to_triage(root: str, resource: str) -> None:
    """Ask Orthanc to C-STORE a resource to our SCP (modality ``triage``), synchronously."""
    response = requests.post(
        f"{root}/modalities/triage/store", json={"Resources": [resource], "Synchronous": True}, timeout=120
    )
    response.raise_for_status()


def sr_instances(root: str, study_uid: str) -> list[dict[str, Any]]:
    """QIDO-RS in Orthanc: the SR instances of a study."""
    response = requests.get(
        f"{root}/dicom-web/studies/{study_uid}/instances", params={"Modality": "SR"}, timeout=30
    )
    if response.status_code == 404:
        return []
    response.raise_for_status()
    rows: list[dict[str, Any]] = response.json() if response.content else []
    return [row for row in rows if row.get("00080060", {}).get("Value") == ["SR"]]
