"""The leaderboard's figures across all algorithms and the benchmark report, on the shared world
(three imported baselines published, AlphaSeg scored but unpublished; 24 hidden cases, hospitals
of 8 cases each, small-cell threshold 10): what is drawn for whom, the downloads, the cache, and
the report's numbers against the API's."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from services.cli.main import app as cli

BASE = "/api/v1/leaderboards/abdomen-ct"
PAGE = "/leaderboards/abdomen-ct"


def _figure(session, kind, scope="published", **kwargs):
    from services.leaderboard import queries
    from services.web import figures

    return figures.figure(session, queries.get_testset(session, "abdomen-ct"), kind, scope=scope, **kwargs)


def _boxes_drawn(rendered) -> int:
    """Boxes in a box-plot figure (patch_artist boxes are the axes' PathPatches)."""
    from matplotlib.patches import PathPatch

    return sum(isinstance(p, PathPatch) for ax in rendered.figure.axes for p in ax.patches)


def _withheld_cells(rendered) -> int:
    from matplotlib.patches import Rectangle

    return sum(isinstance(p, Rectangle) and p.get_hatch() == "///" for ax in rendered.figure.axes for p in ax.patches)


def test_page_shows_every_figure_with_caption_downloads_and_text(world, client):
    response = client.get(PAGE, params={"organ": "liver", "metric": "dsc", "variable": "sex"})
    assert response.status_code == 200
    html = response.text
    for kind in ("boxes", "significance", "blobs", "hospitals", "subgroups"):
        assert f'id="fig-{kind}"' in html
    # captions name the protocol, the options and the missing-case policy
    assert html.count("Protocol touchstone@1; missing cases: common") >= 5
    assert html.count('alt="') >= 4  # every drawn figure has a text alternative
    # the hospitals (8 hidden cases each < k = 10) are withheld: the heatmap says so
    assert "3 hospitals (hospital-A, hospital-B, hospital-C); 9 cells withheld" in html
    svg = client.get(f"{PAGE}/figures/boxes.svg", params={"organ": "liver", "metric": "dsc", "download": 1})
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    assert svg.content.startswith(b"<?xml") and b"<svg" in svg.content
    assert "attachment" in svg.headers["content-disposition"]
    png = client.get(f"{PAGE}/figures/significance.png", params={"organ": "liver", "metric": "dsc"})
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    # the published page never names the unpublished submission, not even in a figure
    assert b"AlphaSeg" not in svg.content and "AlphaSeg" not in html
    # bad requests: a clear 4xx, never a 500
    assert client.get(f"{PAGE}/figures/pie.svg").status_code == 422
    assert client.get(f"{PAGE}/figures/boxes.gif").status_code == 422
    assert client.get(f"{PAGE}/figures/boxes.svg", params={"organ": "brain"}).status_code == 422
    assert client.get(f"{PAGE}/figures/subgroups.svg", params={"variable": "shoe_size"}).status_code == 422
    assert client.get(PAGE, params={"variable": "shoe_size"}).status_code == 422
    assert client.get("/leaderboards/nope/figures/boxes.svg").status_code == 404


def test_small_cells_are_not_drawn_for_the_public_but_for_organizers(world, session):
    # every baseline has 24 hidden cases >= k: a box each; no outliers (single hidden cases) in public
    public = _figure(session, "boxes", organ="liver", metric="dsc")
    assert _boxes_drawn(public) == 3 and "outliers not drawn" in public.caption
    organizer = _figure(session, "boxes", scope="all", organ="liver", metric="dsc")
    assert _boxes_drawn(organizer) == 4 and "outliers as dots" in organizer.caption  # AlphaSeg too
    # hospitals of 8 hidden cases: every cell withheld in public, every cell drawn for organizers
    assert _withheld_cells(_figure(session, "hospitals", organ="liver", metric="dsc")) == 3 * 3
    assert _withheld_cells(_figure(session, "hospitals", scope="all", organ="liver", metric="dsc")) == 0
    # age decades of 1 to 5 cases: no box in public; sexes of 12 cases: a box each
    assert _boxes_drawn(_figure(session, "subgroups", organ="liver", metric="dsc", variable="age_decade")) == 0
    assert _boxes_drawn(_figure(session, "subgroups", scope="all", organ="liver", metric="dsc",
                                variable="age_decade")) > 0
    assert _boxes_drawn(_figure(session, "subgroups", organ="liver", metric="dsc", variable="sex")) == 3 * 2
    # manufacturer: GE 12, Siemens 12 -> drawn
    assert _boxes_drawn(_figure(session, "subgroups", organ="liver", metric="dsc", variable="manufacturer")) == 6


def test_a_test_set_below_k_shows_no_figure_to_the_public(world, session):
    from services.db.models import TestSet

    testset = session.scalar(sa.select(TestSet).where(TestSet.name == "abdomen-ct"))
    before = testset.min_group_size
    testset.min_group_size = 100  # more than the 24 hidden cases
    session.commit()
    try:
        for kind in ("boxes", "significance", "blobs", "ranking-heatmap", "robustness"):
            rendered = _figure(session, kind, organ="average", metric="nsd")
            assert rendered.figure is None and rendered.empty, kind
        assert _withheld_cells(_figure(session, "hospitals", organ="average", metric="nsd")) == 9
        assert _figure(session, "boxes", scope="all", organ="average", metric="nsd").figure is not None
    finally:
        testset.min_group_size = before
        session.commit()


def test_figures_are_cached_per_statistics_run(world, session):
    from services.leaderboard import recompute_testset
    from services.leaderboard.queries import get_testset

    first = _figure(session, "blobs", organ="spleen", metric="dsc")
    assert _figure(session, "blobs", organ="spleen", metric="dsc") is first
    # a new statistics run (full: an incremental recomputation with nothing changed keeps the
    # stored run, and then the cached figure is still the right one)
    recompute_testset(session, get_testset(session, "abdomen-ct"), full=True)
    session.commit()
    again = _figure(session, "blobs", organ="spleen", metric="dsc")
    assert again is not first and again.figure is not None


def test_box_plot_values_are_the_statistics_values(world, session, client):
    """The boxes are drawn from the values the stored means were computed from."""
    from services.leaderboard import queries
    from services.web import figures

    ts = queries.get_testset(session, "abdomen-ct")
    board = client.get(BASE, params={"organ": "kidney_left", "metric": "nsd"}).json()
    rows = figures._rows(figures._matrices(session, ts, "published"), "kidney_left", "nsd",
                         [e["submission_id"] for e in board["entries"]])
    for entry in board["entries"]:
        values = rows[entry["submission_id"]]
        assert len(values) == entry["n_scored"]
        assert math.isclose(float(np.mean(values)), entry["mean"], rel_tol=1e-12)
        assert math.isclose(float(np.median(values)), entry["median"], rel_tol=1e-12)


class _Cells(HTMLParser):
    """Every element of the report with ``data-q``: its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, str]] = []
        self.figures = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-q" in a:
            self.cells.append(a)
        if tag == "figure" and "report-figure" in (a.get("class") or ""):
            self.figures += 1


def _check_report_numbers(html: str, client, headers, scope: str) -> int:
    parser = _Cells()
    parser.feed(html)
    api: dict[tuple, dict] = {}

    def get(path, **params):
        key = (path, tuple(sorted(params.items())))
        if key not in api:
            response = client.get(path, params={**params, "scope": scope}, headers=headers)
            assert response.status_code == 200, response.text
            api[key] = response.json()
        return api[key]

    checked = 0
    for cell in parser.cells:
        value = json.loads(cell["data-value"])
        q = cell["data-q"]
        if q == "leaderboard":
            board = get(BASE, organ=cell["data-organ"], metric=cell["data-metric"], method=cell["data-method"])
            entry = next(e for e in board["entries"] if e["submission_id"] == int(cell["data-sid"]))
            expected = entry[cell["data-field"]]
        elif q == "breakdown":
            variable = cell["data-variable"]
            path = f"{BASE}/hospitals" if variable == "hospital" else f"{BASE}/subgroups/{variable}"
            rows = get(path, organ=cell["data-organ"], metric=cell["data-metric"])["rows"]
            row = next(r for r in rows if r["submission_id"] == int(cell["data-sid"]) and r["group"] == cell["data-group"])
            expected = row[cell["data-field"]]
        elif q == "compare_rankings":
            import pandas as pd

            from evaluation.stats.ranking import compare_rankings

            frames = {}
            for method in (cell["data-method-a"], cell["data-method-b"]):
                entries = get(BASE, organ=cell["data-organ"], metric=cell["data-metric"], method=method)["entries"]
                frames[method] = pd.DataFrame({"algorithm": [e["submission_id"] for e in entries],
                                               "rank": [e["rank"] for e in entries]})
            expected = float(compare_rankings(frames)["kendall_tau"].iloc[0])
            expected = None if math.isnan(expected) else expected
        elif q == "overview":
            expected = len(get(BASE)["entries"])
        else:
            raise AssertionError(f"unknown data-q {q}")
        assert value == expected, (cell, expected)
        checked += 1
    return checked


def test_report_numbers_equal_the_api(world, client):
    params = [("organ", "average"), ("organ", "liver"), ("metric", "dsc")]
    # organizers' view: every number of every submission, AlphaSeg (unpublished) included
    response = client.get(f"{BASE}/report", params=[("scope", "all"), *params], headers=world.headers("org"))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "AlphaSeg" in html
    checked = _check_report_numbers(html, client, world.headers("org"), "all")
    # 2 sections x 4 algorithms x (4 methods x (rank, value) + mean, CI low/high, median, n, bootstrap rank)
    assert checked >= 2 * 4 * 14
    parser = _Cells()
    parser.feed(html)
    assert parser.figures == 2 * 5 + len(["hospital", "age_decade", "sex", "manufacturer"])
    assert html.count("<svg") >= 2 * 5
    # self-contained: every reference is an anchor in the page or inline data (imshow's raster)
    assert all(h.startswith(("#", "data:")) for h in re.findall(r'href="([^"]*)"', html))
    assert not re.search(r'<(img|link|script)\b', html)
    # the public: published results, small-cell suppression
    public = client.get(f"{BASE}/report", params=params)
    assert public.status_code == 200 and "AlphaSeg" not in public.text
    assert _check_report_numbers(public.text, client, {}, "published") >= 2 * 3 * 14
    assert "&lt; 10" in public.text  # hospitals of 8 hidden cases read "< 10"


def test_report_cli_writes_html_and_refuses_bad_arguments(world, cli_env, tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", "abdomen-ct", "--out", str(out), "--organ", "average",
                                      "--metric", "nsd", "--scope", "all"])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "Benchmarking report for abdomen-ct" in html and "AlphaSeg" in html
    assert "[0/2] nsd · average" in result.output and "[2/2] done" in result.output  # progress
    # errors compared unwrapped: rich wraps at the terminal width, and tmp paths are long
    bad = CliRunner().invoke(cli, ["report", "abdomen-ct", "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "is a folder" in " ".join(bad.output.split())
    bad = CliRunner().invoke(cli, ["report", "abdomen-ct", "--out", str(out), "--organ", "brain"])
    assert bad.exit_code == 1 and "unknown organ" in " ".join(bad.output.split())
    bad = CliRunner().invoke(cli, ["report", "nope", "--out", str(out)])
    assert bad.exit_code == 1 and "no test set" in " ".join(bad.output.split())


@pytest.mark.chromium
def test_report_pdf_through_headless_chromium(world, client, chromium_path):
    response = client.get(f"{BASE}/report", params={"format": "pdf", "organ": "average", "metric": "dsc"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pdf"
    assert response.content[:5] == b"%PDF-" and len(response.content) > 20_000
    assert client.get(f"{BASE}/report", params={"format": "docx"}).status_code == 422


def test_organizer_figures_are_never_kept_by_a_shared_cache(world, client):
    """scope=all holds hidden numbers and unpublished submissions: ``private, no-store``; every
    figure varies with the credentials (a proxy must not hand an organizer's answer to anyone)."""
    organizer = {"Authorization": f"Bearer {world.tokens['org']}"}
    hidden = client.get(f"{BASE}/figures/boxes.svg", params={"organ": "liver", "metric": "dsc", "scope": "all"},
                        headers=organizer)
    assert hidden.status_code == 200 and b"AlphaSeg" in hidden.content
    assert hidden.headers["cache-control"] == "private, no-store"
    assert "Authorization" in hidden.headers["vary"]
    public = client.get(f"{BASE}/figures/boxes.svg", params={"organ": "liver", "metric": "dsc"})
    assert public.headers["cache-control"].startswith("public") and "Authorization" in public.headers["vary"]


def test_report_renders_each_section_once_however_often_it_is_asked(world, session, monkeypatch):
    """organ=liver repeated 40 times in the query string is one section, not forty."""
    from services import report
    from services.leaderboard import queries

    calls = []
    monkeypatch.setattr(report, "_section", lambda session, testset, organ, metric, scope: calls.append((organ, metric)))
    monkeypatch.setattr(report, "_breakdowns", lambda *args: [])
    with pytest.raises(Exception):  # the stubbed sections cannot be rendered; only the calls count
        report.build_report(session, queries.get_testset(session, "abdomen-ct"), organs=["liver"] * 40,
                            metrics=["dsc", "dsc"])
    assert calls == [("liver", "dsc")]
