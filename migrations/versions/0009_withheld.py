"""aggregates.withheld: the small-cell rule decided across every breakdown of a submission

Revision ID: 0009_withheld
Revises: 0008_rescoring
Create Date: 2026-12-02 05:50:00

Groups of two breakdown variables nest (a hospital inside a manufacturer), so subtracting two
visible groups' ``n·mean`` can give a hidden case's score back even when every group in sight has
``k`` or more cases. The statistics step now decides, per submission, organ and metric, which
groups non-organizers must not see (``services.leaderboard.suppression.withheld_groups``) and
stores it here. Rows written before stay NULL (the per-breakdown rule only) until the next
recomputation (``touchstone stats recompute``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_withheld"
down_revision: str | None = "0008_rescoring"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("aggregates") as batch:
        batch.add_column(sa.Column("withheld", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("aggregates") as batch:
        batch.drop_column("withheld")
