"""Paired one-sided Wilcoxon signed-rank tests between every ordered pair of algorithms.

For algorithms ``A`` and ``B`` on their common scored cases, with oriented scores ``s`` (larger is
better, see :mod:`evaluation.stats.scores`), the paired differences are ``d_j = s_Aj - s_Bj``.
Zero differences are handled by ``zero_method`` (default ``"wilcox"``: dropped, as R does). With
the ``n`` remaining differences ranked by ``|d|`` (average ranks for ties)::

    V     = sum of the ranks of the positive d            (R's V, scipy's r_plus)
    mu    = n (n + 1) / 4
    sigma = sqrt( n (n + 1) (2n + 1) / 24  -  sum_t (t^3 - t) / 48 )   (t: tie-group sizes)
    p(A better than B) = 1 - Phi((V - mu - c) / sigma)     (alternative "greater")
    p(B better than A) =     Phi((V - mu + c) / sigma)     (alternative "less")

with the continuity correction ``c = 0.5`` when ``correction`` (else 0). Both one-sided p-values
come from the same ``V``, so each unordered pair is ranked once. The default options reproduce R's
``wilcox.test(a, b, paired=TRUE, exact=FALSE, correct=TRUE)`` and equal
``scipy.stats.wilcoxon(a - b, zero_method="wilcox", correction=True, method="asymptotic")``.
``zero_method="pratt"`` / ``"zsplit"`` follow scipy (Cureton's adjustment / half the zero ranks
to each side).

Pairs with no non-zero difference (no common case, or all equal) have no test: their p-values are
``NaN`` and they are left out of the multiple-testing family (reported as ``n_nonzero = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import special
from statsmodels.stats.multitest import multipletests

from evaluation.stats.scores import ScoreMatrix

ZeroMethod = Literal["wilcox", "pratt", "zsplit"]
TestMethod = Literal["asymptotic", "exact", "auto"]
#: largest number of paired cases for which ``method="auto"`` uses an exact null distribution
#: (scipy's rule: exact without ties and zeros, sign-flip enumeration with ties or zeros)
AUTO_EXACT_MAX_N = 50
AUTO_PERMUTATION_MAX_N = 13
#: multiple-testing families: ``"tested"`` = the ordered pairs that have a test (default);
#: ``"all"`` = all K(K-1) ordered pairs, a pair without a p-value still counts in m (statsmodels
#: ``multipletests`` on an array holding NaN, as Touchstone's ``plot/SignificanceMaps.py`` does)
FAMILIES = ("tested", "all")

#: statsmodels ``multipletests`` methods accepted as ``correction`` (plus ``"none"``)
CORRECTIONS = (
    "none",
    "holm",
    "bonferroni",
    "sidak",
    "holm-sidak",
    "simes-hochberg",
    "hommel",
    "fdr_bh",
    "fdr_by",
    "fdr_tsbh",
    "fdr_tsbky",
)


@dataclass(frozen=True)
class WilcoxonOptions:
    """Options of the signed-rank test (normal approximation, tie-corrected variance, always).

    Attributes:
      zero_method: ``"wilcox"`` drops zero differences (R, default); ``"pratt"`` ranks them
        and drops them afterwards; ``"zsplit"`` gives half their ranks to each side.
      correction: continuity correction of 0.5 towards the null (R's ``correct=TRUE``); used by
        the normal approximation only.
      method: ``"asymptotic"`` (normal approximation, R's ``exact=FALSE``; default),
        ``"exact"`` (exact null distribution of V for the non-zero differences; with ties or zeros
        the statistic is rounded conservatively, as scipy does) or ``"auto"`` (scipy's default:
        exact when at most 50 pairs and no ties or zeros; with ties or zeros and at most 13 pairs
        the exact sign-flip distribution (scipy's ``PermutationMethod``); otherwise asymptotic).
    """

    zero_method: ZeroMethod = "wilcox"
    correction: bool = True
    method: TestMethod = "asymptotic"

    def __post_init__(self) -> None:
        if self.zero_method not in ("wilcox", "pratt", "zsplit"):
            raise ValueError(
                f"zero_method must be 'wilcox', 'pratt' or 'zsplit', got {self.zero_method!r}"
            )
        if self.method not in ("asymptotic", "exact", "auto"):
            raise ValueError(f"method must be 'asymptotic', 'exact' or 'auto', got {self.method!r}")

    @classmethod
    def r_compatible(cls) -> WilcoxonOptions:
        """R's ``wilcox.test(paired=TRUE, exact=FALSE, correct=TRUE)`` (the default)."""
        return cls(zero_method="wilcox", correction=True, method="asymptotic")

    @classmethod
    def scipy_default(cls) -> WilcoxonOptions:
        """``scipy.stats.wilcoxon(x, y)`` with its defaults (``zero_method="wilcox"``,
        ``correction=False``, ``method="auto"``): what Touchstone's significance maps use."""
        return cls(zero_method="wilcox", correction=False, method="auto")

    def describe(self) -> str:
        return f"zero_method={self.zero_method}, continuity={self.correction}, method={self.method}"


def _sorted_ranks(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rank each row of 2-D ``a`` in sorted order: ``(order, ranks, tie_size, valid)``.

    ``order`` is an argsort of each row (NaN last); ``ranks[:, p]`` is the average rank
    (1-based, among non-NaN) of the element ``a[:, order[:, p]]`` and ``tie_size`` the size of its
    tie group; NaN elements get rank NaN, tie size 0 and ``valid`` False.
    """
    rows, n = a.shape
    # NaN sort last. Not a stable sort: the order inside a tie group does not matter (its members
    # share one average rank and tie size), and numpy's default (SIMD) sort is ~3x faster.
    order = np.argsort(a, axis=1)
    s = np.take_along_axis(a, order, axis=1)
    valid = ~np.isnan(s)
    starts = np.ones((rows, n), dtype=bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]  # NaN != NaN: every NaN its own group
    ends = np.ones((rows, n), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    pos = np.arange(n)
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.where(valid, (first + last) / 2.0 + 1.0, np.nan)
    ties = np.where(valid, last - first + 1, 0).astype(np.float64)
    return order, ranks, ties, valid


def average_ranks(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks along the last axis, ``NaN`` entries ignored, and each entry's tie size.

    Returns ``(ranks, tie_size)`` of ``a``'s shape: ranks 1..m among the non-NaN entries of the
    row (ties get the mean of their ranks, as ``scipy.stats.rankdata(method="average")``); NaN
    entries get rank NaN and tie size 0. One sort per row; no Python loop over rows.
    """
    a = np.asarray(a, dtype=np.float64)
    shape = a.shape
    a2 = np.atleast_2d(a).reshape(-1, shape[-1] if shape else 1)
    if a2.shape[1] == 0:
        return np.full(shape, np.nan), np.zeros(shape)
    order, rank_sorted, tie_sorted, _ = _sorted_ranks(a2)
    ranks = np.empty_like(rank_sorted)
    ties = np.empty_like(tie_sorted)
    np.put_along_axis(ranks, order, rank_sorted, axis=1)
    np.put_along_axis(ties, order, tie_sorted, axis=1)
    return ranks.reshape(shape), ties.reshape(shape)


@dataclass(frozen=True)
class SignedRankResult:
    """Vectorised signed-rank results, one entry per row of the difference matrix.

    ``statistic`` is V (sum of positive ranks), ``statistic_less`` the sum of negative ranks (the
    V of ``-d``; both include half the zero ranks under ``"zsplit"``), ``n_nonzero`` the number of non-zero differences,
    ``z`` the uncorrected ``(V - mu) / sigma``, ``p_greater``/``p_less`` the one-sided p-values
    for "differences tend to be positive/negative" (NaN where ``sigma == 0``).
    """

    statistic: np.ndarray
    statistic_less: np.ndarray
    n_nonzero: np.ndarray
    n_zero: np.ndarray
    z: np.ndarray
    p_greater: np.ndarray
    p_less: np.ndarray


_EXACT_SF: dict[int, np.ndarray] = {}


def exact_sf(n: int) -> np.ndarray:
    """``sf[k] = P(V >= k)`` for ``k = 0 .. n(n+1)/2`` under the null (no ties, no zeros):
    the subset-sum counts of ``{1..n}`` over ``2**n`` (exact integers up to n = 50)."""
    if n not in _EXACT_SF:
        top = n * (n + 1) // 2
        counts = np.zeros(top + 1, dtype=np.float64)
        counts[0] = 1.0
        for i in range(1, n + 1):
            counts[i:] = counts[i:] + counts[:-i]  # right side evaluated first: 0/1 knapsack
        pmf = counts / 2.0**n
        _EXACT_SF[n] = np.cumsum(pmf[::-1])[::-1]
    return _EXACT_SF[n]


def _exact_p(v: float, n: int, greater: bool, statistic_other: float) -> float:
    sf = exact_sf(n)
    top = n * (n + 1) // 2
    if greater:  # P(V >= floor(v))
        k = int(np.floor(v))
        return float(sf[k]) if 0 <= k <= top else (1.0 if k < 0 else 0.0)
    # P(V <= ceil(v)) = P(V' >= top - ceil(v)) by symmetry
    k = top - int(np.ceil(v))
    return float(sf[k]) if 0 <= k <= top else (1.0 if k < 0 else 0.0)


def _sign_flip_p(d: np.ndarray, options: WilcoxonOptions) -> tuple[float, float]:
    """One-sided p-values (greater, less) of V by enumerating all ``2**n`` sign flips of the
    paired differences ``d`` (no NaN), as ``scipy.stats.permutation_test`` does for
    ``scipy.stats.wilcoxon(method="auto")`` with ties or zeros and n <= 13."""
    n = d.size
    res = signed_rank_test(d[None, :], WilcoxonOptions(options.zero_method, options.correction, "asymptotic"))
    observed = float(res.statistic[0])
    observed_less = float(res.statistic_less[0])
    signs = ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1) * 2.0 - 1.0
    flipped = signs * np.abs(d)[None, :]
    flipped = np.where(d[None, :] == 0, 0.0, flipped)
    null = signed_rank_test(flipped, WilcoxonOptions(options.zero_method, options.correction, "asymptotic")).statistic
    eps = np.finfo(np.float64).eps * 100
    p_gt = float(np.count_nonzero(null >= observed - abs(eps * observed)) / null.size)
    p_lt = float(np.count_nonzero(null >= observed_less - abs(eps * observed_less)) / null.size)
    return p_gt, p_lt


def signed_rank_test(d: np.ndarray, options: WilcoxonOptions = WilcoxonOptions()) -> SignedRankResult:
    """Wilcoxon signed-rank test along the last axis of paired differences ``d`` (NaN = no pair).

    ``d`` may be 1-D (one test) or 2-D (one test per row). See the module docstring for the maths.
    """
    d = np.atleast_2d(np.asarray(d, dtype=np.float64))
    zeros = d == 0
    n_zero = zeros.sum(axis=1).astype(np.float64)
    ranked = np.where(zeros, np.nan, d) if options.zero_method == "wilcox" else d
    if d.shape[1] == 0:
        ranked = np.full((d.shape[0], 1), np.nan)
        zeros = np.zeros_like(ranked, dtype=bool)
    # work in sorted order of |d|: no need to scatter the ranks back to case order
    order, ranks, ties, valid = _sorted_ranks(np.abs(ranked))
    d_sorted = np.take_along_axis(ranked, order, axis=1)
    zeros = np.take_along_axis(zeros, order, axis=1)
    count = valid.sum(axis=1).astype(np.float64)
    r_plus = np.where(valid & (d_sorted > 0), ranks, 0.0).sum(axis=1)
    r_minus = np.where(valid & (d_sorted < 0), ranks, 0.0).sum(axis=1)
    mean = count * (count + 1.0) * 0.25
    var24 = count * (count + 1.0) * (2.0 * count + 1.0)
    tie_terms = ties**3 - ties
    if options.zero_method == "zsplit":
        half_zero_ranks = np.where(zeros, ranks, 0.0).sum(axis=1) / 2.0
        r_plus = r_plus + half_zero_ranks
        r_minus = r_minus + half_zero_ranks
    if options.zero_method == "pratt":
        mean = mean - n_zero * (n_zero + 1.0) * 0.25
        var24 = var24 - n_zero * (n_zero + 1.0) * (2.0 * n_zero + 1.0)
        tie_terms = np.where(zeros, 0.0, tie_terms)  # the zeros' tie group is not corrected
    # sum over groups of (t^3 - t) == sum over members of (t^2 - 1)
    tie_sum = np.where(valid, tie_terms / np.maximum(ties, 1.0), 0.0).sum(axis=1)
    var24 = var24 - tie_sum / 2.0
    se = np.sqrt(np.maximum(var24, 0.0) / 24.0)
    has_test = se > 0
    safe_se = np.where(has_test, se, 1.0)
    z = np.where(has_test, (r_plus - mean) / safe_se, np.nan)
    c = 0.5 if options.correction else 0.0
    p_greater = np.where(has_test, special.ndtr(-((r_plus - mean - c) / safe_se)), np.nan)
    p_less = np.where(has_test, special.ndtr((r_plus - mean + c) / safe_se), np.nan)
    n_nonzero = (count - (n_zero if options.zero_method != "wilcox" else 0.0)).astype(np.int64)
    if options.method != "asymptotic":
        p_greater, p_less = _non_asymptotic(d, options, r_plus, r_minus, count, n_zero, ties, valid,
                                            p_greater, p_less)
    return SignedRankResult(
        statistic=r_plus,
        statistic_less=r_minus,
        n_nonzero=n_nonzero,
        n_zero=n_zero.astype(np.int64),
        z=z,
        p_greater=p_greater,
        p_less=p_less,
    )


def _non_asymptotic(d, options, r_plus, r_minus, count, n_zero, ties, valid, p_greater, p_less):
    """Replace the normal-approximation p-values where ``options.method`` asks for exact ones."""
    p_greater, p_less = p_greater.copy(), p_less.copy()
    n_pairs = (~np.isnan(d)).sum(axis=1)
    has_ties = (np.where(valid, ties, 0.0) > 1).any(axis=1)
    for row in range(d.shape[0]):
        n = int(n_pairs[row])
        if n == 0:
            continue
        plain = not has_ties[row] and n_zero[row] == 0
        if options.method == "exact" or (options.method == "auto" and n <= AUTO_EXACT_MAX_N and plain):
            m = int(count[row])
            if m == 0:
                continue
            p_greater[row] = _exact_p(r_plus[row], m, True, r_minus[row])
            p_less[row] = _exact_p(r_plus[row], m, False, r_minus[row])
        elif options.method == "auto" and n <= AUTO_PERMUTATION_MAX_N:
            x = d[row][~np.isnan(d[row])]
            p_greater[row], p_less[row] = _sign_flip_p(x, options)
    return p_greater, p_less


def adjust_pvalues(p: np.ndarray, method: str = "holm", family: str = "tested") -> np.ndarray:
    """Multiple-testing adjustment of the finite p-values in ``p`` (NaN stay NaN, not counted).

    ``method`` is a :func:`statsmodels.stats.multitest.multipletests` method or ``"none"``.
    ``family="all"`` counts every entry of ``p`` in the number of tests m, NaN included (what
    ``multipletests`` does when handed NaN); ``"tested"`` counts only the finite ones.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; choose one of {list(CORRECTIONS)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {list(FAMILIES)}")
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if not finite.any():
        return out
    if method == "none":
        out[finite] = p[finite]
    elif method == "holm":
        out[finite] = holm(p[finite], m=p.size if family == "all" else None)
    elif family == "all":
        out[finite] = multipletests(p, method=method)[1][finite]
    else:
        out[finite] = multipletests(p[finite], method=method)[1]
    return out


def holm(p: np.ndarray, m: int | None = None) -> np.ndarray:
    """Holm's step-down adjusted p-values: with ``p_(1) <= ... <= p_(m)``,
    ``q_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``.

    Equal to ``multipletests(p, method="holm")[1]`` (tested); written out because statsmodels
    runs a full ``gc.collect()`` on every Holm call (0.1-0.4 s in a large process).
    """
    p = np.asarray(p, dtype=np.float64)
    m = p.size if m is None else int(m)  # m > p.size: the family has untested members (sorted last)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(m, m - p.size, -1)))
    out = np.empty(p.size)  # one value per tested p; the untested members of the family have none
    out[order] = adjusted
    return out


#: columns of :func:`pairwise_wilcoxon`'s table
PAIRWISE_COLUMNS = (
    "organ",
    "metric",
    "algorithm",
    "opponent",
    "n_common",
    "n_nonzero",
    "statistic",
    "z",
    "p_value",
    "p_adjusted",
    "significant",
    "mean_difference",
    "median_difference",
    "sd_difference",
)


@dataclass(frozen=True)
class PairTests:
    """Raw results of the paired tests of P unordered pairs ``(i, j)`` of a :class:`ScoreMatrix`
    (arrays of length P): everything :func:`pairwise_wilcoxon` reports but the correction, which
    depends on the whole family. Each pair's numbers depend only on the two rows it compares
    (what makes them cacheable: ``services/leaderboard/pairwise.py``).

    n_common: cases both scored; n_nonzero: non-zero differences the test used; statistic /
    statistic_less: V of ``d = s_i - s_j`` (oriented) and of ``-d`` (NaN when there is no test);
    z: of ``d``; p_greater / p_less: one-sided p of "i better" / "j better"; mean / median /
    sd_difference: of the raw ``x_i - x_j`` on the common cases (sd with ddof 1).
    """

    n_common: np.ndarray
    n_nonzero: np.ndarray
    statistic: np.ndarray
    statistic_less: np.ndarray
    z: np.ndarray
    p_greater: np.ndarray
    p_less: np.ndarray
    mean_difference: np.ndarray
    median_difference: np.ndarray
    sd_difference: np.ndarray


#: the fields of :class:`PairTests`, in order
PAIR_TEST_FIELDS: tuple[str, ...] = tuple(PairTests.__dataclass_fields__)


def pair_tests(
    scores: ScoreMatrix,
    ii: np.ndarray,
    jj: np.ndarray,
    options: WilcoxonOptions = WilcoxonOptions(),
    chunk_pairs: int = 64,
) -> PairTests:
    """One-sided paired Wilcoxon signed-rank tests of the pairs ``(ii[p], jj[p])`` (row indices of
    ``scores``), each on its two algorithms' common scored cases; its V gives both one-sided
    p-values. Computed ``chunk_pairs`` pairs at a time; a pair's result does not depend on which
    other pairs share its chunk."""
    oriented = scores.oriented()
    raw = scores.values
    ii, jj = np.asarray(ii, dtype=np.int64), np.asarray(jj, dtype=np.int64)
    n_pairs = ii.size
    stat = np.full(n_pairs, np.nan)
    stat_rev = np.full(n_pairs, np.nan)
    z = np.full(n_pairs, np.nan)
    p_gt = np.full(n_pairs, np.nan)
    p_lt = np.full(n_pairs, np.nan)
    n_common = np.zeros(n_pairs, dtype=np.int64)
    n_nonzero = np.zeros(n_pairs, dtype=np.int64)
    mean_d = np.full(n_pairs, np.nan)
    median_d = np.full(n_pairs, np.nan)
    sd_d = np.full(n_pairs, np.nan)
    for start in range(0, n_pairs, chunk_pairs):
        sl = slice(start, start + chunk_pairs)
        a, b = oriented[ii[sl]], oriented[jj[sl]]
        # equal scores (also both +-inf) are a zero difference, never inf - inf = NaN
        d = np.where(a == b, 0.0, a - b)
        res = signed_rank_test(d, options)
        stat[sl], stat_rev[sl] = res.statistic, res.statistic_less
        z[sl], p_gt[sl], p_lt[sl] = res.z, res.p_greater, res.p_less
        n_nonzero[sl] = res.n_nonzero
        raw_d = raw[ii[sl]] - raw[jj[sl]]
        raw_d = np.where(raw[ii[sl]] == raw[jj[sl]], 0.0, raw_d)
        common = ~np.isnan(raw_d)
        n_common[sl] = common.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"), _quiet():
            mean_d[sl] = np.nanmean(raw_d, axis=1)
            # np.nanmedian loops over rows in Python (apply_along_axis): only on rows with NaN
            gaps = (~common).any(axis=1)
            median = np.empty(raw_d.shape[0])
            if (~gaps).any():
                median[~gaps] = np.median(raw_d[~gaps], axis=1)
            if gaps.any():
                median[gaps] = np.nanmedian(raw_d[gaps], axis=1)
            median_d[sl] = median
            sd_d[sl] = np.nanstd(raw_d, axis=1, ddof=1)
    no_test = ~np.isfinite(p_gt) | (n_nonzero == 0)
    stat[no_test] = np.nan  # no test: no statistic either
    stat_rev[no_test] = np.nan
    return PairTests(n_common=n_common, n_nonzero=n_nonzero, statistic=stat, statistic_less=stat_rev, z=z,
                     p_greater=p_gt, p_less=p_lt, mean_difference=mean_d, median_difference=median_d,
                     sd_difference=sd_d)


def pairwise_table(
    scores: ScoreMatrix,
    tests: PairTests,
    *,
    correction: str = "holm",
    alpha: float = 0.05,
    family: str = "tested",
) -> pd.DataFrame:
    """The :func:`pairwise_wilcoxon` table from the raw results of all K(K-1)/2 unordered pairs
    (``tests`` in ``numpy.triu_indices(K, 1)`` order): both ordered pairs of each, then
    ``correction`` over the ordered pairs (the family of :func:`adjust_pvalues`)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose one of {list(CORRECTIONS)}")
    ii, jj = np.triu_indices(scores.n_algorithms, 1)
    if tests.n_common.size != ii.size:
        raise ValueError(f"{scores.n_algorithms} algorithms have {ii.size} pairs, got results of {tests.n_common.size}")
    # ordered pairs: (i better than j) then (j better than i); j's V is i's sum of negative ranks
    algo = np.array(scores.algorithms, dtype=object)
    frame = pd.DataFrame(
        {
            "organ": scores.organ,
            "metric": scores.metric,
            "algorithm": np.concatenate([algo[ii], algo[jj]]),
            "opponent": np.concatenate([algo[jj], algo[ii]]),
            "n_common": np.concatenate([tests.n_common, tests.n_common]),
            "n_nonzero": np.concatenate([tests.n_nonzero, tests.n_nonzero]),
            "statistic": np.concatenate([tests.statistic, tests.statistic_less]),
            "z": np.concatenate([tests.z, -tests.z]),
            "p_value": np.concatenate([tests.p_greater, tests.p_less]),
            "mean_difference": np.concatenate([tests.mean_difference, -tests.mean_difference]),
            "median_difference": np.concatenate([tests.median_difference, -tests.median_difference]),
            "sd_difference": np.concatenate([tests.sd_difference, tests.sd_difference]),
        }
    )
    frame["p_adjusted"] = adjust_pvalues(frame["p_value"].to_numpy(), correction, family)
    frame["significant"] = frame["p_adjusted"].to_numpy() < alpha
    order = {a: i for i, a in enumerate(scores.algorithms)}
    frame = frame.sort_values(
        ["algorithm", "opponent"], key=lambda s: s.map(order), kind="stable"
    ).reset_index(drop=True)
    return frame[list(PAIRWISE_COLUMNS)]


def pairwise_wilcoxon(
    scores: ScoreMatrix,
    *,
    options: WilcoxonOptions = WilcoxonOptions(),
    correction: str = "holm",
    alpha: float = 0.05,
    chunk_pairs: int = 64,
    family: str = "tested",
) -> pd.DataFrame:
    """One-sided paired Wilcoxon tests "algorithm better than opponent" for all K(K-1) pairs.

    Each unordered pair is tested once on its common scored cases (:func:`pair_tests`); its V
    gives both one-sided p-values. ``correction`` adjusts over the ordered pairs with a finite
    p-value (:func:`pairwise_table`).

    Returns a DataFrame with columns :data:`PAIRWISE_COLUMNS`, one row per ordered pair:
      n_common: cases both algorithms scored; n_nonzero: non-zero differences used by the test;
      statistic: V of ``d = s_algorithm - s_opponent`` (oriented scores); z: ``(V - mu)/sigma``
      uncorrected; p_value: one-sided p of "algorithm better"; p_adjusted: after ``correction``;
      significant: ``p_adjusted < alpha``; mean/median/sd_difference: of the raw metric values
      ``x_algorithm - x_opponent`` on the common cases (metric units; sd with ddof=1).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose one of {list(CORRECTIONS)}")
    ii, jj = np.triu_indices(scores.n_algorithms, 1)
    tests = pair_tests(scores, ii, jj, options, chunk_pairs)
    return pairwise_table(scores, tests, correction=correction, alpha=alpha, family=family)


class _quiet:
    """Silence numpy's RuntimeWarnings for all-NaN rows (their NaN result is intended)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def pvalue_matrix(pairwise: pd.DataFrame, column: str = "p_adjusted") -> pd.DataFrame:
    """K×K matrix view of a :func:`pairwise_wilcoxon` table: row = algorithm, column = opponent
    (entry: p of "row better than column"); diagonal NaN."""
    algorithms = list(dict.fromkeys(pairwise["algorithm"]))
    m = pairwise.pivot(index="algorithm", columns="opponent", values=column)
    return m.reindex(index=algorithms, columns=algorithms)
