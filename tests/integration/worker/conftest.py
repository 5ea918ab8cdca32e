"""Fixtures of the worker's integration tests: the example algorithm images (built once per
session with scripts/build-examples.sh), a runtime on the real engine, tiny staged shards."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from evaluation.io import write_ct
from worker.runtime.base import ResourceLimits, RunResult, RunSpec
from worker.runtime.docker import DockerRuntime
from worker.sandbox import prepare_output_dir
from worker.staging import StagedShard, stage_shard

ROOT = Path(__file__).resolve().parents[3]
#: every example with a Dockerfile, except those with their own build.sh (monai-segresnet: a torch
#: image, built only by tests/integration/pipeline/test_monai_reference.py)
EXAMPLES = sorted(p.name for p in (ROOT / "examples" / "algorithms").iterdir()
                  if (p / "Dockerfile").is_file() and not (p / "build.sh").is_file())

#: small limits so misbehaviour shows within seconds
TEST_LIMITS = ResourceLimits(memory_bytes=256 * 2**20, cpus=1.0, pids=64, shm_bytes=16 * 2**20,
                             tmp_bytes=32 * 2**20, output_bytes=64 * 2**20, log_bytes=8 * 2**10)


@pytest.fixture(scope="session")
def example_images(docker_client, base_image) -> dict[str, str]:
    """name -> tag of every example algorithm, built from the local base image."""
    subprocess.run(["bash", str(ROOT / "scripts" / "build-examples.sh"), base_image], check=True,
                   capture_output=True, text=True, timeout=600)
    return {name: f"touchstone/example-{name}:latest" for name in EXAMPLES}


@pytest.fixture(scope="session")
def runtime(docker_client) -> DockerRuntime:
    return DockerRuntime(docker_client)


@pytest.fixture
def tiny_cts(tmp_path) -> dict[str, Path]:
    """Two tiny CTs (random soft tissue with a bright blob) in a storage folder."""
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    cts = {}
    for case_id in ("case_a", "case_b"):
        hu = rng.normal(50, 20, size=(16, 14, 10))
        hu[4:8, 4:8, 3:6] = 300
        cts[case_id] = write_ct(tmp_path / "storage" / case_id, hu, affine)
    return cts


@dataclass
class Harness:
    runtime: DockerRuntime
    tmp_path: Path
    counter: int = 0
    limits: ResourceLimits = TEST_LIMITS

    def stage(self, cts: dict[str, Path], mode: str = "auto") -> StagedShard:
        self.counter += 1
        return stage_shard(list(cts.items()), self.tmp_path / f"stage{self.counter}", mode=mode)

    def run(self, image: str, cts: dict[str, Path], *, time_limit_s: float = 20, limits: ResourceLimits | None = None,
            mode: str = "auto", command=None, submission_id: str = "sub-test", shard_id: str = "0") -> tuple[RunResult, Path]:
        staged = self.stage(cts, mode)
        output = prepare_output_dir(self.tmp_path / f"out{self.counter}")
        spec = RunSpec(image=image, input_dir=staged.input_dir, output_dir=output, time_limit_s=time_limit_s,
                       limits=limits or self.limits, extra_input_mounts=staged.mounts, case_ids=staged.case_ids,
                       command=command, submission_id=submission_id, shard_id=shard_id)
        return self.runtime.run(spec), output

    def start_running(self, image: str, cts: dict[str, Path], *, submission_id: str, shard_id: str,
                      time_limit_s: float = 60) -> tuple[threading.Thread, dict]:
        """:meth:`run` in a thread, returned once its container is running (at most 30 s); the
        thread leaves ``{"result": RunResult}`` in the returned dict when the run ends."""
        outcome: dict = {}

        def run() -> None:
            outcome["result"], _ = self.run(image, cts, time_limit_s=time_limit_s, submission_id=submission_id,
                                            shard_id=shard_id)

        thread = threading.Thread(target=run)
        thread.start()
        label = [f"touchstone.submission={submission_id}", f"touchstone.deployment={self.runtime.deployment_id}"]
        deadline = time.monotonic() + 30
        while not self.runtime.client.api.containers(filters={"label": label, "status": "running"}):
            assert time.monotonic() < deadline, "the container never started"
            time.sleep(0.1)
        return thread, outcome


@pytest.fixture
def harness(runtime, tmp_path) -> Harness:
    return Harness(runtime, tmp_path)
