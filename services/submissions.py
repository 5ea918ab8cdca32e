"""The submission domain layer: what may be done to a submission, in one place (in the spirit of
the FastAPI full-stack template's ``crud`` module).

Every operation takes a session, checks what it must, changes the state through
:mod:`services.db.states`, writes its audit row and commits -- or rolls everything back and raises
a :class:`SubmissionError`:

- :func:`record`: the quota, duplicate, image-ownership, failed-resubmission, failure-rate and
  storage checks and the insert of a ``received`` submission, in one transaction serialised per
  team (see "Quota race" below). The API (services/api/intake.py streams the upload and calls it),
  the pipeline tests and benchmarks/pipeline.py all record submissions here;
- :func:`publish` / :func:`unpublish`: the state change and the recomputation of the stored
  leaderboard statistics commit together; when the statistics fail nothing is written (the
  submission stays as it was) and :class:`StatisticsFailed` says so;
- :func:`cancel`, :func:`rerun`, :func:`fail`: organizer actions.

Errors carry a ``status`` hint (the HTTP status the API answers with); the API maps every
:class:`SubmissionError` in one place (services/api/errors.py). Nothing here imports the web layer.

Quota race: the check-and-insert first updates the team row (``intake_counter += 1``). On
PostgreSQL that UPDATE takes the team's row lock; on SQLite it takes the database write lock. A
concurrent intake for the same team waits at that statement until the first commits, and then
counts the committed row: of two uploads racing for the last slot exactly one is accepted.
"""

from __future__ import annotations

import datetime as dt
import logging

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.audit import audit as audit_row
from services.db import images
from services.db.base import utcnow
from services.db.enums import FailureCode, SubmissionState
from services.db.models import Algorithm, Submission, Team, TestSet, User
from services.db.states import IllegalTransition, close_open_shards, transition

log = logging.getLogger("touchstone.submissions")


# -----------------------------------------------------------------------------------------------
# errors
# -----------------------------------------------------------------------------------------------
class SubmissionError(Exception):
    """A refused operation on a submission; ``status`` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


# One small class per HTTP status, alike by design: callers catch the kind of error they mean.

class NotFound(SubmissionError):
    status = 404


class Conflict(SubmissionError):
    """Not allowed in the submission's state, or conflicts with a stored submission."""

    status = 409


class InvalidImage(SubmissionError):
    """An image reference the team may not run."""

    status = 422


class QuotaExceeded(SubmissionError):
    """The quota or the failed-validation rate is used up."""

    status = 429


class StorageFull(SubmissionError):
    """The team's storage cap would be passed."""

    status = 413


class StatisticsFailed(SubmissionError):
    """Recomputing the leaderboard statistics failed; the operation was rolled back."""

    status = 500


# -----------------------------------------------------------------------------------------------
# the checks of record()
# -----------------------------------------------------------------------------------------------
def quota_window_start(testset: TestSet, now: dt.datetime) -> dt.datetime:
    return now - dt.timedelta(days=testset.quota_period_days)


def counting_submissions(db: Session, team_id: int, testset: TestSet, now: dt.datetime) -> int:
    return db.scalar(
        sa.select(sa.func.count(Submission.id)).where(
            Submission.team_id == team_id,
            Submission.testset_id == testset.id,
            Submission.counts_against_quota.is_(True),
            Submission.received_at >= quota_window_start(testset, now),
        )
    ) or 0


def check_quota(db: Session, team_id: int, testset: TestSet, now: dt.datetime) -> None:
    used = counting_submissions(db, team_id, testset, now)
    if used >= testset.quota_submissions:
        oldest = db.scalar(
            sa.select(sa.func.min(Submission.received_at)).where(
                Submission.team_id == team_id,
                Submission.testset_id == testset.id,
                Submission.counts_against_quota.is_(True),
                Submission.received_at >= quota_window_start(testset, now),
            )
        )
        when = (
            f"; the next slot frees at {(oldest + dt.timedelta(days=testset.quota_period_days)).isoformat()}"
            if oldest
            else ""
        )
        raise QuotaExceeded(
            f"quota reached: your team has used {used} of {testset.quota_submissions} submissions per "
            f"{testset.quota_period_days} days on {testset.name!r}{when} (failed validations do not count)"
        )


def lock_team(db: Session, team_id: int) -> None:
    """Serialise intakes of one team (see the module docstring)."""
    db.execute(sa.update(Team).where(Team.id == team_id).values(intake_counter=Team.intake_counter + 1))


def check_duplicate(db: Session, algorithm: Algorithm, testset: TestSet, sha256: str | None, ref: str | None) -> None:
    query = sa.select(Submission.id).where(
        Submission.algorithm_id == algorithm.id,
        Submission.testset_id == testset.id,
        Submission.state.not_in([SubmissionState.failed, SubmissionState.cancelled]),
    )
    query = query.where(Submission.image_sha256 == sha256) if sha256 else query.where(Submission.image_ref == ref)
    existing = db.scalar(query.limit(1))
    if existing is not None:
        raise Conflict(
            f"this image was already submitted for {algorithm.name!r} on {testset.name!r} (submission {existing}); "
            "submit a changed image, or ask an organizer to re-run the existing submission"
        )


def check_image_ref(db: Session, team_id: int, image_ref: str, allowed_registries) -> None:
    """An ``image_ref`` runs only an image the team supplied (services/db/images.py); the refusal
    reads the same for another team's image and for one that does not exist."""
    if not images.image_ref_allowed(db, team_id, image_ref, allowed_registries):
        raise InvalidImage(images.refusal(allowed_registries))


def _failed_validation(team_id: int, testset: TestSet):
    """Submissions of the team on the test set that failed before they were queued (validation)."""
    return (
        Submission.team_id == team_id,
        Submission.testset_id == testset.id,
        Submission.state == SubmissionState.failed,
        Submission.queued_at.is_(None),
        Submission.is_baseline.is_(False),
    )


def check_failed_resubmission(db: Session, team_id: int, testset: TestSet, sha256: str | None, ref: str | None) -> None:
    """The identical tarball (same sha256) or reference that already failed validation for this
    team is refused: running it again would fail again and cost storage without costing quota."""
    same = Submission.image_sha256 == sha256 if sha256 else Submission.image_ref == ref
    earlier = db.scalars(
        sa.select(Submission).where(*_failed_validation(team_id, testset), same).order_by(Submission.id.desc()).limit(1)
    ).first()
    if earlier is not None:
        raise Conflict(
            f"this exact image already failed validation on {testset.name!r} (submission {earlier.id}: "
            f"{earlier.failure_reason or 'see its validation log'}); fix the image and submit the changed one, "
            "or ask an organizer to re-run submission "
            f"{earlier.id} if the failure was not the image's fault"
        )


def check_failed_validation_rate(db: Session, team_id: int, testset: TestSet, now: dt.datetime, per_day: int) -> None:
    """At most ``per_day`` failed validations per team and test set in any 24 hours (they do not
    count against the quota, so without this a team could fill storage without limit)."""
    since = now - dt.timedelta(days=1)
    failed = db.scalar(
        sa.select(sa.func.count(Submission.id)).where(*_failed_validation(team_id, testset), Submission.failed_at >= since)
    ) or 0
    if failed >= per_day:
        first = db.scalar(
            sa.select(sa.func.min(Submission.failed_at)).where(*_failed_validation(team_id, testset), Submission.failed_at >= since)
        )
        when = f"; try again after {(first + dt.timedelta(days=1)).isoformat()}" if first else ""
        raise QuotaExceeded(
            f"your team had {failed} failed validations on {testset.name!r} in the last 24 hours (at most "
            f"{per_day}){when}; test the image locally first (see docs/container-contract.md)"
        )


def check_team_storage(db: Session, team_id: int, new_bytes: int, cap: int) -> None:
    from services.db.accounts import team_storage_bytes

    used = team_storage_bytes(db, team_id).get(team_id, 0)
    if used + new_bytes > cap:
        raise StorageFull(
            f"your team's submissions hold {used / 2**30:.2f} GiB in storage; this image "
            f"({new_bytes / 2**30:.2f} GiB) would pass the team's cap of {cap / 2**30:.2f} GiB; "
            "wait until failed submissions' images are deleted, or ask an organizer"
        )


# -----------------------------------------------------------------------------------------------
# operations
# -----------------------------------------------------------------------------------------------
def audit(db: Session, actor: User | None, action: str, submission_id: int, details: dict) -> None:
    """The audit row of an action on a submission (``actor`` None: the system, e.g. a worker);
    the one place that builds them, here and in the worker."""
    audit_row(db, actor, action, f"submission:{submission_id}", details)


def record(
    db: Session,
    user: User,
    algorithm: Algorithm,
    testset: TestSet,
    *,
    image_path: str | None,
    image_sha256: str | None,
    image_size: int | None,
    image_ref: str | None,
    settings=None,
) -> Submission:
    """Store a new submission as ``received``: the ownership (``image_ref``), failed-resubmission,
    failure-rate, quota, duplicate and storage checks and the insert with its audit row
    (``submission.receive``), in one transaction serialised per team (committed here; rolled back
    on any refusal). The caller hands it to the queue."""
    if settings is None:
        from services.config import get_settings

        settings = get_settings()
    now = utcnow()
    try:
        lock_team(db, algorithm.team_id)
        if image_ref is not None:
            check_image_ref(db, algorithm.team_id, image_ref, settings.allowed_registries)
        check_failed_resubmission(db, algorithm.team_id, testset, image_sha256, image_ref)
        check_failed_validation_rate(db, algorithm.team_id, testset, now, settings.failed_validations_per_day)
        check_quota(db, algorithm.team_id, testset, now)
        check_duplicate(db, algorithm, testset, image_sha256, image_ref)
        check_team_storage(db, algorithm.team_id, image_size or 0, settings.max_team_storage_bytes)
        # keyword arguments one a line, like other constructors (evaluation/stats): alike in shape only
        submission = Submission(
            algorithm_id=algorithm.id,
            testset_id=testset.id,
            team_id=algorithm.team_id,
            submitted_by_id=user.id,
            state=SubmissionState.received,
            received_at=now,
            image_path=image_path,
            image_sha256=image_sha256,
            image_size_bytes=image_size,
            image_ref=image_ref,
            storage_bytes=image_size or 0,
        )
        db.add(submission)
        db.flush()
        audit(db, user, "submission.receive", submission.id,
               {"algorithm": algorithm.name, "testset": testset.name, "sha256": image_sha256, "ref": image_ref})
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return submission


def get(db: Session, submission_id: int) -> Submission:
    submission = db.get(Submission, submission_id)
    if submission is None:
        raise NotFound(f"no submission {submission_id}")
    return submission


def _move(db: Session, actor: User | None, submission_id: int, new_state: SubmissionState, action: str,
          reason: str | None, code: FailureCode | str | None = None) -> Submission:
    """Lookup, state change and audit row (not committed)."""
    submission = get(db, submission_id)
    try:
        transition(submission, new_state, reason, code)
    except IllegalTransition as exc:
        db.rollback()
        raise Conflict(str(exc)) from exc
    audit(db, actor, action, submission.id, {"reason": reason})
    return submission


def _commit(db: Session) -> None:
    try:
        db.commit()
    except BaseException:
        db.rollback()
        raise


def recompute_statistics(db: Session, submission_id: int) -> None:
    """Publishing changes who is compared: recompute the stored leaderboard statistics (flushed,
    not committed: the caller commits them with the state change)."""
    from services.leaderboard import on_submission_scored

    on_submission_scored(db, submission_id)


def _move_with_statistics(db: Session, actor: User | None, submission_id: int, new_state: SubmissionState,
                          action: str, verb: str) -> Submission:
    submission = _move(db, actor, submission_id, new_state, action, None)
    try:
        recompute_statistics(db, submission.id)
        db.commit()
    except BaseException as exc:
        db.rollback()
        if not isinstance(exc, Exception):
            raise
        log.exception("%s of submission %s: the leaderboard statistics failed; rolled back", verb, submission_id)
        raise StatisticsFailed(
            f"submission {submission_id} was not {verb}: recomputing the leaderboard statistics failed "
            f"({type(exc).__name__}: {exc}); nothing was changed, try again or see the server log"
        ) from exc
    return submission


def publish(db: Session, actor: User | None, submission_id: int) -> Submission:
    """``scored -> published`` and the statistics of the published scope recomputed, committed
    together (:class:`StatisticsFailed`: nothing written, still scored)."""
    return _move_with_statistics(db, actor, submission_id, SubmissionState.published, "submission.publish",
                                 "published")


def unpublish(db: Session, actor: User | None, submission_id: int) -> Submission:
    """``published -> scored`` and the statistics recomputed, committed together."""
    return _move_with_statistics(db, actor, submission_id, SubmissionState.scored, "submission.unpublish",
                                 "unpublished")


def cancel(db: Session, actor: User | None, submission_id: int, reason: str | None = None) -> Submission:
    """An unfinished submission becomes ``cancelled`` (the workers stop its runs when they see it)."""
    reason = reason or f"cancelled by organizer {actor.name if actor else 'unknown'}"
    submission = _move(db, actor, submission_id, SubmissionState.cancelled, "submission.cancel", reason)
    _commit(db)
    return submission


def rerun(db: Session, actor: User | None, submission_id: int, reason: str | None = None) -> Submission:
    """A failed, cancelled or scored submission goes back to ``received`` (stored scores are kept
    and reused); the caller hands it to the queue."""
    submission = _move(db, actor, submission_id, SubmissionState.received, "submission.rerun", reason)
    _commit(db)
    return submission


def fail(db: Session, actor: User | None, submission_id: int, reason: str,
         code: FailureCode | str = FailureCode.OTHER) -> Submission:
    """An unfinished submission fails with ``reason`` (required) and ``code``; its open shards
    are cancelled."""
    if not reason:
        raise SubmissionError("a submission may only fail with a reason a person can act on", 422)
    submission = _move(db, actor, submission_id, SubmissionState.failed, "submission.fail", reason, code)
    close_open_shards(db, submission.id)
    _commit(db)
    return submission
