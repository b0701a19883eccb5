"""The live stream in Chromium: a critical arrival is announced inside an open case page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.test_webhooks import save_critical_bundle
from tests.web.conftest import Site, shot
from tests.web.test_web_pages import wait_until


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Overrides the plumbing bundle for this module: every scored study is critical."""
    return save_critical_bundle(tmp_path_factory.mktemp("bundle") / "critical")


def test_a_critical_arrival_shows_on_the_case_page_and_the_worklist(site: Site, browser: Any) -> None:
    first = site.upload("up-north", 1)
    site.wait_scored("up-north", first)
    page = site.login(browser, "dr-north")
    page.goto(f"{site.base}/web/cases/{first}")
    page.wait_for_selector("#live-alerts[data-live='connected']")
    assert page.locator("#critical-banner").is_hidden()
    title = page.title()

    arrival = site.upload("up-north", 2)  # a reader is inside another case when it comes
    banner = page.locator("#critical-banner")
    banner.wait_for(state="visible", timeout=30_000)
    assert arrival[:12] in banner.inner_text()
    assert page.title() == f"(1 critical) {title}"
    assert "due within 15 min" in page.locator("#critical-due").inner_text()
    shot(page, "critical-banner-case")
    page.locator("#critical-dismiss").click()
    assert banner.is_hidden() and page.title() == title

    # the worklist: the row appears without polling, and the banner links to the case
    page.goto(f"{site.base}/web/worklist")
    page.wait_for_selector("#live-alerts[data-live='connected']")
    rows = page.locator("#worklist tbody tr[data-case]")
    rows.first.wait_for()
    third = site.upload("up-north", 3)
    banner.wait_for(state="visible", timeout=30_000)
    wait_until(lambda: third in rows.evaluate_all("rs => rs.map(r => r.dataset.case)"), timeout=30)
    banner.get_by_role("link").first.click()
    page.wait_for_url(f"**/web/cases/{third}")
    page.context.close()
