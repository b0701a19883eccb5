"""Export confirmed reads as a labelled dataset for retraining, with the feedback-loop marks.

A model retrained on labels it influenced can run away with its own errors, so every
label says whether the AI score was on screen when it was made, and labels made with it
on screen are left out unless asked for (the feedback-loop guard, :mod:`triage_api.golive`).
Cases under an appeal in progress are held back (their label may still change). Rows
reference blobs by sha256; pixels are not exported until de-identification exists. The
export is audited (110106).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.log import EventCode, record
from triage_api.blobs import write_atomically
from triage_api.tables import Appeal, Case, Read
from triage_api.vocab import AppealStatus

COLUMNS = (
    "case_id",
    "clinic_id",
    "blob_sha256",
    "media_type",
    "label",
    "label_source",
    "ai_score_shown",
    "ai_risk_at_read",
    "model_ref",
    "received_at",
    "read_at",
)


@dataclass(frozen=True)
class ExportSummary:
    rows: int
    held_back_open_appeal: int
    labels_made_with_ai_shown: int
    """Exported rows whose label was made with the AI on screen (only with ``include_ai_shown``)."""
    excluded_ai_shown: int
    """Labels left out because the AI was on screen (0 with ``include_ai_shown``)."""


def export_reads(
    session: Session,
    *,
    actor: str,
    out: Path,
    clinic_ids: set[int] | None = None,
    since: datetime | None = None,
    include_ai_shown: bool = False,
) -> ExportSummary:
    """Write the final read of every read case to ``out`` (CSV), atomically.

    Args:
        session: the transaction the export's audit event is written in.
        actor: who exports, for the audit log.
        out: the CSV file to write.
        clinic_ids: only these clinics (None: all).
        since: only reads made at or after this time.
        include_ai_shown: also export labels made with the AI score on screen.

    Returns:
        How many rows were written and how many cases were held back.
    """
    query = select(Case).where(Case.read_at.is_not(None)).order_by(Case.received_at, Case.id)
    if clinic_ids is not None:
        query = query.where(Case.clinic_id.in_(clinic_ids))
    cases = list(session.execute(query).scalars())
    ids = [c.id for c in cases]
    pending = (
        set(
            session.execute(
                select(Appeal.case_id).where(
                    Appeal.case_id.in_(ids), Appeal.status.in_((AppealStatus.OPEN, AppealStatus.ASSIGNED))
                )
            ).scalars()
        )
        if ids
        else set()
    )
    final: dict[str, Read] = {}
    if ids:
        for read in session.execute(
            select(Read).where(Read.case_id.in_(ids)).order_by(Read.created_at, Read.id)
        ).scalars():
            final[read.case_id] = read
    rows, shown, excluded = [], 0, 0
    for case in cases:
        last = final.get(case.id)
        if case.id in pending or last is None or (since is not None and last.created_at < since):
            continue
        read = last
        if read.ai_score_shown and not include_ai_shown:
            excluded += 1
            continue
        shown += read.ai_score_shown
        rows.append(
            (
                case.id,
                case.clinic_id,
                case.sha256,
                case.media_type,
                read.finding,
                read.kind,
                read.ai_score_shown,
                read.ai_risk,
                read.model_ref,
                case.received_at.isoformat(),
                read.created_at.isoformat(),
            )
        )
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    write_atomically(out, table.getvalue().encode())
    summary = ExportSummary(len(rows), len(pending), shown, excluded)
    record(
        session,
        actor=actor,
        action="reads.export",
        code=EventCode.EXPORT,
        object_type="dataset",
        object_id=out.name[:64],
        details={
            "rows": summary.rows,
            "held_back_open_appeal": summary.held_back_open_appeal,
            "ai_shown": summary.labels_made_with_ai_shown,
            "excluded_ai_shown": summary.excluded_ai_shown,
            "clinics": sorted(clinic_ids) if clinic_ids is not None else "all",
        },
    )
    return summary
