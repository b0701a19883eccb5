"""Study identity and context on the worklist and the case page, the age the model could not
check, and the decision panel's place beside the image (and below it on a phone).

The site here runs a tiny model whose card is for ages 1–5 y, as the default model's is.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.bundles import save_tiny_bundle
from tests.conftest import DATA
from tests.web.conftest import Site, shot

UTC_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d UTC"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plumbing model, for children aged 1–5 (overrides the shared fixture here)."""
    return save_tiny_bundle(tmp_path_factory.mktemp("aged") / "tiny", age_bands=("1–5 y",))


def chest(*, accession: str, description: str | None, age: str | None) -> bytes:
    """A real CR chest PA with the given accession number, study description and age."""
    ds = pydicom.dcmread(DATA / "cr_chest_pa_jpeg_baseline_siim.dcm")
    ds.AccessionNumber = accession
    if description is not None:
        ds.StudyDescription = description
    for keyword in ("PatientAge", "PatientBirthDate"):
        if keyword in ds:
            delattr(ds, keyword)
    if age is not None:
        ds.PatientAge = age
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def upload(site: Site, data: bytes) -> str:
    with site.api("up-north") as api:
        response = api.post("/v1/studies", files={"file": ("study.dcm", data)})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_worklist_and_case_page_show_the_study_and_an_age_the_model_could_not_check(
    site: Site, browser: Any
) -> None:
    tagged = upload(site, chest(accession="ACC-4711", description="XR CHEST PA", age="004Y"))
    untagged = upload(site, chest(accession="", description=None, age=None))
    picture = site.upload("up-north", 51)
    for case_id in (tagged, untagged, picture):
        assert site.wait_scored("dr-north", case_id)["status"] == "scored"

    page = site.login(browser, "dr-north")

    def row(case_id: str) -> Any:
        return page.locator(f"#worklist tr[data-case='{case_id}']")

    row(picture).wait_for()
    assert row(tagged).locator(".accession").inner_text() == "ACC-4711"
    exam = row(tagged).locator("td.study")
    assert exam.inner_text().splitlines() == ["XR CHEST PA", "CR · CHEST · view PA"]
    assert row(tagged).locator(".age-note").count() == 0
    received = row(tagged).locator("time").inner_text()
    assert re.fullmatch(UTC_TIME, received)
    # The sender withheld the accession number: the site's patient pseudonym stands in.
    assert re.fullmatch(
        r"no accession · patient ref [0-9A-F]{8}", row(untagged).locator(".accession").inner_text()
    )
    assert row(untagged).locator(".age-note").inner_text() == "age not checked (model for 1–5 y)"
    # A picture has no header: nothing to show but "—", and no age either.
    assert row(picture).locator(".accession").inner_text() == "—"
    assert row(picture).locator("td.study").inner_text().splitlines() == [
        "—",
        "—",
        "age not checked (model for 1–5 y)",
    ]

    page.goto(f"{site.base}/web/cases/{tagged}")
    facts = {
        name: page.locator(f"#fact-{name}").inner_text()
        for name in ("accession", "exam", "modality", "body-part", "view", "age", "received")
    }
    assert facts == {
        "accession": "ACC-4711",
        "exam": "XR CHEST PA",
        "modality": "CR",
        "body-part": "CHEST",
        "view": "PA",
        "age": "1–5 y",
        "received": received,
    }
    assert page.locator("#study-line").inner_text() == "ACC-4711 · XR CHEST PA"
    assert page.locator("#age-note").count() == 0

    page.goto(f"{site.base}/web/cases/{picture}")
    for name in ("accession", "exam", "modality", "body-part", "view"):
        assert page.locator(f"#fact-{name}").inner_text() == "—", name
    assert page.locator("#fact-age").inner_text().startswith("— (not checked")
    assert page.locator("#age-note").inner_text() == (
        "Age not checked: the model is for ages 1–5 y, and this study gives no usable age."
    )
    page.context.close()


def test_the_decision_panel_sits_beside_the_image_and_below_it_on_a_phone(site: Site, browser: Any) -> None:
    case_id = site.upload("up-north", 52)
    site.wait_scored("dr-north", case_id)
    page = site.login(browser, "dr-north")
    page.goto(f"{site.base}/web/cases/{case_id}")
    page.keyboard.press("c")
    page.wait_for_selector("#read-form")
    for width, height in ((1440, 900), (1024, 768), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(100)
        shot(page, f"case-decision-{width}")
        viewer = page.locator("#viewer").bounding_box()
        panel = page.locator("#decision").bounding_box()
        save = page.get_by_role("button", name="Save and next").bounding_box()
        assert page.evaluate("document.documentElement.scrollWidth") <= width, width
        if width > 800:  # beside the image, agree-and-next on the first screen
            assert panel["x"] >= viewer["x"] + viewer["width"] and panel["y"] < viewer["y"] + viewer["height"]
            assert save["y"] + save["height"] <= height, width
        else:  # stacked below the image
            assert panel["y"] >= viewer["y"] + viewer["height"], width
    page.keyboard.press("o")  # the reason picker open: still no sideways scrolling on a phone
    assert page.locator("#reason-picker").is_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.context.close()
