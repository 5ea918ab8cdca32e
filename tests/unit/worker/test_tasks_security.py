"""The worker's tasks on a real SQLite database with a fake container runtime: image ownership
(defence in depth), validation heartbeat / retry / reaping, the reaper's tarball clean-up,
storage accounting and team-visible texts without server paths."""

from __future__ import annotations

import datetime as dt
import os

import pytest
import requests.exceptions
import sqlalchemy as sa
from celery.exceptions import Retry

from services.db.enums import Role
from services.db.enums import SubmissionState as S
from services.db.models import Algorithm, Case, Submission, Team, TestSet, User
from worker.runtime.base import (
    ContainerRuntime,
    FailureCode,
    ImageInfo,
    ImageRejected,
    FailureReason,
    RunResult,
    RunSpec,
)

DIGEST_B = "sha256:" + "b" * 64


def _info(image_id: str) -> ImageInfo:
    return ImageInfo(image_id=image_id, tags=(), architecture="amd64", os="linux", size_bytes=1 << 20, user="")


class FakeRuntime(ContainerRuntime):
    """Records every call; knows the images in ``local``; ``run`` answers ``run_result`` or raises
    ``run_error``."""

    def __init__(self, local=(), run_error: BaseException | None = None):
        self.local = {image_id: _info(image_id) for image_id in local}
        self.calls: list[tuple[str, str]] = []
        self.run_error = run_error
        self.runs: list[RunSpec] = []

    def load_image(self, tarball):
        self.calls.append(("load", str(tarball)))
        raise ImageRejected(FailureReason.image_load_failed("fake"))

    def inspect_image(self, image):
        self.calls.append(("inspect", image))
        if image not in self.local:
            raise ImageRejected(FailureReason.image_load_failed(f"no image {image!r} on this worker"))
        return self.local[image]

    def pull_image(self, reference):
        self.calls.append(("pull", reference))
        info = _info("sha256:" + "c" * 64)
        self.local[info.image_id] = info
        return info

    def run(self, spec):
        self.runs.append(spec)
        if self.run_error is not None:
            raise self.run_error
        raise AssertionError("this test never runs a container")

    def kill(self, container):
        self.calls.append(("kill", container))

    def cancel(self, submission_id, shard_id=None):
        self.calls.append(("cancel", f"{submission_id}/{shard_id}"))
        return 0

    def remove_leftovers(self, submission_id, shard_id):
        self.calls.append(("leftovers", f"{submission_id}/{shard_id}"))
        return 0

    def remove_image(self, image):
        self.calls.append(("remove", image))


@pytest.fixture
def env(tasks_env):
    """tests/unit/worker/conftest.py::tasks_env."""
    return tasks_env


def _world(session, tmp_path):
    """Teams A and B, a test set with one public case; B uploaded an image (DIGEST_B)."""
    team_a, team_b = Team(name="A"), Team(name="B")
    session.add_all([team_a, team_b])
    session.flush()
    users = [User(name=f"u{t.name}", role=Role.inventor, team_id=t.id) for t in (team_a, team_b)]
    algos = [Algorithm(team_id=t.id, name=f"algo-{t.name}") for t in (team_a, team_b)]
    testset = TestSet(name="ts", protocol_name="touchstone", protocol_version="1", protocol_key="touchstone@1",
                      protocol_json={}, manifest_sha256="0" * 64, root_path="/", time_per_case_s=10,
                      memory_bytes=1 << 30, gpus=0, shm_bytes=1 << 26, pids_limit=64, shard_size=2,
                      quota_submissions=9, quota_period_days=7)
    session.add_all(users + algos + [testset])
    session.flush()
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"not read by the fake runtime")
    session.add(Case(testset_id=testset.id, case_id="p0", image_path=str(ct), labels_path=str(tmp_path),
                     public_sample=True))
    session.add(Submission(algorithm_id=algos[1].id, testset_id=testset.id, team_id=team_b.id, state=S.queued,
                           image_path="uploads/b.tar", image_sha256="1" * 64, image_digest=DIGEST_B))
    session.commit()
    return team_a, algos[0], testset


def _submission(tmp_path, **fields) -> int:
    from services.db.session import session_scope

    with session_scope() as session:
        team_a = session.scalar(sa.select(Team).where(Team.name == "A"))
        if team_a is None:
            team_a, algo, testset = _world(session, tmp_path)
        else:
            algo = session.scalar(sa.select(Algorithm).where(Algorithm.name == "algo-A"))
            testset = session.scalar(sa.select(TestSet))
        sub = Submission(algorithm_id=algo.id, testset_id=testset.id, team_id=team_a.id,
                         state=fields.pop("state", S.validating), **fields)
        session.add(sub)
        session.flush()
        return sub.id


def _get(submission_id: int) -> Submission:
    from services.db.session import session_scope

    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        session.expunge(sub)
        return sub


@pytest.mark.parametrize("image_ref", [
    DIGEST_B,  # team B's uploaded image, by its digest
    f"touchstone/other@{DIGEST_B}",
    "touchstone/example-trivial:latest",  # a local tag
    "b6e480ba2e67",  # a short id
])
def test_an_image_of_another_team_or_a_local_tag_never_runs(env, tmp_path, image_ref):
    from services.db.images import REFUSAL
    from worker import reaper, runs, validation

    runtime = FakeRuntime(local=[DIGEST_B])
    env["use_runtime"](runtime)
    submission_id = _submission(tmp_path, image_ref=image_ref)
    assert validation.validate_run(submission_id) == "failed: image_load_failed"
    assert runtime.runs == []  # never reached runtime.run
    assert not [c for c in runtime.calls if c[0] in ("inspect", "pull")]  # nothing resolved on the engine
    sub = _get(submission_id)
    assert sub.state is S.failed
    assert REFUSAL.split("{", 1)[0] in sub.failure_reason and "registry.example.org" in sub.failure_reason
    assert "B" not in sub.failure_reason.split("registries")[0]  # names no other team's image
    # the cpu half of validation refuses it the same way
    submission_id = _submission(tmp_path, image_ref=image_ref)
    assert validation.validate(submission_id) == "failed: image_load_failed"
    assert runtime.runs == [] and not [c for c in runtime.calls if c[0] in ("inspect", "pull")]


def test_own_digest_is_inspected_by_digest_and_an_allowed_registry_is_pulled_exactly(env, tmp_path):
    from services.db.session import session_scope
    from worker import reaper, runs, validation

    runtime = FakeRuntime(local=[DIGEST_B])
    env["use_runtime"](runtime)
    with session_scope() as session:
        _world(session, tmp_path)
        team_b = session.scalar(sa.select(Team).where(Team.name == "B"))
        algo_b = session.scalar(sa.select(Algorithm).where(Algorithm.name == "algo-B"))
        testset = session.scalar(sa.select(TestSet))
        own = Submission(algorithm_id=algo_b.id, testset_id=testset.id, team_id=team_b.id, state=S.validating,
                         image_ref=DIGEST_B)
        session.add(own)
        session.flush()
        own_id = own.id
    source = runs.ImageSource.of(_get(own_id))
    assert runs.ensure_image(runtime, source).image_id == DIGEST_B
    assert runtime.calls == [("inspect", DIGEST_B)]
    runtime.calls.clear()
    pulled_id = _submission(tmp_path, image_ref="registry.example.org/team-a/seg:1.2")
    info = runs.ensure_image(runtime, runs.ImageSource.of(_get(pulled_id)))
    assert runtime.calls == [("pull", "registry.example.org/team-a/seg:1.2")]
    assert info.image_id == "sha256:" + "c" * 64
    # a registry nobody configured is refused without a pull
    runtime.calls.clear()
    other = _submission(tmp_path, image_ref="evil.example.com/x:1")
    with pytest.raises(ImageRejected) as refused:
        runs.ensure_image(runtime, runs.ImageSource.of(_get(other)))
    assert refused.value.reason.code is FailureCode.IMAGE_LOAD_FAILED and runtime.calls == []


def test_a_failure_reason_names_no_server_path(env, tmp_path):
    """A missing upload (the real Docker runtime's tarball check) is explained without the
    storage path; so is the validation log."""
    from services.config import get_settings
    from worker import reaper, runs, validation
    from worker.runtime.docker import DockerRuntime

    env["use_runtime"](DockerRuntime(client=object(), deployment_id="unit"))  # never reaches the engine
    submission_id = _submission(tmp_path, image_path="uploads/team-a/missing.tar", image_sha256="2" * 64)
    assert validation.validate(submission_id).startswith("failed")
    sub = _get(submission_id)
    root = str(get_settings().storage_dir)
    assert sub.state is S.failed and sub.failure_reason
    for text in (sub.failure_reason, sub.validation_log or ""):
        assert root not in text and str(os.path.realpath(root)) not in text and "uploads/team-a" not in text
    assert runs.public_text(f"cannot read {os.path.realpath(root)}/runs/x") == "cannot read <storage>/runs/x"


def test_engine_error_in_a_validation_run_is_retried_then_fails_outside_the_quota(env, tmp_path, monkeypatch):
    from worker import reaper, runs, validation
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
    runtime.local[digest_a] = _info(digest_a)
    submission_id = _submission(tmp_path, image_path="uploads/a.tar", image_sha256="3" * 64, image_digest=digest_a)
    for attempt in range(1, worker_settings().max_attempts):
        with pytest.raises(Retry):
            validation.validate_run(submission_id)
        assert countdowns[-1] > 0
        sub = _get(submission_id)
        assert sub.state is S.validating and sub.validation_attempts == attempt
        assert sub.worker_hostname is None and sub.heartbeat_at is not None  # the claim was given back
        # every attempt first removed what a dead attempt left behind (by label)
        assert ("leftovers", f"{submission_id}/validation") in runtime.calls
    assert validation.validate_run(submission_id) == "failed: infrastructure"  # the last attempt
    sub = _get(submission_id)
    assert sub.state is S.failed and sub.counts_against_quota is False
    assert "does not count against your team's quota" in sub.failure_reason
    assert len(runtime.runs) == worker_settings().max_attempts
    # no output of the failed attempts is left in storage
    runs = env["data"] / "storage" / "runs"
    assert not [p for p in runs.rglob("*") if p.is_file()]


def test_reaper_retries_a_validation_whose_worker_vanished_and_fails_it_after_max_attempts(env, tmp_path):
    from worker import reaper, runs, validation
    from worker.app import worker_settings

    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=worker_settings().stale_after_s + 60)
    first = _submission(tmp_path, image_path="uploads/1.tar", worker_hostname="gone-host:1", heartbeat_at=old,
                        validation_attempts=1)
    last = _submission(tmp_path, image_path="uploads/2.tar", worker_hostname="gone-host:2", heartbeat_at=old,
                       validation_attempts=worker_settings().max_attempts)
    fresh = _submission(tmp_path, image_path="uploads/3.tar", worker_hostname="busy-host:3",
                        heartbeat_at=dt.datetime.now(dt.timezone.utc), validation_attempts=1)
    reaper.reap()
    assert ("touchstone.validate_run", [first]) in env["sent"]
    assert _get(first).state is S.validating and _get(first).worker_hostname is None
    failed = _get(last)
    assert failed.state is S.failed and failed.counts_against_quota is False
    assert "stopped answering" in failed.failure_reason and "quota" in failed.failure_reason
    assert _get(fresh).worker_hostname == "busy-host:3"
    assert ("touchstone.validate_run", [fresh]) not in env["sent"]


def test_reaper_deletes_failed_validation_tarballs_after_the_grace(env, tmp_path, monkeypatch):
    from services.config import get_settings
    from worker import reaper, runs, validation

    monkeypatch.setenv("TOUCHSTONE_FAILED_TARBALL_GRACE_S", "60")
    get_settings.cache_clear()
    storage = env["data"] / "storage"
    now = dt.datetime.now(dt.timezone.utc)
    ids = {}
    for name, failed_ago in (("old", 600), ("recent", 5)):
        (storage / "uploads").mkdir(exist_ok=True)
        (storage / "uploads" / f"{name}.tar").write_bytes(b"x" * 1000)
        ids[name] = _submission(tmp_path, state=S.failed, image_path=f"uploads/{name}.tar", image_sha256="4" * 64,
                                validating_at=now - dt.timedelta(seconds=failed_ago + 10),
                                failed_at=now - dt.timedelta(seconds=failed_ago), storage_bytes=1000,
                                failure_reason="Validation on the public sample failed: x")
    reaper.reap()
    old, recent = _get(ids["old"]), _get(ids["recent"])
    assert old.image_path is None and old.image_deleted_at is not None and old.storage_bytes == 0
    assert not (storage / "uploads" / "old.tar").exists()
    assert recent.image_path == "uploads/recent.tar" and recent.storage_bytes == 1000
    assert (storage / "uploads" / "recent.tar").exists()


def test_reaper_reclaims_cancelled_and_late_failed_submissions(env, tmp_path, monkeypatch):
    """Found by review: outputs kept from finished shards of a cancelled (or later failed)
    submission, and its tarball, stayed on disk and in the team's storage for ever."""
    from services.config import get_settings
    from worker import reaper, runs, validation

    monkeypatch.setenv("TOUCHSTONE_FAILED_TARBALL_GRACE_S", "60")
    get_settings.cache_clear()
    storage = env["data"] / "storage"
    now = dt.datetime.now(dt.timezone.utc)
    (storage / "uploads").mkdir(exist_ok=True)
    ids = {}
    for name, state, ended in (("cancelled", S.cancelled, "cancelled_at"), ("late", S.failed, "failed_at"),
                               ("scored", S.scored, "scored_at")):
        (storage / "uploads" / f"{name}.tar").write_bytes(b"x" * 1000)
        ids[name] = _submission(tmp_path, state=state, image_path=f"uploads/{name}.tar", image_sha256=name[0] * 64,
                                queued_at=now - dt.timedelta(seconds=900), storage_bytes=1000 + 3 * 500,
                                **{ended: now - dt.timedelta(seconds=600)})
        out = storage / "runs" / f"submission-{ids[name]}" / "shard-0" / "t" / "output" / "c1" / "deep" / "deeper"
        out.mkdir(parents=True)
        for i in range(3):
            (out / f"f{i}.bin").write_bytes(b"y" * 500)
    reaper.reap()
    for name in ("cancelled", "late"):
        sub = _get(ids[name])
        assert sub.image_path is None and sub.image_deleted_at is not None and sub.storage_bytes == 0, name
        assert not (storage / "uploads" / f"{name}.tar").exists()
        assert not (storage / "runs" / f"submission-{ids[name]}").exists()
    scored = _get(ids["scored"])  # kept: its predictions are the record of a scored result
    assert scored.storage_bytes == 2500 and (storage / "runs" / f"submission-{ids['scored']}").exists()
    # a second pass has nothing to do, and writes nothing more to the audit log
    assert "reclaimed" in reaper.reap() and "storage of 0 ended" in reaper.reap()
