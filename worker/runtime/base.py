"""The one container-runtime interface of the worker, and the value types it speaks.

In the style of grand-challenge's ``components/backends``: the Celery tasks see only
:class:`ContainerRuntime`; :mod:`worker.runtime.docker` implements it with the docker SDK; the
sandbox every run gets is decided in one place, :mod:`worker.sandbox`.

A run is described by a :class:`RunSpec` and answered by a :class:`RunResult`. Whatever went
wrong is summarised in ``RunResult.failure``: a :class:`FailureReason` with a machine-readable
:class:`FailureCode` and one sentence a person (the inventor or the organizer) can act on.
Failures found before a run (the image is not amd64, too large, cannot be loaded) are raised as
:class:`ImageRejected`, which carries the same :class:`FailureReason`.

Units: bytes for memory and sizes, seconds for times, byte·seconds for the GPU memory area.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.db.enums import FailureCode as _FailureCode

#: Docker label keys put on every container a runtime starts; cancellation finds containers by them.
LABEL_MANAGED = "touchstone.managed"
LABEL_SUBMISSION = "touchstone.submission"
LABEL_SHARD = "touchstone.shard"
#: the deployment (``settings.deployment_id``) that started a container: cancellation and clean-up
#: of one deployment never touch another's containers on a shared engine
LABEL_DEPLOYMENT = "touchstone.deployment"

#: the only architecture a submission may be built for (the workers are x86-64)
REQUIRED_ARCHITECTURE = "amd64"
REQUIRED_OS = "linux"


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


#: the one enum of failure codes lives with the database enums (services may not import worker);
#: re-exported here for the worker's callers
FailureCode = _FailureCode


@dataclass(frozen=True)
class FailureReason:
    """A failure code and one sentence that says what happened and what to do about it."""

    code: FailureCode
    message: str

    def __str__(self) -> str:
        return self.message

    # One constructor per failure code, alike by design (`duplicates` pairs them): each holds the
    # one sentence a team reads for that code, with its own numbers and its own fix.
    # -- the sentences, in one place so that every caller words a failure the same way --------
    @classmethod
    def time_limit(cls, limit_s: float, n_cases: int | None = None) -> FailureReason:
        per = f" for {n_cases} case(s)" if n_cases else ""
        return cls(
            FailureCode.TIME_LIMIT,
            f"Time limit exceeded: the container was still running after {limit_s:g} s{per} and was "
            "killed; make the algorithm faster (or process fewer cases per run) so it finishes within the limit.",
        )

    @classmethod
    def out_of_memory(cls, limit_bytes: int) -> FailureReason:
        return cls(
            FailureCode.OUT_OF_MEMORY,
            f"Out of memory: the container used more than its memory limit of {_mib(limit_bytes)} "
            "(swap is not available) and was killed by the kernel; lower the algorithm's memory use, "
            "e.g. by sliding-window inference or processing one case at a time.",
        )

    @classmethod
    def nonzero_exit(cls, exit_code: int) -> FailureReason:
        return cls(
            FailureCode.NONZERO_EXIT,
            f"The container exited with code {exit_code}; the end of its log shows the error "
            "(run it locally with the same /input layout to reproduce).",
        )

    @classmethod
    def no_output(cls) -> FailureReason:
        return cls(
            FailureCode.NO_OUTPUT,
            "The container exited normally but wrote nothing to /output; write "
            "/output/<case_id>/combined_labels.nii.gz (or /output/<case_id>/segmentations/<organ>.nii.gz) "
            "for every case listed in /input/cases.json.",
        )

    @classmethod
    def invalid_output(cls, detail: str) -> FailureReason:
        return cls(
            FailureCode.INVALID_OUTPUT,
            f"The container wrote unreadable or mis-shaped files: {detail}. Write gzip-compressed NIfTI "
            "label maps on the same grid (shape and affine) as the input CT, with labels 0..9 or binary masks.",
        )

    @classmethod
    def output_too_large(cls, limit_bytes: int) -> FailureReason:
        return cls(
            FailureCode.OUTPUT_TOO_LARGE,
            f"The container wrote more than {_mib(limit_bytes)} to /output and was stopped; write only the "
            "compressed label files the contract asks for.",
        )

    @classmethod
    def too_many_files(cls, limit: int) -> FailureReason:
        return cls(
            FailureCode.TOO_MANY_FILES,
            f"The container created more than {limit} files and folders in /output and was stopped; write only "
            "/output/<case_id>/combined_labels.nii.gz (or segmentations/<organ>.nii.gz) per case.",
        )

    @classmethod
    def output_too_deep(cls, limit: int) -> FailureReason:
        return cls(
            FailureCode.OUTPUT_TOO_DEEP,
            f"The container nested folders more than {limit} levels deep in /output and was stopped; the contract "
            "needs at most /output/<case_id>/segmentations/<organ>.nii.gz.",
        )

    @classmethod
    def forbidden_output(cls, what: str) -> FailureReason:
        return cls(
            FailureCode.FORBIDDEN_OUTPUT,
            f"The container wrote {what} in /output and was stopped; only plain files and folders are allowed "
            "(no symbolic or hard links, devices, FIFOs or sockets).",
        )

    @classmethod
    def pids_limit(cls, limit: int) -> FailureReason:
        return cls(
            FailureCode.PIDS_LIMIT,
            f"Process limit reached: the container tried to run more than {limit} processes and threads at once, "
            "and the kernel refused to start more (the run then failed or hung); use fewer worker processes "
            "or threads (e.g. num_workers / OMP_NUM_THREADS).",
        )

    @classmethod
    def wrong_architecture(cls, architecture: str, os_name: str = REQUIRED_OS) -> FailureReason:
        return cls(
            FailureCode.WRONG_ARCHITECTURE,
            f"The image is built for {os_name}/{architecture}, but the workers run {REQUIRED_OS}/"
            f"{REQUIRED_ARCHITECTURE}; rebuild it with `docker build --platform linux/amd64`.",
        )

    @classmethod
    def image_too_large(cls, size_bytes: int, limit_bytes: int) -> FailureReason:
        return cls(
            FailureCode.IMAGE_TOO_LARGE,
            f"The image is {_gib(size_bytes)} uncompressed, more than the limit of {_gib(limit_bytes)}; "
            "use a slimmer base image and leave build tools and caches out of the final image.",
        )

    @classmethod
    def image_load_failed(cls, detail: str) -> FailureReason:
        return cls(
            FailureCode.IMAGE_LOAD_FAILED,
            f"The image could not be loaded: {detail}. Upload the file written by "
            "`docker save -o algo.tar <image>` for exactly one image.",
        )

    @classmethod
    def image_refused(cls, detail: str) -> FailureReason:
        """An ``image_ref`` this submission may not run (:func:`services.db.images.refusal`)."""
        return cls(FailureCode.IMAGE_LOAD_FAILED, f"The image could not be loaded: {detail}.")

    @classmethod
    def cancelled(cls) -> FailureReason:
        return cls(FailureCode.CANCELLED, "The run was cancelled by an organizer or by the inventor.")

    @classmethod
    def runtime_error(cls, detail: str) -> FailureReason:
        return cls(
            FailureCode.RUNTIME_ERROR,
            f"The worker could not run the container ({detail}); this is a problem on our side and the "
            "run will be retried.",
        )


class EngineUnavailable(Exception):
    """The container engine stopped answering during a run (it was restarted, its socket went
    away). Not the image's fault: the caller retries the run."""


class ImageRejected(Exception):
    """An image that cannot be run: not loadable, not amd64, too large."""

    def __init__(self, reason: FailureReason):
        super().__init__(reason.message)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """What the engine says about a loaded image."""

    image_id: str  # "sha256:<hex>": the digest of the image's config, i.e. the content address
    tags: tuple[str, ...]
    architecture: str
    os: str
    size_bytes: int  # uncompressed size of all layers
    user: str  # the USER the image declares ("" = root); the sandbox overrides it anyway
    volumes: tuple[str, ...] = ()  # VOLUME paths the image declares; the sandbox masks them


@dataclass(frozen=True)
class ResourceLimits:
    """Limits of one container run. Memory limits are hard: swap is set equal to memory."""

    memory_bytes: int = 4 * 2**30
    cpus: float = 2.0
    pids: int = 256
    shm_bytes: int = 256 * 2**20
    tmp_bytes: int = 1 * 2**30  # tmpfs /tmp; counted against memory_bytes by the kernel
    output_bytes: int = 2 * 2**30  # total written to /output (any depth) before the run is stopped
    output_files: int = 20_000  # files and folders in /output (any depth) before the run is stopped
    output_depth: int = 6  # folder levels below /output (the contract needs 3: case/segmentations/organ)
    log_bytes: int = 64 * 2**10  # log tail kept in RunResult

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "pids", "shm_bytes", "tmp_bytes", "output_bytes", "output_files",
                     "output_depth", "log_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ResourceLimits.{name} must be positive, got {getattr(self, name)}")
        if self.cpus <= 0:
            raise ValueError(f"ResourceLimits.cpus must be positive, got {self.cpus}")


@dataclass(frozen=True)
class Mount:
    """One read-only bind mount of a host file/folder at a container path (per-case CT bind mounts)."""

    host_path: Path
    container_path: str


@dataclass(frozen=True)
class RunSpec:
    """One container run: an image over a staged input folder, writing a fresh output folder.

    ``time_limit_s`` is the wall-clock limit of the whole run (for a shard: the per-case limit
    times the number of cases plus a start-up allowance; see :func:`worker.sandbox.shard_time_limit`).
    ``gpu_device_ids`` are NVIDIA device indices or UUIDs as strings; ``None`` or empty = no GPU.
    ``extra_input_mounts`` are read-only bind mounts under ``/input`` (per-case CTs when staging
    could not hard-link them; see :mod:`worker.staging`). ``command`` overrides the image's command
    (used by the worker's own probes and tests; submissions always run their own entrypoint).
    """

    image: str
    input_dir: Path
    output_dir: Path
    time_limit_s: float
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    gpu_device_ids: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    submission_id: str = ""
    shard_id: str = ""
    extra_input_mounts: Sequence[Mount] = ()
    command: Sequence[str] | None = None
    case_ids: Sequence[str] = ()  # for per-case timing; the watcher only times these folders
    image_volumes: Sequence[str] = ()  # from ImageInfo.volumes; masked by tmpfs
    stop_grace_s: float = 2.0  # at the time limit: SIGTERM, then SIGKILL after this many seconds

    def __post_init__(self) -> None:
        if self.time_limit_s <= 0:
            raise ValueError(f"RunSpec.time_limit_s must be positive, got {self.time_limit_s}")


@dataclass(frozen=True)
class GpuStats:
    """GPU memory over a run, sampled by NVML every ``interval_s`` (FLARE's definition).

    ``used`` is the device memory in use (NVML ``memory.used``) summed over the run's devices.
    ``peak_bytes = max_t used(t)``; ``area_byte_s = Σ_k used(t_k)·(t_k − t_{k−1})`` — the area under
    the memory–time curve by the rectangle rule over the actual sampling times (FLARE reports it in
    MB·s: divide by 2**20). ``baseline_bytes`` is ``used`` just before the container started (the
    memory other processes held), not subtracted from the figures above.
    """

    device_ids: tuple[str, ...]
    interval_s: float
    samples: int
    peak_bytes: int
    area_byte_s: float
    baseline_bytes: int


@dataclass(frozen=True)
class RunResult:
    """What happened in one run. ``failure`` is None when the run itself went well; the outputs
    must still be checked with :func:`worker.outputs.check_outputs`."""

    container_name: str
    exit_code: int | None
    timed_out: bool
    oom_killed: bool
    cancelled: bool
    output_too_large: bool  # any output limit (bytes, files, depth, entry types) stopped or failed the run
    duration_s: float
    peak_memory_bytes: int | None  # cgroup watermark; None where the cgroup could not be read
    gpu: GpuStats | None
    log_tail: str  # the last ``limits.log_bytes`` bytes of stdout+stderr, decoded leniently
    output_seen_s: Mapping[str, float]  # case_id -> seconds after start when its last new file appeared
    failure: FailureReason | None
    pids_limit_hit: bool = False  # the cgroup's pids.events "max" counter moved during the run
    output_bytes: int = 0  # what /output held after the run (any depth)
    output_entries: int = 0

    @property
    def succeeded(self) -> bool:
        return self.failure is None


def per_case_wall_times(output_seen_s: Mapping[str, float]) -> dict[str, float]:
    """Per-case wall time from the times the cases' outputs appeared.

    A container processes its shard's cases one after another, so case ``k`` (in order of
    completion) took ``t_k − t_{k−1}`` seconds, with ``t_0 = 0`` the container start: the first
    case also carries the start-up (model loading), as in FLARE's per-case running time. Cases
    without output are absent. Seconds; resolution is the watcher's poll interval (0.1 s).
    """
    times: dict[str, float] = {}
    previous = 0.0
    for case_id, seen in sorted(output_seen_s.items(), key=lambda item: (item[1], item[0])):
        times[case_id] = max(seen - previous, 0.0)
        previous = seen
    return times


class ContainerRuntime(abc.ABC):
    """Loads, inspects, runs, cancels and removes algorithm images. Implementations are thread-safe
    for concurrent runs (one per GPU)."""

    @abc.abstractmethod
    def load_image(self, tarball: Path) -> ImageInfo:
        """Load a ``docker save`` tarball (streamed, never read into memory) holding exactly one
        image; raise :class:`ImageRejected` (IMAGE_LOAD_FAILED / WRONG_ARCHITECTURE) otherwise."""

    @abc.abstractmethod
    def inspect_image(self, image: str) -> ImageInfo:
        """Digest, architecture, size and user of a local image (by id or tag)."""

    def pull_image(self, reference: str) -> ImageInfo:
        """Pull exactly ``reference`` from its registry (for one submission) and inspect what came;
        raise :class:`ImageRejected` when it cannot be pulled."""
        raise ImageRejected(FailureReason.image_load_failed(f"this worker cannot pull {reference!r}"))

    def remove_leftovers(self, submission_id: str, shard_id: str) -> int:
        """Remove every container (running or exited) of this deployment for one submission's
        shard (or ``"validation"``): what a dead attempt left behind. Returns how many."""
        return 0

    def ping(self) -> bool:
        """Whether the engine answers."""
        return True

    @abc.abstractmethod
    def run(self, spec: RunSpec) -> RunResult:
        """Run one container under the sandbox until it exits, times out or is cancelled; always
        remove the container afterwards."""

    @abc.abstractmethod
    def kill(self, container: str) -> None:
        """Kill one container (by id or name) now; no error if it is already gone."""

    @abc.abstractmethod
    def cancel(self, submission_id: str, shard_id: str | None = None) -> int:
        """Kill every running container of a submission (or one of its shards) started by this
        deployment, found by label; return how many were killed."""

    @abc.abstractmethod
    def remove_image(self, image: str) -> None:
        """Remove a loaded image (by id); no error if it is already gone."""


def check_image(info: ImageInfo, max_size_bytes: int) -> FailureReason | None:
    """The static checks before any run: linux/amd64 and at most ``max_size_bytes`` uncompressed."""
    if info.architecture != REQUIRED_ARCHITECTURE or info.os != REQUIRED_OS:
        return FailureReason.wrong_architecture(info.architecture, info.os)
    if info.size_bytes > max_size_bytes:
        return FailureReason.image_too_large(info.size_bytes, max_size_bytes)
    return None
