"""`touchstone testsets update --prediction-retention`, `storage report|reclaim`, `rescore` and
`rescore-jobs` on a migrated SQLite database (the broker replaced by a recorder)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from typer.testing import CliRunner


@pytest.fixture
def cli(tmp_path, monkeypatch):
    from services import queue
    from services.config import get_settings
    from services.db import migrate
    from services.db.enums import SubmissionState
    from services.db.models import Algorithm, Case, CaseRun, Submission, Team, TestSet
    from services.db.session import dispose_engines, session_scope
    from services.db.testsets import resolve_protocol

    data = tmp_path / "data"
    monkeypatch.setenv("TOUCHSTONE_DATA_DIR", str(data))
    monkeypatch.delenv("TOUCHSTONE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    dispose_engines()
    get_settings().ensure_dirs()
    migrate.upgrade("head", get_settings().database_url)
    sent: list = []
    monkeypatch.setattr(queue, "send_task", lambda name, args, queue: sent.append((name, args)))
    storage = data / "storage"
    with session_scope() as session:
        name, version, as_json = resolve_protocol("touchstone")
        testset = TestSet(name="ts", protocol_name=name, protocol_version=version, protocol_key=f"{name}@{version}",
                          protocol_json=as_json, manifest_sha256="0" * 64, root_path=str(tmp_path), time_per_case_s=1,
                          memory_bytes=1, gpus=0, shm_bytes=1, pids_limit=1, shard_size=1, quota_submissions=1,
                          quota_period_days=1)
        team = Team(name="t")
        session.add_all([testset, team])
        session.flush()
        case = Case(testset_id=testset.id, case_id="h0", image_path="x", labels_path="y")
        algorithm = Algorithm(team_id=team.id, name="a")
        session.add_all([case, algorithm])
        session.flush()
        sub = Submission(algorithm_id=algorithm.id, testset_id=testset.id, team_id=team.id, storage_bytes=2048,
                         state=SubmissionState.scored, scored_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=9))
        session.add(sub)
        session.flush()
        folder = storage / "runs" / f"submission-{sub.id}" / "shard-0" / "r" / "output" / "h0"
        folder.mkdir(parents=True)
        session.add(CaseRun(submission_id=sub.id, case_id=case.id, status="ok",
                            detail=folder.relative_to(storage).as_posix()))
        sub_id = sub.id
    from services.cli.main import app

    runner = CliRunner()
    yield lambda *args: runner.invoke(app, list(args)), sent, sub_id
    get_settings.cache_clear()
    dispose_engines()


def test_retention_report_reclaim_and_rescore(cli):
    invoke, sent, sub_id = cli
    result = invoke("testsets", "update", "ts", "--prediction-retention", "a year")
    assert result.exit_code == 1 and "'all', 'none' or a number of days" in result.output
    report = json.loads(invoke("storage", "report", "--json").output)
    assert report[0]["retention"] == "keep all predictions" and report[0]["submissions"][0]["predictions"] == "kept"
    assert "none" in invoke("storage", "reclaim", "--dry-run").output

    result = invoke("testsets", "update", "ts", "--prediction-retention", "7d")
    assert result.exit_code == 0 and "keep predictions 7 days after scoring" in result.output
    report = json.loads(invoke("storage", "report", "--json", "--testset", "ts").output)
    assert report[0]["submissions"][0]["predictions"] == "reclaimable" and report[0]["reclaimable_bytes"] == 2048
    table = invoke("storage", "report").output
    assert "keep predictions 7 days after scoring" in table and "reclaimable" in table
    result = invoke("storage", "reclaim", "--dry-run")
    assert result.exit_code == 0 and f"would delete the predictions of 1 submission(s) (0.0 MiB): {sub_id}" in result.output
    assert sent == []
    result = invoke("storage", "reclaim")
    assert result.exit_code == 0 and sent == [("touchstone.reclaim_predictions", [[sub_id]])]
    assert invoke("storage", "report", "--testset", "nope").exit_code == 1

    result = invoke("rescore", "ts", "--protocol", "touchstone")
    assert result.exit_code == 1 and "scored under touchstone@1 already" in result.output
    result = invoke("rescore", "ts", "--protocol", "nsd-deepmind@1", "--submissions", "x,y")
    assert result.exit_code == 1 and "comma-separated ids" in result.output
    result = invoke("rescore", "ts", "--protocol", "nsd-deepmind@1", "--json")
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert (job["state"], job["submission_ids"], job["n_cases_total"]) == ("queued", [sub_id], 1)
    assert sent[-1] == ("touchstone.rescore", [job["job_id"]])
    listed = invoke("rescore-jobs", "ts").output
    assert f"job {job['job_id']} under nsd-deepmind@1: queued; 0/1 case(s)" in listed
    assert invoke("rescore-jobs", "ts", "--job", "999").exit_code == 1
    # the leaderboard of the new version exists (empty until the worker scored it); an unknown one is an error
    assert invoke("leaderboard", "ts", "--protocol", "nsd-deepmind@1", "--format", "json").exit_code == 0
    result = invoke("leaderboard", "ts", "--protocol", "touchstone@5")
    assert result.exit_code == 1 and "touchstone@1, nsd-deepmind@1" in result.output
