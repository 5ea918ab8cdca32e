"""Metrics on hand-made cases with known values: DeepMind's own tests, closed forms, empty-mask rules, layouts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation import metrics as M
from evaluation.labels import LABEL_IDS
from evaluation.metrics import CaseScorer, compute_case_metrics
from evaluation.protocols import Protocol, load_protocol


# ---- DeepMind surface_distance_test.py (3-D), expected values to 3 places as there ----------------
def test_deepmind_two_cubes_shifted_by_one_voxel():
    gt = np.zeros((100, 100, 100), bool)
    pred = np.zeros((100, 100, 100), bool)
    gt[0:50] = True
    pred[0:51] = True
    sd = M.surface_distances_surfel(pred, gt, (2, 1, 1))
    asd = M.average_surface_distance(sd)
    assert asd[0] == pytest.approx(0.322, abs=5e-4)
    assert asd[1] == pytest.approx(0.339, abs=5e-4)
    assert M.hausdorff_percentile(sd, 100) == pytest.approx(2.0)
    assert M.hausdorff_percentile(sd, 95) == pytest.approx(2.0)
    assert M.normalized_surface_dice(sd, 1.0) == pytest.approx(0.836, abs=5e-4)
    assert M.dice(pred, gt) == pytest.approx(0.990, abs=5e-4)


def test_deepmind_two_voxels_2mm_apart():
    gt = np.zeros((128, 128, 128), bool)
    pred = np.zeros((128, 128, 128), bool)
    gt[50, 60, 70] = True
    pred[50, 60, 72] = True
    sd = M.surface_distances_surfel(pred, gt, (3, 2, 1))
    assert M.average_surface_distance(sd) == pytest.approx((1.5, 1.5))
    assert M.hausdorff_percentile(sd, 100) == 2.0
    assert M.hausdorff_percentile(sd, 95) == 2.0
    assert M.normalized_surface_dice(sd, 1.0) == pytest.approx(0.5)
    assert M.dice(pred, gt) == 0.0


def _one_voxel(shape=(128, 128, 128), at=(50, 60, 70)):
    m = np.zeros(shape, bool)
    m[at] = True
    return m


def test_deepmind_empty_prediction():
    sd = M.surface_distances_surfel(np.zeros((128,) * 3, bool), _one_voxel(), (3, 2, 1))
    gt_to_pred, pred_to_gt = M.average_surface_distance(sd)
    assert gt_to_pred == math.inf and math.isnan(pred_to_gt)
    assert M.hausdorff_percentile(sd, 95) == math.inf
    assert M.normalized_surface_dice(sd, 1.0) == 0.0
    assert M.dice(np.zeros((128,) * 3, bool), _one_voxel()) == 0.0


def test_deepmind_empty_ground_truth():
    sd = M.surface_distances_surfel(_one_voxel(), np.zeros((128,) * 3, bool), (3, 2, 1))
    gt_to_pred, pred_to_gt = M.average_surface_distance(sd)
    assert math.isnan(gt_to_pred) and pred_to_gt == math.inf
    assert M.hausdorff_percentile(sd, 95) == math.inf
    assert M.normalized_surface_dice(sd, 1.0) == 0.0


def test_deepmind_both_empty():
    empty = np.zeros((128,) * 3, bool)
    sd = M.surface_distances_surfel(empty, empty, (3, 2, 1))
    assert all(math.isnan(v) for v in M.average_surface_distance(sd))
    assert M.hausdorff_percentile(sd, 95) == math.inf
    assert math.isnan(M.normalized_surface_dice(sd, 1.0))
    assert math.isnan(M.dice(empty, empty))
    assert M.dice(empty, empty, "touchstone") == 0.0


# ---- closed forms (voxel surfaces, MONAI's definitions) --------------------------------------------
def test_voxel_two_single_voxels():
    gt, pred = _one_voxel((9, 9, 9), (4, 4, 2)), _one_voxel((9, 9, 9), (4, 4, 5))
    sd = M.surface_distances_voxel(pred, gt, (1.0, 2.0, 0.5))
    # the only edge voxels are the voxels themselves, 3 voxels apart along axis 2 at 0.5 mm
    np.testing.assert_array_equal(sd.distances_gt_to_pred, [1.5])
    np.testing.assert_array_equal(sd.distances_pred_to_gt, [1.5])
    assert M.normalized_surface_dice(sd, 1.49) == 0.0
    assert M.normalized_surface_dice(sd, 1.5) == 1.0
    assert M.hausdorff_percentile(sd, 95) == 1.5
    assert M.average_symmetric_surface_distance(sd) == 1.5


def test_voxel_box_shifted_by_one_voxel_closed_form():
    # a 4x4x4 box and the same box one voxel further along axis 0 (spacing 2 mm there):
    # every edge voxel of one is on, or 2 mm from, an edge voxel of the other
    gt = np.zeros((10, 10, 10), bool)
    gt[2:6, 3:7, 3:7] = True
    pred = np.roll(gt, 1, axis=0)
    sd = M.surface_distances_voxel(pred, gt, (2.0, 1.0, 1.0))
    n_edge = 4 * 4 * 4 - 2 * 2 * 2  # 56 edge voxels each
    assert len(sd.distances_gt_to_pred) == len(sd.distances_pred_to_gt) == n_edge
    assert set(np.unique(sd.distances_gt_to_pred)) <= {0.0, 1.0, 2.0}
    assert M.normalized_surface_dice(sd, 2.0) == 1.0
    assert M.hausdorff_percentile(sd, 100) == 2.0
    assert M.dice(pred, gt) == pytest.approx(2 * 48 / 128)
    assert M.dice(pred, gt, "touchstone") == pytest.approx(2 * 48 / 129)


def test_voxel_object_touching_the_border_has_a_surface_there():
    gt = np.zeros((6, 6, 6), bool)
    gt[:, :, :3] = True  # a slab of three full planes, touching five faces of the volume
    sd = M.surface_distances_voxel(gt, gt, (1, 1, 1))
    # outside the volume is background: only the 4x4 core of the middle plane is not an edge
    assert len(sd.distances_gt_to_pred) == 6 * 6 * 3 - 4 * 4 * 1
    assert M.normalized_surface_dice(sd, 0.0) == 1.0


# ---- compute_case_metrics: layouts, empty-mask rules, errors --------------------------------------
def _toy_case(shape=(24, 22, 20), seed=0):
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, np.uint8)
    for i, label in enumerate(LABEL_IDS.values()):
        x0 = 1 + 2 * i
        gt[x0 : x0 + 2, 2 : 10 + i, 3 : 12] = label
    pred = np.roll(gt, tuple(int(v) for v in rng.integers(-1, 2, 3)), (0, 1, 2))
    return gt, pred


@pytest.mark.parametrize("name", ["touchstone", "nsd-deepmind"])
def test_label_map_and_mask_layouts_agree(name):
    gt, pred = _toy_case()
    protocol = load_protocol(name)
    from_maps = compute_case_metrics(pred, gt, (0.8, 0.9, 1.5), protocol)
    masks = lambda lm: {o: lm == i for o, i in LABEL_IDS.items()}  # noqa: E731
    from_masks = compute_case_metrics(masks(pred), masks(gt), (0.8, 0.9, 1.5), protocol)
    fortran = compute_case_metrics(np.asfortranarray(pred), np.asfortranarray(gt), (0.8, 0.9, 1.5), protocol)
    assert set(from_maps) == set(LABEL_IDS)
    for organ in LABEL_IDS:
        assert set(from_maps[organ]) == set(protocol.metrics)
        for m in protocol.metrics:
            assert from_maps[organ][m] == pytest.approx(from_masks[organ][m], abs=1e-12)
            assert from_maps[organ][m] == pytest.approx(fortran[organ][m], abs=1e-12)


def test_case_metrics_equal_the_per_organ_functions():
    gt, pred = _toy_case(seed=3)
    protocol = load_protocol("nsd-deepmind")
    spacing = (0.7, 1.1, 2.0)
    out = compute_case_metrics(pred, gt, spacing, protocol)
    for organ, label in LABEL_IDS.items():
        p, g = pred == label, gt == label
        sd = M.surface_distances_surfel(p, g, spacing)
        assert out[organ]["dsc"] == M.dice(p, g)
        assert out[organ]["nsd"] == pytest.approx(M.normalized_surface_dice(sd, protocol.nsd_tolerance_mm[organ]), abs=1e-12)
        assert out[organ]["hd95"] == M.hausdorff_percentile(sd, 95)
        assert out[organ]["assd"] == pytest.approx(M.average_symmetric_surface_distance(sd), abs=1e-12)
    nsd_only = CaseScorer(protocol, metrics=("nsd",))(pred, gt, spacing)
    for organ in LABEL_IDS:
        assert nsd_only[organ] == {"nsd": pytest.approx(out[organ]["nsd"], abs=1e-12)}


def test_overlapping_masks_are_scored_independently():
    gt = {"liver": np.zeros((12, 12, 12), bool), "stomach": np.zeros((12, 12, 12), bool)}
    gt["liver"][2:8, 2:8, 2:8] = True
    gt["stomach"][5:10, 5:10, 5:10] = True  # overlaps the liver
    out = compute_case_metrics(gt, gt, (1, 1, 1), load_protocol("nsd-deepmind"))
    assert out["liver"] == {"dsc": 1.0, "nsd": 1.0, "hd95": 0.0, "assd": 0.0}
    assert out["stomach"] == {"dsc": 1.0, "nsd": 1.0, "hd95": 0.0, "assd": 0.0}
    # organs missing from both mappings are "both empty"
    assert out["aorta"] == {"dsc": 1.0, "nsd": 1.0, "hd95": 0.0, "assd": 0.0}


@pytest.mark.parametrize("name", ["touchstone", "nsd-deepmind"])
def test_empty_mask_rules_come_from_the_protocol(name):
    protocol = load_protocol(name)
    shape = (10, 10, 10)
    organ_mask = np.zeros(shape, bool)
    organ_mask[3:6, 3:6, 3:6] = True
    empty = np.zeros(shape, bool)
    cases = {
        "both_empty": ({"liver": empty}, {"liver": empty}),
        "pred_empty": ({"liver": empty}, {"liver": organ_mask}),
        "gt_empty": ({"liver": organ_mask}, {}),
    }
    for situation, (pred, gt) in cases.items():
        out = compute_case_metrics(pred, gt, (1, 1, 1), protocol)["liver"]
        expected = getattr(protocol.empty, situation)
        for m in protocol.metrics:
            assert out[m] == expected[m] or (math.isnan(out[m]) and math.isnan(expected[m])), (situation, m)


def test_custom_protocol_with_hd95_and_assd_in_voxel_mode():
    data = load_protocol("touchstone").to_dict()
    protocol = Protocol.model_validate({**data, "name": "touchstone-distances", "metrics": ["dsc", "nsd", "hd95", "assd"]})
    gt, pred = _toy_case(seed=5)
    out = compute_case_metrics(pred, gt, (1.0, 1.0, 2.0), protocol)
    for organ, label in LABEL_IDS.items():
        sd = M.surface_distances_voxel(pred == label, gt == label, (1.0, 1.0, 2.0))
        assert out[organ]["hd95"] == M.hausdorff_percentile(sd, 95)
        assert out[organ]["dsc"] == M.dice(pred == label, gt == label, "touchstone")


def test_bad_inputs_raise_clear_errors():
    protocol = load_protocol("touchstone")
    gt, pred = _toy_case()
    with pytest.raises(ValueError, match="same voxel grid"):
        compute_case_metrics(pred[:-1], gt, (1, 1, 1), protocol)
    with pytest.raises(TypeError, match="integer dtype"):
        compute_case_metrics(pred.astype(np.float32), gt, (1, 1, 1), protocol)
    with pytest.raises(ValueError, match="spacing_mm"):
        compute_case_metrics(pred, gt, (1, 0, 1), protocol)
    with pytest.raises(ValueError, match="spacing_mm"):
        compute_case_metrics(pred, gt, (1, 1), protocol)
    with pytest.raises(ValueError, match="3-D"):
        compute_case_metrics(pred[None], gt, (1, 1, 1), protocol)
    with pytest.raises(TypeError, match="threshold"):
        compute_case_metrics({"liver": np.zeros(gt.shape, np.float32)}, gt, (1, 1, 1), protocol)
    with pytest.raises(TypeError, match="label map"):
        compute_case_metrics([1, 2, 3], gt, (1, 1, 1), protocol)
    with pytest.raises(ValueError, match="not enabled"):
        CaseScorer(protocol, metrics=("hd95",))


def test_metrics_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, evaluation.metrics, evaluation.protocols, evaluation.gpu; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
