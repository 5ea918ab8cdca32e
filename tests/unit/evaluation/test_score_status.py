"""ScoreStatus, one test per status: a prediction that earns it, through the one scoring path
(evaluation.scoring.score_case; invalid_prediction: the worker's output check), with the
protocol's worst values for every failure, and the same verdict wherever a status is read
(ScoreRow.failed, ScoreStatus.is_failure, the leaderboard's n_failed)."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from evaluation import io
from evaluation.io import ScoreStatus
from evaluation.protocols import load_protocol
from evaluation.scoring import score_case
from services.leaderboard.compute import is_failure

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
SHAPE = (10, 9, 8)


def _labels() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 2:6, 2:5] = 5  # liver
    labels[6:9, 5:8, 4:7] = 8  # spleen
    return labels


def _bomb(path):
    header = nib.Nifti1Header()
    header.set_data_shape((3000, 3000, 3000))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 4096))


#: status -> how to write the prediction's case folder, and the organs it must hit (None: all)
MAKERS = {
    ScoreStatus.OK: (lambda d: io.write_combined_labels(d, _labels(), AFFINE), None),
    ScoreStatus.MISSING_PREDICTION: (lambda d: d.mkdir(parents=True), None),
    ScoreStatus.UNREADABLE: (lambda d: io.write_masks(d, _labels(), AFFINE)
                             and (d / "segmentations" / "liver.nii.gz").write_bytes(b"\x1f\x8bnot gzip"), {"liver"}),
    ScoreStatus.TOO_LARGE: (lambda d: io.write_masks(d, _labels(), AFFINE)
                            and _bomb(d / "segmentations" / "spleen.nii.gz"), {"spleen"}),
    ScoreStatus.GEOMETRY_MISMATCH: (lambda d: io.write_combined_labels(d, _labels()[:, :, :-1], AFFINE), None),
    ScoreStatus.INVALID_LABELS: (lambda d: io.write_combined_labels(d, _labels() * 3, AFFINE), None),
}


@pytest.fixture
def gt(tmp_path):
    return io.write_combined_labels(tmp_path / "gt" / "c0", _labels(), AFFINE)


def test_every_status_has_a_test_and_a_description():
    assert set(MAKERS) | {ScoreStatus.INVALID_PREDICTION} == set(ScoreStatus)
    assert set(io.STATUSES) == {s.value for s in ScoreStatus}
    assert all(s.description for s in ScoreStatus)
    assert [s for s in ScoreStatus if not s.is_failure] == [ScoreStatus.OK]


@pytest.mark.parametrize("status", list(MAKERS), ids=lambda s: s.value)
def test_status_from_the_scorer(tmp_path, gt, status):
    make, organs = MAKERS[status]
    pred = tmp_path / "pred" / "c0"
    make(pred)
    protocol = load_protocol("touchstone")
    rows = score_case("c0", gt, pred, protocol)
    hit = {r.organ for r in rows if r.status == status.value}
    assert hit == (organs or set(protocol.organs))
    for row in rows:
        assert row.failed is ScoreStatus(row.status).is_failure is is_failure(row.status)
        if row.organ in hit and status.is_failure:
            assert row.dsc == protocol.worst["dsc"] and row.nsd == protocol.worst["nsd"] and row.detail
        elif row.organ not in hit:
            assert row.status == "ok"  # a per-organ failure leaves the other organs scored
    assert status.is_failure is (status is not ScoreStatus.OK)


def test_status_invalid_prediction_from_the_output_check(tmp_path):
    """invalid_prediction: the worker's safety check refused the case unread (here: a symbolic
    link); the scorer's worst rows carry the status and count as failures."""
    from evaluation.scoring import worst_rows
    from worker.inference import case_statuses
    from worker.outputs import check_outputs

    case_dir = tmp_path / "out" / "c0"
    case_dir.mkdir(parents=True)
    (case_dir / "combined_labels.nii.gz").symlink_to("/etc/passwd")
    out = check_outputs(tmp_path / "out", ["c0"]).cases["c0"]
    assert out.status == "invalid" and "symbolic link" in out.reason
    run_status, status = case_statuses(out.status, None)
    assert (run_status, status) == ("invalid_output", ScoreStatus.INVALID_PREDICTION)
    protocol = load_protocol("touchstone")
    rows = worst_rows("c0", protocol, status, out.reason)
    assert {r.status for r in rows} == {"invalid_prediction"} and all(r.failed and is_failure(r.status) for r in rows)
    assert all(r.dsc == protocol.worst["dsc"] for r in rows)


def test_n_failed_counts_every_failure_status():
    """The leaderboard's verdict per stored status: every member but ok, plus values outside the
    enum; no status is not a failure."""
    assert [s.value for s in ScoreStatus if is_failure(s.value)] == [s.value for s in ScoreStatus if s.is_failure]
    assert is_failure("unreadable") and is_failure("too_large") and is_failure("geometry_mismatch")
    assert not is_failure("ok") and not is_failure(None)
    with pytest.raises(ValueError):
        ScoreStatus("timeout")
