"""Figures of the leaderboard pages, rendered server-side by matplotlib (Agg, object API -- no
pyplot state, so concurrent requests do not share figures) as inline SVG with text kept as text.

* :func:`box_plots` -- per-case scores of one submission, one box per organ (Touchstone's boxes);
* :func:`significance_heatmap` -- Holm-adjusted one-sided p-values of "row better than column",
  significant cells marked (Touchstone's significance figure);
* :func:`rank_blob_plot` -- challengeR's blob plot: for each algorithm (x, ordered by the full-data
  rank) a circle at every rank it took in the bootstrap samples, area proportional to the share of
  samples, with the median rank (cross) and the 95 % interval (line);
* :func:`group_bars` -- mean per hospital (or subgroup) with its bootstrap interval.

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

#: text properties of every label that comes from data: no mathtext parsing of "$...$"
PLAIN = {"parse_math": False}
ACCENT = "#1f6feb"
HIGHLIGHT = "#d1242f"
RC = {"svg.fonttype": "none", "font.size": 9, "font.family": "DejaVu Sans", "svg.hashsalt": "touchstone",
      "axes.spines.top": False, "axes.spines.right": False}


def _svg(fig: Figure, element_id: str) -> str:
    """The figure as an ``<svg>`` element (no XML prolog), ids prefixed to stay unique on a page."""
    buffer = io.StringIO()
    with rc_context(RC):
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    # matplotlib's ids (clip paths, glyphs) repeat across figures; prefix them per figure
    text = re.sub(r'id="([^"]+)"', lambda m: f'id="{element_id}-{m.group(1)}"', text)
    text = re.sub(r'url\(#([^)]+)\)', lambda m: f"url(#{element_id}-{m.group(1)})", text)
    text = re.sub(r'xlink:href="#([^"]+)"', lambda m: f'xlink:href="#{element_id}-{m.group(1)}"', text)
    return text.replace("<svg ", f'<svg role="img" class="plot" ', 1)


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
    k = len(labels)
    p = np.array([[np.nan if v is None else v for v in row] for row in p_adjusted], dtype=float).reshape(k, k)
    cmap = LinearSegmentedColormap.from_list("sig", ["#f4c20d", "#fff4c2", "#f2f2f2", "#3b4a6b"])
    size = max(3.2, 0.42 * k + 1.8)
    with rc_context(RC):
        fig = _figure(size + 0.8, size)
        ax = fig.subplots()
        shown = np.ma.masked_invalid(p)
        image = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, aspect="equal")
        ax.set_xticks(range(k), labels, rotation=45, ha="right", **PLAIN)
        ax.set_yticks(range(k), labels, **PLAIN)
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
        for tick in (*ax.get_xticklabels(), *ax.get_yticklabels()):
            if highlight is not None and tick.get_text() == highlight:
                tick.set_color(HIGHLIGHT)
                tick.set_fontweight("bold")
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label(f"Holm-adjusted p (significant < {alpha:g})")
        ax.set_title("One-sided Wilcoxon signed-rank, row > column", loc="left")
    return _svg(fig, element_id)


def rank_blob_plot(labels: Sequence[str], rank_counts: Sequence[Sequence[int]], median_rank: Sequence[float],
                   ci_low: Sequence[float], ci_high: Sequence[float], highlight: str | None = None,
                   element_id: str = "blobs") -> str:
    """challengeR's blob plot; ``labels`` in full-data rank order, ``rank_counts[i][r-1]`` =
    bootstrap samples in which algorithm i has rank r."""
    k = len(labels)
    counts = np.array(rank_counts, dtype=float).reshape(k, k) if k else np.zeros((0, 0))
    with rc_context(RC):
        fig = _figure(max(3.5, 0.55 * k + 1.5), max(2.8, 0.35 * k + 1.4))
        ax = fig.subplots()
        if k:
            share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            xs, ys = np.nonzero(share)
            # marker area (pt^2) proportional to the share of bootstrap samples
            ax.scatter(xs + 1, ys + 1, s=share[xs, ys] * 420, color=ACCENT, alpha=0.55, linewidths=0)
            x = np.arange(1, k + 1)
            ax.vlines(x, ci_low, ci_high, color="black", linewidth=1)
            ax.scatter(x, median_rank, marker="x", color="black", s=30, zorder=3)
            ax.plot([0.5, k + 0.5], [0.5, k + 0.5], color="#bbb", linewidth=0.8, linestyle=":")
            ax.set_xticks(x, labels, rotation=45, ha="right", **PLAIN)
            ax.set_yticks(x)
            ax.set_xlim(0.4, k + 0.6)
            ax.set_ylim(k + 0.6, 0.4)
            for tick in ax.get_xticklabels():
                if highlight is not None and tick.get_text() == highlight:
                    tick.set_color(HIGHLIGHT)
                    tick.set_fontweight("bold")
        ax.set_ylabel("rank in bootstrap samples")
        ax.grid(color="#eee")
        ax.set_title("Rank stability (area ∝ share of samples; × median, | 95 %)", loc="left")
    return _svg(fig, element_id)


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
