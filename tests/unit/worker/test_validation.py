"""The validation tasks (worker/validation.py) on a real SQLite database with a fake container
runtime (tests/unit/worker/conftest.py): the image check, the public-sample run through the one
scoring path, shards cut and handed to inference, image ownership (defence in depth), engine
errors retried outside the quota, team-visible texts without server paths."""

from __future__ import annotations

import os

import pytest
import requests.exceptions
import sqlalchemy as sa
from celery.exceptions import Retry

from services.db.enums import FailureCode
from services.db.enums import SubmissionState as S
from services.db.models import AuditLog, Score, Shard
from services.db.session import session_scope
from tests.unit.worker.conftest import (
    DIGEST,
    DIGEST_B,
    FakeRuntime,
    add_submission,
    get_submission,
    image_info,
    make_world,
    run_result,
)
from worker import runs, validation


@pytest.fixture
def env(tasks_env):
    """tests/unit/worker/conftest.py::tasks_env."""
    return tasks_env


def _audit_actions(submission_id: int) -> list[str]:
    with session_scope() as session:
        return list(session.scalars(sa.select(AuditLog.action).where(AuditLog.target == f"submission:{submission_id}")
                                    .order_by(AuditLog.id)))


# --------------------------------------------------------------------------------------------
# validate (cpu)
# --------------------------------------------------------------------------------------------
def test_validate_accepts_the_image_records_its_digest_and_sends_validate_run(env, tmp_path):
    env["use_runtime"](FakeRuntime())
    submission_id = make_world(tmp_path, state=S.received)
    assert validation.validate(submission_id) == "image accepted"
    sub = get_submission(submission_id)
    assert sub.state is S.validating and sub.image_digest == DIGEST and "linux/amd64" in sub.validation_log
    assert env["sent"] == [("touchstone.validate_run", [submission_id])]
    assert _audit_actions(submission_id) == ["submission.validate.image"]


def test_validate_refuses_a_wrong_architecture_and_removes_the_image(env, tmp_path):
    runtime = env["use_runtime"](FakeRuntime(architecture="arm64"))
    submission_id = make_world(tmp_path, state=S.received)
    assert validation.validate(submission_id) == "failed: wrong_architecture"
    sub = get_submission(submission_id)
    assert sub.state is S.failed and sub.failure_code == FailureCode.WRONG_ARCHITECTURE.value
    assert sub.counts_against_quota is False  # a failed validation never counts
    assert ("remove", DIGEST) in runtime.calls and env["sent"] == []
    assert _audit_actions(submission_id) == ["submission.validate.rejected"]


def test_validate_skips_a_submission_that_moved_on(env, tmp_path):
    env["use_runtime"](FakeRuntime())
    submission_id = make_world(tmp_path, state=S.cancelled)
    assert validation.validate(submission_id) == "skipped: submission is cancelled"
    assert validation.validate(10_000) == "missing"
    assert env["sent"] == []


# --------------------------------------------------------------------------------------------
# validate_run (gpu)
# --------------------------------------------------------------------------------------------
def _scored_public_sample(tmp_path):
    """Phantom ground truth for one public and three hidden cases (tiny), and a runtime whose run
    writes the perfect prediction of each case it runs."""
    from pathlib import Path

    from evaluation import io
    from evaluation.phantoms import generate_cases, write_case

    gt = tmp_path / "gt"
    cases = {c.case_id: c for c in generate_cases(4, size="tiny", seed=5)}
    for case in cases.values():
        write_case(case, gt)

    def perfect(spec):
        for case_id in spec.case_ids:
            io.write_combined_labels(Path(spec.output_dir) / case_id, cases[case_id].labels, cases[case_id].affine)
        return run_result(spec)

    ids = sorted(cases)
    return gt, ids, perfect


def test_validate_run_scores_the_public_sample_and_cuts_the_hidden_cases_into_shards(env, tmp_path):
    gt, ids, perfect = _scored_public_sample(tmp_path)
    runtime = env["use_runtime"](FakeRuntime(on_run=perfect))
    submission_id = make_world(tmp_path, public=ids[:1], hidden=ids[1:], shard_size=2, labels_root=gt)
    assert validation.validate_run(submission_id) == "queued 2 shard(s)"
    (spec,) = runtime.runs
    assert list(spec.case_ids) == ids[:1]  # only the public sample ran
    assert spec.shard_id == validation.VALIDATION_SHARD_LABEL and spec.image == DIGEST
    assert ("leftovers", f"{submission_id}/validation") in runtime.calls  # a dead attempt's container went first
    sub = get_submission(submission_id)
    assert sub.state is S.queued and sub.worker_hostname is None and sub.validation_attempts == 1
    assert "public sample (1 case(s)), attempt 1" in sub.validation_log
    with session_scope() as session:
        shards = list(session.scalars(sa.select(Shard).where(Shard.submission_id == submission_id)
                                      .order_by(Shard.index)))
        assert [s.case_ids for s in shards] == [ids[1:3], ids[3:]]
        rows = list(session.scalars(sa.select(Score).where(Score.submission_id == submission_id)))
        assert rows and {r.status for r in rows} == {"ok"} and min(r.dsc for r in rows) > 0.9
    assert sorted(args for name, args in env["sent"]) == [[s.id] for s in shards]
    assert {name for name, _ in env["sent"]} == {"touchstone.infer_shard"}


def test_validate_run_fails_when_the_public_sample_has_no_output(env, tmp_path):
    runtime = env["use_runtime"](FakeRuntime(on_run=run_result))  # runs, writes nothing
    submission_id = make_world(tmp_path)
    assert validation.validate_run(submission_id) == "failed: no_output"
    sub = get_submission(submission_id)
    assert sub.state is S.failed and sub.failure_code == FailureCode.NO_OUTPUT.value
    assert sub.failure_reason.startswith("Validation on the public sample failed")
    assert len(runtime.runs) == 1 and env["sent"] == []
    assert _audit_actions(submission_id) == ["submission.validate.failed"]
    with session_scope() as session:
        assert session.scalar(sa.select(sa.func.count(Shard.id))) == 0


def test_cut_into_shards():
    assert validation.cut_into_shards(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert validation.cut_into_shards(["a", "b"], 1) == [["a"], ["b"]]
    assert validation.cut_into_shards([], 3) == []
    with pytest.raises(ValueError):
        validation.cut_into_shards(["a"], 0)


# --------------------------------------------------------------------------------------------
# image ownership, engine errors, texts without server paths
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_ref", [
    DIGEST_B,  # team B's uploaded image, by its digest
    f"touchstone/other@{DIGEST_B}",
    "touchstone/example-trivial:latest",  # a local tag
    "b6e480ba2e67",  # a short id
])
def test_an_image_of_another_team_or_a_local_tag_never_runs(env, tmp_path, image_ref):
    from services.db.images import REFUSAL

    runtime = FakeRuntime(local=[DIGEST_B])
    env["use_runtime"](runtime)
    submission_id = add_submission(tmp_path, image_ref=image_ref)
    assert validation.validate_run(submission_id) == "failed: image_load_failed"
    assert runtime.runs == []  # never reached runtime.run
    assert not [c for c in runtime.calls if c[0] in ("inspect", "pull")]  # nothing resolved on the engine
    sub = get_submission(submission_id)
    assert sub.state is S.failed
    assert REFUSAL.split("{", 1)[0] in sub.failure_reason and "registry.example.org" in sub.failure_reason
    assert "B" not in sub.failure_reason.split("registries")[0]  # names no other team's image
    # the cpu half of validation refuses it the same way
    submission_id = add_submission(tmp_path, image_ref=image_ref)
    assert validation.validate(submission_id) == "failed: image_load_failed"
    assert runtime.runs == [] and not [c for c in runtime.calls if c[0] in ("inspect", "pull")]


def test_a_failure_reason_names_no_server_path(env, tmp_path):
    """A missing upload (the real Docker runtime's tarball check) is explained without the
    storage path; so is the validation log."""
    from services.config import get_settings
    from worker.runtime.docker import DockerRuntime

    env["use_runtime"](DockerRuntime(client=object(), deployment_id="unit"))  # never reaches the engine
    submission_id = add_submission(tmp_path, image_path="uploads/team-a/missing.tar", image_sha256="2" * 64)
    assert validation.validate(submission_id).startswith("failed")
    sub = get_submission(submission_id)
    root = str(get_settings().storage_dir)
    assert sub.state is S.failed and sub.failure_reason
    for text in (sub.failure_reason, sub.validation_log or ""):
        assert root not in text and str(os.path.realpath(root)) not in text and "uploads/team-a" not in text
    assert runs.public_text(f"cannot read {os.path.realpath(root)}/runs/x") == "cannot read <storage>/runs/x"


def test_engine_error_in_a_validation_run_is_retried_then_fails_outside_the_quota(env, tmp_path, monkeypatch):
    from worker.app import worker_settings

    countdowns: list[float] = []

    def retry(countdown=None, **_kw):  # what a worker does: re-send with the countdown
        countdowns.append(countdown)
        return Retry("retry", None)

    monkeypatch.setattr(validation.validate_run, "retry", retry)
    runtime = FakeRuntime(local=[DIGEST_B], run_error=requests.exceptions.ConnectionError("engine gone"))
    env["use_runtime"](runtime)
    # an uploaded image of team A itself (digest recorded by the cpu half of validation)
    digest_a = "sha256:" + "a" * 64
    runtime.local[digest_a] = image_info(digest_a)
    submission_id = add_submission(tmp_path, image_path="uploads/a.tar", image_sha256="3" * 64, image_digest=digest_a)
    for attempt in range(1, worker_settings().max_attempts):
        with pytest.raises(Retry):
            validation.validate_run(submission_id)
        assert countdowns[-1] > 0
        sub = get_submission(submission_id)
        assert sub.state is S.validating and sub.validation_attempts == attempt
        assert sub.worker_hostname is None and sub.heartbeat_at is not None  # the claim was given back
        # every attempt first removed what a dead attempt left behind (by label)
        assert ("leftovers", f"{submission_id}/validation") in runtime.calls
    assert validation.validate_run(submission_id) == "failed: infrastructure"  # the last attempt
    sub = get_submission(submission_id)
    assert sub.state is S.failed and sub.counts_against_quota is False
    assert "does not count against your team's quota" in sub.failure_reason
    assert len(runtime.runs) == worker_settings().max_attempts
    # no output of the failed attempts is left in storage
    runs = env["data"] / "storage" / "runs"
    assert not [p for p in runs.rglob("*") if p.is_file()]
