"""leaderboard statistics: rankings, pairwise tests, rank stability per scope; aggregate columns

Revision ID: 0002_leaderboard
Revises: 0001_initial
Create Date: 2026-11-26 23:21:22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_leaderboard"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _keys() -> list[sa.Column]:
    """Columns shared by every statistics table: which test set, protocol, scope, organ, metric."""
    return [
        sa.Column("testset_id", sa.Integer(), nullable=False),
        sa.Column("protocol_key", sa.String(length=160), nullable=False),
        sa.Column("scope", sa.String(length=20), nullable=False),
        sa.Column("organ", sa.String(length=50), nullable=False),
        sa.Column("metric", sa.String(length=20), nullable=False),
    ]


def _testset_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["testset_id"], ["testsets.id"], name=op.f(f"fk_{table}_testset_id_testsets"), ondelete="CASCADE"
    )


def _submission_fk(table: str, column: str = "submission_id") -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], ["submissions.id"], name=op.f(f"fk_{table}_{column}_submissions"), ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "stats_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        *_keys(),
        sa.Column("n_submissions", sa.Integer(), nullable=False),
        sa.Column("n_cases", sa.Integer(), nullable=False),
        sa.Column("details", JSON, nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        _testset_fk("stats_runs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stats_runs")),
        sa.UniqueConstraint(
            "testset_id", "protocol_key", "scope", "organ", "metric",
            name=op.f("uq_stats_runs_testset_id_protocol_key_scope_organ_metric"),
        ),
    )
    op.create_table(
        "pairwise_tests",
        sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False),
        *_keys(),
        sa.Column("submission_a_id", sa.Integer(), nullable=False),
        sa.Column("submission_b_id", sa.Integer(), nullable=False),
        sa.Column("n_common", sa.Integer(), nullable=False),
        sa.Column("statistic", sa.Double(), nullable=True),
        sa.Column("p_value", sa.Double(), nullable=True),
        sa.Column("p_adjusted", sa.Double(), nullable=True),
        sa.Column("significant", sa.Boolean(), nullable=False),
        sa.Column("mean_difference", sa.Double(), nullable=True),
        sa.Column("method", sa.String(length=200), nullable=False),
        _submission_fk("pairwise_tests", "submission_a_id"),
        _submission_fk("pairwise_tests", "submission_b_id"),
        _testset_fk("pairwise_tests"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairwise_tests")),
        sa.UniqueConstraint(
            "testset_id", "protocol_key", "scope", "organ", "metric", "submission_a_id", "submission_b_id",
            name=op.f(
                "uq_pairwise_tests_testset_id_protocol_key_scope_organ_metric_submission_a_id_submission_b_id"
            ),
        ),
    )
    with op.batch_alter_table("pairwise_tests", schema=None) as batch_op:
        batch_op.create_index("ix_pairwise_tests_a", ["submission_a_id"], unique=False)
        batch_op.create_index("ix_pairwise_tests_b", ["submission_b_id"], unique=False)

    op.create_table(
        "rank_stability",
        sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False),
        *_keys(),
        sa.Column("method", sa.String(length=20), nullable=False),
        sa.Column("submission_id", sa.Integer(), nullable=False),
        sa.Column("full_rank", sa.Integer(), nullable=False),
        sa.Column("mean_rank", sa.Double(), nullable=False),
        sa.Column("median_rank", sa.Double(), nullable=False),
        sa.Column("rank_ci_low", sa.Double(), nullable=False),
        sa.Column("rank_ci_high", sa.Double(), nullable=False),
        sa.Column("p_best", sa.Double(), nullable=False),
        sa.Column("rank_counts", JSON, nullable=False),
        sa.Column("n_resamples", sa.Integer(), nullable=False),
        _submission_fk("rank_stability"),
        _testset_fk("rank_stability"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rank_stability")),
        sa.UniqueConstraint(
            "testset_id", "protocol_key", "scope", "organ", "metric", "method", "submission_id",
            name=op.f("uq_rank_stability_testset_id_protocol_key_scope_organ_metric_method_submission_id"),
        ),
    )
    with op.batch_alter_table("rank_stability", schema=None) as batch_op:
        batch_op.create_index("ix_rank_stability_submission", ["submission_id"], unique=False)

    op.create_table(
        "ranking_entries",
        sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False),
        *_keys(),
        sa.Column("method", sa.String(length=20), nullable=False),
        sa.Column("submission_id", sa.Integer(), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=False),
        _submission_fk("ranking_entries"),
        _testset_fk("ranking_entries"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ranking_entries")),
        sa.UniqueConstraint(
            "testset_id", "protocol_key", "scope", "organ", "metric", "method", "submission_id",
            name=op.f("uq_ranking_entries_testset_id_protocol_key_scope_organ_metric_method_submission_id"),
        ),
    )
    with op.batch_alter_table("ranking_entries", schema=None) as batch_op:
        batch_op.create_index("ix_ranking_entries_submission", ["submission_id"], unique=False)

    with op.batch_alter_table("aggregates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("median_ci_low", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("median_ci_high", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("n_missing", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("aggregates", schema=None) as batch_op:
        batch_op.drop_column("n_missing")
        batch_op.drop_column("median_ci_high")
        batch_op.drop_column("median_ci_low")
    with op.batch_alter_table("ranking_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_ranking_entries_submission")
    op.drop_table("ranking_entries")
    with op.batch_alter_table("rank_stability", schema=None) as batch_op:
        batch_op.drop_index("ix_rank_stability_submission")
    op.drop_table("rank_stability")
    with op.batch_alter_table("pairwise_tests", schema=None) as batch_op:
        batch_op.drop_index("ix_pairwise_tests_b")
        batch_op.drop_index("ix_pairwise_tests_a")
    op.drop_table("pairwise_tests")
    op.drop_table("stats_runs")
