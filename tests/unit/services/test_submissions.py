"""The submission domain layer (services/submissions.py) on a migrated SQLite database: each
operation's state change and audit row, its domain errors, and publish/unpublish that commit with
their statistics or not at all."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from services import submissions
from services.db.enums import FailureCode, Role, ShardState
from services.db.enums import SubmissionState as S
from services.db.models import Algorithm, AuditLog, Shard, Submission, Team, TestSet, User

SETTINGS = SimpleNamespace(allowed_registries=(), failed_validations_per_day=2, max_team_storage_bytes=10_000)


@pytest.fixture
def db(sqlite_session):
    """tests/conftest.py::sqlite_session."""
    return sqlite_session


@pytest.fixture
def world(db):
    team = Team(name="t")
    db.add(team)
    db.flush()
    inventor = User(name="inv", role=Role.inventor, team_id=team.id)
    organizer = User(name="org", role=Role.organizer)
    algo = Algorithm(team_id=team.id, name="a")
    testset = TestSet(name="ts", protocol_name="touchstone", protocol_version="1", protocol_key="touchstone@1",
                      protocol_json={}, manifest_sha256="0" * 64, root_path="/", time_per_case_s=10,
                      memory_bytes=1 << 30, gpus=0, shm_bytes=1 << 26, pids_limit=64, shard_size=2,
                      quota_submissions=2, quota_period_days=7)
    db.add_all([inventor, organizer, algo, testset])
    db.commit()
    return SimpleNamespace(team=team, inventor=inventor, organizer=organizer, algo=algo, testset=testset)


def _record(db, w, sha="a" * 64, size=100, ref=None):
    return submissions.record(db, w.inventor, w.algo, w.testset, image_path=None if ref else f"uploads/{sha}.tar",
                              image_sha256=None if ref else sha, image_size=None if ref else size, image_ref=ref,
                              settings=SETTINGS)


def _audits(db, action):
    return list(db.scalars(sa.select(AuditLog).where(AuditLog.action == action)))


def _in_state(db, w, state: S) -> Submission:
    sub = _record(db, w, sha=f"{state.value:0<64}"[:64])
    # fixture: put the row straight into the state under test (tests may)
    sub.state = state
    db.commit()
    return sub


def test_record_stores_a_received_submission_and_its_audit_row(db, world):
    sub = _record(db, world)
    assert sub.id and sub.state is S.received and sub.received_at is not None
    assert sub.storage_bytes == 100 and sub.team_id == world.team.id
    (audit,) = _audits(db, "submission.receive")
    assert audit.target == f"submission:{sub.id}" and audit.actor_id == world.inventor.id


def test_record_refuses_a_duplicate_the_quota_and_the_storage_cap(db, world):
    first = _record(db, world, sha="a" * 64)
    with pytest.raises(submissions.Conflict, match=f"submission {first.id}") as info:
        _record(db, world, sha="a" * 64)
    assert info.value.status == 409
    _record(db, world, sha="b" * 64)
    with pytest.raises(submissions.QuotaExceeded, match="quota reached: your team has used 2 of 2") as info:
        _record(db, world, sha="c" * 64)
    assert info.value.status == 429
    world.testset.quota_submissions = 9
    db.commit()
    with pytest.raises(submissions.StorageFull) as info:
        _record(db, world, sha="d" * 64, size=20_000)
    assert info.value.status == 413
    assert db.scalar(sa.select(sa.func.count(Submission.id))) == 2
    assert len(_audits(db, "submission.receive")) == 2  # refusals write nothing


def test_record_refuses_an_image_ref_the_team_did_not_supply(db, world):
    with pytest.raises(submissions.InvalidImage) as info:
        _record(db, world, ref="registry.example/other:1")
    assert info.value.status == 422
    assert db.scalar(sa.select(sa.func.count(Submission.id))) == 0


def test_record_refuses_an_image_that_failed_validation(db, world):
    sub = _record(db, world, sha="e" * 64)
    submissions.fail(db, world.organizer, sub.id, "no output for the public sample")
    with pytest.raises(submissions.Conflict, match="already failed validation"):
        _record(db, world, sha="e" * 64)


def test_cancel_rerun_fail_change_the_state_and_write_their_audit_rows(db, world):
    sub = _record(db, world)
    submissions.cancel(db, world.organizer, sub.id)
    assert sub.state is S.cancelled and sub.failure_reason == "cancelled by organizer org"
    (audit,) = _audits(db, "submission.cancel")
    assert audit.actor_id == world.organizer.id and audit.details == {"reason": "cancelled by organizer org"}
    submissions.rerun(db, world.organizer, sub.id, "engine was down")
    assert sub.state is S.received and sub.rerun_count == 1 and sub.failure_reason is None
    assert _audits(db, "submission.rerun")[0].details == {"reason": "engine was down"}
    shard = Shard(submission_id=sub.id, index=0, case_ids=["c0"], state=ShardState.pending, attempts=0)
    db.add(shard)
    db.commit()
    submissions.fail(db, world.organizer, sub.id, "the organizer stopped it", FailureCode.INFRASTRUCTURE)
    db.refresh(shard)
    assert sub.state is S.failed and sub.failure_code == "infrastructure"
    assert shard.state is ShardState.cancelled and shard.finished_at is not None
    assert len(_audits(db, "submission.fail")) == 1


def test_errors_not_found_and_illegal_moves(db, world):
    with pytest.raises(submissions.NotFound, match="no submission 999") as info:
        submissions.publish(db, world.organizer, 999)
    assert info.value.status == 404
    sub = _record(db, world)
    for operation in (submissions.publish, submissions.unpublish, submissions.rerun):
        with pytest.raises(submissions.Conflict, match="is received; it cannot become") as info:
            operation(db, world.organizer, sub.id)
        assert info.value.status == 409
    with pytest.raises(submissions.SubmissionError, match="reason"):
        submissions.fail(db, world.organizer, sub.id, "")
    db.refresh(sub)
    assert sub.state is S.received
    assert not _audits(db, "submission.publish") and not _audits(db, "submission.rerun")


def test_publish_and_unpublish_commit_with_their_statistics(db, world, monkeypatch):
    calls = []
    monkeypatch.setattr(submissions, "recompute_statistics",
                        lambda session, sid: calls.append((sid, session.get(Submission, sid).state)))
    sub = _in_state(db, world, S.scored)
    submissions.publish(db, world.organizer, sub.id)
    assert calls == [(sub.id, S.published)]  # the statistics see the new state, in the same transaction
    db.expire_all()
    assert db.get(Submission, sub.id).state is S.published and db.get(Submission, sub.id).published_at
    assert len(_audits(db, "submission.publish")) == 1
    submissions.unpublish(db, world.organizer, sub.id)
    db.expire_all()
    assert db.get(Submission, sub.id).state is S.scored and len(_audits(db, "submission.unpublish")) == 1


def test_publish_with_the_real_statistics(db, world):
    sub = _in_state(db, world, S.scored)
    submissions.publish(db, world.organizer, sub.id)
    db.expire_all()
    assert db.get(Submission, sub.id).state is S.published


@pytest.mark.parametrize("start, operation", [(S.scored, "publish"), (S.published, "unpublish")])
def test_failing_statistics_roll_everything_back(db, world, monkeypatch, start, operation):
    sub = _in_state(db, world, start)

    def broken(session, submission_id):
        session.add(AuditLog(action="statistics.partial", target="x", details={}))  # half-written work
        session.flush()
        raise RuntimeError("bootstrap exploded")

    monkeypatch.setattr(submissions, "recompute_statistics", broken)
    with pytest.raises(submissions.StatisticsFailed, match="bootstrap exploded") as info:
        getattr(submissions, operation)(db, world.organizer, sub.id)
    assert info.value.status == 500
    assert f"submission {sub.id} was not {operation}ed" in str(info.value)
    db.expire_all()
    assert db.get(Submission, sub.id).state is start  # unchanged
    assert not _audits(db, f"submission.{operation}") and not _audits(db, "statistics.partial")
