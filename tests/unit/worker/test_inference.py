"""The inference task (worker/inference.py) on a real SQLite database with a fake container
runtime (tests/unit/worker/conftest.py): one shard from claim to the scoring messages -- what
runs, what is recorded per case and per shard, what is retried, skipped or failed."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests.exceptions
import sqlalchemy as sa

from evaluation.scoring import ScoreRow
from services.db.enums import FailureCode, ShardState
from services.db.enums import SubmissionState as S
from services.db.models import Case, CaseRun, Shard
from services.db.session import session_scope
from tests.unit.worker.conftest import FakeRuntime, get_submission, make_world, run_result, write_label_files
from worker import inference, pipeline, validation
from worker.app import worker_settings
from worker.runtime.base import FailureReason


@pytest.fixture
def env(tasks_env):
    """tests/unit/worker/conftest.py::tasks_env."""
    return tasks_env


def _queued(tmp_path, hidden=("h0", "h1", "h2"), shard_size=2, state=S.queued) -> tuple[int, list[int]]:
    """A submission in ``state`` with its shards cut (as validate_run leaves it)."""
    submission_id = make_world(tmp_path, hidden=hidden, shard_size=shard_size, state=state)
    with session_scope() as session:
        sub = pipeline.lock_submission(session, submission_id)
        return submission_id, [s.id for s in validation.create_shards(session, sub, sub.testset)]


def _shard(shard_id: int) -> Shard:
    with session_scope() as session:
        shard = session.get(Shard, shard_id)
        session.expunge(shard)
        return shard


def _case_runs(submission_id: int) -> dict[str, CaseRun]:
    with session_scope() as session:
        rows = session.execute(sa.select(Case.case_id, CaseRun).join(Case, Case.id == CaseRun.case_id)
                               .where(CaseRun.submission_id == submission_id)).all()
        for _, run in rows:
            session.expunge(run)
        return {case_id: run for case_id, run in rows}


def test_a_shard_runs_its_cases_records_them_and_sends_them_to_scoring(env, tmp_path):
    runtime = env["use_runtime"](FakeRuntime(on_run=write_label_files))
    submission_id, (first, _second) = _queued(tmp_path)
    assert inference.infer_shard(first) == "ran 2 case(s) in attempt 1: 2 ok"
    (spec,) = runtime.runs
    assert list(spec.case_ids) == ["h0", "h1"] and spec.shard_id == "shard-0" and spec.time_limit_s > 0
    assert ("leftovers", f"{submission_id}/shard-0") in runtime.calls  # an earlier attempt's leftovers first
    shard = _shard(first)
    assert shard.state is ShardState.succeeded and shard.attempts == 1 and shard.exit_code == 0
    assert shard.run_seconds == 1.0 and shard.peak_memory_bytes == 1 << 20 and shard.log_tail == "done"
    assert get_submission(submission_id).state is S.running  # the other shard is still pending
    runs = _case_runs(submission_id)
    assert {c: r.status for c, r in runs.items()} == {"h0": "ok", "h1": "ok"}
    assert runs["h0"].wall_seconds == 0.5 and runs["h1"].wall_seconds == 1.0  # from the output timestamps
    ((name, (sub_arg, shard_arg, items)),) = env["sent"]
    assert (name, sub_arg, shard_arg) == ("touchstone.score", submission_id, first)
    assert [item[1:4] for item in items] == [["h0", "ok", None], ["h1", "ok", None]]
    storage = env["data"] / "storage"
    for item in items:  # the prediction folders stay (for scoring), the staged inputs are gone
        assert (storage / item[4] / "combined_labels.nii.gz").is_file()
        assert not (storage / item[4]).parent.parent.joinpath("input").exists()


def test_a_timed_out_run_records_missing_cases_and_fails_the_shard(env, tmp_path):
    def only_first(spec):
        out = Path(spec.output_dir) / spec.case_ids[0]
        out.mkdir()
        (out / "combined_labels.nii.gz").write_bytes(b"partial")
        return run_result(spec, timed_out=True, exit_code=None, output_seen_s={spec.case_ids[0]: 3.0},
                          failure=FailureReason.time_limit(spec.time_limit_s, len(spec.case_ids)))

    env["use_runtime"](FakeRuntime(on_run=only_first))
    submission_id, (first, _) = _queued(tmp_path)
    assert inference.infer_shard(first).endswith("1 ok")
    shard = _shard(first)
    assert shard.state is ShardState.failed and shard.failure_code == FailureCode.TIME_LIMIT.value
    runs = _case_runs(submission_id)
    assert runs["h0"].status == "ok" and runs["h1"].status == "timeout" and runs["h1"].wall_seconds is None
    ((_, (_, _, items)),) = env["sent"]
    assert items[1][2] == "missing_prediction" and items[1][4] is None and items[1][3] == "no folder /output/h1"
    assert get_submission(submission_id).state is S.running  # a failed shard does not fail the submission


def test_an_engine_error_gives_the_shard_back_for_a_retry(env, tmp_path):
    env["use_runtime"](FakeRuntime(run_error=requests.exceptions.ConnectionError("engine gone")))
    submission_id, (first, _) = _queued(tmp_path)
    assert inference.infer_shard(first).startswith("retrying: the container engine failed")
    shard = _shard(first)
    assert shard.state is ShardState.pending and shard.worker_hostname is None and shard.attempts == 1
    assert env["sent"] == [("touchstone.infer_shard", [first])]
    assert _case_runs(submission_id) == {}
    assert not [p for p in (env["data"] / "storage" / "runs").rglob("*") if p.is_file()]  # nothing left


def test_scored_cases_never_run_again_and_a_shard_with_nothing_left_succeeds(env, tmp_path):
    runtime = env["use_runtime"](FakeRuntime(on_run=write_label_files))
    submission_id, (first, _) = _queued(tmp_path)
    with session_scope() as session:
        h0 = session.scalar(sa.select(Case.id).where(Case.case_id == "h0"))
        pipeline.insert_scores_ignore(session, submission_id, h0, "touchstone@1",
                                      [ScoreRow("h0", "liver", 0.9, 0.8, 1.0, 0.5, "ok", "")])
    inference.infer_shard(first)
    assert [list(spec.case_ids) for spec in runtime.runs] == [["h1"]]
    env["sent"].clear()
    with session_scope() as session:  # the shard is handed out again (a redelivery): nothing is run twice
        h1 = session.scalar(sa.select(Case.id).where(Case.case_id == "h1"))
        pipeline.insert_scores_ignore(session, submission_id, h1, "touchstone@1",
                                      [ScoreRow("h1", "liver", 0.9, 0.8, 1.0, 0.5, "ok", "")])
    assert inference.infer_shard(first) == "skipped: shard is succeeded"
    assert len(runtime.runs) == 1 and env["sent"] == []


def test_a_shard_of_a_cancelled_submission_is_cancelled_unrun(env, tmp_path):
    runtime = env["use_runtime"](FakeRuntime(on_run=write_label_files))
    submission_id, (first, _) = _queued(tmp_path, state=S.cancelled)
    assert inference.infer_shard(first) == "skipped: submission is cancelled"
    assert _shard(first).state is ShardState.cancelled and runtime.runs == []
    assert inference.infer_shard(10_000) == "missing"


def test_a_shard_out_of_attempts_fails_its_submission(env, tmp_path):
    runtime = env["use_runtime"](FakeRuntime(on_run=write_label_files))
    submission_id, (first, second) = _queued(tmp_path)
    with session_scope() as session:
        session.get(Shard, first).attempts = worker_settings().max_attempts
    assert inference.infer_shard(first) == "failed: attempts exhausted"
    assert runtime.runs == []
    sub = get_submission(submission_id)
    assert sub.state is S.failed and sub.failure_code == FailureCode.ATTEMPTS_EXHAUSTED.value
    assert _shard(second).state is ShardState.cancelled  # the submission's other open shards close


@pytest.mark.parametrize(("out_status", "failure", "expected"), [
    ("ok", None, ("ok", "ok")),
    ("invalid", None, ("invalid_output", "invalid_prediction")),
    ("missing", FailureReason.time_limit(10.0, 1), ("timeout", "missing_prediction")),
    ("missing", None, ("missing_output", "missing_prediction")),
])
def test_case_statuses(out_status, failure, expected):
    run_status, score_status = inference.case_statuses(out_status, failure)
    assert (run_status, score_status.value) == expected
