"""What deep-learning images bring (issue: a real network in the loop), through the service's one
scoring path (worker.outputs.score_output -> evaluation.scoring.score_case): float16 label maps,
probability maps, predictions on a resampled grid, an image over the size limit, a slow start.
Each ends in a correct score or a reason an inventor can act on."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.io import write_combined_labels, write_nifti
from worker.outputs import score_output
from worker.runtime.base import FailureCode, ImageInfo, check_image
from worker.sandbox import shard_time_limit

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


@pytest.fixture
def case(tmp_path):
    """A ground truth with liver (5) and spleen (8) blocks on a 24 x 20 x 12 grid."""
    labels = np.zeros((24, 20, 12), np.uint8)
    labels[2:12, 2:12, 2:8] = 5
    labels[14:20, 10:16, 3:9] = 8
    gt = write_combined_labels(tmp_path / "gt" / "case_a", labels, AFFINE)
    return labels, gt, tmp_path / "output"


def _rows(case_id, gt, output):
    return {r.organ: r for r in score_output(case_id, gt, output, "touchstone")}


def _write(output, data):
    """/output/case_a/combined_labels.nii.gz in the data's own dtype (as a network writes it)."""
    return write_nifti(output / "case_a" / "combined_labels.nii.gz", data, AFFINE)


def _same(a, b) -> bool:
    return (np.isnan(a) and np.isnan(b)) if isinstance(a, float) and np.isnan(a) else a == b


def test_a_float_label_map_scores_like_uint8(case):
    """A network's float16 argmax saved as NIfTI (NIfTI-1 has no float16: nibabel refuses it, so
    it arrives as float32 whole numbers) scores exactly like the uint8 map."""
    labels, gt, output = case
    write_combined_labels(output / "case_a", labels.astype(np.uint8), AFFINE)
    exact = _rows("case_a", gt, output)
    import nibabel as nib

    with pytest.raises(Exception, match="float16"):
        _write(output, labels.astype(np.float16))
    path = _write(output, labels.astype(np.float16).astype(np.float32))
    assert nib.load(str(path)).get_data_dtype() == np.float32
    half = _rows("case_a", gt, output)
    assert half["liver"].dsc == exact["liver"].dsc == pytest.approx(2 * 600 / (600 + 600 + 1))
    assert all(half[o].status == exact[o].status and _same(half[o].dsc, exact[o].dsc) for o in exact)


def test_a_probability_map_is_refused_with_what_to_do(case):
    _, gt, output = case
    _write(output, np.full((24, 20, 12), 0.4, np.float32))
    rows = _rows("case_a", gt, output)
    assert {r.status for r in rows.values()} == {"invalid_labels"}
    detail = rows["liver"].detail
    assert "probability map" in detail and "uint8" in detail
    assert all(r.dsc == 0.0 for r in rows.values())  # the protocol's worst value


def test_a_prediction_on_a_resampled_grid_is_a_geometry_mismatch(case):
    labels, gt, output = case
    # what a network that forgot to resample back writes: 1.5 mm spacing, another shape
    resampled = np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1)[:, :, :12]
    write_combined_labels(output / "case_a", resampled, np.diag([1.0, 1.0, 3.0, 1.0]))
    rows = _rows("case_a", gt, output)
    assert {r.status for r in rows.values()} == {"geometry_mismatch"}
    assert "shape" in rows["liver"].detail or "spacing" in rows["liver"].detail
    # resampled back onto the CT's grid it scores
    write_combined_labels(output / "case_a", resampled[::2, ::2, :], AFFINE)
    assert _rows("case_a", gt, output)["liver"].dsc == pytest.approx(2 * 600 / (600 + 600 + 1))


def test_an_image_over_the_size_limit_says_so():
    big = ImageInfo(image_id="sha256:" + "1" * 64, architecture="amd64", os="linux", size_bytes=45 * 2**30,
                    user="", tags=())
    failure = check_image(big, 40 * 2**30)
    assert failure.code is FailureCode.IMAGE_TOO_LARGE
    assert "45" in failure.message and "40" in failure.message
    assert check_image(ImageInfo(image_id=big.image_id, architecture="amd64", os="linux", size_bytes=2 * 2**30,
                                 user="", tags=()), 40 * 2**30) is None


def test_a_slow_start_is_covered_once_per_run_not_per_case():
    """Loading a network once per container run: the start-up allowance is added once."""
    assert shard_time_limit(30.0, 10, startup_s=120.0) == 120.0 + 300.0
    assert shard_time_limit(30.0, 1, startup_s=120.0) == 150.0
