"""Reading a case: claim, final read (agree or override with a reason), reprioritise.

Every change writes an audit event in its transaction. Free-text notes stay in their table
and never go into audit details (they may name the patient).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.log import EventCode, record
from triage_api import golive
from triage_api.auth import Principal, Role
from triage_api.cases import unblinded_case
from triage_api.errors import Conflict, InvalidRequest, NotFound, NotPermitted
from triage_api.priority import sla
from triage_api.settings import Settings
from triage_api.tables import Case, Read, Reprioritisation
from triage_api.vocab import Finding, OverrideReason, ReadKind, Tier


def _audit(session: Session, principal: Principal, action: str, case: Case, **details: object) -> None:
    record(
        session,
        actor=principal.actor,
        action=action,
        code=EventCode.ACCESS,
        object_type="case",
        object_id=case.id,
        details=details,
    )


def claim(session: Session, *, principal: Principal, case_id: str) -> Case:
    """Take the soft lock on a case so other readers see it is being read.

    Raises:
        Conflict: another reader holds it, or it is already read.
    """
    case = unblinded_case(session, principal, case_id)
    if case.read_at is not None:
        raise Conflict("the case is already read")
    if case.claimed_by not in (None, principal.user_id):
        raise Conflict("another reader has claimed this case")
    case.claimed_by, case.claimed_at = principal.user_id, datetime.now(UTC)
    _audit(session, principal, "case.claim", case)
    return case


def release(session: Session, *, principal: Principal, case_id: str) -> Case:
    """Release a claim: the reader who holds it, or an admin (who sees no case data).

    Raises:
        NotFound: no such case for this caller, or it is not claimed.
        NotPermitted: a reader releasing someone else's claim.
    """
    if principal.role is Role.ADMIN:
        found = session.get(Case, case_id) if len(case_id) <= 32 else None
        if found is None:
            raise NotFound("no such case")
        case = found
    else:
        case = unblinded_case(session, principal, case_id)
        if case.claimed_by not in (None, principal.user_id):
            raise NotPermitted("only the reader who claimed the case, or an admin, may release it")
    if case.claimed_by is None:
        raise NotFound("the case is not claimed")
    released = case.claimed_by
    case.claimed_by, case.claimed_at = None, None
    _audit(session, principal, "case.release", case, released_user=released)
    return case


def record_read(
    session: Session,
    *,
    principal: Principal,
    case_id: str,
    finding: Finding,
    agrees_with_ai: bool | None,
    override_reason: OverrideReason | None,
    note: str | None,
    ai_score_shown: bool,
) -> Read:
    """Record the final (primary) read of a case.

    Disagreeing with the AI is an override and needs a reason code. A case without an AI
    result (not analysed, failed, still queued) takes no agree/disagree. Whether the AI was
    shown is the server's to say where it withheld it (shadow mode, the AI-blind sample):
    ``ai_score_shown`` is then recorded false whatever the client sent.

    Raises:
        InvalidRequest: agree/override fields inconsistent with the case (422).
        Conflict: already read, or claimed by another reader.
    """
    case = unblinded_case(session, principal, case_id)
    if case.read_at is not None:
        raise Conflict("the case is already read")
    if case.claimed_by not in (None, principal.user_id):
        raise Conflict("another reader has claimed this case")
    shown = bool(golive.shown_cases(session, [case]))
    ai_score_shown = ai_score_shown and shown
    if not shown:
        if agrees_with_ai is not None or override_reason is not None:
            raise InvalidRequest("the case has no AI result to agree or disagree with")
    elif agrees_with_ai is None:
        raise InvalidRequest("say whether you agree with the AI result (agrees_with_ai)")
    elif agrees_with_ai is False and override_reason is None:
        raise InvalidRequest("an override needs a reason code (override_reason)")
    elif agrees_with_ai is True and override_reason is not None:
        raise InvalidRequest("override_reason is only for disagreeing with the AI")
    now = datetime.now(UTC)
    read = Read(
        case_id=case.id,
        reader_id=principal.user_id,
        kind=ReadKind.PRIMARY,
        finding=finding,
        agrees_with_ai=agrees_with_ai,
        override_reason=override_reason,
        note=note,
        ai_score_shown=ai_score_shown,
        ai_risk=case.risk if shown else None,
        model_ref=case.model_ref if shown else None,
        created_at=now,
    )
    session.add(read)
    case.read_at = now
    case.claimed_by, case.claimed_at = None, None
    session.flush()
    _audit(
        session,
        principal,
        "case.override" if agrees_with_ai is False else "case.read",
        case,
        read_id=read.id,
        finding=finding,
        agrees_with_ai=agrees_with_ai,
        override_reason=override_reason,
        ai_score_shown=ai_score_shown,
    )
    return read


def reprioritise(
    session: Session,
    *,
    principal: Principal,
    case_id: str,
    tier: Tier,
    reason: str,
    note: str | None,
    settings: Settings,
) -> Case:
    """Move a case to another tier by hand: its deadline follows, earlier or later, with a reason."""
    case = unblinded_case(session, principal, case_id)
    new_deadline = case.received_at + sla(tier, settings)
    session.add(
        Reprioritisation(
            case_id=case.id,
            user_id=principal.user_id,
            old_deadline=case.deadline,
            new_deadline=new_deadline,
            reason=reason,
            note=note,
            created_at=datetime.now(UTC),
        )
    )
    _audit(
        session,
        principal,
        "case.reprioritise",
        case,
        old_tier=case.tier,
        new_tier=tier,
        reason=reason,
    )
    case.tier, case.deadline = tier, new_deadline
    return case


def primary_read(session: Session, case_id: str) -> Read | None:
    return session.execute(
        select(Read).where(Read.case_id == case_id, Read.kind == ReadKind.PRIMARY)
    ).scalar_one_or_none()
