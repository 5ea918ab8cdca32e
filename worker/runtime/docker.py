"""The Docker implementation of :class:`worker.runtime.base.ContainerRuntime` (docker SDK).

Run life cycle (:meth:`DockerRuntime.run`): create the container with exactly
:func:`worker.sandbox.container_kwargs` (labelled with this runtime's deployment id), start it,
sample memory / pids / GPU every 0.1 s and walk /output at an interval derived from the headroom
left to its limits, wait up to the time limit -- then SIGTERM and, ``stop_grace_s`` later,
SIGKILL whatever the container does with signals --, stop it at once (freeze + SIGKILL through its
cgroup, else the engine's kill) when /output breaks a limit, measure /output again after the
exit, read the exit code, the OOM flag, the pids cgroup's refusals and a capped log tail, and
always remove the container. When the engine stops answering mid-run, :class:`EngineUnavailable`
is raised (the caller retries). A kill by somebody
else (:meth:`cancel`, possibly from another process) is recognised from the engine's ``kill``
event, so a cancelled run is reported as cancelled and not as "exited with code 137".
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import logging

import docker
import docker.errors
import docker.utils
import requests.exceptions

from worker import sandbox
from worker.monitoring import (
    CgroupMemoryMonitor,
    CgroupPidsMonitor,
    GpuMemoryMonitor,
    OutputWatcher,
    PeriodicSampler,
    TreeUsage,
    measure_tree,
    stop_now,
)
from worker.runtime.base import (
    LABEL_DEPLOYMENT,
    LABEL_MANAGED,
    LABEL_SHARD,
    LABEL_SUBMISSION,
    REQUIRED_ARCHITECTURE,
    REQUIRED_OS,
    ContainerRuntime,
    EngineUnavailable,
    FailureReason,
    ImageInfo,
    ImageRejected,
    RunResult,
    RunSpec,
)

#: every loaded submission image is tagged <LOADED_REPOSITORY>:<hex digest>, and nothing else
LOADED_REPOSITORY = "touchstone-loaded/image"
#: how long to wait for a killed container to be reported as exited
KILL_GRACE_S = 30.0
#: the longest single wait on the engine while a container runs (between checks that it answers)
WAIT_CHUNK_S = 10.0

log = logging.getLogger("touchstone.worker.runtime")

_ENGINE_ERRORS = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, docker.errors.DockerException)


def output_failure(usage: TreeUsage, limits) -> FailureReason | None:
    """The failure for an /output that broke a limit (None when it did not)."""
    if usage.exceeded == "bytes":
        return FailureReason.output_too_large(limits.output_bytes)
    if usage.exceeded == "files":
        return FailureReason.too_many_files(limits.output_files)
    if usage.exceeded == "depth":
        return FailureReason.output_too_deep(limits.output_depth)
    if usage.exceeded == "entry":
        return FailureReason.forbidden_output(usage.forbidden or "a link or special file")
    return None


def _manifest_of(tarball: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None, str | None]:
    """Read ``manifest.json``, the config of its first image and that config's image id
    (``sha256:`` of the config's bytes, which is how the engine names the image) from a
    ``docker save`` tarball.

    The tarball is opened seekable, so only member headers are read, not the layers: cheap for a
    multi-GB file. Raises ImageRejected when it is not such a tarball.
    """
    try:
        with tarfile.open(tarball, mode="r:") as archive:
            members = {m.name.lstrip("./"): m for m in archive.getmembers()}
            manifest_member = members.get("manifest.json")
            if manifest_member is None or not manifest_member.isfile():
                raise ImageRejected(FailureReason.image_load_failed("the tar file has no manifest.json, so it is not a `docker save` archive"))
            if manifest_member.size > 1 << 20:
                raise ImageRejected(FailureReason.image_load_failed("its manifest.json is implausibly large"))
            manifest = json.load(archive.extractfile(manifest_member))  # type: ignore[arg-type]
            if not isinstance(manifest, list):
                raise ImageRejected(FailureReason.image_load_failed("its manifest.json is not a list of images"))
            config, image_id = None, None
            if len(manifest) == 1 and isinstance(manifest[0], dict):
                config_member = members.get(str(manifest[0].get("Config", "")).lstrip("./"))
                if config_member is not None and config_member.isfile() and config_member.size < 4 << 20:
                    raw = archive.extractfile(config_member).read()  # type: ignore[union-attr]
                    config = json.loads(raw)
                    image_id = "sha256:" + hashlib.sha256(raw).hexdigest()
            return manifest, config, image_id
    except ImageRejected:
        raise
    except FileNotFoundError:
        raise ImageRejected(FailureReason.image_load_failed("the uploaded file is no longer in storage")) from None
    except OSError as exc:  # the text of an OSError names the server's path: only its reason goes out
        raise ImageRejected(FailureReason.image_load_failed(
            f"it is not a readable tar archive ({exc.strerror or type(exc).__name__})")) from None
    except (tarfile.TarError, ValueError, UnicodeDecodeError) as exc:
        raise ImageRejected(FailureReason.image_load_failed(f"it is not a readable tar archive ({exc})")) from None


class _LogTail:
    """The last ``limit`` bytes of a byte stream."""

    def __init__(self, limit: int):
        self.limit = limit
        self.buffer = bytearray()
        self.truncated = False

    def feed(self, chunks: Iterator[bytes]) -> str:
        for chunk in chunks:
            self.buffer += chunk
            if len(self.buffer) > self.limit:
                del self.buffer[: len(self.buffer) - self.limit]
                self.truncated = True
        text = self.buffer.decode("utf-8", errors="replace")
        return ("[... log truncated ...]\n" + text) if self.truncated else text


class DockerRuntime(ContainerRuntime):
    """Runs submissions on the local Docker engine."""

    def __init__(self, client: docker.DockerClient | None = None, nvml: Any | None = None,
                 deployment_id: str | None = None):
        self.client = client or docker.from_env(timeout=600)
        self._nvml = nvml  # None: the real pynvml where installed
        #: put on every container as LABEL_DEPLOYMENT; cancel and clean-up select by it
        self.deployment_id = deployment_id or sandbox.default_deployment_id()

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except _ENGINE_ERRORS:
            return False

    def _labels(self, submission_id: str, shard_id: str | None = None) -> list[str]:
        labels = [f"{LABEL_MANAGED}=1", f"{LABEL_DEPLOYMENT}={self.deployment_id}", f"{LABEL_SUBMISSION}={submission_id}"]
        if shard_id is not None:
            labels.append(f"{LABEL_SHARD}={shard_id}")
        return labels

    # -- images ----------------------------------------------------------------------------------
    def load_image(self, tarball: Path) -> ImageInfo:
        tarball = Path(tarball)
        manifest, config, image_id = _manifest_of(tarball)
        if len(manifest) != 1:
            raise ImageRejected(FailureReason.image_load_failed(f"the archive holds {len(manifest)} images; save exactly one"))
        if config is not None:
            architecture, os_name = config.get("architecture", ""), config.get("os", "")
            if (architecture, os_name) != (REQUIRED_ARCHITECTURE, REQUIRED_OS):
                raise ImageRejected(FailureReason.wrong_architecture(architecture or "unknown", os_name or "unknown"))
        if image_id is not None and self._has_image(image_id):
            # The engine already holds this exact image (the id is the hash of a config that names
            # every layer's digest): a re-run, or another submission of the same image. Reading and
            # hashing the whole archive again would change nothing; only our own tag is added.
            self.client.api.tag(image_id, LOADED_REPOSITORY, image_id.split(":")[-1])
            return self.inspect_image(image_id)
        tags = [t for t in (manifest[0].get("RepoTags") or []) if isinstance(t, str)]
        # Tags in the archive would move tags of images already on this engine: refuse a tag that
        # names a different local image, and drop the archive's new tags after loading, so
        # submissions are only ever known by image id.
        preexisting: dict[str, str] = {}
        for tag in tags:
            try:
                preexisting[tag] = self.client.images.get(tag).id
            except docker.errors.ImageNotFound:
                pass
            except docker.errors.APIError:
                raise ImageRejected(FailureReason.image_load_failed(f"its tag {tag!r} is not a valid image name")) from None
        loaded_ids: list[str] = []
        try:
            with tarball.open("rb") as stream:  # requests streams a file object; never read into memory
                for message in self.client.api.load_image(stream):
                    if "errorDetail" in message or "error" in message:
                        detail = message.get("errorDetail", {}).get("message") or message.get("error")
                        raise ImageRejected(FailureReason.image_load_failed(f"the engine said: {detail}"))
                    text = message.get("stream", "")
                    for prefix in ("Loaded image ID: ", "Loaded image: "):
                        if text.startswith(prefix):
                            loaded_ids.append(text[len(prefix):].strip())
        except docker.errors.APIError as exc:
            raise ImageRejected(FailureReason.image_load_failed(f"the engine said: {exc.explanation or exc}")) from None
        if not loaded_ids:
            raise ImageRejected(FailureReason.image_load_failed("the engine reported no image in it"))
        info = self.inspect_image(loaded_ids[0])
        # our own tag first: an image whose last tag is removed is deleted by the engine
        self.client.api.tag(info.image_id, LOADED_REPOSITORY, info.image_id.split(":")[-1])
        for tag in tags:
            if tag in preexisting and preexisting[tag] != info.image_id:
                # The load moved a tag away from another image: give the tag back, drop the upload.
                repository, _, version = tag.rpartition(":")
                self.client.api.tag(preexisting[tag], repository, version)
                self.remove_image(info.image_id)
                raise ImageRejected(FailureReason.image_load_failed(
                    f"its tag {tag!r} names another image on this worker; save the image under a unique tag"))
            if tag not in preexisting:
                self._untag(tag)
        if info.architecture != REQUIRED_ARCHITECTURE or info.os != REQUIRED_OS:
            self.remove_image(info.image_id)
            raise ImageRejected(FailureReason.wrong_architecture(info.architecture, info.os))
        return self.inspect_image(info.image_id)

    # The engine calls below each ignore the one "already gone" error of their call (alike in
    # shape, paired by `duplicates`): which error is harmless differs from call to call.
    def _has_image(self, image_id: str) -> bool:
        try:
            return self.client.api.inspect_image(image_id)["Id"] == image_id
        except docker.errors.APIError:
            return False

    def _untag(self, tag: str) -> None:
        try:
            self.client.api.remove_image(tag, noprune=True)
        except docker.errors.APIError:
            pass

    def inspect_image(self, image: str) -> ImageInfo:
        try:
            attrs = self.client.api.inspect_image(image)
        except docker.errors.ImageNotFound:
            raise ImageRejected(FailureReason.image_load_failed(f"no image {image!r} on this worker")) from None
        config = attrs.get("Config") or {}
        return ImageInfo(
            image_id=attrs["Id"],
            tags=tuple(attrs.get("RepoTags") or ()),
            architecture=attrs.get("Architecture", ""),
            os=attrs.get("Os", ""),
            size_bytes=int(attrs.get("Size") or 0),
            user=config.get("User") or "",
            volumes=tuple(sorted((config.get("Volumes") or {}).keys())),
        )

    def pull_image(self, reference: str) -> ImageInfo:
        """Pull exactly ``reference`` (a tag-less one means ``:latest``, as ``docker pull``)."""
        repository, tag = docker.utils.parse_repository_tag(reference)
        try:
            for message in self.client.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
                if "error" in message or "errorDetail" in message:
                    detail = message.get("errorDetail", {}).get("message") or message.get("error")
                    raise ImageRejected(FailureReason.image_load_failed(f"pulling {reference!r} failed: {detail}"))
        except docker.errors.APIError as exc:
            raise ImageRejected(FailureReason.image_load_failed(
                f"pulling {reference!r} failed: {exc.explanation or exc}")) from None
        pulled = reference if tag or "@" in reference else f"{reference}:latest"
        info = self.inspect_image(pulled)
        if info.architecture != REQUIRED_ARCHITECTURE or info.os != REQUIRED_OS:
            raise ImageRejected(FailureReason.wrong_architecture(info.architecture, info.os))
        return info

    def remove_image(self, image: str) -> None:
        try:
            self.client.api.remove_image(image, force=True)
        except docker.errors.ImageNotFound:
            pass

    # -- cancellation ----------------------------------------------------------------------------
    def kill(self, container: str) -> None:
        try:
            self.client.api.kill(container)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.response is None or exc.response.status_code != 409:  # 409: not running
                raise

    def cancel(self, submission_id: str, shard_id: str | None = None) -> int:
        if not submission_id:
            raise ValueError("cancel needs a submission id")
        containers = self.client.api.containers(filters={"label": self._labels(submission_id, shard_id),
                                                          "status": "running"})
        for container in containers:
            self.kill(container["Id"])
        return len(containers)

    def remove_leftovers(self, submission_id: str, shard_id: str) -> int:
        if not submission_id:
            raise ValueError("remove_leftovers needs a submission id")
        removed = 0
        for container in self.client.api.containers(all=True, filters={"label": self._labels(submission_id, shard_id)}):
            try:
                self.client.api.remove_container(container["Id"], force=True)
                removed += 1
            except docker.errors.NotFound:
                pass
        return removed

    # -- running ---------------------------------------------------------------------------------
    def run(self, spec: RunSpec) -> RunResult:
        kwargs = sandbox.container_kwargs(spec, deployment_id=self.deployment_id)
        name = kwargs["name"]
        try:
            container = self.client.containers.create(**kwargs)
        except docker.errors.ImageNotFound:
            raise ImageRejected(FailureReason.image_load_failed(f"no image {spec.image!r} on this worker")) from None
        try:
            return self._run_created(container, spec, name)
        finally:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
            except _ENGINE_ERRORS:
                # the engine is gone: the next attempt removes this container by its labels
                log.warning("could not remove container %s (engine unavailable)", name)

    def _wait_until(self, container: Any, deadline: float) -> bool:
        """Wait for the container to exit until ``deadline`` (monotonic); True when it exited.
        A wait that ends without an answer is told apart from a dead engine by a ping."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                container.wait(timeout=min(remaining, WAIT_CHUNK_S))
                return True
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError) as exc:
                if not self.ping():
                    raise EngineUnavailable(f"the container engine stopped answering ({type(exc).__name__})") from exc

    def _stop(self, container: Any, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` whatever the container does with the first."""
        try:
            self.client.api.kill(container.id, signal="SIGTERM")
        except docker.errors.APIError:
            pass
        if grace_s > 0 and self._wait_until(container, time.monotonic() + grace_s):
            return
        if not stop_now(container.id):
            self.kill(container.id)
        if not self._wait_until(container, time.monotonic() + KILL_GRACE_S):
            self.kill(container.id)

    def _run_created(self, container: Any, spec: RunSpec, name: str) -> RunResult:
        limits = spec.limits
        gpu = GpuMemoryMonitor(spec.gpu_device_ids, nvml=self._nvml)
        gpu_active = gpu.start()
        started_wall = time.time()
        try:
            container.start()
        except docker.errors.APIError:
            # e.g. no GPU driver for the device request, a vanished input folder: the caller retries
            if gpu_active:
                gpu.stop()
            raise
        start = time.monotonic()
        memory = CgroupMemoryMonitor(container.id)
        pids = CgroupPidsMonitor(container.id)
        finished = threading.Event()

        def stop_for_output(_usage: TreeUsage) -> None:
            # at once: nothing more may be written while the engine is asked
            if not stop_now(container.id):
                try:
                    self.kill(container.id)
                except _ENGINE_ERRORS:
                    pass

        watcher = OutputWatcher(spec.output_dir, spec.case_ids, start, max_bytes=limits.output_bytes,
                                max_entries=limits.output_files, max_depth=limits.output_depth,
                                on_exceeded=stop_for_output)
        watch_thread = threading.Thread(target=watcher.run, args=(finished,), name="touchstone-output", daemon=True)
        watch_thread.start()
        sampler = PeriodicSampler([memory, pids] + ([gpu] if gpu_active else [])).start()
        timed_out = False
        try:
            if not self._wait_until(container, start + spec.time_limit_s):
                timed_out = watcher.exceeded is None  # the output guard may have stopped it just now
                self._stop(container, spec.stop_grace_s)
        finally:
            finished.set()
            duration = time.monotonic() - start
            sampler.stop()
            gpu_stats = gpu.stop() if gpu_active else None
            watch_thread.join(timeout=5)
            try:
                watcher.sample()  # the files of the last moments (arrival times)
            except Exception:  # noqa: BLE001
                pass
        container.reload()
        state = container.attrs.get("State", {})
        exit_code = state.get("ExitCode")
        oom_killed = bool(state.get("OOMKilled")) or memory.oom_kills > 0
        # and again after the exit: what the last walk could not see (written in its final moments)
        after = measure_tree(spec.output_dir, limits.output_bytes, limits.output_files, limits.output_depth)
        broken = watcher.exceeded or (after if after.exceeded else None)
        killed_by_us = timed_out or watcher.exceeded is not None
        # SIGKILL from outside (exit 137, no OOM): a cancel, possibly from another process?
        cancelled = (not killed_by_us and not oom_killed and exit_code == 137
                     and self._was_killed(container.id, started_wall))
        log_tail = _LogTail(limits.log_bytes).feed(container.logs(stream=True, follow=False))
        pids_hit = pids.refused > 0

        failure: FailureReason | None
        if cancelled:
            failure = FailureReason.cancelled()
        elif broken is not None:
            failure = output_failure(broken, limits)
        elif timed_out:
            failure = (FailureReason.pids_limit(limits.pids) if pids_hit
                       else FailureReason.time_limit(spec.time_limit_s, len(spec.case_ids) or None))
        elif oom_killed and exit_code != 0:
            failure = FailureReason.out_of_memory(limits.memory_bytes)
        elif exit_code != 0:
            failure = FailureReason.pids_limit(limits.pids) if pids_hit else FailureReason.nonzero_exit(exit_code)
        elif after.entries == 0:
            failure = FailureReason.no_output()
        else:
            failure = None
        return RunResult(
            container_name=name,
            exit_code=exit_code,
            timed_out=timed_out,
            oom_killed=oom_killed,
            cancelled=cancelled,
            output_too_large=broken is not None,
            duration_s=duration,
            # an OOM kill means the cgroup reached its limit, even when that happened after the
            # last 0.1 s sample (a fast allocator): the peak is the limit then
            peak_memory_bytes=(max(memory.peak_bytes or 0, spec.limits.memory_bytes) if oom_killed
                               else memory.peak_bytes),
            gpu=gpu_stats,
            log_tail=log_tail,
            output_seen_s=dict(watcher.seen_s),
            failure=failure,
            pids_limit_hit=pids_hit,
            output_bytes=after.bytes,
            output_entries=after.entries,
        )

    def _was_killed(self, container_id: str, since: float) -> bool:
        """Whether anybody sent the container a kill (the engine's event log)."""
        try:
            events = self.client.api.events(
                since=f"{since - 1:.6f}", until=f"{time.time():.6f}",
                filters={"container": container_id, "event": "kill"}, decode=True,
            )
            return any(True for _ in events)
        except docker.errors.APIError:
            return False

