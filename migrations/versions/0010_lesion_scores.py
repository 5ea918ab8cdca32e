"""Lesion metrics stored: one nullable column per lesion metric on ``scores`` and a ``lesions`` table

Revision ID: 0010_lesion_scores
Revises: 0009_withheld
Create Date: 2026-12-02 06:00:00

A lesion class of a ``kind: lesion`` protocol is scored with the lesion metrics of
``evaluation.metric_registry.LESION_METRICS`` beside DSC/NSD; they were computed and dropped. They
are stored wide, like dsc/nsd (NULL on organ rows and under organ protocols), and every connected
component of truth and prediction of such a row is a row of ``lesions`` (deleted with its score).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_lesion_scores"
down_revision: str | None = "0009_withheld"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: evaluation.metric_registry.LESION_METRICS when this revision was written (a migration must not
#: change when the registry does)
LESION_COLUMNS = ("lesion_tp", "lesion_fp", "lesion_fn", "lesion_sensitivity", "lesion_precision",
                  "lesion_f1", "lesion_dsc", "lesion_pq")


def upgrade() -> None:
    with op.batch_alter_table("scores") as batch:
        for name in LESION_COLUMNS:
            batch.add_column(sa.Column(name, sa.Float(), nullable=True))
    op.create_table(
        "lesions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("score_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  sa.ForeignKey("scores.id", ondelete="CASCADE"), nullable=False),
        sa.Column("side", sa.String(16), nullable=False),
        sa.Column("component", sa.Integer(), nullable=False),
        sa.Column("voxels", sa.BigInteger(), nullable=False),
        sa.Column("volume_mm3", sa.Float(), nullable=False),
        sa.Column("diameter_mm", sa.Float(), nullable=False),
        sa.Column("matched_to", sa.Integer(), nullable=True),
        sa.Column("iou", sa.Float(), nullable=False),
        sa.Column("dsc", sa.Float(), nullable=False),
        sa.UniqueConstraint("score_id", "side", "component"),
    )


def downgrade() -> None:
    op.drop_table("lesions")
    with op.batch_alter_table("scores") as batch:
        for name in reversed(LESION_COLUMNS):
            batch.drop_column(name)
