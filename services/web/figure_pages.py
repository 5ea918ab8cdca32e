"""Figure downloads and the report of the public pages (published scope, small-cell suppression):

    /leaderboards/{testset}/figures/{kind}.svg|png?organ=&metric=&method=&variable=[&download=1]
                                    one figure of :mod:`services.web.figures` (kinds: FIGURE_KINDS)
    /leaderboards/{testset}/report.html[?organ=..&metric=..][&download=1]
                                    the self-contained benchmark report (:mod:`services.report`)

The leaderboard page (:func:`services.web.pages.leaderboard_page`) shows the figures of
:data:`~services.web.figures.PAGE_KINDS` through :func:`page_figures`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from services.db.models import TestSet
from services.leaderboard import queries
from services.web import figures

router = APIRouter(include_in_schema=False)

MEDIA_TYPES = {"svg": "image/svg+xml", "png": "image/png"}


def _db(request: Request):
    from services.web.pages import get_db

    yield from get_db(request)


def figure_url(testset: str, kind: str, fmt: str, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"/leaderboards/{testset}/figures/{kind}.{fmt}" + (f"?{query}" if query else "")


def page_figures(session: Session, testset: TestSet, *, organ: str, metric: str, method: str,
                 variable: str | None) -> list[dict[str, Any]]:
    """The page's figures (published scope): kind, title, caption, alt text, URLs of the SVG and
    PNG, and ``empty`` (why nothing is drawn) -- rendered now, so the image requests that follow
    hit the cache."""
    out = []
    for kind in figures.PAGE_KINDS:
        rendered = figures.figure(session, testset, kind, organ=organ, metric=metric, scope="published",
                                  method=method, variable=variable)
        params = {"organ": organ, "metric": metric, "method": method if kind in ("boxes", "subgroups") else None,
                  "variable": variable if kind == "subgroups" else None}
        out.append({"kind": kind, "title": figures.TITLES[kind], "caption": rendered.caption, "alt": rendered.alt,
                    "empty": rendered.empty, "svg": figure_url(testset.name, kind, "svg", **params),
                    "png": figure_url(testset.name, kind, "png", **params)})
    return out


def figure_response(rendered: figures.RenderedFigure, fmt: str, filename: str, download: bool,
                    organizers_only: bool = False) -> Response:
    """The figure as a file. ``organizers_only`` (``scope=all``: hidden numbers, unpublished
    submissions) is never stored by a shared cache (``private, no-store``); any figure varies with
    the ``Authorization`` header, so a proxy never hands an organizer's answer to someone else."""
    body = rendered.svg().encode() if fmt == "svg" else rendered.png()
    if fmt == "svg":  # a file of its own: with the XML prolog (matplotlib's svg carries its namespaces)
        body = b'<?xml version="1.0" encoding="utf-8"?>\n' + body
    headers = {"Cache-Control": "private, no-store" if organizers_only else "public, max-age=60",
               "Vary": "Authorization, Cookie"}
    if download:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)


def _problem(request: Request, status: int, message: str) -> HTMLResponse:
    from services.web.pages import _error

    return _error(request, status, message)


@router.get("/leaderboards/{testset}/figures/{filename}")
def figure_download(
    request: Request, testset: str, filename: str, organ: str = Query("average"), metric: str = Query("dsc"),
    method: str = Query("mean"), variable: str | None = Query(None), download: bool = Query(False),
    db: Session = Depends(_db),
) -> Response:
    kind, _, fmt = filename.rpartition(".")
    try:
        figures.check(kind, fmt)
        ts = queries.get_testset(db, testset)
        rendered = figures.figure(db, ts, kind, organ=organ, metric=metric, scope="published", method=method,
                                  variable=variable)
    except queries.LeaderboardNotFound as exc:
        return _problem(request, 404, str(exc))
    except (figures.FigureError, queries.LeaderboardQueryError) as exc:
        return _problem(request, 422, str(exc))
    if rendered.figure is None:
        return _problem(request, 404, f"no {kind} figure for {organ}/{metric}: {rendered.empty}")
    return figure_response(rendered, fmt, f"{ts.name}-{kind}-{organ}-{metric}.{fmt}", download)


@router.get("/leaderboards/{testset}/report.html")
def report_page(request: Request, testset: str, download: bool = Query(False),
                organ: list[str] = Query([]), metric: list[str] = Query([]),
                db: Session = Depends(_db)) -> Response:
    from services import report

    try:
        ts = queries.get_testset(db, testset)
        html = report.build_report(db, ts, scope="published", organs=organ or None, metrics=metric or None)
    except queries.LeaderboardNotFound as exc:
        return _problem(request, 404, str(exc))
    except queries.LeaderboardQueryError as exc:
        return _problem(request, 422, str(exc))
    headers = {"Content-Disposition": f'attachment; filename="{ts.name}-report.html"'} if download else {}
    return HTMLResponse(html, headers=headers)
