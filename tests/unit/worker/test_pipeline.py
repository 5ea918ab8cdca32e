"""worker.pipeline on a real SQLite database: shards, idempotent scores, ownership, completion."""

from __future__ import annotations

import datetime as dt
import os
import socket

import pytest
import sqlalchemy as sa

from services.db.enums import Role, ShardState
from services.db.enums import SubmissionState as S
from services.db.models import Algorithm, Case, Score, Shard, Submission, Team, TestSet, User
from worker import pipeline, reaper, validation
from evaluation.scoring import ScoreRow


@pytest.fixture
def session(sqlite_session):
    """tests/conftest.py::sqlite_session."""
    return sqlite_session


def _setup(db, n_hidden=5, n_public=1, shard_size=2):
    team = Team(name="t")
    db.add(team)
    db.flush()
    user = User(name="u", role=Role.inventor, team_id=team.id)
    algo = Algorithm(team_id=team.id, name="a")
    testset = TestSet(name="ts", protocol_name="touchstone", protocol_version="1", protocol_key="touchstone@1",
                      protocol_json={}, manifest_sha256="0" * 64, root_path="/", time_per_case_s=10, memory_bytes=1 << 30,
                      gpus=0, shm_bytes=1 << 26, pids_limit=64, shard_size=shard_size, quota_submissions=9,
                      quota_period_days=7)
    db.add_all([user, algo, testset])
    db.flush()
    for i in range(n_hidden + n_public):
        db.add(Case(testset_id=testset.id, case_id=f"c{i}", image_path=f"/x/c{i}.nii.gz", labels_path="/x",
                    public_sample=i >= n_hidden))
    sub = Submission(algorithm_id=algo.id, testset_id=testset.id, team_id=team.id, state=S.queued)
    db.add(sub)
    db.commit()
    return sub, testset


def test_shards_cover_hidden_cases_once_and_are_idempotent(session):
    sub, testset = _setup(session, n_hidden=5, shard_size=2)
    shards = validation.create_shards(session, sub, testset)
    assert [s.case_ids for s in shards] == [["c0", "c1"], ["c2", "c3"], ["c4"]]  # c5 is public
    again = validation.create_shards(session, sub, testset)
    assert [s.id for s in again] == [s.id for s in shards]


def test_scores_insert_ignore_on_the_unique_key(session):
    sub, testset = _setup(session)
    case = session.scalar(sa.select(Case).where(Case.case_id == "c0"))
    rows = [ScoreRow("c1", "liver", 0.9, 0.8, None, None, "ok"),
            ScoreRow("c1", "spleen", float("nan"), 0.1, float("inf"), 1.0, "ok")]
    assert pipeline.insert_scores_ignore(session, sub.id, case.id, "touchstone@1", rows) == 2
    changed = [ScoreRow("c1", "liver", 0.1, 0.1, None, None, "ok")]
    assert pipeline.insert_scores_ignore(session, sub.id, case.id, "touchstone@1", changed) == 0
    session.commit()
    stored = {s.organ: s for s in session.scalars(sa.select(Score))}
    assert len(stored) == 2 and stored["liver"].dsc == 0.9  # the first write wins, nothing doubled
    assert stored["spleen"].dsc is None and stored["spleen"].hd95 is None  # NaN/inf stored as NULL
    assert pipeline.scored_case_pks(session, sub.id, "touchstone@1") == {case.id}
    assert pipeline.scored_case_pks(session, sub.id, "other@1") == set()


def test_lesion_metrics_and_lesions_are_stored_once(session):
    """A lesion class's row: every lesion metric in its column, NaN as NULL, its per-lesion records
    in ``lesions`` (only when the row was new; deleted with the score)."""
    import numpy as np

    from evaluation.lesions import evaluate_lesions
    from evaluation.metric_registry import LESION_METRICS
    from services.db.models import Lesion

    sub, _ = _setup(session)
    case = session.scalar(sa.select(Case).where(Case.case_id == "c0"))
    truth = np.zeros((12, 12, 12), bool)
    truth[1:4, 1:4, 1:4] = truth[7:10, 7:10, 7:10] = True  # two lesions
    pred = np.zeros_like(truth)
    pred[1:4, 1:4, 2:5] = pred[1:3, 8:11, 1:3] = True  # one found, one missed, one false positive
    result = evaluate_lesions(pred, truth, (1.0, 1.0, 2.0))
    row = ScoreRow("c0", "liver_lesion", 0.5, 0.6, None, None, "ok",
                   lesion_metrics=dict(result.metrics), lesions=tuple(result.lesions))
    organ = ScoreRow("c0", "liver", 0.9, 0.8, None, None, "ok")
    assert pipeline.insert_scores_ignore(session, sub.id, case.id, "touchstone-lesions@1", [organ, row]) == 2
    assert pipeline.insert_scores_ignore(session, sub.id, case.id, "touchstone-lesions@1", [row]) == 0
    session.commit()
    stored = {s.organ: s for s in session.scalars(sa.select(Score))}
    for metric in LESION_METRICS:
        assert getattr(stored["liver"], metric) is None
        expected = result.metrics[metric]
        assert getattr(stored["liver_lesion"], metric) == (None if np.isnan(expected) else pytest.approx(expected))
    assert (stored["liver_lesion"].lesion_tp, stored["liver_lesion"].lesion_fp, stored["liver_lesion"].lesion_fn) == (1, 1, 1)
    lesions = session.scalars(sa.select(Lesion).order_by(Lesion.side.desc(), Lesion.component)).all()
    assert [(x.side, x.component, x.voxels, x.matched_to, x.iou, x.dsc) for x in lesions] == [
        (x.side, x.index, x.voxels, x.matched_to, pytest.approx(x.iou), pytest.approx(x.dsc)) for x in result.lesions]
    assert {x.score_id for x in lesions} == {stored["liver_lesion"].id}
    session.execute(sa.delete(Score).where(Score.id == stored["liver_lesion"].id))
    session.commit()
    assert session.scalars(sa.select(Lesion)).all() == []


def test_advance_walks_the_state_machine_and_waits_for_scores(session):
    sub, testset = _setup(session, n_hidden=2, shard_size=2)
    (shard,) = validation.create_shards(session, sub, testset)
    sub = pipeline.lock_submission(session, sub.id)
    assert pipeline.advance(session, sub) is False and sub.state is S.queued  # a shard is pending
    shard.state = ShardState.succeeded
    assert pipeline.advance(session, sub) is False  # no scores yet
    assert sub.state is S.evaluating and sub.running_at and sub.evaluating_at
    for case in session.scalars(sa.select(Case).where(Case.public_sample.is_(False))):
        pipeline.insert_scores_ignore(session, sub.id, case.id, "touchstone@1",
                                      [ScoreRow("c1", "liver", 1.0, 1.0, 0.0, 0.0, "ok")])
    assert pipeline.advance(session, sub) is True
    sub.state = S.cancelled
    assert pipeline.advance(session, sub) is False


def test_owner_is_gone():
    now = dt.datetime.now(dt.timezone.utc)
    host = socket.gethostname()
    fresh, stale = now - dt.timedelta(seconds=1), now - dt.timedelta(seconds=100)
    assert not pipeline.owner_is_gone(f"{host}:{os.getpid()}", stale, now, 10)  # ourselves
    dead_pid = 2**22 + 12345  # above pid_max on usual systems
    assert pipeline.owner_is_gone(f"{host}:{dead_pid}", fresh, now, 10)  # dead process on this host
    assert not pipeline.owner_is_gone("elsewhere:1", fresh, now, 10)  # another host: heartbeat decides
    assert pipeline.owner_is_gone("elsewhere:1", stale, now, 10)
    assert pipeline.owner_is_gone(None, None, now, 10)


def test_stale_shards_and_heartbeat(session):
    sub, testset = _setup(session, n_hidden=2, shard_size=1)
    a, b = validation.create_shards(session, sub, testset)
    now = dt.datetime.now(dt.timezone.utc)
    a.state, a.worker_hostname, a.heartbeat_at = ShardState.running, "me:1", now - dt.timedelta(seconds=60)
    b.state, b.worker_hostname, b.heartbeat_at = ShardState.running, "me:2", now
    session.commit()
    assert reaper.stale_shards(session, now, 30) == [a.id]
    assert pipeline.beat(session, a.id, "me:1") is True
    assert reaper.stale_shards(session, dt.datetime.now(dt.timezone.utc), 30) == []
    assert pipeline.beat(session, a.id, "someone-else:3") is False  # reaped and given away: not ours


def test_fail_submission_closes_open_shards(session):
    sub, testset = _setup(session, n_hidden=3, shard_size=1)
    shards = validation.create_shards(session, sub, testset)
    shards[0].state = ShardState.succeeded
    session.commit()
    assert pipeline.fail_submission(session, sub, "because") is True
    session.commit()
    states = [s.state for s in session.scalars(sa.select(Shard).order_by(Shard.index))]
    assert states == [ShardState.succeeded, ShardState.cancelled, ShardState.cancelled]
    assert pipeline.fail_submission(session, sub, "again") is False
