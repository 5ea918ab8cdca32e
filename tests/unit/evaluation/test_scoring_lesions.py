"""Lesion protocols through the one scoring path (evaluation.scoring.score_case), on tumour phantoms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation import io
from evaluation.labels import LABEL_IDS, LESION_LABEL_IDS
from evaluation.lesions import evaluate_lesions
from evaluation.metric_registry import LESION_METRICS
from evaluation.metrics import dice_from_counts
from evaluation.phantoms import generate_cases, make_prediction, write_case
from evaluation.protocols import Protocol, load_protocol
from evaluation.scoring import score_case, score_cases, summarize, worst_rows

TABLE = {**LABEL_IDS, **LESION_LABEL_IDS}


@pytest.fixture(scope="module")
def tumour_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("tumours")
    cases = list(generate_cases(6, size="small", seed=11, lesions=True))
    for case in cases:
        write_case(case, root, lesions=True)
    return root, cases


def test_rows_are_organs_then_lesion_classes_with_lesion_metrics(tumour_set, tmp_path):
    root, cases = tumour_set
    proto = load_protocol("touchstone-lesions")
    case = max(cases, key=lambda c: sum(c.metadata[f"n_{n}"] for n in LESION_LABEL_IDS))
    assert case.metadata["n_liver_lesion"] >= 2
    pred, _ = make_prediction(case.labels, case.affine, "miss_small_lesions", min_lesion_voxels=40)
    io.write_combined_labels(tmp_path / case.case_id, pred, case.affine)
    rows = score_case(case.case_id, root / case.case_id, tmp_path / case.case_id, proto)
    assert [r.organ for r in rows] == list(proto.classes)
    for r in rows:
        assert r.status == "ok"
        if r.organ in LABEL_IDS:
            assert r.lesion_metrics == {} and r.lesions == ()
            continue
        label_id = LESION_LABEL_IDS[r.organ]
        assert set(r.lesion_metrics) == set(LESION_METRICS)
        expected = evaluate_lesions(pred == label_id, case.labels == label_id, case.spacing).metrics
        assert r.lesion_metrics == pytest.approx(expected, nan_ok=True)
        p, g = pred == label_id, case.labels == label_id
        if g.any() and p.any():  # the case-level DSC of the class, as organs
            assert r.dsc == pytest.approx(dice_from_counts(int(p.sum()), int(g.sum()), int((p & g).sum())))
        assert r.value("lesion_f1") is r.lesion_metrics["lesion_f1"] and r.value("dsc") is r.dsc


def test_masks_and_combined_layouts_score_the_same(tumour_set, tmp_path):
    root, cases = tumour_set
    case = cases[1]
    pred, _ = make_prediction(case.labels, case.affine, "realistic", seed=3)
    io.write_combined_labels(tmp_path / "c" / case.case_id, pred, case.affine)
    io.write_masks(tmp_path / "m" / case.case_id, pred, case.affine, TABLE)
    a = score_case(case.case_id, root / case.case_id, tmp_path / "c" / case.case_id, "touchstone-lesions")
    b = score_case(case.case_id, root / case.case_id, tmp_path / "m" / case.case_id, "touchstone-lesions")
    for ra, rb in zip(a, b):
        assert ra.organ == rb.organ
        assert ra.lesion_metrics == pytest.approx(rb.lesion_metrics, nan_ok=True)
        assert (ra.dsc, ra.nsd) == pytest.approx((rb.dsc, rb.nsd), nan_ok=True)


def test_detection_and_overlap_differ_for_a_detector_that_misses_small_lesions(tumour_set, tmp_path):
    root, cases = tumour_set
    todo = []
    for case in cases:
        pred, _ = make_prediction(case.labels, case.affine, "miss_small_lesions", min_lesion_voxels=60)
        io.write_combined_labels(tmp_path / case.case_id, pred, case.affine)
        todo.append((case.case_id, root / case.case_id, tmp_path / case.case_id))
    preset = load_protocol("touchstone-lesions")  # without NSD: this test is about DSC against detection
    proto = Protocol.model_validate({**preset.to_dict(), "metrics": [m for m in preset.metrics if m != "nsd"]})
    summary = {e["organ"]: e for e in summarize(score_cases(todo, proto), proto)}
    liver = summary["liver_lesion"]
    # big lesions found (and grown by a voxel): high case-level DSC, while small misses pull sensitivity down
    assert liver["mean_lesion_sensitivity"] < 1.0
    assert liver["mean_dsc"] > liver["mean_lesion_sensitivity"] and liver["mean_dsc"] > liver["mean_lesion_dsc"]
    assert "mean_lesion_f1" not in summary["liver"]


def test_failed_prediction_gives_lesion_classes_the_worst_values(tumour_set, tmp_path):
    root, cases = tumour_set
    proto = load_protocol("touchstone-lesions")
    rows = score_case(cases[0].case_id, root / cases[0].case_id, tmp_path / "nothing", proto)
    assert {r.status for r in rows} == {"missing_prediction"}
    for r in rows:
        if r.organ in LESION_LABEL_IDS:
            for m in LESION_METRICS:
                w = proto.worst[m]
                assert (math.isnan(w) and math.isnan(r.lesion_metrics[m])) or r.lesion_metrics[m] == w
        else:
            assert r.lesion_metrics == {}
    assert [r.organ for r in worst_rows("x", proto, "unreadable", "d")] == list(proto.classes)


def test_organ_protocol_rows_carry_no_lesion_fields(tumour_set, tmp_path):
    # an organ protocol on a tumour set reads only its organs: lesion voxels are background to it
    root, cases = tumour_set
    case = cases[0]
    io.write_combined_labels(tmp_path / case.case_id, np.where(case.labels > 9, 0, case.labels).astype(np.uint8), case.affine)
    rows = score_case(case.case_id, root / case.case_id, tmp_path / case.case_id, "touchstone")
    assert [r.organ for r in rows] == list(LABEL_IDS)
    assert all(r.lesion_metrics == {} and r.lesions == () and r.status == "ok" for r in rows)
