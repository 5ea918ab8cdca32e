"""The submission state machine, in one place (docs/services.md, docs/architecture.md).

    received -> validating -> queued -> running -> evaluating -> scored -> published
    any unfinished state -> failed (with a reason) | cancelled
    published -> scored                      (unpublish)
    failed | cancelled | scored -> received  (organizer re-run; stored scores are kept and reused)
    evaluating -> running                    (a shard is retried after evaluation started)

Everything that changes ``Submission.state`` -- the API, the worker, the CLI -- calls
:func:`transition`, which refuses any other move with :class:`IllegalTransition`, stamps the state's
timestamp and keeps the quota accounting right (a submission that fails *validation* stops counting
against its team's quota).

Shards (one container run over a slice of the hidden cases) have their own, smaller machine here
too, :data:`SHARD_ALLOWED` and :func:`shard_transition` (same :class:`IllegalTransition`):

    pending -> running -> succeeded | failed | cancelled
    running -> pending                       (our side failed, or its worker vanished: retried)
    running -> running                       (a vanished worker's shard taken over)
    pending -> succeeded | failed | cancelled (nothing left to run; attempts used up; submission ended)

Nothing else assigns ``Submission.state`` or ``Shard.state`` (tests/unit/services/db/
test_state_assignments.py checks the source).
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.base import utcnow
from services.db.enums import FailureCode, RescoreState, ShardState
from services.db.enums import SubmissionState as S
from services.db.models import RescoreJob, Shard, Submission

UNFINISHED: frozenset[S] = frozenset({S.received, S.validating, S.queued, S.running, S.evaluating})
FINISHED: frozenset[S] = frozenset({S.scored, S.published, S.failed, S.cancelled})

#: state -> states it may move to
ALLOWED: dict[S, frozenset[S]] = {
    S.received: frozenset({S.validating, S.failed, S.cancelled}),
    S.validating: frozenset({S.queued, S.failed, S.cancelled}),
    S.queued: frozenset({S.running, S.failed, S.cancelled}),
    S.running: frozenset({S.evaluating, S.failed, S.cancelled}),
    S.evaluating: frozenset({S.running, S.scored, S.failed, S.cancelled}),
    S.scored: frozenset({S.published, S.received}),
    S.published: frozenset({S.scored}),
    S.failed: frozenset({S.received}),
    S.cancelled: frozenset({S.received}),
}

#: the timestamp column stamped on entry into each state
TIMESTAMP_COLUMN: dict[S, str] = {state: f"{state.value}_at" for state in S}


class IllegalTransition(ValueError):
    """A state change the state machine does not allow (the message names both states); raised for
    submissions (:func:`transition`) and shards (:func:`shard_transition`) alike."""

    def __init__(self, row_id: int | None, current, requested, *, kind: str = "submission",
                 allowed: dict | None = None) -> None:
        table = ALLOWED if allowed is None else allowed
        allowed_names = ", ".join(sorted(s.value for s in table[current])) or "none"
        super().__init__(
            f"{kind} {row_id} is {current.value}; it cannot become {requested.value} "
            f"(from {current.value} it may become: {allowed_names})"
        )
        self.kind = kind
        self.row_id = row_id
        self.submission_id = row_id if kind == "submission" else None
        self.current = current
        self.requested = requested


def can_transition(current: S | str, new: S | str) -> bool:
    return S(new) in ALLOWED[S(current)]


def transition(submission: Submission, new_state: S | str, reason: str | None = None,
               code: FailureCode | str | None = None) -> Submission:
    """Move ``submission`` to ``new_state`` (in the caller's session; the caller commits).

    - raises :class:`IllegalTransition` for a move not in :data:`ALLOWED`;
    - stamps ``<new_state>_at`` with the current UTC time;
    - ``failed`` / ``cancelled`` store ``reason`` in ``failure_reason`` (``failed`` requires one)
      and ``code`` (a :class:`FailureCode`) beside it in ``failure_code`` (default: ``cancelled``
      for a cancel, ``other`` for a failure given no code);
    - failing while ``received`` or ``validating`` (the image was never accepted) sets
      ``counts_against_quota = False``: failed validations do not count against the quota;
    - going back to ``received`` (re-run) clears the failure reason and code and counts the re-run.
    """
    current = S(submission.state)
    new = S(new_state)
    if new not in ALLOWED[current]:
        raise IllegalTransition(submission.id, current, new)
    if new is S.failed and not reason:
        raise ValueError("a submission may only fail with a reason a person can act on")
    if new in (S.failed, S.cancelled):
        code = FailureCode(code) if code is not None else (
            FailureCode.CANCELLED if new is S.cancelled else FailureCode.OTHER)
    now = utcnow()
    setattr(submission, TIMESTAMP_COLUMN[new], now)
    if new in (S.failed, S.cancelled):
        submission.failure_reason = reason
        submission.failure_code = code.value  # type: ignore[union-attr]
        if new is S.failed and current in (S.received, S.validating):
            submission.counts_against_quota = False
    elif new is S.received:
        submission.failure_reason = None
        submission.failure_code = None
        submission.rerun_count = (submission.rerun_count or 0) + 1
    submission.state = new
    return submission


# ------------------------------------------------------------------------------------------------
# shards
# ------------------------------------------------------------------------------------------------
Sh = ShardState
SHARD_OPEN: frozenset[ShardState] = frozenset({Sh.pending, Sh.running})
SHARD_TERMINAL: frozenset[ShardState] = frozenset({Sh.succeeded, Sh.failed, Sh.cancelled})

#: shard state -> states it may move to (the terminal states are final)
SHARD_ALLOWED: dict[ShardState, frozenset[ShardState]] = {
    Sh.pending: frozenset({Sh.running, Sh.succeeded, Sh.failed, Sh.cancelled}),
    Sh.running: frozenset({Sh.running, Sh.pending, Sh.succeeded, Sh.failed, Sh.cancelled}),
    Sh.succeeded: frozenset(),
    Sh.failed: frozenset(),
    Sh.cancelled: frozenset(),
}


def can_shard_transition(current: ShardState | str, new: ShardState | str) -> bool:
    return ShardState(new) in SHARD_ALLOWED[ShardState(current)]


def shard_transition(shard: Shard, new_state: ShardState | str, reason: str | None = None,
                     code: FailureCode | str | None = None, *, owner: str | None = None,
                     now: dt.datetime | None = None) -> Shard:
    """Move ``shard`` to ``new_state`` (in the caller's session; the caller commits).

    - raises :class:`IllegalTransition` for a move not in :data:`SHARD_ALLOWED`;
    - ``running`` (an attempt starts): ``owner`` becomes ``worker_hostname``, ``attempts`` grows by
      one, ``started_at`` and ``heartbeat_at`` are stamped, ``finished_at`` and the failure cleared;
    - ``pending`` (given back for a retry): no owner; ``reason`` (why the attempt was lost) is kept
      in ``failure_reason``, the code cleared;
    - ``succeeded`` / ``failed`` / ``cancelled`` stamp ``finished_at``; ``failed`` requires a
      ``reason`` and stores it with ``code`` (default ``other``).
    """
    current = ShardState(shard.state)
    new = ShardState(new_state)
    if new not in SHARD_ALLOWED[current]:
        raise IllegalTransition(shard.id, current, new, kind="shard", allowed=SHARD_ALLOWED)
    if new is Sh.failed and not reason:
        raise ValueError("a shard may only fail with a reason a person can act on")
    if new is Sh.running and not owner:
        raise ValueError("a running shard needs its owner (the worker running it)")
    now = now or utcnow()
    if new is Sh.running:
        shard.attempts = (shard.attempts or 0) + 1
        shard.worker_hostname = owner
        shard.started_at = shard.heartbeat_at = now
        shard.finished_at = None
        shard.failure_reason = shard.failure_code = None
    elif new is Sh.pending:
        shard.worker_hostname = None
        shard.failure_reason = reason
        shard.failure_code = None
    else:
        shard.finished_at = now
        if new is Sh.failed:
            shard.failure_reason = reason
            shard.failure_code = FailureCode(code if code is not None else FailureCode.OTHER).value
    shard.state = new
    return shard


def close_open_shards(session: Session, submission_id: int, new_state: ShardState = Sh.cancelled) -> None:
    """Every pending or running shard of the submission becomes ``new_state`` (a terminal state,
    allowed from both), ``finished_at`` stamped: one UPDATE (a failed or cancelled submission)."""
    new = ShardState(new_state)
    if new not in SHARD_TERMINAL or new is Sh.failed:
        raise ValueError(f"open shards can only be closed as succeeded or cancelled, not {new.value}")
    session.execute(
        sa.update(Shard)
        .where(Shard.submission_id == submission_id, Shard.state.in_(list(SHARD_OPEN)))
        .values(state=new, finished_at=utcnow())
        .execution_options(synchronize_session="fetch")
    )


# ------------------------------------------------------------------------------------------------
# re-scoring jobs (services/rescoring.py, worker/rescoring.py)
# ------------------------------------------------------------------------------------------------
R = RescoreState
#: rescore job state -> states it may move to (done and failed are final; a failed job is
#: started again as a new job)
RESCORE_ALLOWED: dict[RescoreState, frozenset[RescoreState]] = {
    R.queued: frozenset({R.running, R.done, R.failed}),
    R.running: frozenset({R.running, R.done, R.failed}),
    R.done: frozenset(),
    R.failed: frozenset(),
}


def rescore_transition(job: RescoreJob, new_state: RescoreState | str, error: str | None = None,
                       now: dt.datetime | None = None) -> RescoreJob:
    """Move a re-scoring job to ``new_state`` (the caller commits): ``running`` stamps
    ``started_at`` once; ``done`` / ``failed`` stamp ``finished_at``; ``failed`` needs the
    ``error`` a person can act on. Raises :class:`IllegalTransition` for a move not in
    :data:`RESCORE_ALLOWED` (e.g. a finished job redelivered)."""
    current = RescoreState(job.state or R.queued)
    new = RescoreState(new_state)
    if new not in RESCORE_ALLOWED[current]:
        raise IllegalTransition(job.id, current, new, kind="rescore job", allowed=RESCORE_ALLOWED)
    if new is R.failed and not error:
        raise ValueError("a re-scoring job may only fail with a reason a person can act on")
    now = now or utcnow()
    if new is R.running:
        job.started_at = job.started_at or now
    else:
        job.finished_at = now
        if new is R.failed:
            job.error = error
    job.state = new
    return job
