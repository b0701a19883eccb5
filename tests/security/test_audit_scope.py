"""Row 2: reading the audit log is audited, and that event stays inside the reader's clinics."""

from __future__ import annotations

import pytest

from tests.conftest import runtime_of
from tests.security.conftest import Site
from triage_api import auth
from triage_api.auth import Role
from triage_api.db import transaction


def _log(site: Site, user: str, **filters: str) -> list[dict[str, str]]:
    answer = site.client.get("/v1/audit", params={"limit": "1000", **filters}, headers=site.headers(user))
    assert answer.status_code == 200, answer.text
    items: list[dict[str, str]] = answer.json()["items"]
    return items


def test_an_auditors_queries_are_invisible_to_another_clinics_auditor(site: Site) -> None:
    _log(site, "auditor-north", case_id="north-case-secret", actor="user:424242")
    site.web("auditor-north").get("/web/audit/log")  # the page verifies the chain: audited too
    south = _log(site, "auditor-south")
    assert all("north-case-secret" not in e["details"] for e in south)
    assert not [e for e in south if e["object_type"] == "audit" and e["actor"] != "cli"]
    north = _log(site, "auditor-north")
    mine = [e for e in north if e["actor"] == f"user:{site.ids['auditor-north']}"]
    assert {e["action"] for e in mine} >= {"audit.query", "audit.verify"}
    assert any("north-case-secret" in e["details"] for e in mine)


@pytest.mark.parametrize("viewer_clinics", [("north",), ("north", "south")])
def test_a_two_clinic_auditors_query_reaches_only_auditors_of_both(
    site: Site, viewer_clinics: tuple[str, ...]
) -> None:
    with transaction(runtime_of(site.client).factory) as session:
        both, both_key = auth.add_user(
            session, name="auditor-both", role=Role.AUDITOR, clinics=["north", "south"]
        )
        _, viewer_key = auth.add_user(
            session, name="auditor-viewer", role=Role.AUDITOR, clinics=list(viewer_clinics)
        )
    site.keys["auditor-both"], site.keys["auditor-viewer"] = both_key, viewer_key
    _log(site, "auditor-both", case_id="south-case-secret")
    seen = [e for e in _log(site, "auditor-viewer") if "south-case-secret" in e["details"]]
    assert bool(seen) == ("south" in viewer_clinics)
