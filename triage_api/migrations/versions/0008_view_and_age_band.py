"""View position and a coarse age band on each case, for the reader (never an exact age).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("view_position", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("age_band", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("age_band")
        batch.drop_column("view_position")
