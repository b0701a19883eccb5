"""The viewer draws a study undistorted at every window size (a pixel check of a test pattern),
windows its full-depth values (presets, keys, drag) and measures lengths in mm, angles and the
cardiothoracic ratio."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.synthetic import RAMP_COLUMNS, RAMP_ROWS, RAMP_SPACING, ramp_dicom
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


SIZE = "[document.getElementById('canvas').width, document.getElementById('canvas').height]"
ROW = (
    "([x, y, n]) => Array.from("
    "document.getElementById('canvas').getContext('2d').getImageData(x, y, n, 1).data)"
)
"""``n`` canvas pixels from (x, y) rightwards, as RGBA values."""


def _grey(page: Any, column: float, row: float, width: int, height: int) -> int:
    """The canvas's grey level over image pixel (column, row) of a ``width`` x ``height`` image
    fitted in the view (the canvas's own pixels, so measured whatever the screen)."""
    cw, ch = page.evaluate(SIZE)
    s = min(cw / width, ch / height)
    x, y = (cw - width * s) / 2 + (column + 0.5) * s, (ch - height * s) / 2 + (row + 0.5) * s
    rgba = page.evaluate(ROW, [int(x), int(y), 1])
    return int(rgba[0])


def _on_screen(page: Any, column: float, row: float, width: int, height: int) -> tuple[float, float]:
    """Where image pixel (column, row) lies on the page, in CSS pixels."""
    box = page.locator("#canvas").bounding_box()
    cw, ch = page.evaluate(SIZE)
    ratio = cw / box["width"]  # canvas pixels per CSS pixel
    s = min(cw / width, ch / height)
    return (
        box["x"] + ((cw - width * s) / 2 + column * s) / ratio,
        box["y"] + ((ch - height * s) / 2 + row * s) / ratio,
    )


def _drag(page: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=4)
    page.mouse.up()


def _measured(page: Any) -> list[str]:
    return [
        t
        for t in page.locator("#measurements li").all_inner_texts()
        if not t.startswith(("No pixel", "Lengths"))
    ]


def test_window_presets_and_measurements_on_a_12_bit_study(site: Site, browser: Any) -> None:
    with site.api("up-north") as api:
        response = api.post("/v1/studies", files={"file": ("ramp.dcm", ramp_dicom(window=(2000, 3000)))})
    assert response.status_code == 201, response.text
    case_id = response.json()["id"]
    site.wait_scored("up-north", case_id)
    page = site.login(browser, "dr-north")
    page.goto(f"{site.base}/web/cases/{case_id}")
    page.wait_for_selector("#viewer[data-ready='1']")
    info = json.loads(page.request.get(f"{site.base}/web/cases/{case_id}/pixels").headers["x-pixel-info"])
    width, height = info["width"], info["height"]
    assert (width, height) == (RAMP_COLUMNS // 2, RAMP_ROWS // 2)
    middle = width / 2, height / 2  # value ~2048 of 0..4095

    # The file's window (centre 2000, width 3000) by default: the middle of the ramp mid-grey,
    # brighter to the right (denser), darker to the left.
    shown = _grey(page, *middle, width, height)
    assert 115 <= shown <= 145, shown
    assert (
        _grey(page, width * 0.25, height / 2, width, height)
        < shown
        < _grey(page, width * 0.75, height / 2, width, height)
    )
    assert "W 3000 / L 2000" in page.locator("#wl").inner_text()

    # Raising the level (arrow down) darkens the same pixel; lowering it brightens it.
    page.locator("#canvas").focus()
    for _ in range(3):
        page.keyboard.press("Shift+ArrowDown")
    darker = _grey(page, *middle, width, height)
    assert darker < shown - 30, (shown, darker)
    for _ in range(6):
        page.keyboard.press("Shift+ArrowUp")
    assert _grey(page, *middle, width, height) > shown + 30

    # Presets: the lung window sits lower (the middle turns brighter), bone higher (darker);
    # each applies the centre and width the server computed; 1 is the file's window again.
    page.get_by_role("button", name="Lung (2)").click()
    lung = _grey(page, *middle, width, height)
    centre, window = info["presets"]["lung"]
    assert f"W {round(window)} / L {round(centre)}" in page.locator("#wl").inner_text()
    page.keyboard.press("4")
    bone = _grey(page, *middle, width, height)
    assert bone < shown < lung, (bone, shown, lung)
    page.keyboard.press("1")
    assert _grey(page, *middle, width, height) == shown

    # Length: a horizontal line of 500 image columns, each 0.5 mm wide on the display.
    page.get_by_role("button", name="Length (l)").click()
    _drag(page, _on_screen(page, 200, 100, width, height), _on_screen(page, 700, 100, width, height))
    (length,) = _measured(page)
    mm = float(re.fullmatch(r"Length: ([0-9.]+) mm", length).group(1))  # type: ignore[union-attr]
    expected = 500 * RAMP_SPACING[1] * 2
    assert abs(mm - expected) <= 0.01 * expected, (length, expected)

    # The cardiothoracic ratio: a 200-column cardiac width over a 700-column thoracic width;
    # the second end of each width stays on its first end's row (widths are horizontal).
    page.keyboard.press("t")
    _drag(page, _on_screen(page, 400, 250, width, height), _on_screen(page, 600, 260, width, height))
    assert "now draw the thoracic width" in _measured(page)[-1]
    _drag(page, _on_screen(page, 150, 350, width, height), _on_screen(page, 850, 300, width, height))
    ctr = _measured(page)[-1]
    found = re.fullmatch(
        r"Cardiothoracic ratio: ([0-9.]+) \(cardiac ([0-9.]+) mm / thoracic ([0-9.]+) mm\)", ctr
    )
    assert found is not None, ctr
    ratio, cardiac, thoracic = (float(v) for v in found.groups())
    assert abs(ratio - 200 / 700) <= 0.01 and abs(cardiac / thoracic - 200 / 700) <= 0.01, ctr
    assert abs(thoracic - 700 * RAMP_SPACING[1] * 2) <= 3.5, ctr

    # An angle of three clicks (a right angle), then a keyboard-only length: Enter places a
    # point at the crosshair, each arrow press moves it 2.5 image pixels.
    page.keyboard.press("g")
    for column, row in ((300, 100), (300, 300), (500, 300)):
        page.mouse.click(*_on_screen(page, column, row, width, height))
    assert re.fullmatch(r"Angle: (89\.[5-9]|90\.[0-5])°", _measured(page)[-1]), _measured(page)
    page.keyboard.press("l")
    page.locator("#canvas").focus()
    page.keyboard.press("Enter")
    for _ in range(20):
        page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    assert _measured(page)[-1] == f"Length: {50 * RAMP_SPACING[1] * 2:.1f} mm"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer-measurements.png"), full_page=True)
    page.keyboard.press("Escape")
    assert page.locator("#measurements li").count() == 0

    # 1:1 shows one image pixel per canvas pixel (the ramp's columns rise by 4 each), and the
    # fit button brings the whole image back.
    page.keyboard.press("z")
    assert page.locator("#actual").get_attribute("aria-pressed") == "true"
    assert "1:1" in page.locator("#wl").inner_text()
    cw = page.evaluate("document.getElementById('canvas').width")
    row = page.evaluate(ROW, [cw // 2 - 100, 100, 201])[::4]
    rise = row[-1] - row[0]  # 200 image columns of 4 values each, in a window 3000 wide
    assert abs(rise - 200 * 4 * 255 / 3000) <= 3, row
    page.keyboard.press("f")
    assert page.locator("#fit").get_attribute("aria-pressed") == "true"

    # Heat map (shown to this reader): opacity 0 leaves the picture as it was.
    if page.locator("#heatmap").count():
        assert page.get_by_role("img", name=re.compile("Heat-map colours")).count() == 1
        before = _grey(page, *middle, width, height)
        page.get_by_label("Heat map (h)").check()
        page.wait_for_selector("#viewer[data-heatmap-loaded='1']")
        page.get_by_label("Opacity").fill("0")
        assert _grey(page, *middle, width, height) == before

    # A phone: the toolbar wraps, nothing makes the page wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(200)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(ARTIFACTS / "viewer-phone.png"))
    page.context.close()


def test_a_picture_without_spacing_measures_in_pixels(site: Site, browser: Any) -> None:
    with site.api("up-north") as api:
        response = api.post("/v1/studies", files={"file": ("disc.png", pattern())})
    assert response.status_code == 201, response.text
    case_id = response.json()["id"]
    page = site.login(browser, "dr-north")
    page.goto(f"{site.base}/web/cases/{case_id}")
    page.wait_for_selector("#viewer[data-ready='1']")
    assert "W 256 / L 128" in page.locator("#wl").inner_text()  # 8 bits, all of them
    page.keyboard.press("l")
    _drag(page, _on_screen(page, 50, 90, 300, 180), _on_screen(page, 250, 90, 300, 180))
    (length,) = _measured(page)
    px = float(re.fullmatch(r"Length: ([0-9.]+) px", length).group(1))  # type: ignore[union-attr]
    assert abs(px - 200) <= 2, length
    assert "No pixel spacing in this file" in page.locator("#measurements").inner_text()
    page.context.close()
