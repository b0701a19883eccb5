"""Each worker's batch sizes, counted per histogram bucket, for /metrics.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("worker_beats") as batch:
        batch.add_column(sa.Column("batch_sizes", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("worker_beats") as batch:
        batch.drop_column("batch_sizes")
