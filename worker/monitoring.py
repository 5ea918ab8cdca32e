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
- Outputs: the per-case folders of ``/output`` are listed every 0.1 s; a case's time is when its
  most recent new file first appeared, in seconds after the container start (see
  :func:`worker.runtime.base.per_case_wall_times`). The listing never follows links, looks only
  two levels deep, and also sums file sizes so the run can be stopped when it writes too much.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from worker.runtime.base import GpuStats

SAMPLE_INTERVAL_S = 0.1
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
# outputs: arrival times and size


class OutputWatcher:
    """Watches an output folder while the container writes into it.

    ``seen_s[case_id]``: seconds after ``start`` when the most recent new file of that case first
    appeared (a file under ``<case_id>/`` or ``<case_id>/segmentations/``). ``total_bytes``: the
    sum of the sizes of every regular file found (two levels of folders below the case folders
    are not listed: the contract puts nothing there, and the check after the run rejects them).
    At most ``max_entries`` entries are listed per sample, so a container that writes millions of
    files cannot stall the worker.
    """

    def __init__(self, output_dir: Path, case_ids: Iterable[str], start: float,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = 100_000):
        self.output_dir = Path(output_dir)
        self.case_ids = set(case_ids)
        self.start = start
        self._clock = clock
        self.max_entries = max_entries
        self.seen_s: dict[str, float] = {}
        self.total_bytes = 0
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def sample(self) -> None:
        now = self._clock() - self.start
        total = 0
        budget = self.max_entries
        new: list[str] = []

        def scan(directory: str, relative: str, depth: int) -> None:
            nonlocal total, budget
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        budget -= 1
                        if budget < 0:
                            return
                        rel = f"{relative}/{entry.name}" if relative else entry.name
                        if entry.is_dir(follow_symlinks=False):
                            if depth < 2:
                                scan(entry.path, rel, depth + 1)
                            continue
                        try:
                            total += entry.stat(follow_symlinks=False).st_size
                        except OSError:
                            continue
                        if rel not in self._known:
                            new.append(rel)
            except OSError:
                return

        scan(str(self.output_dir), "", 0)
        with self._lock:
            self.total_bytes = total
            for rel in new:
                self._known.add(rel)
                case_id = rel.split("/", 1)[0]
                if "/" in rel and case_id in self.case_ids:
                    self.seen_s[case_id] = now
