"""Per-algorithm summaries of one organ and metric: mean, median, SD and bootstrap intervals.

For the ``n`` scored cases ``x_1..x_n`` of an algorithm (``NaN`` = not scored is left out):

* ``mean``, ``median``, ``std`` (sample SD, ddof = 1);
* bootstrap: ``B`` resamples of the ``n`` cases with replacement (``numpy.random.Generator``
  seeded), ``theta*_b`` the statistic on resample ``b``;
* percentile interval: the ``alpha/2`` and ``1 - alpha/2`` quantiles of ``theta*`` (linear
  interpolation, R type 7, as ``scipy.stats.bootstrap``);
* BCa interval (Efron & Tibshirani 1993, 14.3): bias ``z0 = Phi^-1((#{theta* < theta} +
  #{theta* <= theta}) / 2B)``, acceleration ``a = sum U_i^3 / (6 (sum U_i^2)^1.5)`` with the
  jackknife ``U_i = mean_j theta_(j) - theta_(i)``; the interval is the quantiles of ``theta*`` at
  ``Phi(z0 + (z0 + z_q) / (1 - a (z0 + z_q)))`` for ``z_q = Phi^-1(alpha/2), Phi^-1(1-alpha/2)``.
  Given the same resample indices, this equals ``scipy.stats.bootstrap(method="BCa")`` (tested);
  the jackknife of the mean and the median is computed in closed form (O(n), not O(n^2)).

Degenerate cases: no scored case -> every statistic NaN; one case -> std NaN, both intervals
collapse to the value; all values equal -> both intervals equal the value (scipy would give a
NaN BCa with a DegenerateDataWarning there).
BCa is NaN when every resampled statistic lies on one side of the estimate (infinite bias).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import special

from evaluation.stats.scores import ScoreMatrix

Statistic = Literal["mean", "median"]

#: columns of :func:`summarize`'s table
SUMMARY_COLUMNS = (
    "organ",
    "metric",
    "algorithm",
    "n_cases",
    "n_scored",
    "n_missing",
    "n_failed",
    "mean",
    "median",
    "std",
    "mean_ci_low_percentile",
    "mean_ci_high_percentile",
    "mean_ci_low_bca",
    "mean_ci_high_bca",
    "median_ci_low_percentile",
    "median_ci_high_percentile",
    "median_ci_low_bca",
    "median_ci_high_bca",
    "confidence",
    "n_resamples",
    "seed",
)


@dataclass(frozen=True, eq=False)
class Resamples:
    """``B`` bootstrap resamples of ``n`` cases: the drawn ``indices`` (B, n) and ``counts``
    (B, n; ``counts[b, i]`` = times case ``i`` is drawn in resample ``b``; uint8 unless a count
    needs more). What one generator's ``integers(0, n, (B, n))`` gives; see :func:`draw_resamples`."""

    indices: np.ndarray
    counts: np.ndarray


class ResampleCache:
    """The :class:`Resamples` of one run of summaries, kept by (seed, K, algorithm, n, B) up to
    ``max_bytes``: past that a draw is used and not kept (organs with different scored counts
    each have their own ``n``, and a (1,000 x 5,903) draw is ~53 MB). Safe from several threads:
    a key is drawn once, under the cache's lock."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._kept: dict[tuple, Resamples] = {}
        self._lock = threading.Lock()

    def get_or_draw(self, key: tuple, draw: Callable[[], Resamples]) -> Resamples:
        with self._lock:
            drawn = self._kept.get(key)
            if drawn is None:
                drawn = draw()
                size = drawn.indices.nbytes + drawn.counts.nbytes
                if self.bytes + size <= self.max_bytes:
                    self._kept[key] = drawn
                    self.bytes += size
            return drawn

    def __len__(self) -> int:
        return len(self._kept)


def count_draws(indices: np.ndarray) -> np.ndarray:
    """``(B, n)`` int64: how often each of the ``n`` cases stands in each row of the drawn
    ``indices`` (one ``bincount``, row ``b``'s cases offset by ``b n``)."""
    rows, n = indices.shape
    flat = (indices + (np.arange(rows, dtype=indices.dtype) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n)


def draw_resamples(rng: np.random.Generator, n: int, n_resamples: int) -> Resamples:
    """``rng.integers(0, max(n, 1), (B, n))`` and its :func:`count_draws`."""
    indices = rng.integers(0, max(n, 1), (n_resamples, n))
    counts = count_draws(indices)
    return Resamples(indices, counts.astype(np.uint8 if counts.size == 0 or counts.max() <= 255 else np.uint16))


def _median_from_counts(x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``median(x[indices[b]])`` for every resample ``b`` from its counts, without a selection
    per resample: with ``y = sort(x)`` and ``c`` the counts in that order, the resample's k-th
    smallest value (0-based) is ``y[#{p : cumsum(c)[p] <= k}]``; the median is the middle one
    (odd n) or the mean ``(a + b) / 2`` of the two middle ones (even n), the arithmetic of
    ``np.median`` -- the same values (tested; only a zero's sign can differ where ``x`` holds both
    0.0 and -0.0, since the two selections may pick different members of that tie). ``x`` has no
    NaN (``bootstrap_distribution`` takes the selection path then)."""
    n = x.size
    order = np.argsort(x, kind="stable")
    y = x[order]
    cumulative = np.cumsum(np.take(counts, order, axis=1), axis=1, dtype=np.int16 if n < 2**15 else np.int32)
    lo, hi = (n - 1) // 2, n // 2
    at_lo = y[np.count_nonzero(cumulative <= lo, axis=1)]
    if lo == hi:
        return at_lo
    return (at_lo + y[np.count_nonzero(cumulative <= hi, axis=1)]) / 2


def bootstrap_distribution(
    x: np.ndarray, statistic: Statistic, indices: np.ndarray, chunk: int = 200, counts: np.ndarray | None = None
) -> np.ndarray:
    """``theta*_b = statistic(x[indices[b]])`` for each row ``b`` of ``indices`` (shape (B, n));
    the median from ``counts`` (:class:`Resamples`) when given, the same values faster."""
    x = np.asarray(x, dtype=np.float64)
    if statistic == "median" and counts is not None and x.size and not np.isnan(x).any():
        if counts.shape != indices.shape:
            raise ValueError(f"counts {counts.shape} are not those of the indices {indices.shape}")
        return _median_from_counts(x, counts)
    out = np.empty(indices.shape[0])
    for start in range(0, indices.shape[0], chunk):
        sample = x[indices[start : start + chunk]]
        out[start : start + chunk] = (
            sample.mean(axis=1) if statistic == "mean" else np.median(sample, axis=1)
        )
    return out


def jackknife(x: np.ndarray, statistic: Statistic) -> np.ndarray:
    """Leave-one-out values ``theta_(i)`` of the mean or median, in closed form, O(n log n).

    mean: ``(sum x - x_i) / (n - 1)``. median: with ``y`` sorted, removing the element at sorted
    position ``p`` leaves ``y`` without ``y_p``; its median is read from ``y`` by shifting the
    middle indices past ``p``. Returned in sorted order for the median (the BCa acceleration
    depends only on the multiset of jackknife values).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n < 2:
        return np.full(n, np.nan)
    if statistic == "mean":
        return (x.sum() - x) / (n - 1)
    y = np.sort(x)
    m = n - 1  # size of each leave-one-out sample
    p = np.arange(n)[:, None]
    mids = np.array([(m - 1) // 2, m // 2])[None, :]  # middle positions of the reduced sample
    picked = y[mids + (mids >= p)]
    return picked.mean(axis=1)


def percentile_interval(theta_b: np.ndarray, confidence: float) -> tuple[float, float]:
    """Two-sided percentile interval of a bootstrap distribution (linear quantiles)."""
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(theta_b, [alpha, 1 - alpha])
    return float(lo), float(hi)


def bca_interval(
    theta_b: np.ndarray, theta_hat: float, theta_jack: np.ndarray, confidence: float
) -> tuple[float, float]:
    """Two-sided BCa interval from the bootstrap and jackknife distributions (see module doc).

    NaN when the acceleration is undefined (all jackknife values equal, n < 2) or the bias
    correction is infinite (every ``theta*`` on one side of ``theta_hat``), as scipy warns.
    """
    theta_b = np.asarray(theta_b, dtype=np.float64)
    b = theta_b.size
    frac = (np.count_nonzero(theta_b < theta_hat) + np.count_nonzero(theta_b <= theta_hat)) / (2 * b)
    z0 = special.ndtri(frac)
    u = theta_jack.mean() - theta_jack  # (n-1) factors cancel in the ratio
    den = np.sum(u**2)
    if not np.isfinite(z0) or den == 0 or not np.isfinite(den):
        return float("nan"), float("nan")
    a = np.sum(u**3) / (6.0 * den**1.5)
    alpha = (1 - confidence) / 2
    levels = []
    for z_q in (special.ndtri(alpha), special.ndtri(1 - alpha)):
        num = z0 + z_q
        levels.append(special.ndtr(z0 + num / (1 - a * num)))
    lo, hi = np.quantile(theta_b, levels)
    return float(lo), float(hi)


def bootstrap_intervals(
    x: np.ndarray,
    statistic: Statistic,
    *,
    indices: np.ndarray,
    confidence: float = 0.95,
    bca: bool = True,
    counts: np.ndarray | None = None,
) -> dict[str, float]:
    """Percentile and BCa intervals of ``statistic`` of ``x`` on the given resample indices
    (``counts``: theirs, :class:`Resamples`; ``bca=False``: the BCa bounds are NaN, and the
    jackknife is skipped)."""
    x = np.asarray(x, dtype=np.float64)
    nan = float("nan")
    if x.size == 0:
        return {"low_percentile": nan, "high_percentile": nan, "low_bca": nan, "high_bca": nan}
    theta_hat = float(x.mean() if statistic == "mean" else np.median(x))
    theta_b = bootstrap_distribution(x, statistic, indices, counts=counts)
    lo_p, hi_p = percentile_interval(theta_b, confidence)
    if not bca:
        lo_b = hi_b = nan
    elif np.all(x == x[0]):
        lo_b = hi_b = theta_hat  # no variation: the interval is the point
    else:
        lo_b, hi_b = bca_interval(theta_b, theta_hat, jackknife(x, statistic), confidence)
    return {"low_percentile": lo_p, "high_percentile": hi_p, "low_bca": lo_b, "high_bca": hi_b}


def _seeds(seed: int, k: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(k)]


def summarize(
    scores: ScoreMatrix,
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    bca: bool = True,
    resamples: ResampleCache | None = None,
) -> pd.DataFrame:
    """:func:`summary_records` as a table (columns :data:`SUMMARY_COLUMNS`). (Its keywords are
    written out again rather than passed as ``**kwargs``: this is the public entry point, and
    help() and the type checker should show them.)"""
    return pd.DataFrame(summary_records(scores, confidence=confidence, n_resamples=n_resamples, seed=seed,
                                        progress=progress, bca=bca, resamples=resamples),
                        columns=list(SUMMARY_COLUMNS))


def summary_records(
    scores: ScoreMatrix,
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    bca: bool = True,
    resamples: ResampleCache | None = None,
) -> list[dict]:
    """One record (dict keyed by :data:`SUMMARY_COLUMNS`) per algorithm with counts, mean/median/SD and their bootstrap intervals
    (``bca=False``: percentile intervals only, the BCa columns NaN -- the jackknife was ~15 % of a
    leaderboard recomputation, which stores percentile intervals unless asked for BCa).

    Each algorithm is resampled over its own scored cases with its own generator spawned from
    ``seed`` (``SeedSequence(seed).spawn(K)``), the same resample indices for mean and median.
    Columns: :data:`SUMMARY_COLUMNS`; ``n_cases`` is the test set size ``N``, ``n_scored`` the
    non-NaN scores, ``n_missing = N - n_scored``, ``n_failed`` scored-but-failed cases.

    ``resamples``: a :class:`ResampleCache` kept across calls that holds the drawn
    :class:`Resamples` per (seed, K, algorithm, n, B) -- the draw depends on nothing else, so the leaderboard's hundreds of
    one-algorithm summaries over the same cases draw once per group size.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rows = []
    rngs = _seeds(seed, scores.n_algorithms)
    for k, algorithm in enumerate(scores.algorithms):
        row = scores.values[k]
        x = row[~np.isnan(row)]
        n = x.size
        def draw(rng: np.random.Generator = rngs[k], n: int = n) -> Resamples:
            return draw_resamples(rng, n, n_resamples)

        drawn = (resamples.get_or_draw((seed, scores.n_algorithms, k, n, n_resamples), draw)
                 if resamples is not None else draw())
        record = {
            "organ": scores.organ,
            "metric": scores.metric,
            "algorithm": algorithm,
            "n_cases": scores.n_cases,
            "n_scored": n,
            "n_missing": scores.n_cases - n,
            "n_failed": int(scores.failed[k].sum()),
            "mean": float(x.mean()) if n else float("nan"),
            "median": float(np.median(x)) if n else float("nan"),
            "std": float(x.std(ddof=1)) if n > 1 else float("nan"),
            "confidence": confidence,
            "n_resamples": n_resamples,
            "seed": seed,
        }
        for stat in ("mean", "median"):
            ci = bootstrap_intervals(x, stat, indices=drawn.indices, counts=drawn.counts, confidence=confidence,
                                     bca=bca)
            for key, value in ci.items():
                bound, method = key.split("_")
                record[f"{stat}_ci_{bound}_{method}"] = value
        rows.append(record)
        if progress is not None:
            progress(k + 1, scores.n_algorithms)
    return rows
