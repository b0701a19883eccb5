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
