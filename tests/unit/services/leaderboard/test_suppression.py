"""Units of small-cell suppression (services.leaderboard.suppression) and of plot labels taken
literally (names with "$...$" are never mathtext)."""

from __future__ import annotations

import re

import pytest

from services.leaderboard import suppression
from services.web import plots

ROW = {"submission_id": 7, "label": "A", "group": "h1", "n": 1, "n_failed": 0, "n_missing": 0, "mean": 0.91,
       "median": 0.91, "std": None, "mean_ci_low": 0.91, "mean_ci_high": 0.91, "median_ci_low": 0.91,
       "median_ci_high": 0.91}


def test_a_small_group_keeps_its_name_and_loses_its_numbers():
    out = suppression.suppress_group(ROW, 10, viewer_is_organizer=False)
    assert out["suppressed"] is True and out["n"] == "< 10" and out["group"] == "h1" and out["submission_id"] == 7
    assert all(out[name] is None for name in suppression.GROUP_STATISTICS)
    assert ROW["mean"] == 0.91  # a copy: cached rows are shared


def test_organizers_and_big_groups_keep_every_number():
    seen = suppression.suppress_group(ROW, 10, viewer_is_organizer=True)
    assert seen == {**ROW, "suppressed": True}
    big = {**ROW, "n": 10, "n_missing": 1}  # a mean over 10 values
    assert suppression.suppress_group(big, 10, False) == {**big, "suppressed": False}
    # 9 values and one unscored case: a mean over 9 cases (the "common" policy leaves it out)
    assert suppression.suppress_group({**ROW, "n": 9, "n_missing": 1}, 10, False)["n"] == "< 10"
    assert suppression.suppress_group(ROW, 1, False)["mean"] == 0.91


def test_entries_of_a_tiny_test_set_and_the_scope_rule():
    entry = {**ROW, "rank": 1, "value": 0.91, "organs": {"liver": 0.91}, "rank_median": 1.0, "rank_ci_low": 1.0,
             "rank_ci_high": 2.0, "p_best": 0.7, "seconds_per_case": 3.0}
    out = suppression.suppress_entry(entry, 10)
    assert out["organs"] == {} and out["n"] == "< 10" and out["seconds_per_case"] == 3.0
    assert all(out[f] is None for f in suppression.ENTRY_STATISTICS + suppression.GROUP_STATISTICS)
    assert suppression.reveals("all") and not suppression.reveals("published")
    assert suppression.suppressed_count(5) == "< 5"


def _drawn(svg: str) -> str:
    """The SVG without its comments (matplotlib writes every string it draws into a comment)."""
    return re.sub(r"<!--.*?-->", "", svg, flags=re.S)


# as mathtext, the first renders as "St. x2 Hospital", the second is a parse error (was a 500)
@pytest.mark.parametrize("name", ["St. $x^2$ Hospital", "Bad $x^$ Clinic", "2 $ and 3 $", "100$"])
def test_names_with_dollars_are_drawn_literally(name):
    svg = plots.group_bars([name, "Other"], [0.8, 0.7], [0.7, 0.6], [0.9, 0.8], [12, 15], "dsc", f"{name}: mean")
    assert f"{name} (n=12)" in _drawn(svg) and f"{name}: mean" in _drawn(svg)
    heat = plots.significance_heatmap([name, "B"], [[None, 0.01], [0.9, None]], [[False, True], [False, False]],
                                      0.05, highlight=name)
    assert _drawn(heat).count(name) >= 2  # row and column label
    blobs = plots.rank_blob_plot([name, "B"], [[7, 3], [3, 7]], [1.0, 2.0], [1.0, 1.0], [2.0, 2.0], highlight=name)
    assert name in _drawn(blobs)
    boxes = plots.box_plots({"liver": [0.8, 0.9, 0.85]}, "dsc")
    assert "<svg" in boxes


def test_small_groups_take_their_smallest_neighbours_along():
    """Complementary suppression: the suppressed groups of a breakdown hold at least k cases."""
    assert suppression.groups_to_suppress({"a": 1, "b": 2, "c": 11, "d": 16}, 10) == {"a", "b", "c"}
    assert suppression.groups_to_suppress({"a": 4, "b": 7, "c": 30}, 10) == {"a", "b"}  # 11 >= 10 already
    assert suppression.groups_to_suppress({"M": 3, "F": 27}, 10) == {"M", "F"}  # two groups: both
    assert suppression.groups_to_suppress({"a": 12, "b": 30}, 10) == set()  # nothing small, nothing hidden
    assert suppression.groups_to_suppress({"a": 1, "b": 12, "c": 12}, 10) == {"a", "b"}  # ties: by name
    assert suppression.groups_to_suppress({"a": 1, "b": 2}, 10) == {"a", "b"}  # all of them, if need be
    rows = [{"submission_id": 1, "group": g, "n": n, "n_missing": 0, "mean": 0.5} for g, n in
            (("a", 1), ("b", 12), ("c", 15))] + [{"submission_id": 2, "group": "b", "n": 12, "n_missing": 0,
                                                   "mean": 0.5}]
    out = suppression.suppress_breakdown(rows, 10, False, key=lambda r: r["submission_id"])
    assert [(r["group"], r["n"], r["mean"]) for r in out] == [
        ("a", "< 10", None), ("b", "suppressed", None), ("c", 15, 0.5), ("b", 12, 0.5)]
    seen = suppression.suppress_breakdown(rows, 10, True, key=lambda r: r["submission_id"])
    assert [r["suppressed"] for r in seen] == [True, True, False, False] and seen[1]["n"] == 12


# --- across breakdowns (withheld_groups) -------------------------------------------------------

import numpy as np  # noqa: E402

from services.leaderboard.suppression import groups_to_suppress, withheld_groups  # noqa: E402


def _exposed(counted, groups, hidden, k):
    """Brute force, independent of the implementation: every cell (cases alike in every group)
    and every suppressed group of fewer than k counted cases whose indicator lies in the span of
    the visible groups' and the overall row's indicators (rank does not grow when it is added)."""
    visible = [np.ones(counted.sum())] + [m[counted].astype(float) for key, m in groups.items()
                                           if key not in hidden and m[counted].any()]
    span = np.array(visible)
    rank = np.linalg.matrix_rank(span)
    patterns = np.stack([m[counted] for m in groups.values()], axis=1)
    targets = [(patterns == p).all(axis=1) for p in np.unique(patterns, axis=0)]
    targets += [groups[key][counted] for key in hidden]
    return [t for t in targets if 0 < t.sum() < k
            and np.linalg.matrix_rank(np.vstack([span, t.astype(float)])) == rank]


def test_nested_breakdowns_do_not_give_a_case_back():
    # the review's attack: hospital A (11 cases) inside manufacturer GE (12): GE - A = the one
    # case of hospital B, though B is blanked and every visible group has >= k cases
    hospital = np.array(["A"] * 11 + ["B"] + ["C"] * 9 + ["D"] * 3)
    maker = np.array(["GE"] * 12 + ["SI"] * 12)
    groups = {("hospital", h): hospital == h for h in "ABCD"} | {("maker", m): maker == m for m in ("GE", "SI")}
    counted = np.ones(24, dtype=bool)
    per_breakdown = set()
    for variable in ("hospital", "maker"):
        per_breakdown |= groups_to_suppress({g: int(m.sum()) for g, m in groups.items() if g[0] == variable}, 10)
    assert _exposed(counted, groups, per_breakdown, 10), "the per-breakdown rule alone leaks (the review's case)"
    hidden = withheld_groups(counted, groups, 10)
    assert per_breakdown <= hidden
    assert not _exposed(counted, groups, hidden, 10)
    assert len(hidden) < len(groups), "something stays visible"


def test_crossed_large_groups_withhold_nothing():
    # two crossed variables whose every cell holds >= k cases: no combination isolates fewer than k
    a = np.repeat(["x", "y"], 40)
    b = np.tile(np.repeat(["p", "q"], 20), 2)
    groups = {("a", v): a == v for v in "xy"} | {("b", v): b == v for v in "pq"}
    assert withheld_groups(np.ones(80, dtype=bool), groups, 10) == set()


def test_counted_cases_decide():
    # the same metadata, but the overall statistic counts only some cases (missing under the
    # ``common`` policy): a group that is large on paper can hold fewer than k counted cases
    a = np.repeat(["x", "y"], 40)
    groups = {("a", "x"): a == "x", ("a", "y"): a == "y"}
    counted = np.ones(80, dtype=bool)
    counted[:35] = False  # x keeps 5 counted cases
    hidden = withheld_groups(counted, groups, 10)
    assert ("a", "x") in hidden and ("a", "y") in hidden  # y = overall - x would give x back


@pytest.mark.parametrize("seed", range(25))
def test_random_metadata_never_exposes_a_small_set(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(15, 120)), int(rng.integers(2, 12))
    columns = {name: rng.choice(levels, size=n, p=rng.dirichlet(np.ones(len(levels))))
               for name, levels in (("hospital", list("ABCDEF")), ("sex", ["F", "M"]),
                                    ("maker", ["GE", "SI", "PH"]))}
    groups = {(name, v): column == v for name, column in columns.items() for v in np.unique(column)}
    counted = rng.random(n) > rng.uniform(0, 0.3)
    hidden = withheld_groups(counted, groups, k)
    assert not _exposed(counted, groups, hidden, k)
    assert {key for key, m in groups.items() if 0 < (m & counted).sum() < k} <= hidden
