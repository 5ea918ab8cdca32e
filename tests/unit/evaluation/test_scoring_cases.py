"""evaluation.scoring: per-case rows, worst scores with statuses, many cases over processes."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from evaluation import io
from evaluation.labels import LABEL_IDS, ORGANS
from evaluation.phantoms import generate_cases, make_prediction, write_case
from evaluation.protocols import load_protocol
from evaluation.scoring import CaseToScore, ScoreRow, score_case, score_cases, summarize


@pytest.fixture(scope="module")
def gt_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt")
    cases = list(generate_cases(3, size="tiny", seed=5))
    for case in cases:
        write_case(case, root)
    return root, cases


def _perfect(case, pred_root, layout="masks"):
    if layout == "masks":
        io.write_masks(pred_root / case.case_id, case.labels, case.affine)
    else:
        io.write_combined_labels(pred_root / case.case_id, case.labels, case.affine)


@pytest.mark.parametrize("layout", ["masks", "combined"])
def test_perfect_prediction_scores_one_for_every_organ(gt_set, tmp_path, layout):
    root, cases = gt_set
    _perfect(cases[0], tmp_path, layout)
    rows = score_case(cases[0].case_id, root / cases[0].case_id, tmp_path / cases[0].case_id, "nsd-deepmind")
    assert [r.organ for r in rows] == list(ORGANS)
    for r in rows:
        assert r.status == "ok" and r.detail == ""
        assert r.dsc == pytest.approx(1.0, abs=1e-12) and r.nsd == pytest.approx(1.0, abs=1e-12)
    # the published Touchstone DSC is 2|P∩G| / (|P|+|G|+1): a perfect mask of n voxels scores 2n/(2n+1)
    rows = score_case(cases[0].case_id, root / cases[0].case_id, tmp_path / cases[0].case_id, "touchstone")
    for r in rows:
        n = int(np.count_nonzero(cases[0].labels == LABEL_IDS[r.organ]))
        assert r.status == "ok" and r.dsc == pytest.approx(2 * n / (2 * n + 1), abs=1e-12) and r.nsd == pytest.approx(1.0)


def test_missing_prediction_scores_worst(gt_set, tmp_path):
    root, cases = gt_set
    proto = load_protocol("touchstone")
    rows = score_case(cases[0].case_id, root / cases[0].case_id, tmp_path / "nope", proto)
    assert {r.status for r in rows} == {"missing_prediction"}
    assert all(r.dsc == proto.worst["dsc"] and r.nsd == proto.worst["nsd"] for r in rows)
    (tmp_path / "empty_case").mkdir()
    rows = score_case(cases[0].case_id, root / cases[0].case_id, tmp_path / "empty_case", proto)
    assert {r.status for r in rows} == {"missing_prediction"} and "segmentations" in rows[0].detail


def test_one_bad_organ_file_scores_only_that_organ_worst(gt_set, tmp_path):
    root, cases = gt_set
    case = cases[0]
    _perfect(case, tmp_path)
    seg = tmp_path / case.case_id / "segmentations"
    (seg / "liver.nii.gz").write_bytes((seg / "liver.nii.gz").read_bytes()[:60])  # truncated
    (seg / "spleen.nii.gz").unlink()  # no file: an empty mask
    rows = {r.organ: r for r in score_case(case.case_id, root / case.case_id, tmp_path / case.case_id, "touchstone")}
    assert rows["liver"].status == "unreadable" and rows["liver"].dsc == 0.0 and "liver.nii.gz" in rows["liver"].detail
    assert rows["spleen"].status == "ok" and "no mask file" in rows["spleen"].detail and rows["spleen"].dsc < 0.01
    assert rows["kidney_left"].status == "ok" and rows["kidney_left"].dsc == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    ("damage", "status"),
    [("wrong_affine", "geometry_mismatch"), ("truncated", "unreadable"), ("bad_label", "invalid_labels"), ("bomb", "too_large")],
)
def test_bad_combined_prediction_scores_the_whole_case_worst(gt_set, tmp_path, damage, status):
    root, cases = gt_set
    case = cases[1]
    labels, affine = case.labels, case.affine
    if damage == "wrong_affine":
        labels, affine = make_prediction(case.labels, case.affine, "wrong_affine")
    if damage == "bad_label":
        labels = case.labels.copy()
        labels[0, 0, 0] = 42
    path = io.write_combined_labels(tmp_path / case.case_id, labels, affine)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    if damage == "bomb":
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + b"\0" * (4 << 20)))
    rows = score_case(case.case_id, root / case.case_id, tmp_path / case.case_id, "touchstone")
    assert {r.status for r in rows} == {status}
    assert all(r.dsc == 0.0 and r.nsd == 0.0 for r in rows)
    assert "Fix:" in rows[0].detail


def test_protocol_metrics_decide_which_columns_are_filled(gt_set, tmp_path):
    root, cases = gt_set
    _perfect(cases[0], tmp_path)
    for name in ("touchstone", "nsd-deepmind"):
        proto = load_protocol(name)
        rows = score_case(cases[0].case_id, root / cases[0].case_id, tmp_path / cases[0].case_id, proto)
        for r in rows:
            for m in ("dsc", "nsd", "hd95", "assd"):
                assert (getattr(r, m) is None) == (m not in proto.metrics)


def test_ground_truth_problems_raise(gt_set, tmp_path):
    root, cases = gt_set
    (tmp_path / "gt_case").mkdir()
    with pytest.raises(io.GroundTruthError, match="ground truth of case 'x'"):
        score_case("x", tmp_path / "gt_case", root / cases[0].case_id, "touchstone")


def test_score_cases_parallel_equals_serial_in_a_stable_order(gt_set, tmp_path):
    root, cases = gt_set
    for i, case in enumerate(cases[:2]):
        labels, affine = make_prediction(case.labels, case.affine, "realistic", seed=i)
        io.write_combined_labels(tmp_path / case.case_id, labels, affine)
    todo = [CaseToScore(c.case_id, root / c.case_id, tmp_path / c.case_id) for c in cases]  # the last is missing
    seen: list[str] = []
    serial = score_cases(todo, "touchstone", workers=1, progress=lambda cid, rows: seen.append(cid))
    parallel = score_cases(todo, "touchstone", workers=2)
    assert serial == parallel
    assert [(r.case_id, r.organ) for r in serial] == [(c.case_id, o) for c in cases for o in ORGANS]
    assert seen == [c.case_id for c in cases]
    assert {r.status for r in serial if r.case_id == cases[2].case_id} == {"missing_prediction"}
    ok = [r for r in serial if r.status == "ok"]
    assert ok and all(0.0 <= r.dsc <= 1.0 for r in ok) and any(r.dsc < 1.0 for r in ok)

    summary = {s["organ"]: s for s in summarize(serial, load_protocol("touchstone"))}
    liver = [r.dsc for r in serial if r.organ == "liver"]
    assert summary["liver"]["cases"] == 3 and summary["liver"]["not_ok"] == 1
    assert summary["liver"]["mean_dsc"] == pytest.approx(sum(liver) / 3)


def test_score_row_fields():
    row = ScoreRow("c", "liver", 0.5, 0.25, None, None, "ok")
    assert row.as_dict() == {"case_id": "c", "organ": "liver", "dsc": 0.5, "nsd": 0.25, "hd95": None, "assd": None, "status": "ok", "detail": ""}
    assert set(LABEL_IDS) == set(ORGANS)
