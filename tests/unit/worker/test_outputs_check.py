"""Checking untrusted outputs (worker/outputs.py): the safety check (layout, kinds, links, sizes)
opens no file; the contents (NIfTI, bomb guard, grid, labels) are read once, by the one scoring
path (score_output -> evaluation.scoring.score_case), which answers a status per organ or case."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from evaluation.io import write_combined_labels, write_ct, write_masks, write_nifti
from evaluation.labels import ORGANS
from evaluation.protocols import load_protocol
from worker.outputs import OutputLimits, check_outputs, score_output
from worker.runtime.base import FailureCode

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
SHAPE = (8, 9, 6)


@pytest.fixture
def cts(tmp_path):
    paths = {}
    for case_id in ("a", "b"):
        paths[case_id] = write_ct(tmp_path / "cts" / case_id, np.zeros(SHAPE), AFFINE)
    return paths


def _labels(value=5):
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 2:5, 1:4] = value
    return labels


def test_both_layouts_pass(tmp_path, cts):
    out = tmp_path / "out"
    write_combined_labels(out / "a", _labels(), AFFINE)
    write_masks(out / "b", _labels(), AFFINE)
    report = check_outputs(out, cts)
    assert report.cases["a"].status == "ok" and report.cases["a"].layout == "combined"
    assert report.cases["a"].files == ("a/combined_labels.nii.gz",)
    assert report.cases["b"].status == "ok" and report.cases["b"].layout == "per_organ"
    assert len(report.cases["b"].organs) == 9
    assert report.failure() is None and report.unexpected == ()


def test_missing_cases_and_stray_entries(tmp_path, cts):
    out = tmp_path / "out"
    write_combined_labels(out / "a", _labels(), AFFINE)
    (out / "notes.txt").write_text("hello")
    (out / "zz").mkdir()
    report = check_outputs(out, cts)
    assert report.cases["b"].status == "missing" and "no folder /output/b" in report.cases["b"].reason
    assert report.unexpected == ("notes.txt (a file)", "zz (a folder)")
    assert report.failure() is None  # case a is usable


def test_nothing_written_is_no_output(tmp_path, cts):
    (tmp_path / "out").mkdir()
    assert check_outputs(tmp_path / "out", cts).failure().code is FailureCode.NO_OUTPUT


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: (d / "combined_labels.nii.gz").symlink_to("/etc/passwd"), "symbolic link"),
        (lambda d: os.mkfifo(d / "combined_labels.nii.gz"), "FIFO"),
        (lambda d: (d / "README").write_text("x"), "unexpected a file a/README"),
        (lambda d: (d / "segmentations").mkdir() or (d / "segmentations" / "brain.nii.gz").write_bytes(b"x"), "brain.nii.gz"),
    ],
)
def test_invalid_outputs_say_why(tmp_path, cts, make, expected):
    case_dir = tmp_path / "out" / "a"
    case_dir.mkdir(parents=True)
    make(case_dir)
    report = check_outputs(tmp_path / "out", cts)
    assert report.cases["a"].status == "invalid"
    assert expected in report.cases["a"].reason
    assert str(tmp_path) not in report.cases["a"].reason  # container paths, not the worker's
    failure = report.failure()
    assert failure.code is FailureCode.INVALID_OUTPUT and "case a" in failure.message


@pytest.fixture
def gt(tmp_path):
    """Ground truth of case a on the CT's grid (organ 5 present)."""
    return write_combined_labels(tmp_path / "gt" / "a", _labels(), AFFINE)


@pytest.mark.parametrize(
    "make, status, expected, organs",
    [
        (lambda d: (d / "combined_labels.nii.gz").write_bytes(b"not a nifti at all"), "unreadable",
         "too short for a NIfTI header", None),
        (lambda d: (d / "combined_labels.nii.gz").write_bytes(gzip.compress(b"\0" * 2000)), "unreadable",
         "not a NIfTI file", None),
        (lambda d: write_combined_labels(d, np.zeros((8, 9, 7), np.uint8), AFFINE), "geometry_mismatch", "shape", None),
        (lambda d: write_combined_labels(d, _labels(), np.diag([1.0, 1.5, 2.0, 1.0])), "geometry_mismatch",
         "spacing", None),
        (lambda d: write_combined_labels(d, _labels(value=12), AFFINE), "invalid_labels", "label value 12", None),
        (lambda d: write_masks(d, {"liver": _labels(value=2)}, AFFINE)
         and write_nifti(d / "segmentations" / "liver.nii.gz", _labels(value=2), AFFINE), "invalid_labels",
         "only 0 and 1", {"liver"}),
        (lambda d: write_nifti(d / "combined_labels.nii.gz", np.full(SHAPE, np.nan, np.float32), AFFINE),
         "invalid_labels", "NaN", None),
    ],
)
def test_contents_are_read_once_at_scoring_and_say_why(tmp_path, cts, gt, make, status, expected, organs):
    """The safety check does not open the files (the case is ``ok``); scoring them through the one
    path gives the refused organ (masks) or case (label map) the worst score and a status whose
    detail names the container's path, never the worker's."""
    case_dir = tmp_path / "out" / "a"
    case_dir.mkdir(parents=True)
    make(case_dir)
    assert check_outputs(tmp_path / "out", cts).cases["a"].status == "ok"
    protocol = load_protocol("touchstone")
    rows = score_output("a", gt, tmp_path / "out", protocol)
    bad = {r.organ for r in rows if r.status != "ok"}
    assert bad == (organs or set(ORGANS))
    for row in rows:
        if row.organ in bad:
            assert row.status == status and expected in row.detail, row
            assert row.dsc == protocol.worst["dsc"] and row.nsd == protocol.worst["nsd"]
            assert "/output/a/" in row.detail and str(tmp_path) not in row.detail


def test_hard_link_is_refused(tmp_path, cts):
    out = tmp_path / "out"
    path = write_combined_labels(out / "a", _labels(), AFFINE)
    os.link(path, tmp_path / "elsewhere")
    report = check_outputs(out, cts)
    assert "hard link" in report.cases["a"].reason


def test_decompression_bomb_is_refused_before_inflating(tmp_path, cts, gt, monkeypatch):
    """The bomb guard runs where the file is read, at scoring: the header's declared size is over
    the limit, the case scores worst with ``too_large``, nothing is inflated, nothing raises."""
    import evaluation.io as eio

    out = tmp_path / "out"
    # a header that declares 2000^3 voxels on top of a tiny gzip stream
    (out / "a").mkdir(parents=True)

    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    (out / "a" / "combined_labels.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 4096))
    assert check_outputs(out, cts).cases["a"].status == "ok"  # names, kinds, sizes: nothing opened
    inflated = []
    real = eio._inflate
    monkeypatch.setattr(eio, "_inflate", lambda *a, **k: inflated.append(a) or real(*a, **k))
    rows = score_output("a", gt, out, "touchstone")
    assert {r.status for r in rows} == {"too_large"} and "over the limit" in rows[0].detail
    assert [a for a in inflated if str(out) in str(a[-1])] == []  # the ground truth is inflated, not the bomb
    # per-organ masks: the bomb scores only its own organ worst
    (out / "a" / "combined_labels.nii.gz").unlink()
    write_masks(out / "a", _labels(), AFFINE)
    (out / "a" / "segmentations" / "liver.nii.gz").write_bytes(
        gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 4096))
    assert check_outputs(out, cts).cases["a"].status == "ok"
    rows = {r.organ: r for r in score_output("a", gt, out, "touchstone")}
    assert rows["liver"].status == "too_large"
    assert {r.status for o, r in rows.items() if o != "liver"} == {"ok"}


def test_size_caps(tmp_path, cts):
    out = tmp_path / "out"
    write_combined_labels(out / "a", _labels(), AFFINE)
    size = (out / "a" / "combined_labels.nii.gz").stat().st_size
    report = check_outputs(out, cts, OutputLimits(max_file_bytes=size - 1))
    assert "limit per file" in report.cases["a"].reason
    write_combined_labels(out / "b", _labels(), AFFINE)
    report = check_outputs(out, cts, OutputLimits(max_total_bytes=size + 1))
    assert report.problems and report.failure().code is FailureCode.INVALID_OUTPUT


def test_the_check_opens_no_file(tmp_path, cts, monkeypatch):
    import builtins

    case_dir = tmp_path / "out" / "a"
    case_dir.mkdir(parents=True)
    (case_dir / "combined_labels.nii.gz").write_bytes(b"garbage")
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: opened.append(path) or pytest.fail(f"opened {path}"))
    assert check_outputs(tmp_path / "out", cts).cases["a"].status == "ok"
    assert check_outputs(tmp_path / "out", ["a", "b"]).cases["a"].status == "ok"  # case ids are enough
    assert [p for p in opened if str(p).endswith(".nii.gz")] == []
