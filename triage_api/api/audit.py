"""Audit routes (``GET /v1/audit``): auditors read the log, and that reading is itself audited.

Who sees what. An auditor sees, by the object an event is about:

- ``case``, ``appeal``, ``alert``: only when the case, appeal or alert belongs to one of the
  auditor's clinics;
- ``worklist``, ``metrics`` (queries): only when the actor is a user granted one of the
  auditor's clinics;
- ``audit`` (someone used the audit log; the event holds their filters, which may name a
  case, and counts): when the actor is a user whose every clinic is one of the auditor's,
  so nothing about a clinic reaches an auditor who may not see it; when the actor is not a
  user (the command line), always;
- ``user``, ``api_key``, ``dataset`` (site security and system events: accounts, keys,
  exports): always;
- anything else: never, until someone classifies it here (closed by default).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import ColumnElement, String, and_, cast, literal, or_, select
from sqlalchemy.orm import Session

from audit.log import AuditEvent, EventCode, record
from audit.query import search
from triage_api.auth import Principal
from triage_api.db import transaction
from triage_api.deps import Auditor, RuntimeDep
from triage_api.errors import InvalidRequest
from triage_api.params import Instant, Seq
from triage_api.tables import Alert, Appeal, Case, UserClinic

router = APIRouter()

SITE_WIDE = ("user", "api_key", "dataset")
"""Object types of site security and system events, visible to every auditor."""


class AuditEventRead(BaseModel):
    """One event, with every column needed to re-check its hash (``details`` is the exact
    JSON text that was hashed)."""

    seq: int
    at: str
    actor: str
    action: str
    event_code: str
    object_type: str
    object_id: str
    outcome: int
    details: str
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    """A page of events; pass ``next_after_seq`` as ``after_seq`` for the next one."""

    items: list[AuditEventRead]
    next_after_seq: int | None


def visible_to(principal: Principal) -> ColumnElement[bool]:
    """The events ``principal`` (an auditor) may read, as a condition on ``AuditEvent``.

    Args:
        principal: the caller; its clinics come from the credential.

    Returns:
        A SQL condition (see the module docstring for the rule).
    """
    clinics = sorted(principal.clinic_ids)
    site_wide = or_(
        AuditEvent.object_type.in_(SITE_WIDE),
        and_(AuditEvent.object_type == "audit", ~AuditEvent.actor.startswith("user:")),
    )
    if not clinics:
        return site_wide
    members = select(literal("user:") + cast(UserClinic.user_id, String)).where(
        UserClinic.clinic_id.in_(clinics)
    )
    elsewhere = select(UserClinic.user_id).where(UserClinic.clinic_id.not_in(clinics))
    only_here = select(literal("user:") + cast(UserClinic.user_id, String)).where(
        UserClinic.clinic_id.in_(clinics), UserClinic.user_id.not_in(elsewhere)
    )
    return or_(
        site_wide,
        and_(AuditEvent.object_type == "audit", AuditEvent.actor.in_(only_here)),
        and_(
            AuditEvent.object_type == "case",
            AuditEvent.object_id.in_(select(Case.id).where(Case.clinic_id.in_(clinics))),
        ),
        and_(
            AuditEvent.object_type == "appeal",
            AuditEvent.object_id.in_(select(cast(Appeal.id, String)).where(Appeal.clinic_id.in_(clinics))),
        ),
        and_(
            AuditEvent.object_type == "alert",
            AuditEvent.object_id.in_(select(cast(Alert.id, String)).where(Alert.clinic_id.in_(clinics))),
        ),
        and_(AuditEvent.object_type.in_(("worklist", "metrics")), AuditEvent.actor.in_(members)),
    )


@router.get("/v1/audit", response_model=AuditPage)
def read_audit_log(
    runtime: RuntimeDep,
    principal: Auditor,
    case_id: Annotated[str | None, Query(max_length=64)] = None,
    object_type: Annotated[str | None, Query(max_length=40)] = None,
    object_id: Annotated[str | None, Query(max_length=64)] = None,
    actor: Annotated[str | None, Query(max_length=100)] = None,
    action: Annotated[str | None, Query(max_length=60)] = None,
    since: Instant | None = None,
    until: Instant | None = None,
    after_seq: Seq = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    """Audit events in the caller's clinics and site security events, oldest first."""
    if case_id is not None:
        if (object_type not in (None, "case")) or (object_id not in (None, case_id)):
            raise InvalidRequest("case_id contradicts object_type/object_id")
        object_type, object_id = "case", case_id
    with transaction(runtime.factory) as session:
        events = read_log(
            session,
            principal=principal,
            object_type=object_type,
            object_id=object_id,
            actor=actor,
            action=action,
            since=since,
            until=until,
            after_seq=after_seq,
            limit=limit,
        )
        items = [AuditEventRead.model_validate(event, from_attributes=True) for event in events]
    return AuditPage(items=items, next_after_seq=items[-1].seq if len(items) == limit else None)


def read_log(
    session: Session,
    *,
    principal: Principal,
    object_type: str | None = None,
    object_id: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_seq: int = 0,
    before_seq: int | None = None,
    newest_first: bool = False,
    limit: int = 100,
) -> list[AuditEvent]:
    """The events ``principal`` may see that match the filters (see :func:`audit.query.search`);
    the reading itself is audited (110101) with the filters and the count, in the caller's
    transaction."""
    events = list(
        search(
            session,
            visible=visible_to(principal),
            object_type=object_type,
            object_id=object_id,
            actor=actor,
            action=action,
            since=since,
            until=until,
            after_seq=after_seq,
            before_seq=before_seq,
            newest_first=newest_first,
            limit=limit,
        )
    )
    filters: dict[str, Any] = {
        "object_type": object_type,
        "object_id": object_id,
        "actor": actor,
        "action": action,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "after_seq": after_seq,
        "before_seq": before_seq,
        "newest_first": newest_first or None,
        "limit": limit,
    }
    record(
        session,
        actor=principal.actor,
        action="audit.query",
        code=EventCode.AUDIT_LOG_USED,
        object_type="audit",
        object_id="audit_events",
        details={"filters": {k: v for k, v in filters.items() if v is not None}, "returned": len(events)},
    )
    return events
