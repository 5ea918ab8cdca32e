"""Rankings of algorithms and their bootstrap stability (challengeR's methods).

Methods (``method`` names as the CLI's ``--method``), each on one :class:`ScoreMatrix`, ties
ranked ``"min"`` (1, 1, 3, ...), rank 1 = best.

Tie rule (every ranking, the bootstrap, Kendall's tau and P(best)): ``a`` is better than ``b`` only
when ``a - b > TIE_RTOL * max(1, |a|, |b|)`` (:data:`TIE_RTOL` = 1e-9); an algorithm's rank is 1 +
the number of algorithms better than it. Means are summed exactly (``math.fsum``), so identical
multisets of per-case values always have identical means and tie.

* ``"mean"`` / ``"median"`` - aggregate-then-rank: ``a_k = mean_j x_kj`` (or median) over the
  algorithm's scored cases (``fill_missing=v`` first replaces not-scored cases by ``v``), ranked
  by direction of the metric. An algorithm with no score ranks last.
* ``"rank-mean"`` - rank-then-aggregate: per case ``j``, ``r_kj`` = rank of algorithm ``k``
  among the algorithms that scored ``j`` (ties "min"); a not-scored case takes the worst rank
  ``K``. ``a_k = mean_j r_kj`` over all ``N`` cases, ranked ascending.
* ``"test"`` - test-then-rank (challengeR's ``testThenRank``): ``a_k = #{l : A_k significantly
  better than A_l} / (K - 1)`` from the one-sided paired Wilcoxon tests of
  :func:`evaluation.stats.wilcoxon.pairwise_wilcoxon` (adjusted p < alpha), ranked descending.

Bootstrap stability: ``B`` resamples of the case indices with replacement, **the same resample
for every algorithm** (``numpy.random.default_rng(seed)``); the ranking is recomputed on each.
Reported per algorithm: distribution of ranks (counts of rank 1..K), mean and median rank and
the ``confidence`` interval (linear quantiles, R type 7); per resample: Kendall's tau-b between
its ranking and the full-data ranking. Means and rank-means over a resample are computed as one
matrix product with the resample's case counts (no loop over resamples); medians loop over
chunks of resamples. ``"test"`` is not bootstrapped (it would re-run K(K-1)/2 tests per resample).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

from evaluation.stats.scores import ScoreMatrix, json_ready
from evaluation.stats.summary import count_draws
from evaluation.stats.wilcoxon import WilcoxonOptions, adjust_pvalues, pairwise_wilcoxon

RankingMethod = Literal["mean", "median", "rank-mean", "test"]
RANKING_METHODS: tuple[str, ...] = ("mean", "median", "rank-mean", "test")
BOOTSTRAP_METHODS: tuple[str, ...] = ("mean", "median", "rank-mean")

#: relative tolerance of the tie rule (see the module docstring)
TIE_RTOL = 1e-9
TIE_RULE = f"ties: |a - b| <= {TIE_RTOL:g} x max(1, |a|, |b|) (means summed exactly)"

#: columns of a ranking table (:func:`rank`)
RANKING_COLUMNS = ("organ", "metric", "method", "algorithm", "value", "rank")


def min_ranks(values: np.ndarray, higher_is_better: bool = True, rtol: float = TIE_RTOL) -> np.ndarray:
    """Ranks along the last axis, 1 = best, ties "min" under the tie rule (values within ``rtol``
    relative tolerance tie); NaN values rank after all others.

    Works on one ranking ``(K,)`` or many ``(B, K)`` at once. ``rank_k = 1 + #{l : l better than
    k}``, found in sorted order, ``O(K log K)`` per ranking: the values strictly greater than ``k``
    (a search in the sorted row) minus those of them within the tolerance of ``k``. Those lie in the
    window ``(x_k, x_k + 2 rtol max(1, |x_k|)]`` (the tie rule's ``rtol max(1, |a|, |b|)`` is below
    ``rtol max(1, |x_k|) / (1 - rtol)``), so only the few values inside it are compared, each with
    exactly the pairwise rule's float expression: the ranks equal the ``O(K^2)`` pairwise
    comparison's bit for bit (tested against it). An infinite value ties with every value (its
    tolerance is infinite), as it does in that comparison.
    """
    values = np.asarray(values, dtype=np.float64)
    key = values if higher_is_better else -values  # larger key = better
    shape = key.shape
    k = shape[-1] if key.ndim else 1
    if k == 0 or key.size == 0:
        return np.zeros(shape, dtype=np.int64)
    rows = key.reshape(-1, k)
    # ascending, NaN last; not a stable sort: members of a tie get the same rank in any order,
    # and numpy's default (SIMD) sort is faster
    order = np.argsort(rows, axis=1)
    s = np.take_along_axis(rows, order, axis=1)
    n_valid = np.count_nonzero(~np.isnan(s), axis=1)[:, None]
    # an infinite value ties with every value: its tolerance rtol max(1, |a|, |b|) is infinite;
    # so only finite values are better than anything, and only than finite values
    n_below_inf = np.count_nonzero(s < np.inf, axis=1)[:, None]  # -inf and finite
    finite = np.isfinite(s)
    position = np.broadcast_to(np.arange(k), s.shape)
    # first position after p holding a different (for valid values: strictly greater) value
    starts = np.where(np.concatenate([np.ones((s.shape[0], 1), bool), s[:, 1:] != s[:, :-1]], axis=1), position, k)
    above = np.full(s.shape, k, dtype=np.int64)
    above[:, :-1] = np.minimum.accumulate(starts[:, :0:-1], axis=1)[:, ::-1]
    greater = np.where(finite, np.maximum(n_below_inf - above, 0), 0)
    # subtract the strictly greater values that tie with p under the tolerance
    with np.errstate(invalid="ignore", over="ignore"):
        window = s + 2.0 * rtol * np.maximum(1.0, np.abs(s))
    near = np.zeros(s.shape, dtype=np.int64)
    candidate = above.copy()
    active = finite & (candidate < n_below_inf)
    # the next greater value lies outside every window (typical: no two values this close):
    # nothing to subtract, so skip the search
    nxt = np.take_along_axis(s, np.minimum(candidate, k - 1), axis=1)
    with np.errstate(invalid="ignore"):
        active &= nxt <= window
    while active.any():
        a = np.take_along_axis(s, np.minimum(candidate, k - 1), axis=1)  # the candidate better one
        active &= a <= window
        with np.errstate(invalid="ignore", over="ignore"):
            tol = rtol * np.maximum(1.0, np.maximum(np.abs(a), np.abs(s)))
            near += active & (a > s) & ((a - s) <= tol)
        candidate += 1
        active &= candidate < n_below_inf
    ranks_sorted = np.where(np.isnan(s), n_valid + 1, 1 + greater - near)
    ranks = np.empty_like(ranks_sorted)
    np.put_along_axis(ranks, order, ranks_sorted, axis=1)
    return ranks.reshape(shape).astype(np.int64)


def _aggregate(values: np.ndarray, aggregate: str, fill_missing: float | None) -> np.ndarray:
    if fill_missing is not None:
        values = np.where(np.isnan(values), fill_missing, values)
    out = np.full(values.shape[0], np.nan)
    scored = ~np.isnan(values)
    for k in range(values.shape[0]):
        x = values[k, scored[k]]
        if x.size:  # fsum: the exactly rounded sum, the same for any order of the same values
            out[k] = math.fsum(x) / x.size if aggregate == "mean" else np.median(x)
    return out


def _kept(scores: ScoreMatrix, key: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``, kept on the matrix under ``key`` and read-only: what one leaderboard
    recomputation asks of the same matrix several times (the per-case ranks, the mean and median
    per algorithm: once for the ranking, again for the full ranking of each bootstrap). A
    ScoreMatrix's values are read-only, so what is derived from them stays true; it is a frozen
    dataclass, so the cache lives in its ``__dict__``."""
    if scores.values.flags.writeable:  # values someone could still change: nothing is kept
        return compute()
    kept = scores.__dict__.setdefault("_derived", {})
    if key not in kept:
        value = compute()
        value.setflags(write=False)
        kept[key] = value
    return kept[key]


def case_ranks(scores: ScoreMatrix) -> np.ndarray:
    """``(K, N)`` per-case ranks (1 = best, ties "min"); a not-scored case takes rank ``K``
    (read-only; computed once per matrix)."""

    def compute() -> np.ndarray:
        ranks = min_ranks(scores.oriented().T, higher_is_better=True).T.astype(np.float64)
        return np.where(np.isnan(scores.values), float(scores.n_algorithms), ranks)

    return _kept(scores, ("case_ranks",), compute)


def _ranking_frame(scores: ScoreMatrix, method: str, value: np.ndarray, rank: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "organ": scores.organ,
            "metric": scores.metric,
            "method": method,
            "algorithm": list(scores.algorithms),
            "value": value,
            "rank": rank.astype(np.int64),
        },
        columns=list(RANKING_COLUMNS),
    )


def aggregate_then_rank(
    scores: ScoreMatrix, aggregate: Literal["mean", "median"] = "mean", fill_missing: float | None = None
) -> pd.DataFrame:
    """Aggregate-then-rank; ``value`` is the mean/median in metric units."""
    if aggregate not in ("mean", "median"):
        raise ValueError(f"aggregate must be 'mean' or 'median', got {aggregate!r}")
    value = _kept(scores, ("aggregate", aggregate, fill_missing),
                  lambda: _aggregate(scores.values, aggregate, fill_missing))
    return _ranking_frame(scores, aggregate, value, min_ranks(value, scores.higher_is_better))


def rank_then_aggregate(scores: ScoreMatrix) -> pd.DataFrame:
    """Rank-then-aggregate; ``value`` is the mean per-case rank (lower is better)."""
    value = case_ranks(scores).mean(axis=1) if scores.n_cases else np.full(scores.n_algorithms, np.nan)
    return _ranking_frame(scores, "rank-mean", value, min_ranks(value, higher_is_better=False))


def test_then_rank(
    scores: ScoreMatrix,
    pairwise: pd.DataFrame | None = None,
    *,
    alpha: float = 0.05,
    correction: str = "holm",
    options: WilcoxonOptions = WilcoxonOptions(),
    family: str = "tested",
) -> pd.DataFrame:
    """Test-then-rank; ``value`` is significant wins / (K - 1) (NaN when K = 1, rank 1).

    ``pairwise`` is a :func:`pairwise_wilcoxon` table of these scores (computed if not given); its
    raw ``p_value`` column is adjusted here with ``correction`` (its own multiple-comparison
    method, ``"none"`` as challengeR's default) and a win is an adjusted p < alpha.
    """
    if pairwise is None:
        pairwise = pairwise_wilcoxon(scores, options=options, correction=correction, alpha=alpha, family=family)
    k = scores.n_algorithms
    if "p_value" in pairwise.columns:
        win = adjust_pvalues(pairwise["p_value"].to_numpy(dtype=np.float64), correction, family) < alpha
    else:  # a table of decisions only
        win = pairwise["significant"].astype(bool).to_numpy()
    wins = pairwise.loc[win].groupby("algorithm").size()
    counts = np.array([wins.get(a, 0) for a in scores.algorithms], dtype=np.float64)
    value = counts / (k - 1) if k > 1 else np.full(k, np.nan)
    return _ranking_frame(scores, "test", value, min_ranks(value, higher_is_better=True))


def rank(
    scores: ScoreMatrix,
    method: RankingMethod = "mean",
    *,
    pairwise: pd.DataFrame | None = None,
    fill_missing: float | None = None,
    alpha: float = 0.05,
    correction: str = "holm",
    options: WilcoxonOptions = WilcoxonOptions(),
    family: str = "tested",
) -> pd.DataFrame:
    """Rank by ``method`` (one of :data:`RANKING_METHODS`); columns :data:`RANKING_COLUMNS`.
    ``correction`` / ``family`` are test-then-rank's multiple-comparison settings."""
    if method in ("mean", "median"):
        return aggregate_then_rank(scores, method, fill_missing)  # type: ignore[arg-type]
    if method == "rank-mean":
        return rank_then_aggregate(scores)
    if method == "test":
        return test_then_rank(scores, pairwise, alpha=alpha, correction=correction, options=options,
                              family=family)
    raise ValueError(f"unknown ranking method {method!r}; choose one of {list(RANKING_METHODS)}")


def kendall_tau_b(rankings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row of ``rankings`` (B, K) against ``reference`` (K,).

    ``tau_b = (C - D) / sqrt((P - T_x)(P - T_y))`` over the ``P = K(K-1)/2`` pairs, ``T_x``,
    ``T_y`` the pairs tied in each ranking; NaN when a ranking is all ties or K < 2 (as
    ``scipy.stats.kendalltau``).
    """
    rankings, reference = np.atleast_2d(np.asarray(rankings)), np.asarray(reference)
    k = reference.size
    if (np.issubdtype(rankings.dtype, np.integer) and np.issubdtype(reference.dtype, np.integer)
            and 0 < k < 2**15 and rankings.size and 0 <= rankings.min() and rankings.max() < 2**15
            and 0 <= reference.min() and reference.max() < 2**15):
        # integer ranks (every bootstrap): the same signs from 16-bit arithmetic, a quarter of the memory traffic
        rankings, reference = rankings.astype(np.int16), reference.astype(np.int16)
    else:
        rankings, reference = rankings.astype(np.float64), reference.astype(np.float64)
    i, j = np.triu_indices(k, 1)
    sx = np.sign(rankings[:, i] - rankings[:, j])
    sy = np.sign(reference[i] - reference[j])
    p = i.size
    tx = np.count_nonzero(sx == 0, axis=1)
    ty = np.count_nonzero(sy == 0)
    den = np.sqrt((p - tx).astype(np.float64) * (p - ty))
    with np.errstate(invalid="ignore", divide="ignore"):
        concordance = (sx * sy).sum(axis=1, dtype=np.int64)
        return np.where(den > 0, concordance / np.where(den > 0, den, 1.0), np.nan)


@dataclass(frozen=True, eq=False)
class RankStability:
    """Bootstrap rank stability of one (organ, metric, method).

    Attributes:
      organ, metric, method: what was ranked (method in :data:`BOOTSTRAP_METHODS`).
      algorithms: the K algorithms (order of every per-algorithm array).
      n_resamples, seed, confidence: bootstrap settings.
      full_rank: (K,) ranks on all cases.
      bootstrap_ranks: (B, K) int ranks, one row per resample.
      rank_counts: (K, K) int, ``rank_counts[k, r-1]`` = resamples in which algorithm k has rank r.
      mean_rank, median_rank, rank_ci_low, rank_ci_high: (K,) over resamples.
      kendall_tau: (B,) Kendall's tau-b of each resample's ranking against ``full_rank``.
    """

    organ: str
    metric: str
    method: str
    algorithms: tuple[str, ...]
    n_resamples: int
    seed: int
    confidence: float
    full_rank: np.ndarray
    bootstrap_ranks: np.ndarray
    rank_counts: np.ndarray
    mean_rank: np.ndarray
    median_rank: np.ndarray
    rank_ci_low: np.ndarray
    rank_ci_high: np.ndarray
    kendall_tau: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """One row per algorithm: organ, metric, method, algorithm, full_rank, mean_rank,
        median_rank, rank_ci_low, rank_ci_high, p_best (share of resamples ranked 1),
        rank_counts (list of K ints)."""
        return pd.DataFrame(
            {
                "organ": self.organ,
                "metric": self.metric,
                "method": self.method,
                "algorithm": list(self.algorithms),
                "full_rank": self.full_rank,
                "mean_rank": self.mean_rank,
                "median_rank": self.median_rank,
                "rank_ci_low": self.rank_ci_low,
                "rank_ci_high": self.rank_ci_high,
                "p_best": self.rank_counts[:, 0] / max(self.n_resamples, 1) if self.algorithms else [],
                "rank_counts": [list(map(int, r)) for r in self.rank_counts],
            }
        )

    def tau_summary(self) -> dict[str, float]:
        """Median and ``confidence`` interval of the Kendall's tau distribution (NaN-aware)."""
        tau = self.kendall_tau[np.isfinite(self.kendall_tau)]
        if tau.size == 0:
            return {"tau_median": float("nan"), "tau_ci_low": float("nan"), "tau_ci_high": float("nan")}
        a = (1 - self.confidence) / 2
        lo, med, hi = np.quantile(tau, [a, 0.5, 1 - a])
        return {"tau_median": float(med), "tau_ci_low": float(lo), "tau_ci_high": float(hi)}

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN -> None); ``bootstrap_ranks`` and ``kendall_tau`` included."""
        return json_ready(
            {
                "organ": self.organ,
                "metric": self.metric,
                "method": self.method,
                "algorithms": self.algorithms,
                "n_resamples": self.n_resamples,
                "seed": self.seed,
                "confidence": self.confidence,
                "per_algorithm": self.to_frame(),
                **self.tau_summary(),
                "kendall_tau": self.kendall_tau,
                "bootstrap_ranks": self.bootstrap_ranks,
            }
        )


def resample_counts(
    rng: np.random.Generator, n_cases: int, n_resamples: int, chunk: int = 100
) -> np.ndarray:
    """``(B, N)`` float: how often each case appears in each bootstrap resample.

    Drawn as ``rng.integers(0, N, (B, N))`` (one resample per row, as ``scipy.stats.bootstrap``;
    drawn in chunks of ``chunk`` rows, which yields the same stream) and counted with one
    ``bincount`` per chunk (row ``r``'s cases offset by ``r N``): no loop over resamples.
    """
    counts = np.empty((n_resamples, n_cases))
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        counts[start : start + rows] = count_draws(rng.integers(0, n_cases, (rows, n_cases)))
    return counts


def _bootstrap_values(
    scores: ScoreMatrix, method: str, rng: np.random.Generator, n_resamples: int,
    fill_missing: float | None, chunk: int, counts: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """(B, K) aggregate per resample and whether higher is better for it."""
    n = scores.n_cases
    if method == "median":
        values = scores.values
        if fill_missing is not None:
            values = np.where(np.isnan(values), fill_missing, values)
        any_nan = np.isnan(values).any()
        out = np.empty((n_resamples, scores.n_algorithms))
        for start in range(0, n_resamples, chunk):
            idx = rng.integers(0, n, (min(chunk, n_resamples - start), n))
            sample = values[:, idx]  # (K, b, N)
            with np.errstate(all="ignore"):
                med = np.nanmedian(sample, axis=2) if any_nan else np.median(sample, axis=2)
            out[start : start + idx.shape[0]] = med.T
        return out, scores.higher_is_better
    counts = resample_counts(rng, n, n_resamples) if counts is None else counts  # (B, N)
    if method == "rank-mean":
        return (counts @ case_ranks(scores).T) / n, False
    values = scores.values
    if fill_missing is not None:
        values = np.where(np.isnan(values), fill_missing, values)
    scored = ~np.isnan(values)
    sums = counts @ np.where(scored, values, 0.0).T
    # every case scored (the worst-value policy): each resample counts its N draws, exactly
    ns = counts @ scored.T.astype(np.float64) if not scored.all() else np.full_like(sums, float(n))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ns > 0, sums / np.where(ns > 0, ns, 1.0), np.nan), scores.higher_is_better


def bootstrap_rank_stability(
    scores: ScoreMatrix,
    method: Literal["mean", "median", "rank-mean"] = "mean",
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    fill_missing: float | None = None,
    chunk: int = 25,
    counts: np.ndarray | None = None,
) -> RankStability:
    """Bootstrap the ranking by ``method`` over cases (same resample for every algorithm).

    ``counts`` (``mean`` and ``rank-mean`` only): the resamples' case counts when already drawn,
    i.e. ``resample_counts(np.random.default_rng(seed), N, n_resamples)`` -- the same for every
    matrix with N cases, so a caller ranking many matrices draws them once."""
    if method not in BOOTSTRAP_METHODS:
        raise ValueError(
            f"bootstrap ranking supports methods {list(BOOTSTRAP_METHODS)}, got {method!r} "
            f"(test-then-rank would re-run every pairwise test per resample)"
        )
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if scores.n_cases == 0:
        raise ValueError(f"no cases in {scores.organ}/{scores.metric}: nothing to bootstrap")
    k = scores.n_algorithms
    full = rank(scores, method, fill_missing=fill_missing)["rank"].to_numpy()
    rng = np.random.default_rng(seed)
    if counts is not None and (method == "median" or counts.shape != (n_resamples, scores.n_cases)):
        raise ValueError(f"counts must be the ({n_resamples}, {scores.n_cases}) case counts of a mean or rank-mean "
                         f"bootstrap, got {counts.shape} for {method!r}")
    values, hib = _bootstrap_values(scores, method, rng, n_resamples, fill_missing, chunk, counts)
    ranks = min_ranks(values, higher_is_better=hib)  # (B, K)
    flat = (np.arange(k)[None, :] * k + ranks - 1).ravel()
    rank_counts = np.bincount(flat, minlength=k * k).reshape(k, k)
    a = (1 - confidence) / 2
    lo, med, hi = np.quantile(ranks, [a, 0.5, 1 - a], axis=0)
    return RankStability(
        organ=scores.organ,
        metric=scores.metric,
        method=method,
        algorithms=scores.algorithms,
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
        full_rank=full,
        bootstrap_ranks=ranks,
        rank_counts=rank_counts,
        mean_rank=ranks.mean(axis=0),
        median_rank=med,
        rank_ci_low=lo,
        rank_ci_high=hi,
        kendall_tau=kendall_tau_b(ranks, full),
    )


def compare_rankings(rankings: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Kendall's tau-b (and its scipy p-value) between every two rankings of the same algorithms.

    ``rankings`` maps a name (e.g. the method) to a ranking table (:func:`rank`). Columns:
    method_a, method_b, kendall_tau, p_value.
    """
    names = list(rankings)
    rows = []
    for x in range(len(names)):
        for y in range(x + 1, len(names)):
            ra = rankings[names[x]].set_index("algorithm")["rank"]
            rb = rankings[names[y]].set_index("algorithm")["rank"]
            if set(ra.index) != set(rb.index):
                raise ValueError(f"rankings {names[x]!r} and {names[y]!r} rank different algorithms")
            rb = rb.reindex(ra.index)
            if len(ra) < 2:
                tau, p = float("nan"), float("nan")
            else:
                res = stats.kendalltau(ra.to_numpy(), rb.to_numpy(), variant="b")
                tau, p = float(res.statistic), float(res.pvalue)
            rows.append({"method_a": names[x], "method_b": names[y], "kendall_tau": tau, "p_value": p})
    return pd.DataFrame(rows, columns=["method_a", "method_b", "kendall_tau", "p_value"])
