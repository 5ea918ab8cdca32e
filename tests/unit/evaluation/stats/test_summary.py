"""Summaries: bootstrap percentile and BCa intervals against scipy, counts, seeds, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st

from evaluation.stats import SUMMARY_COLUMNS, bootstrap_intervals, summarize
from evaluation.stats.summary import jackknife


@pytest.mark.parametrize("statistic", ["mean", "median"])
@pytest.mark.parametrize("n", [2, 7, 50, 201])
def test_intervals_equal_scipy_bootstrap_on_same_resamples(statistic, n):
    rng = np.random.default_rng(n)
    x = np.round(rng.beta(5, 2, n), 2)
    b, seed = 999, 11
    indices = np.random.default_rng(seed).integers(0, n, (b, n))
    mine = bootstrap_intervals(x, statistic, indices=indices, confidence=0.9)
    func = np.mean if statistic == "mean" else np.median
    for method, key in (("percentile", "percentile"), ("BCa", "bca")):
        ref = st.bootstrap((x,), func, n_resamples=b, method=method, confidence_level=0.9,
                           rng=np.random.default_rng(seed), vectorized=True)
        assert mine[f"low_{key}"] == pytest.approx(ref.confidence_interval.low, rel=1e-12)
        assert mine[f"high_{key}"] == pytest.approx(ref.confidence_interval.high, rel=1e-12)


@pytest.mark.parametrize("statistic", ["mean", "median"])
@pytest.mark.parametrize("n", [2, 3, 8, 9])
def test_closed_form_jackknife(statistic, n):
    x = np.random.default_rng(n).normal(size=n)
    func = np.mean if statistic == "mean" else np.median
    brute = [func(np.delete(x, i)) for i in range(n)]
    np.testing.assert_allclose(np.sort(jackknife(x, statistic)), np.sort(brute))


def test_summary_counts_and_values(make_matrix):
    nan = np.nan
    values = [[0.9, 0.8, nan, 0.0, 0.7], [nan, nan, nan, nan, nan]]
    failed = [[False, False, False, True, False], [False] * 5]
    table = summarize(make_matrix(values, failed=failed), n_resamples=200, seed=1)
    assert list(table.columns) == list(SUMMARY_COLUMNS)
    a, b = table.iloc[0], table.iloc[1]
    assert (a["n_cases"], a["n_scored"], a["n_missing"], a["n_failed"]) == (5, 4, 1, 1)
    assert a["mean"] == pytest.approx(0.6)
    assert a["median"] == pytest.approx(0.75)
    assert a["std"] == pytest.approx(np.std([0.9, 0.8, 0.0, 0.7], ddof=1))
    assert a["mean_ci_low_percentile"] <= a["mean"] <= a["mean_ci_high_percentile"]
    assert (b["n_scored"], b["n_missing"]) == (0, 5)
    assert np.isnan(b[["mean", "median", "std", "mean_ci_low_bca", "median_ci_high_percentile"]]
                    .astype(float)).all()


def test_summary_reproducible_by_seed(random_matrix):
    a = summarize(random_matrix, n_resamples=300, seed=5)
    b = summarize(random_matrix, n_resamples=300, seed=5)
    c = summarize(random_matrix, n_resamples=300, seed=6)
    assert a.equals(b)
    assert not a["mean_ci_low_bca"].equals(c["mean_ci_low_bca"])


def test_one_case_and_all_equal(make_matrix):
    table = summarize(make_matrix([[0.5, 0.5, 0.5], [0.4, np.nan, np.nan]]), n_resamples=100)
    for _, row in table.iterrows():
        value = row["mean"]
        for col in ("mean_ci_low_percentile", "mean_ci_high_percentile", "mean_ci_low_bca",
                    "mean_ci_high_bca", "median_ci_low_bca", "median_ci_high_bca"):
            assert row[col] == pytest.approx(value)
    assert np.isnan(table.iloc[1]["std"])


def test_bad_confidence_is_a_clear_error(random_matrix):
    with pytest.raises(ValueError, match="confidence must be in"):
        summarize(random_matrix, confidence=95)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 256, 1001])
def test_median_from_counts_is_np_median_bit_for_bit(n):
    """The counts path of the bootstrap median gives exactly np.median of each resample, with
    ties (values rounded to two digits), odd and even n; with a NaN it takes the selection path."""
    from evaluation.stats.summary import bootstrap_distribution, draw_resamples

    x = np.round(np.random.default_rng(n).beta(5, 2, n), 2)
    drawn = draw_resamples(np.random.default_rng(3), n, 400)
    assert drawn.counts.sum(axis=1).tolist() == [n] * 400
    by_selection = np.array([np.median(x[row]) for row in drawn.indices])
    assert np.array_equal(bootstrap_distribution(x, "median", drawn.indices, counts=drawn.counts), by_selection)
    assert np.array_equal(bootstrap_distribution(x, "median", drawn.indices), by_selection)
    x_nan = x.copy()
    x_nan[0] = np.nan
    assert np.array_equal(bootstrap_distribution(x_nan, "median", drawn.indices, counts=drawn.counts),
                          np.array([np.median(x_nan[row]) for row in drawn.indices]), equal_nan=True)


def test_shared_draws_change_nothing(random_matrix):
    """A draw cache kept across calls gives the same table as drawing every time."""
    from evaluation.stats.summary import ResampleCache

    cache = ResampleCache()
    first = summarize(random_matrix, n_resamples=200, seed=4, resamples=cache)
    again = summarize(random_matrix, n_resamples=200, seed=4, resamples=cache)
    fresh = summarize(random_matrix, n_resamples=200, seed=4)
    assert len(cache) and first.equals(fresh) and again.equals(fresh)
    tiny = ResampleCache(max_bytes=1)  # over its budget: draws are used, not kept
    assert summarize(random_matrix, n_resamples=200, seed=4, resamples=tiny).equals(fresh) and not len(tiny)
