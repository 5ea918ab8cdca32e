"""Exports of a test set's results (analysts and organizers), streamed: CSV or Parquet, per case,
per hospital or per subgroup. ``scope=all`` (unpublished results included) is for organizers."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from services import exports
from services.api.deps import get_db, require_role
from services.api.errors import ApiError
from services.db.enums import Role
from services.db.models import User
from services.leaderboard import queries

router = APIRouter(prefix="/exports", tags=["exports"])
readers = require_role(Role.analyst, Role.organizer)


@router.get("")
def export_formats(_: User = Depends(readers)) -> dict:
    """Levels, formats and the columns of each level."""
    return exports.describe()


@router.get("/{testset}")
def export(
    request: Request,
    testset: str,
    level: str = Query("case", description="case | hospital | subgroup | lesion"),
    format: str = Query("csv", description="csv | parquet"),
    scope: str = Query("published", description="published | all (organizers)"),
    protocol: str | None = Query(None, max_length=200, description="a protocol version of the test set, "
                                 "NAME@VERSION (default: its current one)"),
    db: Session = Depends(get_db),
    user: User = Depends(readers),
) -> StreamingResponse:
    try:
        exports.check(level, format, scope)
    except exports.ExportError as exc:
        raise ApiError(str(exc), 422) from exc
    if scope == "all" and user.role is not Role.organizer:
        raise ApiError(f"scope=all (unpublished results) is for organizers; you are {user.role.value}", 403)
    try:
        ts = queries.get_testset(db, testset, protocol)
    except queries.LeaderboardNotFound as exc:
        raise ApiError(str(exc), 404) from exc
    def body() -> Iterator[bytes]:
        # a session of its own: the request's session is closed once the endpoint returns
        session = request.app.state.sessionmaker()
        try:
            yield from exports.stream(session, queries.get_testset(session, testset, protocol), level, format, scope)
        finally:
            session.close()

    filename = f"{ts.name}-{ts.protocol_key}-{level}-{scope}.{format}".replace(" ", "_")
    return StreamingResponse(body(), media_type=exports.MEDIA_TYPES[format],
                             headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                      "X-Touchstone-Protocol": ts.protocol_key})
