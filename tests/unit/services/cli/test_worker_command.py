"""``touchstone worker``: the Celery processes it starts and their node names."""

from __future__ import annotations

import pytest

from services.cli.worker import celery_commands


def node_names(commands) -> list[str]:
    return [command.argv[command.argv.index("-n") + 1] for command in commands]


def test_one_gpu_worker_per_gpu_and_one_cpu_worker():
    commands = celery_commands(["gpu", "cpu"], ["0", "1"], concurrency=3, beat=False)
    assert [c.name for c in commands] == ["gpu0", "gpu1", "cpu"]
    assert [c.env.get("TOUCHSTONE_WORKER_GPUS") for c in commands] == ["0", "1", None]
    assert "--concurrency=1" in commands[0].argv and "--concurrency=3" in commands[2].argv
    assert node_names(commands) == ["gpu0@%h", "gpu1@%h", "cpu@%h"]


def test_name_makes_node_names_of_several_workers_on_one_machine_distinct():
    names = [node_names(celery_commands(["gpu"], [], concurrency=1, name=n)) for n in ("a", "b", "c")]
    assert names == [["a-gpu@%h"], ["b-gpu@%h"], ["c-gpu@%h"]]


def test_unknown_queue_is_refused():
    with pytest.raises(ValueError, match="unknown queue"):
        celery_commands(["gpus"], [], concurrency=1)
