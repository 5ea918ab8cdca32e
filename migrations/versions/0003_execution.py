"""execution: shard heartbeat and container time, per-case scoring time

Revision ID: 0003_execution
Revises: 0002_leaderboard
Create Date: 2026-11-27 00:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_execution"
down_revision: str | None = "0002_leaderboard"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("run_seconds", sa.Float(), nullable=True))
    with op.batch_alter_table("case_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scoring_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("case_runs", schema=None) as batch_op:
        batch_op.drop_column("scoring_seconds")
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.drop_column("run_seconds")
        batch_op.drop_column("heartbeat_at")
