"""The case viewer's slice rendering (services/web/slices.py): the window, the contours (where the
label is, solid for the truth, dashed for the prediction), the orientation and the proportions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from evaluation.io import CaseLabels, Geometry
from evaluation.labels import LABEL_IDS
from services.web import slices


def test_abdomen_window_maps_level_minus_half_width_to_black_and_plus_half_width_to_white():
    window = slices.ABDOMEN_WINDOW
    assert (window.width, window.level, window.label()) == (400, 40, "W400/L40")
    hu = np.array([-1000, -160, -60, 40, 140, 240, 3000], dtype=np.int16)
    # 255 * (hu - (40 - 200)) / 400, clipped
    assert slices.apply_window(hu).tolist() == [0, 0, 64, 128, 191, 255, 255]
    wide = slices.Window(width=2000, level=0)
    assert slices.apply_window(np.array([-1000.0, 0.0, 1000.0]), wide).tolist() == [0, 128, 255]


def _square(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


def _pixels_of(rgb, colour):
    return np.all(rgb == np.array(colour, np.uint8), axis=2)


def test_truth_contour_lies_on_the_inner_edge_of_the_label_in_its_organ_colour():
    hu = np.full((48, 48), 40, np.int16)  # the window's level: mid grey
    liver = _square(hu.shape, slice(10, 30), slice(15, 35))
    rgb = slices.render_slice(hu, {"liver": liver}, None, row_mm=1.0, col_mm=1.0, side=48)
    assert rgb.shape == (48, 48, 3)
    drawn = _pixels_of(rgb, slices.ORGAN_COLOURS["liver"])
    core = _square(hu.shape, slice(10 + slices.LINE_PX, 30 - slices.LINE_PX), slice(15 + slices.LINE_PX, 35 - slices.LINE_PX))
    np.testing.assert_array_equal(drawn, liver & ~core)  # a 2-px ring, nothing inside or outside
    grey = rgb[~drawn]
    assert np.all(grey == 128)  # the CT under the window, untouched elsewhere


def test_prediction_contour_is_dashed_just_outside_its_mask_so_a_perfect_prediction_stays_visible():
    hu = np.full((64, 64), 40, np.int16)
    spleen = _square(hu.shape, slice(16, 40), slice(20, 44))
    rgb = slices.render_slice(hu, {"spleen": spleen}, {"spleen": spleen}, row_mm=1.0, col_mm=1.0, side=64)
    drawn = _pixels_of(rgb, slices.ORGAN_COLOURS["spleen"])
    grown = _square(hu.shape, slice(16 - slices.LINE_PX, 40 + slices.LINE_PX), slice(20 - slices.LINE_PX, 44 + slices.LINE_PX))
    outside = grown & ~spleen
    # the prediction: only in the band outside the mask, and only part of it (dashes)
    band = drawn & outside
    assert 0.3 < band.sum() / outside.sum() < 0.7
    # the corners of a 4-neighbour dilation are not reached
    assert not drawn[16 - slices.LINE_PX, 20 - slices.LINE_PX]
    # the truth: the whole inner ring
    core = _square(hu.shape, slice(18, 38), slice(22, 42))
    assert np.all(drawn[spleen & ~core]) and not drawn[core].any()


def test_every_organ_in_its_own_colour_and_an_absent_organ_not_drawn():
    hu = np.zeros((40, 40), np.int16)
    truth = {"aorta": _square(hu.shape, slice(2, 10), slice(2, 10)),
             "kidney_left": _square(hu.shape, slice(20, 30), slice(20, 30))}
    rgb = slices.render_slice(hu, truth, {}, row_mm=1.0, col_mm=1.0, side=40)
    for organ in ("aorta", "kidney_left"):
        assert _pixels_of(rgb, slices.ORGAN_COLOURS[organ]).sum() > 0
    assert _pixels_of(rgb, slices.ORGAN_COLOURS["liver"]).sum() == 0
    assert len(set(slices.ORGAN_COLOURS.values())) == len(slices.ORGAN_COLOURS)  # one colour per organ


def test_anisotropic_pixels_keep_their_physical_proportions():
    hu = np.zeros((20, 100), np.int16)  # 20 rows of 5 mm, 100 columns of 1 mm: 100 mm x 100 mm
    rgb = slices.render_slice(hu, {}, None, row_mm=5.0, col_mm=1.0, side=200)
    assert rgb.shape[:2] == (200, 200)
    assert slices.display_size((10, 40), 1.0, 1.0, side=80) == (20, 80)


def _volumes(affine, ct, labels):
    geometry = Geometry(ct.shape, affine)
    truth = CaseLabels(layout="combined", geometry=geometry, label_map=labels)
    return slices.CaseVolumes(ct=slices.ras_view(ct, affine), spacing=slices.ras_spacing(geometry),
                              truth=slices.OrganMasks(truth), prediction=None)


def test_the_same_anatomy_stored_ras_or_lps_renders_the_same_png():
    rng = np.random.default_rng(0)
    ct = rng.integers(-200, 300, size=(12, 10, 8)).astype(np.int16)
    labels = np.zeros(ct.shape, np.uint8)
    labels[2:6, 3:7, 1:5] = LABEL_IDS["liver"]
    ras = np.diag([1.0, 1.5, 3.0, 1.0])
    lps = np.diag([-1.0, -1.5, 3.0, 1.0])
    lps[:3, 3] = [11.0, 13.5, 0.0]  # the same world positions, stored from the other corner
    flipped_ct, flipped_labels = ct[::-1, ::-1, :], labels[::-1, ::-1, :]
    a, b = _volumes(ras, ct, labels), _volumes(lps, np.ascontiguousarray(flipped_ct), np.ascontiguousarray(flipped_labels))
    assert a.shape == b.shape == (12, 10, 8) and a.spacing == b.spacing == (1.0, 1.5, 3.0)
    for plane in slices.PLANES:
        index = a.default_index(plane, "liver")
        assert index == b.default_index(plane, "liver")
        assert a.render(plane, index) == b.render(plane, index)


def test_axial_slice_shows_anterior_at_the_top_and_the_patients_right_on_the_left():
    ct = np.zeros((10, 10, 3), np.int16)
    ct[9, 0, 1] = 1000  # the patient's right (x max), posterior (y min), middle slice
    volumes = _volumes(np.eye(4), ct, np.zeros(ct.shape, np.uint8))
    image = np.asarray(Image.open(io.BytesIO(volumes.render("axial", 1))))
    bright = np.argwhere(image[..., 0] == 255)
    rows, cols = bright[:, 0], bright[:, 1]
    assert rows.min() > image.shape[0] * 0.8  # posterior: at the bottom
    assert cols.max() < image.shape[1] * 0.2  # right: on the left


def test_default_slice_goes_through_the_organ_centre_else_the_volume_centre():
    ct = np.zeros((20, 30, 40), np.int16)
    labels = np.zeros(ct.shape, np.uint8)
    labels[4:9, 10:21, 30:37] = LABEL_IDS["pancreas"]
    volumes = _volumes(np.eye(4), ct, labels)
    assert [volumes.default_index(p, "pancreas") for p in ("sagittal", "coronal", "axial")] == [6, 15, 33]
    assert [volumes.default_index(p, "spleen") for p in ("sagittal", "coronal", "axial")] == [10, 15, 20]
    assert [volumes.default_index(p, None) for p in ("sagittal", "coronal", "axial")] == [10, 15, 20]
    assert [volumes.n_slices(p) for p in slices.PLANES] == [40, 30, 20]


def test_overlapping_masks_are_drawn_per_organ():
    shape = (8, 8, 4)
    geometry = Geometry(shape, np.eye(4))
    a = np.zeros(shape, bool)
    a[1:6, 1:6, :] = True
    b = np.zeros(shape, bool)
    b[3:8, 3:8, :] = True
    masks = slices.OrganMasks(CaseLabels(layout="masks", geometry=geometry, masks={"liver": a, "stomach": b}))
    found = masks.slice(2, 1)
    assert set(found) == {"liver", "stomach"} and found["liver"][3, 3] and found["stomach"][3, 3]
    assert masks.centre("stomach") == (5, 5, 1) and masks.centre("spleen") is None


@pytest.mark.parametrize("name", ["liver_tumour", "anything"])
def test_classes_outside_the_organ_table_still_get_a_colour(name):
    assert slices.colour(name) in slices.EXTRA_COLOURS
    assert slices.colour("liver") == slices.ORGAN_COLOURS["liver"]
