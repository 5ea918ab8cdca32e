"""Three container workers on one test set: shards spread across all of them, and one of them
killed with SIGKILL mid-shard loses no case and scores none twice.

Real Docker engine, PostgreSQL, a Redis server of the test's own, and four real Celery workers:
three ``gpu``-queue workers started as three separate ``touchstone worker --queues gpu --name
node-<i>`` would start them (distinct node names), one ``cpu``-queue worker with the reaper. The
speed-up of three workers over one is measured by benchmarks/multi_worker.py, not asserted here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
import sqlalchemy as sa

from tests.integration.pipeline.conftest import ROOT
from tests.integration.pipeline.test_pipeline_recovery import _assert_scored_exactly_once

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]


def start_gpu_worker(stack, node: str) -> subprocess.Popen:
    """One ``touchstone worker --queues gpu --name <node>`` (its Celery process, as the CLI starts it)."""
    from services.cli.worker import celery_commands

    [command] = celery_commands(["gpu"], [], concurrency=1, beat=False, loglevel="INFO",
                                data_dir=stack.data_dir, name=node)
    assert command.argv[command.argv.index("-n") + 1] == f"{node}-gpu@%h"
    log = stack.data_dir / f"worker-{node}.log"
    stack.log_files.append(log)
    process = subprocess.Popen(command.argv, cwd=ROOT, env={**os.environ, **stack.env, **command.env},
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    stack.workers.append(process)
    return process


def node_of(owner: str, workers: dict[str, subprocess.Popen]) -> str:
    """The node whose process tree holds the pid of a shard's ``worker_hostname`` (``host:pid``:
    the pool process that ran the task)."""
    pid = int(owner.rsplit(":", 1)[1])
    for node, process in workers.items():
        try:
            tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            continue
        if pid in tree:
            return node
    raise AssertionError(f"shard owner {owner} is none of the workers' processes")


def test_three_workers_share_a_run_and_survive_losing_one(recovery_stack, phantom_manifest, example_images,
                                                          docker_client):
    from services.db.enums import ShardState
    from services.db.models import Shard
    from services.db.session import session_scope

    stack = recovery_stack
    stack.add_testset("shared", phantom_manifest, shard_size=2)  # 6 hidden cases: 3 shards, ~2 s per case
    stack.start_workers(("cpu",), name="cpu")
    gpu = {f"node-{i}": start_gpu_worker(stack, f"node-{i}") for i in (1, 2, 3)}
    submission_id = stack.submit("shared", image_ref=example_images["slow"])

    # every shard is taken by a different worker (each runs one container at a time, prefetch 1)
    owners: dict[int, str] = {}
    deadline = time.monotonic() + 150
    while len(owners) < 3:
        assert time.monotonic() < deadline, (owners, stack.logs())
        with session_scope() as session:
            for shard in session.scalars(sa.select(Shard).where(Shard.submission_id == submission_id,
                                                                Shard.worker_hostname.is_not(None))):
                owners.setdefault(shard.index, node_of(shard.worker_hostname, gpu))
        time.sleep(0.1)
    assert sorted(owners.values()) == ["node-1", "node-2", "node-3"]

    # SIGKILL (the whole process group: a node that died) the worker of a shard that still runs
    with session_scope() as session:
        running = [s.index for s in session.scalars(sa.select(Shard).where(
            Shard.submission_id == submission_id, Shard.state == ShardState.running))]
    assert running, ("every shard finished before one could be killed", stack.logs())
    victim_shard = running[0]
    victim = owners[victim_shard]
    stack.kill([gpu[victim]], signal.SIGKILL)

    summary = stack.wait(submission_id, timeout=150)
    assert summary["state"] == "scored", (summary, stack.logs())
    _assert_scored_exactly_once(submission_id)  # no case lost, none scored twice
    with session_scope() as session:
        shards = {s.index: s for s in session.scalars(sa.select(Shard).where(Shard.submission_id == submission_id))}
        assert all(s.state.value == "succeeded" for s in shards.values())
        assert {i: s.attempts for i, s in shards.items()} == {i: 2 if i == victim_shard else 1 for i in owners}
        survivors = {node: process for node, process in gpu.items() if node != victim}
        # the retry ran on one of the two workers that are still alive
        assert node_of(shards[victim_shard].worker_hostname, survivors) in survivors
    assert all(process.poll() is None for process in survivors.values())
    assert not stack.containers(docker_client, submission_id)  # the orphaned container was stopped
