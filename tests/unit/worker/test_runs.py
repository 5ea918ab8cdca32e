"""What every container run shares (worker/runs.py): the runtime chosen by
``WorkerSettings.runtime``, the image under the ownership rule, texts without server paths."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from services.db.enums import SubmissionState as S
from services.db.models import Algorithm, Submission, Team, TestSet
from tests.unit.worker.conftest import DIGEST_B, FakeRuntime, add_submission, get_submission, two_team_world
from worker import runs
from worker.app import WorkerSettings
from worker.runtime.base import FailureCode, ImageRejected


@pytest.fixture
def env(tasks_env):
    """tests/unit/worker/conftest.py::tasks_env."""
    return tasks_env


class _Counted(FakeRuntime):
    made = 0

    def __init__(self):
        super().__init__()
        type(self).made += 1


def test_the_runtime_is_the_one_the_setting_names_made_once(monkeypatch):
    assert WorkerSettings().runtime == "worker.runtime.docker:DockerRuntime"  # the default: the Docker engine
    monkeypatch.setenv("TOUCHSTONE_WORKER_RUNTIME", f"{__name__}:_Counted")
    assert WorkerSettings().runtime == f"{__name__}:_Counted"
    runs.runtime_from.cache_clear()
    try:
        first = runs.runtime_from(WorkerSettings().runtime)
        assert isinstance(first, _Counted) and runs.runtime_from(f"{__name__}:_Counted") is first
        assert _Counted.made == 1
        with pytest.raises(TypeError, match="not a ContainerRuntime"):
            runs.runtime_from("builtins:object")
    finally:
        runs.runtime_from.cache_clear()


def test_get_runtime_reads_the_setting(env):
    runtime = env["use_runtime"](FakeRuntime())
    assert runs.get_runtime() is runtime
    other = env["use_runtime"](FakeRuntime())
    assert runs.get_runtime() is other


def test_own_digest_is_inspected_by_digest_and_an_allowed_registry_is_pulled_exactly(env, tmp_path):
    from services.db.session import session_scope

    runtime = FakeRuntime(local=[DIGEST_B])
    with session_scope() as session:
        two_team_world(session, tmp_path)
        team_b = session.scalar(sa.select(Team).where(Team.name == "B"))
        algo_b = session.scalar(sa.select(Algorithm).where(Algorithm.name == "algo-B"))
        testset = session.scalar(sa.select(TestSet))
        own = Submission(algorithm_id=algo_b.id, testset_id=testset.id, team_id=team_b.id, state=S.validating,
                         image_ref=DIGEST_B)
        session.add(own)
        session.flush()
        own_id = own.id
    source = runs.ImageSource.of(get_submission(own_id))
    assert runs.ensure_image(runtime, source).image_id == DIGEST_B
    assert runtime.calls == [("inspect", DIGEST_B)]
    runtime.calls.clear()
    pulled_id = add_submission(tmp_path, image_ref="registry.example.org/team-a/seg:1.2")
    info = runs.ensure_image(runtime, runs.ImageSource.of(get_submission(pulled_id)))
    assert runtime.calls == [("pull", "registry.example.org/team-a/seg:1.2")]
    assert info.image_id == "sha256:" + "c" * 64
    # a registry nobody configured is refused without a pull
    runtime.calls.clear()
    other = add_submission(tmp_path, image_ref="evil.example.com/x:1")
    with pytest.raises(ImageRejected) as refused:
        runs.ensure_image(runtime, runs.ImageSource.of(get_submission(other)))
    assert refused.value.reason.code is FailureCode.IMAGE_LOAD_FAILED and runtime.calls == []
