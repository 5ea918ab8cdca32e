"""What every container run of the worker shares (validation's public-sample run and every shard):
the container runtime (chosen by ``WorkerSettings.runtime``), the run folders in storage, the
submission's image on this engine, the sandbox limits of a test set, the supervised run (cancel
watch and heartbeat) and the texts a team may read (server paths removed).

The steps read top to bottom: :mod:`worker.validation` → :mod:`worker.inference` →
:mod:`worker.scoring` → :mod:`worker.finalize`, and :mod:`worker.reaper`; each imports only the
ones after it (to enqueue them), this module and :mod:`worker.pipeline` (the database rules they
share).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import sqlalchemy as sa
from kombu.utils.imports import symbol_by_name

from services.config import get_settings
from services.db import images as image_rules
from services.db.base import utcnow
from services.db.enums import FailureCode
from services.db.enums import SubmissionState as S
from services.db.models import Submission, TestSet
from services.db.session import get_sessionmaker, session_scope
from services.storage import Storage
from worker import pipeline
from worker.app import worker_settings
from worker.monitoring import measure_tree
from worker.outputs import delete_tree
from worker.runtime.base import (
    ContainerRuntime,
    EngineUnavailable,
    FailureReason,
    ImageInfo,
    ImageRejected,
    ResourceLimits,
    RunResult,
    RunSpec,
)

log = logging.getLogger("touchstone.worker")

#: ``<storage>/runs/submission-<id>/<part>/...``: the folders of every run (inputs, outputs)
RUNS_DIR = "runs"


# --------------------------------------------------------------------------------------------
# the container runtime
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def runtime_from(path: str) -> ContainerRuntime:
    """The runtime that the dotted path ``module:attribute`` (a :class:`ContainerRuntime` class, or
    any callable without arguments returning one) makes; one per process and path."""
    runtime = symbol_by_name(path)()
    if not isinstance(runtime, ContainerRuntime):
        raise TypeError(f"TOUCHSTONE_WORKER_RUNTIME={path!r} made a {type(runtime).__name__}, not a ContainerRuntime")
    return runtime


def get_runtime() -> ContainerRuntime:
    """This process's container runtime: ``WorkerSettings.runtime`` (default the Docker engine)."""
    return runtime_from(worker_settings().runtime)


def engine_errors() -> tuple[type[BaseException], ...]:
    """What the container engine raises when it is down or restarting (retried, never the image's fault)."""
    import docker.errors
    import requests.exceptions

    return (EngineUnavailable, docker.errors.DockerException, requests.exceptions.ConnectionError,
            requests.exceptions.Timeout)


# --------------------------------------------------------------------------------------------
# run folders in storage
# --------------------------------------------------------------------------------------------
def storage_root() -> Path:
    return Path(get_settings().storage_dir).resolve()  # type: ignore[arg-type]


def submission_runs_dir(submission_id: int) -> Path:
    """``<storage>/runs/submission-<id>``: every run folder of a submission."""
    return storage_root() / RUNS_DIR / f"submission-{submission_id}"


def fresh_run_dir(submission_id: int, part: str) -> Path:
    """``runs/submission-<id>/<part>/<utc time>-<random>``: one folder per attempt, never reused."""
    stamp = utcnow().strftime("%Y%m%dT%H%M%S")
    path = submission_runs_dir(submission_id) / part / f"{stamp}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def relative(path: Path) -> str:
    """``path`` relative to storage (what the database stores)."""
    return path.resolve().relative_to(storage_root()).as_posix()


def discard_run(submission_id: int, workdir: Path, failed: bool = True) -> None:
    """Delete a run's outputs (a failed, cancelled or abandoned run: its reason and log are stored);
    with ``keep_failed_outputs`` a failed run's outputs stay and are counted as the submission's."""
    delete_tree(workdir / "input")
    if failed and get_settings().keep_failed_outputs:
        with session_scope() as session:
            pipeline.add_storage_bytes(session, submission_id, measure_tree(workdir).bytes)
        return
    delete_tree(workdir)


# --------------------------------------------------------------------------------------------
# texts a team may read
# --------------------------------------------------------------------------------------------
def public_text(text: str | None) -> str | None:
    """A text the team may read (failure reasons, the validation log) without server paths: the
    storage and data folders are replaced by ``<storage>`` / ``<data>``."""
    if not text:
        return text
    settings = get_settings()
    for folder, name in ((settings.storage_dir, "<storage>"), (settings.data_dir, "<data>")):
        for form in {str(Path(folder).resolve()), str(Path(folder).absolute()), str(folder)}:  # type: ignore[arg-type]
            if form and form not in (".", "/"):
                text = text.replace(form, name)
    return text


def fail(session, sub: Submission, reason: str, code: FailureCode) -> bool:
    """:func:`worker.pipeline.fail_submission` with server paths removed from ``reason``."""
    return pipeline.fail_submission(session, sub, public_text(reason) or reason, code)


# --------------------------------------------------------------------------------------------
# the submission's image on this engine
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSource:
    """Where a submission's image comes from (read in one transaction, used outside it)."""

    submission_id: int
    image_digest: str | None
    image_path: str | None
    image_ref: str | None
    team_id: int | None = None

    @classmethod
    def of(cls, sub: Submission) -> ImageSource:
        return cls(sub.id, sub.image_digest, sub.image_path, sub.image_ref, sub.team_id)


def _image_from_ref(runtime: ContainerRuntime, source: ImageSource) -> ImageInfo:
    """An ``image_ref`` under the ownership rule (:mod:`services.db.images`), checked again here
    before anything runs: a digest the team supplied is inspected by that digest; a reference in
    a configured registry is pulled, exactly as written, for this submission; anything else -- a
    local tag, a short id, another team's digest -- is refused. A tag is never resolved against
    the images already on the engine."""
    assert source.image_ref is not None
    ref, allowed = source.image_ref, get_settings().allowed_registries
    digest = image_rules.digest_of(ref)
    with session_scope() as session:
        owned = (source.team_id is not None and digest is not None
                 and image_rules.team_owns_image(session, source.team_id, digest))
        permitted = source.team_id is not None and image_rules.image_ref_allowed(session, source.team_id, ref, allowed)
    if not permitted:
        raise ImageRejected(FailureReason.image_refused(image_rules.refusal(allowed)))
    if owned:
        info = runtime.inspect_image(digest)  # type: ignore[arg-type]
    else:
        info = None
        if source.image_digest:  # pulled for this submission before (by content digest)
            try:
                info = runtime.inspect_image(source.image_digest)
            except ImageRejected:
                info = None
        if info is None:
            info = runtime.pull_image(ref)
    if source.image_digest and info.image_id != source.image_digest:
        raise ImageRejected(FailureReason.image_load_failed(
            f"{ref!r} now names image {info.image_id}, not the validated {source.image_digest}"))
    return info


def ensure_image(runtime: ContainerRuntime, source: ImageSource) -> ImageInfo:
    """The submission's image on this worker's engine: for an ``image_ref``, under the ownership
    rule (:func:`_image_from_ref`); for an upload, found by its recorded digest, else loaded from
    the uploaded tarball in (shared) storage."""
    if source.image_ref:
        return _image_from_ref(runtime, source)
    if source.image_digest and source.image_path:
        try:
            return runtime.inspect_image(source.image_digest)
        except ImageRejected:
            pass  # not loaded on this node yet
    if source.image_path:
        tarball = Storage.from_settings().path(source.image_path)
        info = runtime.load_image(tarball)
        if source.image_digest and info.image_id != source.image_digest:
            raise ImageRejected(FailureReason.image_load_failed(
                f"the stored tarball now holds image {info.image_id}, not the validated {source.image_digest}"))
        return info
    raise ImageRejected(FailureReason.image_load_failed("the submission has neither an uploaded tarball nor an image reference"))


# --------------------------------------------------------------------------------------------
# limits and the supervised run
# --------------------------------------------------------------------------------------------
def run_limits(testset: TestSet) -> ResourceLimits:
    """The sandbox limits of every run on ``testset`` (its memory, pids, /dev/shm; the worker's
    CPUs and output limits)."""
    wsettings = worker_settings()
    memory = int(testset.memory_bytes)
    return ResourceLimits(
        memory_bytes=memory,
        cpus=wsettings.container_cpus,
        pids=int(testset.pids_limit),
        shm_bytes=int(testset.shm_bytes),
        tmp_bytes=min(ResourceLimits.tmp_bytes, memory),
        output_bytes=wsettings.output_bytes,
        output_files=wsettings.output_files,
        output_depth=wsettings.output_depth,
    )


def gpu_ids(testset: TestSet) -> tuple[str, ...] | None:
    """The GPUs of this worker a run on ``testset`` gets (None: a CPU-only run)."""
    ids = worker_settings().gpu_ids
    if not ids or testset.gpus <= 0:
        return None
    return ids[: testset.gpus]


def supervised_run(runtime: ContainerRuntime, spec: RunSpec, submission_id: int,
                   shard_id: int | None = None, owner: str | None = None, validation: bool = False) -> RunResult:
    """``runtime.run(spec)`` with a watcher thread that, every ``cancel_poll_s`` seconds, kills the
    container when the submission was cancelled (or failed) and, for a shard (or, with
    ``validation``, the submission's validation run), writes its heartbeat every ``heartbeat_s``
    seconds -- and kills the container when the run is no longer ours (the reaper gave it to
    another worker)."""
    wsettings = worker_settings()
    stop = threading.Event()
    make_session = get_sessionmaker()

    def watch() -> None:
        last_beat = time.monotonic()
        while not stop.wait(wsettings.cancel_poll_s):
            try:
                with make_session() as session:
                    state = session.scalar(sa.select(Submission.state).where(Submission.id == submission_id))
                    if state is None or S(state) in (S.cancelled, S.failed):
                        runtime.cancel(spec.submission_id, spec.shard_id)
                        continue
                    if owner and time.monotonic() - last_beat >= wsettings.heartbeat_s:
                        last_beat = time.monotonic()
                        if shard_id is not None:
                            ours = pipeline.beat(session, shard_id, owner)
                        elif validation:
                            ours = pipeline.beat_validation(session, submission_id, owner)
                        else:
                            ours = True
                        if not ours:
                            log.warning("%s of submission %s is no longer owned by %s; stopping its container",
                                        spec.shard_id, submission_id, owner)
                            runtime.cancel(spec.submission_id, spec.shard_id)
            except Exception:  # noqa: BLE001 - the watcher must outlive a database hiccup
                log.exception("watcher of submission %s", submission_id)

    watcher = threading.Thread(target=watch, name=f"touchstone-watch-{submission_id}", daemon=True)
    watcher.start()
    try:
        return runtime.run(spec)
    finally:
        stop.set()
        watcher.join(timeout=5)


# --------------------------------------------------------------------------------------------
# the protocol of a test set
# --------------------------------------------------------------------------------------------
_protocols: dict[str, object] = {}


def protocol_of(testset: TestSet):
    """The test set's protocol, as stored with it (``protocol_json``), else the preset by key."""
    key = testset.protocol_key
    if key not in _protocols:
        from evaluation.protocols import Protocol, load_protocol

        try:
            _protocols[key] = Protocol.from_dict(testset.protocol_json)
        except Exception:  # noqa: BLE001 - an old row without the full description
            _protocols[key] = load_protocol(testset.protocol_name)
    return _protocols[key]
