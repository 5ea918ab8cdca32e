"""The finalize task (worker/finalize.py) on a real SQLite database: scored only when every shard
is done and every hidden case scored, with its statistics in the same transaction, and scored
without them (logged) when they fail."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from evaluation.scoring import worst_rows
from evaluation.protocols import load_protocol
from services.db.enums import ShardState
from services.db.enums import SubmissionState as S
from services.db.models import AuditLog, Case
from services.db.session import session_scope
from services.db.states import shard_transition
from tests.unit.worker.conftest import get_submission, make_world
from worker import finalize, pipeline, validation


@pytest.fixture
def env(tasks_env):
    """tests/unit/worker/conftest.py::tasks_env."""
    return tasks_env


def _all_run(tmp_path, scored=("h0", "h1")) -> int:
    """A running submission whose one shard finished, with worst-score rows for ``scored``."""
    submission_id = make_world(tmp_path, public=(), hidden=("h0", "h1"), state=S.running)
    protocol = load_protocol("touchstone")
    with session_scope() as session:
        sub = pipeline.lock_submission(session, submission_id)
        (shard,) = validation.create_shards(session, sub, sub.testset)
        shard_transition(shard, ShardState.running, owner="me:1")
        shard_transition(shard, ShardState.succeeded)
        for case_id, pk in session.execute(sa.select(Case.case_id, Case.id)).all():
            if case_id in scored:
                pipeline.insert_scores_ignore(session, submission_id, pk, "touchstone@1",
                                              worst_rows(case_id, protocol, "missing_prediction", "none"))
    return submission_id


def _actions(submission_id: int) -> list[str]:
    with session_scope() as session:
        return list(session.scalars(sa.select(AuditLog.action).where(AuditLog.target == f"submission:{submission_id}")))


def test_finalize_waits_for_the_last_score(env, tmp_path):
    submission_id = _all_run(tmp_path, scored=("h0",))
    assert finalize.finalize(submission_id) == "not ready"
    assert get_submission(submission_id).state is S.evaluating and _actions(submission_id) == []


def test_finalize_marks_scored_with_the_statistics_in_one_transaction(env, tmp_path, monkeypatch):
    seen = []

    def statistics(session, submission_id):
        # inside the same transaction: the state change is visible, not yet committed
        seen.append(pipeline.lock_submission(session, submission_id).state)

    monkeypatch.setattr(finalize, "_statistics_entry_point", lambda: statistics)
    submission_id = _all_run(tmp_path)
    assert finalize.finalize(submission_id) == "scored; statistics done"
    assert seen == [S.scored] and get_submission(submission_id).state is S.scored
    assert _actions(submission_id) == ["submission.scored"]
    assert finalize.finalize(submission_id) == "not ready"  # a redelivery changes nothing
    assert _actions(submission_id) == ["submission.scored"]


def test_failing_statistics_leave_the_submission_scored_without_them(env, tmp_path, monkeypatch):
    def broken(session, submission_id):
        raise RuntimeError("statistics broke")

    monkeypatch.setattr(finalize, "_statistics_entry_point", lambda: broken)
    submission_id = _all_run(tmp_path)
    assert finalize.finalize(submission_id) == "scored; statistics failed"
    assert get_submission(submission_id).state is S.scored and _actions(submission_id) == ["submission.scored"]


def test_finalize_with_the_real_statistics(env, tmp_path):
    submission_id = _all_run(tmp_path)
    assert finalize.finalize(submission_id) == "scored; statistics done"
    assert get_submission(submission_id).state is S.scored
