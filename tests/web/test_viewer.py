"""The viewer draws a study undistorted at every window size (a pixel check of a test pattern)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.web.conftest import ARTIFACTS, Site

SIZES = [(1024, 768), (1440, 900), (390, 844)]


def pattern() -> bytes:
    """A landscape grey PNG (300 x 180) with a white disc of radius 70 in its centre."""
    yy, xx = np.mgrid[0:180, 0:300]
    disc = (xx - 150) ** 2 + (yy - 90) ** 2 <= 70**2
    out = io.BytesIO()
    Image.fromarray(np.where(disc, 255, 0).astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def drawn_disc(page: Any) -> tuple[int, int]:
    """Width and height, in screen pixels, of the bright disc as the canvas shows it."""
    ARTIFACTS.mkdir(exist_ok=True)
    picture = page.locator("#canvas").screenshot(path=str(ARTIFACTS / "viewer-disc.png"))
    # Inside the rounded corners, which show the page behind the canvas.
    shot = np.asarray(Image.open(io.BytesIO(picture)).convert("L"))[6:-6, 6:-6]
    rows, cols = np.nonzero(shot > 128)
    return int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_the_image_keeps_its_aspect_ratio(site: Site, browser: Any, width: int, height: int) -> None:
    with site.api("up-north") as api:
        response = api.post("/v1/studies", files={"file": ("disc.png", pattern())})
    assert response.status_code == 201, response.text
    case_id = response.json()["id"]
    site.wait_scored("up-north", case_id)
    page = site.login(browser, "dr-north")
    page.set_viewport_size({"width": width, "height": height})
    page.goto(f"{site.base}/web/cases/{case_id}")
    page.wait_for_selector("#viewer[data-ready='1']")
    disc_w, disc_h = drawn_disc(page)
    assert disc_w > 40, (disc_w, disc_h)
    assert abs(disc_w / disc_h - 1) < 0.04, (width, height, disc_w, disc_h)
    box = page.locator("#canvas").bounding_box()
    assert box is not None and box["height"] <= height * 0.78 + 1
    # After the window changes size the picture is redrawn, still round.
    before = page.evaluate("document.getElementById('canvas').height")
    page.set_viewport_size({"width": width, "height": max(250, height // 3)})
    # (wait_for_function evaluates a string, which the pages' CSP forbids: poll, bounded)
    for _ in range(200):
        if page.evaluate("document.getElementById('canvas').height") != before:
            break
        page.wait_for_timeout(50)
    disc_w, disc_h = drawn_disc(page)
    assert abs(disc_w / disc_h - 1) < 0.04, ("resized", width, height, disc_w, disc_h)
    page.context.close()
