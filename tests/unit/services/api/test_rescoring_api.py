"""The re-scoring and retention API (SQLite, the broker replaced by a recorder): who may do what,
what is answered to bad input, and the protocol parameter of the leaderboard routes."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
import yaml
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.config import Settings
from services.db.accounts import create_user
from tests.factories import add_algorithm, add_submission


@pytest.fixture
def client(tmp_path, monkeypatch, migrated_sqlite):
    import shutil

    from services import queue
    from services.db.models import TestSet
    from services.db.testsets import resolve_protocol

    imports = tmp_path / "imports"
    imports.mkdir()
    settings = Settings(data_dir=tmp_path / "data", import_roots=[imports])
    settings.ensure_dirs()
    shutil.copyfile(migrated_sqlite, tmp_path / "data" / "touchstone.db")
    sent: list[tuple[str, list]] = []
    monkeypatch.setattr(queue, "send_task", lambda name, args, queue: sent.append((name, args)))
    app = create_app(settings)
    with app.state.sessionmaker() as session:
        tokens = {role: create_user(session, f"u-{role}", role, "team-x" if role == "inventor" else None)[1]
                  for role in ("organizer", "inventor", "analyst")}
        name, version, as_json = resolve_protocol("touchstone")
        session.add(TestSet(name="ts", protocol_name=name, protocol_version=version, protocol_key=f"{name}@{version}",
                            protocol_json=as_json, manifest_sha256="0" * 64, root_path=str(tmp_path),
                            time_per_case_s=1, memory_bytes=1, gpus=0, shm_bytes=1, pids_limit=1, shard_size=1,
                            quota_submissions=1, quota_period_days=1))
        session.commit()
    test_client = TestClient(app, raise_server_exceptions=False)
    test_client.tokens = {k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()}
    test_client.sent, test_client.imports, test_client.app_ = sent, imports, app
    return test_client


def _v2(folder) -> str:
    from evaluation.protocols import PRESETS

    data = PRESETS["touchstone"].to_dict() | {"version": 2}
    data["metrics"] = list(data["metrics"])
    path = folder / "v2.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_rescore_is_for_organizers(client):
    body = {"protocol": _v2(client.imports)}
    assert client.post("/api/v1/testsets/ts/rescore", json=body).status_code == 401
    for role in ("inventor", "analyst"):
        answer = client.post("/api/v1/testsets/ts/rescore", json=body, headers=client.tokens[role])
        assert answer.status_code == 403 and "organizer role" in answer.json()["detail"]
        assert client.get("/api/v1/testsets/ts/rescore", headers=client.tokens[role]).status_code == 403
        assert client.get("/api/v1/testsets/ts/rescore/1", headers=client.tokens[role]).status_code == 403
    assert client.sent == []
    answer = client.post("/api/v1/testsets/ts/rescore", json=body, headers=client.tokens["organizer"])
    assert answer.status_code == 202, answer.text
    job = answer.json()
    # nothing scored yet: a job with nothing to do, done at once, and nothing sent to the workers
    assert (job["protocol_key"], job["state"], job["submission_ids"], job["progress"]) == ("touchstone@2", "done", [], 1.0)
    assert client.sent == []
    org = client.tokens["organizer"]
    assert client.get(f"/api/v1/testsets/ts/rescore/{job['job_id']}", headers=org).json() == job
    assert [j["job_id"] for j in client.get("/api/v1/testsets/ts/rescore", headers=org).json()] == [job["job_id"]]
    assert client.get("/api/v1/testsets/ts/rescore/999", headers=org).status_code == 404
    assert client.get("/api/v1/testsets/nope/rescore", headers=org).status_code == 404
    # anyone reads the versions
    assert [v["protocol_key"] for v in client.get("/api/v1/testsets/ts/protocols").json()] == ["touchstone@1",
                                                                                             "touchstone@2"]


def test_a_queued_job_goes_to_the_cpu_queue(client):
    from services.db.enums import SubmissionState
    from services.db.models import Case, CaseRun, Team, TestSet

    with client.app_.state.sessionmaker() as session:
        testset = session.scalar(sa.select(TestSet))
        case = Case(testset_id=testset.id, case_id="h0", image_path="x", labels_path="y")
        team = session.scalar(sa.select(Team))
        session.add(case)
        session.flush()
        sub = add_submission(session, add_algorithm(session, team=team), testset, SubmissionState.scored)
        session.add(CaseRun(submission_id=sub.id, case_id=case.id, status="missing_output", detail="wrote nothing"))
        session.commit()
        sub_id = sub.id
    answer = client.post("/api/v1/testsets/ts/rescore", json={"protocol": "nsd-deepmind@1"},
                         headers=client.tokens["organizer"])
    assert answer.status_code == 202
    job = answer.json()
    assert (job["state"], job["submission_ids"], job["n_cases_total"]) == ("queued", [sub_id], 1)
    assert client.sent == [("touchstone.rescore", [job["job_id"]])]


@pytest.mark.parametrize("protocol, status, words", [
    ("touchstone", 409, "scored under touchstone@1 already"),
    ("touchstone@7", 422, "is at version 1"),
    ("/etc/passwd", 422, "inside the import roots"),
    ("../../etc/shadow.yaml", 422, "inside the import roots"),
    ("x" * 4097, 422, "protocol"),
])
def test_bad_protocols_are_4xx_naming_the_fix(client, protocol, status, words):
    answer = client.post("/api/v1/testsets/ts/rescore", json={"protocol": protocol},
                         headers=client.tokens["organizer"])
    assert answer.status_code == status and words in answer.json()["detail"], answer.text


def test_retention_through_the_patch(client):
    org = client.tokens["organizer"]
    assert client.get("/api/v1/testsets/ts").json()["prediction_retention_days"] is None
    for given, stored in (("30d", 30), ("none", 0), ("all", None), ("7", 7)):
        answer = client.patch("/api/v1/testsets/ts", json={"prediction_retention": given}, headers=org)
        assert answer.status_code == 200 and answer.json()["prediction_retention_days"] == stored, answer.text
    answer = client.patch("/api/v1/testsets/ts", json={"prediction_retention": "a fortnight"}, headers=org)
    assert answer.status_code == 422 and "'all', 'none' or a number of days" in answer.json()["detail"]
    answer = client.patch("/api/v1/testsets/ts", json={"prediction_retention": "none"},
                          headers=client.tokens["inventor"])
    assert answer.status_code == 403
    assert client.get("/api/v1/testsets/ts").json()["prediction_retention_days"] == 7


def test_unknown_protocol_version_is_404_everywhere(client):
    org = client.tokens["organizer"]
    for path in ("/api/v1/leaderboards/ts", "/api/v1/leaderboards/ts/significance",
                 "/api/v1/leaderboards/ts/stability", "/api/v1/leaderboards/ts/hospitals",
                 "/api/v1/exports/ts", "/leaderboards/ts"):
        answer = client.get(path, params={"protocol": "touchstone@9"}, headers=org)
        assert answer.status_code == 404, (path, answer.text)
        assert "touchstone@1" in answer.text  # names the versions it has
    assert client.get("/api/v1/leaderboards/ts", params={"protocol": "x" * 201}).status_code == 422
    board = client.get("/api/v1/leaderboards/ts", params={"protocol": "touchstone@1"}).json()
    assert board["protocol_key"] == "touchstone@1"
