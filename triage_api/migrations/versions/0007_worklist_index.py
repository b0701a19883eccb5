"""Worklist indexes: cases in reading order, and unread cases in reading order.

The worklist is "my clinics' cases, earliest deadline first (then received, then id),
top N"; the web page's default adds "unread". Read cases pile up forever (triage never
removes) and hold the earliest deadlines. On 1M cases (bench/worklist.py, a radiologist of
two clinics, top 50):

- unread: PostgreSQL walked the deadline index through every read case before it found
  an unread one; SQLite sorted all of the clinics' cases (p50 ~80 ms and ~230 ms). A
  partial index over unread cases only, in the full sort order, ends each scan after about
  N / (the clinics' share) entries (p50 ~1 ms and ~0.5 ms for the SELECT) and stays as
  small as the unread backlog.
- all: SQLite cannot use the one-column deadline index for the three-column order (no
  incremental sort), so it sorted the clinics' ~180k cases (p50 ~230 ms); an index in the
  full order lets it stop at N (~0.5 ms). PostgreSQL did well already (incremental sort).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ORDER = ["deadline", "received_at", "id"]
UNREAD = sa.text("read_at IS NULL")


def upgrade() -> None:
    op.create_index("ix_cases_worklist_order", "cases", ORDER)
    op.create_index("ix_cases_unread_deadline", "cases", ORDER, postgresql_where=UNREAD, sqlite_where=UNREAD)


def downgrade() -> None:
    op.drop_index("ix_cases_unread_deadline", table_name="cases")
    op.drop_index("ix_cases_worklist_order", table_name="cases")
