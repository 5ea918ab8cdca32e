"""The figures of a leaderboard across all its algorithms -- what the leaderboard page shows per
organ (or the average) and metric, what the figure routes download and what the report embeds.

============== ======================================================================================
kind           what it shows (source of the numbers)
============== ======================================================================================
boxes          Touchstone's per-class box plot: the per-case scores of every algorithm, rank order
               (the score matrices the statistics were computed from: ``compute.build_matrices``)
significance   Touchstone's significance map: Holm-adjusted p of every ordered pair
               (:func:`services.leaderboard.queries.significance`)
blobs          challengeR's blob plot of the bootstrap ranks (:func:`~services.leaderboard.queries.stability`)
hospitals      algorithms x hospitals heatmap of the mean (:func:`~services.leaderboard.queries.breakdown`)
subgroups      Touchstone's aggregated box plot: per algorithm one box per value of a subgroup variable
               (the score matrices, grouped by ``evaluation.stats.subgroups.group_labels`` as the
               stored per-group aggregates are)
ranking-heatmap challengeR's ranking heatmap: cases in which each algorithm took each per-case rank
               (``evaluation.stats.ranking.case_ranks`` of the matrix the rankings compared)
robustness     challengeR's line plot of each algorithm's rank under the four ranking methods
               (:func:`~services.leaderboard.queries.leaderboard` of each method)
============== ======================================================================================

Small-cell suppression (:mod:`services.leaderboard.suppression`) for everyone but organizers
(``scope=all``): no box of an algorithm or a group with fewer than the test set's
``min_group_size`` hidden cases (nor of a group withheld as the complement of small groups), no
cell of a suppressed hospital, no blob, p or rank when the test set itself has fewer hidden cases;
outside ``scope=all`` no box shows outliers (single hidden cases' scores).

Cache: a figure is a pure function of the stored statistics of (test set, protocol, scope) -- the
version :func:`services.leaderboard.queries._stats_version` changes with every recomputation -- of
the submissions in scope and of the small-cell threshold; :data:`FIGURE_CACHE` (in process, LRU)
keys on all of them, so a page of 100 algorithms renders its figures once per statistics run;
:data:`MATRIX_CACHE` keeps the score matrices of the last few runs.
No table is needed: the cache lives in the process, and a new process renders again on first use.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sqlalchemy.orm import Session

from evaluation.stats.ranking import case_ranks
from evaluation.stats.subgroups import UNKNOWN_GROUP, group_labels
from services.db.models import TestSet
from services.leaderboard import compute, queries, suppression
from services.lru import LruCache
from services.web import plots

#: every figure kind, in the order the page and the report show them
FIGURE_KINDS: tuple[str, ...] = ("boxes", "significance", "blobs", "hospitals", "subgroups", "ranking-heatmap",
                                 "robustness")
#: the figures of the leaderboard page (the report adds the rest)
PAGE_KINDS: tuple[str, ...] = ("boxes", "significance", "blobs", "hospitals", "subgroups")
FORMATS = ("svg", "png")
TITLES = {
    "boxes": "Per-case scores of every algorithm",
    "significance": "Significance map of every ordered pair",
    "blobs": "Rank stability over bootstrap samples",
    "hospitals": "Mean per hospital",
    "subgroups": "Per-case scores per subgroup",
    "ranking-heatmap": "Ranking heatmap",
    "robustness": "Ranking robustness across ranking methods",
}


class FigureError(ValueError):
    """A bad figure request (unknown kind, format or variable); the message lists the valid values."""


@dataclass
class RenderedFigure:
    """One figure: its SVG (rendered once), its PNG (rendered on first request), caption and text
    alternative. ``figure`` is None when nothing may be drawn (``empty`` says why)."""

    kind: str
    caption: str
    alt: str
    figure: Figure | None
    empty: str | None = None
    _svgs: dict[str, str] = field(default_factory=dict, repr=False)
    _png: bytes | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def svg(self, element_id: str | None = None) -> str:
        """The ``<svg>`` element, its ids prefixed by ``element_id`` (default: the kind), so that
        several figures can share one HTML document; rendered once per prefix."""
        if self.figure is None:
            return ""
        element_id = element_id or self.kind
        with self._lock:
            if element_id not in self._svgs:
                self._svgs[element_id] = plots.svg(self.figure, element_id)
            return self._svgs[element_id]

    def png(self) -> bytes:
        if self.figure is None:
            return b""
        with self._lock:
            if self._png is None:
                self._png = plots.png(self.figure)
            return self._png


# in-process LRUs of rendered figures and of the score matrices behind them (see the module
# docstring for the key); no time-to-live: a figure's key names every input
FIGURE_CACHE = LruCache(max_entries=256)
#: the score matrices behind the box plots (Touchstone scale: ~200 MB per scope), few kept
MATRIX_CACHE = LruCache(max_entries=4)


def subgroup_variables(testset: TestSet) -> tuple[str, ...]:
    """The subgroup variables of the test set (its breakdowns without ``hospital``)."""
    return tuple(v for v in compute.breakdown_variables(testset) if v != "hospital")


def check(kind: str, fmt: str = "svg", testset: TestSet | None = None, variable: str | None = None) -> None:
    if kind not in FIGURE_KINDS:
        raise FigureError(f"unknown figure {kind!r}; choose one of {', '.join(FIGURE_KINDS)}")
    if fmt not in FORMATS:
        raise FigureError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if testset is not None and variable is not None and variable not in subgroup_variables(testset):
        raise FigureError(f"unknown variable {variable!r}; choose one of {', '.join(subgroup_variables(testset))}")


def _key(session: Session, testset: TestSet, scope: str, *parts: Any) -> tuple:
    visible = tuple(sorted(queries._in_scope(session, testset, scope)))
    return (str(session.get_bind().url), testset.id, testset.name, testset.protocol_key, scope,
            queries.min_group_size(testset), queries._stats_version(session, testset, scope), visible, *parts)


def figure(session: Session, testset: TestSet, kind: str, *, organ: str = "average", metric: str = "dsc",
           scope: str = "published", method: str = "mean", variable: str | None = None) -> RenderedFigure:
    """The figure ``kind`` of (organ, metric) in ``scope`` (cached per statistics run). Raises
    :class:`FigureError` / :class:`~services.leaderboard.queries.LeaderboardQueryError` for bad
    parameters."""
    check(kind)
    queries.check_params(organ=organ, metric=metric, method=method, scope=scope, testset=testset)
    if kind == "subgroups":
        variable = variable or default_variable(testset)
        check(kind, testset=testset, variable=variable)
    else:
        variable = None
    if kind not in ("boxes", "subgroups", "robustness"):
        method = "mean"  # these figures do not depend on the ranking method
    key = _key(session, testset, scope, "figure", kind, organ, metric, method, variable)
    hit = FIGURE_CACHE.get(key)
    if hit is None:
        hit = _BUILDERS[kind](session, testset, organ=organ, metric=metric, scope=scope, method=method,
                              variable=variable)
        FIGURE_CACHE.put(key, hit)
    return hit


def default_variable(testset: TestSet) -> str | None:
    variables = subgroup_variables(testset)
    return variables[0] if variables else None


# --------------------------------------------------------------------------------------------
# shared text
# --------------------------------------------------------------------------------------------


def _how(board: dict[str, Any]) -> str:
    """Protocol, statistical options and missing-case policy of a table (as under the tables)."""
    statistics = board.get("statistics") or f"missing cases: {board.get('missing_policy')}"
    return f"Protocol {board['protocol_key']}; {statistics}."


def _suppression_note(k: int, scope: str) -> str:
    if suppression.reveals(scope):
        return " Organizers' view (scope=all): every number, no small-cell suppression."
    return (f" Small-cell rule: nothing of a group with fewer than {k} hidden cases is drawn; "
            "public-sample cases are not part of the benchmark.")


def _what(organ: str, metric: str) -> str:
    return f"{organ.replace('_', ' ')} · {metric.upper()}"


def _ordered_board(session: Session, testset: TestSet, organ: str, metric: str, method: str,
                   scope: str) -> dict[str, Any]:
    return queries.leaderboard(session, testset, organ=organ, metric=metric, method=method, scope=scope)


# --------------------------------------------------------------------------------------------
# the score matrices behind the box plots and the ranking heatmap
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Matrices:
    matrices: dict
    cases: Any
    options: compute.StatsOptions


def _matrices(session: Session, testset: TestSet, scope: str) -> _Matrices:
    """The (organ, metric) score matrices of the submissions in ``scope`` exactly as the stored
    statistics were computed (``compute.store_comparative``: hidden cases, the test set's options,
    its missing-case policy and organ average), cached per statistics run."""
    key = _key(session, testset, scope, "matrices")
    hit = MATRIX_CACHE.get(key)
    if hit is None:
        options = compute.options_for_testset(testset)
        variables = compute.breakdown_variables(testset)
        cases = compute.load_cases(session, testset.id, compute._extra_columns(variables))
        expected = compute.load_expected(session, testset)
        ids = compute.scope_submission_ids(session, testset.id, scope)
        scores = compute.load_scores(session, ids, testset.protocol_key, options.metrics)
        present = set(scores["algorithm"])
        algorithms = [str(i) for i in ids if str(i) in present]
        matrices, _ = compute.build_matrices(scores, cases, algorithms, options, expected)
        hit = _Matrices(matrices, cases.assign(case_id=cases["case_id"].astype(str)), options)
        MATRIX_CACHE.put(key, hit)
    return hit


def _rows(m: _Matrices, organ: str, metric: str, submission_ids: list[int]) -> dict[int, np.ndarray]:
    """submission id -> its scored values (NaN dropped) of the (organ, metric) matrix."""
    matrix = m.matrices.get((organ, metric))
    if matrix is None:
        return {}
    index = {a: i for i, a in enumerate(matrix.algorithms)}
    out = {}
    for sid in submission_ids:
        if str(sid) in index:
            row = matrix.values[index[str(sid)]]
            out[sid] = row[np.isfinite(row)]
    return out


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------


def _empty(kind: str, caption: str, why: str) -> RenderedFigure:
    return RenderedFigure(kind=kind, caption=caption, alt=why, figure=None, empty=why)


def _boxes(session, testset, *, organ, metric, scope, method, variable) -> RenderedFigure:
    board = _ordered_board(session, testset, organ, metric, method, scope)
    k, reveal = queries.min_group_size(testset), suppression.reveals(scope)
    entries = board["entries"]
    caption = (f"{_what(organ, metric)}: per-case {metric.upper()} of every algorithm on the hidden cases, one box "
               f"per algorithm in the order of the {method} ranking (rank 1 on top): median (red), quartiles, "
               f"whiskers at 1.5 IQR{', outliers as dots' if reveal else '; outliers not drawn (single hidden cases)'}. "
               "The values are those the statistics were computed from (under the worst policy a missing case "
               "counts with the protocol's worst value). " + _how(board) + _suppression_note(k, scope))
    if not entries:
        return _empty("boxes", caption, "No result in this scope yet.")
    rows = _rows(_matrices(session, testset, scope), organ, metric, [e["submission_id"] for e in entries])
    values, notes = [], []
    for e in entries:
        v = rows.get(e["submission_id"], np.array([]))
        if not reveal and suppression.is_small(len(v), k):
            values.append(None)
            notes.append(f"n {suppression.suppressed_count(k)}")
        else:
            values.append(v)
            notes.append("" if len(v) else "no scores")
    labels = [e["label"] for e in entries]
    drawn = [(lab, float(np.median(v))) for lab, v in zip(labels, values) if v is not None and len(v)]
    if not drawn:
        return _empty("boxes", caption, f"No box: every algorithm has fewer than {k} hidden cases (small-cell rule).")
    best = max(drawn, key=lambda x: x[1])
    worst = min(drawn, key=lambda x: x[1])
    alt = (f"Horizontal box plots of per-case {metric.upper()} ({organ.replace('_', ' ')}) for {len(entries)} "
           f"algorithms in rank order; {len(drawn)} drawn; highest median {best[0]} ({best[1]:.3f}), lowest median "
           f"{worst[0]} ({worst[1]:.3f}).")
    fig = plots.algorithm_boxes_figure(labels, values, metric, f"{_what(organ, metric)}: per-case scores",
                                       show_fliers=reveal, notes=notes)
    return RenderedFigure("boxes", caption, alt, fig)


def _significance(session, testset, *, organ, metric, scope, method, variable) -> RenderedFigure:
    sig = queries.significance(session, testset, organ=organ, metric=metric, scope=scope)
    labels = [s["label"] for s in sig["submissions"]]
    alpha = sig["alpha"] if sig["alpha"] is not None else 0.05
    correction = (sig["correction"] or "holm").capitalize()
    caption = (f"{_what(organ, metric)}: one-sided paired Wilcoxon signed-rank test of every ordered pair, cell = "
               f"{correction}-adjusted p that the row algorithm is better than the column algorithm; significant "
               f"(p < {alpha:g}) cells bold (or framed when there are too many for numbers). Algorithms in the "
               f"order of the mean ranking. Test: {sig['method'] or '–'}. "
               + _how(sig) + _suppression_note(sig["min_group_size"], scope))
    if len(labels) < 2:
        return _empty("significance", caption, "Fewer than two algorithms: no pair to test.")
    if sig["suppressed"] and not suppression.reveals(scope):
        return _empty("significance", caption,
                      f"Not shown: the test set has fewer than {sig['min_group_size']} hidden cases (small-cell rule).")
    wins = [sum(1 for v in row if v) for row in sig["significant"]]
    top = max(range(len(labels)), key=lambda i: wins[i])
    alt = (f"{len(labels)} x {len(labels)} significance map ({organ.replace('_', ' ')}, {metric.upper()}); "
           f"{sum(wins)} significant ordered pairs; most significant wins: {labels[top]} ({wins[top]} of "
           f"{len(labels) - 1}).")
    fig = plots.significance_figure(labels, sig["p_adjusted"], sig["significant"], alpha, correction=correction)
    return RenderedFigure("significance", caption, alt, fig)


def _blobs(session, testset, *, organ, metric, scope, method, variable) -> RenderedFigure:
    stab = queries.stability(session, testset, organ=organ, metric=metric, method="mean", scope=scope)
    caption = (f"{_what(organ, metric)}: challengeR's blob plot. For each algorithm (x, in the order of the mean "
               f"ranking on all cases) a circle at every rank it took over {stab['n_resamples'] or '–'} bootstrap "
               "samples of the hidden cases, area proportional to the share of samples; cross: median rank; line: "
               "95 % interval." + (f" Kendall's τ of the bootstrap rankings to the full one: median "
                                   f"{stab['kendall_tau'].get('tau_median'):.3f}." if stab.get("kendall_tau")
                                   and stab["kendall_tau"].get("tau_median") is not None else "")
               + " " + _how(_ordered_board(session, testset, organ, metric, "mean", scope))
               + _suppression_note(stab["min_group_size"], scope))
    entries = stab["entries"]
    if not entries:
        return _empty("blobs", caption, "No result in this scope yet.")
    if stab["suppressed"] and not suppression.reveals(scope):
        return _empty("blobs", caption,
                      f"Not shown: the test set has fewer than {stab['min_group_size']} hidden cases (small-cell rule).")
    alt = (f"Blob plot of bootstrap ranks for {len(entries)} algorithms; " + "; ".join(
        f"{e['label']}: median rank {e['median_rank']:g} [{e['rank_ci_low']:g}, {e['rank_ci_high']:g}]"
        for e in entries[:10]) + ("; …" if len(entries) > 10 else "") + ".")
    fig = plots.rank_blob_figure([e["label"] for e in entries], [e["rank_counts"] for e in entries],
                                 [e["median_rank"] for e in entries], [e["rank_ci_low"] for e in entries],
                                 [e["rank_ci_high"] for e in entries])
    return RenderedFigure("blobs", caption, alt, fig)


def _hospitals(session, testset, *, organ, metric, scope, method, variable) -> RenderedFigure:
    board = _ordered_board(session, testset, organ, metric, "mean", scope)
    rows = queries.breakdown(session, testset, variable="hospital", organ=organ, metric=metric, scope=scope)["rows"]
    k = queries.min_group_size(testset)
    caption = (f"{_what(organ, metric)}: mean {metric.upper()} of every algorithm (rows, mean ranking order) on "
               "the hidden cases of each hospital (columns), as in the per-hospital table; hatched: withheld "
               "(small cell or its complement). " + _how(board) + _suppression_note(k, scope))
    hospitals = sorted({r["group"] for r in rows})
    order = [e["submission_id"] for e in board["entries"]]
    if not rows or not order:
        return _empty("hospitals", caption, "No per-hospital result in this scope yet.")
    cell = {(r["submission_id"], r["group"]): r for r in rows}
    values = [[(cell.get((sid, h)) or {}).get("mean") for h in hospitals] for sid in order]
    withheld = [[bool((cell.get((sid, h)) or {}).get("suppressed")) and (cell.get((sid, h)) or {}).get("mean") is None
                 for h in hospitals] for sid in order]
    labels = [e["label"] for e in board["entries"]]
    n_withheld = sum(map(sum, withheld))
    alt = (f"Heatmap of mean {metric.upper()} for {len(labels)} algorithms x {len(hospitals)} hospitals "
           f"({', '.join(hospitals[:12])}{', …' if len(hospitals) > 12 else ''}); {n_withheld} cells withheld.")
    fig = plots.value_heatmap_figure(labels, hospitals, values, withheld, metric,
                                     f"{_what(organ, metric)}: mean per hospital")
    return RenderedFigure("hospitals", caption, alt, fig)


def _subgroups(session, testset, *, organ, metric, scope, method, variable) -> RenderedFigure:
    board = _ordered_board(session, testset, organ, metric, method, scope)
    k, reveal = queries.min_group_size(testset), suppression.reveals(scope)
    name = (variable or "–").replace("_", " ")
    caption = (f"{_what(organ, metric)}: per-case {metric.upper()} of every algorithm (rows, {method} ranking order) "
               f"split by {name}: one box per group (colour), median, quartiles, whiskers at 1.5 IQR"
               f"{', outliers as dots' if reveal else '; outliers not drawn'}. Groups as in the per-group tables "
               f"(cases without a value: '{UNKNOWN_GROUP}'). " + _how(board) + _suppression_note(k, scope)
               + ("" if reveal else " A group withheld as the complement of small groups is not drawn either."))
    entries = board["entries"]
    if variable is None or not entries:
        return _empty("subgroups", caption, "No subgroup variable or no result in this scope yet.")
    m = _matrices(session, testset, scope)
    matrix = m.matrices.get((organ, metric))
    if matrix is None:
        return _empty("subgroups", caption, "No scores for this organ.")
    try:
        labels_of_case = group_labels(m.cases, variable, matrix.case_ids)
    except ValueError:
        return _empty("subgroups", caption, f"No case has a value of {name}.")
    groups = sorted(set(labels_of_case) - {UNKNOWN_GROUP}) + ([UNKNOWN_GROUP] if UNKNOWN_GROUP in labels_of_case else [])
    index = {a: i for i, a in enumerate(matrix.algorithms)}
    values, n_withheld = [], 0
    for e in entries:
        i = index.get(str(e["submission_id"]))
        row = matrix.values[i] if i is not None else np.full(matrix.n_cases, np.nan)
        per_group = {g: row[(labels_of_case == g) & np.isfinite(row)] for g in groups}
        hide = set() if reveal else suppression.groups_to_suppress({g: len(v) for g, v in per_group.items()}, k)
        if not reveal and suppression.is_small(int(np.isfinite(row).sum()), k):
            hide = set(groups)
        n_withheld += len(hide)
        values.append([None if g in hide else per_group[g] for g in groups])
    fig = plots.group_boxes_figure([e["label"] for e in entries], groups, values, metric,
                                   f"{_what(organ, metric)}: per-case scores by {name}", show_fliers=reveal)
    alt = (f"Box plots of per-case {metric.upper()} for {len(entries)} algorithms, one box per {name} group "
           f"({', '.join(groups[:12])}); {n_withheld} algorithm-group boxes withheld (small-cell rule).")
    return RenderedFigure("subgroups", caption, alt, fig)


def _ranking_heatmap(session, testset, *, organ, metric, scope, method, variable) -> RenderedFigure:
    board = _ordered_board(session, testset, organ, metric, "mean", scope)
    caption = (f"{_what(organ, metric)}: challengeR's ranking heatmap. Cell (rank i, algorithm j) = hidden cases "
               "in which algorithm j took rank i among all algorithms (per-case ranks as the rank-then-aggregate "
               "ranking computes them: ties share the best rank, a case without a score takes the last rank), on "
               "the cases the rankings compared; algorithms in mean ranking order. " + _how(board)
               + _suppression_note(queries.min_group_size(testset), scope))
    entries = board["entries"]
    if not entries:
        return _empty("ranking-heatmap", caption, "No result in this scope yet.")
    if board["suppressed"] and not suppression.reveals(scope):
        return _empty("ranking-heatmap", caption, f"Not shown: the test set has fewer than {board['min_group_size']} "
                      "hidden cases (small-cell rule).")
    m = _matrices(session, testset, scope)
    matrix = m.matrices.get((organ, metric))
    if matrix is None:
        return _empty("ranking-heatmap", caption, "No scores for this organ.")
    ranked = compute.ranking_matrix(matrix.select([str(e["submission_id"]) for e in entries]), m.options)
    ranks = case_ranks(ranked).astype(int) if ranked.n_cases else np.zeros((len(entries), 0), dtype=int)
    k = len(entries)
    counts = [[int((ranks[j] == i + 1).sum()) for j in range(k)] for i in range(k)]
    labels = [e["label"] for e in entries]
    alt = (f"Ranking heatmap of {k} algorithms over {ranked.n_cases} cases; cases ranked first: "
           + ", ".join(f"{labels[j]} {counts[0][j]}" for j in range(min(k, 10))) + ".")
    return RenderedFigure("ranking-heatmap", caption, alt, plots.ranking_heatmap_figure(labels, counts))


def method_ranks(session: Session, testset: TestSet, *, organ: str, metric: str, scope: str
                 ) -> tuple[list[dict[str, Any]], dict[str, dict[int, int | None]], dict[str, dict[str, Any]]]:
    """(entries of the mean ranking, method -> submission id -> rank, method -> its table): the
    four rankings as the API returns them."""
    tables = {m: queries.leaderboard(session, testset, organ=organ, metric=metric, method=m, scope=scope)
              for m in compute.RANKING_METHODS}
    ranks = {m: {e["submission_id"]: e["rank"] for e in t["entries"]} for m, t in tables.items()}
    return tables["mean"]["entries"], ranks, tables


def _robustness(session, testset, *, organ, metric, scope, method, variable) -> RenderedFigure:
    entries, ranks, tables = method_ranks(session, testset, organ=organ, metric=metric, scope=scope)
    board = tables["mean"]
    caption = (f"{_what(organ, metric)}: challengeR's ranking-robustness line plot. One line per algorithm through "
               "its rank under each ranking method (mean, median: aggregate then rank; rank-mean: rank then "
               "aggregate; test: significant wins); a horizontal line = the same rank under every method. "
               + _how(board) + _suppression_note(queries.min_group_size(testset), scope))
    if not entries:
        return _empty("robustness", caption, "No result in this scope yet.")
    if board["suppressed"] and not suppression.reveals(scope):
        return _empty("robustness", caption, f"Not shown: the test set has fewer than {board['min_group_size']} "
                      "hidden cases (small-cell rule).")
    methods = list(compute.RANKING_METHODS)
    matrix = [[ranks[m].get(e["submission_id"]) for m in methods] for e in entries]
    stable = sum(1 for row in matrix if len(set(row)) == 1)
    alt = (f"Line plot of the ranks of {len(entries)} algorithms under {', '.join(methods)}; {stable} keep the "
           "same rank under every method.")
    return RenderedFigure("robustness", caption, alt,
                          plots.rank_lines_figure([e["label"] for e in entries], methods, matrix))


_BUILDERS = {
    "boxes": _boxes, "significance": _significance, "blobs": _blobs, "hospitals": _hospitals,
    "subgroups": _subgroups, "ranking-heatmap": _ranking_heatmap, "robustness": _robustness,
}
