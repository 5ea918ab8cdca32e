"""prediction retention and re-scoring under other protocol versions (issue 12)

Revision ID: 0008_rescoring
Revises: 0007_pairwise_cache
Create Date: 2026-12-02 04:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision: str = "0008_rescoring"
down_revision: str | None = "0007_pairwise_cache"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
