"""Each item of the sandbox policy really takes effect inside a container (real Docker engine)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from worker.runtime.base import FailureCode

pytestmark = pytest.mark.docker

PROBE = r"""
import json, os, socket
report = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
report["caps"] = {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
report["no_new_privs"] = status["NoNewPrivs"].strip()
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return exc.strerror
report["write_root"] = attempt(lambda: open("/etc/touchstone-probe", "w"))
report["write_input"] = attempt(lambda: open("/input/probe", "w"))
report["write_input_ct"] = attempt(lambda: open("/input/case_a/ct.nii.gz", "ab"))
report["read_input_ct"] = len(open("/input/case_a/ct.nii.gz", "rb").read())
report["write_tmp"] = attempt(lambda: open("/tmp/x", "wb").write(b"x" * 1024))
report["fill_tmp"] = attempt(lambda: open("/tmp/big", "wb").write(b"x" * (64 << 20)))
report["net_connect"] = attempt(lambda: socket.create_connection(("1.1.1.1", 53), timeout=2))
report["net_resolve"] = attempt(lambda: socket.getaddrinfo("pypi.org", 443)) if True else None
report["interfaces"] = sorted(os.listdir("/sys/class/net"))
report["home"] = os.environ.get("HOME")
report["mounts"] = sorted(line.split()[1] for line in open("/proc/self/mounts"))
report["cases"] = json.load(open("/input/cases.json"))
report["write_output"] = attempt(lambda: open("/output/case_a.probe", "w").write("x"))
print("PROBE " + json.dumps(report))
"""


def _probe(harness, tiny_cts, base_image, mode="auto"):
    result, output = harness.run(base_image, tiny_cts, command=["python3", "-c", PROBE], mode=mode)
    line = next(l for l in result.log_tail.splitlines() if l.startswith("PROBE "))
    return result, json.loads(line[len("PROBE "):]), output


def test_every_sandbox_item_takes_effect(harness, tiny_cts, base_image, docker_client):
    # the base image runs as root by default: the sandbox must still force uid 65534
    assert docker_client.api.inspect_image(base_image)["Config"].get("User", "") in ("", "root", "0")
    result, report, output = _probe(harness, tiny_cts, base_image)
    assert result.exit_code == 0, result.log_tail
    assert (report["uid"], report["gid"]) == (65534, 65534)
    assert report["caps"] == {k: "0000000000000000" for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert report["no_new_privs"] == "1"
    assert report["write_root"] == "Read-only file system"
    assert report["write_input"] == "Read-only file system"
    assert report["write_input_ct"] in ("Read-only file system", "Permission denied")
    assert report["read_input_ct"] == tiny_cts["case_a"].stat().st_size
    assert report["write_tmp"] == "ok"
    assert report["fill_tmp"] == "No space left on device"  # /tmp is a 32 MiB tmpfs
    assert report["net_connect"] == "Network is unreachable"
    assert report["net_resolve"] != "ok"
    assert report["interfaces"] == ["lo"]
    assert report["home"] == "/tmp"
    assert report["write_output"] == "ok" and (output / "case_a.probe").read_text() == "x"
    assert [c["case_id"] for c in report["cases"]["cases"]] == ["case_a", "case_b"]
    # no mount beyond the policy's (the engine's own /proc, /sys, /dev, /etc/hosts... aside)
    ours = [m for m in report["mounts"] if m.startswith(("/input", "/output", "/tmp", "/data", "/var", "/home"))]
    assert ours == ["/input", "/output", "/tmp"]


def test_bind_mount_staging_is_read_only_too(harness, tiny_cts, base_image):
    result, report, _ = _probe(harness, tiny_cts, base_image, mode="bind")
    assert result.exit_code == 0, result.log_tail
    assert report["read_input_ct"] == tiny_cts["case_a"].stat().st_size
    assert report["write_input_ct"] in ("Read-only file system", "Permission denied")
    assert "/input/case_a/ct.nii.gz" in report["mounts"]


def test_pids_limit_stops_a_fork_bomb(harness, tiny_cts, example_images):
    limits = dataclasses.replace(harness.limits, pids=32)
    result, _ = harness.run(example_images["forkbomb"], tiny_cts, time_limit_s=6, limits=limits)
    # the reason names the limit that was hit (the pids cgroup's "max" counter), not the time limit
    assert result.timed_out and result.pids_limit_hit
    assert result.failure.code is FailureCode.PIDS_LIMIT and "32 processes" in result.failure.message
    line = next(l for l in result.log_tail.splitlines() if l.startswith("fork refused after"))
    children = int(line.split()[3])
    assert 0 < children < 32, line  # the python process itself and the children share the 32 pids
    assert "Resource temporarily unavailable" in line


def test_memory_limit_kills_with_oom(harness, tiny_cts, example_images):
    result, _ = harness.run(example_images["oom"], tiny_cts, time_limit_s=30)
    assert result.oom_killed and result.exit_code == 137
    assert result.failure.code is FailureCode.OUT_OF_MEMORY
    assert "256 MiB" in result.failure.message
    # the cgroup watermark saw the container reach its limit (swap is off: memswap == mem)
    assert result.peak_memory_bytes is not None
    assert 0.75 * harness.limits.memory_bytes <= result.peak_memory_bytes <= harness.limits.memory_bytes


def test_log_tail_is_capped(harness, tiny_cts, base_image):
    command = ["python3", "-c", "import sys\nfor i in range(20000): print(f'line {i:06d}')\nprint('THE END')"]
    result, _ = harness.run(base_image, tiny_cts, command=command)
    assert result.exit_code == 0
    assert len(result.log_tail.encode()) <= harness.limits.log_bytes + 64
    assert result.log_tail.startswith("[... log truncated ...]") and result.log_tail.rstrip().endswith("THE END")


def test_writing_too_much_output_stops_the_run(harness, tiny_cts, base_image):
    limits = dataclasses.replace(harness.limits, output_bytes=8 * 2**20)
    command = ["python3", "-c", "import time\nf = open('/output/big', 'wb')\n"
               "while True:\n    f.write(b'x' * 2**20); f.flush(); time.sleep(0.01)"]
    result, _ = harness.run(base_image, tiny_cts, command=command, limits=limits, time_limit_s=30)
    assert result.output_too_large and result.failure.code is FailureCode.OUTPUT_TOO_LARGE
    assert result.duration_s < 15
