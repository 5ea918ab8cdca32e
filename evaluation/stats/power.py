"""Minimal detectable difference (MDD) of a paired comparison for a test set's size.

For ``n`` paired cases whose differences have SD ``sd_diff``, a one-sided paired test at level
``alpha`` detects a true mean difference ``delta`` with probability ``power`` when

* ``method="normal"`` (default): ``MDD = (z_{1-alpha} + z_{power}) * sd_diff / sqrt(n)``
  (normal approximation of the paired t-test);
* ``method="t"``: ``MDD = d * sd_diff`` where ``d`` solves the one-sample t-test power equation
  (noncentral t), via ``statsmodels.stats.power.TTestPower().solve_power(nobs=n,
  alternative="larger")``; slightly larger than the normal MDD for small ``n``.

Units: those of the metric (DSC points in [0, 1], mm for HD95/ASSD). Caveats: this is the MDD of
the paired t-test; the Wilcoxon signed-rank test has asymptotic relative efficiency 3/pi (0.955)
against it for normal differences, so its MDD is about ``1/sqrt(0.955)`` = 2.3 % larger there,
and can be smaller for heavy-tailed differences. ``alpha`` is per comparison: for a guarantee
after Holm over ``K(K-1)`` pairs pass ``alpha / (K (K - 1))`` (Holm's first, strictest step).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from scipy import special
from statsmodels.stats.power import TTestPower

from evaluation.stats.scores import ScoreMatrix

MddMethod = Literal["normal", "t"]


def minimal_detectable_difference(
    sd_diff: float, n: int, *, alpha: float = 0.05, power: float = 0.8, method: MddMethod = "normal"
) -> float:
    """MDD for ``n`` paired cases with SD of differences ``sd_diff`` (see module doc).

    NaN when ``n < 2`` or ``sd_diff`` is NaN; 0 when ``sd_diff == 0``.
    """
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must be in (0, 1), got alpha={alpha}, power={power}")
    if n < 2 or not np.isfinite(sd_diff):
        return float("nan")
    if sd_diff == 0:
        return 0.0
    if method == "normal":
        return float((special.ndtri(1 - alpha) + special.ndtri(power)) * sd_diff / np.sqrt(n))
    if method == "t":
        d = TTestPower().solve_power(
            effect_size=None, nobs=n, alpha=alpha, power=power, alternative="larger"
        )
        return float(np.asarray(d).item() * sd_diff)
    raise ValueError(f"method must be 'normal' or 't', got {method!r}")


def organ_mdd(
    scores: ScoreMatrix,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    method: MddMethod = "normal",
) -> pd.DataFrame:
    """MDD per pair of algorithms and for the organ, at the test set's size.

    For every unordered pair, ``sd_diff`` is the SD (ddof = 1) of ``x_A - x_B`` over their common
    scored cases and ``n`` their number of common cases. The organ's figure uses the median
    ``sd_diff`` over pairs and ``n = N`` (the test set's cases). Returns one row per pair plus one
    row with ``algorithm = opponent = None`` for the organ; columns organ, metric, algorithm,
    opponent, n, sd_diff, mdd, alpha, power, method.
    """
    values = scores.values
    k = scores.n_algorithms
    rows = []
    sds = []
    for i in range(k):
        for j in range(i + 1, k):
            d = values[i] - values[j]
            d = d[~np.isnan(d)]
            sd = float(d.std(ddof=1)) if d.size > 1 else float("nan")
            sds.append(sd)
            rows.append(
                {
                    "algorithm": scores.algorithms[i],
                    "opponent": scores.algorithms[j],
                    "n": int(d.size),
                    "sd_diff": sd,
                    "mdd": minimal_detectable_difference(sd, d.size, alpha=alpha, power=power, method=method),
                }
            )
    finite = [s for s in sds if np.isfinite(s)]
    sd_organ = float(np.median(finite)) if finite else float("nan")
    rows.append(
        {
            "algorithm": None,
            "opponent": None,
            "n": scores.n_cases,
            "sd_diff": sd_organ,
            "mdd": minimal_detectable_difference(sd_organ, scores.n_cases, alpha=alpha, power=power, method=method),
        }
    )
    frame = pd.DataFrame(rows)
    frame.insert(0, "metric", scores.metric)
    frame.insert(0, "organ", scores.organ)
    frame["alpha"] = alpha
    frame["power"] = power
    frame["method"] = method
    return frame
