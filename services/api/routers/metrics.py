"""``GET /metrics``: Prometheus text exposition of the deployment's state (services/observability.py).

Who may scrape it on the API port: organizers (Bearer token); anyone only when
``TOUCHSTONE_METRICS_PUBLIC=true`` (then without the per-team storage family). Anonymous callers
get 401, other roles 403. For a Prometheus without a token, ``TOUCHSTONE_METRICS_PORT`` makes
``touchstone serve`` also serve ``/metrics`` unauthenticated on that internal port
(:func:`services.api.app.create_metrics_app`); keep that port off the reverse proxy.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.api.deps import BEARER_HINT, optional_user
from services.api.errors import ERROR_RESPONSES, ApiError
from services.db.enums import Role
from services.db.models import User

router = APIRouter(tags=["metrics"])

_DOC = {401: ERROR_RESPONSES[401], 403: ERROR_RESPONSES[403], 413: ERROR_RESPONSES[413],
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
              "description": "Prometheus text format"}}


@router.get("/metrics", include_in_schema=True, response_class=Response, responses=_DOC)
def metrics(request: Request, user: User | None = Depends(optional_user)) -> Response:
    """Prometheus metrics, read from the database and the broker at scrape time (organizers, or
    anyone when TOUCHSTONE_METRICS_PUBLIC is set)."""
    state = request.app.state
    if getattr(state, "metrics_internal", False) or (user is not None and user.role is Role.organizer):
        registry = state.metrics_registry
    elif user is None and state.settings.metrics_public:
        registry = state.public_metrics_registry
    elif user is None:
        raise ApiError("/metrics needs an organizer's token ('Authorization: Bearer <token>'); a Prometheus "
                       "without one scrapes TOUCHSTONE_METRICS_PORT", 401, headers=BEARER_HINT)
    else:
        raise ApiError(f"/metrics is for organizers; you are {user.role.value}", 403)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def internal_metrics(request: Request) -> Response:
    """The metrics app of the internal port: no token, every family."""
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


def install(app) -> None:
    """Create the app's metrics registries and add ``/metrics`` (outside ``/api/v1``, as Prometheus expects)."""
    from services.observability import make_registry

    app.state.metrics_registry = make_registry(app.state.sessionmaker, app.state.settings)
    app.state.public_metrics_registry = make_registry(app.state.sessionmaker, app.state.settings,
                                                      team_metrics=False)
    if getattr(app.state, "metrics_internal", False):
        app.add_api_route("/metrics", internal_metrics, methods=["GET"], response_class=Response)
    else:
        app.include_router(router)
