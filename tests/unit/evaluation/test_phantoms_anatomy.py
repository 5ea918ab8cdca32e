"""evaluation.phantoms: determinism, plausible anatomy and HU, metadata, prediction kinds."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import io
from evaluation.labels import LABEL_IDS, ORGANS
from evaluation.manifest import read_manifest
from evaluation.phantoms import PREDICTION_KINDS, generate_cases, make_hospitals, make_prediction, write_phantom_set, write_predictions


@pytest.fixture(scope="module")
def cases():
    return list(generate_cases(6, n_hospitals=3, size="tiny", seed=11))


def _world_centroid(case, organ):
    idx = np.argwhere(case.labels == LABEL_IDS[organ]).mean(axis=0)
    return case.affine[:3, :3] @ idx + case.affine[:3, 3]


def _volume_ml(case, organ):
    return np.count_nonzero(case.labels == LABEL_IDS[organ]) * np.prod(case.spacing) / 1000


def test_same_seed_same_cases_and_prefix_stability(cases):
    again = list(generate_cases(4, n_hospitals=3, size="tiny", seed=11))  # fewer cases: the same first ones
    for a, b in zip(cases, again):
        assert a.case_id == b.case_id and a.metadata == b.metadata
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.ct, b.ct)
        np.testing.assert_array_equal(a.affine, b.affine)
    other = next(generate_cases(1, n_hospitals=3, size="tiny", seed=12))
    assert not np.array_equal(other.labels, cases[0].labels) if other.labels.shape == cases[0].labels.shape else True


def test_every_organ_present_with_plausible_volume(cases):
    ranges = {  # mL, adult anatomy incl. hepatomegaly / splenomegaly
        "liver": (900, 4000), "spleen": (80, 900), "kidney_left": (70, 400), "kidney_right": (70, 400),
        "pancreas": (20, 200), "gall_bladder": (8, 120), "stomach": (150, 1200), "aorta": (30, 300), "postcava": (30, 300),
    }
    for case in cases:
        for organ in ORGANS:
            lo, hi = ranges[organ]
            assert lo <= _volume_ml(case, organ) <= hi, (case.case_id, organ, _volume_ml(case, organ))
        assert case.labels.dtype == np.uint8 and set(np.unique(case.labels)) <= set(range(10))


def test_relative_positions_in_patient_coordinates(cases):
    """RAS+ world: +x patient's right, +y anterior, +z head -- whatever the stored orientation."""
    assert {make_hospitals(3, 11)[k].orientation for k in range(3)} | {"RAS", "LPS"} == {"RAS", "LPS"}
    for case in cases:
        c = {o: _world_centroid(case, o) for o in ORGANS}
        assert c["liver"][0] > 20 and c["spleen"][0] < -50  # liver right, spleen left
        assert c["kidney_right"][0] > 30 and c["kidney_left"][0] < -30
        assert c["kidney_left"][1] < c["pancreas"][1] and c["kidney_right"][1] < c["pancreas"][1]  # kidneys posterior
        assert c["aorta"][0] < 0 < c["postcava"][0]  # aorta left of the spine axis, postcava right
        assert c["aorta"][1] < c["pancreas"][1]  # the pancreas lies in front of the great vessels
        assert c["stomach"][0] < 0 and c["stomach"][2] > c["pancreas"][2]  # stomach left upper
        assert c["gall_bladder"][0] > 0 and c["gall_bladder"][2] < c["liver"][2]  # under the right liver
        # thin tubes along z: the aorta spans many slices and is narrow in-plane
        idx = np.argwhere(case.labels == LABEL_IDS["aorta"])
        z_extent = np.ptp(idx[:, 2]) * case.spacing[2]
        xy_extent = np.ptp(idx[:, 0]) * case.spacing[0]
        assert z_extent > 150 and xy_extent < 50


def test_hu_values_follow_tissue_and_phase(cases):
    for case in cases:
        med = {o: float(np.median(case.ct[case.labels == LABEL_IDS[o]])) for o in ORGANS}
        phase = case.metadata["contrast_phase"]
        assert 30 <= med["liver"] <= 140 and 30 <= med["spleen"] <= 150
        if phase == "arterial":
            assert med["aorta"] > 180
        if phase != "non_contrast":
            assert med["kidney_left"] > 100
        corner = case.ct[:3, :3, :]
        assert abs(np.median(corner) + 1000) < 10  # air outside the body (plus noise)
        assert case.ct.dtype == np.int16
    # bone: the spine behind the aorta is dense
    case = cases[0]
    assert case.ct.max() > 500


def test_metadata_fields_and_hospital_variation(cases):
    keys = {"hospital", "age", "sex", "race", "manufacturer", "scanner", "contrast_phase", "diagnosis"}
    for case in cases:
        assert keys <= set(case.metadata)
        assert 18 <= case.metadata["age"] <= 95 and case.metadata["sex"] in ("M", "F")
    hospitals = make_hospitals(3, 11)
    assert len({(h.fov_mm, h.slice_thickness_mm, h.noise_hu) for h in hospitals}) == 3
    spacings = {c.metadata["hospital"]: c.spacing for c in cases}
    assert len(set(spacings.values())) == len(spacings)  # each hospital its own grid


def test_sizes():
    small = next(generate_cases(1, size="small", seed=1))
    assert small.ct.shape[:2] == (128, 128) and 40 <= small.ct.shape[2] <= 120
    with pytest.raises(ValueError, match="unknown phantom size"):
        next(generate_cases(1, size="huge", seed=1))  # type: ignore[arg-type]


def test_write_phantom_set_and_manifest(tmp_path):
    manifest_path = write_phantom_set(tmp_path, 4, n_hospitals=2, seed=3, public_sample=2, combined=True)
    manifest = read_manifest(manifest_path, verify_checksums=True)
    assert len(manifest.rows) == 4 and sum(r.public_sample for r in manifest.rows) == 2
    for row in manifest.rows:
        assert row.hospital and row.age is not None and row.contrast_phase and row.diagnosis
        assert manifest.image_path(row).name == "ct.nii.gz"
        case_dir = tmp_path / row.case_id
        comb = io.read_labels(case_dir / "combined_labels.nii.gz")
        masks = io.read_labels(case_dir / "segmentations")
        np.testing.assert_array_equal(comb.label_map, masks.label_map)
        assert "spacing_mm" in row.extras


# ------------------------------------------------------------------ predictions


def _dsc(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_prediction_kinds(cases):
    case = cases[0]
    lab, aff = case.labels, case.affine
    liver = lab == LABEL_IDS["liver"]
    p, a = make_prediction(lab, aff, "perfect")
    np.testing.assert_array_equal(p, lab)
    p, _ = make_prediction(lab, aff, "shift", shift=(1, 0, 0))
    np.testing.assert_array_equal(p[1:], lab[:-1])
    p, _ = make_prediction(lab, aff, "erode")
    assert np.count_nonzero(p == LABEL_IDS["liver"]) < np.count_nonzero(liver)
    assert np.all(liver[p == LABEL_IDS["liver"]])  # erosion stays inside
    p, _ = make_prediction(lab, aff, "dilate", organ="liver")
    assert np.count_nonzero(p == LABEL_IDS["liver"]) > np.count_nonzero(liver)
    assert np.all(p[lab != 0] == lab[lab != 0])  # only grows into background
    p, _ = make_prediction(lab, aff, "miss_organ", organ="spleen")
    assert not np.any(p == LABEL_IDS["spleen"]) and np.array_equal(p == LABEL_IDS["liver"], liver)
    p, _ = make_prediction(lab, aff, "false_positive", magnitude=3, seed=4)
    assert np.count_nonzero(p) > np.count_nonzero(lab) and np.all(p[lab != 0] == lab[lab != 0])
    p, a = make_prediction(lab, aff, "wrong_affine")
    np.testing.assert_array_equal(p, lab)
    assert not np.allclose(a, aff)
    p, _ = make_prediction(lab, aff, "realistic", seed=2)
    assert 0.3 < _dsc(p == LABEL_IDS["liver"], liver) < 1.0
    with pytest.raises(ValueError, match="unknown prediction kind"):
        make_prediction(lab, aff, "bogus")
    assert "realistic" in PREDICTION_KINDS


def test_write_predictions_for_a_test_set_in_both_layouts(tmp_path):
    write_phantom_set(tmp_path / "gt", 3, seed=2)
    out = write_predictions(tmp_path / "gt", tmp_path / "pm", "perfect", layout="masks", missing_cases=1)
    assert len(out["written"]) == 2 and len(out["missing"]) == 1
    assert not (tmp_path / "pm" / out["missing"][0]).exists()
    write_predictions(tmp_path / "gt", tmp_path / "pc", "erode", layout="combined")
    for case_id in out["written"]:
        gt = io.read_labels(tmp_path / "gt" / case_id, untrusted=False)
        np.testing.assert_array_equal(io.read_labels(tmp_path / "pm" / case_id).label_map, gt.label_map)
        eroded = io.read_labels(tmp_path / "pc" / case_id)
        assert eroded.layout == "combined" and np.count_nonzero(eroded.label_map) < np.count_nonzero(gt.label_map)
