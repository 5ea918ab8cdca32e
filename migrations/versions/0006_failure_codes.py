"""failure codes beside the failure sentences: submissions.failure_code, shards.failure_code,
backfilled from the stored sentences

Revision ID: 0006_failure_codes
Revises: 0005_stats_policy
Create Date: 2026-12-08 10:00:00

Until now only the English sentence was stored, and ``/metrics`` turned it back into a code with
regular expressions. From here on every place that fails a submission (or a shard) stores the
:class:`services.db.enums.FailureCode` value beside the sentence. The rows written before are
backfilled once, here, with the patterns ``services/observability.py`` used (kept below, frozen:
they describe the sentences of the releases before this one and must not follow later rewording).
A cancelled submission gets ``cancelled``; a failed row whose reason no pattern matches gets
``other``; a failed row without a reason stays NULL (``/metrics`` shows it as ``unknown``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_failure_codes"
down_revision: str | None = "0005_stats_policy"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (code, pattern) in order, the first match wins; searched, not anchored (a prefix such as
#: "Validation on the public sample failed:" does not matter). Frozen copy of the patterns of
#: services/observability.py before this revision, plus the two sentences they did not know
#: (the infrastructure reasons of validation, the unusable ground truth).
FAILURE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (code, re.compile(pattern, re.IGNORECASE))
    for code, pattern in (
        ("attempts_exhausted", r"could not be completed in \d+ attempts"),
        ("worker_lost", r"stopped answering"),
        ("time_limit", r"time limit exceeded"),
        ("out_of_memory", r"out of memory"),
        ("nonzero_exit", r"exited with code"),
        ("no_output", r"wrote nothing to /output|no prediction for public case"),
        ("invalid_output", r"unreadable or mis-shaped"),
        ("too_many_files", r"files and folders in /output and was stopped"),
        ("output_too_deep", r"nested folders more than \d+ levels"),
        ("forbidden_output", r"only plain files and folders are allowed"),
        ("pids_limit", r"process limit reached"),
        ("output_too_large", r"to /output and was stopped"),
        ("wrong_architecture", r"the image is built for"),
        ("image_too_large", r"uncompressed, more than the limit"),
        ("image_load_failed", r"could not be loaded|not a .*docker save|image .*not found"),
        ("cancelled", r"cancelled"),
        ("runtime_error", r"could not run the container"),
        ("infrastructure", r"validation could not be completed"),
        ("ground_truth", r"ground truth of a hidden case cannot be used"),
    )
)


def code_of(reason: str | None, state: str) -> str | None:
    """The code of one stored row (``state``: the row's state, ``failed`` or ``cancelled``)."""
    if state == "cancelled":
        return "cancelled"
    if not reason:
        return None
    for code, pattern in FAILURE_PATTERNS:
        if pattern.search(reason):
            return code
    return "other"


def _backfill(table: str, states: tuple[str, ...]) -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(f"SELECT id, state, failure_reason FROM {table} WHERE state IN :states")
        .bindparams(sa.bindparam("states", expanding=True)),
        {"states": list(states)},
    ).all()
    update = sa.text(f"UPDATE {table} SET failure_code = :code WHERE id = :id")
    for row_id, state, reason in rows:
        code = code_of(reason, state)
        if code is not None:
            bind.execute(update, {"code": code, "id": row_id})


def upgrade() -> None:
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failure_code", sa.String(length=32), nullable=True))
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failure_code", sa.String(length=32), nullable=True))
    _backfill("submissions", ("failed", "cancelled"))
    _backfill("shards", ("failed",))


def downgrade() -> None:
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.drop_column("failure_code")
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.drop_column("failure_code")
