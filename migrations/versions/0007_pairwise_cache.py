"""cached pairwise test results for incremental statistics (issue 10)

Revision ID: 0007_pairwise_cache
Revises: 0006_failure_codes
Create Date: 2026-12-02 04:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision: str = "0007_pairwise_cache"
down_revision: str | None = "0006_failure_codes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
