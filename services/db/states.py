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
"""

from __future__ import annotations

from services.db.base import utcnow
from services.db.enums import FailureCode
from services.db.enums import SubmissionState as S
from services.db.models import Submission

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
    """A state change the state machine does not allow (the message names both states)."""

    def __init__(self, submission_id: int | None, current: S, requested: S) -> None:
        allowed = ", ".join(sorted(s.value for s in ALLOWED[current])) or "none"
        super().__init__(
            f"submission {submission_id} is {current.value}; it cannot become {requested.value} "
            f"(from {current.value} it may become: {allowed})"
        )
        self.submission_id = submission_id
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
