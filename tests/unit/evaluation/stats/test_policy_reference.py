"""Issue 9 known answers: Touchstone's significance maps reproduced from its own file format,
exact ties (challengeR's c_worstcase), missing-case policies, all-organs average, metadata files."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon
from statsmodels.stats.multitest import multipletests

from evaluation.labels import ORGANS
from evaluation.manifest import MetadataError, read_case_metadata
from evaluation.stats import (
    ScoreMatrix,
    WilcoxonOptions,
    apply_missing_policy,
    average_over_organs,
    bootstrap_rank_stability,
    pairwise_wilcoxon,
    rank,
    score_matrices_from_long,
)
from evaluation.stats.wilcoxon import exact_sf
from services.importers import read_touchstone_dir


def _write_models(root: Path, n_cases: int, seed: int) -> Path:
    """Touchstone-format folders: name + 9 organ columns, 'nan' cells, some models missing rows,
    4-decimal values (ties and zero differences)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.6, 0.95, (n_cases, len(ORGANS)))
    for m, shift in enumerate((0.0, 0.01, 0.0, -0.02)):
        folder = root / f"model{m}"
        folder.mkdir(parents=True)
        vals = np.round(np.clip(base + shift + rng.normal(0, 0.02, base.shape), 0, 1), 4)
        if m == 2:
            vals[: n_cases // 3] = np.round(base[: n_cases // 3], 4)  # identical to model0's base: zeros
        rows = list(range(n_cases)) if m != 3 else [i for i in range(n_cases) if i % 5]  # model3 lacks cases
        for metric in ("dsc", "nsd"):
            lines = ["name," + ",".join(ORGANS)]
            for i in rows:
                cells = ["nan" if (i % 7 == 3 and o == 1) else f"{vals[i, o]:.4f}" for o in range(len(ORGANS))]
                lines.append(f"s{i:04d}," + ",".join(cells))
            (folder / f"{metric}.csv").write_text("\n".join(lines) + "\n")
    return root


def _touchstone_script(root: Path, organ: str) -> dict[tuple[str, str], tuple[float, float]]:
    """plot/SignificanceMaps.py, as published: per ordered pair wilcoxon(x, y, 'greater') with
    scipy's defaults on the aligned non-NaN rows, then multipletests(method='holm') over all."""
    results = {p.name: pd.read_csv(p / "dsc.csv")[["name", organ]] for p in sorted(root.iterdir())}

    def allign(df1, df2):
        a = df1.dropna().drop_duplicates(subset=["name"]).reset_index(drop=True)
        b = df2.dropna().drop_duplicates(subset=["name"]).reset_index(drop=True)
        common = set(a["name"]) & set(b["name"])
        a = a[a["name"].isin(common)].sort_values(by="name").reset_index(drop=True)
        b = b[b["name"].isin(common)].sort_values(by="name").reset_index(drop=True)
        return a.drop(columns=["name"]), b.drop(columns=["name"])

    def one_sided(x, y):
        try:
            return wilcoxon(x, y, alternative="greater", nan_policy="raise").pvalue
        except ValueError:
            return np.array([100.0])

    pairs, pvalues = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g1, g2 in itertools.combinations(list(results), 2):
            d1, d2 = allign(results[g1], results[g2])
            pvalues.append(np.asarray(one_sided(d1, d2)).item()); pairs.append((g1, g2))
            pvalues.append(np.asarray(one_sided(d2, d1)).item()); pairs.append((g2, g1))
        adjusted = multipletests(pvalues, method="holm")[1]
    return {pair: (p, q) for pair, p, q in zip(pairs, pvalues, adjusted)}


def _matrices(root: Path):
    rows = []
    for model in read_touchstone_dir(root):
        for case_id, organs in model.scores.items():
            for organ, v in organs.items():
                rows.append({"algorithm": model.name, "case_id": case_id, "organ": organ, **v})
    return score_matrices_from_long(pd.DataFrame(rows), metrics=["dsc", "nsd"])


@pytest.mark.parametrize("n_cases", [10, 40, 120])  # sign-flip (n <= 13), exact (<= 50), asymptotic
def test_touchstone_2024_equals_the_published_script(tmp_path, n_cases):
    root = _write_models(tmp_path / "res", n_cases, seed=n_cases)
    mats = _matrices(root)
    worst = 0.0
    for organ in ("liver", "gall_bladder"):
        ref = _touchstone_script(root, organ)
        table = pairwise_wilcoxon(mats[(organ, "dsc")], options=WilcoxonOptions.scipy_default(),
                                  correction="holm", family="all").set_index(["algorithm", "opponent"])
        assert len(table) == len(ref)
        for (a, b), (p, q) in ref.items():
            row = table.loc[(a, b)]
            for ours, theirs in ((row.p_value, p), (row.p_adjusted, q)):
                if np.isnan(theirs):
                    assert np.isnan(ours)
                else:
                    worst = max(worst, abs(ours - theirs))
            assert bool(row.significant) == (q < 0.05)
    assert worst <= 1e-12, worst


def test_exact_null_distribution_equals_scipy():
    rng = np.random.default_rng(3)
    for n in (1, 5, 12, 30, 50):
        d = rng.permutation(np.arange(1, n + 1)) * rng.choice([-1.0, 1.0], n) / 7.0
        ours = pairwise_wilcoxon(ScoreMatrix("o", "dsc", ("A", "B"), tuple(map(str, range(n))),
                                             np.vstack([d, np.zeros(n)])),
                                 options=WilcoxonOptions(method="exact"), correction="none")
        assert abs(ours.p_value[0] - wilcoxon(d, method="exact", alternative="greater").pvalue) < 1e-12
        assert abs(ours.p_value[1] - wilcoxon(-d, method="exact", alternative="greater").pvalue) < 1e-12
    assert exact_sf(3)[0] == 1.0 and exact_sf(3)[6] == 1 / 8


def _c_worstcase() -> ScoreMatrix:
    """challengeR's c_worstcase: values seq(.8, 1, length.out=5), every permutation of 5 algorithms."""
    strip = np.linspace(0.8, 1.0, 5)
    perms = list(itertools.permutations(range(5)))
    values = np.empty((5, len(perms)))
    for case, perm in enumerate(perms):
        for position, algorithm in enumerate(perm):
            values[algorithm, case] = strip[position]
    return ScoreMatrix("o", "dsc", tuple(f"A{i + 1}" for i in range(5)), tuple(map(str, range(len(perms)))), values)


def test_identical_values_in_permuted_order_all_rank_one():
    m = _c_worstcase()
    assert len({float(v) for v in m.values.mean(axis=1)}) > 1  # float noise exists without the tie rule
    for method in ("mean", "median", "rank-mean", "test"):
        assert list(rank(m, method)["rank"]) == [1] * 5, method
    stab = bootstrap_rank_stability(m, "mean", n_resamples=200, seed=1)
    assert (stab.full_rank == 1).all() and np.isnan(stab.kendall_tau).all()


def test_missing_policies():
    values = np.array([[0.9, 0.8, 0.7, 0.6, np.nan], [0.95, np.nan, 0.75, 0.65, np.nan]])
    m = ScoreMatrix("o", "dsc", ("A", "B"), ("c0", "c1", "c2", "c3", "c4"), values)  # c4: nobody scored it
    worst = apply_missing_policy(m, "worst", worst=0.0)
    assert worst.values[1, 1] == 0.0 and worst.failed[1, 1] and worst.n_cases == 4
    common = apply_missing_policy(m, "common")
    assert common.case_ids == ("c0", "c2", "c3")
    assert list(rank(common, "mean")["rank"]) == [2, 1]  # B better on the shared cases (0.783 vs 0.733)
    assert list(rank(worst, "mean")["rank"]) == [1, 2]  # B's missing case is a 0


def test_all_organs_average():
    liver = ScoreMatrix("liver", "dsc", ("A", "B"), ("c0", "c1"), [[0.9, 0.8], [0.9, np.nan]])
    spleen = ScoreMatrix("spleen", "dsc", ("A", "B"), ("c0", "c1"), [[0.7, np.nan], [0.5, np.nan]])
    scored = average_over_organs([liver, spleen])
    strict = average_over_organs([liver, spleen], rule="all-organs")
    np.testing.assert_allclose(scored.values, [[0.8, 0.8], [0.7, np.nan]])
    # c1's spleen is absent from the ground truth (nobody scored it): A counts, B lacks the liver
    np.testing.assert_allclose(strict.values, [[0.8, 0.8], [0.7, np.nan]])
    liver2 = ScoreMatrix("liver", "dsc", ("A", "B"), ("c0", "c1"), [[0.9, 0.8], [np.nan, 0.6]])
    strict2 = average_over_organs([liver2, spleen], rule="all-organs")
    assert np.isnan(strict2.values[1, 0]) and strict2.values[1, 1] == 0.6
    assert average_over_organs([liver2, spleen]).values[1, 0] == 0.5


TOTALSEG = ("\ufeffimage_id;age;gender;institute;study_type;split;manufacturer;scanner_model;kvp;pathology;"
            "pathology_location\n"
            "s0001;50.00;;I;ct polytrauma;train;siemens;sensation 64;120;unclear;unclear\n"
            "s0002;77.00;m;C;ct abdomen-pelvis;test;siemens;emotion 16;100;no_pathology;no_location\n"
            "s0003;;f;C;ct neck;test;;;;;\n")


def test_touchstone_metadata_file_as_published(tmp_path):
    path = tmp_path / "metaTotalSeg.csv"
    path.write_text(TOTALSEG, encoding="utf-8")
    meta = read_case_metadata(path)
    assert meta.layout == "touchstone-totalsegmentator" and meta.delimiter == ";"
    assert meta.mapping["image_id"] == "case_id" and meta.mapping["institute"] == "hospital"
    assert set(meta.extras) == {"study_type", "split", "kvp", "pathology_location"}
    assert meta.rows["s0001"] == {"age": 50, "hospital": "I", "manufacturer": "siemens", "scanner": "sensation 64",
                                  "diagnosis": "unclear", "extra": {"study_type": "ct polytrauma", "split": "train",
                                                                    "kvp": "120", "pathology_location": "unclear"}}
    assert meta.rows["s0002"]["sex"] == "m"  # as written
    assert "age" not in meta.rows["s0003"]


def test_metadata_errors_name_file_row_and_column(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("site\tcase\tage\nA\tc1\t40\nB\tc1\t41\nC\tc2\tforty\n", encoding="utf-8")
    with pytest.raises(MetadataError) as exc:
        read_case_metadata(path, {"case": "case_id", "site": "hospital"})
    text = str(exc.value)
    assert "row 3, column case: duplicate case id 'c1'" in text and "row 4, column age: 'forty'" in text
    ok = tmp_path / "ok.csv"
    ok.write_text("case,site,kvp\nc1,A,120\n", encoding="utf-8")
    meta = read_case_metadata(ok, {"case": "case_id", "site": "hospital"})
    assert meta.rows["c1"] == {"hospital": "A", "extra": {"kvp": "120"}}


def test_a_pair_without_a_test_under_family_all(tmp_path):
    """Found by review: one model equal to another on an organ (every difference zero, no test:
    scipy gives NaN, or raised and Touchstone's script recorded p = 100) crashed Holm over all
    ordered pairs. The tested pairs
    get the script's adjusted p (the untested pair counts in m); the untested pair has no p."""
    root = _write_models(tmp_path / "res", 30, seed=5)
    (root / "model4").mkdir()
    for metric in ("dsc", "nsd"):  # a copy of model0: every difference to it is zero
        (root / "model4" / f"{metric}.csv").write_text((root / "model0" / f"{metric}.csv").read_text())
    mats = _matrices(root)
    ref = _touchstone_script(root, "liver")
    table = pairwise_wilcoxon(mats[("liver", "dsc")], options=WilcoxonOptions.scipy_default(),
                              correction="holm", family="all").set_index(["algorithm", "opponent"])
    # scipy 1.17 answers NaN for 30 all-zero differences (older versions raised: the script's 100)
    untested = [pair for pair, (p, _) in ref.items() if np.isnan(p) or p == 100.0]
    assert set(untested) == {("model0", "model4"), ("model4", "model0")}
    for pair, (p, q) in ref.items():
        row = table.loc[pair]
        if pair in untested:
            assert np.isnan(row.p_value) and np.isnan(row.p_adjusted) and not row.significant
        else:
            assert abs(row.p_value - p) <= 1e-12 and abs(row.p_adjusted - q) <= 1e-12
