"""Enumerations stored in the database (as their string values, portable VARCHAR columns)."""

from __future__ import annotations

import enum


class Role(str, enum.Enum):
    organizer = "organizer"  # everything
    inventor = "inventor"  # own team's algorithms and submissions
    analyst = "analyst"  # published results, per case


class SubmissionState(str, enum.Enum):
    """DESIGN.md: received -> validating -> queued -> running -> evaluating -> scored -> published;
    from any unfinished state ``failed`` (with a reason) or ``cancelled``. Transitions: states.py."""

    received = "received"
    validating = "validating"
    queued = "queued"
    running = "running"
    evaluating = "evaluating"
    scored = "scored"
    published = "published"
    failed = "failed"
    cancelled = "cancelled"


class ShardState(str, enum.Enum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


def enum_column_type(enum_cls: type[enum.Enum]):
    """A VARCHAR column holding the enum's *values*; no native ENUM type, no CHECK constraint, so a
    later migration can add a member without rewriting the table on either database."""
    import sqlalchemy as sa

    return sa.Enum(
        enum_cls,
        native_enum=False,
        create_constraint=False,
        length=32,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )
