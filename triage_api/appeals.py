"""Appeals: a clinic asks, for its patient, for an independent and blinded second read.

The second reader is a radiologist of the case's clinic who has never opened the case
unblinded (its page, score, image, heat map, claim or read): the audit log knows, since
every such access is recorded against the case.
While assigned, they see the case only through the appeal, without the AI score and
without the first read; their read and the outcome go back to the clinic. Admins and
auditors can see appeals but not decide them. Everything is audited.

The second reader gives their own read (a finding and a rationale), never a verdict on a
first read they cannot see: the service derives the outcome by comparing the two findings
(:func:`outcome_of`). Unless upheld, the second read becomes the case's current result
(:func:`current_result`); the first read stays, as history.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.log import AuditEvent, EventCode, record
from triage_api.auth import Principal, Role
from triage_api.cases import scoped_case
from triage_api.errors import Conflict, InvalidRequest, NotFound
from triage_api.reading import primary_read
from triage_api.schemas import ClinicCase, clinic_case
from triage_api.tables import Appeal, Case, Read, User
from triage_api.vocab import AppealOutcome, AppealStatus, Finding, ReadKind

OPEN = (AppealStatus.OPEN, AppealStatus.ASSIGNED)


def _audit(session: Session, principal: Principal, action: str, appeal: Appeal, **details: object) -> None:
    record(
        session,
        actor=principal.actor,
        action=action,
        code=EventCode.ACCESS,
        object_type="appeal",
        object_id=str(appeal.id),
        details={"case": appeal.case_id, **details},
    )


def visible_appeal(session: Session, principal: Principal, appeal_id: int) -> Appeal:
    """The one lookup of an appeal by id, scoped to who may see it.

    Clinics (uploaders) and auditors see their clinics' appeals, admins all of them,
    radiologists the ones assigned to them.

    Raises:
        NotFound: no such appeal for this caller.
    """
    appeal = session.get(Appeal, appeal_id)
    if appeal is None or not _may_see(principal, appeal):
        raise NotFound("no such appeal")
    return appeal


def _may_see(principal: Principal, appeal: Appeal) -> bool:
    if principal.role is Role.ADMIN:
        return True
    if principal.role is Role.RADIOLOGIST:
        return appeal.assigned_to == principal.user_id or (
            appeal.status == AppealStatus.OPEN and appeal.clinic_id in principal.clinic_ids
        )
    return appeal.clinic_id in principal.clinic_ids


def list_appeals(session: Session, *, principal: Principal, status: str | None = None) -> list[Appeal]:
    """Appeals the caller may see, most urgent due date first."""
    query = select(Appeal).order_by(Appeal.due_at, Appeal.id)
    if principal.role is Role.RADIOLOGIST:
        query = query.where(
            (Appeal.assigned_to == principal.user_id)
            | ((Appeal.status == AppealStatus.OPEN) & Appeal.clinic_id.in_(principal.clinic_ids))
        )
    elif principal.role is not Role.ADMIN:
        query = query.where(Appeal.clinic_id.in_(principal.clinic_ids))
    if status is not None:
        query = query.where(Appeal.status == status)
    return list(session.execute(query).scalars())


def file_appeal(
    session: Session,
    *,
    principal: Principal,
    case_id: str,
    category: str,
    grounds: str,
    contact_reference: str,
    due_hours: float,
) -> Appeal:
    """A clinic files an appeal on one of its cases.

    Raises:
        NotFound: the case is not the clinic's.
        Conflict: the case already has an appeal in progress.
    """
    case = scoped_case(session, principal, case_id)
    if case.read_at is None:
        raise Conflict("the case has no result yet; an appeal asks for a second read of a result")
    pending = session.execute(
        select(Appeal.id).where(Appeal.case_id == case.id, Appeal.status.in_(OPEN))
    ).first()
    if pending is not None:
        raise Conflict("this case already has an appeal in progress")
    now = datetime.now(UTC)
    appeal = Appeal(
        case_id=case.id,
        clinic_id=case.clinic_id,
        filed_by=principal.user_id,
        category=category,
        grounds=grounds,
        contact_reference=contact_reference,
        status=AppealStatus.OPEN,
        due_at=now + timedelta(hours=due_hours),
        created_at=now,
    )
    session.add(appeal)
    session.flush()
    _audit(session, principal, "appeal.file", appeal, category=category)
    return appeal


def has_opened(session: Session, *, reader_id: int, case_id: str) -> bool:
    """Whether the user has touched the case outside an appeal: any audit event about the
    case by them (view, image, heat map, claim, read, reprioritisation).

    Returns:
        True if such an event exists; the appeal's own blinded views are appeal events,
        so they do not count.
    """
    return (
        session.execute(
            select(AuditEvent.seq)
            .where(
                AuditEvent.object_type == "case",
                AuditEvent.object_id == case_id,
                AuditEvent.actor == f"user:{reader_id}",
            )
            .limit(1)
        ).first()
        is not None
    )


def _assign(session: Session, appeal: Appeal, reader: User) -> None:
    if appeal.status != AppealStatus.OPEN:
        raise Conflict(f"the appeal is {appeal.status}")
    if reader.role != Role.RADIOLOGIST.value or reader.disabled:
        raise InvalidRequest("an appeal is read by an active radiologist")
    if appeal.clinic_id not in {c.id for c in reader.clinics}:
        raise InvalidRequest("the reader does not read for this case's clinic")
    first = primary_read(session, appeal.case_id)
    if first is not None and first.reader_id == reader.id:
        raise Conflict("the first reader cannot be the appeal's second reader")
    if has_opened(session, reader_id=reader.id, case_id=appeal.case_id):
        raise Conflict(
            "this reader has already opened the case (score, image or read), so cannot read it blinded"
        )
    appeal.assigned_to, appeal.status = reader.id, AppealStatus.ASSIGNED


def take_appeal(session: Session, *, principal: Principal, appeal_id: int) -> Appeal:
    """A radiologist of the clinic, who did not read the case, takes the appeal."""
    appeal = visible_appeal(session, principal, appeal_id)
    _assign(session, appeal, session.get_one(User, principal.user_id))
    _audit(session, principal, "appeal.assign", appeal, reader=principal.user_id)
    return appeal


def assign_appeal(session: Session, *, principal: Principal, appeal_id: int, reader_id: int) -> Appeal:
    """An admin assigns the appeal to a radiologist who did not read the case."""
    appeal = visible_appeal(session, principal, appeal_id)
    reader = session.get(User, reader_id)
    if reader is None:
        raise InvalidRequest("no such reader")
    _assign(session, appeal, reader)
    _audit(session, principal, "appeal.assign", appeal, reader=reader_id)
    return appeal


def assigned_appeal(session: Session, principal: Principal, appeal_id: int) -> tuple[Appeal, Case]:
    """The appeal and its case, for the assigned second reader only (blinded use).

    Raises:
        NotFound: not an appeal assigned to the caller.
    """
    appeal = session.get(Appeal, appeal_id)
    if appeal is None or appeal.assigned_to != principal.user_id or appeal.status != AppealStatus.ASSIGNED:
        raise NotFound("no such appeal assigned to you")
    return appeal, session.get_one(Case, appeal.case_id)


def blinded_view(session: Session, *, principal: Principal, appeal_id: int) -> tuple[Appeal, Case]:
    """What the second reader may see: the study, not the AI score, not the first read."""
    appeal, case = assigned_appeal(session, principal, appeal_id)
    _audit(session, principal, "appeal.case_view", appeal, blinded=True)
    return appeal, case


def outcome_of(first: Finding, second: Finding) -> AppealOutcome:
    """Upheld when the findings agree; overturned when they disagree on pneumonia; otherwise
    (e.g. normal against other finding, or a non-diagnostic film) partially (amended)."""
    if first == second:
        return AppealOutcome.UPHELD
    if Finding.PNEUMONIA in (first, second) and Finding.NON_DIAGNOSTIC not in (first, second):
        return AppealOutcome.OVERTURNED
    return AppealOutcome.PARTIALLY


def decide(
    session: Session,
    *,
    principal: Principal,
    appeal_id: int,
    finding: Finding,
    rationale: str,
) -> tuple[Appeal, Read]:
    """Record the second reader's own read; the outcome follows from the first read's finding."""
    appeal, case = assigned_appeal(session, principal, appeal_id)
    first = primary_read(session, case.id)
    if first is None:  # file_appeal needs a read; kept as a guard for appeals filed before that rule
        raise Conflict("the case has no first read to compare with")
    outcome = outcome_of(Finding(first.finding), finding)
    now = datetime.now(UTC)
    read = Read(
        case_id=case.id,
        reader_id=principal.user_id,
        kind=ReadKind.APPEAL,
        appeal_id=appeal.id,
        finding=finding,
        agrees_with_ai=None,
        override_reason=None,
        note=None,
        ai_score_shown=False,
        ai_risk=case.risk,
        model_ref=case.model_ref,
        created_at=now,
    )
    session.add(read)
    appeal.status, appeal.outcome = AppealStatus.DECIDED, outcome
    appeal.rationale, appeal.decided_at = rationale, now
    session.flush()
    _audit(session, principal, "appeal.decide", appeal, outcome=outcome, finding=finding, read_id=read.id)
    return appeal, read


def result_history(session: Session, case_id: str) -> list[tuple[Read, Appeal | None]]:
    """The case's results, oldest first: the first read, then each decided appeal's read."""
    return histories(session, [case_id]).get(case_id, [])


def histories(session: Session, case_ids: list[str]) -> dict[str, list[tuple[Read, Appeal | None]]]:
    """:func:`result_history` of several cases in one query (for lists)."""
    rows = session.execute(
        select(Read, Appeal)
        .outerjoin(Appeal, Appeal.id == Read.appeal_id)
        .where(Read.case_id.in_(case_ids))
        .order_by(Read.created_at, Read.id)
    ).all()
    out: dict[str, list[tuple[Read, Appeal | None]]] = {}
    for read, appeal in rows:
        out.setdefault(read.case_id, []).append((read, appeal))
    return out


def clinic_view(session: Session, rows: list[Case]) -> list[ClinicCase]:
    """The clinic's view of its cases (see :class:`~triage_api.schemas.ClinicCase`)."""
    found = histories(session, [case.id for case in rows])
    shown = []
    for case in rows:
        history = found.get(case.id, [])
        shown.append(clinic_case(case, history, current_result(history)))
    return shown


def current_result(history: list[tuple[Read, Appeal | None]]) -> Read | None:
    """The read that stands now: the latest appeal read that was not upheld, else the first read."""
    standing = None
    for read, appeal in history:
        if appeal is None or appeal.outcome != AppealOutcome.UPHELD:
            standing = read
    return standing


def second_read(session: Session, appeal: Appeal) -> Read | None:
    return session.execute(
        select(Read).where(Read.appeal_id == appeal.id, Read.kind == ReadKind.APPEAL)
    ).scalar_one_or_none()
