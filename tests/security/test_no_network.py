"""No outbound call: importing every module (pydicom included, whose import looks up its
bundled example files) and starting the service reach no address but loopback.

Runs in a fresh interpreter in which name lookups and connections to any other address
raise, so an import-time download (a hub, pydicom's data fetcher) fails the test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from triage_api.settings import Settings

GUARD = textwrap.dedent(
    """
    import ipaddress, socket, sys

    def local(host):
        if host in (None, "", "localhost", "testserver"):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def refuse(what):
        sys.stderr.write(f"OUTBOUND {what}\\n")
        raise OSError(f"outbound network refused by the test: {what}")

    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if not local(host):
            refuse(f"lookup {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):
            refuse(f"connect {address[0]}")
        return real_connect(self, address)

    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
    """
)

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import pydicom, pydicom.examples
    assert pydicom.examples.ct.Modality == "CT"  # a bundled example file, read offline
    import triage_api, models, audit
    for package in (triage_api, models, audit):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".migrations" not in module.name:
                importlib.import_module(module.name)
    from fastapi.testclient import TestClient
    from triage_api.app import create_app
    from triage_api.settings import Settings
    settings = Settings.model_validate_json(sys.argv[1])
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
    print("OFFLINE OK")
    """
)


def test_imports_and_start_make_no_outbound_call(settings: Settings, tmp_path: Path) -> None:
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, settings.model_dump_json()],
        env={"PYTHONPATH": f"{guard}:{root}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "OUTBOUND" not in run.stderr, run.stderr[-2000:]
    assert run.returncode == 0 and "OFFLINE OK" in run.stdout, run.stderr[-2000:]
