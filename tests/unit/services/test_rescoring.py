"""services/rescoring.py: the retention rules, which submissions can be re-scored (and why not),
the protocol versions a test set accepts, the storage report -- on a migrated SQLite database."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from services import rescoring
from services.config import Settings
from tests.factories import add_algorithm

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("given, days", [
    (None, None), ("all", None), ("ALL", None), ("none", 0), ("0", 0), (0, 0), (7, 7), ("7", 7), ("30d", 30),
    (" 30 days ", 30), ("1 day", 1), (36500, 36500),
])
def test_retention_values(given, days):
    assert rescoring.parse_retention(given) == days


@pytest.mark.parametrize("given", ["forever-and-ever", "-1", "3w", "1.5d", "", "x" * 1000, True, 36501, -3, "7d;rm"])
def test_bad_retention_is_refused_with_the_fix(given):
    with pytest.raises(rescoring.RescoringError, match="'all', 'none'|between 0 and") as caught:
        rescoring.parse_retention(given)
    assert len(str(caught.value)) < 200  # a hostile value is not echoed whole


def test_retention_expiry():
    scored = NOW - dt.timedelta(days=3)
    assert not rescoring.retention_expired(None, scored, NOW)  # keep all
    assert rescoring.retention_expired(0, NOW, NOW)  # keep none: as soon as scored
    assert rescoring.retention_expired(3, scored, NOW)  # exactly N days later
    assert not rescoring.retention_expired(3, scored + dt.timedelta(seconds=1), NOW)
    assert not rescoring.retention_expired(0, None, NOW)  # never scored: nothing to expire
    assert rescoring.retention_expired(3, scored.replace(tzinfo=None), NOW)  # naive = UTC
    assert rescoring.describe_retention(None) == "keep all predictions"
    assert rescoring.describe_retention(0).startswith("keep no predictions")
    assert rescoring.describe_retention(1) == "keep predictions 1 day after scoring"


@pytest.fixture
def world(sqlite_session, tmp_path):
    """A test set of 2 hidden + 1 public case under touchstone@1, three scored submissions with
    their prediction folders in storage (the third also a tarball), and one imported baseline."""
    from services.db.enums import SubmissionState
    from services.db.models import Case, CaseRun, Submission, TestSet
    from services.db.testsets import resolve_protocol

    settings = Settings(data_dir=tmp_path / "data", import_roots=[tmp_path / "imports"])
    settings.ensure_dirs()
    (tmp_path / "imports").mkdir()
    session = sqlite_session
    name, version, as_json = resolve_protocol("touchstone")
    testset = TestSet(name="ts", protocol_name=name, protocol_version=version, protocol_key=f"{name}@{version}",
                      protocol_json=as_json, manifest_sha256="0" * 64, root_path=str(tmp_path), time_per_case_s=1,
                      memory_bytes=1, gpus=0, shm_bytes=1, pids_limit=1, shard_size=1, quota_submissions=1,
                      quota_period_days=1)
    session.add(testset)
    session.flush()
    cases = [Case(testset_id=testset.id, case_id=c, image_path="x", labels_path="y", public_sample=c == "p")
             for c in ("h0", "h1", "p")]
    session.add_all(cases)
    algorithm = add_algorithm(session)
    storage = Path(settings.storage_dir)
    subs = []
    for k, scored_at in enumerate((NOW - dt.timedelta(days=10), NOW - dt.timedelta(days=1), NOW)):
        sub = Submission(algorithm_id=algorithm.id, testset_id=testset.id, team_id=algorithm.team_id,
                         state=SubmissionState.scored, scored_at=scored_at, storage_bytes=3000 + k)
        session.add(sub)
        session.flush()
        for case in cases[:2]:
            folder = storage / "runs" / f"submission-{sub.id}" / "shard-0" / "r" / "output" / case.case_id
            folder.mkdir(parents=True)
            (folder / "combined_labels.nii.gz").write_bytes(b"x" * 1000)
            session.add(CaseRun(submission_id=sub.id, case_id=case.id, status="ok",
                                detail=folder.relative_to(storage).as_posix()))
        subs.append(sub)
    (storage / "uploads").mkdir()
    (storage / "uploads" / "s.tar").write_bytes(b"t" * 1000)
    subs[2].image_path = "uploads/s.tar"
    baseline = Submission(algorithm_id=algorithm.id, testset_id=testset.id, team_id=algorithm.team_id, is_baseline=True,
                          state=SubmissionState.published, scored_at=NOW - dt.timedelta(days=100))
    session.add(baseline)
    session.flush()
    return {"session": session, "settings": settings, "testset": testset, "subs": subs, "baseline": baseline,
            "imports": tmp_path / "imports"}


def test_reclaimable_follows_the_retention(world):
    session, testset = world["session"], world["testset"]
    old, recent, new = (s.id for s in world["subs"])
    assert rescoring.reclaimable_submissions(session, NOW) == []  # keep all
    rescoring.set_prediction_retention(session, testset, "7d")
    assert rescoring.reclaimable_submissions(session, NOW) == [old]  # the baseline never held any
    rescoring.set_prediction_retention(session, testset, "none")
    assert rescoring.reclaimable_submissions(session, NOW) == [old, recent, new]
    report = rescoring.storage_report(session, world["settings"], NOW)[0]
    assert report["retention"] == "keep no predictions (deleted once scored)"
    statuses = {r["submission_id"]: (r["predictions"], r["tarball_bytes"], r["prediction_bytes"])
                for r in report["submissions"]}
    assert statuses == {old: ("reclaimable", 0, 3000), recent: ("reclaimable", 0, 3001),
                        new: ("reclaimable", 1000, 2002), world["baseline"].id: ("imported (no predictions)", 0, 0)}
    assert report["reclaimable_bytes"] == 3000 + 3001 + 2002
    with pytest.raises(rescoring.RescoringError, match="no test set named 'nope'"):
        rescoring.storage_report(session, world["settings"], NOW, testset_name="nope")


def test_unavailable_submissions_are_listed_with_the_reason(world):
    session, settings, testset = world["session"], world["settings"], world["testset"]
    old, recent, new = world["subs"]
    old.predictions_deleted_at = NOW
    testset.prediction_retention_days = 7
    missing = Path(settings.storage_dir) / "runs" / f"submission-{recent.id}" / "shard-0" / "r" / "output" / "h1"
    for f in missing.iterdir():
        f.unlink()
    missing.rmdir()
    job = rescoring.start_rescore(session, testset, "nsd-deepmind", settings=settings)
    assert job.protocol_key == "nsd-deepmind@1" and job.submission_ids == [new.id]
    assert job.n_cases_total == 2  # hidden cases only
    reasons = {u["submission_id"]: u["reason"] for u in job.unavailable}
    # the imported baseline is published, so in scope: reported too (it never had predictions)
    assert set(reasons) == {old.id, recent.id, world["baseline"].id}
    assert reasons[world["baseline"].id].startswith("imported results")
    assert "deleted on 2026-12-02 12:00 UTC" in reasons[old.id] and "keep predictions 7 days" in reasons[old.id]
    assert "1 of its 2 hidden case(s) are gone" in reasons[recent.id]
    # asked for by id: only those; nothing to score is a job done at once; an unknown id is an error
    job = rescoring.start_rescore(session, testset, "nsd-deepmind", submission_ids=[old.id], settings=settings)
    assert job.state.value == "done" and job.submission_ids == [] and job.unavailable[0]["submission_id"] == old.id
    with pytest.raises(rescoring.RescoringError, match="no submission 999") as caught:
        rescoring.start_rescore(session, testset, "nsd-deepmind", submission_ids=[999], settings=settings)
    assert caught.value.status == 404


def _protocol_file(folder: Path, name: str, **changes) -> Path:
    from evaluation.protocols import PRESETS

    data = PRESETS["touchstone"].to_dict() | changes
    data["metrics"] = list(data["metrics"])
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_protocol_versions_a_test_set_accepts(world):
    session, settings, testset, imports = world["session"], world["settings"], world["testset"], world["imports"]

    def refused(spec, match, status=422, confine=False):
        with pytest.raises(rescoring.RescoringError, match=match) as caught:
            rescoring.register_protocol(session, testset, str(spec), settings=settings, confine=confine)
        assert caught.value.status == status

    refused("touchstone", "scored under touchstone@1 already", 409)
    changed = _protocol_file(imports, "same-key.yaml", nsd_tolerance_mm={o: 2.0 for o in
                                                                        testset.protocol_json["nsd_tolerance_mm"]})
    refused(changed, "differs from the test set's touchstone@1", 409)
    v2 = _protocol_file(imports, "v2.yaml", version=2)
    row = rescoring.register_protocol(session, testset, str(v2), settings=settings, confine=True)
    assert row.protocol_key == "touchstone@2"
    assert rescoring.register_protocol(session, testset, str(v2), settings=settings).id == row.id  # idempotent
    other_v2 = _protocol_file(imports, "v2b.yaml", version=2, dsc_variant="standard")
    refused(other_v2, "another description of it", 409)
    # hostile files: not a protocol, an unknown field, outside the import roots, a binary file
    (imports / "list.yaml").write_text("- 1\n- 2\n")
    refused(imports / "list.yaml", "must hold a mapping")
    bad = _protocol_file(imports, "bad.yaml", version=3)
    bad.write_text(bad.read_text() + "rm_rf: true\n")
    refused(bad, "rm_rf")
    outside = _protocol_file(Path(settings.data_dir), "v3.yaml", version=3)
    refused(outside, "inside the import roots", confine=True)
    (imports / "blob.yaml").write_bytes(b"\x00\x01" * 100)
    refused(imports / "blob.yaml", "inside the import roots", confine=True)
    refused("", "give the protocol")
    refused("no-such-preset@4", "unknown protocol")
