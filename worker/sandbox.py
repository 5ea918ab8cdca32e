"""THE sandbox policy: every keyword argument a submission's container is created with, in one place.

Every submitted image is untrusted. :func:`container_kwargs` turns a :class:`RunSpec` into the
arguments of ``docker.containers.create``; nothing else in the worker adds or changes one. The
policy (each item is checked in a real container by ``tests/integration/worker``):

- no network at all (``network_mode="none"``: only a loopback interface);
- the root filesystem read-only; a size-limited tmpfs at ``/tmp`` (its pages count against the
  memory limit); VOLUMEs the image declares are masked by small tmpfs mounts, so no anonymous
  writable volume is created;
- the process runs as uid:gid 65534:65534 (``nobody``), whatever USER the image declares;
- every Linux capability dropped, ``no-new-privileges``, not privileged, a private IPC namespace;
- hard limits: pids, memory with ``memswap_limit == mem_limit`` (no swap), shm size, CPU quota
  (``nano_cpus``), the largest file (``RLIMIT_FSIZE`` = the output cap), and a capped json-file log
  so a chatty container cannot fill the disk;
- labels ``touchstone.deployment`` / ``.submission`` / ``.shard``: cancellation and clean-up select
  by deployment *and* submission;
- a GPU only when configured, through a device request for those device ids;
- the only mounts: the staged inputs read-only at ``/input`` (plus per-case read-only bind mounts
  of CTs that could not be hard-linked) and a fresh output folder read-write at ``/output``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from docker.types import DeviceRequest, LogConfig, Ulimit
from docker.types import Mount as DockerMount

from worker.runtime.base import LABEL_DEPLOYMENT, LABEL_MANAGED, LABEL_SHARD, LABEL_SUBMISSION, RunSpec

#: uid and gid every submission runs as (``nobody:nogroup`` on Debian)
SANDBOX_UID = 65534
SANDBOX_GID = 65534
SANDBOX_USER = f"{SANDBOX_UID}:{SANDBOX_GID}"

INPUT_MOUNT = "/input"
OUTPUT_MOUNT = "/output"
TMP_MOUNT = "/tmp"
#: size of each tmpfs that masks a VOLUME the image declares
VOLUME_MASK_BYTES = 64 * 2**20
#: the json-file log the engine keeps per container (the RunResult keeps only a tail of it)
LOG_MAX_BYTES = 10 * 2**20


def shard_time_limit(per_case_s: float, n_cases: int, startup_s: float = 60.0) -> float:
    """The wall-clock limit of a run over ``n_cases`` cases: ``startup_s + per_case_s · n_cases``
    (seconds). The start-up allowance covers interpreter start and model loading once per run."""
    if per_case_s <= 0 or n_cases < 1 or startup_s < 0:
        raise ValueError(f"need per_case_s > 0, n_cases >= 1, startup_s >= 0; got {per_case_s}, {n_cases}, {startup_s}")
    return startup_s + per_case_s * n_cases


def container_name(spec: RunSpec) -> str:
    """A unique, readable container name: ``touchstone-<submission>-<shard>-<random>``."""
    parts = ["touchstone"]
    for value in (spec.submission_id, spec.shard_id):
        cleaned = "".join(c if c.isalnum() or c in "_.-" else "-" for c in value)[:40]
        if cleaned:
            parts.append(cleaned)
    parts.append(secrets.token_hex(4))
    return "-".join(parts)


def default_deployment_id() -> str:
    from services.config import get_settings

    return get_settings().deployment_id


def container_labels(spec: RunSpec, deployment_id: str | None = None) -> dict[str, str]:
    """The labels cancellation and clean-up find containers by: the deployment (so two
    deployments on one engine never touch each other's containers), the submission, the shard."""
    return {LABEL_MANAGED: "1", LABEL_DEPLOYMENT: deployment_id or default_deployment_id(),
            LABEL_SUBMISSION: spec.submission_id, LABEL_SHARD: spec.shard_id}


def _tmpfs_options(size_bytes: int) -> str:
    # mode 1777 so uid 65534 can write; nosuid/nodev as for any scratch space. exec is allowed
    # because JIT compilers (numba, torch inductor) need it.
    return f"rw,nosuid,nodev,size={size_bytes},mode=1777"


def container_kwargs(spec: RunSpec, name: str | None = None, deployment_id: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``docker.DockerClient.containers.create`` — the whole sandbox.

    The environment always has ``HOME=/tmp`` and ``TMPDIR=/tmp`` (the only writable scratch
    space); ``spec.env`` may add variables but not override those.
    """
    limits = spec.limits
    mounts = [
        DockerMount(target=INPUT_MOUNT, source=str(Path(spec.input_dir).resolve()), type="bind", read_only=True),
        DockerMount(target=OUTPUT_MOUNT, source=str(Path(spec.output_dir).resolve()), type="bind", read_only=False),
    ]
    for extra in spec.extra_input_mounts:
        if not (extra.container_path.startswith(INPUT_MOUNT + "/") and ".." not in extra.container_path.split("/")):
            raise ValueError(f"extra input mounts must lie under {INPUT_MOUNT}/, got {extra.container_path!r}")
        mounts.append(
            DockerMount(target=extra.container_path, source=str(Path(extra.host_path).resolve()), type="bind", read_only=True)
        )
    tmpfs = {TMP_MOUNT: _tmpfs_options(limits.tmp_bytes)}
    for volume in spec.image_volumes:
        volume = volume.rstrip("/") or "/"
        if volume not in (INPUT_MOUNT, OUTPUT_MOUNT, TMP_MOUNT):
            tmpfs[volume] = _tmpfs_options(VOLUME_MASK_BYTES)
    environment = {**dict(spec.env), "HOME": TMP_MOUNT, "TMPDIR": TMP_MOUNT}
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": list(spec.command) if spec.command is not None else None,
        "name": name or container_name(spec),
        "labels": container_labels(spec, deployment_id),
        "environment": environment,
        "user": SANDBOX_USER,
        "network_mode": "none",
        "read_only": True,
        "tmpfs": tmpfs,
        "mounts": mounts,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "privileged": False,
        "ipc_mode": "private",
        "pids_limit": limits.pids,
        # no single file may outgrow the output cap (RLIMIT_FSIZE, bytes): the kernel refuses the
        # write at exactly the cap, however fast it comes; the watcher enforces the total
        "ulimits": [Ulimit(name="fsize", soft=limits.output_bytes, hard=limits.output_bytes)],
        "mem_limit": limits.memory_bytes,
        "memswap_limit": limits.memory_bytes,
        "shm_size": limits.shm_bytes,
        "nano_cpus": int(round(limits.cpus * 1e9)),
        "log_config": LogConfig(type=LogConfig.types.JSON, config={"max-size": str(LOG_MAX_BYTES), "max-file": "1"}),
        "device_requests": [],
    }
    if spec.gpu_device_ids:
        kwargs["device_requests"] = [DeviceRequest(device_ids=list(spec.gpu_device_ids), capabilities=[["gpu"]])]
    return kwargs


def prepare_output_dir(path: Path) -> Path:
    """Create a fresh, empty output folder writable by the sandbox user.

    Refuses an existing non-empty folder (a retried shard gets a new folder, so outputs of two runs
    never mix). The folder is chowned to 65534:65534 when the worker runs as root, else made
    world-writable (0o777) so the container's uid can write into it.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise FileExistsError(f"output folder {path} is not empty; every run needs a fresh one")
    try:
        os.chown(path, SANDBOX_UID, SANDBOX_GID)
        os.chmod(path, 0o755)
    except PermissionError:
        os.chmod(path, 0o777)
    return path
