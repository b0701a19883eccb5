"""Row 6: the appeal's second reader must never have opened the case unblinded."""

from __future__ import annotations

from tests.conftest import DATA, runtime_of, upload, wait_for
from tests.security.conftest import PASSWORD, Site
from triage_api import auth, passwords
from triage_api.auth import Role
from triage_api.db import transaction


def _appealed_case(site: Site) -> tuple[str, int]:
    uploader = site.keys["uploader-north"]
    study = (DATA / "cr_chest_pa_jpeg_baseline_siim.dcm").read_bytes()
    case_id = str(upload(site.client, uploader, study).json()["id"])
    wait_for(site.client, uploader, case_id)
    return case_id, site.read_and_appeal(case_id)


def _radiologist(site: Site, name: str) -> None:
    with transaction(runtime_of(site.client).factory) as session:
        user, key = auth.add_user(session, name=name, role=Role.RADIOLOGIST, clinics=["north"])
        user.password_hash = passwords.hash_password(PASSWORD)
    site.keys[name], site.ids[name] = key, user.id


def test_a_reader_who_opened_the_case_cannot_take_or_be_assigned_its_appeal(site: Site) -> None:
    case_id, appeal_id = _appealed_case(site)
    for name in ("saw-score", "saw-image", "saw-page", "never-saw"):
        _radiologist(site, name)
    assert site.client.get(f"/v1/studies/{case_id}", headers=site.headers("saw-score")).status_code == 200
    assert (
        site.client.get(f"/v1/studies/{case_id}/image", headers=site.headers("saw-image")).status_code == 200
    )
    assert site.web("saw-page").get(f"/web/cases/{case_id}").status_code == 200

    for name in ("saw-score", "saw-image", "saw-page"):
        taken = site.client.post(f"/v1/appeals/{appeal_id}/take", headers=site.headers(name))
        assert taken.status_code == 409, name
        assert "already opened" in taken.json()["error"]["message"]
        assigned = site.client.post(
            f"/v1/appeals/{appeal_id}/assign",
            json={"reader_id": site.ids[name]},
            headers=site.headers("site-admin"),
        )
        assert assigned.status_code == 409, name
    taken = site.client.post(f"/v1/appeals/{appeal_id}/take", headers=site.headers("never-saw"))
    assert taken.status_code == 200 and taken.json()["assigned_to"] == site.ids["never-saw"]
    # the blinded view through the appeal is not "opening the case"
    assert (
        site.client.get(f"/v1/appeals/{appeal_id}/case", headers=site.headers("never-saw")).status_code == 200
    )
