"""The web app in a real browser: login per role, the live worklist, the viewer, the
decision form, appeals (blinded), the auditor's desk, tenancy and CSRF."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx

from tests.web.conftest import PASSWORD, Site, shot

HOMES = {
    "dr-north": ("/web/worklist", "Worklist"),
    "up-north": ("/web/clinic", "Your clinic's cases"),
    "auditor": ("/web/audit", "Overrides"),
    "admin": ("/web/admin", "Administration"),
}


def wait_until(check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_each_role_logs_in_to_its_page_and_logs_out(site: Site, browser: Any) -> None:
    for user, (path, heading) in HOMES.items():
        page = site.login(browser, user)
        assert page.url == site.base + path, user
        assert page.get_by_role("heading", level=1).first.inner_text().startswith(heading)
        cookie = next(c for c in page.context.cookies() if c["name"] == "triage_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        shot(page, f"home-{user}")
        page.get_by_role("button", name="Sign out").click()
        assert page.url == site.base + "/login"
        page.goto(site.base + path)  # the session is gone; login would return to the page
        assert page.url.startswith(site.base + "/login?next=")
        page.context.close()

    page = site.context(browser).new_page()
    page.goto(site.base + "/login")
    page.get_by_label("Username").fill("dr-north")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "Wrong username or password."
    shot(page, "login-refused")
    page.context.close()


def test_worklist_follows_deadlines_and_updates_live(site: Site, browser: Any) -> None:
    ids = [site.upload("up-north", seed) for seed in range(3)]
    for case_id in ids:
        site.wait_scored("up-north", case_id)
    with site.api("dr-north") as api:  # the last one to the top, whatever the random model said
        for case_id, tier in zip(ids, ("routine", "routine", "critical"), strict=True):
            moved = api.post(
                f"/v1/studies/{case_id}/priority", json={"tier": tier, "reason": "clinical_urgency"}
            )
            assert moved.status_code == 200, moved.text
        expected = [c["id"] for c in api.get("/v1/worklist", params={"unread": True}).json()]
    assert expected == [ids[2], ids[0], ids[1]]

    page = site.login(browser, "dr-north")
    rows = page.locator("#worklist tbody tr[data-case]")
    rows.first.wait_for()
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.case)") == expected
    deadlines = rows.evaluate_all("rs => rs.map(r => Date.parse(r.dataset.deadline))")
    assert deadlines == sorted(deadlines)
    assert "critical" in rows.first.inner_text()

    new = site.upload("up-north", 99)  # arrives while the page is open
    wait_until(lambda: new in rows.evaluate_all("rs => rs.map(r => r.dataset.case)"), timeout=30)
    shot(page, "worklist")

    page.get_by_label("Tier").select_option("critical")  # filters reload the list at once
    wait_until(lambda: not {ids[0], ids[1]} & set(rows.evaluate_all("rs => rs.map(r => r.dataset.case)")))
    assert set(rows.locator(".tier").all_inner_texts()) == {"critical"}
    assert rows.first.get_attribute("data-case") == ids[2]
    page.get_by_label("Tier").select_option("")
    wait_until(lambda: rows.count() == 4)

    page.keyboard.press("j")
    second = rows.nth(1).get_attribute("data-case")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/web/cases/{second}")
    page.go_back()
    rows.first.wait_for()
    page.keyboard.press("n")  # next case: the first unclaimed one
    page.wait_for_url(f"**/web/cases/{ids[2]}")
    page.context.close()


def pixels(page: Any) -> list[int]:
    return list(
        page.evaluate(
            """() => { const c = document.getElementById('canvas');
            const d = c.getContext('2d').getImageData(c.width / 2 - 20, c.height / 2 - 20, 40, 40).data;
            return Array.from(d.filter((_, i) => i % 4 === 0)); }"""
        )
    )


def test_viewer_override_and_auditor_desk(site: Site, browser: Any) -> None:
    case_id = site.upload("up-north", 7)
    case = site.wait_scored("dr-north", case_id)
    assert case["status"] == "scored"
    page = site.login(browser, "dr-north")
    page.goto(f"{site.base}/web/cases/{case_id}")
    page.wait_for_selector("#viewer[data-ready='1']")
    assert page.locator("#risk").inner_text() == f"{case['risk'] * 100:.1f}%"
    assert "plumbing tests only" in page.locator("details").inner_text()  # the model card

    before = pixels(page)
    box = page.locator("#canvas").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 150, y + 60, steps=5)  # narrower window, higher level
    page.mouse.up()
    after_wl = pixels(page)
    assert after_wl != before
    page.get_by_label("Heat map (h)").check()
    page.wait_for_selector("#viewer[data-heatmap-loaded='1']")
    assert pixels(page) != after_wl
    shot(page, "case-viewer")

    page.get_by_role("button", name="Claim").click()
    # A locator wait, not wait_for_function: the page's CSP forbids evaluating strings.
    page.locator("#claim-state", has_text="dr-north").wait_for()

    # An override without a reason is refused and nothing is saved.
    page.get_by_label("Finding").select_option("normal")
    page.get_by_label("I override it").check()
    page.get_by_role("button", name="Save read").click()
    assert page.locator("[data-code]").get_attribute("data-code") == "invalid_request"
    assert "reason" in page.get_by_role("alert").inner_text()
    shot(page, "override-refused")
    with site.api("dr-north") as api:
        assert api.get(f"/v1/studies/{case_id}").json()["read"] is None

    page.goto(f"{site.base}/web/cases/{case_id}")
    token = page.locator("meta[name='csrf-token']").get_attribute("content")
    # POSTs without (or with a wrong) CSRF token are refused and change nothing.
    form = {"finding": "normal", "agreement": "agree"}
    for headers in ({}, {"X-CSRF-Token": "0" * 64}):
        refused = page.request.post(f"{site.base}/web/cases/{case_id}/read", form=form, headers=headers)
        assert refused.status == 403
    assert page.request.post(f"{site.base}/web/cases/{case_id}/release").status == 403
    with site.api("dr-north") as api:
        body = api.get(f"/v1/studies/{case_id}").json()
        assert body["read"] is None and body["claimed_by"] == site.ids["dr-north"]

    page.get_by_label("Finding").select_option("normal")
    page.get_by_label("I override it").check()
    page.get_by_label("image quality").check()
    page.locator("#note").fill("rotated film")
    page.get_by_role("button", name="Save read").click()
    assert page.get_by_role("status").inner_text() == "Read saved."
    assert "overrides the AI (image quality)" in page.locator("#final-read").inner_text()
    page.context.close()

    auditor = site.login(browser, "auditor")
    row = auditor.locator("#overrides tbody tr", has_text=case_id[:12])
    assert row.locator(".reason").inner_text() == "image quality"
    auditor.get_by_label("Reader").select_option(label="dr-north")
    auditor.get_by_role("button", name="Filter").click()
    assert auditor.locator("#overrides tbody tr", has_text=case_id[:12]).count() == 1
    auditor.get_by_label("Reason").select_option("false_positive")
    auditor.get_by_role("button", name="Filter").click()
    assert auditor.get_by_role("heading", level=1).inner_text() == "Overrides"
    assert auditor.locator("#overrides tbody").inner_text() == "No overrides match."
    shot(auditor, "auditor-overrides")
    # The auditor sees the case but has no decision form, and a forged read is refused.
    auditor.goto(f"{site.base}/web/cases/{case_id}")
    assert auditor.locator("#read-form").count() == 0
    token = auditor.locator("meta[name='csrf-token']").get_attribute("content")
    forged = auditor.request.post(
        f"{site.base}/web/cases/{case_id}/read", form={**form, "csrf_token": token or ""}
    )
    assert forged.status == 403
    auditor.goto(f"{site.base}/web/audit/log")
    assert auditor.locator("#chain-ok").count() == 1
    shot(auditor, "audit-log")
    auditor.goto(f"{site.base}/web/audit/monitoring")
    assert auditor.locator("#override-days").count() == 1
    assert auditor.locator(".charts svg[role=img]").count() >= 5  # override rate, AUROC, per-model charts
    shot(auditor, "monitoring")
    auditor.context.close()


def test_appeal_is_filed_by_the_clinic_and_decided_blinded(site: Site, browser: Any) -> None:
    case_id = site.upload("up-north", 11)
    case = site.wait_scored("dr-north", case_id)
    with site.api("dr-north") as api:
        assert api.post(f"/v1/studies/{case_id}/claim").status_code == 200
        read = api.post(
            f"/v1/studies/{case_id}/reads",
            json={
                "finding": "normal",
                "agrees_with_ai": False,
                "override_reason": "other",
                "ai_score_shown": True,
            },
        )
        assert read.status_code == 201, read.text

    clinic = site.login(browser, "up-north")
    clinic.get_by_label("Case", exact=True).select_option(case_id)
    clinic.get_by_label("Category").select_option("disagree_with_result")
    clinic.get_by_label("Grounds").fill("symptoms persist")
    clinic.get_by_label("Your contact reference").fill("REF-1")
    clinic.get_by_role("button", name="File appeal").click()
    assert clinic.get_by_role("status").inner_text() == "Appeal filed."
    shot(clinic, "clinic")

    second = site.login(browser, "dr-second")
    second.get_by_role("button", name="Take (blinded second read)").click()
    assert re.search(r"/web/appeals/\d+$", second.url)
    second.wait_for_selector("#viewer[data-ready='1']")
    text = second.locator("main").inner_text()
    assert "%" not in text and "risk" not in text.lower() and "heat map" not in text.lower(), text
    assert "AI result" not in text and "Final read" not in text and "dr-north" not in text
    assert second.locator("#heatmap").count() == 0 and second.locator("#risk").count() == 0
    html = second.content()
    assert "heatmap" not in html and case_id not in html and f"{case['risk'] * 100:.1f}%" not in html
    shot(second, "appeal-blinded")
    # The unblinded case page is closed to the blinded reader.
    assert second.request.get(f"{site.base}/web/cases/{case_id}").status == 403
    second.go_back() if False else None
    second.get_by_label("Finding").select_option("pneumonia")
    assert second.get_by_label("Outcome for the original result").count() == 0  # blinded: no verdict asked
    second.get_by_label("Rationale").fill("consolidation in the right lower lobe")
    second.get_by_role("button", name="Save my read").click()
    assert second.url.endswith("/web/worklist")
    second.context.close()

    clinic.reload()
    outcome = clinic.locator("#appeals tbody tr").first
    assert "overturned" in outcome.inner_text() and "pneumonia" in outcome.inner_text()
    # The clinic sees its case's result and the appeal's outcome, as the API shows them, and
    # never the AI score, heat map or reader: the case page is closed to it, like the heat map.
    row = clinic.locator(f"#cases tr[data-case='{case_id}']").inner_text()
    assert "pneumonia (after appeal)" in row and "overturned" in row and "%" not in row
    assert "dr-north" not in clinic.content() and "dr-second" not in clinic.content()
    for path in (f"/web/cases/{case_id}", f"/web/cases/{case_id}/heatmap.png", "/web/api/worklist"):
        assert clinic.request.get(f"{site.base}{path}").status == 403, path
    clinic.context.close()

    # The overturning second read is now the case's result, with the first read as history.
    reader = site.login(browser, "dr-north")
    reader.goto(f"{site.base}/web/cases/{case_id}")
    assert "pneumonia by dr-second" in reader.locator("#final-read").inner_text()
    history = reader.locator("#result-history li").all_inner_texts()
    assert len(history) == 2 and "first read" in history[0] and "overturned" in history[1]
    reader.context.close()


def test_a_reader_cannot_open_another_clinics_case(site: Site, browser: Any) -> None:
    south_case = site.upload("up-south", 21)
    page = site.login(browser, "dr-north")
    response = page.goto(f"{site.base}/web/cases/{south_case}")
    assert response is not None and response.status == 404
    assert "no such case" in page.get_by_role("alert").inner_text()
    assert page.request.get(f"{site.base}/web/cases/{south_case}/pixels").status == 404
    assert page.request.get(f"{site.base}/web/cases/{south_case}/heatmap.png").status == 404
    shot(page, "not-found")
    page.context.close()
    # Without a session, JSON routes answer 401 and pages send you to the login.
    assert httpx.get(f"{site.base}/web/api/worklist").status_code == 401
    assert PASSWORD  # the fixture's users all share it
