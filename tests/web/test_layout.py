"""Layout and chrome: phones do not scroll sideways, unknown pages are HTML, one time format."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.web.conftest import Site

PHONE = {"width": 390, "height": 844}


def test_unknown_browser_paths_get_an_html_page_and_api_paths_json(client: TestClient) -> None:
    for path in ("/web/nothing-here", "/nothing-here"):
        page = client.get(path, headers={"Accept": "text/html,application/xhtml+xml"})
        assert page.status_code == 404 and page.headers["content-type"].startswith("text/html"), path
        assert "<h1>Not found</h1>" in page.text and 'rel="icon"' in page.text
    for path in ("/v1/nothing-here", "/web/api/nothing-here"):
        api = client.get(path, headers={"Accept": "text/html"})
        assert api.status_code == 404 and api.json()["error"]["code"], path
    icon = client.get("/static/favicon.svg")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")


def desk_pages(case_id: str) -> dict[str, list[str]]:
    """Every desk's pages, by the user who opens them."""
    return {
        "dr-north": ["/web/worklist", f"/web/cases/{case_id}"],
        "up-north": ["/web/clinic"],
        "auditor": ["/web/audit", "/web/audit/log", "/web/audit/monitoring"],
        "admin": ["/web/admin"],
    }


def test_no_page_is_wider_than_a_phone(site: Site, browser: Any) -> None:
    case_id = site.upload("up-north", 31)
    site.wait_scored("dr-north", case_id)
    pages = desk_pages(case_id)
    pages["auditor"].append("/web/audit/log?since=2020-01-01&actor=admin&action=user.create")
    pages["admin"].append("/web/nothing-here")
    for user, paths in pages.items():
        page = site.login(browser, user)
        page.set_viewport_size(PHONE)
        if user == "admin":  # with a new key on show, and a user's manage panel open
            page.get_by_label("Name").fill("phone-user")
            page.get_by_label("Clinics (comma-separated").fill("north")
            page.get_by_role("button", name="Create user").click()
            page.locator("#new-key").wait_for()
            page.wait_for_load_state("load")
            page.get_by_text("Manage phone-user").click()
            wide = page.evaluate("document.documentElement.scrollWidth")
            assert wide <= PHONE["width"], wide
        for path in paths:
            page.goto(site.base + path)
            if path == "/web/worklist":
                page.wait_for_selector(f"#worklist tr[data-case='{case_id}']")
            wide = page.evaluate("document.documentElement.scrollWidth")
            assert wide <= PHONE["width"], (path, wide)
            for title in page.locator("svg title, svg text, figcaption").all_text_contents():
                assert not title.endswith(("…", "...")), (path, title)
            times = re.findall(
                r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d[^\s<]*(?: UTC)?", page.locator("main").inner_text()
            )
            for shown in times:
                assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", shown), (path, shown)
        page.context.close()


# Accessibility basics, checked in the page (no offline axe is at hand): every control has an
# accessible name, the page has a language and a main landmark, every image a text
# alternative, and text has WCAG AA contrast (4.5:1) against the first opaque background
# behind it.
A11Y_CHECK = (Path(__file__).parent / "a11y.js").read_text()


def test_pages_meet_accessibility_basics(site: Site, browser: Any) -> None:
    case_id = site.upload("up-north", 33)
    site.wait_scored("dr-north", case_id)
    pages = desk_pages(case_id)
    found: dict[str, list[str]] = {}
    for user, paths in pages.items():
        page = site.login(browser, user)
        for path in paths:
            page.goto(site.base + path)
            if path == "/web/worklist":
                page.wait_for_selector(f"#worklist tr[data-case='{case_id}']")
            page.wait_for_load_state("load")
            problems = page.evaluate(A11Y_CHECK)
            if problems:
                found[path] = problems
        page.context.close()
    page = browser.new_page()
    page.goto(site.base + "/login")
    if problems := page.evaluate(A11Y_CHECK):
        found["/login"] = problems
    page.close()
    assert not found, found


def test_the_accessibility_check_finds_what_it_looks_for(browser: Any) -> None:
    page = browser.new_page()
    page.set_content(
        '<html><body><p style="color:#bbb">pale text</p><input id="x"><img src="data:,">'
        '<label for="y">Named</label><input id="y"><p style="color:#222">dark text</p></body></html>'
    )
    problems = page.evaluate(A11Y_CHECK)
    page.close()
    assert sorted(problems) == sorted(
        [
            'contrast 1.92 on "pale text"',
            "unnamed input#x",
            "no text alternative: img",
            "no lang",
            "no main landmark",
        ]
    )
