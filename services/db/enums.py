"""Enumerations stored in the database (as their string values, portable VARCHAR columns)."""

from __future__ import annotations

import enum


class Role(str, enum.Enum):
    organizer = "organizer"  # everything
    inventor = "inventor"  # own team's algorithms and submissions
    analyst = "analyst"  # published results, per case


class SubmissionState(str, enum.Enum):
    """received -> validating -> queued -> running -> evaluating -> scored -> published;
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


# The state enums share member names (running, failed, cancelled) deliberately: each is its own machine
# with its own transitions (services/db/states.py), stored in its own column.

class ShardState(str, enum.Enum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class RescoreState(str, enum.Enum):
    """A re-scoring job (services/rescoring.py): queued -> running -> done | failed."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class FailureCode(str, enum.Enum):
    """Why a submission or a shard failed (or was cancelled): the one list. Stored beside the
    sentence (``failure_code`` next to ``failure_reason``) by every place that fails a submission;
    ``/metrics`` labels failures with it. The worker's :class:`worker.runtime.base.FailureReason`
    pairs the image/run codes with their sentences (worker.runtime.base re-exports this enum)."""

    # the image and its run (worker.runtime.base.FailureReason)
    TIME_LIMIT = "time_limit"
    OUT_OF_MEMORY = "out_of_memory"
    NONZERO_EXIT = "nonzero_exit"
    NO_OUTPUT = "no_output"
    INVALID_OUTPUT = "invalid_output"
    OUTPUT_TOO_LARGE = "output_too_large"
    TOO_MANY_FILES = "too_many_files"
    OUTPUT_TOO_DEEP = "output_too_deep"
    FORBIDDEN_OUTPUT = "forbidden_output"
    PIDS_LIMIT = "pids_limit"
    WRONG_ARCHITECTURE = "wrong_architecture"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_LOAD_FAILED = "image_load_failed"
    CANCELLED = "cancelled"
    RUNTIME_ERROR = "runtime_error"
    # the pipeline around it (worker/validation.py, worker/inference.py, worker/scoring.py, worker/reaper.py)
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"  # a shard used up its attempts
    WORKER_LOST = "worker_lost"  # the worker running a validation stopped answering
    INFRASTRUCTURE = "infrastructure"  # our side (engine, lost workers); not the image's fault
    GROUND_TRUTH = "ground_truth"  # a hidden case's ground truth is unusable (the organizer's)
    #: a reason stored without a code (an older row no pattern matched, a caller that gave none)
    OTHER = "other"


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
