"""Reading cases: the worklist and one case, always inside the caller's clinic scope."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from audit.log import EventCode, record
from triage_api.auth import Principal, Role
from triage_api.errors import NotFound, NotPermitted
from triage_api.tables import Appeal, Case, Prediction
from triage_api.vocab import AppealStatus


def scoped_case(session: Session, principal: Principal, case_id: str) -> Case:
    """The one lookup by id: a case outside the caller's clinics does not exist for them.

    Raises:
        NotFound: no such case in the caller's clinics (also when it exists elsewhere).
    """
    case = session.get(Case, case_id) if len(case_id) <= 32 else None
    if case is None or case.clinic_id not in principal.clinic_ids:
        raise NotFound("no such case")
    return case


def appeal_reader_of(session: Session, principal: Principal, case_id: str) -> Appeal | None:
    """The open appeal on ``case_id`` that ``principal`` is the blinded second reader of."""
    return session.execute(
        select(Appeal).where(
            Appeal.case_id == case_id,
            Appeal.assigned_to == principal.user_id,
            Appeal.status == AppealStatus.ASSIGNED,
        )
    ).scalar_one_or_none()


def unblinded_case(session: Session, principal: Principal, case_id: str) -> Case:
    """A case in scope that the caller may see with its AI score and first read.

    Raises:
        NotFound: outside the caller's clinics.
        NotPermitted: the caller is this case's blinded appeal reader.
    """
    case = scoped_case(session, principal, case_id)
    if principal.role is Role.RADIOLOGIST and appeal_reader_of(session, principal, case.id):
        raise NotPermitted("you are this case's appeal reader; open it through the appeal (blinded)")
    return case


def read_case(session: Session, *, principal: Principal, case_id: str) -> tuple[Case, Prediction | None]:
    """A case with its current prediction; the read is audited (110103)."""
    case = unblinded_case(session, principal, case_id)
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


def worklist_query(
    principal: Principal,
    *,
    status: str | None = None,
    tier: str | None = None,
    unread: bool | None = None,
) -> Select[Case]:
    """The worklist's rows and order (earliest deadline first), for :func:`worklist` and for
    :func:`triage_api.reading.claim_next`; nothing is executed or audited here."""
    query = select(Case).where(Case.clinic_id.in_(principal.clinic_ids))
    if principal.role is Role.RADIOLOGIST:  # an appeal's second reader meets the case only blinded
        blinded = select(Appeal.case_id).where(
            Appeal.assigned_to == principal.user_id, Appeal.status == AppealStatus.ASSIGNED
        )
        query = query.where(Case.id.not_in(blinded))
    if status is not None:
        query = query.where(Case.status == status)
    if tier is not None:
        query = query.where(Case.tier == tier)
    if unread is not None:
        query = query.where(Case.read_at.is_(None) if unread else Case.read_at.is_not(None))
    return query.order_by(Case.deadline, Case.received_at, Case.id)


def worklist(
    session: Session,
    *,
    principal: Principal,
    status: str | None = None,
    tier: str | None = None,
    unread: bool | None = None,
    limit: int = 100,
    offset: int = 0,
    audit: bool = True,
) -> list[Case]:
    """The caller's clinics' cases, earliest deadline first; the query is audited (110112).

    With ``audit=False`` the caller records the query itself (see :func:`audit_worklist`).
    """
    query = worklist_query(principal, status=status, tier=tier, unread=unread)
    cases = list(session.execute(query.limit(limit).offset(offset)).scalars())
    if audit:
        filters = {"status": status, "tier": tier, "unread": unread, "limit": limit, "offset": offset}
        audit_worklist(session, principal=principal, filters=filters, count=len(cases))
    return cases


def audit_worklist(session: Session, *, principal: Principal, filters: dict[str, Any], count: int) -> None:
    """Record a worklist query (110112): who, which clinics, which filters, how many cases."""
    record(
        session,
        actor=principal.actor,
        action="worklist.query",
        code=EventCode.QUERY,
        object_type="worklist",
        object_id=",".join(str(c) for c in sorted(principal.clinic_ids))[:64],
        details={**filters, "count": count},
    )


def study_reference(case: Case) -> str | None:
    """How a reader names the study: its accession number, or where the sender withheld it, a
    short form of the site's patient pseudonym (an HMAC, so it links a patient's studies on
    this site without saying who they are); None for a picture, which carries neither.

    For pages shown to the case's readers only: like the accession number it never goes into
    a log, an audit detail or an error message.
    """
    if case.accession_number:
        return case.accession_number
    if case.patient_pseudonym:
        return f"no accession · patient ref {case.patient_pseudonym[:8].upper()}"
    return None
