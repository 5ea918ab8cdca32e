"""Who may see a case's images (services.api.visibility.can_see_case_images, used by
services/web/viewer.py), where the viewer finds a prediction from the stored run information, and
the worst-cases list per role -- on a migrated SQLite database."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from services.api.errors import ApiError
from services.api.visibility import can_see_case_images
from services.db.accounts import create_user
from services.db.enums import Role, SubmissionState
from services.db.models import Algorithm, Case, CaseRun, Score, Submission, TestSet, User
from services.storage import Storage
from services.web import viewer


def test_the_rule_organizers_every_case_inventors_own_public_sample_nobody_else():
    own = Submission(team_id=1, state=SubmissionState.scored)
    other = Submission(team_id=2, state=SubmissionState.published)
    organizer, inventor = User(role=Role.organizer), User(role=Role.inventor, team_id=1)
    analyst = User(role=Role.analyst)
    for submission in (own, other):
        for public in (True, False):
            assert can_see_case_images(organizer, submission, public)
            assert not can_see_case_images(analyst, submission, public)  # published or not: no image
            assert not can_see_case_images(None, submission, public)
    assert can_see_case_images(inventor, own, True)
    assert not can_see_case_images(inventor, own, False)  # a hidden case, even of one's own submission
    assert not can_see_case_images(inventor, other, True)
    assert not can_see_case_images(User(role=Role.inventor, team_id=None), own, True)


@pytest.fixture
def scene(sqlite_session, tmp_path):
    s = sqlite_session
    users = {name: create_user(s, name, role, team)[0] for name, role, team in
             (("org", "organizer", None), ("alice", "inventor", "Alpha"), ("bob", "inventor", "Beta"),
              ("ana", "analyst", None))}
    ts = TestSet(name="ts", protocol_name="touchstone", protocol_version="1", protocol_key="touchstone@1",
                 manifest_sha256="0" * 64, root_path=str(tmp_path), time_per_case_s=60, memory_bytes=2**30, gpus=0,
                 shm_bytes=2**26, pids_limit=256, shard_size=4, quota_submissions=3, quota_period_days=1)
    s.add(ts)
    s.flush()
    cases = {}
    for name, public in (("pub", True), ("hid1", False), ("hid2", False)):
        cases[name] = Case(testset_id=ts.id, case_id=name, hospital="H", public_sample=public,
                           image_path="ct.nii.gz", labels_path="labels")
        s.add(cases[name])
    algo = Algorithm(team_id=users["alice"].team_id, name="alpha-seg")
    s.add(algo)
    s.flush()
    sub = Submission(algorithm_id=algo.id, testset_id=ts.id, team_id=algo.team_id, state=SubmissionState.scored)
    s.add(sub)
    s.flush()
    for name, dsc in (("pub", 0.7), ("hid1", 0.2), ("hid2", 0.9)):
        for organ, shift in (("liver", 0.0), ("spleen", 0.1)):
            s.add(Score(submission_id=sub.id, case_id=cases[name].id, organ=organ, protocol_key="touchstone@1",
                        dsc=dsc + shift, nsd=dsc, status="ok"))
    s.commit()
    return s, users, sub, cases, Storage(tmp_path / "storage")


def test_visible_case_answers_404_alike_for_a_hidden_case_and_a_missing_one(scene):
    s, users, sub, cases, _ = scene
    assert viewer.visible_case(s, users["org"], sub.id, "hid1")[1].case_id == "hid1"
    assert viewer.visible_case(s, users["alice"], sub.id, "pub")[1].case_id == "pub"
    answers = []
    for user, case_id in ((users["alice"], "hid1"), (users["alice"], "nope"), (users["bob"], "pub"),
                          (users["ana"], "pub"), (None, "pub")):
        with pytest.raises(ApiError) as raised:
            viewer.visible_case(s, user, sub.id, case_id)
        assert raised.value.status_code == 404
        answers.append(raised.value.detail.replace(repr(case_id), "<case>"))
    assert len(set(answers)) == 1  # the same words whether the case exists or not


def test_worst_cases_per_role_worst_first(scene):
    s, users, sub, cases, _ = scene
    org = viewer.worst_cases(s, users["org"], sub, "liver", "dsc")
    assert [w["case_id"] for w in org] == ["hid1", "pub", "hid2"] and org[0]["value"] == "0.200"
    assert org[0]["url"] == f"/viewer/submissions/{sub.id}/cases/hid1?organ=liver"
    average = viewer.worst_cases(s, users["org"], sub, "average", "dsc")
    assert [(w["case_id"], w["value"]) for w in average] == [("hid1", "0.250"), ("pub", "0.750"), ("hid2", "0.950")]
    assert [w["case_id"] for w in viewer.worst_cases(s, users["alice"], sub, "liver", "dsc")] == ["pub"]
    for user in (users["bob"], users["ana"], None):
        assert viewer.worst_cases(s, user, sub, "liver", "dsc") is None


def test_prediction_place_from_the_case_run_else_the_validation_run_else_a_note(scene):
    s, users, sub, cases, storage = scene
    # a shard's case: CaseRun.detail names the folder (relative to storage)
    folder = storage.path("runs/submission-1/shard-0/20260101T000000-abcd/output/hid1")
    folder.mkdir(parents=True)
    s.add(CaseRun(submission_id=sub.id, case_id=cases["hid1"].id, status="ok",
                  detail="runs/submission-1/shard-0/20260101T000000-abcd/output/hid1"))
    s.add(CaseRun(submission_id=sub.id, case_id=cases["hid2"].id, status="timeout", detail="time limit exceeded"))
    s.commit()
    assert viewer.find_prediction(s, storage, sub, cases["hid1"]) == viewer.PredictionPlace(folder)
    note = viewer.find_prediction(s, storage, sub, cases["hid2"]).note
    assert "timeout" in note and "time limit exceeded" in note
    # the public sample: the newest validation attempt that holds the case
    assert viewer.find_prediction(s, storage, sub, cases["pub"]).folder is None
    for attempt in ("20260101T000000-aaaa", "20260102T000000-bbbb"):
        storage.path(f"runs/submission-{sub.id}/validation/{attempt}/output/pub").mkdir(parents=True)
    place = viewer.find_prediction(s, storage, sub, cases["pub"])
    assert place.folder == storage.path(f"runs/submission-{sub.id}/validation/20260102T000000-bbbb/output/pub")
    # deleted files, retention, imported results: a note, never a path
    delete = folder.rmdir
    delete()
    gone = viewer.find_prediction(s, storage, sub, cases["hid1"])
    assert gone.folder is None and "no prediction is stored" in gone.note.lower()
    sub.predictions_deleted_at = dt.datetime(2026, 3, 1)
    assert "retention" in viewer.find_prediction(s, storage, sub, cases["pub"]).note
    sub.predictions_deleted_at, sub.is_baseline = None, True
    assert "imported" in viewer.find_prediction(s, storage, sub, cases["pub"]).note
    for text in (gone.note, note):
        assert str(storage.root) not in text and "runs/" not in text


def test_a_run_folder_outside_storage_is_refused(scene):
    s, users, sub, cases, storage = scene
    s.add(CaseRun(submission_id=sub.id, case_id=cases["hid1"].id, status="ok", detail="../../etc"))
    s.commit()
    place = viewer.find_prediction(s, storage, sub, cases["hid1"])
    assert place.folder is None and "storage" in place.note


def test_the_run_folder_layout_is_the_workers_and_the_documented_one():
    from worker.runs import RUNS_DIR
    from worker.validation import VALIDATION_SHARD_LABEL

    assert (viewer.RUNS_DIR, viewer.VALIDATION_RUN) == (RUNS_DIR, VALIDATION_SHARD_LABEL)
    text = (Path(__file__).resolve().parents[4] / "docs" / "execution.md").read_text()
    assert f"storage/{viewer.RUNS_DIR}/submission-<id>/<shard-N|{viewer.VALIDATION_RUN}>/<time>-<random>/output/" in text
