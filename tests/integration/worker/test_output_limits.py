"""Output limits at any depth of /output, the time limit against a SIGTERM-ignoring container,
and two deployments sharing one engine. Real Docker; small caps so each run takes seconds."""

from __future__ import annotations

import dataclasses
import time

import pytest

from worker.monitoring import measure_tree
from worker.runtime.base import FailureCode
from worker.runtime.docker import DockerRuntime

pytestmark = pytest.mark.docker

CAP_BYTES = 5 * 2**20
CAP_FILES = 1_000


@pytest.mark.parametrize(("cap", "tolerance"), [(CAP_BYTES, 2.5), (64 * 2**20, 0.2)])
def test_deep_writer_is_stopped_at_the_byte_cap(harness, example_images, tiny_cts, cap, tolerance):
    """Valid outputs, then up to 3 GiB in /output/x/y/z: three folders deeper than today's watcher
    looked. Stopped near the cap: no file outgrows it (RLIMIT_FSIZE), and the walk at any depth
    stops the container within a few ms, so the overshoot is what a full-speed writer writes in
    that time (a few MiB: under 20 % of a 64 MiB cap, about one more file at 5 MiB)."""
    CAP_BYTES = cap
    limits = dataclasses.replace(harness.limits, output_bytes=CAP_BYTES)
    started = time.monotonic()
    result, output = harness.run(example_images["deep-writer"], tiny_cts, limits=limits, time_limit_s=60)
    elapsed = time.monotonic() - started
    assert result.failure.code is FailureCode.OUTPUT_TOO_LARGE, result
    assert result.output_too_large and not result.timed_out
    on_disk = measure_tree(output).bytes
    overshoot = (on_disk - CAP_BYTES) / CAP_BYTES
    print(f"deep-writer: {on_disk} bytes on disk for a {CAP_BYTES}-byte cap: overshoot {overshoot:.2%}; "
          f"run {result.duration_s:.2f} s")
    assert overshoot < tolerance
    assert on_disk < 3 * 2**30 and elapsed < 30


def test_many_files_writer_is_stopped_at_the_file_cap(harness, example_images, tiny_cts):
    limits = dataclasses.replace(harness.limits, output_files=CAP_FILES)
    result, output = harness.run(example_images["many-files"], tiny_cts, limits=limits, time_limit_s=60)
    assert result.failure.code is FailureCode.TOO_MANY_FILES, result
    assert str(CAP_FILES) in result.failure.message
    entries = measure_tree(output).entries
    print(f"many-files: {entries} entries for a {CAP_FILES}-entry cap: overshoot {(entries - CAP_FILES) / CAP_FILES:.2%};"
          f" run {result.duration_s:.2f} s")
    # files are created faster than a walk of them (~1 µs per entry) can count: the overshoot is
    # what the writer creates during one walk interval (measured: 20-100 % at 1,000)
    assert entries < 3 * CAP_FILES


def test_too_deep_output_is_stopped(harness, example_images, tiny_cts):
    limits = dataclasses.replace(harness.limits, output_depth=3)  # /output/x/y/z/fill.bin is 4 deep
    result, _ = harness.run(example_images["deep-writer"], tiny_cts, limits=limits, time_limit_s=60)
    assert result.failure.code is FailureCode.OUTPUT_TOO_DEEP, result


def test_a_sigterm_ignoring_container_is_killed_at_its_time_limit(harness, example_images, tiny_cts):
    started = time.monotonic()
    result, _ = harness.run(example_images["sigterm-spinner"], tiny_cts, time_limit_s=3)
    elapsed = time.monotonic() - started
    print(f"sigterm-spinner: run {result.duration_s:.2f} s for a 3 s limit (grace 2 s); call {elapsed:.2f} s")
    assert result.timed_out and result.failure.code is FailureCode.TIME_LIMIT
    assert result.exit_code == 137
    assert 3 <= result.duration_s < 3 + 2 + 2  # limit + SIGTERM grace + the kill
    assert "ignoring SIGTERM" in result.log_tail


def test_two_deployments_on_one_engine_never_touch_each_other(harness, example_images, tiny_cts, docker_client):
    other = DockerRuntime(docker_client, deployment_id="other-deployment")
    assert other.deployment_id != harness.runtime.deployment_id
    thread, outcome = harness.start_running(example_images["sleep-forever"], tiny_cts, submission_id="sub-deploy",
                                            shard_id="validation")
    label = ["touchstone.submission=sub-deploy", f"touchstone.deployment={harness.runtime.deployment_id}"]
    # the other deployment's cancel and clean-up see nothing of ours, though ids are the same
    assert other.cancel("sub-deploy") == 0
    assert other.remove_leftovers("sub-deploy", "validation") == 0
    assert docker_client.api.containers(filters={"label": label, "status": "running"})
    assert harness.runtime.cancel("sub-deploy") == 1
    thread.join(timeout=30)
    assert outcome["result"].cancelled
    assert harness.runtime.remove_leftovers("sub-deploy", "validation") == 0  # removed after the run
