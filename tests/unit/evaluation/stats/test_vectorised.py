"""The vectorised rankings, bootstrap and pair tests equal the implementations they replaced.

The references below are the previous code, kept verbatim: ``min_ranks`` by all K^2 pairwise
comparisons, resample counts by one ``bincount`` per resample, pair tests of every pair in one
call. Every comparison is exact (``==`` on floats and ints): the new code does the same float
operations on the same numbers, so there is no round-off to allow for.
"""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.stats import ScoreMatrix, WilcoxonOptions, bootstrap_rank_stability, case_ranks, min_ranks
from evaluation.stats.ranking import TIE_RTOL, kendall_tau_b, rank, resample_counts
from evaluation.stats.wilcoxon import PAIR_TEST_FIELDS, pair_tests, pairwise_wilcoxon


def pairwise_min_ranks(values, higher_is_better=True, rtol=TIE_RTOL):
    """The O(K^2) tie rule, as ``min_ranks`` computed it before."""
    values = np.asarray(values, dtype=np.float64)
    key = values if higher_is_better else -values
    missing = np.isnan(key)
    a = key[..., :, None]
    b = key[..., None, :]
    with np.errstate(invalid="ignore", over="ignore"):
        tol = rtol * np.maximum(1.0, np.maximum(np.abs(a), np.abs(b)))
        better = (a > b) & ~((a - b) <= tol)
    better &= ~np.isnan(a) & ~np.isnan(b)
    ranks = 1 + better.sum(axis=-2)
    after_last = np.sum(~missing, axis=-1, keepdims=True) + 1
    return np.where(missing, after_last, ranks).astype(np.int64)


def loop_resample_counts(rng, n_cases, n_resamples, chunk=100):
    """One bincount per resample, as ``resample_counts`` counted before."""
    counts = np.empty((n_resamples, n_cases))
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n_cases, (min(chunk, n_resamples - start), n_cases))
        for r, row in enumerate(idx):
            counts[start + r] = np.bincount(row, minlength=n_cases)
    return counts


def near_tie_values(rng, shape):
    """Values on several scales with differences below, at and just above the tie tolerance,
    exact ties, NaN and +-inf."""
    base = rng.choice([0.5, 1.0, 2.0, 1e6, -3.0, 1e-12, 0.0], size=shape)
    step = rng.choice([0, 1e-10, -1e-10, 5e-10, 1e-9, -1e-9, 1.5e-9, 2.5e-9, 1e-3, 0.1], size=shape)
    values = base + step * np.maximum(1.0, np.abs(base))
    u = rng.random(shape)
    values[u < 0.05] = np.nan
    values[(u >= 0.05) & (u < 0.08)] = np.inf
    values[(u >= 0.08) & (u < 0.10)] = -np.inf
    return values


def test_min_ranks_equal_the_pairwise_tie_rule():
    rng = np.random.default_rng(0)
    for _ in range(60):
        values = near_tie_values(rng, (int(rng.integers(1, 12)), int(rng.integers(1, 25))))
        for higher in (True, False):
            assert np.array_equal(min_ranks(values, higher), pairwise_min_ranks(values, higher))
            assert np.array_equal(min_ranks(values[0], higher), pairwise_min_ranks(values[0], higher))
    assert min_ranks(np.zeros((3, 0))).shape == (3, 0)


def test_min_ranks_break_ties_by_tolerance_not_by_sorting():
    # 1 + 1.5e-9 beats 1 (difference above the 1e-9 tolerance) but ties 1 + 0.5e-9, which ties 1:
    # the rule is not transitive, each pair is decided on its own
    x = np.array([1.0, 1.0 + 0.5e-9, 1.0 + 1.5e-9, 0.9])
    assert min_ranks(x).tolist() == [2, 1, 1, 4] == pairwise_min_ranks(x).tolist()


def test_resample_counts_equal_the_per_resample_loop():
    for n, b in ((5903, 120), (7, 333), (1, 5), (100, 250)):
        new = resample_counts(np.random.default_rng(3), n, b)
        old = loop_resample_counts(np.random.default_rng(3), n, b)
        assert np.array_equal(new, old) and new.sum() == n * b


def matrix(values: np.ndarray, metric: str = "dsc") -> ScoreMatrix:
    k, n = values.shape
    return ScoreMatrix("liver", metric, tuple(f"a{i}" for i in range(k)), tuple(f"c{j}" for j in range(n)), values)


@pytest.mark.parametrize("method", ["mean", "rank-mean"])
def test_bootstrap_equals_the_loop_implementation(method):
    """Ranks, counts, intervals, P(best) and Kendall's tau of the bootstrap against the former
    computation (counts per resample, ranks by pairwise comparison), on random data with ties."""
    rng = np.random.default_rng(11)
    values = rng.uniform(0.6, 0.9, (9, 70)).round(2)
    values[rng.random(values.shape) < 0.05] = np.nan
    scores = matrix(values)
    stab = bootstrap_rank_stability(scores, method, n_resamples=200, seed=4)
    counts = loop_resample_counts(np.random.default_rng(4), scores.n_cases, 200)
    if method == "rank-mean":
        ranks0 = pairwise_min_ranks(scores.oriented().T).T.astype(np.float64)
        per_case = np.where(np.isnan(scores.values), float(scores.n_algorithms), ranks0)
        assert np.array_equal(case_ranks(scores), per_case)
        boot = pairwise_min_ranks((counts @ per_case.T) / scores.n_cases, higher_is_better=False)
    else:
        scored = ~np.isnan(values)
        sums = counts @ np.where(scored, values, 0.0).T
        ns = counts @ scored.T.astype(np.float64)
        boot = pairwise_min_ranks(np.where(ns > 0, sums / np.where(ns > 0, ns, 1.0), np.nan))
    assert np.array_equal(stab.bootstrap_ranks, boot)
    k = scores.n_algorithms
    assert np.array_equal(stab.rank_counts, np.stack([np.bincount(boot[:, a] - 1, minlength=k) for a in range(k)]))
    lo, med, hi = np.quantile(boot, [0.025, 0.5, 0.975], axis=0)
    assert np.array_equal(stab.rank_ci_low, lo) and np.array_equal(stab.rank_ci_high, hi)
    assert np.array_equal(stab.median_rank, med) and np.array_equal(stab.mean_rank, boot.mean(axis=0))
    assert np.array_equal(stab.kendall_tau, kendall_tau_b(boot, rank(scores, method)["rank"].to_numpy()),
                          equal_nan=True)
    # resample counts drawn once and handed in: the same result
    again = bootstrap_rank_stability(scores, method, n_resamples=200, seed=4,
                                     counts=resample_counts(np.random.default_rng(4), scores.n_cases, 200))
    assert np.array_equal(again.bootstrap_ranks, stab.bootstrap_ranks)
    with pytest.raises(ValueError, match="counts must be"):
        bootstrap_rank_stability(scores, method, n_resamples=10, seed=4, counts=counts)


@pytest.mark.parametrize("options", [WilcoxonOptions(), WilcoxonOptions("wilcox", False, "auto"),
                                     WilcoxonOptions("zsplit", True, "asymptotic")])
def test_a_pair_test_does_not_depend_on_the_other_pairs(options):
    """Each pair alone, in reverse order and in chunks of 3 gives the numbers of all pairs at once
    (what lets the leaderboard cache pairs), and pairwise_wilcoxon is built from them."""
    rng = np.random.default_rng(5)
    values = rng.uniform(0.5, 1.0, (6, 40)).round(2)
    values[rng.random(values.shape) < 0.1] = np.nan
    scores = matrix(values)
    ii, jj = np.triu_indices(6, 1)
    together = pair_tests(scores, ii, jj, options)
    reverse = pair_tests(scores, ii[::-1], jj[::-1], options, chunk_pairs=3)
    for name in PAIR_TEST_FIELDS:
        assert np.array_equal(getattr(reverse, name)[::-1], getattr(together, name), equal_nan=True), name
    for p in (0, 7, 14):
        alone = pair_tests(scores, ii[p:p + 1], jj[p:p + 1], options)
        for name in PAIR_TEST_FIELDS:
            assert np.array_equal(getattr(alone, name), getattr(together, name)[p:p + 1], equal_nan=True), name
    table = pairwise_wilcoxon(scores, options=options)
    first = table[(table.algorithm == "a0") & (table.opponent == "a1")].iloc[0]
    assert first.p_value == together.p_greater[0] and first.n_common == together.n_common[0]
