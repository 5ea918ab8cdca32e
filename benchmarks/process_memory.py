"""Peak resident memory of running processes, sampled (the benchmarks' one memory probe).

``MemorySampler`` watches named process trees (a root pid and its descendants, found again at
every sample so pool processes started later are counted) from a background thread with psutil,
every ``interval_s`` seconds. Per tree it keeps the peak of every process's RSS, the peak of the
tree's total and the series of totals (to see whether memory grows during a run). RSS counts
pages shared with the parent after fork (copy-on-write) in every child, so a tree's total
overstates what it costs the machine; the per-process peak is what one worker needs.

Sampling misses peaks shorter than the interval; ``psutil.Process.memory_info().rss`` is the
kernel's ``VmRSS`` of ``/proc/<pid>/status``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil

MIB = 1 << 20


@dataclass
class TreeMemory:
    """What was seen of one process tree."""

    name: str
    root_pid: int
    peak_process_rss: dict[int, int] = field(default_factory=dict)  # pid -> peak RSS (bytes)
    process_names: dict[int, str] = field(default_factory=dict)
    peak_total_rss: int = 0
    totals: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, total RSS)

    @property
    def peak_rss(self) -> int:
        """Largest RSS any one process of the tree had."""
        return max(self.peak_process_rss.values(), default=0)

    def total_at(self, fraction: float) -> int:
        """The tree's total RSS at ``fraction`` (0..1) of the sampled time span."""
        if not self.totals:
            return 0
        end = self.totals[-1][0]
        for moment, total in self.totals:
            if moment >= fraction * end:
                return total
        return self.totals[-1][1]


class MemorySampler:
    """``with MemorySampler({"api": pid, ...}) as sampler: ...``; then ``sampler.trees[name]``."""

    def __init__(self, roots: dict[str, int], interval_s: float = 0.2):
        self.trees = {name: TreeMemory(name, pid) for name, pid in roots.items()}
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._started = time.perf_counter()

    def add(self, name: str, pid: int) -> None:
        """Watch another tree from now on."""
        self.trees[name] = TreeMemory(name, pid)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        now = time.perf_counter() - self._started
        for tree in list(self.trees.values()):
            try:
                root = psutil.Process(tree.root_pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue  # gone (stopped or killed)
            total = 0
            for process in processes:
                try:
                    rss = process.memory_info().rss
                    if process.pid not in tree.process_names:
                        tree.process_names[process.pid] = " ".join(process.cmdline()[:6])[:120]
                except psutil.Error:
                    continue
                total += rss
                if rss > tree.peak_process_rss.get(process.pid, 0):
                    tree.peak_process_rss[process.pid] = rss
            tree.peak_total_rss = max(tree.peak_total_rss, total)
            tree.totals.append((now, total))


def mib(n_bytes: int) -> float:
    return n_bytes / MIB
