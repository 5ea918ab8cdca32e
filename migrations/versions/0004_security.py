"""security: small-cell threshold per test set; storage, validation heartbeat and attempts per submission

Revision ID: 0004_security
Revises: 0003_execution
Create Date: 2026-12-01 22:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_security"
down_revision: str | None = "0003_execution"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("testsets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("min_group_size", sa.Integer(), nullable=False, server_default="10"))
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("storage_bytes", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("image_deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("worker_hostname", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("validation_attempts", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.drop_column("validation_attempts")
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("worker_hostname")
        batch_op.drop_column("image_deleted_at")
        batch_op.drop_column("storage_bytes")
    with op.batch_alter_table("testsets", schema=None) as batch_op:
        batch_op.drop_column("min_group_size")
