"""Subgroups (small-group flags, Kruskal-Wallis, Mann-Whitney), MDD, score matrices, analyze."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from evaluation.stats import (
    AnalysisOptions,
    ScoreMatrix,
    age_decade,
    analyze,
    average_over_organs,
    minimal_detectable_difference,
    organ_mdd,
    score_matrices_from_long,
    subgroup_analysis,
)


def _metadata(n, rng):
    hospital = np.array(["h1"] * 25 + ["h2"] * 20 + ["h3"] * 12 + ["tiny"] * 3)[:n]
    age = rng.integers(18, 90, n).astype(float)
    age[:2] = np.nan
    return pd.DataFrame({"case_id": [f"c{j}" for j in range(n)], "hospital": hospital, "age": age})


def test_subgroups_flag_small_groups_and_test_the_rest(make_matrix):
    rng = np.random.default_rng(0)
    values = np.round(rng.uniform(0.5, 1.0, (2, 60)), 2)
    values[0, :30] -= 0.2  # algorithm A is worse in h1 and part of h2
    values[1, 50] = np.nan
    m = make_matrix(values)
    meta = _metadata(60, rng)
    res = subgroup_analysis(m, meta, "hospital", min_group_size=10)
    s = res.summary.set_index(["algorithm", "group"])
    assert set(s.index.get_level_values("group")) == {"h1", "h2", "h3", "tiny"}  # nothing dropped
    assert s.loc[("A", "tiny"), "too_small"] and not s.loc[("A", "tiny"), "tested"]
    assert s.loc[("A", "tiny"), "n_cases"] == 3
    assert not s.loc[("A", "h3"), "too_small"]
    assert s.loc[("B", "h3"), "n_missing"] == 1
    assert s.loc[("A", "h1"), "mean"] == pytest.approx(values[0, :25].mean())
    kw = res.kruskal.set_index("algorithm").loc["A"]
    assert kw["groups_tested"] == ["h1", "h2", "h3"] and kw["groups_excluded"] == ["tiny"]
    ref = st.kruskal(values[0, :25], values[0, 25:45], values[0, 45:57])
    assert kw["statistic"] == pytest.approx(ref.statistic) and kw["p_value"] == pytest.approx(ref.pvalue)
    mw = res.mannwhitney[res.mannwhitney.algorithm == "A"]
    assert len(mw) == 3
    first = mw.iloc[0]
    ref = st.mannwhitneyu(values[0, :25], values[0, 25:45], alternative="two-sided")
    assert (first.group_a, first.group_b) == ("h1", "h2")
    assert first.p_value == pytest.approx(ref.pvalue)
    np.testing.assert_allclose(mw.p_adjusted, multipletests(mw.p_value, method="holm")[1])
    json.dumps(res.to_dict(), allow_nan=False)


def test_subgroups_unknown_labels_and_age_decades(make_matrix):
    rng = np.random.default_rng(1)
    m = make_matrix(rng.uniform(0, 1, (1, 60)))
    res = subgroup_analysis(m, _metadata(60, rng), "age_decade", min_group_size=5)
    groups = res.summary.set_index("group")
    assert groups.loc["unknown", "n_cases"] == 2 and groups.loc["unknown", "is_unknown"]
    assert not groups.loc["unknown", "tested"]
    assert "unknown" in res.kruskal.iloc[0]["groups_excluded"]
    decades = list(age_decade(pd.Series([0, 9.9, 10, 45, np.nan, -1])))
    assert decades[:4] == ["0-9", "0-9", "10-19", "40-49"]
    assert pd.isna(decades[4]) and pd.isna(decades[5])


def test_subgroups_too_few_groups_and_unknown_variable(make_matrix):
    m = make_matrix(np.random.default_rng(2).uniform(0, 1, (1, 60)))
    meta = _metadata(60, np.random.default_rng(2))
    res = subgroup_analysis(m, meta, "hospital", min_group_size=21)  # only h1 (25) is big enough
    assert np.isnan(res.kruskal.iloc[0]["p_value"]) and "fewer than 2 groups" in res.kruskal.iloc[0]["note"]
    assert res.mannwhitney.empty
    with pytest.raises(ValueError, match="no column 'scanner'"):
        subgroup_analysis(m, meta, "scanner")


def test_mdd_normal_formula_and_t_solver():
    mdd = minimal_detectable_difference(0.1, 100, alpha=0.05, power=0.8)
    assert mdd == pytest.approx((1.6448536269514722 + 0.8416212335729143) * 0.1 / 10)
    mdd_t = minimal_detectable_difference(0.1, 100, alpha=0.05, power=0.8, method="t")
    assert mdd_t > mdd
    power = TTestPower().power(effect_size=mdd_t / 0.1, nobs=100, alpha=0.05, alternative="larger")
    assert power == pytest.approx(0.8, abs=1e-5)  # the solver's tolerance
    assert np.isnan(minimal_detectable_difference(0.1, 1))
    assert minimal_detectable_difference(0.0, 50) == 0.0


def test_organ_mdd(random_matrix):
    table = organ_mdd(random_matrix)
    k = random_matrix.n_algorithms
    assert len(table) == k * (k - 1) // 2 + 1
    organ = table.iloc[-1]
    assert pd.isna(organ["algorithm"]) and organ["n"] == random_matrix.n_cases
    assert organ["sd_diff"] == pytest.approx(np.median(table["sd_diff"].iloc[:-1]))
    v = random_matrix.values
    d = v[0] - v[1]
    d = d[~np.isnan(d)]
    assert table.iloc[0]["sd_diff"] == pytest.approx(d.std(ddof=1))


def _long():
    rows = []
    for algo, base in (("alpha", 0.9), ("beta", 0.8)):
        for case in ("c1", "c2", "c3"):
            for organ in ("liver", "spleen"):
                if (algo, case, organ) == ("beta", "c3", "spleen"):
                    continue  # not scored
                rows.append({"algorithm": algo, "case_id": case, "organ": organ,
                             "dsc": base, "hd95": 10 * base, "failed": case == "c2" and algo == "beta"})
    return pd.DataFrame(rows)


def test_score_matrices_from_long():
    meta = pd.DataFrame({"case_id": ["c1", "c2", "c3", "c4"], "hospital": ["a", "a", "b", "b"]})
    mats = score_matrices_from_long(_long(), case_metadata=meta)
    assert set(mats) == {(o, m) for o in ("liver", "spleen") for m in ("dsc", "hd95")}
    spleen = mats[("spleen", "dsc")]
    assert spleen.algorithms == ("alpha", "beta") and spleen.case_ids == ("c1", "c2", "c3", "c4")
    np.testing.assert_array_equal(np.isnan(spleen.values), [[0, 0, 0, 1], [0, 0, 1, 1]])
    assert spleen.failed[1, 1] and spleen.failed.sum() == 1
    assert mats[("liver", "hd95")].higher_is_better is False
    avg = average_over_organs([mats[("liver", "dsc")], spleen])
    assert avg.organ == "average" and avg.values[1, 2] == pytest.approx(0.8)  # liver only
    assert np.isnan(avg.values[0, 3])


def test_score_matrices_from_long_errors():
    df = _long()
    with pytest.raises(ValueError, match="not in case_metadata"):
        score_matrices_from_long(df, case_metadata=pd.DataFrame({"case_id": ["c1"]}))
    with pytest.raises(ValueError, match="duplicate"):
        score_matrices_from_long(pd.concat([df, df.head(1)]))
    with pytest.raises(ValueError, match="unknown metric 'iou'"):
        score_matrices_from_long(df.assign(iou=0.5), metrics=["iou"])
    assert score_matrices_from_long(df.assign(iou=0.5), metrics=["iou"],
                                    higher_is_better_overrides={"iou": True})
    with pytest.raises(ValueError, match="lacks column"):
        score_matrices_from_long(df.drop(columns=["organ"]))
    with pytest.raises(ValueError, match="shape"):
        ScoreMatrix("liver", "dsc", ("a",), ("c1", "c2"), np.zeros((2, 2)))


def test_analyze_is_json_ready(random_matrix):
    meta = pd.DataFrame({"case_id": random_matrix.case_ids,
                         "sex": ["F", "M"] * (random_matrix.n_cases // 2)})
    res = analyze(random_matrix, case_metadata=meta,
                  options=AnalysisOptions(n_resamples=100, subgroup_variables=("sex",),
                                          bootstrap_methods=("mean", "rank-mean")))
    assert set(res.rankings["method"]) == {"mean", "median", "rank-mean", "test"}
    assert set(res.stability) == {"mean", "rank-mean"}
    text = json.dumps(res.to_dict(), allow_nan=False)
    assert '"pairwise"' in text and '"sex"' in text
