"""The database side of execution: locks, shards, score upserts and the completion rule.

Everything here is plain SQLAlchemy on a caller's session, so the Celery tasks in
:mod:`worker.tasks` stay thin and this module is unit-tested on SQLite without a broker.

Locking, portable to SQLite and PostgreSQL: :func:`lock_submission` / :func:`lock_shard` start the
transaction with an ``UPDATE`` of the row. On PostgreSQL that takes the row lock (a concurrent
task waits and then sees the committed row, READ COMMITTED); on SQLite it takes the database
write lock. It must be the first statement of the transaction (a SQLite reader that later wants to
write could fail with ``SQLITE_BUSY_SNAPSHOT``), so callers lock before they read.

Exactly-once scoring: a case is scored when it has Score rows under the test set's protocol key;
rows are written with ``INSERT ... ON CONFLICT DO NOTHING`` on the UNIQUE key (submission, case,
organ, protocol_key), so two deliveries of the same scoring work leave one set of rows.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.base import finite_or_none, utcnow
from services.db.enums import FailureCode, ShardState
from services.db.enums import SubmissionState as S
from services.db.models import Case, CaseRun, Score, Shard, Submission, TestSet
from services.db.states import SHARD_TERMINAL, close_open_shards, transition
from evaluation.scoring import ScoreRow

TERMINAL_SHARD_STATES = SHARD_TERMINAL
#: submission states in which inference work may go on
ACTIVE_STATES = frozenset({S.queued, S.running, S.evaluating})


# --------------------------------------------------------------------------------------------
# locks
# --------------------------------------------------------------------------------------------
def lock_submission(session: Session, submission_id: int) -> Submission | None:
    """Lock the submission row for the rest of the transaction and return it fresh (or None)."""
    result = session.execute(
        sa.update(Submission).where(Submission.id == submission_id).values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 0:
        return None
    return session.get(Submission, submission_id, populate_existing=True)


def lock_shard(session: Session, shard_id: int) -> Shard | None:
    """Lock one shard row (see the module docstring) and return it fresh (or None)."""
    result = session.execute(
        sa.update(Shard).where(Shard.id == shard_id).values(attempts=Shard.attempts)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 0:
        return None
    return session.get(Shard, shard_id, populate_existing=True)


# --------------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------------
def cut_into_shards(case_ids: Sequence[str], shard_size: int) -> list[list[str]]:
    """Consecutive slices of at most ``shard_size`` cases (the last one may be shorter).

    ``shard_size == 1`` gives one container run per case (efficiency tracks)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    return [list(case_ids[i : i + shard_size]) for i in range(0, len(case_ids), shard_size)]


def hidden_cases(session: Session, testset_id: int) -> list[Case]:
    """The cases a submission is scored on: every case of the test set outside the public sample."""
    return list(session.scalars(
        sa.select(Case).where(Case.testset_id == testset_id, Case.public_sample.is_(False)).order_by(Case.id)
    ))


def public_cases(session: Session, testset_id: int) -> list[Case]:
    return list(session.scalars(
        sa.select(Case).where(Case.testset_id == testset_id, Case.public_sample.is_(True)).order_by(Case.id)
    ))


def create_shards(session: Session, submission: Submission, testset: TestSet) -> list[Shard]:
    """Create the submission's shards over its hidden cases (idempotent: existing shards are
    returned as they are, e.g. after an organizer re-run)."""
    existing = list(session.scalars(sa.select(Shard).where(Shard.submission_id == submission.id).order_by(Shard.index)))
    if existing:
        return existing
    case_ids = [case.case_id for case in hidden_cases(session, testset.id)]
    shards = [
        Shard(submission_id=submission.id, index=i, case_ids=ids, state=ShardState.pending, attempts=0)
        for i, ids in enumerate(cut_into_shards(case_ids, testset.shard_size))
    ]
    session.add_all(shards)
    session.flush()
    return shards


def scored_case_pks(session: Session, submission_id: int, protocol_key: str,
                    case_pks: Iterable[int] | None = None) -> set[int]:
    """Primary keys of the cases of ``submission_id`` that have scores under ``protocol_key``."""
    query = sa.select(Score.case_id).where(Score.submission_id == submission_id,
                                           Score.protocol_key == protocol_key).distinct()
    if case_pks is not None:
        query = query.where(Score.case_id.in_(list(case_pks)))
    return set(session.scalars(query))


def cases_by_id(session: Session, testset_id: int, case_ids: Sequence[str]) -> dict[str, Case]:
    rows = session.scalars(sa.select(Case).where(Case.testset_id == testset_id, Case.case_id.in_(list(case_ids))))
    return {case.case_id: case for case in rows}


# --------------------------------------------------------------------------------------------
# ownership of a running shard
# --------------------------------------------------------------------------------------------
def owner_token() -> str:
    """``host:pid`` of this process: who runs a shard."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_is_gone(owner: str | None, heartbeat_at: dt.datetime | None, now: dt.datetime, stale_after_s: float) -> bool:
    """Whether the worker that claimed a running shard can be presumed dead.

    On this host the process id answers at once; elsewhere only the heartbeat's age does
    (older than ``stale_after_s`` seconds, or none at all)."""
    if owner:
        host, _, pid = owner.rpartition(":")
        if host == socket.gethostname() and pid.isdigit():
            if int(pid) == os.getpid():
                return False
            if not _pid_alive(int(pid)):
                return True
    if heartbeat_at is None:
        return True
    return (now - _aware(heartbeat_at)).total_seconds() > stale_after_s


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def beat(session: Session, shard_id: int, owner: str) -> bool:
    """Write the heartbeat of a shard this process runs; False when it is no longer ours (reaped)."""
    return _beat(session, Shard, shard_id, owner, Shard.state == ShardState.running)


def _beat(session: Session, table, row_id: int, owner: str, still_running) -> bool:
    """Set ``heartbeat_at`` of the row ``row_id`` of ``table`` (Shard or Submission) when
    ``owner`` still holds it and ``still_running`` is true of it; commit; True when written."""
    result = session.execute(
        sa.update(table)
        .where(table.id == row_id, table.worker_hostname == owner, still_running)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def stale_shards(session: Session, now: dt.datetime, stale_after_s: float) -> list[int]:
    """Running shards whose heartbeat is older than ``stale_after_s`` (candidates for the reaper)."""
    cutoff = now - dt.timedelta(seconds=stale_after_s)
    heartbeat = sa.func.coalesce(Shard.heartbeat_at, Shard.started_at)
    return list(session.scalars(
        sa.select(Shard.id).where(Shard.state == ShardState.running, sa.or_(heartbeat.is_(None), heartbeat < cutoff))
        .order_by(Shard.id)
    ))


# --------------------------------------------------------------------------------------------
# validation runs: an owner and a heartbeat, like shards
# --------------------------------------------------------------------------------------------
def claim_validation(submission: Submission, owner: str, now: dt.datetime) -> int:
    """Make ``owner`` the worker running the (locked) submission's validation; returns the attempt."""
    submission.worker_hostname = owner
    submission.heartbeat_at = now
    submission.validation_attempts = (submission.validation_attempts or 0) + 1
    return submission.validation_attempts


def release_validation(submission: Submission, now: dt.datetime) -> None:
    submission.worker_hostname = None
    submission.heartbeat_at = now


def beat_validation(session: Session, submission_id: int, owner: str) -> bool:
    """Heartbeat of a validation run this process runs; False when it is no longer ours."""
    return _beat(session, Submission, submission_id, owner, Submission.state == S.validating)


def stale_validations(session: Session, now: dt.datetime, stale_after_s: float) -> list[int]:
    """Validating submissions claimed by a worker whose heartbeat is older than ``stale_after_s``."""
    cutoff = now - dt.timedelta(seconds=stale_after_s)
    heartbeat = sa.func.coalesce(Submission.heartbeat_at, Submission.validating_at)
    return list(session.scalars(
        sa.select(Submission.id).where(Submission.state == S.validating, Submission.worker_hostname.is_not(None),
                                       sa.or_(heartbeat.is_(None), heartbeat < cutoff))
        .order_by(Submission.id)
    ))


def quiet_validations(session: Session, now: dt.datetime, quiet_s: float) -> list[int]:
    """Validating submissions nobody claimed and nothing touched for ``quiet_s`` seconds (a lost
    message)."""
    cutoff = now - dt.timedelta(seconds=quiet_s)
    touched = sa.func.coalesce(Submission.heartbeat_at, Submission.validating_at)
    return list(session.scalars(
        sa.select(Submission.id).where(Submission.state == S.validating, Submission.worker_hostname.is_(None),
                                       sa.or_(touched.is_(None), touched < cutoff))
        .order_by(Submission.id)
    ))


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


def add_storage_bytes(session: Session, submission_id: int, delta: int) -> None:
    """Add ``delta`` (negative: a deletion) to the bytes a submission holds; never below zero."""
    if not delta:
        return
    new = Submission.storage_bytes + int(delta)
    session.execute(
        sa.update(Submission).where(Submission.id == submission_id)
        .values(storage_bytes=sa.case((new < 0, 0), else_=new))
        .execution_options(synchronize_session=False)
    )


# --------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------
def insert_scores_ignore(session: Session, submission_id: int, case_pk: int, protocol_key: str,
                         rows: Iterable[ScoreRow]) -> int:
    """Insert one case's score rows (:class:`evaluation.scoring.ScoreRow`; units mm for hd95/assd),
    ignoring any that already exist under the UNIQUE key; returns how many rows were new.
    ``INSERT ... ON CONFLICT DO NOTHING`` on both SQLite and PostgreSQL."""
    values = [
        {"submission_id": submission_id, "case_id": case_pk, "organ": r.organ, "protocol_key": protocol_key,
         **{metric: finite_or_none(getattr(r, metric)) for metric in ("dsc", "nsd", "hd95", "assd")},
         "status": (r.status or "ok")[:32], "detail": r.detail or None}
        for r in rows
    ]
    if not values:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two supported databases
        raise RuntimeError(f"unsupported database {dialect!r}")
    statement = insert(Score).values(values).on_conflict_do_nothing(
        index_elements=["submission_id", "case_id", "organ", "protocol_key"]
    )
    return session.execute(statement).rowcount or 0


def upsert_case_run(session: Session, submission_id: int, case_pk: int, shard_id: int | None,
                    status: str, detail: str | None, wall_seconds: float | None) -> CaseRun:
    """The one CaseRun of (submission, case): created, or overwritten by a later attempt."""
    run = session.scalar(sa.select(CaseRun).where(CaseRun.submission_id == submission_id, CaseRun.case_id == case_pk))
    if run is None:
        run = CaseRun(submission_id=submission_id, case_id=case_pk)
        session.add(run)
    run.shard_id = shard_id
    run.status = status
    run.detail = detail
    run.wall_seconds = wall_seconds
    return run


# --------------------------------------------------------------------------------------------
# completion
# --------------------------------------------------------------------------------------------
def open_shards(session: Session, submission_id: int) -> int:
    """Shards still pending or running."""
    return session.scalar(
        sa.select(sa.func.count(Shard.id)).where(Shard.submission_id == submission_id,
                                                 Shard.state.in_([ShardState.pending, ShardState.running]))
    ) or 0


def unscored_hidden_cases(session: Session, submission: Submission, testset: TestSet) -> int:
    total = session.scalar(
        sa.select(sa.func.count(Case.id)).where(Case.testset_id == testset.id, Case.public_sample.is_(False))
    ) or 0
    scored = session.scalar(
        sa.select(sa.func.count(sa.distinct(Score.case_id)))
        .join(Case, Case.id == Score.case_id)
        .where(Score.submission_id == submission.id, Score.protocol_key == testset.protocol_key,
               Case.public_sample.is_(False))
    ) or 0
    return total - scored


def advance(session: Session, submission: Submission) -> bool:
    """Move a locked submission along as far as its shards allow; True when it is ready to be
    finalized (every shard done and every hidden case scored).

    ``queued``/``running`` with no open shard → ``evaluating`` (through ``running``, the state
    machine has no shortcut)."""
    state = S(submission.state)
    if state not in ACTIVE_STATES:
        return False
    if open_shards(session, submission.id):
        return False
    if state is S.queued:
        transition(submission, S.running)
        state = S.running
    if state is S.running:
        transition(submission, S.evaluating)
    return unscored_hidden_cases(session, submission, submission.testset) == 0


def fail_submission(session: Session, submission: Submission, reason: str,
                    code: FailureCode | str = FailureCode.OTHER) -> bool:
    """Fail an unfinished submission with ``reason`` and its ``code`` (stored beside it; False when
    it is already finished or cancelled); its open shards become cancelled."""
    if S(submission.state) not in (S.received, S.validating, S.queued, S.running, S.evaluating):
        return False
    transition(submission, S.failed, reason=reason, code=code)
    close_open_shards(session, submission.id, ShardState.cancelled)
    return True

