"""Each misbehaving example image gets its specific failure reason, and the next run still works."""

from __future__ import annotations

import json
import time

import pytest

from worker.outputs import check_outputs
from worker.runtime.base import FailureCode
from worker.runtime.docker import DockerRuntime

pytestmark = pytest.mark.docker


def _assert_healthy(harness, example_images, tiny_cts):
    """The next (well-behaved) run on the same runtime still succeeds."""
    result, output = harness.run(example_images["trivial"], tiny_cts)
    assert result.failure is None, result
    assert check_outputs(output, tiny_cts).ok_cases == ["case_a", "case_b"]
    assert set(result.output_seen_s) == {"case_a", "case_b"}


def test_trivial_succeeds_and_outputs_pass(harness, example_images, tiny_cts):
    result, output = harness.run(example_images["trivial"], tiny_cts)
    assert result.failure is None and result.exit_code == 0
    assert result.peak_memory_bytes and result.peak_memory_bytes > 1 << 20
    assert result.gpu is None  # no GPU configured
    report = check_outputs(output, tiny_cts)
    assert report.failure() is None
    assert [c.status for c in report.cases.values()] == ["ok", "ok"]
    assert 0 < result.output_seen_s["case_a"] <= result.output_seen_s["case_b"] <= result.duration_s + 0.2


def test_sleep_forever_hits_the_time_limit_and_is_killed_within_seconds(harness, example_images, tiny_cts):
    started = time.monotonic()
    result, _ = harness.run(example_images["sleep-forever"], tiny_cts, time_limit_s=3)
    elapsed = time.monotonic() - started
    assert result.timed_out and result.failure.code is FailureCode.TIME_LIMIT
    assert "after 3 s for 2 case(s)" in result.failure.message
    assert result.exit_code == 137
    assert 3 <= result.duration_s < 3 + 5  # killed within seconds of the limit
    assert elapsed < 3 + 10
    assert "sleeping forever" in result.log_tail
    _assert_healthy(harness, example_images, tiny_cts)


def test_exit_1_reports_its_code_and_log(harness, example_images, tiny_cts):
    result, _ = harness.run(example_images["exit-1"], tiny_cts)
    assert result.exit_code == 1 and result.failure.code is FailureCode.NONZERO_EXIT
    assert "exited with code 1" in result.failure.message
    assert "model weights not found" in result.log_tail
    _assert_healthy(harness, example_images, tiny_cts)


def test_oom_reports_out_of_memory(harness, example_images, tiny_cts):
    result, _ = harness.run(example_images["oom"], tiny_cts)
    assert result.failure.code is FailureCode.OUT_OF_MEMORY and result.oom_killed
    _assert_healthy(harness, example_images, tiny_cts)


def test_garbage_outputs_are_refused(harness, example_images, tiny_cts):
    result, output = harness.run(example_images["garbage"], tiny_cts)
    assert result.failure is None  # the run itself went fine...
    report = check_outputs(output, tiny_cts)
    # ...and the files are where the contract wants them (the safety check opens none of them)...
    assert [c.status for c in report.cases.values()] == ["ok", "ok"]
    # ...but the one scoring path refuses their contents: every organ worst, ``unreadable``
    import nibabel as nib
    import numpy as np

    from evaluation.io import write_combined_labels
    from worker.outputs import score_output

    for case_id, ct in tiny_cts.items():
        image = nib.load(str(ct))
        labels = write_combined_labels(harness.tmp_path / "gt" / case_id, np.zeros(image.shape, np.uint8), image.affine)
        rows = score_output(case_id, labels, output, "touchstone")
        assert {r.status for r in rows} == {"unreadable"}
        assert f"/output/{case_id}/combined_labels.nii.gz" in rows[0].detail and "NIfTI" in rows[0].detail
        assert str(output) not in rows[0].detail  # the container's path, never the worker's
    _assert_healthy(harness, example_images, tiny_cts)


def test_nothing_reports_wrote_nothing(harness, example_images, tiny_cts):
    result, output = harness.run(example_images["nothing"], tiny_cts)
    assert result.exit_code == 0 and result.failure.code is FailureCode.NO_OUTPUT
    assert check_outputs(output, tiny_cts).failure().code is FailureCode.NO_OUTPUT
    _assert_healthy(harness, example_images, tiny_cts)


def test_network_is_unreachable(harness, example_images, tiny_cts):
    result, _ = harness.run(example_images["network"], tiny_cts)
    assert result.exit_code == 0, "exit 42 means the container reached the network: " + result.log_tail
    line = next(l for l in result.log_tail.splitlines() if l.startswith("{"))
    report = json.loads(line)
    assert report["interfaces"] == ["lo"]
    assert all(v.startswith("unreachable") for v in report["network_report"].values()), report
    assert result.failure.code is FailureCode.NO_OUTPUT
    _assert_healthy(harness, example_images, tiny_cts)


def test_symlink_escape_is_refused(harness, example_images, tiny_cts):
    result, output = harness.run(example_images["symlink-escape"], tiny_cts)
    # seen while it runs (and stopped) or, if it exited first, in the measurement after the run
    assert result.failure.code is FailureCode.FORBIDDEN_OUTPUT and "symbolic link" in result.failure.message
    report = check_outputs(output, tiny_cts)
    assert report.cases["case_a"].status == "invalid"
    assert "symbolic link" in report.cases["case_a"].reason
    assert report.failure().code is FailureCode.INVALID_OUTPUT
    _assert_healthy(harness, example_images, tiny_cts)


def test_cancel_by_label_stops_a_running_container_within_seconds(harness, example_images, tiny_cts, docker_client):
    thread, outcome = harness.start_running(example_images["sleep-forever"], tiny_cts, submission_id="sub-cancel",
                                            shard_id="7")
    other = DockerRuntime()  # another client, as a cancel from the API process would be
    assert other.cancel("sub-cancel", shard_id="8") == 0  # another shard: nothing to stop
    cancelled_at = time.monotonic()
    assert other.cancel("sub-cancel") == 1
    thread.join(timeout=30)
    stop_s = time.monotonic() - cancelled_at
    assert not thread.is_alive()
    result = outcome["result"]
    assert result.cancelled and not result.timed_out
    assert result.failure.code is FailureCode.CANCELLED
    assert stop_s < 5, f"run returned {stop_s:.1f} s after the cancel"
    # the container was removed after the run
    assert not docker_client.api.containers(all=True, filters={"label": ["touchstone.submission=sub-cancel"]})
    _assert_healthy(harness, example_images, tiny_cts)
