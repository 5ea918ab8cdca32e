"""Leaderboards: precomputed rankings, significance, rank stability, per-hospital/subgroup tables.

Visibility (see docs/leaderboard.md):

- ``scope=published`` (default): anyone, no token needed -- published aggregates only;
- ``scope=all`` (hidden, scored-but-unpublished results included): organizers only (401 without a
  token, 403 for other roles);
- per-case scores of a submission: organizers (any), analysts (published ones, public-sample
  cases only); inventors and the public never (403 / 401), since hidden per-case results would let
  a team tune to the test set;
- small-cell suppression (``services.leaderboard.suppression``): outside ``scope=all``, a group
  (hospital, subgroup) or a whole test set with fewer than ``min_group_size`` hidden cases shows
  no statistic;
- a submission's results page: published -> anyone; unpublished -> organizers; its own team
  gets 403 ("hidden until published"); anybody else 404, as if it did not exist.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query
from fastapi import Path as Path_
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session

from services.api.params import IdPath, Offset, PageLimit10000
from services.api.deps import get_db, optional_user
from services.api.errors import ApiError
from services.db.enums import Role, SubmissionState
from services.db.models import Case, Score, Submission, TestSet, User
from services.leaderboard import queries, suppression

router = APIRouter(prefix="/leaderboards", tags=["leaderboards"])

ORGAN = Query("average", description="an organ name or 'average'")
METRIC = Query("dsc", description="dsc or nsd")
SCOPE = Query("published", description="published (anyone) or all (organizers)")
PROTOCOL = Query(None, max_length=200, description="a protocol version of the test set, NAME@VERSION (default: its "
                 "current one; GET /api/v1/leaderboards lists each test set's protocol_versions)")


def _scope(scope: str, user: User | None) -> str:
    if scope not in ("published", "all"):
        raise ApiError(f"unknown scope {scope!r}; choose one of published, all", 422)
    if scope == "all":
        if user is None:
            raise ApiError("scope=all (unpublished results) needs an organizer's token", 401,
                           headers={"WWW-Authenticate": "Bearer"})
        if user.role is not Role.organizer:
            raise ApiError(f"scope=all (unpublished results) is for organizers; you are {user.role.value}", 403)
    return scope


def _testset(db: Session, name: str, protocol: str | None = None) -> TestSet:
    try:
        return queries.get_testset(db, name, protocol)
    except queries.LeaderboardNotFound as exc:
        raise ApiError(str(exc), 404) from exc


def _run(fn, *args, **kwargs) -> dict[str, Any]:
    try:
        return fn(*args, **kwargs)
    except queries.LeaderboardQueryError as exc:
        raise ApiError(str(exc), 422) from exc


def _json(payload: dict[str, Any]) -> Response:
    """The payload (already JSON-ready: the queries map NaN to None) encoded once by ``json.dumps``
    -- FastAPI's ``jsonable_encoder`` walks every value of a 100-entry table first (~10 ms). Any
    value plain ``json`` refuses falls back to FastAPI's encoding."""
    try:
        body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        return JSONResponse(jsonable_encoder(payload))
    return Response(body, media_type="application/json")


@router.get("")
def list_leaderboards(scope: str = SCOPE, db: Session = Depends(get_db),
                      user: User | None = Depends(optional_user)) -> list[dict[str, Any]]:
    """Test sets with their number of cases and of results in the scope."""
    return queries.list_testsets(db, _scope(scope, user))


@router.get("/{testset}")
def read_leaderboard(
    testset: str, organ: str = ORGAN, metric: str = METRIC,
    method: str = Query("mean", description="mean | median | rank-mean | test"),
    scope: str = SCOPE, protocol: str | None = PROTOCOL, db: Session = Depends(get_db),
    user: User | None = Depends(optional_user),
) -> dict[str, Any]:
    """The ranked table of one organ (or the average), metric and ranking method."""
    scope = _scope(scope, user)
    return _json(_run(queries.leaderboard, db, _testset(db, testset, protocol), organ=organ, metric=metric,
                      method=method, scope=scope))


@router.get("/{testset}/significance")
def read_significance(testset: str, organ: str = ORGAN, metric: str = METRIC, scope: str = SCOPE,
                      protocol: str | None = PROTOCOL, db: Session = Depends(get_db),
                      user: User | None = Depends(optional_user)) -> dict[str, Any]:
    """K x K Holm-adjusted p-values of one-sided paired Wilcoxon tests ("row better than column")."""
    scope = _scope(scope, user)
    return _run(queries.significance, db, _testset(db, testset, protocol), organ=organ, metric=metric, scope=scope)


@router.get("/{testset}/stability")
def read_stability(
    testset: str, organ: str = ORGAN, metric: str = METRIC,
    method: str = Query("mean", description="mean | rank-mean"), scope: str = SCOPE,
    protocol: str | None = PROTOCOL, db: Session = Depends(get_db), user: User | None = Depends(optional_user),
) -> dict[str, Any]:
    """Bootstrap rank distribution per algorithm, median rank, 95 % interval, Kendall's tau."""
    scope = _scope(scope, user)
    return _run(queries.stability, db, _testset(db, testset, protocol), organ=organ, metric=metric, method=method,
                scope=scope)


@router.get("/{testset}/hospitals")
def read_hospitals(testset: str, organ: str = ORGAN, metric: str = METRIC, scope: str = SCOPE,
                   protocol: str | None = PROTOCOL, db: Session = Depends(get_db),
                   user: User | None = Depends(optional_user)) -> dict[str, Any]:
    """Per-hospital aggregates of every submission in the scope."""
    scope = _scope(scope, user)
    return _run(queries.breakdown, db, _testset(db, testset, protocol), variable="hospital", organ=organ, metric=metric,
                scope=scope)


@router.get("/{testset}/subgroups/{variable}")
def read_subgroups(testset: str, variable: str, organ: str = ORGAN, metric: str = METRIC, scope: str = SCOPE,
                   protocol: str | None = PROTOCOL, db: Session = Depends(get_db),
                   user: User | None = Depends(optional_user)) -> dict[str, Any]:
    """Per-group aggregates for ``variable`` (age_decade, sex, race, manufacturer, contrast_phase,
    diagnosis, hospital)."""
    scope = _scope(scope, user)
    return _run(queries.breakdown, db, _testset(db, testset, protocol), variable=variable, organ=organ, metric=metric,
                scope=scope)


@router.get("/{testset}/figures/{filename}", response_class=Response,
            responses={200: {"content": {"image/svg+xml": {}, "image/png": {}}}})
def read_figure(
    testset: str, filename: str = Path_(..., description="KIND.svg or KIND.png; kinds: boxes, significance, blobs, "
                                        "hospitals, subgroups, ranking-heatmap, robustness"),
    organ: str = ORGAN, metric: str = METRIC, method: str = Query("mean", description="order of the box plots"),
    variable: str | None = Query(None, description="subgroup variable of the subgroups figure"), scope: str = SCOPE,
    protocol: str | None = PROTOCOL, download: bool = False, db: Session = Depends(get_db),
    user: User | None = Depends(optional_user),
) -> Response:
    """One figure across all algorithms in the scope (services.web.figures; small-cell suppression
    outside scope=all), as SVG or PNG."""
    from services.web import figure_pages, figures

    scope = _scope(scope, user)
    ts = _testset(db, testset, protocol)
    kind, _, fmt = filename.rpartition(".")
    try:
        figures.check(kind, fmt)
        rendered = figures.figure(db, ts, kind, organ=organ, metric=metric, scope=scope, method=method,
                                  variable=variable)
    except (figures.FigureError, queries.LeaderboardQueryError) as exc:
        raise ApiError(str(exc), 422) from exc
    if rendered.figure is None:
        raise ApiError(f"no {kind} figure for {organ}/{metric}: {rendered.empty}", 404)
    return figure_pages.figure_response(rendered, fmt, f"{ts.name}-{kind}-{organ}-{metric}.{fmt}", download,
                                        organizers_only=suppression.reveals(scope))


@router.get("/{testset}/report", response_class=Response,
            responses={200: {"content": {"text/html": {}, "application/pdf": {}}}})
def read_report(
    testset: str, scope: str = SCOPE, format: str = Query("html", description="html | pdf (headless Chromium)"),
    organ: list[str] = Query([], description="sections of these organs only (default: the average and every organ)"),
    metric: list[str] = Query([], description="sections of these metrics only (default: every metric)"),
    protocol: str | None = PROTOCOL, db: Session = Depends(get_db), user: User | None = Depends(optional_user),
) -> Response:
    """The self-contained benchmark report (services.report): challengeR's structure, every number
    as this API returns it for the scope."""
    import tempfile
    from pathlib import Path

    from services import report

    scope = _scope(scope, user)
    if format not in ("html", "pdf"):
        raise ApiError(f"unknown format {format!r}; choose one of html, pdf", 422)
    ts = _testset(db, testset, protocol)
    html = _run(report.build_report, db, ts, scope=scope, organs=organ or None, metrics=metric or None)
    name = f"{ts.name}-report-{scope}"
    if format == "html":
        return Response(html.encode(), media_type="text/html; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}.html"'})
    with tempfile.TemporaryDirectory() as tmp:
        try:
            pdf = report.write_pdf(html, Path(tmp) / "report.pdf").read_bytes()
        except report.ReportError as exc:
            raise ApiError(str(exc), 503) from exc
    return Response(pdf, media_type="application/pdf",
                    headers={"Content-Disposition": f'attachment; filename="{name}.pdf"'})


def _visible_submission(db: Session, ts: TestSet, submission_id: int, user: User | None) -> Submission:
    submission = db.get(Submission, submission_id)
    hidden = f"no submission {submission_id} with results on {ts.name} visible to you"
    if submission is None or submission.testset_id != ts.id:
        raise ApiError(hidden, 404)
    if submission.state is SubmissionState.published:
        return submission
    if user is not None and user.role is Role.organizer and submission.state is SubmissionState.scored:
        return submission
    if user is not None and user.role is Role.inventor and submission.team_id == user.team_id:
        raise ApiError(f"the results of submission {submission_id} are hidden until an organizer publishes them", 403)
    raise ApiError(hidden, 404)


@router.get("/{testset}/submissions/{submission_id}")
def read_submission_results(testset: str, submission_id: IdPath, protocol: str | None = PROTOCOL,
                            db: Session = Depends(get_db),
                            user: User | None = Depends(optional_user)) -> dict[str, Any]:
    """A submission's aggregates per organ and metric and its ranks."""
    ts = _testset(db, testset, protocol)
    submission = _visible_submission(db, ts, submission_id, user)
    scopes = ("published", "all") if user is not None and user.role is Role.organizer else ("published",)
    return _json(queries.submission_summary(db, ts, submission, scopes=scopes))


@router.get("/{testset}/submissions/{submission_id}/cases")
def read_submission_cases(
    testset: str, submission_id: IdPath, organ: str | None = None,
    offset: Offset = 0, limit: PageLimit10000 = 1000, protocol: str | None = PROTOCOL,
    db: Session = Depends(get_db), user: User | None = Depends(optional_user),
) -> dict[str, Any]:
    """Per-case scores (with case metadata): organizers (every case), and analysts for published
    submissions (public-sample cases only: hidden per-case scores stay with the organizers)."""
    if user is None:
        raise ApiError("per-case results need an analyst's or organizer's token", 401,
                       headers={"WWW-Authenticate": "Bearer"})
    if user.role not in (Role.organizer, Role.analyst):
        raise ApiError(f"per-case results are for analysts and organizers; you are {user.role.value}", 403)
    ts = _testset(db, testset, protocol)
    submission = _visible_submission(db, ts, submission_id, user)
    query = (
        sa.select(Case.case_id, Case.hospital, Score.organ, Score.dsc, Score.nsd, Score.hd95, Score.assd, Score.status)
        .join(Case, Case.id == Score.case_id)
        .where(Score.submission_id == submission.id, Score.protocol_key == ts.protocol_key)
    )
    if user.role is not Role.organizer:
        # hidden cases' per-case scores are for organizers; analysts get the public sample's
        query = query.where(Case.public_sample.is_(True))
    if organ:
        query = query.where(Score.organ == organ)
    total = db.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    rows = db.execute(query.order_by(Case.case_id, Score.organ).offset(offset).limit(limit)).all()
    return {
        "testset": ts.name, "protocol_key": ts.protocol_key, "submission_id": submission.id, "total": total,
        "offset": offset, "limit": limit,
        "items": [dict(zip(("case_id", "hospital", "organ", "dsc", "nsd", "hd95", "assd", "status"), r)) for r in rows],
    }
