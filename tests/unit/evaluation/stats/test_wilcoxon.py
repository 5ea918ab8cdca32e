"""Paired one-sided Wilcoxon signed-rank tests: R's known answers, scipy, Holm, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
from statsmodels.stats.multitest import multipletests

from evaluation.stats import (
    WilcoxonOptions,
    adjust_pvalues,
    pairwise_wilcoxon,
    pvalue_matrix,
    signed_rank_test,
)
from evaluation.stats.wilcoxon import average_ranks


def _row(table, a, b):
    row = table[(table["algorithm"] == a) & (table["opponent"] == b)]
    assert len(row) == 1
    return row.iloc[0]


@pytest.mark.parametrize("n, expected", [(4, 0.0359303), (2, 0.1728893)])
def test_r_known_answers(n, expected, make_matrix):
    # R: wilcox.test(rep(0.1, n), rep(0.9, n), paired=TRUE, exact=FALSE, correct=TRUE,
    #                alternative="less") -- every difference is -0.8
    r = signed_rank_test(np.full(n, -0.8), WilcoxonOptions.r_compatible())
    assert r.p_less[0] == pytest.approx(expected, abs=5e-8)
    # the same through the pairwise table: B better than A on every case by 0.8 (exactly, in
    # binary floating point; like R, ties are exact equality of the differences)
    x = np.array([0.0, 0.125, 0.0625, 0.1])[:n]
    table = pairwise_wilcoxon(make_matrix([x, x + 0.8]), correction="none")
    assert len(set(x + 0.8 - x)) == 1
    assert _row(table, "B", "A")["p_value"] == pytest.approx(expected, abs=5e-8)
    assert _row(table, "A", "B")["p_value"] > 0.5
    assert _row(table, "B", "A")["statistic"] == pytest.approx(n * (n + 1) / 2)


def test_direction_follows_metric(make_matrix):
    x = np.array([10.0, 12.0, 9.0, 11.0])
    # hd95 in mm: lower is better, so A (x) is better than B (x + 0.8)
    table = pairwise_wilcoxon(make_matrix([x, x + 0.8], metric="hd95"), correction="none")
    assert _row(table, "A", "B")["p_value"] == pytest.approx(0.0359303, abs=5e-8)
    assert _row(table, "A", "B")["mean_difference"] == pytest.approx(-0.8)


@pytest.mark.parametrize("zero_method", ["wilcox", "pratt", "zsplit"])
@pytest.mark.parametrize("correction", [True, False])
def test_matches_scipy(zero_method, correction):
    rng = np.random.default_rng(7)
    options = WilcoxonOptions(zero_method, correction)
    checked = 0
    for _ in range(60):
        n = int(rng.integers(1, 40))
        d = np.round(rng.normal(0.1, 1, n), 1)  # rounding makes ties and zeros
        r = signed_rank_test(d, options)
        for alt, mine in (("greater", r.p_greater[0]), ("less", r.p_less[0])):
            with np.errstate(all="ignore"):
                ref = st.wilcoxon(d, zero_method=zero_method, correction=correction,
                                  method="asymptotic", alternative=alt)
            if np.isfinite(ref.pvalue):
                assert mine == pytest.approx(ref.pvalue, rel=1e-10, abs=1e-15)
                assert r.statistic[0] == pytest.approx(ref.statistic)
                checked += 1
            else:
                assert np.isnan(mine)
    assert checked > 100


def test_vectorised_rows_equal_single_tests():
    rng = np.random.default_rng(3)
    d = np.round(rng.normal(0, 1, (8, 25)), 1)
    d[rng.random(d.shape) < 0.2] = np.nan  # not paired
    batch = signed_rank_test(d)
    for i, row in enumerate(d):
        single = signed_rank_test(row[~np.isnan(row)])
        assert batch.p_greater[i] == pytest.approx(single.p_greater[0])
        assert batch.p_less[i] == pytest.approx(single.p_less[0])


def test_pairwise_matches_scipy_on_common_cases(random_matrix):
    table = pairwise_wilcoxon(random_matrix, correction="holm")
    k = random_matrix.n_algorithms
    assert len(table) == k * (k - 1)
    v = random_matrix.values
    for a in range(k):
        for b in range(k):
            if a == b:
                continue
            common = ~np.isnan(v[a]) & ~np.isnan(v[b])
            ref = st.wilcoxon(v[a, common], v[b, common], zero_method="wilcox", correction=True,
                              method="asymptotic", alternative="greater")
            row = _row(table, random_matrix.algorithms[a], random_matrix.algorithms[b])
            assert row["n_common"] == common.sum()
            assert row["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
            assert row["statistic"] == pytest.approx(ref.statistic)
            assert row["mean_difference"] == pytest.approx(np.mean(v[a, common] - v[b, common]))
    # Holm over all K(K-1) ordered pairs
    holm = multipletests(table["p_value"].to_numpy(), method="holm")[1]
    np.testing.assert_allclose(table["p_adjusted"].to_numpy(), holm)
    assert (table["significant"] == (table["p_adjusted"] < 0.05)).all()
    m = pvalue_matrix(table)
    assert m.shape == (k, k) and np.isnan(np.diag(m.to_numpy())).all()


@pytest.mark.parametrize("method", ["bonferroni", "fdr_bh", "hommel"])
def test_other_corrections(random_matrix, method):
    table = pairwise_wilcoxon(random_matrix, correction=method)
    ref = multipletests(table["p_value"].to_numpy(), method=method)[1]
    np.testing.assert_allclose(table["p_adjusted"].to_numpy(), ref)


def test_unknown_correction_is_a_clear_error(random_matrix):
    with pytest.raises(ValueError, match="unknown correction 'holmes'"):
        pairwise_wilcoxon(random_matrix, correction="holmes")


def test_all_equal_and_no_common_cases_have_no_test(make_matrix):
    x = np.array([0.5, 0.6, 0.7, 0.8])
    nan = np.nan
    m = make_matrix([x, x, [nan, nan, 0.1, 0.2], [0.9, 0.9, nan, nan]])
    table = pairwise_wilcoxon(m, correction="holm")
    ab = _row(table, "A", "B")
    assert ab["n_common"] == 4 and ab["n_nonzero"] == 0 and np.isnan(ab["p_value"])
    cd = _row(table, "C", "D")
    assert cd["n_common"] == 0 and np.isnan(cd["p_adjusted"])
    # the family is the pairs with a test
    finite = table["p_value"].notna().to_numpy()
    assert finite.sum() == 12 - 4
    np.testing.assert_allclose(
        table.loc[finite, "p_adjusted"], multipletests(table.loc[finite, "p_value"], method="holm")[1]
    )


def test_zero_differences_are_dropped_as_r_does(make_matrix):
    a = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.4])
    b = a - np.array([0.0, 0.0, 0.1, 0.2, 0.3, -0.05])
    table = pairwise_wilcoxon(make_matrix([a, b]), correction="none")
    row = _row(table, "A", "B")
    assert row["n_common"] == 6 and row["n_nonzero"] == 4
    ref = st.wilcoxon(a - b, zero_method="wilcox", correction=True, method="asymptotic",
                      alternative="greater")
    assert row["p_value"] == pytest.approx(ref.pvalue)


def test_one_algorithm_and_one_case(make_matrix):
    assert len(pairwise_wilcoxon(make_matrix([[0.5, 0.6]]))) == 0
    table = pairwise_wilcoxon(make_matrix([[0.9], [0.5]]), correction="none")
    # n = 1: V = 1, mu = 0.5, sigma = 0.5, corrected z = 0 -> p = 0.5
    assert _row(table, "A", "B")["p_value"] == pytest.approx(0.5)
    assert _row(table, "B", "A")["p_value"] == pytest.approx(st.norm.cdf((1 - 0.5 + 0.5) / 0.5))  # Phi(2)


def test_average_ranks_match_rankdata():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, (10, 40)).astype(float)
    a[a == 5] = np.nan
    ranks, ties = average_ranks(a)
    for row, r, t in zip(a, ranks, ties):
        ok = ~np.isnan(row)
        np.testing.assert_allclose(r[ok], st.rankdata(row[ok]))
        counts = {v: np.sum(row[ok] == v) for v in row[ok]}
        np.testing.assert_array_equal(t[ok], [counts[v] for v in row[ok]])
        assert np.isnan(r[~ok]).all()


def test_adjust_pvalues_keeps_nan_out_of_family():
    p = np.array([0.01, np.nan, 0.04, 0.03])
    out = adjust_pvalues(p, "holm")
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2, 3]], multipletests([0.01, 0.04, 0.03], method="holm")[1])
