"""Recovery: a GPU worker killed with SIGKILL mid-shard, and a Redis restart mid-run. Real Docker,
real Celery worker processes, PostgreSQL and a Redis server the test starts (and restarts) itself."""

from __future__ import annotations

import signal
import time

import pytest
import sqlalchemy as sa

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

N_HIDDEN = 6


def _wait_running(stack, docker_client, submission_id: int, label: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not stack.containers(docker_client, submission_id, running=True, shard=label):
        assert time.monotonic() < deadline, (f"no running container for {label}", stack.logs())
        time.sleep(0.1)


def _assert_scored_exactly_once(submission_id: int) -> None:
    from evaluation.labels import ORGANS
    from services.db.models import Case, CaseRun, Score, Submission
    from services.db.session import session_scope

    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        hidden = set(session.scalars(sa.select(Case.id).where(Case.testset_id == sub.testset_id,
                                                             Case.public_sample.is_(False))))
        rows = session.execute(sa.select(Score.case_id, Score.organ).where(
            Score.submission_id == submission_id, Score.case_id.in_(hidden))).all()
        assert len(rows) == len(set(rows)) == len(hidden) * len(ORGANS)  # no case lost, none twice
        assert {case for case, _ in rows} == hidden
        runs = session.scalars(sa.select(CaseRun).where(CaseRun.submission_id == submission_id)).all()
        assert sorted(r.case_id for r in runs) == sorted(hidden)
        assert all(r.status == "ok" for r in runs)


def test_sigkill_of_the_gpu_worker_mid_shard(recovery_stack, phantom_manifest, example_images, docker_client):
    from services.db.models import Shard
    from services.db.session import session_scope

    stack = recovery_stack
    stack.add_testset("slow", phantom_manifest, shard_size=3)  # 2 shards of 3 cases, ~2 s per case
    stack.start_workers(("cpu",), name="cpu")
    gpu_a = stack.start_workers(("gpu",), name="a")
    submission_id = stack.submit("slow", image_ref=example_images["slow"])
    # shard 0 runs and is scored; kill the whole worker (main and pool processes) during shard 1
    _wait_running(stack, docker_client, submission_id, "shard-1", timeout=180)
    time.sleep(1.0)
    stack.kill(gpu_a, signal.SIGKILL)
    # the orphaned container goes on running on the engine: the next attempt must stop it
    assert stack.containers(docker_client, submission_id, running=True, shard="shard-1")
    with session_scope() as session:
        shard1 = session.scalar(sa.select(Shard).where(Shard.submission_id == submission_id, Shard.index == 1))
        assert shard1.state.value == "running" and shard1.attempts == 1
    stack.start_workers(("gpu",), name="b")  # a new worker; the reaper hands it the stale shard
    summary = stack.wait(submission_id, timeout=180)
    assert summary["state"] == "scored", (summary, stack.logs())
    _assert_scored_exactly_once(submission_id)
    with session_scope() as session:
        shards = {s.index: s for s in session.scalars(sa.select(Shard).where(Shard.submission_id == submission_id))}
        assert shards[0].attempts == 1 and shards[1].attempts == 2
        assert all(s.state.value == "succeeded" for s in shards.values())
    assert not stack.containers(docker_client, submission_id)


def test_redis_restart_mid_run(recovery_stack, phantom_manifest, example_images, docker_client):
    stack = recovery_stack
    stack.add_testset("slow", phantom_manifest, shard_size=3)
    stack.start_workers()
    submission_id = stack.submit("slow", image_ref=example_images["slow"])
    _wait_running(stack, docker_client, submission_id, "shard-0", timeout=180)
    stack.redis.stop()  # SIGTERM: Redis writes its append-only file and exits
    time.sleep(3)
    stack.redis.start()  # same port, same folder: the queued messages come back
    summary = stack.wait(submission_id, timeout=240)
    assert summary["state"] == "scored", (summary, stack.logs())
    _assert_scored_exactly_once(submission_id)
    assert all(p.poll() is None for p in stack.workers)  # the workers reconnected, none died
