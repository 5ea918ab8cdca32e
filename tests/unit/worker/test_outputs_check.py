"""Checking untrusted outputs: layout, kinds, sizes, grid, labels (worker/outputs.py)."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from evaluation.io import write_combined_labels, write_ct, write_masks, write_nifti
from worker.outputs import OutputLimits, check_outputs
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
        (lambda d: (d / "combined_labels.nii.gz").write_bytes(b"not a nifti at all"), "too short for a NIfTI header"),
        (lambda d: (d / "combined_labels.nii.gz").write_bytes(gzip.compress(b"\0" * 2000)), "not a NIfTI file"),
        (lambda d: write_combined_labels(d, np.zeros((8, 9, 7), np.uint8), AFFINE), "shape"),
        (lambda d: write_combined_labels(d, _labels(), np.diag([1.0, 1.5, 2.0, 1.0])), "spacing"),
        (lambda d: write_combined_labels(d, _labels(value=12), AFFINE), "label value 12"),
        (lambda d: write_masks(d, {"liver": _labels(value=2)}, AFFINE) and write_nifti(d / "segmentations" / "liver.nii.gz", _labels(value=2), AFFINE), "only 0 and 1"),
        (lambda d: write_nifti(d / "combined_labels.nii.gz", np.full(SHAPE, np.nan, np.float32), AFFINE), "NaN"),
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


def test_hard_link_is_refused(tmp_path, cts):
    out = tmp_path / "out"
    path = write_combined_labels(out / "a", _labels(), AFFINE)
    os.link(path, tmp_path / "elsewhere")
    report = check_outputs(out, cts)
    assert "hard link" in report.cases["a"].reason


def test_decompression_bomb_is_refused_before_inflating(tmp_path, cts):
    out = tmp_path / "out"
    # a header that declares 2000^3 voxels on top of a tiny gzip stream
    (out / "a").mkdir(parents=True)

    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    (out / "a" / "combined_labels.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 4096))
    report = check_outputs(out, cts)
    assert report.cases["a"].status == "invalid" and "over the limit" in report.cases["a"].reason


def test_size_caps(tmp_path, cts):
    out = tmp_path / "out"
    write_combined_labels(out / "a", _labels(), AFFINE)
    size = (out / "a" / "combined_labels.nii.gz").stat().st_size
    report = check_outputs(out, cts, OutputLimits(max_file_bytes=size - 1))
    assert "limit per file" in report.cases["a"].reason
    write_combined_labels(out / "b", _labels(), AFFINE)
    report = check_outputs(out, cts, OutputLimits(max_total_bytes=size + 1))
    assert report.problems and report.failure().code is FailureCode.INVALID_OUTPUT


def test_names_only_mode_does_not_read_contents(tmp_path, cts):
    case_dir = tmp_path / "out" / "a"
    case_dir.mkdir(parents=True)
    (case_dir / "combined_labels.nii.gz").write_bytes(b"garbage")
    assert check_outputs(tmp_path / "out", cts, check_contents=False).cases["a"].status == "ok"
