"""The scoring task (worker/scoring.py) on a real SQLite database: checked predictions scored
through the one scoring path, a missing one at the protocol's worst, every row written once,
finalize sent after the last case, unusable ground truth failing the submission."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from evaluation import io
from evaluation.phantoms import generate_cases, write_case
from evaluation.protocols import load_protocol
from services.db.enums import FailureCode, ShardState
from services.db.enums import SubmissionState as S
from services.db.models import Case, Score
from services.db.session import session_scope
from services.db.states import shard_transition
from tests.unit.worker.conftest import get_submission, make_world
from worker import pipeline, scoring, validation


@pytest.fixture
def env(tasks_env):
    """tests/unit/worker/conftest.py::tasks_env."""
    return tasks_env


def _evaluating(env, tmp_path, labels_ok=True):
    """Two hidden phantom cases in one finished shard (the submission ``evaluating``); h0's perfect
    prediction in storage; returns (submission id, shard id, the score items for h0 and h1)."""
    gt = tmp_path / "gt"
    cases = list(generate_cases(2, size="tiny", seed=3))
    for case in cases:
        write_case(case, gt)
    ids = [c.case_id for c in cases]
    submission_id = make_world(tmp_path, public=(), hidden=ids, shard_size=2, state=S.running,
                               labels_root=gt if labels_ok else tmp_path / "nowhere")
    with session_scope() as session:
        sub = pipeline.lock_submission(session, submission_id)
        (shard,) = validation.create_shards(session, sub, sub.testset)
        shard_transition(shard, ShardState.running, owner="me:1")
        shard_transition(shard, ShardState.succeeded)
        assert pipeline.advance(session, sub) is False and sub.state is S.evaluating  # no score yet
        pks = dict(session.execute(sa.select(Case.case_id, Case.id)).all())
        shard_id = shard.id
    prediction = f"runs/submission-{submission_id}/shard-0/t/output/{ids[0]}"
    io.write_combined_labels(env["data"] / "storage" / prediction, cases[0].labels, cases[0].affine)
    items = [[pks[ids[0]], ids[0], "ok", None, prediction],
             [pks[ids[1]], ids[1], "missing_prediction", "no folder /output/" + ids[1], None]]
    return submission_id, shard_id, items


def _rows(submission_id: int) -> dict[tuple[str, str], Score]:
    with session_scope() as session:
        found = session.execute(sa.select(Case.case_id, Score).join(Case, Case.id == Score.case_id)
                                .where(Score.submission_id == submission_id)).all()
        for _, row in found:
            session.expunge(row)
        return {(case_id, row.organ): row for case_id, row in found}


def test_score_writes_each_case_once_and_sends_finalize_after_the_last(env, tmp_path):
    submission_id, shard_id, items = _evaluating(env, tmp_path)
    organs = load_protocol("touchstone").organs
    worst = load_protocol("touchstone").worst
    assert scoring.score(submission_id, shard_id, items[:1]) == f"{len(organs)} score row(s)"
    assert env["sent"] == []  # h1 is not scored yet
    assert scoring.score(submission_id, shard_id, items) == f"{len(organs)} score row(s)"  # h0 skipped
    assert env["sent"] == [("touchstone.finalize", [submission_id])]
    rows = _rows(submission_id)
    assert len(rows) == 2 * len(organs)
    h0, h1 = items[0][1], items[1][1]
    assert {rows[(h0, o)].status for o in organs} == {"ok"} and min(rows[(h0, o)].dsc for o in organs) > 0.9
    assert {rows[(h1, o)].status for o in organs} == {"missing_prediction"}
    assert {rows[(h1, o)].dsc for o in organs} == {worst["dsc"]} and rows[(h1, "liver")].detail.startswith("no folder")
    # a redelivery of the whole batch writes nothing
    assert scoring.score(submission_id, shard_id, items) == "0 score row(s)"
    assert len(_rows(submission_id)) == 2 * len(organs)


def test_unusable_ground_truth_fails_the_submission_without_naming_it(env, tmp_path):
    submission_id, shard_id, items = _evaluating(env, tmp_path, labels_ok=False)
    assert scoring.score(submission_id, shard_id, items).startswith("failed: ground truth of")
    sub = get_submission(submission_id)
    assert sub.state is S.failed and sub.failure_code == FailureCode.GROUND_TRUTH.value
    assert "nowhere" not in sub.failure_reason and items[0][1] not in sub.failure_reason
    assert _rows(submission_id) == {} and env["sent"] == []


def test_score_skips_a_submission_that_is_no_longer_active(env, tmp_path):
    submission_id = make_world(tmp_path, state=S.cancelled)
    assert scoring.score(submission_id, None, [[1, "h0", "missing_prediction", "x", None]]) == "skipped"
    assert _rows(submission_id) == {}
