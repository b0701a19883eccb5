"""Go-live: clinic AI mode and AI-blind sample, hidden scores, stored logits, site
calibrations (two-person decisions) and challenger models.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("clinics", sa.Column("ai_mode", sa.String(10), nullable=False, server_default="live"))
    op.add_column("clinics", sa.Column("blind_sample_rate", sa.Float(), nullable=True))
    op.add_column("cases", sa.Column("ai_hidden", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("cases", sa.Column("calibration_id", sa.Integer(), nullable=True))
    op.add_column("predictions", sa.Column("logit", sa.Float(), nullable=True))
    op.add_column("predictions", sa.Column("calibration_id", sa.Integer(), nullable=True))
    op.add_column(
        "predictions", sa.Column("ai_hidden", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.create_table(
        "challengers",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("clinic_id", sa.Integer(), sa.ForeignKey("clinics.id"), nullable=False, index=True),
        sa.Column("model_ref", sa.String(100), nullable=False),
        sa.Column("bundle_path", sa.String(500), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "calibrations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("clinic_id", sa.Integer(), sa.ForeignKey("clinics.id"), nullable=False, index=True),
        sa.Column("model_ref", sa.String(100), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=False),
        sa.Column("bias", sa.Float(), nullable=False),
        sa.Column("critical", sa.Float(), nullable=False),
        sa.Column("elevated", sa.Float(), nullable=False),
        sa.Column("report", sa.Text(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, index=True),
        sa.Column("proposed_by", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("proposed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_by", sa.Integer(), sa.ForeignKey("users.id"), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decision_reason", sa.Text(), nullable=True),
        sa.Column("previous_id", sa.Integer(), nullable=True),
        sa.Column("challenger_id", sa.Integer(), sa.ForeignKey("challengers.id"), nullable=True),
    )
    op.create_table(
        "challenger_scores",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("case_id", sa.String(32), sa.ForeignKey("cases.id"), nullable=False, index=True),
        sa.Column("challenger_id", sa.Integer(), sa.ForeignKey("challengers.id"), nullable=False, index=True),
        sa.Column("model_ref", sa.String(100), nullable=False),
        sa.Column("risk", sa.Float(), nullable=False),
        sa.Column("logit", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("case_id", "challenger_id", name="uq_challenger_scores_case"),
    )


def downgrade() -> None:
    op.drop_table("challenger_scores")
    op.drop_table("calibrations")
    op.drop_table("challengers")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("ai_hidden")
        batch.drop_column("calibration_id")
        batch.drop_column("logit")
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("calibration_id")
        batch.drop_column("ai_hidden")
    with op.batch_alter_table("clinics") as batch:
        batch.drop_column("blind_sample_rate")
        batch.drop_column("ai_mode")
