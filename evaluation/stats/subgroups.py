"""Subgroup analysis: does an algorithm score differently across hospitals, ages, sexes, ...?

For one :class:`ScoreMatrix` and one case-metadata variable (``hospital``, ``age_decade``,
``sex``, ``race``, ``manufacturer``, ``contrast_phase``, ``diagnosis`` or any column), each case
falls into the group of its label; a case without a label falls into :data:`UNKNOWN_GROUP`.

* summary: per algorithm and group - cases, scored, missing, failed, mean, median, SD;
* Kruskal-Wallis H test across groups, per algorithm (``scipy.stats.kruskal``);
* pairwise two-sided Mann-Whitney U tests between groups, per algorithm
  (``scipy.stats.mannwhitneyu``, ``method="auto"``), p-values adjusted over the algorithm's group
  pairs (Holm by default, any statsmodels ``multipletests`` method).

Small groups are never dropped silently: a group with fewer than ``min_group_size`` scored cases
(and the unknown group) stays in the summary with ``too_small = True`` (``is_unknown = True``) and
``tested = False``; the tests use only the other groups, and each test row lists which groups
were tested and which were left out. A test needs two tested groups; otherwise its row has NaN
statistics and a ``note`` saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats

from evaluation.stats.scores import ScoreMatrix, json_ready
from evaluation.stats.wilcoxon import adjust_pvalues

#: the metadata variables of the Touchstone breakdowns (``age_decade`` is derived from ``age``)
SUBGROUP_VARIABLES = (
    "hospital",
    "age_decade",
    "sex",
    "race",
    "manufacturer",
    "contrast_phase",
    "diagnosis",
)
UNKNOWN_GROUP = "unknown"
#: a numeric metadata column with more distinct values than this is binned (see :func:`bin_numeric`)
MAX_NUMERIC_GROUPS = 10
NUMERIC_BINS = 5


def bin_numeric(column: pd.Series) -> pd.Series:
    """Group labels of a metadata column, the values as written, except for a numeric column
    (every filled value parses as a number) with more than :data:`MAX_NUMERIC_GROUPS` distinct
    values: it is cut at its quintiles (``NUMERIC_BINS`` equal-count bins, ``numpy.quantile``
    linear) into labels ``"lo-hi"`` (closed on both ends for the first bin, ``(lo, hi]`` after)."""
    filled = column[column.notna() & (column.astype(str).str.strip() != "")]
    numbers = pd.to_numeric(filled, errors="coerce")
    if filled.empty or numbers.isna().any() or numbers.nunique() <= MAX_NUMERIC_GROUPS:
        return column
    edges = np.unique(np.quantile(numbers.to_numpy(dtype=float), np.linspace(0, 1, NUMERIC_BINS + 1)))
    codes = np.searchsorted(edges[1:-1], numbers.to_numpy(dtype=float), side="left")
    labels = [f"{edges[c]:g}-{edges[c + 1]:g}" for c in codes]
    out = pd.Series(np.nan, index=column.index, dtype=object)
    out.loc[filled.index] = labels
    return out


def age_decade(age: pd.Series) -> pd.Series:
    """Age in years -> decade label ``"40-49"``; missing or negative ages -> NaN."""
    years = pd.to_numeric(age, errors="coerce")
    years = years.where(years >= 0)
    lower = (np.floor(years / 10) * 10).astype("Int64")
    # int(): pandas 2 hands Int64 values to map() as floats, pandas 3 as ints
    return lower.map(lambda x: f"{int(x)}-{int(x) + 9}" if pd.notna(x) else np.nan).astype(object)


def group_labels(case_metadata: pd.DataFrame, variable: str, case_ids: tuple[str, ...]) -> np.ndarray:
    """Group label (str) of each case of ``case_ids`` for ``variable``; unknown -> ``"unknown"``."""
    if "case_id" not in case_metadata.columns:
        raise ValueError("case_metadata needs a case_id column")
    meta = case_metadata.assign(case_id=case_metadata["case_id"].astype(str)).set_index("case_id")
    if not meta.index.is_unique:
        raise ValueError("case_metadata has duplicate case_id values")
    if variable in ("age_decade", "age") and "age_decade" not in meta.columns:
        if "age" not in meta.columns:
            raise ValueError("age_decade needs an 'age' (years) or 'age_decade' column in the metadata")
        column = age_decade(meta["age"])
    elif variable in meta.columns:
        column = bin_numeric(meta[variable])
    else:
        raise ValueError(
            f"case metadata has no column {variable!r}; available: {sorted(meta.columns)}"
        )
    labels = column.reindex(list(case_ids))
    return np.array(
        [UNKNOWN_GROUP if (pd.isna(v) or str(v).strip() == "") else str(v) for v in labels],
        dtype=object,
    )


@dataclass(frozen=True, eq=False)
class SubgroupAnalysis:
    """Subgroup results of one (organ, metric, variable).

    Attributes:
      summary: one row per (algorithm, group): organ, metric, variable, algorithm, group,
        n_cases, n_scored, n_missing, n_failed, mean, median, std, too_small, is_unknown, tested.
      kruskal: one row per algorithm: organ, metric, variable, algorithm, n_groups_tested,
        groups_tested, groups_excluded (lists of labels), statistic (H), p_value, note.
      mannwhitney: one row per (algorithm, group pair): organ, metric, variable, algorithm,
        group_a, group_b, n_a, n_b, statistic (U of group_a), p_value, p_adjusted, significant.
      min_group_size, correction, alpha: the settings used.
    """

    organ: str
    metric: str
    variable: str
    min_group_size: int
    correction: str
    alpha: float
    summary: pd.DataFrame
    kruskal: pd.DataFrame
    mannwhitney: pd.DataFrame

    # a field a line, like RankStability.to_frame in ranking.py: alike in shape, other fields
    def to_dict(self) -> dict:
        return json_ready(
            {
                "organ": self.organ,
                "metric": self.metric,
                "variable": self.variable,
                "min_group_size": self.min_group_size,
                "correction": self.correction,
                "alpha": self.alpha,
                "summary": self.summary,
                "kruskal": self.kruskal,
                "mannwhitney": self.mannwhitney,
            }
        )


def subgroup_analysis(
    scores: ScoreMatrix,
    case_metadata: pd.DataFrame,
    variable: str,
    *,
    min_group_size: int = 10,
    correction: str = "holm",
    alpha: float = 0.05,
) -> SubgroupAnalysis:
    """Per-group summaries, Kruskal-Wallis and corrected pairwise Mann-Whitney per algorithm."""
    if min_group_size < 1:
        raise ValueError(f"min_group_size must be >= 1, got {min_group_size}")
    labels = group_labels(case_metadata, variable, scores.case_ids)
    groups = sorted(set(labels) - {UNKNOWN_GROUP}) + ([UNKNOWN_GROUP] if UNKNOWN_GROUP in labels else [])
    members = {g: labels == g for g in groups}
    base = {"organ": scores.organ, "metric": scores.metric, "variable": variable}
    summary_rows, kw_rows, mw_rows = [], [], []
    for k, algorithm in enumerate(scores.algorithms):
        row = scores.values[k]
        samples: dict[str, np.ndarray] = {}
        excluded: list[str] = []
        for g in groups:
            in_group = members[g]
            x = row[in_group]
            x = x[~np.isnan(x)]
            too_small = x.size < min_group_size
            unknown = g == UNKNOWN_GROUP
            tested = not (too_small or unknown)
            if tested:
                samples[g] = x
            else:
                excluded.append(g)
            summary_rows.append(
                {
                    **base,
                    "algorithm": algorithm,
                    "group": g,
                    "n_cases": int(in_group.sum()),
                    "n_scored": int(x.size),
                    "n_missing": int(in_group.sum() - x.size),
                    "n_failed": int(scores.failed[k, in_group].sum()),
                    "mean": float(x.mean()) if x.size else np.nan,
                    "median": float(np.median(x)) if x.size else np.nan,
                    "std": float(x.std(ddof=1)) if x.size > 1 else np.nan,
                    "too_small": bool(too_small),
                    "is_unknown": bool(unknown),
                    "tested": bool(tested),
                }
            )
        tested_groups = list(samples)
        h, p, note = np.nan, np.nan, ""
        if len(tested_groups) < 2:
            note = f"fewer than 2 groups with >= {min_group_size} scored cases"
        else:
            pooled = np.concatenate(list(samples.values()))
            if np.all(pooled == pooled[0]):
                note = "all scores equal: no test"
            else:
                res = stats.kruskal(*samples.values())
                h, p = float(res.statistic), float(res.pvalue)
        kw_rows.append(
            {
                **base,
                "algorithm": algorithm,
                "n_groups_tested": len(tested_groups),
                "groups_tested": tested_groups,
                "groups_excluded": excluded,
                "statistic": h,
                "p_value": p,
                "note": note,
            }
        )
        pair_rows = []
        for ga, gb in combinations(tested_groups, 2):
            xa, xb = samples[ga], samples[gb]
            res = stats.mannwhitneyu(xa, xb, alternative="two-sided", method="auto")
            pair_rows.append(
                {
                    **base,
                    "algorithm": algorithm,
                    "group_a": ga,
                    "group_b": gb,
                    "n_a": int(xa.size),
                    "n_b": int(xb.size),
                    "statistic": float(res.statistic),
                    "p_value": float(res.pvalue),
                }
            )
        if pair_rows:
            adjusted = adjust_pvalues(np.array([r["p_value"] for r in pair_rows]), correction)
            for r, q in zip(pair_rows, adjusted):
                r["p_adjusted"] = float(q)
                r["significant"] = bool(q < alpha)
        mw_rows.extend(pair_rows)
    mw_columns = [
        "organ", "metric", "variable", "algorithm", "group_a", "group_b", "n_a", "n_b",
        "statistic", "p_value", "p_adjusted", "significant",
    ]
    # keyword arguments one a line, like OrganAnalysis in analysis.py: alike in shape, other fields
    return SubgroupAnalysis(
        organ=scores.organ,
        metric=scores.metric,
        variable=variable,
        min_group_size=min_group_size,
        correction=correction,
        alpha=alpha,
        summary=pd.DataFrame(summary_rows),
        kruskal=pd.DataFrame(kw_rows),
        mannwhitney=pd.DataFrame(mw_rows, columns=mw_columns),
    )
