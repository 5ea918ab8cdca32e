"""Lesion-wise metrics (evaluation/lesions.py) against panoptica, and their rules.

Conformance: on randomised lesion maps (balls of 1-6 voxels radius, touching and merging ones,
single voxels, predictions shifted, grown, shrunk, split, dropped and invented), both matching
rules of the protocol (``IoU > 0`` and ``IoU >= 0.5``) give panoptica's TP/FP/FN, recall,
precision, RQ (F1), PQ and per-lesion DSC (panoptica's ``sq_dsc · tp / n_ref``) to 1e-6.
panoptica runs its semantic pipeline: cc3d connected components (26-connectivity) and
``NaiveThresholdMatching(Metric.IOU, t, strict_threshold)``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from panoptica import CCABackend, ConnectedComponentsInstanceApproximator, InputType, NaiveThresholdMatching, Panoptica_Evaluator
from panoptica.metrics import Metric

from evaluation.lesions import LesionMatching, connected_components, evaluate_lesions, match_components
from evaluation.metric_registry import LESION_METRICS

RULES = (LesionMatching(iou_threshold=0.0, strict=True), LesionMatching(iou_threshold=0.5, strict=False))


def _panoptica(pred: np.ndarray, gt: np.ndarray, rule: LesionMatching) -> dict[str, float]:
    evaluator = Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(cca_backend=CCABackend.cc3d),
        instance_matcher=NaiveThresholdMatching(matching_metric=Metric.IOU, matching_threshold=rule.iou_threshold,
                                                strict_threshold=rule.strict),
        instance_metrics=[Metric.DSC, Metric.IOU], global_metrics=[Metric.DSC], verbose=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = evaluator.evaluate(pred.astype(np.uint8), gt.astype(np.uint8), verbose=False)["ungrouped"]
    out = {"lesion_tp": r.tp, "lesion_fp": r.fp, "lesion_fn": r.fn, "lesion_f1": r.rq, "lesion_pq": r.pq}
    # panoptica divides by zero for recall/precision without instances; compared where defined
    out["lesion_sensitivity"] = r.rec if r.n_ref_instances else math.nan
    out["lesion_precision"] = r.prec if r.n_pred_instances else math.nan
    out["lesion_dsc"] = (r.sq_dsc * r.tp / r.n_ref_instances) if r.tp else (0.0 if r.n_ref_instances else math.nan)
    return {k: float(v) for k, v in out.items()}


def _balls(rng: np.random.Generator, shape, n: int, r_max: int) -> np.ndarray:
    out = np.zeros(shape, bool)
    grid = np.indices(shape)
    for _ in range(n):
        c = [rng.integers(0, s) for s in shape]
        r = rng.uniform(0.4, r_max)
        radii = r * rng.uniform(0.6, 1.4, 3)
        out |= sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, radii)) <= 1.0
    return out


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(16, 34, 3))
    gt = _balls(rng, shape, int(rng.integers(0, 9)), 6)
    cc, n = connected_components(gt)
    keep = rng.random(n + 1) < 0.75  # drop about a quarter of the lesions
    keep[0] = False
    pred = keep[cc]
    shift = rng.integers(-2, 3, 3)
    pred = np.roll(pred, tuple(int(s) for s in shift), axis=(0, 1, 2))
    from scipy import ndimage

    op = rng.integers(3)
    if op == 1:
        pred = ndimage.binary_dilation(pred)
    elif op == 2:
        pred = ndimage.binary_erosion(pred)
    pred |= _balls(rng, shape, int(rng.integers(0, 4)), 3)  # false positives (and merges)
    if rng.random() < 0.3:  # split some lesions with a plane
        pred[:, int(rng.integers(0, shape[1])), :] = False
    speckle = rng.random(shape) < 0.002
    return pred | speckle, gt


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.rule)
def test_lesion_metrics_equal_panoptica_on_random_lesion_maps(seed, rule):
    pred, gt = _random_case(seed)
    ours = evaluate_lesions(pred, gt, (1.0, 1.0, 1.0), rule).metrics
    oracle = _panoptica(pred, gt, rule)
    assert set(ours) == set(LESION_METRICS)
    for name in LESION_METRICS:
        a, b = ours[name], oracle[name]
        if math.isnan(b):
            assert math.isnan(a), (name, a)
        else:
            assert abs(a - b) <= 1e-6, (name, a, b)


def test_random_maps_exercise_matches_misses_and_false_positives():
    # the oracle test above must see every situation, not only easy ones
    seen = {"tp": 0, "fp": 0, "fn": 0, "split_or_merge": 0}
    for seed in range(16):
        pred, gt = _random_case(seed)
        m = evaluate_lesions(pred, gt).metrics
        seen["tp"] += m["lesion_tp"] > 0
        seen["fp"] += m["lesion_fp"] > 0
        seen["fn"] += m["lesion_fn"] > 0
        seen["split_or_merge"] += any(
            r.matched_to is None and r.side == "prediction" and r.voxels > 1 for r in evaluate_lesions(pred, gt).lesions
        )
    assert min(seen.values()) >= 5, seen


def _two(shape=(20, 20, 20)):
    z = np.zeros(shape, bool)
    a = z.copy()
    a[2:6, 2:6, 2:6] = True
    b = z.copy()
    b[10:14, 10:14, 10:14] = True
    return z, a, b


@pytest.mark.parametrize(
    "situation, expected",
    [
        ("none/none", {"lesion_tp": 0, "lesion_fp": 0, "lesion_fn": 0, "lesion_sensitivity": None, "lesion_precision": None,
                       "lesion_f1": None, "lesion_dsc": None, "lesion_pq": None}),
        ("none/some", {"lesion_tp": 0, "lesion_fp": 1, "lesion_fn": 0, "lesion_sensitivity": None, "lesion_precision": 0,
                       "lesion_f1": 0, "lesion_dsc": None, "lesion_pq": 0}),
        ("some/none", {"lesion_tp": 0, "lesion_fp": 0, "lesion_fn": 1, "lesion_sensitivity": 0, "lesion_precision": None,
                       "lesion_f1": 0, "lesion_dsc": 0, "lesion_pq": 0}),
        ("some/miss", {"lesion_tp": 0, "lesion_fp": 1, "lesion_fn": 1, "lesion_sensitivity": 0, "lesion_precision": 0,
                       "lesion_f1": 0, "lesion_dsc": 0, "lesion_pq": 0}),
    ],
)
def test_empty_case_table(situation, expected):
    z, a, b = _two()
    gt, pred = {"none/none": (z, z), "none/some": (z, a), "some/none": (a, z), "some/miss": (a, b)}[situation]
    got = evaluate_lesions(pred, gt).metrics
    for name, value in expected.items():
        if value is None:
            assert math.isnan(got[name]), name
        else:
            assert got[name] == value, name
    oracle = _panoptica(pred, gt, RULES[0])
    for name in ("lesion_tp", "lesion_fp", "lesion_fn", "lesion_f1", "lesion_pq"):
        assert got[name] == oracle[name] or (math.isnan(got[name]) and math.isnan(oracle[name]))


@pytest.mark.parametrize("connectivity, corner, edge", [(6, 2, 2), (18, 2, 1), (26, 1, 1)])
def test_connectivity_decides_what_is_one_lesion(connectivity, corner, edge):
    m = np.zeros((5, 5, 5), bool)
    m[1, 1, 1] = m[2, 2, 2] = True  # touch at a corner
    assert connected_components(m, connectivity)[1] == corner
    m = np.zeros((5, 5, 5), bool)
    m[1, 1, 1] = m[2, 2, 1] = True  # touch along an edge
    assert connected_components(m, connectivity)[1] == edge
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(m, 8)


def test_matching_threshold_and_one_to_one_greedy():
    gt = np.zeros((30, 10, 10), bool)
    gt[0:10, 0:5, 0:5] = True  # one truth lesion of 250 voxels
    pred = np.zeros_like(gt)
    pred[0:7, 0:5, 0:5] = True  # IoU 0.7 with the truth
    pred[8:14, 0:5, 0:5] = True  # overlaps it too (IoU 50/400), a second component
    strict0 = evaluate_lesions(pred, gt, matching=LesionMatching(iou_threshold=0.0)).metrics
    assert (strict0["lesion_tp"], strict0["lesion_fp"], strict0["lesion_fn"]) == (1, 1, 0)  # the better one wins
    assert strict0["lesion_dsc"] == pytest.approx(2 * 175 / (250 + 175))
    half = evaluate_lesions(pred, gt, matching=LesionMatching(iou_threshold=0.75, strict=False)).metrics
    assert (half["lesion_tp"], half["lesion_fp"], half["lesion_fn"]) == (0, 2, 1)
    exact = np.zeros_like(gt)
    exact[0:5, 0:5, 0:5] = True  # IoU exactly 0.5: kept by >= 0.5, not by > 0.5
    assert evaluate_lesions(exact, gt, matching=LesionMatching(26, 0.5, strict=False)).metrics["lesion_tp"] == 1
    assert evaluate_lesions(exact, gt, matching=LesionMatching(26, 0.5, strict=True)).metrics["lesion_tp"] == 0


def test_match_components_pairs_are_one_to_one():
    pred, gt = _random_case(7)
    g, ng = connected_components(gt)
    p, np_ = connected_components(pred)
    match = match_components(g, ng, p, np_)
    truth = [i for i, _, _ in match.pairs]
    preds = [j for _, j, _ in match.pairs]
    assert len(set(truth)) == len(truth) and len(set(preds)) == len(preds)
    for i, j, both in match.pairs:
        assert both == int(np.count_nonzero((g == i) & (p == j))) > 0


def test_per_lesion_records_sizes_and_cropping():
    pred, gt = _random_case(3)
    spacing = (0.8, 0.8, 2.5)
    res = evaluate_lesions(pred, gt, spacing)
    truth = [r for r in res.lesions if r.side == "truth"]
    preds = [r for r in res.lesions if r.side == "prediction"]
    assert len(truth) == res.metrics["lesion_tp"] + res.metrics["lesion_fn"]
    assert len(preds) == res.metrics["lesion_tp"] + res.metrics["lesion_fp"]
    assert sum(r.voxels for r in truth) == int(gt.sum())
    for r in res.lesions:
        assert r.volume_mm3 == pytest.approx(r.voxels * 0.8 * 0.8 * 2.5)
        assert r.diameter_mm == pytest.approx((6 * r.volume_mm3 / math.pi) ** (1 / 3))
        assert (r.dsc > 0) == r.matched
    if truth:
        assert res.metrics["lesion_dsc"] == pytest.approx(sum(r.dsc for r in truth) / len(truth))
    # the result does not depend on where the lesions sit in a larger volume
    big_p = np.zeros((60, 60, 60), bool)
    big_g = np.zeros_like(big_p)
    big_p[10:10 + pred.shape[0], 5:5 + pred.shape[1], 20:20 + pred.shape[2]] = pred
    big_g[10:10 + gt.shape[0], 5:5 + gt.shape[1], 20:20 + gt.shape[2]] = gt
    assert evaluate_lesions(big_p, big_g, spacing).metrics == pytest.approx(res.metrics, nan_ok=True)


def test_bad_inputs_are_refused_clearly():
    z = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="same shape"):
        evaluate_lesions(z, np.zeros((4, 4, 5), bool))
    with pytest.raises(TypeError, match="boolean"):
        evaluate_lesions(z.astype(np.float32), z)
    with pytest.raises(ValueError, match="spacing_mm"):
        evaluate_lesions(z, z, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="iou_threshold"):
        LesionMatching(iou_threshold=1.5)
