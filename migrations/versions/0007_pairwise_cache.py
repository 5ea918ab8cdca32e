"""cached pairwise test results and packed scores for incremental statistics (issue 10)

Revision ID: 0007_pairwise_cache
Revises: 0006_failure_codes
Create Date: 2026-12-02 04:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007_pairwise_cache"
down_revision: str | None = "0006_failure_codes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "pairwise_cache",
        sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False),
        sa.Column("testset_id", sa.Integer(), nullable=False),
        sa.Column("protocol_key", sa.String(length=160), nullable=False),
        sa.Column("organ", sa.String(length=50), nullable=False),
        sa.Column("metric", sa.String(length=20), nullable=False),
        sa.Column("options_key", sa.String(length=64), nullable=False),
        sa.Column("cases_hash", sa.String(length=64), nullable=False),
        sa.Column("submission_a_id", sa.Integer(), nullable=False),
        sa.Column("submission_b_id", sa.Integer(), nullable=False),
        sa.Column("values_hash", sa.String(length=64), nullable=False),
        sa.Column("n_common", sa.Integer(), nullable=False),
        sa.Column("n_nonzero", sa.Integer(), nullable=False),
        *(sa.Column(name, sa.Double(), nullable=True)
          for name in ("statistic", "statistic_less", "z", "p_greater", "p_less", "mean_difference",
                       "median_difference", "sd_difference")),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["testset_id"], ["testsets.id"], name=op.f("fk_pairwise_cache_testset_id_testsets"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["submission_a_id"], ["submissions.id"],
                                name=op.f("fk_pairwise_cache_submission_a_id_submissions"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["submission_b_id"], ["submissions.id"],
                                name=op.f("fk_pairwise_cache_submission_b_id_submissions"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairwise_cache")),
        sa.UniqueConstraint("testset_id", "protocol_key", "organ", "metric", "options_key", "cases_hash",
                            "submission_a_id", "submission_b_id", "values_hash", name="uq_pairwise_cache_key"),
    )
    op.create_index("ix_pairwise_cache_b", "pairwise_cache", ["submission_b_id"], unique=False)
    op.create_table(
        "packed_scores",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("submission_id", sa.Integer(), nullable=False),
        sa.Column("protocol_key", sa.String(length=160), nullable=False),
        sa.Column("organs", JSON, nullable=False),
        sa.Column("n_scores", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["submission_id"], ["submissions.id"],
                                name=op.f("fk_packed_scores_submission_id_submissions"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_packed_scores")),
        sa.UniqueConstraint("submission_id", "protocol_key", name="uq_packed_scores_key"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # random floats do not compress: skip TOAST's compression attempt on every write
        op.execute("ALTER TABLE packed_scores ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_table("packed_scores")
    op.drop_index("ix_pairwise_cache_b", table_name="pairwise_cache")
    op.drop_table("pairwise_cache")
