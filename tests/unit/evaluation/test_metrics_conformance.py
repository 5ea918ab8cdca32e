"""Conformance: our metrics against the real oracles on randomised small cases.

* surfel mode vs DeepMind ``surface-distance`` (compute_surface_distances + its metric functions);
* voxel mode vs MONAI on CPU (compute_surface_dice, compute_hausdorff_distance(percentile=95),
  compute_average_surface_distance(symmetric=True)).

Shapes up to 36 voxels per axis, isotropic and anisotropic spacings (including exact multiples
of the tolerances, where "d <= τ" ties are decided), objects touching the volume border, single
voxels, one-voxel-thin planes and lines, speckle, and shifted/dilated copies. Fixed seeds.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import surface_distance as deepmind
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from evaluation import metrics as M
from evaluation.labels import LABEL_IDS
from evaluation.metrics import CaseScorer
from evaluation.protocols import load_protocol

TOLERANCES = (0.5, 1.0, 1.5, 2.0, 2.4, 3.0, 5.0)
GRID_SPACINGS = (0.5, 0.7, 0.8, 1.0, 1.5, 2.0, 3.0)


@pytest.fixture(autouse=True)
def _oracle_compat(monkeypatch):
    # surface-distance 0.1 (PyPI) still spells np.Inf / np.NaN, removed in numpy 2: alias them for the oracle
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)
    monkeypatch.setattr(np, "NaN", np.nan, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def random_mask(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    kind = int(rng.integers(0, 7))
    m = np.zeros(shape, bool)
    if kind == 0:  # smooth blob
        field = ndimage.gaussian_filter(rng.random(shape), rng.uniform(1.0, 2.5))
        m = field > np.quantile(field, rng.uniform(0.6, 0.95))
    elif kind == 1:  # box, often touching the border
        lo = rng.integers(0, 3, 3)
        hi = [int(rng.integers(low + 1, n + 1)) for low, n in zip(lo, shape)]
        m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    elif kind == 2:  # one voxel
        m[tuple(int(rng.integers(0, n)) for n in shape)] = True
    elif kind == 3:  # one-voxel-thin plane, touching the border
        m[int(rng.integers(0, shape[0])), :, : int(rng.integers(1, shape[2] + 1))] = True
    elif kind == 4:  # speckle
        m = rng.random(shape) < 0.03
    elif kind == 5:  # thin line
        m[int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1])), :] = True
    else:  # ball
        c = rng.uniform(0, 1, 3) * shape
        r = rng.uniform(1, 8)
        g = np.indices(shape)
        m = ((g - c[:, None, None, None]) ** 2).sum(0) < r * r
    return m


def random_pair(rng: np.random.Generator):
    shape = tuple(int(v) for v in rng.integers(3, 37, 3))
    gt = random_mask(rng, shape)
    if rng.random() < 0.4:
        pred = random_mask(rng, shape)
    else:
        base = ndimage.binary_dilation(gt) if rng.random() < 0.4 else gt
        pred = np.roll(base, tuple(int(v) for v in rng.integers(-2, 3, 3)), (0, 1, 2))
    if rng.random() < 0.5:
        spacing = tuple(float(v) for v in rng.choice(GRID_SPACINGS, 3))
    else:
        spacing = tuple(float(v) for v in rng.uniform(0.3, 3.0, 3))
    return gt, pred, spacing, float(rng.choice(TOLERANCES))


def same(a: float, b: float, tol: float = 1e-6) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tol


def monai_tensors(pred: np.ndarray, gt: np.ndarray):
    return torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None]


@pytest.mark.parametrize("seed", range(4))
def test_surfel_mode_equals_deepmind(seed):
    rng = np.random.default_rng(1000 + seed)
    for _ in range(12):
        gt, pred, spacing, tol = random_pair(rng)
        ref = deepmind.compute_surface_distances(gt, pred, spacing)
        ours = M.surface_distances_surfel(pred, gt, spacing)
        ctx = (gt.shape, spacing, tol, int(gt.sum()), int(pred.sum()))
        assert same(M.normalized_surface_dice(ours, tol), deepmind.compute_surface_dice_at_tolerance(ref, tol)), ctx
        assert same(M.hausdorff_percentile(ours, 95), deepmind.compute_robust_hausdorff(ref, 95)), ctx
        assert same(M.hausdorff_percentile(ours, 100), deepmind.compute_robust_hausdorff(ref, 100)), ctx
        for a, b in zip(M.average_surface_distance(ours), deepmind.compute_average_surface_distance(ref)):
            assert same(a, b), ctx
        assert same(M.dice(pred, gt), deepmind.compute_dice_coefficient(gt, pred)), ctx
        # the sorted multisets of distances and areas are the oracle's
        np.testing.assert_allclose(np.sort(ours.distances_gt_to_pred), ref["distances_gt_to_pred"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.sort(ours.areas_gt), np.sort(ref["surfel_areas_gt"]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_voxel_mode_equals_monai(seed):
    rng = np.random.default_rng(2000 + seed)
    for _ in range(10):
        gt, pred, spacing, tol = random_pair(rng)
        p, g = monai_tensors(pred, gt)
        ours = M.surface_distances_voxel(pred, gt, spacing)
        ctx = (gt.shape, spacing, tol, int(gt.sum()), int(pred.sum()))
        nsd = float(compute_surface_dice(p, g, [tol], include_background=True, spacing=spacing)[0, 0])
        hd95 = float(compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=spacing)[0, 0])
        assd = float(compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=spacing)[0, 0])
        assert same(M.normalized_surface_dice(ours, tol), nsd), ctx
        assert same(M.hausdorff_percentile(ours, 95), hd95), ctx
        # MONAI averages float32 distances in float32; we average the same float32 distances in
        # float64: equal to MONAI's float32 resolution (1e-6 relative)
        assert same(M.average_symmetric_surface_distance(ours), assd, tol=1e-6 * max(1.0, abs(assd))), ctx


@pytest.mark.parametrize("name", ["touchstone", "nsd-deepmind"])
def test_case_scoring_equals_oracles_in_both_layouts(name):
    """compute_case_metrics (NSD-only fast path and full path, label map and masks, C and Fortran order)."""
    protocol = load_protocol(name)
    rng = np.random.default_rng(3000)
    for _ in range(3):
        shape = tuple(int(v) for v in rng.integers(8, 30, 3))
        spacing = tuple(float(v) for v in rng.uniform(0.5, 2.5, 3))
        gt_m = {o: random_mask(rng, shape) for o in LABEL_IDS}
        pred_m = {o: np.roll(m, tuple(int(v) for v in rng.integers(-2, 3, 3)), (0, 1, 2)) for o, m in gt_m.items()}
        fortran = {o: np.asfortranarray(m) for o, m in pred_m.items()}, {o: np.asfortranarray(m) for o, m in gt_m.items()}
        for metrics in (None, ("nsd",)):
            scorer = CaseScorer(protocol, metrics=metrics)
            for out in (scorer(pred_m, gt_m, spacing), scorer(*fortran, spacing)):
                for organ in LABEL_IDS:
                    g, p = gt_m[organ], pred_m[organ]
                    if not (g.any() and p.any()):
                        continue
                    tol = protocol.nsd_tolerance_mm[organ]
                    if protocol.surface == "surfel":
                        ref = deepmind.compute_surface_dice_at_tolerance(deepmind.compute_surface_distances(g, p, spacing), tol)
                    else:
                        pt, gtt = monai_tensors(p, g)
                        ref = float(compute_surface_dice(pt, gtt, [tol], include_background=True, spacing=spacing)[0, 0])
                    assert same(out[organ]["nsd"], ref), (organ, metrics, spacing)
