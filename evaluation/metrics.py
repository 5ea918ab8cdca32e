"""Per-organ segmentation metrics: DSC, NSD, HD95 and ASSD, exact to the oracle each mode mirrors.

Small pure functions in the style of DeepMind's ``surface_distance/metrics.py``, plus
:func:`compute_case_metrics`, which scores every organ of a protocol for one case in one call.

Notation: ``P`` is the predicted mask, ``G`` the ground-truth mask, ``∂P`` and ``∂G`` their surfaces,
``d(x, ∂Y) = min_{y∈∂Y} ‖(x − y)·s‖₂`` the distance in mm under voxel spacing ``s`` (mm per axis).

Two surface definitions (``Protocol.surface``):

``"voxel"`` (MONAI default, ``use_subvoxels=False``)
    ``∂P`` is the set of foreground voxels with at least one background 6-neighbour (outside the
    volume counts as background); every edge voxel weighs 1. Distances are measured between voxel
    centres and, as in MONAI, rounded to float32. Mirrors ``monai.metrics.compute_surface_dice``,
    ``compute_hausdorff_distance(percentile=95)`` and
    ``compute_average_surface_distance(symmetric=True)`` on CPU.

``"surfel"`` (Nikolov et al., DeepMind ``surface-distance``)
    ``∂P`` is the set of voxel *corners* whose 2x2x2 neighbourhood is mixed; each carries the area
    ``a`` (mm²) of the marching-cubes surface inside that neighbourhood. Mirrors
    ``surface_distance.compute_surface_distances`` and the functions built on it.

Metrics, for non-empty ``P`` and ``G`` (``w`` = area in surfel mode, 1 in voxel mode):

* DSC ``= 2|P∩G| / (|P| + |G|)``; the Touchstone variant adds 1 to the denominator.
* NSD at tolerance ``τ`` mm ``= (Σ_{x∈∂G, d(x,∂P)≤τ} w + Σ_{y∈∂P, d(y,∂G)≤τ} w) / (Σ_{∂G} w + Σ_{∂P} w)``.
* HD95 ``= max(q95(d(∂G→∂P)), q95(d(∂P→∂G)))``, the percentile weighted by ``w`` (surfel:
  DeepMind's ``compute_robust_hausdorff``; voxel: ``torch.quantile``'s linear interpolation in float32).
* ASSD ``= (Σ_{∂G} w·d(x,∂P) + Σ_{∂P} w·d(y,∂G)) / (Σ_{∂G} w + Σ_{∂P} w)`` in mm: the weighted mean
  over both surfaces (voxel: MONAI's ``compute_average_surface_distance(symmetric=True)``).

Empty masks: the per-organ functions below mirror their oracle (NaN or ``inf``, see each docstring);
:func:`compute_case_metrics` never computes on an empty mask and instead applies the protocol's
empty-mask rules (``Protocol.empty``), documented in ``docs/evaluation-metrics.md``.

This module imports neither torch nor MONAI; see :mod:`evaluation.gpu` for the optional torch path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from evaluation import _surface
from evaluation._surface import Box, NearestFn

if TYPE_CHECKING:  # pragma: no cover
    from evaluation.protocols import Protocol

__all__ = [
    "SurfaceDistances",
    "CaseScorer",
    "average_surface_distance",
    "average_symmetric_surface_distance",
    "compute_case_metrics",
    "dice",
    "hausdorff_percentile",
    "normalized_surface_dice",
    "surface_distances",
    "surface_distances_surfel",
    "surface_distances_voxel",
]

SurfaceDefinition = Literal["voxel", "surfel"]
SURFACE_METRICS = ("nsd", "hd95", "assd")


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _check_spacing(spacing_mm: Sequence[float]) -> np.ndarray:
    try:
        spacing = np.asarray([float(s) for s in spacing_mm], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"spacing_mm must be three positive numbers (mm per voxel along each axis), got {spacing_mm!r}"
        ) from None
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(
            f"spacing_mm must be three positive finite numbers (mm per voxel along each axis), got {spacing_mm!r}"
        )
    return spacing


def _as_bool_mask(mask: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(mask).__name__}")
    if mask.ndim != 3:
        raise ValueError(f"{name} must be a 3-D mask, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype.kind in "iu":
        return mask != 0
    raise TypeError(
        f"{name} must be a boolean (or integer, non-zero = foreground) mask, got dtype {mask.dtype}; "
        "threshold it first, e.g. mask >= 0.5"
    )


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = _as_bool_mask(pred, "pred")
    g = _as_bool_mask(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    return p, g


# --------------------------------------------------------------------------------------------
# DSC
# --------------------------------------------------------------------------------------------
def dice_from_counts(n_pred: int, n_gt: int, n_both: int, variant: str = "standard") -> float:
    """DSC from voxel counts: ``2·n_both / (n_pred + n_gt)`` (``+ 1`` in the denominator for ``"touchstone"``).

    ``"standard"`` with both counts 0 is ``nan`` (as ``surface_distance.compute_dice_coefficient``);
    ``"touchstone"`` is then 0 (as the published Touchstone ``dice_score``).
    """
    if variant == "touchstone":
        return 2.0 * n_both / (n_pred + n_gt + 1)
    if variant != "standard":
        raise ValueError(f"unknown DSC variant {variant!r}; use 'standard' or 'touchstone'")
    total = n_pred + n_gt
    return float("nan") if total == 0 else 2.0 * n_both / total


def dice(pred: np.ndarray, gt: np.ndarray, variant: str = "standard") -> float:
    """Sørensen–Dice coefficient of two 3-D masks (see :func:`dice_from_counts`), in [0, 1]."""
    p, g = _check_pair(pred, gt)
    return dice_from_counts(int(np.count_nonzero(p)), int(np.count_nonzero(g)), int(np.count_nonzero(p & g)), variant)


# --------------------------------------------------------------------------------------------
# surface distances
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SurfaceDistances:
    """Closest distances (mm) from each surface element of one mask to the other mask's surface.

    ``areas_*`` are surfel areas in mm² (surfel mode) or ones (voxel mode). Arrays are unsorted.
    A distance is ``inf`` when the other surface is empty, or when it exceeds the ``max_distance_mm``
    the distances were computed with (enough for NSD, which only asks "within τ?").
    Voxel-mode distances are float32 (as MONAI), surfel-mode float64 (as DeepMind).
    """

    definition: SurfaceDefinition
    distances_gt_to_pred: np.ndarray
    distances_pred_to_gt: np.ndarray
    areas_gt: np.ndarray
    areas_pred: np.ndarray


def _directed(
    query: np.ndarray,
    target: np.ndarray,
    spacing: np.ndarray,
    definition: SurfaceDefinition,
    bound: float,
    nearest: NearestFn,
) -> np.ndarray:
    """Distance (mm) from each query point to the nearest target point, ``inf`` beyond ``bound``."""
    out_dtype = np.float32 if definition == "voxel" else np.float64
    out = np.full(len(query), np.inf, dtype=out_dtype)
    if len(query) == 0 or len(target) == 0:
        return out
    idx = nearest(query, target, spacing, bound)
    found = idx >= 0
    q = query[found]
    t = target[idx[found]]
    if definition == "voxel":
        d = _surface.kdtree_distance(q.astype(np.float64), t.astype(np.float64), spacing)
        out[found] = d.astype(np.float32)
    else:
        out[found] = _surface.edt_distance(q - t, spacing)
    return out


def _bound_for(max_distance_mm: float) -> float:
    # the search bound must not lose a point whose oracle distance (float32-rounded in voxel mode)
    # is <= max_distance_mm, so it is a hair larger; distances found beyond it are still exact.
    if not np.isfinite(max_distance_mm):
        return float("inf")
    return float(max_distance_mm) * (1.0 + 1e-6) + 1e-9


def _distances_from_padded(
    pred_padded: np.ndarray,
    gt_padded: np.ndarray,
    spacing: np.ndarray,
    definition: SurfaceDefinition,
    max_distance_mm: float,
    nearest: NearestFn,
    reversed_axes: bool = False,
) -> SurfaceDistances:
    bound = _bound_for(max_distance_mm)

    def orient(coords: np.ndarray) -> np.ndarray:  # back to the volume's axis order
        return np.ascontiguousarray(coords[:, ::-1]) if reversed_axes else coords

    if definition == "voxel":
        pc = orient(_surface.voxel_edges(pred_padded))
        gc = orient(_surface.voxel_edges(gt_padded))
        if len(pc) == 0 and len(gc) == 0:
            empty = np.zeros(0, np.float32)
            return SurfaceDistances("voxel", empty, empty, empty, empty)
        if len(pc) == 0 or len(gc) == 0:
            # MONAI: with one edge set empty, *both* directions hold one inf per non-empty edge voxel
            n = max(len(pc), len(gc))
            infs = np.full(n, np.inf, np.float32)
            ones = np.ones(n, np.float32)
            return SurfaceDistances("voxel", infs, infs.copy(), ones, ones.copy())
        d_gp = _directed(gc, pc, spacing, "voxel", bound, nearest)
        d_pg = _directed(pc, gc, spacing, "voxel", bound, nearest)
        return SurfaceDistances("voxel", d_gp, d_pg, np.ones(len(gc), np.float32), np.ones(len(pc), np.float32))
    if definition != "surfel":
        raise ValueError(f"unknown surface definition {definition!r}; use 'voxel' or 'surfel'")
    sp = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    pc, pa, _ = _surface.surfels(pred_padded, sp, reversed_axes)
    gc, ga, _ = _surface.surfels(gt_padded, sp, reversed_axes)
    pc, gc = orient(pc), orient(gc)
    d_gp = _directed(gc, pc, spacing, "surfel", bound, nearest)
    d_pg = _directed(pc, gc, spacing, "surfel", bound, nearest)
    return SurfaceDistances("surfel", d_gp, d_pg, ga, pa)


def nsd_from_crops(
    pred_padded: np.ndarray,
    gt_padded: np.ndarray,
    spacing: np.ndarray,
    definition: SurfaceDefinition,
    tolerance_mm: float,
    margin: int,
    reversed_axes: bool = False,
) -> float:
    """NSD straight from the surfaces, without distances: only "is the other surface within τ?".

    ``*_padded`` are crops with ``margin >= 1 + ball_reach(τ)`` zero voxels on every side. Equal to
    ``normalized_surface_dice(surface distances, τ)``: each look-up uses the oracle's own distance
    formula for its offset (see ``_surface.within_flat``).
    """
    sp = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    if definition == "voxel":
        p_grid = _surface.voxel_edge_grid(pred_padded)
        g_grid = _surface.voxel_edge_grid(gt_padded)
        p_flat, g_flat = np.flatnonzero(p_grid), np.flatnonzero(g_grid)
        if len(p_flat) == 0 and len(g_flat) == 0:
            return float("nan")
        if len(p_flat) == 0 or len(g_flat) == 0:
            return 0.0
        origin = margin - 1  # MONAI's crop starts one voxel before the bounding box
        ok = int(np.count_nonzero(_surface.within_flat(g_flat, p_grid, sp, tolerance_mm, "voxel", origin, reversed_axes)))
        ok += int(np.count_nonzero(_surface.within_flat(p_flat, g_grid, sp, tolerance_mm, "voxel", origin, reversed_axes)))
        return ok / (len(p_flat) + len(g_flat))
    if definition != "surfel":
        raise ValueError(f"unknown surface definition {definition!r}; use 'voxel' or 'surfel'")
    p_code = _surface.neighbour_codes(pred_padded, reversed_axes)
    g_code = _surface.neighbour_codes(gt_padded, reversed_axes)
    p_flat = np.flatnonzero((p_code != 0) & (p_code != 255))
    g_flat = np.flatnonzero((g_code != 0) & (g_code != 255))
    table = _surface.surfel_area_table(sp)
    pa = table[p_code.reshape(-1)[p_flat]]
    ga = table[g_code.reshape(-1)[g_flat]]
    total = np.sum(ga) + np.sum(pa)
    if total == 0:
        return float("nan")
    p_grid = (p_code != 0) & (p_code != 255)
    g_grid = (g_code != 0) & (g_code != 255)
    overlap_gt = np.sum(ga[_surface.within_flat(g_flat, p_grid, sp, tolerance_mm, "surfel", 0, reversed_axes)])
    overlap_pred = np.sum(pa[_surface.within_flat(p_flat, g_grid, sp, tolerance_mm, "surfel", 0, reversed_axes)])
    return float((overlap_gt + overlap_pred) / total)


def surface_distances(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing_mm: Sequence[float],
    definition: SurfaceDefinition,
    max_distance_mm: float = float("inf"),
    nearest: NearestFn | None = None,
) -> SurfaceDistances:
    """Surface distances of two 3-D masks under ``definition`` (``"voxel"`` or ``"surfel"``).

    The work is done on the union bounding box of both masks padded by one zero voxel, which
    gives the same surfaces as the uncropped, zero-padded volume. ``max_distance_mm`` lets the
    nearest-point search stop early: larger distances come back as ``inf``.
    """
    p, g = _check_pair(pred, gt)
    spacing = _check_spacing(spacing_mm)
    box = _surface.union_box(_surface.bounding_box(p), _surface.bounding_box(g))
    if box is None:
        empty = np.zeros(0, np.float32 if definition == "voxel" else np.float64)
        return SurfaceDistances(definition, empty, empty, empty, empty)
    return _distances_from_padded(
        _surface.padded_crop(p, box),
        _surface.padded_crop(g, box),
        spacing,
        definition,
        max_distance_mm,
        nearest or _surface.nearest_kdtree,
    )


def surface_distances_voxel(
    pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float], max_distance_mm: float = float("inf")
) -> SurfaceDistances:
    """Voxel-boundary surface distances, as MONAI's ``get_edge_surface_distance(symmetric=True)`` on CPU.

    Edge voxels: ``seg ^ binary_erosion(seg)`` (6-connectivity, outside = background); distances
    between voxel centres ``‖(i − j)·s‖₂`` in mm, rounded to float32. If one mask is empty both
    directions hold ``inf`` for every edge voxel of the other (MONAI's convention).
    """
    return surface_distances(pred, gt, spacing_mm, "voxel", max_distance_mm)


def surface_distances_surfel(
    pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float], max_distance_mm: float = float("inf")
) -> SurfaceDistances:
    """Surfel surface distances, as ``surface_distance.compute_surface_distances(gt, pred, spacing)``.

    Surfels sit on voxel corners with mixed 2x2x2 neighbourhoods and carry marching-cubes areas
    (mm²); distances between corners in mm (float64). If one mask is empty the other's distances are
    ``inf`` and its own list is empty (DeepMind's convention).
    """
    return surface_distances(pred, gt, spacing_mm, "surfel", max_distance_mm)


# --------------------------------------------------------------------------------------------
# metrics on surface distances
# --------------------------------------------------------------------------------------------
def normalized_surface_dice(sd: SurfaceDistances, tolerance_mm: float) -> float:
    """NSD at ``tolerance_mm``: the weighted fraction of both surfaces within ``τ`` of the other.

    ``(Σ_{∂G: d≤τ} w + Σ_{∂P: d≤τ} w) / (Σ_{∂G} w + Σ_{∂P} w)`` in [0, 1]; ``nan`` if both surfaces
    are empty, 0 if one is. Voxel mode compares the float32 distance with ``float32(τ)`` as MONAI.
    """
    if sd.definition == "voxel":
        tol = np.float32(tolerance_mm)
        total = len(sd.distances_gt_to_pred) + len(sd.distances_pred_to_gt)
        if total == 0:
            return float("nan")
        ok = int(np.count_nonzero(sd.distances_gt_to_pred <= tol)) + int(np.count_nonzero(sd.distances_pred_to_gt <= tol))
        return ok / total
    tol64 = float(tolerance_mm)
    overlap_gt = np.sum(sd.areas_gt[sd.distances_gt_to_pred <= tol64])
    overlap_pred = np.sum(sd.areas_pred[sd.distances_pred_to_gt <= tol64])
    total = np.sum(sd.areas_gt) + np.sum(sd.areas_pred)
    if total == 0:
        return float("nan")
    return float((overlap_gt + overlap_pred) / total)


def _weighted_percentile_surfel(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """DeepMind's robust-Hausdorff percentile of one direction (``inf`` for an empty list)."""
    if len(distances) == 0:
        return float("inf")
    order = np.lexsort((areas, distances))  # the order of sorted(zip(distances, areas))
    d = distances[order]
    a = areas[order]
    cum = np.cumsum(a) / np.sum(a)
    idx = int(np.searchsorted(cum, percent / 100.0))
    return float(d[min(idx, len(d) - 1)])


def _quantile_float32(distances: np.ndarray, q: float) -> float:
    """``torch.quantile(x, q)`` (linear interpolation) for a float32 vector, in float32 arithmetic."""
    if len(distances) == 0:
        return float("nan")
    x = np.sort(distances.astype(np.float32, copy=False))
    rank = np.float32(q) * np.float32(len(x) - 1)
    lo = int(np.floor(rank))
    hi = int(np.ceil(rank))
    below, above = x[lo], x[hi]
    weight = np.float32(rank - np.float32(lo))
    if not (np.isfinite(below) and np.isfinite(above)):
        return float(below if weight == 0 else (above if below <= above else below))
    if weight < np.float32(0.5):
        value = below + weight * (above - below)
    else:
        value = above - (above - below) * (np.float32(1.0) - weight)
    return float(np.float32(value))


def hausdorff_percentile(sd: SurfaceDistances, percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance (mm): ``max(q_p(d(∂G→∂P)), q_p(d(∂P→∂G)))``.

    Surfel mode: area-weighted percentile as DeepMind's ``compute_robust_hausdorff`` (the smallest
    sorted distance whose cumulative area fraction reaches ``p/100``); ``inf`` if a surface is
    empty. Voxel mode: ``torch.quantile`` (linear interpolation, float32) per direction, as
    MONAI's ``compute_hausdorff_distance``; ``nan`` if both are empty, ``inf`` if one is.
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
    if sd.definition == "voxel":
        a = _quantile_float32(sd.distances_pred_to_gt, percentile / 100)
        b = _quantile_float32(sd.distances_gt_to_pred, percentile / 100)
        if np.isnan(a) or np.isnan(b):
            return float("nan")
        return max(a, b)
    return max(
        _weighted_percentile_surfel(sd.distances_gt_to_pred, sd.areas_gt, percentile),
        _weighted_percentile_surfel(sd.distances_pred_to_gt, sd.areas_pred, percentile),
    )


def average_surface_distance(sd: SurfaceDistances) -> tuple[float, float]:
    """Directed average surface distances (mm): ``(mean_w d(∂G→∂P), mean_w d(∂P→∂G))``.

    Weighted by surfel area (surfel mode, as DeepMind's ``compute_average_surface_distance``) or
    uniformly (voxel mode). An empty list gives ``nan``; an empty other surface gives ``inf``.
    """

    def mean(d: np.ndarray, w: np.ndarray) -> float:
        if len(d) == 0:
            return float("nan")
        d64 = d.astype(np.float64)
        w64 = w.astype(np.float64)
        return float(np.sum(d64 * w64) / np.sum(w64))

    return mean(sd.distances_gt_to_pred, sd.areas_gt), mean(sd.distances_pred_to_gt, sd.areas_pred)


def average_symmetric_surface_distance(sd: SurfaceDistances) -> float:
    """ASSD (mm): weighted mean distance over both surfaces together.

    ``(Σ_{∂G} w·d + Σ_{∂P} w·d) / (Σ_{∂G} w + Σ_{∂P} w)``; voxel mode equals MONAI's
    ``compute_average_surface_distance(symmetric=True)`` (computed in float64 from the same
    float32 distances). ``nan`` if both surfaces are empty, ``inf`` if one is.
    """
    d = np.concatenate([sd.distances_gt_to_pred, sd.distances_pred_to_gt]).astype(np.float64)
    w = np.concatenate([sd.areas_gt, sd.areas_pred]).astype(np.float64)
    if len(d) == 0 or np.sum(w) == 0:
        return float("nan")
    return float(np.sum(d * w) / np.sum(w))


# --------------------------------------------------------------------------------------------
# one call for all organs of a case
# --------------------------------------------------------------------------------------------
def _is_fortran(a: np.ndarray) -> bool:
    return bool(a.flags.f_contiguous and not a.flags.c_contiguous)


class _Source:
    """One side of a case (prediction or ground truth) in either layout, with per-organ access."""

    def __init__(self, data: np.ndarray | Mapping[str, np.ndarray], name: str, labels: dict[str, int]):
        self.name = name
        if isinstance(data, np.ndarray):
            if data.ndim != 3:
                raise ValueError(f"{name} label map must be 3-D, got shape {data.shape}")
            if data.dtype.kind not in "iu":
                raise TypeError(
                    f"{name} label map must have an integer dtype, got {data.dtype}; "
                    "round and cast it (e.g. np.rint(x).astype(np.uint8)) or pass one boolean mask per organ"
                )
            self.label_map: np.ndarray | None = data
            self.masks: Mapping[str, np.ndarray] | None = None
            self.shape: tuple[int, ...] = data.shape
            self._boxes = _surface.label_boxes(data, sorted(set(labels.values())))
        elif isinstance(data, Mapping):
            self.label_map = None
            self.masks = data
            self.shape = ()
            self._boxes = {}
        else:
            raise TypeError(
                f"{name} must be an integer label map (numpy array) or a mapping organ -> boolean mask, "
                f"got {type(data).__name__}"
            )

    def organ(self, organ: str, label: int) -> tuple[np.ndarray | None, int | None, Box | None]:
        """(array, label to compare with or None for a mask, bounding box or None if empty)."""
        if self.label_map is not None:
            return self.label_map, label, self._boxes.get(label)
        assert self.masks is not None
        mask = self.masks.get(organ)
        if mask is None:
            return None, None, None
        mask = _as_bool_mask(mask, f"{self.name}[{organ!r}]")
        return mask, None, _surface.bounding_box(mask)


class CaseScorer:
    """Scores cases under one protocol; holds the protocol and the nearest-point backend.

    ``CaseScorer(protocol)(pred, gt, spacing_mm)`` is :func:`compute_case_metrics`. ``metrics``
    narrows the protocol's metric list (e.g. ``("nsd",)`` for a benchmark); ``nearest`` swaps the
    nearest-surface-point backend (default: scipy's KD-tree; :mod:`evaluation.gpu` has a torch one).
    """

    def __init__(self, protocol: Protocol, metrics: Sequence[str] | None = None, nearest: NearestFn | None = None):
        self.protocol = protocol
        self.metrics = tuple(protocol.metrics if metrics is None else metrics)
        unknown = [m for m in self.metrics if m not in protocol.metrics]
        if unknown:
            raise ValueError(f"metrics {unknown} are not enabled in protocol {protocol.key}")
        self.nearest = nearest or _surface.nearest_kdtree

    def __call__(
        self,
        pred: np.ndarray | Mapping[str, np.ndarray],
        gt: np.ndarray | Mapping[str, np.ndarray],
        spacing_mm: Sequence[float],
    ) -> dict[str, dict[str, float]]:
        protocol = self.protocol
        spacing = _check_spacing(spacing_mm)
        p_src = _Source(pred, "pred", protocol.organs)
        g_src = _Source(gt, "gt", protocol.organs)
        shape: tuple[int, ...] | None = None
        results: dict[str, dict[str, float]] = {}
        for organ, label in protocol.organs.items():
            p_arr, p_label, p_box = p_src.organ(organ, label)
            g_arr, g_label, g_box = g_src.organ(organ, label)
            for arr, who in ((p_arr, "pred"), (g_arr, "gt")):
                if arr is None:
                    continue
                if shape is None:
                    shape = arr.shape
                elif arr.shape != shape:
                    raise ValueError(
                        f"{who} for {organ!r} has shape {arr.shape}, but the case's other arrays have {shape}; "
                        "prediction and ground truth must be on the same voxel grid"
                    )
            if p_box is None and g_box is None:
                results[organ] = {m: protocol.empty.both_empty[m] for m in self.metrics}
                continue
            if p_box is None:
                results[organ] = {m: protocol.empty.pred_empty[m] for m in self.metrics}
                continue
            if g_box is None:
                results[organ] = {m: protocol.empty.gt_empty[m] for m in self.metrics}
                continue
            assert p_arr is not None and g_arr is not None
            box = _surface.union_box(p_box, g_box)
            assert box is not None
            margin = 1
            if self._nsd_only:
                sp = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
                margin = 1 + _surface.ball_reach(sp, protocol.nsd_tolerance_mm[organ], protocol.surface)
            # Fortran-ordered volumes (as nibabel gives them) are cropped through their C-ordered
            # transpose, so every copy reads memory in order; the geometry stays in volume axes.
            rev = _is_fortran(g_arr) or (_is_fortran(p_arr) and not g_arr.flags.c_contiguous)
            if rev:
                tbox = (box[2], box[1], box[0])
                p_pad = _surface.padded_crop(p_arr.T, tbox, p_label, margin)
                g_pad = _surface.padded_crop(g_arr.T, tbox, g_label, margin)
            else:
                p_pad = _surface.padded_crop(p_arr, box, p_label, margin)
                g_pad = _surface.padded_crop(g_arr, box, g_label, margin)
            del p_arr, g_arr
            results[organ] = self._score_organ(organ, p_pad, g_pad, spacing, margin, rev)
        return results

    @property
    def _nsd_only(self) -> bool:
        return [m for m in self.metrics if m in SURFACE_METRICS] == ["nsd"]

    def _score_organ(
        self, organ: str, p_pad: np.ndarray, g_pad: np.ndarray, spacing: np.ndarray, margin: int, rev: bool
    ) -> dict[str, float]:
        protocol = self.protocol
        out: dict[str, float] = {}
        if "dsc" in self.metrics:
            pb, gb = p_pad.view(np.bool_), g_pad.view(np.bool_)
            out["dsc"] = dice_from_counts(
                int(np.count_nonzero(pb)), int(np.count_nonzero(gb)), int(np.count_nonzero(pb & gb)), protocol.dsc_variant
            )
        wanted = [m for m in self.metrics if m in SURFACE_METRICS]
        if wanted:
            tol = protocol.nsd_tolerance_mm[organ]
            if wanted == ["nsd"]:
                # only "within τ?" matters: offset look-ups, no nearest-point search
                out["nsd"] = nsd_from_crops(p_pad, g_pad, spacing, protocol.surface, tol, margin, rev)
                return {m: out[m] for m in self.metrics}
            sd = _distances_from_padded(p_pad, g_pad, spacing, protocol.surface, float("inf"), self.nearest, rev)
            if "nsd" in wanted:
                out["nsd"] = normalized_surface_dice(sd, tol)
            if "hd95" in wanted:
                out["hd95"] = hausdorff_percentile(sd, 95.0)
            if "assd" in wanted:
                out["assd"] = average_symmetric_surface_distance(sd)
        return {m: out[m] for m in self.metrics}


def compute_case_metrics(
    pred: np.ndarray | Mapping[str, np.ndarray],
    gt: np.ndarray | Mapping[str, np.ndarray],
    spacing_mm: tuple[float, float, float],
    protocol: Protocol,
) -> dict[str, dict[str, float]]:
    """Score every organ of ``protocol`` for one case: ``{organ: {metric: value}}``.

    ``pred`` and ``gt`` are each an integer label map (any int dtype; organ ``o`` is voxel value
    ``protocol.organs[o]``) or a mapping organ → boolean mask (masks may overlap; a missing organ
    is empty). Both must lie on the same voxel grid with spacing ``spacing_mm`` (mm per axis).
    When both masks of an organ are non-empty the metrics are computed (see the module docstring);
    otherwise the protocol's empty-mask rule for that situation gives each value. Mapping values
    are read one organ at a time, so a lazily loading mapping keeps memory to one organ pair.
    """
    return CaseScorer(protocol)(pred, gt, spacing_mm)
