"""Lesion-wise metrics: connected components of truth and prediction, matched one-to-one.

Small pure functions in the style of DeepMind's ``surface_distance/metrics.py``, plus
:func:`evaluate_lesions`, which scores one lesion class of one case. The metric names, directions
and ranges are those of :mod:`evaluation.metric_registry` (``LESION_METRICS``).

Definitions, for one lesion class of one case (``G`` the truth mask, ``P`` the predicted mask):

Components
    ``G`` and ``P`` are split into connected components (``scipy.ndimage.label``) with
    ``connectivity`` 26 (default: voxels sharing a face, an edge or a corner are connected), 18
    (face or edge) or 6 (face only). Each component is one lesion: ``g_1..g_m`` in the truth,
    ``p_1..p_n`` in the prediction, numbered in raster (C) order of their first voxel.

Matching (:func:`match_components`)
    Only overlapping pairs are candidates. ``IoU(g, p) = |g∩p| / |g∪p|``. Candidates are taken in
    decreasing IoU (ties: lower prediction number, then lower truth number first) and a pair is
    kept when neither side is matched yet and its IoU passes the threshold: ``IoU > t`` when
    ``strict`` (the default, with ``t = 0``: "any overlap") or ``IoU ≥ t`` otherwise (e.g.
    ``t = 0.5``, where the match is unique because two components cannot both overlap one by more
    than half). This is panoptica's ``NaiveThresholdMatching(Metric.IOU, t, strict_threshold)``.

Counts and rates
    ``TP`` = matched pairs, ``FP = n − TP``, ``FN = m − TP``;
    sensitivity ``= TP / m``; precision ``= TP / n``; F1 ``= 2TP / (2TP + FP + FN)`` (the
    recognition quality RQ); per-lesion DSC ``= (Σ_matched 2|g∩p| / (|g| + |p|)) / m`` (a missed
    lesion scores 0; standard DSC whatever the protocol's ``dsc_variant``); panoptic quality
    PQ ``= RQ × SQ`` with SQ the mean IoU of the matched pairs (Kirillov et al. 2019).
    The false positives per case are ``FP`` (its mean over cases is "FP per case").

Empty cases (NaN means "not scored": left out of the means over cases):

    ============  ==========  =====  ===========  =========  ====  ==============  ====
    truth         prediction  TP/FP/FN  sensitivity  precision  F1   per-lesion DSC  PQ
    ============  ==========  =====  ===========  =========  ====  ==============  ====
    no lesion     no lesion   0/0/0  NaN          NaN        NaN   NaN             NaN
    no lesion     n lesions   0/n/0  NaN          0          0     NaN             0
    m lesions     no lesion   0/0/m  0            NaN        0     0               0
    m lesions     n, none hit 0/n/m  0            0          0     0               0
    m lesions     n lesions   computed as above
    ============  ==========  =====  ===========  =========  ====  ==============  ====

These are panoptica's values in each situation (checked in tests/unit/evaluation/test_lesions.py).
The case-level DSC/NSD of the lesion class (the whole mask) come from :mod:`evaluation.metrics`
with the protocol's empty-mask rules, as for organs.

Units: voxel counts and mm³ / mm (from ``spacing_mm``, mm per voxel along each array axis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from evaluation.metrics import _as_bool_mask  # the one mask check of every metric

__all__ = [
    "CONNECTIVITIES",
    "Lesion",
    "LesionMatch",
    "LesionMatching",
    "LesionResult",
    "connected_components",
    "evaluate_lesions",
    "lesion_metrics",
    "match_components",
]

#: neighbourhood size -> rank-3 connectivity of ``scipy.ndimage.generate_binary_structure``
CONNECTIVITIES: dict[int, int] = {6: 1, 18: 2, 26: 3}


@dataclass(frozen=True)
class LesionMatching:
    """How lesions are found and matched (a protocol's ``lesion_matching``).

    ``connectivity``: 6, 18 or 26 (see the module docstring).
    ``iou_threshold`` ``t`` in [0, 1] and ``strict``: keep a pair when ``IoU > t`` (strict) or
    ``IoU ≥ t``. Default: ``IoU > 0``, any overlap.
    """

    connectivity: int = 26
    iou_threshold: float = 0.0
    strict: bool = True

    def __post_init__(self) -> None:
        if self.connectivity not in CONNECTIVITIES:
            raise ValueError(f"connectivity must be one of {sorted(CONNECTIVITIES)}, got {self.connectivity!r}")
        t = float(self.iou_threshold)
        if not (0.0 <= t <= 1.0):
            raise ValueError(f"iou_threshold must lie in [0, 1], got {self.iou_threshold!r}")
        if t == 1.0 and self.strict:
            raise ValueError("iou_threshold 1 with strict (IoU > 1) can never match; use strict: false")

    @property
    def rule(self) -> str:
        """The rule in words, e.g. ``"IoU > 0"``."""
        return f"IoU {'>' if self.strict else '≥'} {self.iou_threshold:g}"


@dataclass(frozen=True)
class Lesion:
    """One connected component of one side.

    ``side``: ``"truth"`` or ``"prediction"``; ``index``: its component number (1-based);
    ``voxels``; ``volume_mm3``; ``diameter_mm``: the diameter of the ball of that volume;
    ``matched_to``: the index of the matched component on the other side, or ``None``;
    ``iou`` and ``dsc`` with the matched component (0 when unmatched).
    """

    side: str
    index: int
    voxels: int
    volume_mm3: float
    diameter_mm: float
    matched_to: int | None
    iou: float
    dsc: float

    @property
    def matched(self) -> bool:
        return self.matched_to is not None


@dataclass(frozen=True)
class LesionMatch:
    """The outcome of :func:`match_components`.

    ``truth_voxels[i - 1]`` / ``pred_voxels[j - 1]``: size of truth component ``i`` / predicted
    component ``j``; ``pairs``: the matched ``(i, j, |g_i ∩ p_j|)``, in matching order.
    """

    truth_voxels: np.ndarray
    pred_voxels: np.ndarray
    pairs: tuple[tuple[int, int, int], ...]

    @property
    def n_truth(self) -> int:
        return int(self.truth_voxels.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_voxels.size)

    def pair_iou(self, i: int, j: int, both: int) -> float:
        a, b = int(self.truth_voxels[i - 1]), int(self.pred_voxels[j - 1])
        return both / (a + b - both)

    def pair_dsc(self, i: int, j: int, both: int) -> float:
        a, b = int(self.truth_voxels[i - 1]), int(self.pred_voxels[j - 1])
        return 2.0 * both / (a + b)


@dataclass(frozen=True)
class LesionResult:
    """One lesion class of one case: ``metrics`` (name → value, see the module docstring) and
    ``lesions`` (every truth component, then every predicted component)."""

    metrics: dict[str, float]
    lesions: tuple[Lesion, ...]


# --------------------------------------------------------------------------------------------
# components and matching
# --------------------------------------------------------------------------------------------
def connected_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """``(labels, n)``: component number (1..n, raster order of first voxel; 0 background) of
    every voxel of a 3-D boolean mask, with 6-, 18- or 26-connectivity (``scipy.ndimage.label``,
    run on the box around the mask: the same components, raster order kept)."""
    mask = _as_bool_mask(mask, "mask")
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {sorted(CONNECTIVITIES)}, got {connectivity!r}")
    structure = ndimage.generate_binary_structure(3, CONNECTIVITIES[connectivity])
    labels = np.zeros(mask.shape, np.int32)
    box = _bounding_box(mask)
    if box is None:
        return labels, 0
    sub, n = ndimage.label(mask[box], structure=structure, output=np.int32)
    labels[box] = sub
    return labels, int(n)


def match_components(
    truth_labels: np.ndarray,
    n_truth: int,
    pred_labels: np.ndarray,
    n_pred: int,
    iou_threshold: float = 0.0,
    strict: bool = True,
) -> LesionMatch:
    """Match truth components to predicted components one-to-one (see the module docstring).

    ``truth_labels``/``pred_labels``: component numbers as :func:`connected_components` gives them,
    on the same grid. Cost: one pass over the voxels plus a sort of the overlapping pairs.
    """
    if truth_labels.shape != pred_labels.shape:
        raise ValueError(f"truth and prediction must have the same shape, got {truth_labels.shape} and {pred_labels.shape}")
    truth_voxels = np.bincount(truth_labels.ravel(), minlength=n_truth + 1)[1:].astype(np.int64)
    pred_voxels = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:].astype(np.int64)
    if n_truth == 0 or n_pred == 0:
        return LesionMatch(truth_voxels, pred_voxels, ())
    both = (truth_labels > 0) & (pred_labels > 0)
    code = pred_labels[both].astype(np.int64) * (n_truth + 1) + truth_labels[both]
    codes, counts = np.unique(code, return_counts=True)  # sorted by (prediction, truth)
    pj, gi = codes // (n_truth + 1), codes % (n_truth + 1)
    a, b = truth_voxels[gi - 1], pred_voxels[pj - 1]
    iou = counts / (a + b - counts)
    order = np.argsort(-iou, kind="stable")  # decreasing IoU; ties keep (prediction, truth) order
    t = float(iou_threshold)
    used_truth: set[int] = set()
    used_pred: set[int] = set()
    pairs: list[tuple[int, int, int]] = []
    for k in order:
        passes = iou[k] > t if strict else iou[k] >= t
        if not passes:
            break  # the rest are smaller
        i, j = int(gi[k]), int(pj[k])
        if i in used_truth or j in used_pred:
            continue
        used_truth.add(i)
        used_pred.add(j)
        pairs.append((i, j, int(counts[k])))
    return LesionMatch(truth_voxels, pred_voxels, tuple(pairs))


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def lesion_metrics(match: LesionMatch) -> dict[str, float]:
    """The lesion metrics of one matching (names of ``LESION_METRICS``; NaN per the empty-case
    table in the module docstring)."""
    m, n, tp = match.n_truth, match.n_pred, len(match.pairs)
    fp, fn = n - tp, m - tp
    nan = math.nan
    any_lesion = (m + n) > 0
    f1 = (2.0 * tp / (2 * tp + fp + fn)) if any_lesion else nan
    if tp:
        sq = sum(match.pair_iou(*p) for p in match.pairs) / tp
        dsc_sum = sum(match.pair_dsc(*p) for p in match.pairs)
    else:
        sq, dsc_sum = 0.0, 0.0
    return {
        "lesion_tp": float(tp),
        "lesion_fp": float(fp),
        "lesion_fn": float(fn),
        "lesion_sensitivity": (tp / m) if m else nan,
        "lesion_precision": (tp / n) if n else nan,
        "lesion_f1": f1,
        "lesion_dsc": (dsc_sum / m) if m else nan,
        "lesion_pq": (f1 * sq) if any_lesion else nan,
    }


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if hit.size == 0:
            return None
        slices.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(slices)


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None or b is None:
        return a or b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _lesions(match: LesionMatch, voxel_mm3: float) -> tuple[Lesion, ...]:
    by_truth = {i: (j, match.pair_iou(i, j, c), match.pair_dsc(i, j, c)) for i, j, c in match.pairs}
    by_pred = {j: (i, iou, dsc) for i, (j, iou, dsc) in by_truth.items()}

    def record(side: str, index: int, voxels: int, hit: tuple[int, float, float] | None) -> Lesion:
        volume = voxels * voxel_mm3
        return Lesion(
            side=side, index=index, voxels=voxels, volume_mm3=volume, diameter_mm=(6.0 * volume / math.pi) ** (1.0 / 3.0),
            matched_to=hit[0] if hit else None, iou=hit[1] if hit else 0.0, dsc=hit[2] if hit else 0.0,
        )

    return (
        *(record("truth", i + 1, int(v), by_truth.get(i + 1)) for i, v in enumerate(match.truth_voxels)),
        *(record("prediction", j + 1, int(v), by_pred.get(j + 1)) for j, v in enumerate(match.pred_voxels)),
    )


def evaluate_lesions(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    matching: LesionMatching = LesionMatching(),
) -> LesionResult:
    """Lesion metrics and per-lesion records of one lesion class of one case.

    ``pred``/``gt``: 3-D boolean (or integer, non-zero = lesion) masks of that class on the same
    grid. Both are cropped to the box around their union first (components do not change: every
    lesion voxel is inside), so the cost follows the lesions' extent, not the volume's.
    """
    p, g = _as_bool_mask(pred, "pred"), _as_bool_mask(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    spacing = [float(s) for s in spacing_mm]
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be three positive finite numbers (mm per voxel), got {spacing_mm!r}")
    box = _union_box(_bounding_box(p), _bounding_box(g))
    if box is None:
        match = LesionMatch(np.zeros(0, np.int64), np.zeros(0, np.int64), ())
    else:
        g_cc, n_g = connected_components(g[box], matching.connectivity)
        p_cc, n_p = connected_components(p[box], matching.connectivity)
        match = match_components(g_cc, n_g, p_cc, n_p, matching.iou_threshold, matching.strict)
    return LesionResult(lesion_metrics(match), _lesions(match, spacing[0] * spacing[1] * spacing[2]))
