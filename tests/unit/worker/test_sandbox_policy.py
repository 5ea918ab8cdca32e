"""The sandbox policy produces exactly the agreed container arguments (worker/sandbox.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from docker.types import Ulimit
from docker.types import DeviceRequest, LogConfig
from docker.types import Mount as DockerMount

from worker import sandbox
from worker.runtime.base import Mount, ResourceLimits, RunSpec


def _spec(tmp_path: Path, **overrides) -> RunSpec:
    fields = dict(
        image="sha256:abc",
        input_dir=tmp_path / "in",
        output_dir=tmp_path / "out",
        time_limit_s=30,
        limits=ResourceLimits(memory_bytes=2 * 2**30, cpus=1.5, pids=64, shm_bytes=128 * 2**20, tmp_bytes=256 * 2**20),
        submission_id="sub-1",
        shard_id="3",
        env={"OMP_NUM_THREADS": "1", "HOME": "/root"},
    )
    fields.update(overrides)
    return RunSpec(**fields)


def test_policy_kwargs_are_exactly_the_sandbox(tmp_path):
    kwargs = sandbox.container_kwargs(_spec(tmp_path), name="touchstone-x", deployment_id="dep-a")
    assert kwargs == {
        "image": "sha256:abc",
        "command": None,
        "name": "touchstone-x",
        "labels": {"touchstone.managed": "1", "touchstone.deployment": "dep-a", "touchstone.submission": "sub-1",
                   "touchstone.shard": "3"},
        "environment": {"OMP_NUM_THREADS": "1", "HOME": "/tmp", "TMPDIR": "/tmp"},
        "user": "65534:65534",
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={256 * 2**20},mode=1777"},
        "mounts": [
            DockerMount(target="/input", source=str((tmp_path / "in").resolve()), type="bind", read_only=True),
            DockerMount(target="/output", source=str((tmp_path / "out").resolve()), type="bind", read_only=False),
        ],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "privileged": False,
        "ipc_mode": "private",
        "pids_limit": 64,
        "ulimits": [Ulimit(name="fsize", soft=2 * 2**30, hard=2 * 2**30)],
        "mem_limit": 2 * 2**30,
        "memswap_limit": 2 * 2**30,
        "shm_size": 128 * 2**20,
        "nano_cpus": 1_500_000_000,
        "log_config": LogConfig(type="json-file", config={"max-size": str(sandbox.LOG_MAX_BYTES), "max-file": "1"}),
        "device_requests": [],
    }


def test_gpu_devices_become_one_device_request(tmp_path):
    kwargs = sandbox.container_kwargs(_spec(tmp_path, gpu_device_ids=("1",)))
    assert kwargs["device_requests"] == [DeviceRequest(device_ids=["1"], capabilities=[["gpu"]])]
    request = kwargs["device_requests"][0]
    assert request["DeviceIDs"] == ["1"] and request["Capabilities"] == [["gpu"]] and request["Count"] == 0


def test_no_gpu_means_no_device_request(tmp_path):
    assert sandbox.container_kwargs(_spec(tmp_path, gpu_device_ids=()))["device_requests"] == []
    assert sandbox.container_kwargs(_spec(tmp_path, gpu_device_ids=None))["device_requests"] == []


def test_per_case_mounts_are_read_only_and_under_input(tmp_path):
    ct = tmp_path / "storage" / "ct.nii.gz"
    spec = _spec(tmp_path, extra_input_mounts=[Mount(ct, "/input/case_1/ct.nii.gz")])
    mounts = sandbox.container_kwargs(spec)["mounts"]
    assert mounts[2] == DockerMount(target="/input/case_1/ct.nii.gz", source=str(ct.resolve()), type="bind", read_only=True)
    assert len(mounts) == 3
    for bad in ("/etc/passwd", "/input/../etc", "/inputx/a"):
        with pytest.raises(ValueError, match="under /input/"):
            sandbox.container_kwargs(_spec(tmp_path, extra_input_mounts=[Mount(ct, bad)]))


def test_image_volumes_are_masked_by_small_tmpfs(tmp_path):
    tmpfs = sandbox.container_kwargs(_spec(tmp_path, image_volumes=["/data/", "/output", "/tmp"]))["tmpfs"]
    assert set(tmpfs) == {"/tmp", "/data"}
    assert f"size={sandbox.VOLUME_MASK_BYTES}" in tmpfs["/data"]


def test_names_are_unique_and_safe(tmp_path):
    spec = _spec(tmp_path, submission_id="a b/c", shard_id="7")
    first, second = sandbox.container_name(spec), sandbox.container_name(spec)
    assert first != second
    assert first.startswith("touchstone-a-b-c-7-")


def test_shard_time_limit():
    assert sandbox.shard_time_limit(per_case_s=10, n_cases=5, startup_s=30) == 80
    with pytest.raises(ValueError):
        sandbox.shard_time_limit(per_case_s=0, n_cases=1)


def test_prepare_output_dir_is_fresh_and_writable_by_the_sandbox_user(tmp_path):
    out = sandbox.prepare_output_dir(tmp_path / "out")
    st = out.stat()
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    else:
        assert st.st_mode & 0o777 == 0o777
    (out / "x").write_text("1")
    with pytest.raises(FileExistsError, match="not empty"):
        sandbox.prepare_output_dir(out)


def test_limits_reject_nonsense():
    with pytest.raises(ValueError, match="memory_bytes"):
        ResourceLimits(memory_bytes=0)
    with pytest.raises(ValueError, match="time_limit_s"):
        RunSpec(image="x", input_dir=Path("."), output_dir=Path("."), time_limit_s=0)
