"""Reading cases: the worklist and one case, always inside the caller's clinic scope."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.log import EventCode, record
from triage_api.auth import Principal
from triage_api.errors import NotFound
from triage_api.tables import Case, Prediction


def scoped_case(session: Session, principal: Principal, case_id: str) -> Case:
    """The one lookup by id: a case outside the caller's clinics does not exist for them.

    Raises:
        NotFound: no such case in the caller's clinics (also when it exists elsewhere).
    """
    case = session.get(Case, case_id) if len(case_id) <= 32 else None
    if case is None or case.clinic_id not in principal.clinic_ids:
        raise NotFound("no such case")
    return case


def read_case(session: Session, *, principal: Principal, case_id: str) -> tuple[Case, Prediction | None]:
    """A case with its current prediction; the read is audited (110103)."""
    case = scoped_case(session, principal, case_id)
    prediction = session.execute(
        select(Prediction).where(Prediction.case_id == case.id).order_by(Prediction.attempt.desc()).limit(1)
    ).scalar_one_or_none()
    record(
        session,
        actor=principal.actor,
        action="case.view",
        code=EventCode.ACCESS,
        object_type="case",
        object_id=case.id,
    )
    return case, prediction


def worklist(
    session: Session,
    *,
    principal: Principal,
    status: str | None = None,
    tier: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Case]:
    """The caller's clinics' cases, earliest deadline first; the query is audited (110112)."""
    query = select(Case).where(Case.clinic_id.in_(principal.clinic_ids))
    if status is not None:
        query = query.where(Case.status == status)
    if tier is not None:
        query = query.where(Case.tier == tier)
    query = query.order_by(Case.deadline, Case.received_at, Case.id).limit(limit).offset(offset)
    cases = list(session.execute(query).scalars())
    record(
        session,
        actor=principal.actor,
        action="worklist.query",
        code=EventCode.QUERY,
        object_type="worklist",
        object_id=",".join(str(c) for c in sorted(principal.clinic_ids))[:64],
        details={"status": status, "tier": tier, "limit": limit, "offset": offset, "count": len(cases)},
    )
    return cases


def waited_seconds(case: Case, now: datetime | None = None) -> float:
    return ((now or datetime.now(UTC)) - case.received_at).total_seconds()
