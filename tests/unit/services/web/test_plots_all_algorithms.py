"""The figures across all algorithms (services/web/plots.py builders, services/web/figures.py
RenderedFigure): what is drawn, what is withheld, names as plain text, SVG/PNG output."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.patches import PathPatch, Rectangle

from services.web import figures, plots

RNG = np.random.default_rng(3)


def _boxes(fig) -> int:
    return sum(isinstance(p, PathPatch) for ax in fig.axes for p in ax.patches)


def _fliers(fig) -> int:
    return sum(len(line.get_xdata()) for ax in fig.axes for line in ax.lines if line.get_marker() == ".")


def test_algorithm_boxes_withhold_small_cells_and_outliers():
    values = [np.r_[RNG.uniform(0.8, 0.9, 20), 0.05], None, RNG.uniform(0.6, 0.7, 20)]
    fig = plots.algorithm_boxes_figure(["A $x^2$", "B", "C"], values, "dsc", "t", show_fliers=False,
                                       notes=["", "n < 10", ""])
    assert _boxes(fig) == 2  # B withheld
    assert _fliers(fig) == 0  # a single hidden case's score (0.05) is not drawn
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["A $x^2$", "B (n < 10)", "C"]  # rank 1 on top, the note instead of a box
    shown = plots.algorithm_boxes_figure(["A", "B", "C"], values, "dsc", "t", show_fliers=True)
    assert _boxes(shown) == 2 and _fliers(shown) >= 1  # organizers: the outlier
    svg = plots.svg(fig, "b")
    assert "A $x^2$" in svg  # plain text, not mathtext


def test_group_boxes_draw_one_box_per_visible_group():
    cells = [[RNG.uniform(0.7, 0.9, 12), RNG.uniform(0.6, 0.8, 12), None],
             [None, RNG.uniform(0.5, 0.7, 12), RNG.uniform(0.5, 0.6, 12)]]
    fig = plots.group_boxes_figure(["A", "B"], ["F", "M", "unknown"], cells, "nsd", "t", show_fliers=False)
    assert _boxes(fig) == 4
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["F", "M", "unknown"]


def test_value_heatmap_hatches_withheld_cells_without_number():
    fig = plots.value_heatmap_figure(["A", "B"], ["h1", "h2"], [[0.812, None], [0.701, 0.655]],
                                     [[False, True], [False, False]], "dsc", "t")
    ax = fig.axes[0]
    hatched = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch() == "///"]
    assert len(hatched) == 1 and hatched[0].get_xy() == (0.5, -0.5)  # row A, column h2
    assert sorted(t.get_text() for t in ax.texts) == ["0.655", "0.701", "0.812"]


def test_ranking_heatmap_and_rank_lines():
    fig = plots.ranking_heatmap_figure(["A", "B"], [[7, 3], [3, 7]])
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["3", "3", "7", "7"]
    lines = plots.rank_lines_figure(["A", "B"], ["mean", "median", "rank-mean", "test"], [[1, 1, 2, 1], [2, 2, 1, 2]])
    drawn = [line for line in lines.axes[0].lines if len(line.get_ydata()) == 4]
    assert [list(line.get_ydata()) for line in drawn] == [[1, 1, 2, 1], [2, 2, 1, 2]]


def test_significance_map_of_many_algorithms_frames_significant_cells():
    k = 30
    p = [[None if i == j else (0.001 if i < j else 0.9) for j in range(k)] for i in range(k)]
    sig = [[i < j for j in range(k)] for i in range(k)]
    fig = plots.significance_figure([f"a{i}" for i in range(k)], p, sig, 0.05)
    frames = [c for c in fig.axes[0].collections if c.get_offsets().shape[0] == k * (k - 1) // 2]
    assert len(frames) == 1 and not fig.axes[0].texts  # no numbers beyond 14 algorithms


def test_rendered_figure_svg_ids_are_unique_per_prefix_and_png_is_png():
    rendered = figures.RenderedFigure("boxes", "caption", "alt",
                                      plots.algorithm_boxes_figure(["A"], [[0.5, 0.6, 0.7]], "dsc", "t", True))
    one, two = rendered.svg("boxes-liver-dsc"), rendered.svg("boxes-spleen-dsc")
    assert 'id="boxes-liver-dsc-' in one and 'id="boxes-liver-dsc-' not in two
    assert rendered.svg("boxes-liver-dsc") is one  # rendered once per prefix
    assert rendered.png()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = figures.RenderedFigure("blobs", "caption", "why", None, empty="why")
    assert empty.svg() == "" and empty.png() == b""


@pytest.mark.parametrize("kind, fmt, message", [("pie", "svg", "unknown figure 'pie'"),
                                                ("boxes", "gif", "unknown format 'gif'")])
def test_check_names_the_valid_values(kind, fmt, message):
    with pytest.raises(figures.FigureError, match=message) as info:
        figures.check(kind, fmt)
    assert "choose one of" in str(info.value)
