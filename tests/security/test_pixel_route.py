"""The viewer's full-depth pixels: values past 8 bits survive, MONOCHROME1 is inverted, the
spacing follows the display size, and who may fetch them is who may see the study
(the blinded appeal reader through the appeal only)."""

from __future__ import annotations

import json

import numpy as np
from fastapi.testclient import TestClient

from tests.conftest import runtime_of, upload, wait_for
from tests.security.conftest import PASSWORD, Site
from tests.synthetic import RAMP_COLUMNS, RAMP_ROWS, RAMP_SPACING, ramp_dicom, ramp_values
from triage_api import auth, passwords
from triage_api.auth import Role
from triage_api.db import transaction


def _pixels(client: TestClient, url: str) -> tuple[np.ndarray, dict[str, object]]:
    answer = client.get(url)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    assert answer.headers["cache-control"] == "no-store"
    info = json.loads(answer.headers["x-pixel-info"])
    values = np.frombuffer(answer.content, dtype="<u2").reshape(info["height"], info["width"])
    return values, info


def _case(site: Site, study: bytes) -> str:
    uploader = site.keys["uploader-north"]
    answer = upload(site.client, uploader, study)
    assert answer.status_code == 201, answer.text
    case_id = str(answer.json()["id"])
    wait_for(site.client, uploader, case_id)
    return case_id


def test_pixels_keep_the_full_depth_inverted_and_measured(site: Site) -> None:
    reader = site.web("radiologist-north")
    plain = _case(site, ramp_dicom(window=(2000, 3000)))
    inverted = _case(site, ramp_dicom(photometric="MONOCHROME1", window=(2000, 3000)))

    values, info = _pixels(reader, f"/web/cases/{plain}/pixels")
    # 2048 x 1024 decoded -> 1024 x 512 shown: each value the mean of a 2 x 2 block.
    assert (info["width"], info["height"]) == (RAMP_COLUMNS // 2, RAMP_ROWS // 2)
    assert info["bits"] == 12
    blocks = (
        ramp_values().astype(np.float64).reshape(RAMP_ROWS // 2, 2, RAMP_COLUMNS // 2, 2).mean(axis=(1, 3))
    )
    assert np.abs(values - blocks).max() <= 0.5
    assert int(values.max()) > 4000 and len(np.unique(values)) > 1000  # not an 8-bit copy
    assert info["window"] == [2000.0, 3000.0] and info["window_from"] == "file"
    assert info["spacing_mm"] == [RAMP_SPACING[0] * 2, RAMP_SPACING[1] * 2]
    assert info["spacing_from"] == "PixelSpacing"
    presets = info["presets"]
    assert isinstance(presets, dict) and set(presets) == {"lung", "soft", "bone"}
    assert presets["lung"][0] < presets["soft"][0] < presets["bone"][0]

    flipped, flipped_info = _pixels(reader, f"/web/cases/{inverted}/pixels")
    # MONOCHROME1: bright is less dense; shown inverted within the 12-bit range, window too.
    assert np.abs(flipped.astype(np.int64) - (4095 - blocks)).max() <= 0.5
    assert flipped_info["window"] == [4095 - 2000.0, 3000.0]
    assert flipped_info["spacing_mm"] == info["spacing_mm"]


def test_pixels_follow_the_study_rules(site: Site) -> None:
    """Who may see the study (``/v1/studies/{id}/image``) may fetch its pixels, no one else."""
    case_id = _case(site, ramp_dicom())
    for user in site.keys:
        picture = site.client.get(f"/v1/studies/{case_id}/image", headers=site.headers(user)).status_code
        pixels = site.web(user).get(f"/web/cases/{case_id}/pixels").status_code
        assert (pixels == 200) == (picture == 200) and pixels in (200, 403, 404), (user, picture, pixels)
        if user.endswith("-south"):
            assert pixels == 404, user
    assert site.web("uploader-north").get(f"/web/cases/{case_id}/pixels").status_code == 200
    # Signed out: no pixels (sent to the login).
    answer = TestClient(site.client.app).get(f"/web/cases/{case_id}/pixels", follow_redirects=False)
    assert answer.status_code in (303, 401) and len(answer.content) < 1000


def test_the_blinded_reader_gets_pixels_through_the_appeal_only(site: Site) -> None:
    case_id = _case(site, ramp_dicom())
    appeal_id = site.read_and_appeal(case_id)
    with transaction(runtime_of(site.client).factory) as session:
        second, _ = auth.add_user(session, name="second-north", role=Role.RADIOLOGIST, clinics=["north"])
        passwords.set_password(session, second, PASSWORD)
        second_id = second.id
    assigned = site.client.post(
        f"/v1/appeals/{appeal_id}/assign", json={"reader_id": second_id}, headers=site.headers("site-admin")
    )
    assert assigned.status_code == 200, assigned.text

    blinded = site.web("second-north")
    assert blinded.get(f"/web/cases/{case_id}/pixels").status_code == 403
    values, info = _pixels(blinded, f"/web/appeals/{appeal_id}/pixels")
    first, _ = _pixels(site.web("radiologist-north"), f"/web/cases/{case_id}/pixels")
    assert np.array_equal(values, first) and info["bits"] == 12
    # Nothing beyond geometry and windows travels with them.
    assert set(info) == {
        "width",
        "height",
        "bits",
        "window",
        "window_from",
        "presets",
        "spacing_mm",
        "spacing_from",
    }
    # Another reader is not this appeal's reader.
    assert site.web("radiologist-north").get(f"/web/appeals/{appeal_id}/pixels").status_code == 404
