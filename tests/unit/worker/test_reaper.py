"""The reaper (worker/reaper.py) on a real SQLite database: shards and validations of vanished
workers retried or failed after ``max_attempts``, lost validation messages sent again, the
storage of ended submissions reclaimed."""

from __future__ import annotations

import datetime as dt

import pytest

from services.db.enums import FailureCode, ShardState
from services.db.enums import SubmissionState as S
from services.db.models import Shard
from services.db.session import session_scope
from services.db.states import shard_transition
from tests.unit.worker.conftest import add_submission, get_submission, make_world
from worker import reaper, validation
from worker.app import worker_settings


@pytest.fixture
def env(tasks_env):
    """tests/unit/worker/conftest.py::tasks_env."""
    return tasks_env


def _running_shards(submission_id: int, attempts: list[int], owner="gone-host:1") -> list[int]:
    """The submission's shards, each running attempt ``attempts[i]`` with a heartbeat long stale."""
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=worker_settings().stale_after_s + 60)
    with session_scope() as session:
        sub = get_submission(submission_id)
        shards = validation.create_shards(session, session.merge(sub), session.merge(sub).testset)
        for shard, attempt in zip(shards, attempts, strict=True):
            for _ in range(attempt):
                if shard.state is ShardState.running:
                    shard_transition(shard, ShardState.pending, "lost")
                shard_transition(shard, ShardState.running, owner=owner, now=old)
        return [s.id for s in shards]


def test_reaper_retries_a_shard_whose_worker_vanished_and_fails_one_out_of_attempts(env, tmp_path):
    going_on = make_world(tmp_path, hidden=("h0",), state=S.running)
    (retried,) = _running_shards(going_on, [1])
    submission_id = make_world(tmp_path / "b", hidden=("k0", "k1"), shard_size=1, state=S.running, team="B")
    exhausted, closed = _running_shards(submission_id, [worker_settings().max_attempts, 1])
    outcome = reaper.reap()
    assert outcome.startswith("retried 1, failed 1")
    assert env["sent"] == [("touchstone.infer_shard", [retried])]
    with session_scope() as session:
        again, spent = session.get(Shard, retried), session.get(Shard, exhausted)
        assert again.state is ShardState.pending and again.worker_hostname is None and "stopped answering" in again.failure_reason
        assert spent.state is ShardState.failed and spent.failure_code == FailureCode.ATTEMPTS_EXHAUSTED.value
        assert session.get(Shard, closed).state is ShardState.cancelled  # its submission failed: not retried
    sub = get_submission(submission_id)
    assert sub.state is S.failed and sub.failure_code == FailureCode.ATTEMPTS_EXHAUSTED.value
    assert "could not be completed in 3 attempts" in sub.failure_reason


def test_reaper_leaves_a_live_shard_and_cancels_one_of_a_cancelled_submission(env, tmp_path):
    submission_id = make_world(tmp_path, hidden=("h0",), state=S.running)
    (shard_id,) = _running_shards(submission_id, [1])
    with session_scope() as session:  # a heartbeat just now: the worker is alive
        session.get(Shard, shard_id).heartbeat_at = dt.datetime.now(dt.timezone.utc)
    assert reaper.reap().startswith("retried 0, failed 0") and env["sent"] == []
    other = make_world(tmp_path / "b", hidden=("k0",), state=S.cancelled, team="B")
    (cancelled_shard,) = _running_shards(other, [1])
    reaper.reap()
    with session_scope() as session:
        assert session.get(Shard, cancelled_shard).state is ShardState.cancelled
        assert session.get(Shard, shard_id).state is ShardState.running


def test_reaper_resends_a_validation_nobody_claimed(env, tmp_path, monkeypatch):
    monkeypatch.setattr(worker_settings(), "validation_requeue_s", 30.0)
    quiet = add_submission(tmp_path, image_path="uploads/q.tar",
                           validating_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=120))
    reaper.reap()
    assert ("touchstone.validate", [quiet]) in env["sent"]
    env["sent"].clear()
    reaper.reap()  # at most one resend per period
    assert ("touchstone.validate", [quiet]) not in env["sent"]


def test_reaper_retries_a_validation_whose_worker_vanished_and_fails_it_after_max_attempts(env, tmp_path):
    from worker.app import worker_settings

    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=worker_settings().stale_after_s + 60)
    first = add_submission(tmp_path, image_path="uploads/1.tar", worker_hostname="gone-host:1", heartbeat_at=old,
                        validation_attempts=1)
    last = add_submission(tmp_path, image_path="uploads/2.tar", worker_hostname="gone-host:2", heartbeat_at=old,
                       validation_attempts=worker_settings().max_attempts)
    fresh = add_submission(tmp_path, image_path="uploads/3.tar", worker_hostname="busy-host:3",
                        heartbeat_at=dt.datetime.now(dt.timezone.utc), validation_attempts=1)
    reaper.reap()
    assert ("touchstone.validate_run", [first]) in env["sent"]
    assert get_submission(first).state is S.validating and get_submission(first).worker_hostname is None
    failed = get_submission(last)
    assert failed.state is S.failed and failed.counts_against_quota is False
    assert "stopped answering" in failed.failure_reason and "quota" in failed.failure_reason
    assert get_submission(fresh).worker_hostname == "busy-host:3"
    assert ("touchstone.validate_run", [fresh]) not in env["sent"]


def test_reaper_deletes_failed_validation_tarballs_after_the_grace(env, tmp_path, monkeypatch):
    from services.config import get_settings

    monkeypatch.setenv("TOUCHSTONE_FAILED_TARBALL_GRACE_S", "60")
    get_settings.cache_clear()
    storage = env["data"] / "storage"
    now = dt.datetime.now(dt.timezone.utc)
    ids = {}
    for name, failed_ago in (("old", 600), ("recent", 5)):
        (storage / "uploads").mkdir(exist_ok=True)
        (storage / "uploads" / f"{name}.tar").write_bytes(b"x" * 1000)
        ids[name] = add_submission(tmp_path, state=S.failed, image_path=f"uploads/{name}.tar", image_sha256="4" * 64,
                                validating_at=now - dt.timedelta(seconds=failed_ago + 10),
                                failed_at=now - dt.timedelta(seconds=failed_ago), storage_bytes=1000,
                                failure_reason="Validation on the public sample failed: x")
    reaper.reap()
    old, recent = get_submission(ids["old"]), get_submission(ids["recent"])
    assert old.image_path is None and old.image_deleted_at is not None and old.storage_bytes == 0
    assert not (storage / "uploads" / "old.tar").exists()
    assert recent.image_path == "uploads/recent.tar" and recent.storage_bytes == 1000
    assert (storage / "uploads" / "recent.tar").exists()


def test_reaper_reclaims_cancelled_and_late_failed_submissions(env, tmp_path, monkeypatch):
    """Found by review: outputs kept from finished shards of a cancelled (or later failed)
    submission, and its tarball, stayed on disk and in the team's storage for ever."""
    from services.config import get_settings

    monkeypatch.setenv("TOUCHSTONE_FAILED_TARBALL_GRACE_S", "60")
    get_settings.cache_clear()
    storage = env["data"] / "storage"
    now = dt.datetime.now(dt.timezone.utc)
    (storage / "uploads").mkdir(exist_ok=True)
    ids = {}
    for name, state, ended in (("cancelled", S.cancelled, "cancelled_at"), ("late", S.failed, "failed_at"),
                               ("scored", S.scored, "scored_at")):
        (storage / "uploads" / f"{name}.tar").write_bytes(b"x" * 1000)
        ids[name] = add_submission(tmp_path, state=state, image_path=f"uploads/{name}.tar", image_sha256=name[0] * 64,
                                queued_at=now - dt.timedelta(seconds=900), storage_bytes=1000 + 3 * 500,
                                **{ended: now - dt.timedelta(seconds=600)})
        out = storage / "runs" / f"submission-{ids[name]}" / "shard-0" / "t" / "output" / "c1" / "deep" / "deeper"
        out.mkdir(parents=True)
        for i in range(3):
            (out / f"f{i}.bin").write_bytes(b"y" * 500)
    reaper.reap()
    for name in ("cancelled", "late"):
        sub = get_submission(ids[name])
        assert sub.image_path is None and sub.image_deleted_at is not None and sub.storage_bytes == 0, name
        assert not (storage / "uploads" / f"{name}.tar").exists()
        assert not (storage / "runs" / f"submission-{ids[name]}").exists()
    scored = get_submission(ids["scored"])  # kept: its predictions are the record of a scored result
    assert scored.storage_bytes == 2500 and (storage / "runs" / f"submission-{ids['scored']}").exists()
    # a second pass has nothing to do, and writes nothing more to the audit log
    assert "reclaimed" in reaper.reap() and "storage of 0 ended" in reaper.reap()


def test_reaper_resends_a_lost_finalize_only_when_every_case_is_scored(env, tmp_path):
    """A worker killed while holding the finalize message leaves an evaluating submission whose
    every case is scored (seen at 5,903 cases on the embedded stack): the reaper sends finalize
    again, once the last shard ended ``stale_after_s`` ago; not for a submission still missing a score."""
    import sqlalchemy as sa

    from evaluation.protocols import load_protocol
    from evaluation.scoring import worst_rows
    from services.db.models import Case
    from worker import pipeline

    protocol = load_protocol("touchstone")

    def finished(root, team, scored):
        submission_id = make_world(root, public=(), hidden=("h0", "h1"), state=S.running, team=team)
        with session_scope() as session:
            sub = pipeline.lock_submission(session, submission_id)
            (shard,) = validation.create_shards(session, sub, sub.testset)
            shard_transition(shard, ShardState.running, owner="me:1")
            shard_transition(shard, ShardState.succeeded, now=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc))
            for case_id, pk in session.execute(sa.select(Case.case_id, Case.id).where(Case.testset_id == sub.testset_id)):
                if case_id in scored:
                    pipeline.insert_scores_ignore(session, submission_id, pk, "touchstone@1",
                                                  worst_rows(case_id, protocol, "missing_prediction", "none"))
            pipeline.advance(session, sub)
        return submission_id

    lost = finished(tmp_path / "a", "A", ("h0", "h1"))
    waiting = finished(tmp_path / "b", "B", ("h0",))
    assert "finalize resent 1" in reaper.reap()
    assert ("touchstone.finalize", [lost]) in env["sent"]
    assert ("touchstone.finalize", [waiting]) not in env["sent"]
    assert get_submission(lost).state is S.evaluating  # the task itself marks it scored
