"""The reaper: ``touchstone.reap`` (cpu, every ``reap_interval_s`` from the beat) finds the work
whose worker vanished and hands it out again -- shards and validation runs without a fresh
heartbeat are retried (or fail their submission after ``max_attempts``), validations whose message
was lost are sent again -- and reclaims the storage of failed and cancelled submissions
``failed_tarball_grace_s`` after they ended.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.config import get_settings
from services.db.base import utcnow
from services.db.enums import ShardState
from services.db.enums import SubmissionState as S
from services.db.models import Shard, Submission
from services.db.session import session_scope
from services.db.states import shard_transition
from services.storage import Storage
from services.submissions import audit
from worker import pipeline
from worker.app import CPU_QUEUE, GPU_QUEUE, WorkerSettings, app, worker_settings
from worker.finalize import finalize
from worker.inference import fail_if_attempts_exhausted, infer_shard
from worker.monitoring import measure_tree
from worker.outputs import delete_tree
from worker.runs import fail, log, submission_runs_dir
from worker.runtime.base import FailureCode
from worker.validation import infrastructure_reason, release_validation, validate, validate_run


# --------------------------------------------------------------------------------------------
# database side: what the reaper looks for
# --------------------------------------------------------------------------------------------
def stale_shards(session: Session, now: dt.datetime, stale_after_s: float) -> list[int]:
    """Running shards whose heartbeat is older than ``stale_after_s`` (candidates for the reaper)."""
    cutoff = now - dt.timedelta(seconds=stale_after_s)
    heartbeat = sa.func.coalesce(Shard.heartbeat_at, Shard.started_at)
    return list(session.scalars(
        sa.select(Shard.id).where(Shard.state == ShardState.running, sa.or_(heartbeat.is_(None), heartbeat < cutoff))
        .order_by(Shard.id)
    ))


def unfinalized_submissions(session: Session, now: dt.datetime, stale_after_s: float) -> list[int]:
    """Submissions still ``running``/``evaluating`` with no open shard, whose last shard ended more
    than ``stale_after_s`` ago: their finalize message may be lost (a worker killed while holding
    it). Candidates only: :func:`reap` re-checks each under its lock with ``pipeline.advance``."""
    cutoff = now - dt.timedelta(seconds=stale_after_s)
    open_shard = sa.select(Shard.id).where(Shard.submission_id == Submission.id,
                                           Shard.state.in_([ShardState.pending, ShardState.running]))
    last_end = sa.select(sa.func.max(Shard.finished_at)).where(Shard.submission_id == Submission.id).scalar_subquery()
    return list(session.scalars(
        sa.select(Submission.id).where(Submission.state.in_([S.running, S.evaluating]), ~sa.exists(open_shard),
                                       last_end < cutoff).order_by(Submission.id)
    ))


def _validations_untouched(session: Session, cutoff: dt.datetime, claimed: bool) -> list[int]:
    """Validating submissions, ``claimed`` by a worker or not, whose heartbeat (else the start of
    their validation) is older than ``cutoff``."""
    touched = sa.func.coalesce(Submission.heartbeat_at, Submission.validating_at)
    owner = Submission.worker_hostname.is_not(None) if claimed else Submission.worker_hostname.is_(None)
    return list(session.scalars(
        sa.select(Submission.id).where(Submission.state == S.validating, owner,
                                       sa.or_(touched.is_(None), touched < cutoff))
        .order_by(Submission.id)
    ))


def stale_validations(session: Session, now: dt.datetime, stale_after_s: float) -> list[int]:
    """Validating submissions claimed by a worker whose heartbeat is older than ``stale_after_s``."""
    return _validations_untouched(session, now - dt.timedelta(seconds=stale_after_s), claimed=True)


def quiet_validations(session: Session, now: dt.datetime, quiet_s: float) -> list[int]:
    """Validating submissions nobody claimed and nothing touched for ``quiet_s`` seconds (a lost
    message)."""
    return _validations_untouched(session, now - dt.timedelta(seconds=quiet_s), claimed=False)


def ended_submissions_holding_files(session: Session, now: dt.datetime, grace_s: float) -> list[int]:
    """Failed or cancelled submissions that ended more than ``grace_s`` seconds ago and still hold
    bytes in storage (an uploaded tarball, or outputs of their runs)."""
    cutoff = now - dt.timedelta(seconds=grace_s)
    ended_at = sa.func.coalesce(Submission.failed_at, Submission.cancelled_at, Submission.updated_at)
    return list(session.scalars(
        sa.select(Submission.id).where(
            Submission.state.in_([S.failed, S.cancelled]), Submission.is_baseline.is_(False), ended_at < cutoff,
            sa.or_(sa.and_(Submission.image_path.is_not(None), Submission.image_deleted_at.is_(None)),
                   Submission.storage_bytes > 0))
        .order_by(Submission.id)
    ))


# --------------------------------------------------------------------------------------------
# reap (cpu)
# --------------------------------------------------------------------------------------------
@app.task(name="touchstone.reap")
def reap() -> str:
    """Retry the shards whose worker vanished: running with a heartbeat older than
    ``stale_after_s``. A shard that used up ``max_attempts`` fails its submission. Then the
    validations (:func:`_reap_validations`) and the storage of ended submissions
    (:func:`_reap_ended_submissions`)."""
    wsettings = worker_settings()
    now = utcnow()
    retried: list[int] = []
    failed = 0
    with session_scope() as session:
        candidates = stale_shards(session, now, wsettings.stale_after_s)
    for shard_id in candidates:
        with session_scope() as session:
            shard = pipeline.lock_shard(session, shard_id)
            if shard is None or shard.state is not ShardState.running or not pipeline.owner_is_gone(
                    shard.worker_hostname, shard.heartbeat_at, utcnow(), wsettings.stale_after_s):
                continue
            sub = pipeline.lock_submission(session, shard.submission_id)
            assert sub is not None
            lost = f"the worker {shard.worker_hostname} running attempt {shard.attempts} stopped answering"
            if sub.state not in pipeline.ACTIVE_STATES:
                shard_transition(shard, ShardState.cancelled, now=now)
                continue
            if fail_if_attempts_exhausted(session, shard, sub, lost, now):
                failed += 1
                continue
            shard_transition(shard, ShardState.pending, lost)
            retried.append(shard_id)
    for shard_id in retried:
        infer_shard.apply_async(args=[shard_id], queue=GPU_QUEUE)
    finalized = _reap_unfinalized(wsettings, now)
    v_retried, v_failed = _reap_validations(wsettings)
    reclaimed = _reap_ended_submissions()
    return (f"retried {len(retried)}, failed {failed}; finalize resent {finalized}; "
            f"validations retried {v_retried}, failed {v_failed}; "
            f"storage of {reclaimed} ended submission(s) reclaimed")


def _reap_unfinalized(wsettings: WorkerSettings, now: dt.datetime) -> int:
    """Send finalize again for the submissions whose every case is scored but which are still
    not ``scored`` (:func:`unfinalized_submissions`); finalize is idempotent (it re-checks under the
    submission's lock), so a message that was only slow costs one no-op."""
    resend: list[int] = []
    with session_scope() as session:
        candidates = unfinalized_submissions(session, now, wsettings.stale_after_s)
    for submission_id in candidates:
        with session_scope() as session:
            sub = pipeline.lock_submission(session, submission_id)
            if sub is not None and pipeline.advance(session, sub):
                resend.append(submission_id)
    for submission_id in resend:
        log.warning("submission %s: every case scored but not finalized; finalize sent again", submission_id)
        finalize.apply_async(args=[submission_id], queue=CPU_QUEUE)
    return len(resend)


def _reap_validations(wsettings: WorkerSettings) -> tuple[int, int]:
    """Validations whose worker vanished (claimed, heartbeat stale): retried, or failed with an
    infrastructure reason (not counting against the quota) after ``max_attempts``. Validations
    nobody claimed for ``validation_requeue_s`` (a lost message): sent again."""
    now = utcnow()
    retried: list[int] = []
    resent: list[int] = []
    failed = 0
    with session_scope() as session:
        stale = stale_validations(session, now, wsettings.stale_after_s)
        quiet = quiet_validations(session, now, wsettings.validation_requeue_s)
    for submission_id in stale:
        with session_scope() as session:
            sub = pipeline.lock_submission(session, submission_id)
            if sub is None or sub.state is not S.validating or not sub.worker_hostname or not pipeline.owner_is_gone(
                    sub.worker_hostname, sub.heartbeat_at, utcnow(), wsettings.stale_after_s):
                continue
            lost = f"the worker running attempt {sub.validation_attempts} stopped answering"
            release_validation(sub, utcnow())
            if (sub.validation_attempts or 0) >= wsettings.max_attempts:
                sub.counts_against_quota = False
                fail(session, sub, infrastructure_reason(lost, sub.validation_attempts), FailureCode.WORKER_LOST)
                failed += 1
                continue
            retried.append(submission_id)
    for submission_id in quiet:
        with session_scope() as session:
            sub = pipeline.lock_submission(session, submission_id)
            if sub is None or sub.state is not S.validating or sub.worker_hostname:
                continue
            sub.heartbeat_at = utcnow()  # at most one resend per period
            resent.append(submission_id)
    for submission_id in retried:
        validate_run.apply_async(args=[submission_id], queue=GPU_QUEUE)
    for submission_id in resent:
        validate.apply_async(args=[submission_id], queue=CPU_QUEUE)
    return len(retried) + len(resent), failed


def _reap_ended_submissions() -> int:
    """Reclaim the storage of failed and cancelled submissions ``failed_tarball_grace_s`` after
    they ended (the window in which an organizer may re-run them from their tarball): the
    uploaded tarball is deleted (``image_path`` = None, ``image_deleted_at`` set) and, unless
    ``keep_failed_outputs``, every output folder of their runs (``runs/submission-<id>``: the
    predictions of shards that had finished before the failure or cancellation). Their
    ``storage_bytes`` is then what is left (0, or the kept outputs). Returns how many were reclaimed."""
    settings = get_settings()
    storage = Storage.from_settings(settings)
    now = utcnow()
    with session_scope() as session:
        candidates = ended_submissions_holding_files(session, now, settings.failed_tarball_grace_s)
    reclaimed = 0
    for submission_id in candidates:
        with session_scope() as session:
            sub = pipeline.lock_submission(session, submission_id)
            if sub is None or sub.state not in (S.failed, S.cancelled):
                continue
            freed = 0
            try:
                if sub.image_path and sub.image_deleted_at is None:
                    path = storage.path(sub.image_path)
                    freed += path.lstat().st_size if path.exists() else 0
                    path.unlink(missing_ok=True)
                    sub.image_path, sub.image_deleted_at = None, now
                runs = submission_runs_dir(submission_id)
                kept = 0
                if runs.exists():
                    if settings.keep_failed_outputs:
                        kept = measure_tree(runs).bytes
                    else:
                        freed += delete_tree(runs)
            except (OSError, ValueError):
                log.exception("reclaiming the storage of submission %s failed", submission_id)
                continue
            if freed == 0 and sub.storage_bytes == kept:
                continue  # outputs kept for debugging: nothing changed since the last pass
            sub.storage_bytes = kept
            audit(session, None, "submission.storage.reclaimed", submission_id, {"bytes": freed, "kept_bytes": kept})
            reclaimed += 1
    return reclaimed
