"""Server-rendered leaderboard pages (Jinja2, no front-end build step). Public: published data only.

    /                                       -> /leaderboards
    /leaderboards                           test sets
    /leaderboards/{testset}?organ=&metric=&method=&variable=
                                            ranked table and the figures of all algorithms
                                            (services.web.figures); organ tabs are plain links (no JS
                                            needed); a small inline script makes the columns sortable
    /leaderboards/{testset}/figures/{kind}.svg|png, /leaderboards/{testset}/report.html
                                            figure downloads and the report (services.web.figure_pages)
    /leaderboards/{testset}/submissions/{id}?organ=&metric=
                                            box plots per organ, significance heatmap, rank blob
                                            plot, per-hospital bars
    /static/...                             CSS

Small-cell suppression (services.leaderboard.suppression) comes with the query results: a
hospital with fewer than the test set's ``min_group_size`` hidden cases reads "< k" and has no
number and no bar; a test set with fewer hidden cases than that shows no statistic and no figure.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from evaluation.labels import ORGANS
from evaluation.metric_registry import METRIC_INFO
from services.db.session import request_session
from services.formatting import format_value
from services.db.enums import SubmissionState
from services.db.models import Case, Score, Submission, TestSet
from services.leaderboard import queries
from services.leaderboard.compute import ORGANS_AND_AVERAGE, RANKING_METHODS, board_metrics, lesion_classes
from services.web import figure_pages, figures, plots, viewer

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(include_in_schema=False)

METHOD_NAMES = {"mean": "mean (aggregate, then rank)", "median": "median (aggregate, then rank)",
                "rank-mean": "mean rank (rank, then aggregate)", "test": "significant wins (test, then rank)"}


def get_db(request: Request) -> Iterator[Session]:
    """The request's database session (services.db.session.request_session)."""
    yield from request_session(request)


def _fmt(value, digits: int = 3) -> str:
    return format_value(value, digits)


def _bytes(value) -> str:
    if value is None:
        return "–"
    return f"{value / 1024**3:.1f} GiB"


templates.env.filters["fmt"] = _fmt
templates.env.filters["gib"] = _bytes


def _error(request: Request, status: int, message: str) -> HTMLResponse:
    return templates.TemplateResponse(request, "error.html", {"message": message}, status_code=status)


def _page_testset(request: Request, db: Session, testset: str, protocol: str | None, organ: str, metric: str,
                  method: str = "mean") -> tuple[TestSet | None, HTMLResponse | None]:
    """The test set a leaderboard page shows, and ``None``; or ``None`` and the error page to answer
    (404: no such test set or protocol version, 422: an organ, metric or method it does not have)."""
    try:
        ts = queries.get_testset(db, testset, protocol)
    except queries.LeaderboardNotFound as exc:
        return None, _error(request, 404, str(exc))
    try:
        queries.check_params(organ=organ, metric=metric, method=method, testset=ts)
    except queries.LeaderboardQueryError as exc:
        return None, _error(request, 422, str(exc))
    return ts, None


def _metric_context(ts: TestSet) -> dict[str, Any]:
    """The organ and metric selectors of a test set: its protocol's lesion classes and metrics."""
    metrics = board_metrics(ts)
    return {"organs": (*ORGANS_AND_AVERAGE, *lesion_classes(ts)), "metrics": metrics,
            "metric_labels": {m: METRIC_INFO[m].label for m in metrics}}


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/leaderboards", status_code=307)


@router.get("/leaderboards", response_class=HTMLResponse)
def testsets_page(request: Request, db: Session = Depends(get_db)) -> HTMLResponse:
    return templates.TemplateResponse(request, "index.html", {"testsets": queries.list_testsets(db, "published")})


@router.get("/leaderboards/{testset}", response_class=HTMLResponse)
def leaderboard_page(
    request: Request,
    testset: str,
    organ: str = Query("average"),
    metric: str = Query("dsc"),
    method: str = Query("mean"),
    variable: str | None = Query(None, description="subgroup variable of the per-subgroup box plots"),
    protocol: str | None = Query(None, max_length=200, description="a protocol version NAME@VERSION"),
    db: Session = Depends(get_db),
) -> HTMLResponse:
    ts, error = _page_testset(request, db, testset, protocol, organ, metric, method)
    if error is not None:
        return error
    variable = variable or figures.default_variable(ts)
    try:
        figures.check("subgroups", testset=ts, variable=variable)
    except figures.FigureError as exc:
        return _error(request, 422, str(exc))
    board = queries.leaderboard(db, ts, organ=organ, metric=metric, method=method, scope="published")
    hospitals = queries.breakdown(db, ts, variable="hospital", organ=organ, metric=metric, scope="published")
    groups = sorted({r["group"] for r in hospitals["rows"]})
    by_submission: dict[int, dict[str, dict]] = {}
    for row in hospitals["rows"]:
        by_submission.setdefault(row["submission_id"], {})[row["group"]] = row
    return templates.TemplateResponse(
        request,
        "leaderboard.html",
        {"ts": ts, "board": board, **_metric_context(ts), "methods": RANKING_METHODS,
         "method_names": METHOD_NAMES, "organ": organ, "metric": metric, "method": method, "organ_columns": ORGANS,
         "hospital_groups": groups, "hospital_rows": by_submission, "min_group_size": queries.min_group_size(ts),
         **_protocol_context(db, ts, protocol),
         "variable": variable, "variables": figures.subgroup_variables(ts),
         "figures": figure_pages.page_figures(db, ts, organ=organ, metric=metric, method=method, variable=variable)},
    )


@router.get("/leaderboards/{testset}/submissions/{submission_id}", response_class=HTMLResponse)
def submission_page(
    request: Request,
    testset: str,
    submission_id: int,
    organ: str = Query("average"),
    metric: str = Query("dsc"),
    protocol: str | None = Query(None, max_length=200, description="a protocol version NAME@VERSION"),
    db: Session = Depends(get_db),
) -> HTMLResponse:
    ts, error = _page_testset(request, db, testset, protocol, organ, metric)
    if error is not None:
        return error
    submission = db.get(Submission, submission_id)
    if submission is None or submission.testset_id != ts.id or submission.state is not SubmissionState.published:
        return _error(request, 404, f"no published submission {submission_id} on {ts.name}")
    summary = queries.submission_summary(db, ts, submission, scopes=("published",))
    label = None
    significance = queries.significance(db, ts, organ=organ, metric=metric, scope="published")
    # fewer hidden cases than k: no statistic of the test set at all, so no figure either
    tiny = significance["suppressed"]
    labels = [s["label"] for s in significance["submissions"]]
    for s in significance["submissions"]:
        if s["submission_id"] == submission_id:
            label = s["label"]
    heatmap = (plots.significance_heatmap(labels, significance["p_adjusted"], significance["significant"],
                                          significance["alpha"] or 0.05, highlight=label)
               if len(labels) > 1 and not tiny else None)
    stab = queries.stability(db, ts, organ=organ, metric=metric, method="mean", scope="published")
    blobs = plots.rank_blob_plot(
        [e["label"] for e in stab["entries"]], [e["rank_counts"] for e in stab["entries"]],
        [e["median_rank"] for e in stab["entries"]], [e["rank_ci_low"] for e in stab["entries"]],
        [e["rank_ci_high"] for e in stab["entries"]], highlight=label,
    ) if stab["entries"] and not tiny else None
    per_organ: dict[str, list[float]] = {o: [] for o in ORGANS}
    column = getattr(Score, metric)
    for organ_name, value in () if tiny else db.execute(
        sa.select(Score.organ, column).join(Case, Case.id == Score.case_id)
        .where(Score.submission_id == submission_id, Score.protocol_key == ts.protocol_key,
               Case.public_sample.is_(False))  # the benchmark's cases, as in the statistics
    ):
        if organ_name in per_organ and value is not None:
            per_organ[organ_name].append(value)
    per_organ = {o: v for o, v in per_organ.items() if v}
    boxes = plots.box_plots(per_organ, metric) if per_organ else None
    hospitals = queries.breakdown(db, ts, variable="hospital", organ=organ, metric=metric, scope="published",
                                  submission_ids=[submission_id])["rows"]
    shown = [r for r in hospitals if not r["suppressed"]]  # a suppressed hospital gets no bar
    suppressed_hospitals = [r["group"] for r in hospitals if r["suppressed"]]
    bars = plots.group_bars([r["group"] for r in shown], [r["mean"] for r in shown],
                            [r["mean_ci_low"] for r in shown], [r["mean_ci_high"] for r in shown],
                            [r["n"] for r in shown], metric,
                            f"{organ.replace('_', ' ')}: mean {metric.upper()} per hospital") if shown else None
    n_cases = db.scalar(sa.select(sa.func.count(Case.id)).where(Case.testset_id == ts.id))
    overall = {(a["organ"], a["metric"]): a for a in summary["aggregates"]}
    return templates.TemplateResponse(
        request,
        "submission.html",
        {"ts": ts, "s": summary, "organ": organ, "metric": metric, **_metric_context(ts),
         "overall": overall, "heatmap": heatmap, "blobs": blobs, "boxes": boxes, "bars": bars,
         "hospitals": hospitals, "significance": significance, "stability": stab, "n_cases": n_cases,
         "label": label, "suppressed_hospitals": suppressed_hospitals, "tiny": tiny,
         "min_group_size": queries.min_group_size(ts), **_protocol_context(db, ts, protocol),
         "worst": viewer.worst_cases_for_page(request, db, submission, organ, metric)},
    )


def _protocol_context(db: Session, ts, protocol: str | None) -> dict:
    """The test set's protocol versions (a selector when there are several) and ``pq``, the query
    part that keeps a chosen version in every link of the page."""
    from urllib.parse import quote

    from services.leaderboard import versions

    return {"protocol_versions": versions.protocol_keys(db, ts),
            "pq": f"&protocol={quote(ts.protocol_key)}" if protocol else ""}


def install(app: FastAPI) -> None:
    """Mount the pages and their static files on ``app``."""
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(figure_pages.router)  # figure downloads and the report (before the catch-all routes)
    app.include_router(viewer.router)  # the case viewer (signed-in organizers and inventors)
    app.include_router(router)
