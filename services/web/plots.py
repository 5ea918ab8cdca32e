"""Figures of the leaderboard pages, rendered server-side by matplotlib (Agg, object API -- no
pyplot state, so concurrent requests do not share figures) as inline SVG with text kept as text.

* :func:`box_plots` -- per-case scores of one submission, one box per organ (Touchstone's boxes);
* :func:`significance_heatmap` -- Holm-adjusted one-sided p-values of "row better than column",
  significant cells marked (Touchstone's significance figure);
* :func:`rank_blob_plot` -- challengeR's blob plot: for each algorithm (x, ordered by the full-data
  rank) a circle at every rank it took in the bootstrap samples, area proportional to the share of
  samples, with the median rank (cross) and the 95 % interval (line);
* :func:`group_bars` -- mean per hospital (or subgroup) with its bootstrap interval.

Figures across all algorithms (the leaderboard page and the report, :mod:`services.web.figures`),
built as matplotlib :class:`~matplotlib.figure.Figure` objects so that one figure gives both its SVG
(:func:`svg`) and its PNG (:func:`png`):

* :func:`algorithm_boxes_figure` -- Touchstone's per-class figure (``plot/PerClassBoxplot.py``):
  horizontal boxes of the per-case scores, one per algorithm, best rank on top;
* :func:`significance_figure` -- Touchstone's significance map (``plot/SignificanceMaps.py``) of
  every ordered pair, with the Holm-adjusted p-values;
* :func:`rank_blob_figure` -- challengeR's blob plot of the bootstrap;
* :func:`value_heatmap_figure` -- algorithms x groups (hospitals) heatmap of the mean;
* :func:`group_boxes_figure` -- Touchstone's aggregated box plots (``plot/AggregatedBoxplot.py``):
  for every algorithm one box per group of a subgroup variable;
* :func:`ranking_heatmap_figure` -- challengeR's ranking heatmap: cases in which algorithm j took rank i;
* :func:`rank_lines_figure` -- challengeR's line plot of each algorithm's rank across ranking methods.

Names (hospitals, algorithms, teams) are data, never markup: every text drawn from them is set
with ``parse_math=False`` (:data:`PLAIN`), so "St. $x^2$ Hospital" shows literally instead of being
parsed as mathtext (which fails on an unbalanced ``$`` and would turn the page into a 500).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib import rc_context  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

#: text properties of every label that comes from data: no mathtext parsing of "$...$"
PLAIN = {"parse_math": False}
ACCENT = "#1f6feb"
HIGHLIGHT = "#d1242f"
RC = {"svg.fonttype": "none", "font.size": 9, "font.family": "DejaVu Sans", "svg.hashsalt": "touchstone",
      "axes.spines.top": False, "axes.spines.right": False}


def svg(fig: Figure, element_id: str) -> str:
    """The figure as an ``<svg>`` element (no XML prolog), ids prefixed to stay unique on a page."""
    return _svg(fig, element_id)


def png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (Agg, tight bounding box)."""
    buffer = io.BytesIO()
    with rc_context(RC):
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _svg(fig: Figure, element_id: str) -> str:
    buffer = io.StringIO()
    with rc_context(RC):
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    # matplotlib's ids (clip paths, glyphs) repeat across figures; prefix them per figure
    text = re.sub(r'id="([^"]+)"', lambda m: f'id="{element_id}-{m.group(1)}"', text)
    text = re.sub(r'url\(#([^)]+)\)', lambda m: f"url(#{element_id}-{m.group(1)})", text)
    text = re.sub(r'xlink:href="#([^"]+)"', lambda m: f'xlink:href="#{element_id}-{m.group(1)}"', text)
    return text.replace("<svg ", '<svg role="img" class="plot" ', 1)


def _figure(width: float, height: float) -> Figure:
    with rc_context(RC):
        return Figure(figsize=(width, height), dpi=96)


def box_plots(per_organ: dict[str, Sequence[float]], metric: str, element_id: str = "boxes") -> str:
    """One box per organ of the per-case scores (``NaN``/None left out)."""
    organs = [o for o, v in per_organ.items()]
    data = [np.array([x for x in per_organ[o] if x is not None and np.isfinite(x)], dtype=float) for o in organs]
    with rc_context(RC):
        fig = _figure(8.5, 3.2)
        ax = fig.subplots()
        if any(d.size for d in data):
            ax.boxplot([d if d.size else [np.nan] for d in data], showfliers=True, widths=0.6, patch_artist=True,
                       boxprops={"facecolor": "#dbe9ff", "edgecolor": ACCENT}, medianprops={"color": HIGHLIGHT},
                       flierprops={"marker": ".", "markersize": 3, "markeredgecolor": "#888"})
        ax.set_xticks(range(1, len(organs) + 1), [o.replace("_", " ") for o in organs], rotation=20, ha="right",
                      **PLAIN)
        ax.set_ylabel(metric.upper())
        ax.set_ylim(-0.02, 1.02)
        ax.grid(axis="y", color="#eee")
        ax.set_title(f"Per-case {metric.upper()} by organ", loc="left")
    return _svg(fig, element_id)


def significance_heatmap(labels: Sequence[str], p_adjusted: Sequence[Sequence[float | None]],
                         significant: Sequence[Sequence[bool]], alpha: float, highlight: str | None = None,
                         element_id: str = "heatmap") -> str:
    """K x K Holm-adjusted p-values; a cell is "row better than column"; significant cells bold."""
    return _svg(significance_figure(labels, p_adjusted, significant, alpha, highlight), element_id)


def _cell_inches(k: int) -> float:
    """Side of one heatmap cell: 0.42 in up to 20 rows, then shrinking to 0.17 in (100 rows: 17 in)."""
    return 0.42 if k <= 20 else max(0.17, 0.42 * 20 / k)


def significance_figure(labels: Sequence[str], p_adjusted: Sequence[Sequence[float | None]],
                        significant: Sequence[Sequence[bool | None]], alpha: float,
                        highlight: str | None = None, correction: str = "Holm") -> Figure:
    """K x K adjusted p-values of "row better than column" (the figure of :func:`significance_heatmap`)."""
    k = len(labels)
    p = np.array([[np.nan if v is None else v for v in row] for row in p_adjusted], dtype=float).reshape(k, k)
    cmap = LinearSegmentedColormap.from_list("sig", ["#f4c20d", "#fff4c2", "#f2f2f2", "#3b4a6b"])
    size = max(3.2, _cell_inches(k) * k + 1.8)
    small = max(5, min(9, int(200 / max(k, 1))))
    with rc_context(RC):
        fig = _figure(size + 0.8, size)
        ax = fig.subplots()
        shown = np.ma.masked_invalid(p)
        image = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, aspect="equal")
        ax.set_xticks(range(k), labels, rotation=45 if k <= 20 else 90, ha="right" if k <= 20 else "center",
                      fontsize=small, **PLAIN)
        ax.set_yticks(range(k), labels, fontsize=small, **PLAIN)
        ax.set_xlabel("is worse than … (column)")
        ax.set_ylabel("algorithm (row) is better than …")
        ax.spines[:].set_visible(False)
        ax.set_xticks(np.arange(-0.5, k), minor=True)
        ax.set_yticks(np.arange(-0.5, k), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        if k <= 14:
            for i in range(k):
                for j in range(k):
                    if i == j or not np.isfinite(p[i, j]):
                        continue
                    text = "<.001" if p[i, j] < 0.001 else f"{p[i, j]:.3f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="white" if p[i, j] > 0.75 else "black",
                            fontweight="bold" if significant[i][j] else "normal")
        elif k:
            # too many cells for numbers: mark the significant ones
            ys, xs = np.nonzero(np.array([[bool(v) for v in row] for row in significant], dtype=bool).reshape(k, k))
            ax.scatter(xs, ys, marker="s", s=max(1.0, 260 / k), facecolors="none", edgecolors="black",
                       linewidths=0.5)
        for tick in (*ax.get_xticklabels(), *ax.get_yticklabels()):
            if highlight is not None and tick.get_text() == highlight:
                tick.set_color(HIGHLIGHT)
                tick.set_fontweight("bold")
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label(f"{correction}-adjusted p (significant < {alpha:g})")
        ax.set_title("One-sided Wilcoxon signed-rank, row > column", loc="left")
    return fig


def rank_blob_plot(labels: Sequence[str], rank_counts: Sequence[Sequence[int]], median_rank: Sequence[float],
                   ci_low: Sequence[float], ci_high: Sequence[float], highlight: str | None = None,
                   element_id: str = "blobs") -> str:
    """challengeR's blob plot; ``labels`` in full-data rank order, ``rank_counts[i][r-1]`` =
    bootstrap samples in which algorithm i has rank r."""
    return _svg(rank_blob_figure(labels, rank_counts, median_rank, ci_low, ci_high, highlight), element_id)


def rank_blob_figure(labels: Sequence[str], rank_counts: Sequence[Sequence[int]], median_rank: Sequence[float],
                     ci_low: Sequence[float], ci_high: Sequence[float], highlight: str | None = None) -> Figure:
    """The figure of :func:`rank_blob_plot`."""
    k = len(labels)
    counts = np.array(rank_counts, dtype=float).reshape(k, k) if k else np.zeros((0, 0))
    with rc_context(RC):
        fig = _figure(max(3.5, min(0.55, 28 / max(k, 1)) * k + 1.5), max(2.8, min(0.35, 18 / max(k, 1)) * k + 1.4))
        ax = fig.subplots()
        if k:
            share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            xs, ys = np.nonzero(share)
            # marker area (pt^2) proportional to the share of bootstrap samples
            ax.scatter(xs + 1, ys + 1, s=share[xs, ys] * 420 * min(1.0, 20 / k), color=ACCENT, alpha=0.55,
                       linewidths=0)
            x = np.arange(1, k + 1)
            ax.vlines(x, ci_low, ci_high, color="black", linewidth=1)
            ax.scatter(x, median_rank, marker="x", color="black", s=30, zorder=3)
            ax.plot([0.5, k + 0.5], [0.5, k + 0.5], color="#bbb", linewidth=0.8, linestyle=":")
            ax.set_xticks(x, labels, rotation=45 if k <= 20 else 90, ha="right" if k <= 20 else "center",
                          fontsize=max(5, min(9, int(200 / k))), **PLAIN)
            ax.set_yticks(x if k <= 20 else np.arange(1, k + 1, 5))
            ax.set_xlim(0.4, k + 0.6)
            ax.set_ylim(k + 0.6, 0.4)
            for tick in ax.get_xticklabels():
                if highlight is not None and tick.get_text() == highlight:
                    tick.set_color(HIGHLIGHT)
                    tick.set_fontweight("bold")
        ax.set_ylabel("rank in bootstrap samples")
        ax.grid(color="#eee")
        ax.set_title("Rank stability (area ∝ share of samples; × median, | 95 %)", loc="left")
    return fig


def group_bars(groups: Sequence[str], means: Sequence[float | None], lows: Sequence[float | None],
               highs: Sequence[float | None], ns: Sequence[int], metric: str, title: str,
               element_id: str = "bars") -> str:
    """Horizontal bars of the mean per group with its percentile bootstrap interval and n."""
    m = np.array([np.nan if v is None else v for v in means], dtype=float)
    lo = np.array([np.nan if v is None else v for v in lows], dtype=float)
    hi = np.array([np.nan if v is None else v for v in highs], dtype=float)
    y = np.arange(len(groups))
    with rc_context(RC):
        fig = _figure(6.5, max(1.8, 0.32 * len(groups) + 1.0))
        ax = fig.subplots()
        ax.barh(y, np.nan_to_num(m), color="#dbe9ff", edgecolor=ACCENT)
        err = np.vstack([np.nan_to_num(m - lo), np.nan_to_num(hi - m)])
        ax.errorbar(np.nan_to_num(m), y, xerr=np.clip(err, 0, None), fmt="none", ecolor="black", capsize=2,
                    linewidth=0.8)
        ax.set_yticks(y, [f"{g} (n={n})" for g, n in zip(groups, ns)], **PLAIN)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.0)
        ax.set_xlabel(f"mean {metric.upper()} (95 % bootstrap interval)")
        ax.grid(axis="x", color="#eee")
        ax.set_title(title, loc="left", **PLAIN)
    return _svg(fig, element_id)


# --------------------------------------------------------------------------------------------
# figures across all algorithms (services.web.figures)
# --------------------------------------------------------------------------------------------

#: colours of the groups of a subgroup variable (matplotlib's tab10)
GROUP_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf")
#: horizontal boxes (``vert`` is deprecated from matplotlib 3.10, which has ``orientation``)
HORIZONTAL = ({"orientation": "horizontal"} if tuple(int(x) for x in matplotlib.__version__.split(".")[:2]) >= (3, 10)
              else {"vert": False})


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)


def _row_font(k: int) -> int:
    return max(5, min(9, int(260 / max(k, 1))))


def algorithm_boxes_figure(labels: Sequence[str], values: Sequence[Sequence[float] | None], metric: str, title: str,
                           show_fliers: bool, notes: Sequence[str] | None = None) -> Figure:
    """Touchstone's per-class box plot: one horizontal box per algorithm (``labels`` in rank order,
    rank 1 on top) of its per-case scores -- median, quartiles, whiskers at 1.5 IQR, outliers only
    when ``show_fliers``. ``values[i] is None``: the algorithm's box is withheld (small cell);
    ``notes[i]`` is written beside its label instead."""
    k = len(labels)
    row = 0.3 if k <= 30 else max(0.12, 9.0 / k)
    with rc_context(RC):
        fig = _figure(6.8, max(2.0, row * k + 1.1))
        ax = fig.subplots()
        data = [_finite(v) if v is not None else np.array([]) for v in values]
        shown = [i for i, d in enumerate(data) if d.size]
        if shown:
            ax.boxplot([data[i] for i in shown], positions=[i + 1 for i in shown], widths=0.6, **HORIZONTAL,
                       showfliers=show_fliers, patch_artist=True, manage_ticks=False,
                       boxprops={"facecolor": "#dbe9ff", "edgecolor": ACCENT, "linewidth": 0.7},
                       medianprops={"color": HIGHLIGHT}, whiskerprops={"linewidth": 0.7},
                       capprops={"linewidth": 0.7},
                       flierprops={"marker": ".", "markersize": 2, "markeredgecolor": "#888"})
        names = [f"{label} ({notes[i]})" if notes and notes[i] else label for i, label in enumerate(labels)]
        ax.set_yticks(range(1, k + 1), names, fontsize=_row_font(k), **PLAIN)
        ax.set_ylim(k + 0.6, 0.4)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel(metric.upper())
        ax.grid(axis="x", color="#eee")
        ax.set_title(title, loc="left", **PLAIN)
    return fig


def group_boxes_figure(labels: Sequence[str], groups: Sequence[str],
                       values: Sequence[Sequence[Sequence[float] | None]], metric: str, title: str,
                       show_fliers: bool) -> Figure:
    """Touchstone's aggregated box plot: for every algorithm (rows, rank order) one horizontal box
    per group (colour, legend) of its per-case scores. ``values[i][g] is None``: withheld (small
    cell; the legend says so)."""
    k, n_groups = len(labels), max(len(groups), 1)
    band = max(0.16 * n_groups + 0.12, 0.3) if k <= 30 else max(0.08 * n_groups, 0.2)
    width = 0.8 / n_groups
    with rc_context(RC):
        fig = _figure(7.2, max(2.4, band * k + 1.4))
        ax = fig.subplots()
        for g, group in enumerate(groups):
            color = GROUP_COLORS[g % len(GROUP_COLORS)]
            positions, data = [], []
            for i in range(k):
                cell = values[i][g]
                d = _finite(cell) if cell is not None else np.array([])
                if d.size:
                    positions.append(i + 1 - 0.4 + width * (g + 0.5))
                    data.append(d)
            if data:
                ax.boxplot(data, positions=positions, widths=width * 0.85, **HORIZONTAL, showfliers=show_fliers,
                           patch_artist=True, manage_ticks=False,
                           boxprops={"facecolor": color, "edgecolor": "#333", "linewidth": 0.5, "alpha": 0.75},
                           medianprops={"color": "black", "linewidth": 0.8}, whiskerprops={"linewidth": 0.5},
                           capprops={"linewidth": 0.5},
                           flierprops={"marker": ".", "markersize": 2, "markeredgecolor": color})
            ax.plot([], [], color=color, linewidth=6, label=group if data else f"{group} (withheld)")
        ax.set_yticks(range(1, k + 1), labels, fontsize=_row_font(k), **PLAIN)
        ax.set_ylim(k + 0.6, 0.4)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel(metric.upper())
        ax.grid(axis="x", color="#eee")
        if groups:
            legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
            for text in legend.get_texts():
                text.set_parse_math(False)
        ax.set_title(title, loc="left", **PLAIN)
    return fig


def value_heatmap_figure(rows: Sequence[str], columns: Sequence[str], values: Sequence[Sequence[float | None]],
                         withheld: Sequence[Sequence[bool]], metric: str, title: str) -> Figure:
    """Rows (algorithms, rank order) x columns (hospitals) heatmap of the mean; a withheld cell
    (small cell) is hatched grey and has no number, a cell without data is white."""
    k, m = len(rows), len(columns)
    v = np.array([[np.nan if x is None else x for x in r] for r in values], dtype=float).reshape(k, m)
    cell = _cell_inches(max(k, m))
    with rc_context(RC):
        fig = _figure(max(3.6, 0.9 * m + 2.6), max(2.4, cell * k + 1.6))
        ax = fig.subplots()
        image = ax.imshow(np.ma.masked_invalid(v), cmap="viridis", vmin=np.nanmin(v) if np.isfinite(v).any() else 0,
                          vmax=np.nanmax(v) if np.isfinite(v).any() else 1, aspect="auto")
        for i in range(k):
            for j in range(m):
                if withheld[i][j]:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#e6e6e6",
                                                              edgecolor="#999", hatch="///", linewidth=0))
                elif k <= 30 and np.isfinite(v[i, j]):
                    ax.text(j, i, f"{v[i, j]:.3f}", ha="center", va="center", fontsize=7,
                            color="white" if v[i, j] < np.nanmean(v) else "black")
        ax.set_xticks(range(m), columns, rotation=30, ha="right", **PLAIN)
        ax.set_yticks(range(k), rows, fontsize=_row_font(k), **PLAIN)
        ax.spines[:].set_visible(False)
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label(f"mean {metric.upper()}")
        ax.set_title(title, loc="left", **PLAIN)
    return fig


def ranking_heatmap_figure(labels: Sequence[str], counts: Sequence[Sequence[int]]) -> Figure:
    """challengeR's ranking heatmap: cell (rank i, algorithm j) = cases in which algorithm j took
    rank i (``counts[i][j]``); algorithms (columns) in rank order."""
    k = len(labels)
    c = np.array(counts, dtype=float).reshape(k, k) if k else np.zeros((0, 0))
    size = max(3.2, _cell_inches(k) * k + 1.8)
    with rc_context(RC):
        fig = _figure(size + 0.8, size)
        ax = fig.subplots()
        image = ax.imshow(np.ma.masked_equal(c, 0), cmap="Blues", aspect="equal", vmin=0)
        if k <= 14:
            for i in range(k):
                for j in range(k):
                    if c[i, j]:
                        ax.text(j, i, f"{int(c[i, j])}", ha="center", va="center", fontsize=7,
                                color="white" if c[i, j] > 0.6 * c.max() else "black")
        ax.set_xticks(range(k), labels, rotation=45 if k <= 20 else 90, ha="right" if k <= 20 else "center",
                      fontsize=_row_font(k), **PLAIN)
        ax.set_yticks(range(k) if k <= 20 else range(0, k, 5), [str(r + 1) for r in (range(k) if k <= 20 else range(0, k, 5))])
        ax.set_ylabel("rank (per case)")
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label("cases")
        ax.set_title("Ranking heatmap: cases per rank", loc="left")
    return fig


def rank_lines_figure(labels: Sequence[str], methods: Sequence[str], ranks: Sequence[Sequence[int | None]]) -> Figure:
    """challengeR's ranking-robustness line plot: one line per algorithm through its rank under
    each ranking method (x); a horizontal line = the same rank under every method."""
    k = len(labels)
    with rc_context(RC):
        fig = _figure(max(4.5, 1.3 * len(methods) + 3.0), max(2.8, min(0.3, 18 / max(k, 1)) * k + 1.4))
        ax = fig.subplots()
        x = np.arange(len(methods))
        for i, label in enumerate(labels):
            y = np.array([np.nan if r is None else r for r in ranks[i]], dtype=float)
            color = GROUP_COLORS[i % len(GROUP_COLORS)]
            ax.plot(x, y, marker="o", markersize=3, linewidth=1, color=color, alpha=0.85)
            if k <= 30 and np.isfinite(y[-1]):
                ax.text(x[-1] + 0.08, y[-1], label, va="center", fontsize=7, color=color, **PLAIN)
        ax.set_xticks(x, methods)
        ax.set_xlim(-0.2, len(methods) - 0.3 + (1.2 if k <= 30 else 0))
        ax.set_ylim(k + 0.6, 0.4)
        ax.set_ylabel("rank")
        ax.grid(color="#eee")
        ax.set_title("Rank under each ranking method", loc="left")
    return fig
