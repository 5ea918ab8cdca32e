"""Monitoring through its interface: NVML (with a fake), cgroup files, output arrival."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from worker.monitoring import CgroupMemoryMonitor, GpuMemoryMonitor, OutputWatcher, PeriodicSampler, cgroup_dirs


class FakeNVML:
    """The part of pynvml the monitor uses; ``used`` is a list of readings per device, consumed in order."""

    class NVMLError(Exception):
        pass

    def __init__(self, used: dict[int, list[int]], fail_init: bool = False):
        self.used = {k: list(v) for k, v in used.items()}
        self.fail_init = fail_init
        self.initialised = 0
        self.shutdowns = 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")
        self.initialised += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        if index not in self.used:
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return int(uuid.rsplit("-", 1)[1])

    def nvmlDeviceGetMemoryInfo(self, handle):
        readings = self.used[handle]
        value = readings.pop(0) if len(readings) > 1 else readings[0]
        return SimpleNamespace(used=value, total=80 * 2**30, free=0)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_gpu_peak_and_area_follow_flare_definition():
    # baseline read at start, then 4 samples 0.1 s apart
    nvml = FakeNVML({0: [500, 1000, 3000, 2000, 1000]})
    clock = FakeClock()
    monitor = GpuMemoryMonitor(["0"], nvml=nvml, clock=clock)
    assert monitor.start()
    for _ in range(4):
        clock.t += 0.1
        monitor.sample()
    stats = monitor.stop()
    assert stats.baseline_bytes == 500
    assert stats.samples == 4
    assert stats.peak_bytes == 3000
    assert stats.area_byte_s == pytest.approx(0.1 * (1000 + 3000 + 2000 + 1000))
    assert stats.device_ids == ("0",) and stats.interval_s == 0.1
    assert nvml.shutdowns == 1


def test_gpu_area_uses_actual_sampling_times_and_sums_devices():
    nvml = FakeNVML({0: [0, 100], 1: [0, 50]})
    clock = FakeClock()
    monitor = GpuMemoryMonitor(["0", "GPU-uuid-1"], nvml=nvml, clock=clock)
    assert monitor.start()
    clock.t += 0.25  # a late sample counts for 0.25 s
    monitor.sample()
    stats = monitor.stop()
    assert stats.peak_bytes == 150
    assert stats.area_byte_s == pytest.approx(150 * 0.25)


def test_gpu_monitor_degrades_without_gpu_driver_or_devices():
    assert GpuMemoryMonitor(None, nvml=FakeNVML({0: [1]})).start() is False
    assert GpuMemoryMonitor([], nvml=FakeNVML({0: [1]})).start() is False
    no_driver = GpuMemoryMonitor(["0"], nvml=FakeNVML({0: [1]}, fail_init=True))
    assert no_driver.start() is False
    no_driver.sample()  # harmless
    assert no_driver.stop() is None
    missing_device = FakeNVML({0: [1]})
    monitor = GpuMemoryMonitor(["3"], nvml=missing_device)
    assert monitor.start() is False and missing_device.shutdowns == 1


def test_gpu_monitor_degrades_without_pynvml(monkeypatch):
    import worker.monitoring as monitoring

    monkeypatch.setattr(monitoring, "load_nvml", lambda: None)
    monitor = GpuMemoryMonitor(["0"])
    assert monitor.start() is False and monitor.stop() is None


def test_periodic_sampler_samples_every_interval_with_real_thread():
    nvml = FakeNVML({0: [0] + [10, 70, 30] * 1000})
    monitor = GpuMemoryMonitor(["0"], nvml=nvml)
    assert monitor.start()
    sampler = PeriodicSampler([monitor], interval_s=0.01).start()
    time.sleep(0.2)
    sampler.stop()
    stats = monitor.stop()
    assert stats.samples >= 5
    assert stats.peak_bytes == 70


def test_periodic_sampler_drops_a_broken_monitor():
    calls = []

    class Broken:
        def sample(self):
            raise RuntimeError("boom")

    class Counting:
        def sample(self):
            calls.append(1)

    sampler = PeriodicSampler([Broken(), Counting()], interval_s=0.01).start()
    time.sleep(0.05)
    sampler.stop()
    assert len(calls) >= 2


def _fake_cgroup(root, layout: str, cid: str, **files):
    directory = {
        "v1": root / "memory" / "docker" / cid,
        "v2": root / "docker" / cid,
        "v2-systemd": root / "system.slice" / f"docker-{cid}.scope",
    }[layout]
    directory.mkdir(parents=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text)
    return directory


def test_cgroup_v1_peak_is_the_max_of_watermark_readings(tmp_path):
    directory = _fake_cgroup(tmp_path, "v1", "abc", memory_max_usage_in_bytes="1000\n",
                             memory_oom_control="oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    monitor = CgroupMemoryMonitor("abc", root=tmp_path)
    monitor.sample()
    (directory / "memory.max_usage_in_bytes").write_text("5000\n")
    monitor.sample()
    (directory / "memory.max_usage_in_bytes").write_text("3000\n")
    (directory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    monitor.sample()
    assert monitor.peak_bytes == 5000 and monitor.oom_kills == 2


def test_cgroup_v2_reads_peak_and_events(tmp_path):
    _fake_cgroup(tmp_path, "v2-systemd", "abc", memory_peak="7777\n", memory_events="low 0\noom 1\noom_kill 1\n")
    monitor = CgroupMemoryMonitor("abc", root=tmp_path)
    monitor.sample()
    assert monitor.peak_bytes == 7777 and monitor.oom_kills == 1
    assert set(cgroup_dirs("abc", tmp_path)) == {"memory", "pids"}


def test_cgroup_missing_gives_none(tmp_path):
    monitor = CgroupMemoryMonitor("nope", root=tmp_path)
    monitor.sample()
    assert monitor.peak_bytes is None and monitor.oom_kills == 0


def test_output_watcher_times_each_case_by_its_newest_file(tmp_path):
    clock = FakeClock()
    watcher = OutputWatcher(tmp_path, ["a", "b"], start=clock.t, clock=clock)
    (tmp_path / "a" / "segmentations").mkdir(parents=True)
    clock.t += 1.0
    watcher.sample()
    assert watcher.seen_s == {}  # an empty folder is not an output
    (tmp_path / "a" / "segmentations" / "liver.nii.gz").write_bytes(b"x" * 10)
    clock.t += 1.0
    watcher.sample()
    (tmp_path / "a" / "segmentations" / "spleen.nii.gz").write_bytes(b"x" * 5)
    (tmp_path / "stray.txt").write_bytes(b"y" * 100)
    clock.t += 0.5
    watcher.sample()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "combined_labels.nii.gz").write_bytes(b"z")
    clock.t += 1.5
    watcher.sample()
    watcher.sample()  # nothing new: times do not move
    assert watcher.seen_s == pytest.approx({"a": 2.5, "b": 4.0})
    assert watcher.total_bytes == 116


def test_output_watcher_does_not_follow_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"x" * 1000)
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "segmentations").symlink_to(outside)
    watcher = OutputWatcher(out, ["a"], start=0.0)
    watcher.sample()
    assert watcher.total_bytes < 1000
