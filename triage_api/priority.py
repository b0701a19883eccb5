"""Priority policy: which tier a risk falls in, and the reading deadline each tier gets.

One home for the rule, so that ingest (a new case is routine until scored), the worker
(a score sets the tier) and reading (a reader moves a case by hand) agree. Imports no
model code: a read service that needs a deadline does not load torch.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from triage_api.settings import Settings
from triage_api.vocab import Tier

if TYPE_CHECKING:
    from models.bundle import Thresholds


def tier_of(risk: float, thresholds: Thresholds) -> Tier:
    """The tier of a calibrated risk under a model card's operating thresholds."""
    if risk >= thresholds.critical:
        return Tier.CRITICAL
    if risk >= thresholds.elevated:
        return Tier.ELEVATED
    return Tier.ROUTINE


def sla(tier: Tier, settings: Settings) -> timedelta:
    """How long a case of ``tier`` may wait for its read."""
    minutes = {
        Tier.CRITICAL: settings.sla_critical_minutes,
        Tier.ELEVATED: settings.sla_elevated_minutes,
        Tier.ROUTINE: settings.sla_routine_minutes,
    }[tier]
    return timedelta(minutes=minutes)


def routine_deadline(received_at: datetime, settings: Settings) -> datetime:
    """The deadline of a case not yet scored: every new case starts routine."""
    return received_at + sla(Tier.ROUTINE, settings)


def rescored_deadline(current: datetime, received_at: datetime, tier: Tier, settings: Settings) -> datetime:
    """The deadline after a (re)score: a score may move a deadline earlier, never later.

    A reader's manual move (:func:`triage_api.reading.reprioritise`) is the one way to
    make a deadline later, and it is audited with a reason.
    """
    return min(current, received_at + sla(tier, settings))
