"""prediction retention and re-scoring under other protocol versions (issue 12): the retention of
every test set, when a submission's predictions were deleted, the other protocol versions of a
test set and the re-scoring jobs

Revision ID: 0008_rescoring
Revises: 0007_pairwise_cache
Create Date: 2026-12-02 04:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008_rescoring"
down_revision: str | None = "0007_pairwise_cache"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("testsets", schema=None) as batch_op:
        # NULL: keep every prediction (what the service did before)
        batch_op.add_column(sa.Column("prediction_retention_days", sa.Integer(), nullable=True))
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("predictions_deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "testset_protocols",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("testset_id", sa.Integer(), nullable=False),
        sa.Column("protocol_key", sa.String(length=160), nullable=False),
        sa.Column("protocol_json", JSON, nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["testset_id"], ["testsets.id"], name=op.f("fk_testset_protocols_testset_id_testsets"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["created_by_id"], ["users.id"], name=op.f("fk_testset_protocols_created_by_id_users"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_testset_protocols")),
        sa.UniqueConstraint("testset_id", "protocol_key", name=op.f("uq_testset_protocols_testset_id_protocol_key")),
    )
    op.create_table(
        "rescore_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("testset_id", sa.Integer(), nullable=False),
        sa.Column("protocol_key", sa.String(length=160), nullable=False),
        sa.Column("state", sa.Enum("queued", "running", "done", "failed", name="rescorestate", native_enum=False,
                                   create_constraint=False, length=32), nullable=False),
        sa.Column("submission_ids", JSON, nullable=False),
        sa.Column("unavailable", JSON, nullable=False),
        sa.Column("n_cases_total", sa.Integer(), nullable=False),
        sa.Column("n_cases_done", sa.Integer(), nullable=False),
        sa.Column("n_scores_written", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["testset_id"], ["testsets.id"], name=op.f("fk_rescore_jobs_testset_id_testsets"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["created_by_id"], ["users.id"], name=op.f("fk_rescore_jobs_created_by_id_users"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rescore_jobs")),
    )
    op.create_index("ix_rescore_jobs_testset", "rescore_jobs", ["testset_id", "created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_rescore_jobs_testset", table_name="rescore_jobs")
    op.drop_table("rescore_jobs")
    op.drop_table("testset_protocols")
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.drop_column("predictions_deleted_at")
    with op.batch_alter_table("testsets", schema=None) as batch_op:
        batch_op.drop_column("prediction_retention_days")
