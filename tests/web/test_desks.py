"""The admin's, auditor's and clinic's desks in Chromium: what each does from the page."""

from __future__ import annotations

import re
from typing import Any

from tests.conftest import DATA
from tests.web.conftest import Site, picture, shot


def _audited(site: Site, actor: str) -> list[str]:
    with site.api("auditor") as api:
        items = api.get("/v1/audit", params={"actor": actor, "limit": 1000}).json()["items"]
    return [e["action"] for e in items]


def test_admin_manages_a_user_in_the_browser(site: Site, browser: Any) -> None:
    admin = site.login(browser, "admin")
    admin.get_by_label("Name").fill("dr-web")
    admin.get_by_label("Role").select_option("radiologist")
    admin.get_by_label("Clinics (comma-separated").fill("north")
    admin.get_by_role("button", name="Create user").click()
    assert admin.locator("#admin-done").inner_text() == "User created."
    key = admin.locator("#new-key-value").inner_text()
    assert re.fullmatch(r"trg_[0-9a-f]{12}_\S+", key)
    shot(admin, "admin-new-key")
    admin.reload()
    assert admin.locator("#new-key").count() == 0 and key not in admin.content()  # shown once
    row = admin.locator("#users tr[data-user='dr-web']")
    assert row.locator(".login").inner_text() == "no" and row.locator(".clinics").inner_text() == "north"
    with site.api("dr-north") as api:
        api.headers["Authorization"] = f"Bearer {key}"
        assert api.get("/v1/worklist").status_code == 200

        # A password, and the user signs in with it.
        row.get_by_text("Manage dr-web").click()
        admin.get_by_label("New password for dr-web").fill("a brand new password")
        row.get_by_role("button", name="Set password").click()
        assert admin.locator("#admin-done").inner_text().startswith("Password set")
        them = site.context(browser).new_page()
        them.goto(f"{site.base}/login")
        them.get_by_label("Username").fill("dr-web")
        them.get_by_label("Password").fill("a brand new password")
        them.get_by_role("button", name="Sign in").click()
        assert them.url.endswith("/web/worklist")

        # Disable: their open page is signed out at once and the key stops; enable restores it.
        row.get_by_text("Manage dr-web").click()
        admin.get_by_role("button", name="Disable dr-web").click()
        assert row.locator(".disabled").inner_text() == "yes"
        them.reload()
        assert "/login" in them.url
        assert api.get("/v1/worklist").status_code == 401
        row.get_by_text("Manage dr-web").click()
        admin.get_by_role("button", name="Enable dr-web").click()
        assert row.locator(".disabled").inner_text() == "no"
        assert api.get("/v1/worklist").status_code == 200

        # Revoke the key: the API refuses it.
        prefix = key.split("_")[1]
        admin.get_by_role("button", name=f"Revoke key {prefix}").click()
        assert "revoked" in row.locator(f"li[data-prefix='{prefix}']").inner_text()
        assert api.get("/v1/worklist").status_code == 401

    # Bad input: a precise reason, and nothing is created.
    admin.get_by_label("Name").fill("up-two")
    admin.get_by_label("Role").select_option("uploader")
    admin.get_by_label("Clinics (comma-separated").fill("north, south")
    admin.get_by_role("button", name="Create user").click()
    assert "an uploader acts for exactly one clinic" in admin.locator("#admin-error").inner_text()
    assert admin.locator("#users tr[data-user='up-two']").count() == 0
    assert admin.get_by_label("Name").input_value() == "up-two"  # the form keeps what was typed
    assert "queued" in admin.locator("#queue-depth").inner_text()
    admin_id = site.ids["admin"]
    assert [a for a in _audited(site, f"user:{admin_id}") if a != "web.login"] == [
        "user.create",
        "user.set_password",
        "user.disable",
        "user.enable",
        "key.revoke",
        "user.sessions_end",
    ]
    them.context.close()
    admin.context.close()


def _dicom_with_accession() -> bytes:
    return (DATA / "dx_thorax_dog_monochrome1.dcm").read_bytes()


def test_clinic_uploads_several_files_and_sees_them_listed(site: Site, browser: Any) -> None:
    clinic = site.login(browser, "up-north")
    clinic.locator("#upload-files").set_input_files(
        [
            {"name": "one.png", "mimeType": "image/png", "buffer": picture(71)},
            {"name": "two.dcm", "mimeType": "application/dicom", "buffer": _dicom_with_accession()},
            {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a study"},
        ]
    )
    clinic.locator("#upload-results li.accepted, #upload-results li.refused").nth(2).wait_for()
    accepted = clinic.locator("#upload-results li.accepted")
    assert accepted.count() == 2
    refused = clinic.locator("#upload-results li.refused").inner_text()
    assert refused.startswith("notes.txt") and "error:" in refused and len(refused) > 30, refused
    ids = [accepted.nth(i).get_attribute("data-case") for i in range(2)]
    for case_id in ids:
        clinic.wait_for_selector(f"#cases tr[data-case='{case_id}']")
    assert clinic.locator("#cases tbody tr[data-case]").count() == 2  # the bad file made nothing
    assert clinic.locator(f"#cases tr[data-case='{ids[1]}'] .study").inner_text() == "16387a"
    assert clinic.locator(f"#cases tr[data-case='{ids[0]}'] .study").inner_text() == str(ids[0])[:12]
    shot(clinic, "clinic-upload")
    # Dropped files go the same way.
    dropped = clinic.evaluate_handle(
        """(bytes) => {
            const files = new DataTransfer();
            files.items.add(new File([new Uint8Array(bytes)], "dropped.png", { type: "image/png" }));
            return files;
        }""",
        list(picture(73)),
    )
    clinic.dispatch_event("#drop-zone", "drop", {"dataTransfer": dropped})
    clinic.locator("#upload-results li.accepted").nth(2).wait_for()
    ids.append(clinic.locator("#upload-results li.accepted").nth(2).get_attribute("data-case"))
    clinic.wait_for_selector(f"#cases tr[data-case='{ids[2]}']")
    with site.api("up-north") as api:
        listed = {c["id"] for c in api.get("/v1/worklist").json()}
    assert listed == set(ids)
    # Another clinic sees none of them.
    other = site.login(browser, "up-south")
    text = other.content()
    assert all(str(case_id)[:12] not in text for case_id in ids) and "16387a" not in text
    other.context.close()
    clinic.context.close()


def test_auditor_filters_the_log_and_opens_an_appeals_case(site: Site, browser: Any) -> None:
    with site.api("admin") as admin:
        for name in ("log-a", "log-b"):
            made = admin.post("/v1/users", json={"name": name, "role": "radiologist", "clinics": ["north"]})
            assert made.status_code == 201
    case_id = site.upload("up-north", 72)
    site.wait_scored("dr-north", case_id)
    with site.api("dr-north") as api:
        assert api.post(f"/v1/studies/{case_id}/claim").status_code == 200
        read = {
            "finding": "normal",
            "agrees_with_ai": False,
            "override_reason": "other",
            "ai_score_shown": True,
        }
        assert api.post(f"/v1/studies/{case_id}/reads", json=read).status_code == 201
    with site.api("up-north") as api:
        appeal = {"case_id": case_id, "category": "other", "grounds": "g", "contact_reference": "r"}
        assert api.post("/v1/appeals", json=appeal).status_code == 201

    auditor = site.login(browser, "auditor")
    auditor.goto(f"{site.base}/web/audit/log")
    everything = auditor.locator("#events tbody tr[data-seq]").count()
    auditor.get_by_label("Actor").fill("admin")
    auditor.get_by_label("Action").fill("user.create")
    auditor.get_by_role("button", name="Filter").click()
    assert "actor=admin" in auditor.url and "action=user.create" in auditor.url  # kept in the URL
    rows = auditor.locator("#events tbody tr[data-seq]")
    assert rows.count() == 2 < everything
    seqs = [int(rows.nth(i).get_attribute("data-seq") or 0) for i in range(2)]
    assert seqs == sorted(seqs, reverse=True)  # newest first
    assert all(t.startswith("admin") for t in auditor.locator("#events td.actor").all_inner_texts())
    auditor.get_by_label("To", exact=True).fill("2001-01-01")
    auditor.get_by_role("button", name="Filter").click()
    assert auditor.locator("#events tbody").inner_text() == "No events match."
    auditor.goto(f"{site.base}/web/audit/log?case={case_id}")
    assert auditor.locator("#events td.action").count() >= 2  # at least the upload and the read
    assert all(
        case_id[:12] in t for t in auditor.locator("#events tbody tr td:nth-child(6)").all_inner_texts()
    )
    shot(auditor, "audit-log-filtered")

    auditor.goto(f"{site.base}/web/audit")
    auditor.locator("#appeals").get_by_role("link", name=case_id[:12]).click()
    assert auditor.url.endswith(f"/web/cases/{case_id}")
    auditor.context.close()
