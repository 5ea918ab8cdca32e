"""The database rules every step of the worker shares: locks, who owns a run (owner token,
heartbeat), the exactly-once score insert, storage accounting, the completion rule
(:func:`advance`) and failing a submission. What only one step needs (cutting shards, claiming a
validation, CaseRuns, the reaper's queries) sits beside that step's task in
:mod:`worker.validation`, :mod:`worker.inference`, :mod:`worker.reaper`.

Everything here is plain SQLAlchemy on a caller's session, unit-tested on SQLite without a broker.

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
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.base import finite_or_none, utcnow
from services.db.enums import FailureCode, ShardState
from services.db.enums import SubmissionState as S
from services.db.models import Case, Lesion, Score, Shard, Submission, TestSet
from services.db.states import SHARD_OPEN, UNFINISHED, close_open_shards, transition
from evaluation.metric_registry import METRICS
from evaluation.scoring import ScoreRow

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
# scores
# --------------------------------------------------------------------------------------------
def scored_case_pks(session: Session, submission_id: int, protocol_key: str,
                    case_pks: Iterable[int] | None = None) -> set[int]:
    """Primary keys of the cases of ``submission_id`` that have scores under ``protocol_key``."""
    query = sa.select(Score.case_id).where(Score.submission_id == submission_id,
                                           Score.protocol_key == protocol_key).distinct()
    if case_pks is not None:
        query = query.where(Score.case_id.in_(list(case_pks)))
    return set(session.scalars(query))


def insert_scores_ignore(session: Session, submission_id: int, case_pk: int, protocol_key: str,
                         rows: Iterable[ScoreRow]) -> int:
    """Insert one case's score rows (:class:`evaluation.scoring.ScoreRow`; units mm for hd95/assd),
    ignoring any that already exist under the UNIQUE key; returns how many rows were new.
    ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` on both SQLite and PostgreSQL.

    Every metric of :data:`evaluation.metric_registry.METRICS` is a column (``ScoreRow.value``;
    NULL when not computed); the per-lesion records of a lesion class's row go to ``lesions``,
    only for rows that were new (a second delivery adds nothing)."""
    rows = list(rows)
    values = [
        {"submission_id": submission_id, "case_id": case_pk, "organ": r.organ, "protocol_key": protocol_key,
         **{metric: finite_or_none(r.value(metric)) for metric in METRICS},
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
    ).returning(Score.id, Score.organ)
    new = dict((organ, score_id) for score_id, organ in session.execute(statement).all())
    lesions = [
        {"score_id": new[r.organ], "side": lesion.side, "component": lesion.index, "voxels": lesion.voxels,
         "volume_mm3": lesion.volume_mm3, "diameter_mm": lesion.diameter_mm, "matched_to": lesion.matched_to,
         "iou": lesion.iou, "dsc": lesion.dsc}
        for r in rows if r.organ in new for lesion in r.lesions
    ]
    if lesions:
        session.execute(sa.insert(Lesion), lesions)
    return len(new)


# --------------------------------------------------------------------------------------------
# ownership of a run (a shard, or a submission's validation run)
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


def beat_validation(session: Session, submission_id: int, owner: str) -> bool:
    """Heartbeat of a validation run this process runs; False when it is no longer ours."""
    return _beat(session, Submission, submission_id, owner, Submission.state == S.validating)


# --------------------------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------------------------
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
# completion
# --------------------------------------------------------------------------------------------
def open_shards(session: Session, submission_id: int) -> int:
    """Shards still pending or running."""
    return session.scalar(
        sa.select(sa.func.count(Shard.id)).where(Shard.submission_id == submission_id,
                                                 Shard.state.in_(list(SHARD_OPEN)))
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
    if S(submission.state) not in UNFINISHED:
        return False
    transition(submission, S.failed, reason=reason, code=code)
    close_open_shards(session, submission.id, ShardState.cancelled)
    return True


def submission_progress(submission_id: int) -> dict[str, Any]:
    """Where a submission's execution stands (the pipeline tests and benchmarks poll it): state,
    failure reason and code, shard states by index, and the number of score rows on hidden cases."""
    from services.db.session import session_scope

    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        if sub is None:
            return {}
        shards = list(session.scalars(sa.select(Shard).where(Shard.submission_id == submission_id)))
        n_scores = session.scalar(
            sa.select(sa.func.count(Score.id)).join(Case, Case.id == Score.case_id)
            .where(Score.submission_id == submission_id, Case.public_sample.is_(False))
        ) or 0
        return {"state": sub.state.value, "failure_reason": sub.failure_reason, "failure_code": sub.failure_code,
                "shards": {s.index: s.state.value for s in shards}, "scores": n_scores,
                "at": dt.datetime.now(dt.timezone.utc).isoformat()}
