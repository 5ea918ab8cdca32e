"""measure_tree (any depth, early exit, entry types), the watcher's interval, prune_outputs and
delete_tree: the pure parts of the output limits."""

from __future__ import annotations

import os

from worker.monitoring import OutputWatcher, measure_tree
from worker.outputs import CaseOutput, OutputReport, delete_tree, prune_outputs


def _write(path, size=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_measure_tree_counts_at_any_depth(tmp_path):
    _write(tmp_path / "a" / "combined_labels.nii.gz", 10)
    _write(tmp_path / "x" / "y" / "z" / "fill.bin", 3000)  # three folders deeper than the contract
    usage = measure_tree(tmp_path)
    assert usage.bytes == 3010 and usage.entries == 6 and usage.depth == 4 and usage.exceeded is None
    assert measure_tree(tmp_path, max_bytes=3000).exceeded == "bytes"
    assert measure_tree(tmp_path, max_entries=5).exceeded == "files"
    assert measure_tree(tmp_path, max_depth=3).exceeded == "depth"


def test_measure_tree_stops_early_and_refuses_links_and_fifos(tmp_path):
    for i in range(50):
        _write(tmp_path / "junk" / f"{i}.txt")
    assert measure_tree(tmp_path, max_entries=10).entries == 11  # looked at no more than needed
    (tmp_path / "deep").mkdir()
    os.symlink("/etc/passwd", tmp_path / "deep" / "link")
    usage = measure_tree(tmp_path / "deep")
    assert usage.exceeded == "entry" and "symbolic link" in usage.forbidden and "/output/link" in usage.forbidden
    os.mkfifo(tmp_path / "fifo-dir-fifo")
    fifo_dir = tmp_path / "f"
    fifo_dir.mkdir()
    os.replace(tmp_path / "fifo-dir-fifo", fifo_dir / "pipe")
    assert "FIFO" in measure_tree(fifo_dir).forbidden
    _write(tmp_path / "h" / "one")
    os.link(tmp_path / "h" / "one", tmp_path / "h" / "two")
    assert "hard link" in measure_tree(tmp_path / "h").forbidden


def test_watcher_fires_once_and_polls_faster_near_a_small_cap(tmp_path):
    fired = []
    small = OutputWatcher(tmp_path, ["a"], 0.0, max_bytes=5 * 2**20, max_entries=1000, on_exceeded=fired.append)
    small.sample()
    assert small.next_interval_s() <= 0.003  # 5 MiB at 2 GiB/s: every few ms
    large = OutputWatcher(tmp_path, ["a"], 0.0, max_bytes=2 * 2**30, max_entries=None)
    large.sample()
    assert large.next_interval_s() == 0.1
    _write(tmp_path / "a" / "big.bin", 5 * 2**20)
    small.sample()
    small.sample()
    assert small.exceeded is not None and len(fired) == 1


def test_prune_keeps_only_valid_contract_files(tmp_path):
    out = tmp_path / "output"
    _write(out / "a" / "combined_labels.nii.gz", 100)
    _write(out / "b" / "segmentations" / "liver.nii.gz", 50)
    _write(out / "b" / "segmentations" / "notes.txt", 7)
    _write(out / "c" / "combined_labels.nii.gz", 30)  # an invalid case: its file goes too
    _write(out / "x" / "y" / "z" / "fill.bin", 4000)
    os.symlink("/etc/passwd", out / "a" / "link")
    report = OutputReport({
        "a": CaseOutput("a", "ok", "", "combined", ("a/combined_labels.nii.gz",)),
        "b": CaseOutput("b", "ok", "", "per_organ", ("b/segmentations/liver.nii.gz",), ("liver",)),
        "c": CaseOutput("c", "invalid", "bad"),
    })
    kept, removed = prune_outputs(out, report)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir())
    assert left == ["a/combined_labels.nii.gz", "b/segmentations/liver.nii.gz"]
    assert kept == 150 and removed == 4037
    assert delete_tree(out) == 150 and not out.exists() and delete_tree(out) == 0
