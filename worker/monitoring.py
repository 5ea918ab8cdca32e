"""Resource monitoring of one container run: cgroup peak memory, NVML GPU memory, output arrival.

Each monitor is a small object with ``sample()`` (one measurement, safe to call from any thread)
and a result; :class:`PeriodicSampler` calls ``sample()`` every ``interval_s`` on a daemon thread
while the container runs. Every monitor degrades cleanly: no cgroup file, no GPU, no ``pynvml``
→ the figure is ``None`` and nothing raises.

- Memory: the kernel's own watermark of the container's memory cgroup
  (v1 ``memory.max_usage_in_bytes``; v2 ``memory.peak``, else ``memory.current``), read every
  0.1 s, maximum kept. Only the last < 0.1 s before exit can escape it (the cgroup vanishes with
  the container). Also the cgroup's OOM-kill counter, so an OOM kill of a child process is seen.
- GPU: NVML device memory in use, sampled every 0.1 s (FLARE's definition), peak and area under
  the memory–time curve (see :class:`worker.runtime.base.GpuStats`).
- Outputs: the whole of ``/output`` is walked (:func:`measure_tree`: any depth, never following a
  link, stopping early at a broken limit) at an interval derived from the headroom left to the
  output limits (:class:`OutputWatcher`); a case's time is when its most recent new file first
  appeared, in seconds after the container start (see :func:`worker.runtime.base.per_case_wall_times`).
- Processes: the ``max`` counter of the pids cgroup's ``pids.events`` (forks the limit refused).
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.runtime.base import GpuStats

SAMPLE_INTERVAL_S = 0.1
#: the fastest a container is assumed to write to /output (bytes/s, files/s) when the watcher
#: chooses its next interval: a writer may start at full speed right after a quiet walk
ASSUMED_BYTES_PER_S = 2 * 2**30
ASSUMED_ENTRIES_PER_S = 100_000
CGROUP_ROOT = Path("/sys/fs/cgroup")


class PeriodicSampler:
    """Calls each ``sample()`` every ``interval_s`` seconds on one daemon thread until stopped.

    A sampler that raises is dropped (monitoring must never break a run)."""

    def __init__(self, samplers: Iterable[Any], interval_s: float = SAMPLE_INTERVAL_S):
        self._samplers = list(samplers)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="touchstone-monitor", daemon=True)

    def start(self) -> PeriodicSampler:
        self._thread.start()
        return self

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            for sampler in list(self._samplers):
                try:
                    sampler.sample()
                except Exception:  # noqa: BLE001 - a broken monitor is dropped, the run goes on
                    self._samplers.remove(sampler)
            next_at += self._interval_s
            self._stop.wait(max(next_at - time.monotonic(), 0.0))

    def stop(self) -> None:
        """Stop the thread and take one last sample of each monitor."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for sampler in self._samplers:
            try:
                sampler.sample()
            except Exception:  # noqa: BLE001
                pass


# --------------------------------------------------------------------------------------------------
# memory: cgroup


def cgroup_dirs(container_id: str, root: Path = CGROUP_ROOT) -> dict[str, Path]:
    """The container's cgroup folders: ``{"memory": ..., "pids": ...}`` for whichever exist.

    Looks where the engine puts them with the cgroupfs and systemd drivers, for cgroup v1
    (``memory/docker/<id>``) and v2 (``docker/<id>``, ``system.slice/docker-<id>.scope``).
    """
    found: dict[str, Path] = {}
    for controller in ("memory", "pids"):
        candidates = [
            root / controller / "docker" / container_id,  # v1, cgroupfs driver
            root / controller / "system.slice" / f"docker-{container_id}.scope",  # v1, systemd
            root / "docker" / container_id,  # v2, cgroupfs driver
            root / "system.slice" / f"docker-{container_id}.scope",  # v2, systemd
        ]
        for candidate in candidates:
            if candidate.is_dir():
                found[controller] = candidate
                break
    return found


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None  # "max"


def _read_keyed(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


class CgroupMemoryMonitor:
    """Peak memory (bytes) and OOM kills of one container, from its memory cgroup."""

    def __init__(self, container_id: str, root: Path = CGROUP_ROOT):
        self.container_id = container_id
        self._root = root
        self._dir: Path | None = None
        self.peak_bytes: int | None = None
        self.oom_kills = 0
        self._lock = threading.Lock()

    def _memory_dir(self) -> Path | None:
        if self._dir is None:
            self._dir = cgroup_dirs(self.container_id, self._root).get("memory")
        return self._dir

    def sample(self) -> None:
        directory = self._memory_dir()
        if directory is None:
            return
        value = None
        for name in ("memory.max_usage_in_bytes", "memory.peak", "memory.current"):
            value = _read_int(directory / name)
            if value is not None:
                break
        oom = _read_keyed(directory / "memory.oom_control", "oom_kill")
        if oom is None:
            oom = _read_keyed(directory / "memory.events", "oom_kill")
        with self._lock:
            if value is not None:
                self.peak_bytes = value if self.peak_bytes is None else max(self.peak_bytes, value)
            if oom is not None:
                self.oom_kills = max(self.oom_kills, oom)


# --------------------------------------------------------------------------------------------------
# GPU: NVML


def load_nvml() -> Any | None:
    """The ``pynvml`` module (package nvidia-ml-py), or None where it is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class GpuMemoryMonitor:
    """Device memory in use on the run's GPUs, sampled by NVML (FLARE: every 0.1 s).

    ``nvml`` is the ``pynvml`` module or anything with its interface (``nvmlInit``,
    ``nvmlShutdown``, ``nvmlDeviceGetHandleByIndex``, ``nvmlDeviceGetHandleByUUID``,
    ``nvmlDeviceGetMemoryInfo(handle).used``); tests pass a fake. ``start()`` returns False — and
    :meth:`stats` then gives None — when there are no devices, no NVML library or no driver.
    """

    def __init__(
        self,
        device_ids: Sequence[str] | None,
        nvml: Any | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = SAMPLE_INTERVAL_S,
    ):
        self.device_ids = tuple(device_ids or ())
        self._nvml = nvml
        self._clock = clock
        self.interval_s = interval_s
        self._handles: list[Any] = []
        self._active = False
        self._lock = threading.Lock()
        self._samples = 0
        self._peak = 0
        self._area = 0.0
        self._last_t: float | None = None
        self._baseline = 0

    def start(self) -> bool:
        """Initialise NVML, resolve the devices, record the baseline and the start time."""
        if not self.device_ids:
            return False
        nvml = self._nvml if self._nvml is not None else load_nvml()
        if nvml is None:
            return False
        try:
            nvml.nvmlInit()
        except Exception:  # noqa: BLE001 - NVMLError: no driver / no GPU
            return False
        try:
            self._handles = [self._handle(nvml, device) for device in self.device_ids]
            self._nvml = nvml
            self._baseline = self._used()
        except Exception:  # noqa: BLE001
            self._shutdown(nvml)
            return False
        self._last_t = self._clock()
        self._active = True
        return True

    @staticmethod
    def _handle(nvml: Any, device: str) -> Any:
        if device.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(device))
        return nvml.nvmlDeviceGetHandleByUUID(device)

    def _used(self) -> int:
        return int(sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles))

    def sample(self) -> None:
        """One sample: ``used(t)``; the area grows by ``used(t) · (t − t_previous)``."""
        if not self._active:
            return
        used = self._used()
        now = self._clock()
        with self._lock:
            assert self._last_t is not None
            self._area += used * max(now - self._last_t, 0.0)
            self._last_t = now
            self._samples += 1
            self._peak = max(self._peak, used)

    def stop(self) -> GpuStats | None:
        """Shut NVML down and return the statistics (None if monitoring never started)."""
        if not self._active:
            return None
        self._active = False
        self._shutdown(self._nvml)
        return self.stats()

    def stats(self) -> GpuStats | None:
        if self._last_t is None:
            return None
        with self._lock:
            return GpuStats(
                device_ids=self.device_ids,
                interval_s=self.interval_s,
                samples=self._samples,
                peak_bytes=self._peak,
                area_byte_s=self._area,
                baseline_bytes=self._baseline,
            )

    @staticmethod
    def _shutdown(nvml: Any) -> None:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------------------------------
# outputs: the whole tree, its limits, arrival times


@dataclass
class TreeUsage:
    """What a folder holds, at any depth, measured without following a link.

    ``entries`` counts files *and* folders (every inode the container made), ``bytes`` the sum of the files' apparent sizes (a sparse file counts at its full size),
    ``depth`` the deepest level (``a`` = 1, ``a/b`` = 2). ``exceeded`` names the first limit the walk
    found broken (``"bytes"``, ``"files"``, ``"depth"``, ``"entry"`` for a link, device, FIFO or
    socket; ``forbidden`` then says which) -- the walk stops there, so the figures are lower bounds.
    """

    bytes: int = 0
    entries: int = 0
    depth: int = 0
    exceeded: str | None = None
    forbidden: str | None = None
    files: list[tuple[str, float]] = field(default_factory=list)  # (relative path, mtime) of regular files


def entry_kind(mode: int) -> str | None:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return None


def measure_tree(root: Path | str, max_bytes: int | None = None, max_entries: int | None = None,
                 max_depth: int | None = None, collect_files: bool = False) -> TreeUsage:
    """Walk ``root`` with ``os.scandir`` (iteratively, never following links) and sum it up; stop
    at the first broken limit (a limit of None is not checked). Cost: one ``lstat`` per entry, and
    never more than ``max_entries + 1`` entries are looked at."""
    usage = TreeUsage()
    stack: list[tuple[str, str, int]] = [(str(root), "", 1)]
    while stack:
        directory, relative, depth = stack.pop()
        try:
            iterator = os.scandir(directory)
        except OSError:
            continue
        with iterator:
            for entry in iterator:
                rel = f"{relative}/{entry.name}" if relative else entry.name
                usage.entries += 1
                if depth > usage.depth:
                    usage.depth = depth
                if max_entries is not None and usage.entries > max_entries:
                    usage.exceeded = "files"
                    return usage
                if max_depth is not None and depth > max_depth:
                    usage.exceeded = "depth"
                    return usage
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished meanwhile
                if stat.S_ISDIR(st.st_mode):
                    stack.append((entry.path, rel, depth + 1))
                    continue
                kind = entry_kind(st.st_mode)
                if kind is None and st.st_nlink > 1:
                    kind = "a hard link"
                if kind is not None:
                    usage.exceeded, usage.forbidden = "entry", f"{kind} (/output/{rel})"
                    return usage
                usage.bytes += st.st_size
                if collect_files:
                    usage.files.append((rel, st.st_mtime))
                # reaching the cap counts: a file stopped there by RLIMIT_FSIZE is one that wanted more
                if max_bytes is not None and usage.bytes >= max_bytes:
                    usage.exceeded = "bytes"
                    return usage
    return usage


class OutputWatcher:
    """Watches an output folder while the container writes into it: the whole tree, at any depth.

    ``seen_s[case_id]``: seconds after ``start`` when the most recent new file of that case first
    appeared. ``usage``: the last :func:`measure_tree` of the folder against the run's limits
    (bytes, files and folders, depth, entry types); ``exceeded`` is set (and ``on_exceeded`` called
    once, from the sampling thread) as soon as one is broken.

    :meth:`next_interval_s` is how long to wait before the next walk: a quarter of the time the
    writer would need to reach the nearest limit at the faster of its observed rate and
    :data:`ASSUMED_BYTES_PER_S` / :data:`ASSUMED_ENTRIES_PER_S` -- between ``min_interval_s`` (and
    twice the walk's own duration) and ``max_interval_s``. A run with a 2 GiB cap is walked ten
    times a second until it nears the cap; one with a 5 MiB cap every 2 ms.
    """

    def __init__(self, output_dir: Path, case_ids: Iterable[str], start: float,
                 clock: Callable[[], float] = time.monotonic, max_bytes: int | None = None,
                 max_entries: int | None = 100_000, max_depth: int | None = None,
                 on_exceeded: Callable[[TreeUsage], None] | None = None,
                 min_interval_s: float = 0.002, max_interval_s: float = SAMPLE_INTERVAL_S):
        self.output_dir = Path(output_dir)
        self.case_ids = set(case_ids)
        self.start = start
        self._clock = clock
        self.max_bytes, self.max_entries, self.max_depth = max_bytes, max_entries, max_depth
        self.on_exceeded = on_exceeded
        self.min_interval_s, self.max_interval_s = min_interval_s, max_interval_s
        self.seen_s: dict[str, float] = {}
        self.total_bytes = 0
        self.usage = TreeUsage()
        self.exceeded: TreeUsage | None = None
        self.samples = 0
        self._known: set[str] = set()
        self._last: tuple[float, int, int] | None = None
        self._interval = min_interval_s
        self._lock = threading.Lock()

    def sample(self) -> None:
        now = self._clock()
        walk_started = time.monotonic()
        usage = measure_tree(self.output_dir, self.max_bytes, self.max_entries, self.max_depth, collect_files=True)
        walk_s = time.monotonic() - walk_started
        fire = False
        with self._lock:
            self.samples += 1
            self.usage, self.total_bytes = usage, usage.bytes
            for rel, _mtime in usage.files:
                if rel in self._known:
                    continue
                self._known.add(rel)
                case_id = rel.split("/", 1)[0]
                if "/" in rel and case_id in self.case_ids:
                    self.seen_s[case_id] = now - self.start
            if usage.exceeded and self.exceeded is None:
                self.exceeded, fire = usage, True
            self._interval = self._next_interval(now, usage, walk_s)
            self._last = (now, usage.bytes, usage.entries)
        if fire and self.on_exceeded is not None:
            self.on_exceeded(usage)

    def _next_interval(self, now: float, usage: TreeUsage, walk_s: float) -> float:
        """A quarter of the time to the nearest limit at the faster of the observed rate and an
        assumed worst case (a writer can go from nothing to full speed between two walks), never
        less than ``min_interval_s`` nor than twice the walk itself (bounded CPU), never more than
        ``max_interval_s``."""
        elapsed = max(now - self._last[0], 1e-6) if self._last else None
        horizon = float("inf")
        for limit, value, index, worst in ((self.max_bytes, usage.bytes, 1, ASSUMED_BYTES_PER_S),
                                           (self.max_entries, usage.entries, 2, ASSUMED_ENTRIES_PER_S)):
            if limit is None:
                continue
            rate = worst
            if self._last is not None and elapsed is not None:
                rate = max(rate, (value - self._last[index]) / elapsed)
            horizon = min(horizon, max(limit - value, 0) / rate)
        return min(max(horizon / 4, self.min_interval_s, 2 * walk_s), self.max_interval_s)

    def next_interval_s(self) -> float:
        with self._lock:
            return self._interval

    def run(self, stop: threading.Event) -> None:
        """Sample until ``stop`` is set or a limit is broken (a thread's target)."""
        while not stop.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - monitoring must never break a run
                pass
            if self.exceeded is not None:
                return
            stop.wait(self.next_interval_s())


class CgroupPidsMonitor:
    """Whether the container's pids cgroup refused a fork: the ``max`` counter of ``pids.events``
    (cgroup v1 and v2) grows each time the limit stops a new process or thread."""

    def __init__(self, container_id: str, root: Path = CGROUP_ROOT):
        self.container_id = container_id
        self._root = root
        self._dir: Path | None = None
        self.refused = 0

    def sample(self) -> None:
        if self._dir is None:
            self._dir = cgroup_dirs(self.container_id, self._root).get("pids")
            if self._dir is None:
                return
        value = _read_keyed(self._dir / "pids.events", "max")
        if value is not None:
            self.refused = max(self.refused, value)


def _freezer_files(container_id: str, root: Path, frozen: bool) -> list[tuple[Path, str]]:
    """The freezer file of a container's cgroup under each layout Docker uses (v1
    ``freezer.state``, v2 ``cgroup.freeze``; cgroupfs or systemd driver) and the value to write."""
    v1, v2 = ("FROZEN", "1") if frozen else ("THAWED", "0")
    return [
        (root / "freezer" / "docker" / container_id / "freezer.state", v1),
        (root / "freezer" / "system.slice" / f"docker-{container_id}.scope" / "freezer.state", v1),
        (root / "docker" / container_id / "cgroup.freeze", v2),
        (root / "system.slice" / f"docker-{container_id}.scope" / "cgroup.freeze", v2),
    ]


def freeze(container_id: str, root: Path = CGROUP_ROOT) -> bool:
    """Freeze every process of a container at once through its cgroup, so that nothing more is
    written while the engine is asked to kill it. False when the cgroup cannot be written (not
    root, another layout)."""
    for path, value in _freezer_files(container_id, root, frozen=True):
        try:
            path.write_text(value)
            return True
        except OSError:
            continue
    return False


def thaw(container_id: str, root: Path = CGROUP_ROOT) -> None:
    """Undo :func:`freeze` (a frozen process cannot act on its SIGKILL until thawed)."""
    for path, value in _freezer_files(container_id, root, frozen=False):
        try:
            path.write_text(value)
        except OSError:
            continue


def stop_now(container_id: str, root: Path = CGROUP_ROOT) -> bool:
    """Stop a container's processes at once: freeze its cgroup (nothing more is written), SIGKILL
    every process in it, thaw (the pending SIGKILL then ends each one before it runs again).
    Needs write access to the cgroup (a root worker); False when it could not be done, and the
    caller falls back to the engine's kill."""
    if not freeze(container_id, root):
        return False
    try:
        for group in (root / "freezer" / "docker" / container_id,
                      root / "freezer" / "system.slice" / f"docker-{container_id}.scope",
                      root / "docker" / container_id,
                      root / "system.slice" / f"docker-{container_id}.scope"):
            try:
                pids = [int(line) for line in (group / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                continue
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            return True
        return False
    finally:
        thaw(container_id, root)
