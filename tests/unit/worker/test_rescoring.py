"""worker/rescoring.py: kept predictions scored under a second protocol version (the same numbers
as evaluation.scoring.score_case under that version, the first version's rows untouched, its
statistics stored per version), a submission whose predictions are gone reported, and the reclaim
task deleting exactly what the retention no longer covers."""

from __future__ import annotations

import datetime as dt
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import yaml

from tests.factories import add_algorithm

#: the module builds one scored world (phantoms, scoring, statistics: ~20 s on 2 cores) for its tests
pytestmark = pytest.mark.slow

N_CASES, PUBLIC, SEED = 4, 1, 5


def _point_at(data: Path) -> None:
    from services.config import get_settings
    from services.db.session import dispose_engines

    import os

    os.environ["TOUCHSTONE_DATA_DIR"] = str(data)
    os.environ["TOUCHSTONE_DATABASE_URL"] = f"sqlite:///{data / 'touchstone.db'}"
    get_settings.cache_clear()
    dispose_engines()


@pytest.fixture(scope="module")
def built_world(tmp_path_factory):
    """The scored world of :func:`make_scored_world`, built once per module (phantoms, scoring and
    statistics take most of the time); each test works on a copy of its data folder."""
    import os

    from services.db import migrate

    saved = {k: os.environ.get(k) for k in ("TOUCHSTONE_DATA_DIR", "TOUCHSTONE_DATABASE_URL")}
    root = tmp_path_factory.mktemp("rescoring")
    data = root / "data"
    (data / "storage").mkdir(parents=True)
    _point_at(data)
    migrate.upgrade("head", f"sqlite:///{data / 'touchstone.db'}")
    try:
        world = make_scored_world(root, data)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        _point_at_nothing()
    return data, world


def _point_at_nothing() -> None:
    from services.config import get_settings
    from services.db.session import dispose_engines

    get_settings.cache_clear()
    dispose_engines()


@pytest.fixture
def env(built_world, tmp_path, monkeypatch):
    """A copy of the built world's data folder (database and storage) that the settings point at;
    yields (data folder, world)."""
    source, world = built_world
    data = tmp_path / "data"
    shutil.copytree(source, data)
    monkeypatch.setenv("TOUCHSTONE_DATA_DIR", str(data))
    monkeypatch.setenv("TOUCHSTONE_DATABASE_URL", f"sqlite:///{data / 'touchstone.db'}")
    _point_at_nothing()
    yield data, world
    _point_at_nothing()


def _shifted_prediction(labels: np.ndarray, shift: int) -> np.ndarray:
    """The ground truth moved ``shift`` voxels along the first axis: an imperfect prediction whose
    NSD depends on the tolerance."""
    return np.roll(labels, shift, axis=0)


def make_scored_world(tmp_path: Path, data: Path, n_submissions: int = 2) -> dict:
    """A phantom test set imported under touchstone@1 and ``n_submissions`` scored submissions whose
    predictions lie in storage as the runs leave them (``runs/submission-<id>/shard-0/<run>/output/
    <case>/combined_labels.nii.gz``, ``CaseRun.detail``), scored under touchstone@1 through the
    worker's scoring function, with their statistics."""
    from evaluation import io as ev_io
    from evaluation.phantoms import generate_cases, write_phantom_set
    from evaluation.protocols import PRESETS
    from services.db.enums import SubmissionState
    from services.db.models import Case, CaseRun, Submission
    from services.db.session import session_scope
    from services.db.testsets import import_testset
    from services.leaderboard import StatsOptions, recompute_all
    from worker import pipeline
    from worker.outputs import score_output

    manifest = write_phantom_set(tmp_path / "phantoms", N_CASES, public_sample=PUBLIC, size="tiny", seed=SEED)
    arrays = {c.case_id: c for c in generate_cases(N_CASES, n_hospitals=3, size="tiny", seed=SEED)}
    ids = []
    with session_scope() as session:
        testset = import_testset(session, "phantoms", manifest, protocol="touchstone")
        algorithm = add_algorithm(session, "shifted")
        hidden = list(session.scalars(sa.select(Case).where(Case.testset_id == testset.id,
                                                            Case.public_sample.is_(False)).order_by(Case.id)))
        now = dt.datetime.now(dt.timezone.utc)
        for k in range(n_submissions):
            sub = Submission(algorithm_id=algorithm.id, testset_id=testset.id, team_id=algorithm.team_id,
                             state=SubmissionState.scored, scored_at=now, image_sha256=f"{k:064d}")
            session.add(sub)
            session.flush()
            output = data / "storage" / "runs" / f"submission-{sub.id}" / "shard-0" / "run-1" / "output"
            for i, case in enumerate(hidden):
                phantom = arrays[case.case_id]
                if k == 1 and i == 0:
                    # this run left no valid prediction of its first case (a missing output)
                    session.add(CaseRun(submission_id=sub.id, case_id=case.id, status="missing_output",
                                        detail="wrote nothing"))
                    rows = None
                else:
                    folder = output / case.case_id
                    folder.mkdir(parents=True)
                    ev_io.write_combined_labels(folder, _shifted_prediction(phantom.labels, 1 + k), phantom.affine)
                    session.add(CaseRun(submission_id=sub.id, case_id=case.id, status="ok", wall_seconds=1.0,
                                        detail=folder.relative_to(data / "storage").as_posix()))
                    rows = score_output(case.case_id, Path(case.labels_path), output, PRESETS["touchstone"])
                if rows is None:
                    from evaluation.scoring import worst_rows

                    rows = worst_rows(case.case_id, PRESETS["touchstone"], "missing_prediction", "wrote nothing")
                pipeline.insert_scores_ignore(session, sub.id, case.id, "touchstone@1", rows)
            sub.storage_bytes = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
            ids.append(sub.id)
        session.flush()
        # what finalize leaves (fewer bootstrap resamples: the statistics are not under test here)
        recompute_all(session, testset, options=StatsOptions(n_resamples=50, group_resamples=50))
        testset_id = testset.id
    return {"testset_id": testset_id, "submission_ids": ids, "manifest": manifest}


def protocol_v2(folder: Path, tolerance_mm: float = 25.0) -> Path:
    """touchstone@1 with another NSD tolerance for every organ: version 2."""
    from evaluation.protocols import PRESETS

    data = PRESETS["touchstone"].to_dict()
    data["metrics"] = list(data["metrics"])
    data["version"] = 2
    data["nsd_tolerance_mm"] = {organ: tolerance_mm for organ in data["nsd_tolerance_mm"]}
    path = folder / "touchstone-v2.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _scores(session, submission_id: int, key: str) -> dict[tuple[int, str], tuple]:
    from services.db.models import Score

    return {(s.case_id, s.organ): (s.dsc, s.nsd, s.status) for s in session.scalars(
        sa.select(Score).where(Score.submission_id == submission_id, Score.protocol_key == key))}


def test_rescore_scores_kept_predictions_under_the_new_version(env, tmp_path):
    from evaluation.protocols import load_protocol
    from evaluation.scoring import score_case
    from services import rescoring
    from services.db.models import Aggregate, Case, CaseRun, RescoreJob, StatsRun, TestSet
    from services.db.session import session_scope
    from services.leaderboard import queries
    from worker.rescoring import rescore

    env, world = env
    path = protocol_v2(tmp_path)
    v2 = load_protocol(path)
    with session_scope() as session:
        before = {sid: _scores(session, sid, "touchstone@1") for sid in world["submission_ids"]}
        testset = session.get(TestSet, world["testset_id"])
        job = rescoring.start_rescore(session, testset, str(path))
        job_id = job.id
        assert job.state.value == "queued" and job.unavailable == []
        assert job.n_cases_total == 2 * (N_CASES - PUBLIC)
    assert rescore.run(job_id) == f"{2 * (N_CASES - PUBLIC) * 9} score row(s) under touchstone@2"
    with session_scope() as session:
        job = session.get(RescoreJob, job_id)
        assert (job.state.value, job.n_cases_done, job.n_scores_written) == ("done", 6, 54)
        cases = {c.id: c for c in session.scalars(sa.select(Case).where(Case.testset_id == world["testset_id"]))}
        for sid in world["submission_ids"]:
            # the first version's rows are untouched
            assert _scores(session, sid, "touchstone@1") == before[sid]
            after = _scores(session, sid, "touchstone@2")
            assert {k for k in after} == {k for k in before[sid]}
            runs = {r.case_id: r for r in session.scalars(sa.select(CaseRun).where(CaseRun.submission_id == sid))}
            for case_pk, run in runs.items():
                if run.status != "ok":
                    # no prediction: the worst value of the new protocol, with the status it had
                    assert {after[(case_pk, o)] for o in v2.organs} == {(0.0, 0.0, "missing_prediction")}
                    continue
                folder = env / "storage" / run.detail
                expected = {r.organ: r for r in score_case(cases[case_pk].case_id, cases[case_pk].labels_path,
                                                           folder, v2)}
                for organ, row in expected.items():
                    dsc, nsd, status = after[(case_pk, organ)]
                    assert status == row.status
                    for got, want in ((dsc, row.dsc), (nsd, row.nsd)):
                        assert (got is None and (want is None or math.isnan(want))) or got == pytest.approx(want, abs=1e-12)
            # a changed tolerance changes NSD and leaves DSC as it was
            nsd_changed = [k for k in after if after[k][1] is not None and before[sid][k][1] is not None
                           and abs(after[k][1] - before[sid][k][1]) > 1e-6]
            assert nsd_changed
            assert all(after[k][0] == before[sid][k][0] for k in after)
            # statistics of both versions are stored
            for key in ("touchstone@1", "touchstone@2"):
                assert session.scalar(sa.select(sa.func.count(Aggregate.id)).where(
                    Aggregate.submission_id == sid, Aggregate.protocol_key == key)) > 0
        assert {r for r, in session.execute(sa.select(StatsRun.protocol_key).where(
            StatsRun.testset_id == world["testset_id"]).distinct())} == {"touchstone@1", "touchstone@2"}
        ts2 = queries.get_testset(session, "phantoms", "touchstone@2")
        board2 = queries.leaderboard(session, ts2, metric="nsd", scope="all")
        board1 = queries.leaderboard(session, queries.get_testset(session, "phantoms"), metric="nsd", scope="all")
        assert board2["protocol_key"] == "touchstone@2" and board1["protocol_key"] == "touchstone@1"
        assert len(board2["entries"]) == len(board1["entries"]) == 2
        assert [e["mean"] for e in board2["entries"]] != [e["mean"] for e in board1["entries"]]
        with pytest.raises(queries.LeaderboardNotFound, match="touchstone@1, touchstone@2"):
            queries.get_testset(session, "phantoms", "touchstone@3")
    # a redelivered job does nothing twice
    assert rescore.run(job_id) == "nothing to do"

    # publishing recomputes the published scope of every version; the pages show the chosen one
    from fastapi.testclient import TestClient

    from services.api.app import create_app
    from services.config import get_settings
    from services.submissions import publish

    first = world["submission_ids"][0]
    with session_scope() as session:
        publish(session, None, first)
    with session_scope() as session:
        for key in ("touchstone@1", "touchstone@2"):
            board = queries.leaderboard(session, queries.get_testset(session, "phantoms", key), scope="published")
            assert [e["submission_id"] for e in board["entries"]] == [first], key
    client = TestClient(create_app(get_settings()))
    page = client.get("/leaderboards/phantoms", params={"protocol": "touchstone@2", "metric": "nsd"})
    assert page.status_code == 200
    assert "protocol <code>touchstone@2</code>" in page.text
    assert "&amp;protocol=touchstone%402#board" in page.text  # every link keeps the version
    assert "protocol=touchstone%401" in page.text  # the selector offers the other one
    default = client.get("/leaderboards/phantoms").text
    # the default version: links without a protocol (they follow the test set's current one)
    assert "protocol <code>touchstone@1</code>" in default and 'method=mean#board"' in default
    assert client.get("/leaderboards/phantoms", params={"protocol": "touchstone@3"}).status_code == 404
    submission = client.get(f"/leaderboards/phantoms/submissions/{first}", params={"protocol": "touchstone@2"})
    assert submission.status_code == 200 and "protocol <code>touchstone@2</code>" in submission.text


def test_predictions_gone_are_reported_not_skipped(env, tmp_path):
    from services import rescoring
    from services.db.models import RescoreJob, Score, TestSet
    from services.db.session import session_scope
    from worker.rescoring import rescore

    env, world = env
    first, second = world["submission_ids"]
    shutil.rmtree(env / "storage" / "runs" / f"submission-{second}")
    path = protocol_v2(tmp_path)
    with session_scope() as session:
        job = rescoring.start_rescore(session, session.get(TestSet, world["testset_id"]), str(path))
        job_id = job.id
        assert job.submission_ids == [first]
        assert [u["submission_id"] for u in job.unavailable] == [second]
        assert "gone from storage" in job.unavailable[0]["reason"]
    # the first one's predictions disappear after the job was made: reported by the worker
    shutil.rmtree(env / "storage" / "runs" / f"submission-{first}")
    rescore.run(job_id)
    with session_scope() as session:
        job = session.get(RescoreJob, job_id)
        assert job.state.value == "done" and job.submission_ids == []
        assert sorted(u["submission_id"] for u in job.unavailable) == [first, second]
        assert session.scalar(sa.select(sa.func.count(Score.id)).where(Score.protocol_key == "touchstone@2")) == 0


def test_reclaim_deletes_only_what_the_retention_lets_go(env, tmp_path):
    from services import rescoring
    from services.db.models import AuditLog, Submission, TestSet
    from services.db.session import session_scope
    from worker.rescoring import reclaim_predictions

    env, world = env
    first, second = world["submission_ids"]
    runs = env / "storage" / "runs"
    with session_scope() as session:
        # keep all (the default): nothing to reclaim
        assert rescoring.reclaimable_submissions(session) == []
        testset = session.get(TestSet, world["testset_id"])
        rescoring.set_prediction_retention(session, testset, "3d")
        session.get(Submission, first).scored_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=4)
        stored = session.get(Submission, first).storage_bytes
    assert stored > 0
    assert reclaim_predictions.run() == f"predictions of 1 submission(s) deleted, {stored} bytes freed"
    assert not (runs / f"submission-{first}").exists() and (runs / f"submission-{second}").is_dir()
    with session_scope() as session:
        sub = session.get(Submission, first)
        assert sub.predictions_deleted_at is not None and sub.storage_bytes == 0
        assert session.scalar(sa.select(AuditLog.details).where(AuditLog.action == "submission.predictions.deleted")
                              ) == {"bytes": stored, "retention_days": 3}
        # its re-scoring is refused with the reason
        items, reason = rescoring.prediction_items(session, sub)
        assert items == [] and "deleted on" in reason and "keep predictions 3 days" in reason
        # keep none: the other one goes too, unless a re-scoring job still has to read it
        rescoring.set_prediction_retention(session, session.get(TestSet, world["testset_id"]), "none")
        job = rescoring.start_rescore(session, session.get(TestSet, world["testset_id"]),
                                      str(protocol_v2(tmp_path)))
        assert job.submission_ids == [second]
    assert reclaim_predictions.run() == "predictions of 0 submission(s) deleted, 0 bytes freed"
    assert (runs / f"submission-{second}").is_dir()
    with session_scope() as session:
        session.execute(sa.text("update rescore_jobs set state = 'done'"))
    assert reclaim_predictions.run().startswith("predictions of 1 submission(s) deleted")
    assert not (runs / f"submission-{second}").exists()


def test_a_job_that_breaks_is_failed_not_left_running(env, tmp_path, monkeypatch):
    from services import rescoring
    from services.db.models import RescoreJob, TestSet
    from services.db.session import session_scope
    from services.leaderboard import compute
    from worker.rescoring import rescore

    env, world = env

    def broken(*_args, **_kwargs):
        raise RuntimeError("the statistics broke")

    monkeypatch.setattr(compute, "recompute_protocol_version", broken)
    with session_scope() as session:
        job = rescoring.start_rescore(session, session.get(TestSet, world["testset_id"]), str(protocol_v2(tmp_path)),
                                      submission_ids=world["submission_ids"][:1])
        job_id = job.id
        assert rescoring.active_job_submissions(session) == {world["submission_ids"][0]}
    with pytest.raises(RuntimeError):
        rescore.run(job_id)
    with session_scope() as session:
        job = session.get(RescoreJob, job_id)
        assert job.state.value == "failed" and "the statistics broke" in job.error
        # its submissions are no longer held back from the reclaim
        assert rescoring.active_job_submissions(session) == set()
