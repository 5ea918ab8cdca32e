"""Fixtures of the worker's unit tests."""

from __future__ import annotations

import shutil

import pytest

#: the runtimes installed by ``tasks_env["use_runtime"]``; ``WorkerSettings.runtime`` points at
#: :func:`installed_runtime` during a test, so the tasks get theirs through the setting
_installed: list = []


def installed_runtime():
    """The runtime the running test installed (the factory ``WorkerSettings.runtime`` names)."""
    if not _installed:
        raise AssertionError("this test runs a task without a runtime: call tasks_env['use_runtime'](...) first")
    return _installed[-1]


@pytest.fixture
def tasks_env(tmp_path, monkeypatch, migrated_sqlite):
    """A data folder with a migrated SQLite database that the tasks' settings point at, the tasks'
    ``apply_async`` recorded instead of sent, and the container runtime chosen through
    ``WorkerSettings.runtime``: yields ``{"data": folder, "sent": [(task, args)], "use_runtime": f}``
    where ``f(runtime)`` makes ``runtime`` the one every task gets. One registry is configured
    (``registry.example.org``) for image references."""
    from services.config import get_settings
    from services.db.session import dispose_engines
    from worker import finalize, inference, reaper, runs, scoring, validation
    from worker.app import worker_settings

    data = tmp_path / "data"
    (data / "storage").mkdir(parents=True)
    url = f"sqlite:///{data / 'touchstone.db'}"
    monkeypatch.setenv("TOUCHSTONE_DATA_DIR", str(data))
    monkeypatch.setenv("TOUCHSTONE_DATABASE_URL", url)
    monkeypatch.setenv("TOUCHSTONE_ALLOWED_REGISTRIES", '["registry.example.org"]')
    get_settings.cache_clear()
    dispose_engines()
    shutil.copyfile(migrated_sqlite, data / "touchstone.db")  # the same schema as migrate.upgrade("head")
    sent: list[tuple[str, list]] = []
    for task in (validation.validate, validation.validate_run, inference.infer_shard, finalize.finalize,
                 scoring.score, reaper.reap):
        monkeypatch.setattr(task, "apply_async", lambda args=None, _n=task.name, **kw: sent.append((_n, args)))
    monkeypatch.setattr(worker_settings(), "runtime", f"{__name__}:installed_runtime")
    runs.runtime_from.cache_clear()

    def use_runtime(runtime):
        _installed.append(runtime)
        runs.runtime_from.cache_clear()
        return runtime

    yield {"data": data, "sent": sent, "use_runtime": use_runtime}
    _installed.clear()
    runs.runtime_from.cache_clear()
    get_settings.cache_clear()
    dispose_engines()


# --------------------------------------------------------------------------------------------
# a fake container runtime and a small world, for the task tests
# --------------------------------------------------------------------------------------------
from worker.runtime.base import (  # noqa: E402 - after the fixtures that set the environment up
    ContainerRuntime,
    FailureReason,
    ImageInfo,
    ImageRejected,
    RunResult,
)

DIGEST = "sha256:" + "d" * 64


def image_info(image_id: str = DIGEST, architecture: str = "amd64") -> ImageInfo:
    return ImageInfo(image_id=image_id, tags=(), architecture=architecture, os="linux", size_bytes=1 << 20, user="")


def run_result(spec, **changes) -> RunResult:
    """A clean run of ``spec`` (exit 0, every case's output seen), with ``changes``."""
    fields = dict(container_name="fake", exit_code=0, timed_out=False, oom_killed=False, cancelled=False,
                  output_too_large=False, duration_s=1.0, peak_memory_bytes=1 << 20, gpu=None, log_tail="done",
                  output_seen_s={c: 0.5 + i for i, c in enumerate(spec.case_ids)}, failure=None)
    return RunResult(**(fields | changes))


def write_label_files(spec) -> RunResult:
    """A run that writes ``<case>/combined_labels.nii.gz`` (not a real image: the safety check never
    opens it) for every case of the run."""
    from pathlib import Path

    for case_id in spec.case_ids:
        (Path(spec.output_dir) / case_id).mkdir()
        (Path(spec.output_dir) / case_id / "combined_labels.nii.gz").write_bytes(b"\x1f\x8b not decoded")
    return run_result(spec)


class FakeRuntime(ContainerRuntime):
    """Records every call; knows the images in ``local``; ``run`` records the spec and answers
    ``on_run(spec)`` (which may write /output) or raises ``run_error``."""

    def __init__(self, local=(DIGEST,), run_error: BaseException | None = None, on_run=None, architecture="amd64"):
        self.local = {image_id: image_info(image_id, architecture) for image_id in local}
        self.calls: list[tuple[str, str]] = []
        self.run_error = run_error
        self.on_run = on_run
        self.runs: list = []

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
        info = image_info("sha256:" + "c" * 64)
        self.local[info.image_id] = info
        return info

    def run(self, spec):
        self.runs.append(spec)
        if self.run_error is not None:
            raise self.run_error
        if self.on_run is None:
            raise AssertionError("this test never runs a container")
        return self.on_run(spec)

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


def make_world(root, *, public=("p0",), hidden=("h0", "h1", "h2"), shard_size=2, state=None, labels_root=None,
               protocol="touchstone", team="A") -> int:
    """A team (named ``team``), an algorithm, a test set with ``public`` and ``hidden`` cases (CT files under
    ``root``; labels under ``labels_root/<case>``, default ``root``) and one submission of the
    uploaded image :data:`DIGEST` in ``state`` (default ``validating``); returns its id."""
    from pathlib import Path

    from services.db.enums import Role
    from services.db.enums import SubmissionState as S
    from services.db.models import Algorithm, Case, Submission, Team, TestSet, User
    from services.db.session import session_scope

    root = Path(root)
    with session_scope() as session:
        team = Team(name=team)
        session.add(team)
        session.flush()
        algo = Algorithm(team_id=team.id, name="algo")
        testset = TestSet(name=f"ts-{team.name}", protocol_name=protocol, protocol_version="1", protocol_key=f"{protocol}@1",
                          protocol_json={}, manifest_sha256="0" * 64, root_path=str(root), time_per_case_s=10,
                          memory_bytes=1 << 30, gpus=0, shm_bytes=1 << 26, pids_limit=64, shard_size=shard_size,
                          quota_submissions=9, quota_period_days=7)
        session.add_all([User(name=f"u-{team.name}", role=Role.inventor, team_id=team.id), algo, testset])
        session.flush()
        for case_id in (*public, *hidden):
            ct = root / "cts" / case_id / "ct.nii.gz"
            if not ct.exists():
                ct.parent.mkdir(parents=True)
                ct.write_bytes(b"a CT the fake runtime never reads")
            labels = Path(labels_root or root) / case_id
            session.add(Case(testset_id=testset.id, case_id=case_id, image_path=str(ct), labels_path=str(labels),
                             public_sample=case_id in public))
        sub = Submission(algorithm_id=algo.id, testset_id=testset.id, team_id=team.id, state=state or S.validating,
                         image_path="uploads/x.tar", image_sha256="1" * 64, image_digest=DIGEST)
        session.add(sub)
        session.flush()
        return sub.id


def run_messages(sent: list, only=("touchstone.infer_shard", "touchstone.score", "touchstone.finalize")) -> list[str]:
    """Deliver the recorded messages named in ``only`` in order, in this process, until none is
    left (what the workers would do); returns the outcomes."""
    from worker import finalize, inference, scoring, validation

    tasks = {t.name: t for t in (validation.validate, validation.validate_run, inference.infer_shard, scoring.score,
                                 finalize.finalize)}
    outcomes = []
    while True:
        pending = [m for m in sent if m[0] in only]
        if not pending:
            return outcomes
        name, args = pending[0]
        sent.remove(pending[0])
        outcomes.append(tasks[name](*args))


DIGEST_B = "sha256:" + "b" * 64


def two_team_world(session, tmp_path):
    """Teams A and B, a test set with one public case; B uploaded an image (DIGEST_B)."""
    from services.db.enums import Role
    from services.db.enums import SubmissionState as S
    from services.db.models import Algorithm, Case, Submission, Team, TestSet, User

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


def add_submission(tmp_path, **fields) -> int:
    """A submission of team A (in ``two_team_world``, made on first use) with ``fields``; its id."""
    import sqlalchemy as sa

    from services.db.enums import SubmissionState as S
    from services.db.models import Algorithm, Submission, Team, TestSet
    from services.db.session import session_scope

    with session_scope() as session:
        team_a = session.scalar(sa.select(Team).where(Team.name == "A"))
        if team_a is None:
            team_a, algo, testset = two_team_world(session, tmp_path)
        else:
            algo = session.scalar(sa.select(Algorithm).where(Algorithm.name == "algo-A"))
            testset = session.scalar(sa.select(TestSet))
        sub = Submission(algorithm_id=algo.id, testset_id=testset.id, team_id=team_a.id,
                         state=fields.pop("state", S.validating), **fields)
        session.add(sub)
        session.flush()
        return sub.id


def get_submission(submission_id: int):
    """The submission row, detached (read after the task's transaction)."""
    from services.db.models import Submission
    from services.db.session import session_scope

    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        session.expunge(sub)
        return sub
