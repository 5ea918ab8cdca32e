"""Rankings on hand-checked examples; bootstrap stability: same resamples, seeds, Kendall's tau."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

from evaluation.stats import (
    bootstrap_rank_stability,
    compare_rankings,
    kendall_tau_b,
    min_ranks,
    rank,
    test_then_rank as then_rank,
)
from evaluation.stats.ranking import case_ranks

NAN = np.nan
#     case:  c0   c1   c2   c3
HAND = [[0.9, 0.8, 0.7, NAN],  # A
        [0.8, 0.8, 0.9, 0.6],  # B
        [0.5, 0.9, 0.6, 0.6]]  # C


def ranks_of(table):
    return dict(zip(table["algorithm"], table["rank"]))


def test_aggregate_then_rank_by_hand(make_matrix):
    m = make_matrix(HAND)
    mean = rank(m, "mean")
    assert ranks_of(mean) == {"A": 1, "B": 2, "C": 3}  # 0.8, 0.775, 0.65 (A's missing omitted)
    np.testing.assert_allclose(mean["value"], [0.8, 0.775, 0.65])
    assert ranks_of(rank(m, "median")) == {"A": 1, "B": 1, "C": 3}  # 0.8, 0.8, 0.6: ties "min"
    # missing filled with 0: A = 2.4 / 4 = 0.6
    assert ranks_of(rank(m, "mean", fill_missing=0.0)) == {"B": 1, "C": 2, "A": 3}
    # the same numbers as HD95 (lower is better) reverse the order
    assert ranks_of(rank(make_matrix(HAND, metric="hd95"), "mean")) == {"C": 1, "B": 2, "A": 3}


def test_rank_then_aggregate_by_hand(make_matrix):
    m = make_matrix(HAND)
    # per case (ties "min", missing -> K = 3): c0 A1 B2 C3; c1 C1 A2 B2; c2 B1 A2 C3; c3 A3 B1 C1
    np.testing.assert_array_equal(case_ranks(m), [[1, 2, 2, 3], [2, 2, 1, 1], [3, 1, 3, 1]])
    table = rank(m, "rank-mean")
    np.testing.assert_allclose(table["value"], [2.0, 1.5, 2.0])
    assert ranks_of(table) == {"B": 1, "A": 2, "C": 2}


def _pairwise(wins):
    rows = [{"algorithm": a, "opponent": b, "significant": (a, b) in wins}
            for a in "ABC" for b in "ABC" if a != b]
    return pd.DataFrame(rows)


def test_test_then_rank_by_hand(make_matrix):
    m = make_matrix(HAND)
    table = then_rank(m, _pairwise({("A", "B"), ("A", "C"), ("B", "C")}))
    np.testing.assert_allclose(table["value"], [1.0, 0.5, 0.0])
    assert ranks_of(table) == {"A": 1, "B": 2, "C": 3}
    tied = then_rank(m, _pairwise({("A", "C"), ("B", "C")}))
    assert ranks_of(tied) == {"A": 1, "B": 1, "C": 3}


def test_test_then_rank_end_to_end(make_matrix):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.8, 40)
    m = make_matrix([base, base + 0.1 + rng.uniform(0, 0.01, 40), base + 0.2 + rng.uniform(0, 0.01, 40)])
    assert ranks_of(rank(m, "test")) == {"C": 1, "B": 2, "A": 3}


def test_one_algorithm_and_all_equal(make_matrix):
    one = make_matrix([[0.5, 0.7]])
    for method in ("mean", "median", "rank-mean", "test"):
        assert list(rank(one, method)["rank"]) == [1]
    equal = make_matrix([[0.5, 0.7, 0.6]] * 3)
    for method in ("mean", "median", "rank-mean", "test"):
        assert list(rank(equal, method)["rank"]) == [1, 1, 1]
    s = bootstrap_rank_stability(equal, n_resamples=50)
    assert (s.bootstrap_ranks == 1).all() and np.isnan(s.kendall_tau).all()


def test_unknown_method_is_a_clear_error(make_matrix):
    with pytest.raises(ValueError, match="unknown ranking method 'best'"):
        rank(make_matrix(HAND), "best")
    with pytest.raises(ValueError, match="bootstrap ranking supports"):
        bootstrap_rank_stability(make_matrix(HAND), "test")


def test_min_ranks():
    np.testing.assert_array_equal(min_ranks([0.5, NAN, 0.9, 0.5, NAN]), [2, 4, 1, 2, 4])
    np.testing.assert_array_equal(min_ranks([[3.0, 1.0, 1.0]], higher_is_better=False), [[3, 1, 1]])


@pytest.mark.parametrize("method", ["mean", "median", "rank-mean"])
def test_bootstrap_equals_direct_resampling(random_matrix, method):
    """The vectorised bootstrap equals recomputing the ranking on each resample (same draws)."""
    b, seed = 40, 9
    s = bootstrap_rank_stability(random_matrix, method, n_resamples=b, seed=seed, chunk=7)
    n = random_matrix.n_cases
    rng = np.random.default_rng(seed)
    if method == "median":
        draws = np.concatenate([rng.integers(0, n, (min(7, b - i), n)) for i in range(0, b, 7)])
    else:
        draws = rng.integers(0, n, (b, n))
    for r in range(b):
        resampled = random_matrix.values[:, draws[r]]
        sub = type(random_matrix)(
            random_matrix.organ, random_matrix.metric, random_matrix.algorithms,
            [f"r{j}" for j in range(n)], resampled,
        )
        expected = rank(sub, method)["rank"].to_numpy()
        np.testing.assert_array_equal(s.bootstrap_ranks[r], expected)
    np.testing.assert_array_equal(s.full_rank, rank(random_matrix, method)["rank"].to_numpy())


def test_same_resample_for_every_algorithm(make_matrix):
    # B is A + 0.01 on every case: on any common resample B beats A, whatever the cases drawn.
    a = np.random.default_rng(1).uniform(0.3, 0.9, 200)
    m = make_matrix([a, a + 0.01])
    for method in ("mean", "median", "rank-mean"):
        s = bootstrap_rank_stability(m, method, n_resamples=200, seed=3)
        assert (s.bootstrap_ranks[:, 1] == 1).all() and (s.bootstrap_ranks[:, 0] == 2).all()
        assert (s.kendall_tau == 1.0).all()


def test_bootstrap_reproducible_and_summaries(random_matrix):
    a = bootstrap_rank_stability(random_matrix, n_resamples=300, seed=4)
    b = bootstrap_rank_stability(random_matrix, n_resamples=300, seed=4)
    c = bootstrap_rank_stability(random_matrix, n_resamples=300, seed=5)
    np.testing.assert_array_equal(a.bootstrap_ranks, b.bootstrap_ranks)
    assert not np.array_equal(a.bootstrap_ranks, c.bootstrap_ranks)
    k = random_matrix.n_algorithms
    assert a.rank_counts.shape == (k, k) and (a.rank_counts.sum(axis=1) == 300).all()
    for i in range(k):
        col = a.bootstrap_ranks[:, i]
        assert a.median_rank[i] == np.median(col)
        assert a.rank_ci_low[i] == np.quantile(col, 0.025)
        assert a.rank_ci_high[i] == np.quantile(col, 0.975)
        np.testing.assert_array_equal(a.rank_counts[i], [np.sum(col == r) for r in range(1, k + 1)])
    frame = a.to_frame()
    assert list(frame["algorithm"]) == list(random_matrix.algorithms)
    d = a.to_dict()
    assert len(d["kendall_tau"]) == 300 and d["per_algorithm"][0]["rank_counts"]


def test_kendall_tau_b_matches_scipy():
    rng = np.random.default_rng(2)
    rankings = rng.integers(1, 6, (50, 8))
    reference = rng.integers(1, 6, 8)
    mine = kendall_tau_b(rankings, reference)
    for r, t in zip(rankings, mine):
        assert t == pytest.approx(st.kendalltau(r, reference, variant="b").statistic)


def test_compare_rankings(make_matrix):
    m = make_matrix(HAND)
    tables = {meth: rank(m, meth) for meth in ("mean", "median", "rank-mean")}
    out = compare_rankings(tables)
    assert len(out) == 3
    row = out[(out.method_a == "mean") & (out.method_b == "rank-mean")].iloc[0]
    assert row["kendall_tau"] == pytest.approx(
        st.kendalltau([1, 2, 3], [2, 1, 2], variant="b").statistic
    )
