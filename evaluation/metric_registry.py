"""The one definition of every metric Touchstone computes: name, direction, unit and range.

Everything that needs a metric's name or direction imports it from here: protocols (which metrics
a protocol may enable), scoring (the columns of a score row), the statistics (which way is better)
and the leaderboard (which metrics it offers).

Two families:

* **organ metrics** (``ORGAN_METRICS``): computed for every class of a protocol's label table, on
  the whole mask of that class in one case (:mod:`evaluation.metrics`).
* **lesion metrics** (``LESION_METRICS``): computed only for the lesion classes of a ``kind:
  lesion`` protocol, on the connected components of the class matched one-to-one between truth
  and prediction (:mod:`evaluation.lesions`). The mean of ``lesion_fp`` over cases is the number
  of false positives per case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "HIGHER_IS_BETTER",
    "LESION_METRICS",
    "METRICS",
    "METRIC_INFO",
    "ORGAN_METRICS",
    "MetricInfo",
    "metric_info",
]


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is.

    ``higher_is_better``: its direction (every statistic reads "better" from it).
    ``unit``: ``""`` for a fraction, ``"mm"`` for a distance, ``"lesions"`` for a count.
    ``lower``/``upper``: the range of a scored value (``upper`` may be ``inf``).
    ``family``: ``"organ"`` or ``"lesion"`` (see the module docstring).
    """

    name: str
    label: str
    higher_is_better: bool
    unit: str
    lower: float
    upper: float
    family: Literal["organ", "lesion"]
    description: str


_INF = math.inf

_ALL: tuple[MetricInfo, ...] = (
    MetricInfo("dsc", "DSC", True, "", 0.0, 1.0, "organ", "Dice similarity coefficient of the class mask"),
    MetricInfo("nsd", "NSD", True, "", 0.0, 1.0, "organ", "normalised surface Dice at the protocol's tolerance"),
    MetricInfo("hd95", "HD95", False, "mm", 0.0, _INF, "organ", "95th-percentile symmetric Hausdorff distance"),
    MetricInfo("assd", "ASSD", False, "mm", 0.0, _INF, "organ", "average symmetric surface distance"),
    MetricInfo("lesion_tp", "lesion TP", True, "lesions", 0.0, _INF, "lesion",
               "true-positive lesions: truth components matched one-to-one to a predicted component"),
    MetricInfo("lesion_fp", "lesion FP", False, "lesions", 0.0, _INF, "lesion",
               "false-positive lesions: predicted components matched to no truth component "
               "(its mean over cases is the false positives per case)"),
    MetricInfo("lesion_fn", "lesion FN", False, "lesions", 0.0, _INF, "lesion",
               "false-negative lesions: truth components matched to no predicted component"),
    MetricInfo("lesion_sensitivity", "lesion sensitivity", True, "", 0.0, 1.0, "lesion",
               "TP / (TP + FN): fraction of truth lesions detected"),
    MetricInfo("lesion_precision", "lesion precision", True, "", 0.0, 1.0, "lesion",
               "TP / (TP + FP): fraction of predicted lesions that are real"),
    MetricInfo("lesion_f1", "lesion F1", True, "", 0.0, 1.0, "lesion",
               "2 TP / (2 TP + FP + FN), the recognition quality RQ of panoptic quality"),
    MetricInfo("lesion_dsc", "per-lesion DSC", True, "", 0.0, 1.0, "lesion",
               "mean over truth lesions of the DSC with the matched prediction; a missed lesion scores 0"),
    MetricInfo("lesion_pq", "panoptic quality", True, "", 0.0, 1.0, "lesion",
               "PQ = RQ x SQ, SQ the mean IoU of the matched pairs (Kirillov et al. 2019)"),
)

#: metric name -> :class:`MetricInfo`, in canonical order
METRIC_INFO: dict[str, MetricInfo] = {m.name: m for m in _ALL}
#: metrics computed on a class mask, in canonical order (also the wide columns of a score row)
ORGAN_METRICS: tuple[str, ...] = tuple(m.name for m in _ALL if m.family == "organ")
#: metrics computed on the matched connected components of a lesion class, in canonical order
LESION_METRICS: tuple[str, ...] = tuple(m.name for m in _ALL if m.family == "lesion")
#: every metric, in canonical order
METRICS: tuple[str, ...] = ORGAN_METRICS + LESION_METRICS
#: metric name -> True when a higher value is better
HIGHER_IS_BETTER: dict[str, bool] = {m.name: m.higher_is_better for m in _ALL}


def metric_info(name: str) -> MetricInfo:
    """The :class:`MetricInfo` of ``name``; a clear ``ValueError`` for an unknown metric."""
    try:
        return METRIC_INFO[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; choose from {list(METRICS)}") from None
