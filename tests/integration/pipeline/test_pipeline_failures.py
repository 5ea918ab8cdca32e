"""Misbehaving images fail with their reason while the worker stays healthy; cancellation stops the
containers within seconds. Real Docker, real Celery workers, PostgreSQL + Redis."""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

#: image -> phrases its failure reason must contain (the FailureReason sentences of worker.runtime)
EXPECTED = {
    "sleep-forever": ["Validation on the public sample failed", "Time limit exceeded"],
    "exit-1": ["exited with code 1"],
    "oom": ["Out of memory"],
    "garbage": ["unreadable or mis-shaped files", "case phantom_"],
    "nothing": ["wrote nothing to /output"],
    "network": ["wrote nothing to /output"],
    "forkbomb": ["Process limit reached", "64 processes"],
    "deep-writer": ["more than 5 MiB to /output"],
    "many-files": ["more than 1000 files"],
    "sigterm-spinner": ["Time limit exceeded"],
}


def _files_under(folder) -> list:
    return [p for p in folder.rglob("*") if not p.is_dir()] if folder.exists() else []


def test_misbehaving_images_give_their_reasons_and_a_good_one_still_finishes(redis_stack, phantom_manifest, example_images):
    from services.db.models import Submission
    from services.db.session import session_scope

    stack = redis_stack
    # short limits: 3 s per case + 3 s start-up; 256 MiB; 64 processes
    stack.add_testset("strict", phantom_manifest, time_per_case_s=3.0, memory_bytes=256 << 20,
                      pids_limit=64, shard_size=3)
    # small output limits (any depth of /output): 5 MiB, 1,000 files and folders
    stack.env.update({"TOUCHSTONE_WORKER_OUTPUT_BYTES": str(5 << 20), "TOUCHSTONE_WORKER_OUTPUT_FILES": "1000"})
    stack.start_workers()
    bad = {name: stack.submit("strict", image_ref=example_images[name], algorithm=name) for name in EXPECTED}
    good = stack.submit("strict", image_ref=example_images["trivial"], algorithm="trivial")
    for name, submission_id in bad.items():
        summary = stack.wait(submission_id, timeout=240)
        assert summary["state"] == "failed", (name, summary)
        for phrase in EXPECTED[name]:
            assert phrase in summary["failure_reason"], (name, summary["failure_reason"])
        assert summary["scores"] == 0 and summary["shards"] == {}, (name, summary)
    with session_scope() as session:
        logs = {name: session.get(Submission, sid).validation_log for name, sid in bad.items()}
        quota = {name: session.get(Submission, sid).counts_against_quota for name, sid in bad.items()}
    # the public-sample log is what the inventor reads: it shows what the container said
    assert "model weights not found" in logs["exit-1"]
    assert '"network_report"' in logs["network"] and "connected" not in logs["network"].replace("unreachable", "")
    assert "fork refused" in logs["forkbomb"]
    assert "allocated" in logs["oom"]
    assert not any(quota.values())  # failed validations do not count against the quota
    # outputs of failed runs are deleted once the reason and the log are stored: no byte remains
    runs = stack.data_dir / "storage" / "runs"
    with session_scope() as session:
        for name, sid in bad.items():
            assert _files_under(runs / f"submission-{sid}") == [], name
            assert session.get(Submission, sid).storage_bytes == 0, name
    # the worker survived all of that: the good submission (queued behind them) is scored
    summary = stack.wait(good, timeout=240)
    assert summary["state"] == "scored", (summary, stack.logs())
    assert summary["scores"] == 6 * 9
    assert all(p.poll() is None for p in stack.workers)
    # what stays is inside the contract, and it is what the submission is charged for
    kept = _files_under(runs / f"submission-{good}")
    assert kept and all(p.name == "combined_labels.nii.gz" and p.parent.parent.name == "output" for p in kept), kept
    with session_scope() as session:
        assert session.get(Submission, good).storage_bytes == sum(p.stat().st_size for p in kept)


def test_cancel_stops_running_containers_within_seconds(redis_stack, phantom_manifest, example_images, docker_client):
    from services.db.enums import SubmissionState
    from services.db.session import session_scope
    from worker.pipeline import lock_submission
    from services.db.states import transition

    stack = redis_stack
    stack.add_testset("slow", phantom_manifest, shard_size=3)
    stack.start_workers()
    submission_id = stack.submit("slow", image_ref=example_images["slow"])
    deadline = time.monotonic() + 120
    while not _running(stack, docker_client, submission_id, shard=True):
        assert time.monotonic() < deadline, (stack.wait(submission_id, timeout=0.1), stack.logs())
        time.sleep(0.2)
    # what the API's cancel does: the state machine's transition, committed
    with session_scope() as session:
        transition(lock_submission(session, submission_id), SubmissionState.cancelled, reason="cancelled by the organizer")
    cancelled_at = time.monotonic()
    while _running(stack, docker_client, submission_id):
        assert time.monotonic() - cancelled_at < 10, "containers still running 10 s after the cancel\n" + stack.logs()
        time.sleep(0.1)
    stopped_after = time.monotonic() - cancelled_at
    assert stopped_after < 10
    # the shards end as cancelled (none is left pending or running) and nothing more is run
    deadline = time.monotonic() + 30
    while True:
        summary = stack.wait(submission_id, timeout=5)
        if all(state == "cancelled" or state == "succeeded" for state in summary["shards"].values()):
            break
        assert time.monotonic() < deadline, summary
        time.sleep(0.5)
    assert summary["state"] == "cancelled"
    assert "cancelled" in summary["shards"].values()
    assert summary["scores"] < 6 * 9
    time.sleep(3)
    assert not _running(stack, docker_client, submission_id)


def _running(stack, docker_client, submission_id: int, shard: bool = False) -> list:
    found = stack.containers(docker_client, submission_id, running=True)
    if shard:
        found = [c for c in found if c.labels.get("touchstone.shard", "").startswith("shard-")]
    return found
