"""Reading a case: claim, final read (agree or override with a reason), reprioritise.

Every change writes an audit event in its transaction. Free-text notes stay in their table
and never go into audit details (they may name the patient).

A read is saved only by the reader who holds the case's claim, so two readers never read
the same case at once. A claim older than ``claim_expiry_minutes`` lapses: the next reader
who claims the case takes it over, and :func:`expire_claims` clears lapsed claims; both are
audited (``case.claim_expire``).

"I agree" must fit the finding: the AI's tier says pneumonia likely (critical, elevated)
or not (routine). Agreeing with a finding the tier contradicts (e.g. "normal" on a critical
case) is refused with a 422 that asks for an override and its reason, so every disagreement
reaches the auditor's override list under a reason the reader chose.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from audit.log import EventCode, record
from triage_api import cases, golive
from triage_api.auth import Principal, Role
from triage_api.cases import unblinded_case
from triage_api.errors import Conflict, InvalidRequest, NotFound, NotPermitted
from triage_api.priority import sla
from triage_api.settings import Settings
from triage_api.tables import Case, Prediction, Read, Reprioritisation
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


AI_POSITIVE = {Tier.CRITICAL: {Finding.PNEUMONIA}, Tier.ELEVATED: {Finding.PNEUMONIA}}
"""Findings an "I agree" may go with, per AI tier; routine takes the ones in ``AI_NEGATIVE``."""
AI_NEGATIVE = {Finding.NORMAL, Finding.OTHER_FINDING}


def agreeing_findings(tier: Tier) -> list[Finding]:
    """The findings an "I agree" may go with under the AI's ``tier``, in the vocabulary's order
    (the case page's one-key "agree" takes the first when the reader chose none that fits)."""
    return [finding for finding in Finding if finding in AI_POSITIVE.get(tier, AI_NEGATIVE)]


def claim_lapsed(case: Case, settings: Settings, now: datetime) -> bool:
    """Whether the case's claim is older than the expiry (and so no longer blocks others)."""
    limit = timedelta(minutes=settings.claim_expiry_minutes)
    return case.claimed_at is not None and now - case.claimed_at > limit


def _lapse(session: Session, principal: Principal, case: Case) -> None:
    _audit(session, principal, "case.claim_expire", case, released_user=case.claimed_by)
    case.claimed_by, case.claimed_at = None, None


def claim(
    session: Session, *, principal: Principal, case_id: str, settings: Settings, now: datetime | None = None
) -> Case:
    """Take the soft lock on a case so other readers see it is being read.

    A lapsed claim of another reader is taken over (its expiry audited).

    Raises:
        Conflict: another reader holds a live claim, or it is already read.
    """
    now = now or datetime.now(UTC)
    case = unblinded_case(session, principal, case_id)
    if case.read_at is not None:
        raise Conflict("the case is already read")
    if case.claimed_by not in (None, principal.user_id):
        if not claim_lapsed(case, settings, now):
            raise Conflict("another reader has claimed this case")
        _lapse(session, principal, case)
    case.claimed_by, case.claimed_at = principal.user_id, now
    _audit(session, principal, "case.claim", case)
    return case


def claim_next(
    session: Session, *, principal: Principal, settings: Settings, now: datetime | None = None
) -> Case | None:
    """Claim the first unread case in worklist order that the caller may read now: unclaimed,
    claimed by the caller, or under a lapsed claim (taken over, audited, as :func:`claim` does).

    Returns:
        The claimed case, or None when no case is left to read.
    """
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(minutes=settings.claim_expiry_minutes)
    free = or_(Case.claimed_by.is_(None), Case.claimed_by == principal.user_id, Case.claimed_at < cutoff)
    # Row locks skipping locked rows: two readers pressing "next" at once get two cases
    # (PostgreSQL; SQLite's single writer already serialises them).
    query = cases.worklist_query(principal, unread=True).where(free).limit(1)
    found = session.execute(query.with_for_update(skip_locked=True, of=Case)).scalar_one_or_none()
    if found is None:
        return None
    return claim(session, principal=principal, case_id=found.id, settings=settings, now=now)


def expire_claims(session: Session, *, principal: Principal, settings: Settings, now: datetime) -> int:
    """Clear the lapsed claims in the caller's clinics, each audited; returns how many."""
    cutoff = now - timedelta(minutes=settings.claim_expiry_minutes)
    stale = session.execute(
        select(Case).where(
            Case.clinic_id.in_(principal.clinic_ids), Case.read_at.is_(None), Case.claimed_at < cutoff
        )
    ).scalars()
    count = 0
    for case in stale:
        _lapse(session, principal, case)
        count += 1
    return count


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

    Disagreeing with the AI is an override and needs a reason code; agreeing must fit the
    finding (see the module's docstring). A case without an AI result (not analysed, failed,
    still queued) takes no agree/disagree. The caller must hold the case's claim. Whether the
    AI was shown is the server's to say where it withheld it (shadow mode, the AI-blind
    sample): ``ai_score_shown`` is then recorded false whatever the client sent.

    Raises:
        InvalidRequest: agree/override fields inconsistent with the case or the finding (422).
        Conflict: already read, or the caller does not hold the claim (409).
    """
    case = unblinded_case(session, principal, case_id)
    if case.read_at is not None:
        raise Conflict("the case is already read")
    if case.claimed_by is None:
        raise Conflict("claim the case before saving a read")
    if case.claimed_by != principal.user_id:
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
    elif agrees_with_ai is True and finding not in agreeing_findings(tier := ai_tier(session, case)):
        raise InvalidRequest(
            f"the finding {finding.value} contradicts the AI's {tier.value} tier: "
            "this read overrides the AI; give an override_reason"
        )
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


def ai_tier(session: Session, case: Case) -> Tier:
    """The tier the AI gave (its latest prediction), not a tier set by hand since."""
    tier = session.execute(
        select(Prediction.tier)
        .where(Prediction.case_id == case.id)
        .order_by(Prediction.attempt.desc())
        .limit(1)
    ).scalar_one_or_none()
    return Tier(tier) if tier is not None else case.tier


def primary_read(session: Session, case_id: str) -> Read | None:
    return session.execute(
        select(Read).where(Read.case_id == case_id, Read.kind == ReadKind.PRIMARY)
    ).scalar_one_or_none()
