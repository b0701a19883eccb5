"""Row 8: image routes give pixels (a PNG) to roles that need pixels only; the original
DICOM, with the patient's identity, only to radiologists, audited; never cached."""

from __future__ import annotations

import io
import json

import pydicom
from sqlalchemy import select

from audit.log import AuditEvent
from tests.conftest import DATA, runtime_of, upload, wait_for
from tests.security.conftest import Site

IDENTITY = (b"Doe^Jane", b"PID-31337", b"19700101")
PNG = b"\x89PNG\r\n\x1a\n"


def _identified_study() -> bytes:
    ds = pydicom.dcmread(DATA / "cr_chest_pa_jpeg_baseline_siim.dcm")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = (v.decode() for v in IDENTITY)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_only_radiologists_get_the_original_and_that_is_audited(site: Site) -> None:
    uploaded = upload(site.client, site.keys["uploader-north"], _identified_study())
    case_id = uploaded.json()["id"]
    wait_for(site.client, site.keys["uploader-north"], case_id)

    for user in ("uploader-north", "auditor-north"):
        answer = site.client.get(f"/v1/studies/{case_id}/image", headers=site.headers(user))
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/png" and answer.content.startswith(PNG)
        assert not [v for v in IDENTITY if v in answer.content], user
        assert answer.headers["cache-control"] == "no-store"

    original = site.client.get(f"/v1/studies/{case_id}/image", headers=site.headers("radiologist-north"))
    assert original.headers["content-type"] == "application/dicom"
    assert IDENTITY[0] in original.content
    assert original.headers["cache-control"] == "no-store"

    with runtime_of(site.client).reads() as session:
        events = session.execute(
            select(AuditEvent).where(AuditEvent.action == "case.image", AuditEvent.object_id == case_id)
        ).scalars()
        originals = {e.actor for e in events if json.loads(e.details).get("original")}
    assert originals == {f"user:{site.ids['radiologist-north']}"}


def test_the_appeal_image_is_pixels_only(site: Site) -> None:
    uploader = site.keys["uploader-north"]
    case_id = upload(site.client, uploader, _identified_study()).json()["id"]
    wait_for(site.client, uploader, case_id)
    appeal_id = site.read_and_appeal(case_id)
    admin = site.headers("site-admin")
    with runtime_of(site.client).factory() as session:
        from triage_api import auth
        from triage_api.auth import Role

        user, key = auth.add_user(session, name="second", role=Role.RADIOLOGIST, clinics=["north"])
        session.commit()
        second_id = user.id
    taken = site.client.post(f"/v1/appeals/{appeal_id}/assign", json={"reader_id": second_id}, headers=admin)
    assert taken.status_code == 200, taken.text
    image = site.client.get(f"/v1/appeals/{appeal_id}/image", headers={"Authorization": f"Bearer {key}"})
    assert image.status_code == 200 and image.content.startswith(PNG)
    assert not [v for v in IDENTITY if v in image.content]
