"""The benchmark report: one self-contained HTML file (every figure inline SVG, the style sheet
inline, no script and no link needed to read it), optionally printed to PDF by headless Chromium.

Structure after challengeR's report (``inst/appdir/report.Rmd``): overview and the statistical
options; then for every metric and organ (and the average): the ranking with all four methods,
the raw assessment data (Touchstone's box plots, the ranking heatmap), ranking stability (blob
plot of the bootstrap, significance map), ranking robustness across methods (line plot and
Kendall's tau between the methods' rankings, :func:`evaluation.stats.ranking.compare_rankings`);
per-hospital and per-subgroup sections; efficiency (time and memory per submission).

Every number is read through the functions the API uses (:mod:`services.leaderboard.queries`:
``leaderboard``, ``stability``, ``significance``, ``breakdown``) in the same ``scope``, so it equals
what ``GET /api/v1/leaderboards/...`` returns; every numeric cell carries the exact value and where
it came from (``data-q``, ``data-organ``, ``data-metric``, ``data-method``, ``data-sid``,
``data-field``, ``data-variable``, ``data-group``), which the tests compare with the API. The only
numbers not in the API are Kendall's tau between the methods' rankings, computed from the API's
ranks. Visibility is the caller's: ``scope=published`` (anyone; small-cell suppression applies to
every table and figure) or ``scope=all`` (organizers).
"""

from __future__ import annotations

import html
import json
import math
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.orm import Session

from evaluation.stats.ranking import compare_rankings
from services.db.models import TestSet
from services.formatting import format_value
from services.leaderboard import compute, queries, suppression
from services.web import figures

WEB = Path(__file__).resolve().parent / "web"
#: what each ranking method is (the report's ranking scheme, as challengeR states it)
METHOD_SCHEMES = {
    "mean": "aggregate using the mean, then rank",
    "median": "aggregate using the median, then rank",
    "rank-mean": "rank per case, then aggregate using the mean rank",
    "test": "test (one-sided paired Wilcoxon) every pair, then rank by the share of significant wins",
}
#: the figures of each (organ, metric) section, in challengeR's order
SECTION_FIGURES = ("boxes", "ranking-heatmap", "blobs", "significance", "robustness")

_env = Environment(loader=FileSystemLoader(str(WEB / "templates")), autoescape=select_autoescape(["html"]))


def _raw(value: Any) -> str:
    """The exact value as JSON (what the API's body holds): floats as ``repr``, None as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return "null"
    return json.dumps(value)


def _gib(value: Any) -> str:
    return "–" if value is None else f"{value / 1024**3:.2f} GiB"


_env.filters.update(raw=_raw, fmt=format_value, gib=_gib)


class ReportError(RuntimeError):
    """The report could not be written (e.g. no Chromium for the PDF); the message says what to do."""


def _labelled(rendered: figures.RenderedFigure, element_id: str) -> str:
    """The figure's inline ``<svg>`` with its text alternative as ``aria-label``."""
    svg = rendered.svg(element_id)
    return svg.replace('<svg role="img"', f'<svg role="img" aria-label="{html.escape(rendered.alt)}"', 1)


def _section(session: Session, testset: TestSet, organ: str, metric: str, scope: str) -> dict[str, Any]:
    entries, ranks, tables = figures.method_ranks(session, testset, organ=organ, metric=metric, scope=scope)
    board = tables["mean"]
    by_method = {m: {e["submission_id"]: e for e in t["entries"]} for m, t in tables.items()}
    taus = []
    complete = [sid for sid in (e["submission_id"] for e in entries)
                if all(ranks[m].get(sid) is not None for m in compute.RANKING_METHODS)]
    if len(complete) >= 2:
        frames = {m: pd.DataFrame({"algorithm": [str(s) for s in complete], "rank": [ranks[m][s] for s in complete]})
                  for m in compute.RANKING_METHODS}
        taus = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                for row in compare_rankings(frames).to_dict("records")]
    rendered = []
    for kind in SECTION_FIGURES:
        f = figures.figure(session, testset, kind, organ=organ, metric=metric, scope=scope)
        rendered.append({"kind": kind, "title": figures.TITLES[kind], "caption": f.caption, "alt": f.alt,
                         "empty": f.empty, "svg": _labelled(f, f"{kind}-{organ}-{metric}")})
    return {"organ": organ, "metric": metric, "board": board, "entries": entries, "by_method": by_method,
            "taus": taus, "figures": rendered, "id": f"{metric}-{organ}"}


def _breakdowns(session: Session, testset: TestSet, metric: str, scope: str) -> list[dict[str, Any]]:
    board = queries.leaderboard(session, testset, organ="average", metric=metric, method="mean", scope=scope)
    order = [e["submission_id"] for e in board["entries"]]
    out = []
    for variable in compute.breakdown_variables(testset):
        table = queries.breakdown(session, testset, variable=variable, organ="average", metric=metric, scope=scope)
        groups = []
        for row in table["rows"]:
            if row["group"] not in groups:
                groups.append(row["group"])
        if not groups:
            continue
        cells = {(r["submission_id"], r["group"]): r for r in table["rows"]}
        kind = "hospitals" if variable == "hospital" else "subgroups"
        f = figures.figure(session, testset, kind, organ="average", metric=metric, scope=scope,
                           variable=None if variable == "hospital" else variable)
        out.append({"variable": variable, "groups": groups, "cells": cells, "order": order,
                    "labels": {e["submission_id"]: e["label"] for e in board["entries"]},
                    "figure": {"kind": kind, "title": f"{figures.TITLES[kind]} ({variable.replace('_', ' ')})",
                               "caption": f.caption, "alt": f.alt, "empty": f.empty,
                               "svg": _labelled(f, f"{kind}-{variable}-{metric}")}})
    return out


def build_report(session: Session, testset: TestSet, *, scope: str = "published",
                 organs: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                 generated_at: datetime | None = None, progress: Callable[[int, int, str], None] | None = None) -> str:
    """The report of ``testset`` in ``scope`` as one HTML document (str). ``organs`` (default:
    the average and every organ) and ``metrics`` (default: every metric) choose the sections;
    ``progress(done, total, what)`` is called before each section (figures render on first use)."""
    # each section once, in the canonical order: a query string repeating organ=liver a thousand
    # times must not make the server render a thousand sections (check_params refuses unknown names)
    organs = list(dict.fromkeys(organs or compute.ORGANS_AND_AVERAGE))
    metrics = list(dict.fromkeys(metrics or compute.BOARD_METRICS))
    for organ in organs:
        queries.check_params(organ=organ)
    for metric in metrics:
        queries.check_params(metric=metric)
    queries.check_params(scope=scope)
    overview = queries.leaderboard(session, testset, organ="average", metric=metrics[0], method="mean", scope=scope)
    todo = [(metric, organ) for metric in metrics for organ in organs]
    total = len(todo) + len(metrics)
    sections = []
    for done, (metric, organ) in enumerate(todo):
        if progress:
            progress(done, total, f"{metric} · {organ}")
        sections.append(_section(session, testset, organ, metric, scope))
    breakdowns = {}
    for done, metric in enumerate(metrics, start=len(todo)):
        if progress:
            progress(done, total, f"{metric} · per hospital and subgroup")
        breakdowns[metric] = _breakdowns(session, testset, metric, scope)
    if progress:
        progress(total, total, "done")
    run = overview["run"] or {}
    template = _env.get_template("report.html")
    return template.render(
        ts=testset, scope=scope, organizer_view=suppression.reveals(scope), overview=overview, run=run,
        sections=sections, breakdowns=breakdowns, metrics=metrics, organs=organs,
        methods=compute.RANKING_METHODS, schemes=METHOD_SCHEMES, k=queries.min_group_size(testset),
        n_hidden=queries.n_hidden_cases(session, testset),
        generated_at=(generated_at or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC"),
        css=(WEB / "static" / "style.css").read_text(),
    )


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def write_pdf(html: str, out: Path, chromium: str | None = None, timeout_s: float = 180) -> Path:
    """Print ``html`` to ``out`` (PDF) with headless Chromium (Debian's ``chromium``)."""
    chromium = chromium or chromium_binary()
    if chromium is None:
        raise ReportError("the PDF is printed by headless Chromium, which is not installed: "
                          "apt-get install chromium (or write the HTML report and print it from a browser)")
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory(prefix="touchstone-report-") as tmp:
        source = Path(tmp) / "report.html"
        source.write_text(html, encoding="utf-8")
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp}/profile",
             "--no-pdf-header-footer", f"--print-to-pdf={out}", source.as_uri()],
            capture_output=True, timeout=timeout_s,
        )
    if result.returncode != 0 or not out.exists() or out.stat().st_size == 0:
        raise ReportError(f"Chromium did not print the PDF (exit {result.returncode}): "
                          f"{result.stderr.decode(errors='replace')[-500:]}")
    return out
