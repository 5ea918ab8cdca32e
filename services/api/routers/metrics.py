"""``GET /metrics``: Prometheus text exposition of the deployment's state (services/observability.py).

Unauthenticated, like every Prometheus target: it reveals counts only (submissions by state, queue
depths, failure reason codes), never names, scores or cases. Put it behind the reverse proxy's
allow-list if even counts are private.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=True, response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus metrics, read from the database and the broker at scrape time."""
    registry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def install(app) -> None:
    """Create the app's metrics registry and add ``/metrics`` (outside ``/api/v1``, as Prometheus expects)."""
    from services.observability import make_registry

    app.state.metrics_registry = make_registry(app.state.sessionmaker, app.state.settings)
    app.include_router(router)
