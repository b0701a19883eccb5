"""Row 9: what the service writes is readable by its own user only (umask 077)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import DATA, MakeKey, upload, wait_for
from triage_api.app import create_app
from triage_api.settings import Settings

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "triage.service"


def _tree(root: Path) -> Iterator[Path]:
    yield root
    yield from root.rglob("*")


def test_every_file_and_folder_under_the_data_dir_is_private(settings: Settings, make_key: MakeKey) -> None:
    previous = os.umask(0o022)  # the permissive default of a manual start
    try:
        with TestClient(create_app(settings)) as client:
            uploader = make_key("uploader", "north")
            case_id = upload(
                client, uploader, (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes()
            ).json()["id"]
            wait_for(client, uploader, case_id)
            radiologist = {"Authorization": f"Bearer {make_key('radiologist', 'north')}"}
            assert client.get(f"/v1/studies/{case_id}/heatmap", headers=radiologist).status_code == 200
            paths = list(_tree(settings.data_dir)) + list(_tree(settings.audit_key_path.parent))
    finally:
        os.umask(previous)
    assert any(p.name.endswith(".png") or "blobs" in p.parts for p in paths)
    loose = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in paths if p.stat().st_mode & 0o077]
    assert not loose, "\n".join(loose)


def test_the_unit_sets_the_umask() -> None:
    assert "UMask=0077" in UNIT.read_text().splitlines()
