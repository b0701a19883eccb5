"""Bounded scalar types for paths, queries and bodies.

Python integers and ``datetime`` parsing have no upper bound the database shares: an id of
``10**23`` overflows the driver and a year-1 date overflows the first ``timedelta`` applied
to it. Every integer or instant a client sends is typed with one of these, so it is refused
as 422 before any code (or SQL) sees it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from annotated_types import Ge, Le
from pydantic import AfterValidator, AwareDatetime

MAX_ID = 2**31 - 1
"""The largest row id: ids are 32-bit ``INTEGER`` on PostgreSQL."""

Id = Annotated[int, Ge(1), Le(MAX_ID)]
"""A row id (appeal, user, clinic)."""

Seq = Annotated[int, Ge(0), Le(MAX_ID)]
"""A position in the audit log (``after_seq``); 0 is before the first event."""

EARLIEST_YEAR, LATEST_YEAR = 1900, 2200


def _plausible(moment: datetime) -> datetime:
    if not EARLIEST_YEAR <= moment.year <= LATEST_YEAR:
        raise ValueError(f"must be between the years {EARLIEST_YEAR} and {LATEST_YEAR}")
    return moment


Instant = Annotated[AwareDatetime, AfterValidator(_plausible)]
"""A moment with a time zone, within years far from ``datetime``'s limits, e.g.
``2026-11-01T00:00:00Z``."""
