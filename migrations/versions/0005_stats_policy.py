"""statistics policy per test set: missing-case policy, statistical options, subgroup variables;
too_small flag and CI method on every aggregate

Revision ID: 0005_stats_policy
Revises: 0004_security
Create Date: 2026-12-01 22:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005_stats_policy"
down_revision: str | None = "0004_security"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("testsets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("missing_policy", sa.String(length=20), nullable=False, server_default="worst"))
        batch_op.add_column(sa.Column("stats_options", JSON, nullable=False, server_default=sa.text("'{}'")))
        batch_op.add_column(sa.Column("subgroup_variables", JSON, nullable=True))
    with op.batch_alter_table("aggregates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("too_small", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("ci_method", sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("aggregates", schema=None) as batch_op:
        batch_op.drop_column("ci_method")
        batch_op.drop_column("too_small")
    with op.batch_alter_table("testsets", schema=None) as batch_op:
        batch_op.drop_column("subgroup_variables")
        batch_op.drop_column("stats_options")
        batch_op.drop_column("missing_policy")
