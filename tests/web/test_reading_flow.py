"""The reading flow in the browser: a read typed while the session ended is not lost."""

from __future__ import annotations

from typing import Any

from tests.web.conftest import PASSWORD, Site


def test_a_read_typed_while_the_session_expired_is_restored_after_login(site: Site, browser: Any) -> None:
    case_id = site.upload("up-north", 21)
    site.wait_scored("dr-north", case_id)
    page = site.login(browser, "dr-north")
    page.goto(f"{site.base}/web/cases/{case_id}")
    page.get_by_role("button", name="Claim").click()
    page.wait_for_selector("#read-form")
    page.get_by_label("Finding").select_option("pneumonia")
    page.get_by_label("I override it").check()
    page.get_by_label("clinical context").check()
    page.get_by_label("Note (stays with the read, not in the audit log)").fill("left base, compare prior")
    page.context.clear_cookies()  # the session ends while the reader types
    page.get_by_role("button", name="Save read").click()
    assert "/login?next=" in page.url
    page.get_by_label("Username").fill("dr-north")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("#draft-restored")
    assert page.url == f"{site.base}/web/cases/{case_id}"
    assert page.get_by_label("Finding").input_value() == "pneumonia"
    assert page.get_by_label("I override it").is_checked()
    assert page.get_by_label("clinical context").is_checked()
    assert page.get_by_label("Note (stays with the read, not in the audit log)").input_value() == (
        "left base, compare prior"
    )
    page.get_by_role("button", name="Save read").click()
    assert page.get_by_role("status").inner_text() == "Read saved."
    with site.api("dr-north") as api:
        read = api.get(f"/v1/studies/{case_id}").json()["read"]
    assert read["finding"] == "pneumonia" and read["override_reason"] == "clinical_context"
    page.goto(f"{site.base}/web/cases/{case_id}")
    assert page.evaluate("Object.keys(sessionStorage).length") == 0  # the saved draft is gone
    page.context.close()


def changes(site: Site, case_id: str, user: str) -> list[str]:
    """What ``user`` did to the case, as the audit log says, oldest first (views left out)."""
    with site.api("auditor") as api:
        events = api.get("/v1/audit", params={"case_id": case_id}).json()["items"]
    mine = f"user:{site.ids[user]}"
    return [
        e["action"] for e in events if e["actor"] == mine and e["action"] not in ("case.view", "case.image")
    ]


def test_a_keyboard_only_read_claims_agrees_saves_and_moves_on_to_the_next_case(
    site: Site, browser: Any
) -> None:
    ids = [site.upload("up-north", seed) for seed in (41, 42)]
    for case_id in ids:
        site.wait_scored("dr-north", case_id)
    with site.api("dr-north") as api:
        first, second = (c["id"] for c in api.get("/v1/worklist", params={"unread": True}).json())
        tier = api.get(f"/v1/studies/{first}").json()["tier"]
    page = site.login(browser, "dr-north")
    page.goto(f"{site.base}/web/cases/{first}")
    assert "c claim" in page.locator("#read-keys").inner_text()  # the keys are shown
    page.keyboard.press("c")
    page.wait_for_selector("#read-form")
    page.wait_for_load_state("load")
    assert "Claimed by you" in page.locator("#claim-state").inner_text()

    # A routine agree-and-next: two keys, one page load.
    loads: list[str] = []
    page.on("load", lambda p: loads.append(p.url))
    page.keyboard.press("a")
    assert page.get_by_label("I agree").is_checked()
    expected = "pneumonia" if tier in ("critical", "elevated") else "normal"
    assert page.get_by_label("Finding").input_value() == expected  # the finding the AI's tier implies
    page.keyboard.press("n")
    page.wait_for_url(f"{site.base}/web/cases/{second}?saved={first}")
    page.wait_for_load_state("load")
    assert loads == [page.url]
    assert page.get_by_role("status").inner_text().startswith(f"Read of case {first[:12]} saved")
    assert "Claimed by you" in page.locator("#claim-state").inner_text()

    with site.api("dr-north") as api:
        done = api.get(f"/v1/studies/{first}").json()
        now = api.get(f"/v1/studies/{second}").json()
    assert done["read"]["finding"] == expected and done["read"]["agrees_with_ai"] is True
    assert now["read"] is None and now["claimed_by"] == site.ids["dr-north"]
    assert changes(site, first, "dr-north") == ["case.claim", "case.read"]
    assert changes(site, second, "dr-north") == ["case.claim"]

    # Keys do nothing while the reader types; Esc leaves the field, and the keys work again.
    note = page.get_by_label("Note (stays with the read, not in the audit log)")
    note.focus()
    page.keyboard.type("no consolidation")
    assert note.input_value() == "no consolidation" and page.url.endswith(f"?saved={first}")
    assert (
        not page.get_by_label("I agree").is_checked() and not page.get_by_label("I override it").is_checked()
    )
    page.keyboard.press("Escape")
    # Override: "o" opens the reason picker on its first reason; a digit picks one; "d" and
    # the arrow keys choose the finding. A digit with the picker closed picks no reason.
    assert page.locator("#reason-picker").is_hidden()
    page.keyboard.press("5")
    assert not page.get_by_label("I override it").is_checked() and page.locator("#reason-picker").is_hidden()
    page.keyboard.press("o")
    assert page.get_by_label("I override it").is_checked() and page.locator("#reason-picker").is_visible()
    assert page.evaluate("document.activeElement.value") == "false_positive"
    page.keyboard.press("3")
    assert page.get_by_label("image quality").is_checked()
    page.keyboard.press("d")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Escape")
    assert page.get_by_label("Finding").input_value() == "normal"
    page.keyboard.press("s")
    page.wait_for_url(f"{site.base}/web/cases/{second}?done=read")
    assert page.get_by_role("status").inner_text() == "Read saved."
    with site.api("dr-north") as api:
        read = api.get(f"/v1/studies/{second}").json()["read"]
    assert (read["finding"], read["agrees_with_ai"], read["override_reason"]) == (
        "normal",
        False,
        "image_quality",
    )
    assert changes(site, second, "dr-north") == ["case.claim", "case.override"]

    # Nothing is left to read: "n" says so on the worklist.
    page.keyboard.press("n")
    page.wait_for_url(f"{site.base}/web/worklist?done=none-left")
    assert page.get_by_role("status").first.inner_text() == "No unclaimed case is left to read."
    assert page.evaluate("Object.keys(sessionStorage).length") == 0  # no draft outlives its read
    page.context.close()
