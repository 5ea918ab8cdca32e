"""The Docker engine goes down during a validation run and comes back: the validation is retried
(Celery retry with a countdown on the engine error; the dead attempt's container is removed by
label) and the submission ends scored -- never stuck in ``validating``. Stops dockerd: run alone
(other tests' containers die with the engine); the engine is always restarted in ``finally``."""

from __future__ import annotations

import io
import subprocess
import time

import pytest
import sqlalchemy as sa

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]
VARIANT = "touchstone/test-slow-validation:latest"


def _pids(name: str) -> list[int]:
    found = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def _engine_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def test_engine_restart_during_validation_is_retried_and_scored(redis_stack, phantom_manifest, example_images,
                                                               docker_client):
    from services.db.models import Submission
    from services.db.session import session_scope

    stack = redis_stack
    # the public sample takes 20 s, so the engine can be stopped while it runs
    docker_client.images.build(fileobj=io.BytesIO(f"FROM {example_images['slow']}\nENV SLOW_PUBLIC_S=20\n".encode()),
                               tag=VARIANT, rm=True)
    stack.add_testset("slow", phantom_manifest, shard_size=3)
    stack.env.update({"TOUCHSTONE_WORKER_ENGINE_RETRY_S": "2", "TOUCHSTONE_WORKER_STOP_GRACE_S": "1"})
    stack.start_workers()
    submission_id = stack.submit("slow", image_ref=VARIANT)
    deadline = time.monotonic() + 120
    while not stack.containers(docker_client, submission_id, running=True, shard="validation"):
        assert time.monotonic() < deadline, ("the validation container never started", stack.logs())
        time.sleep(0.1)
    time.sleep(1.0)
    try:
        for pid in _pids("dockerd"):
            subprocess.run(["kill", "-TERM", str(pid)], check=False)
        stop_deadline = time.monotonic() + 60
        while _pids("dockerd") and time.monotonic() < stop_deadline:
            time.sleep(0.2)
        assert not _pids("dockerd"), "dockerd did not stop"
        down_at = time.monotonic()
        time.sleep(3)  # the worker meets a dead engine (its wait and its retries fail)
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "start-dockerd.sh")], check=True, timeout=120,
                       stdin=subprocess.DEVNULL, start_new_session=True)
        assert _engine_answers()
    up_at = time.monotonic()
    summary = stack.wait(submission_id, timeout=300)
    recovered_s = time.monotonic() - up_at
    print(f"engine down {up_at - down_at:.1f} s; submission {summary['state']} {recovered_s:.1f} s after the engine"
          " answered again")
    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        attempts, quota, reason = sub.validation_attempts, sub.counts_against_quota, sub.failure_reason
    if summary["state"] == "failed":  # allowed: failed on our side, outside the quota
        assert "does not count against your team's quota" in reason and quota is False, reason
    else:
        assert summary["state"] == "scored", (summary, stack.logs())
        assert attempts >= 2, attempts  # the attempt the outage killed, then the retry
    # the dead attempt's container was removed (by label), and so was every later one
    assert stack.containers(docker_client, submission_id) == []
    assert all(p.poll() is None for p in stack.workers)
