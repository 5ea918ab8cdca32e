"""The FastAPI application: ``/api/v1`` (a router per resource), OpenAPI docs at ``/docs``.

Run: ``touchstone serve`` or ``uvicorn services.api.app:create_app --factory``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI
from sqlalchemy.orm import sessionmaker

from services.api.errors import ERROR_RESPONSES, install_error_handlers
from services.api.middleware import BodyLimitMiddleware, SecurityHeadersMiddleware
from services.api.routers import algorithms, exports, leaderboard, rescoring, results, submissions, testsets, users
from services.config import Settings, get_settings
from services.observability import configure_logging
from services.db.session import get_engine

API_PREFIX = "/api/v1"


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # the imports (pandas, scipy, SQLAlchemy, matplotlib) leave ~10^6 long-lived objects; moved to
    # the permanent generation, full collections no longer scan them during requests (p99)
    gc.collect()
    gc.freeze()
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    configure_logging("api", settings.log_level)
    app = FastAPI(
        title="Touchstone",
        version="0.1.0",
        description=(
            "Third-party benchmarking of 3D abdominal CT organ segmentation. Authenticate with "
            "'Authorization: Bearer <token>'. Roles: organizer, inventor, analyst; the public reads "
            "published aggregates."
        ),
        docs_url="/docs",
        lifespan=_lifespan,
        openapi_url=f"{API_PREFIX}/openapi.json",
    )
    app.state.settings = settings
    app.state.sessionmaker = sessionmaker(bind=get_engine(settings), expire_on_commit=False)
    install_error_handlers(app)
    # outermost last: the security headers also reach the body limit's own 413 and 422 answers
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_request_body_bytes)
    app.add_middleware(SecurityHeadersMiddleware)

    api = APIRouter(prefix=API_PREFIX, responses=ERROR_RESPONSES)

    @api.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    for module in (users, testsets, rescoring, algorithms, submissions, results, leaderboard, exports):
        api.include_router(module.router)
    app.include_router(api)
    from services.web import pages  # the server-rendered leaderboard pages and their static files

    pages.install(app)
    from services.api.routers import metrics  # GET /metrics (Prometheus)

    metrics.install(app)

    return app


def create_metrics_app(settings: Settings | None = None) -> FastAPI:
    """``/metrics`` alone, unauthenticated, with every family (team storage included): what
    ``touchstone serve`` runs on ``TOUCHSTONE_METRICS_PORT``, an internal port for Prometheus that the
    reverse proxy must not publish."""
    settings = settings or get_settings()
    configure_logging("api", settings.log_level)
    app = FastAPI(title="Touchstone metrics", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.sessionmaker = sessionmaker(bind=get_engine(settings), expire_on_commit=False)
    app.state.metrics_internal = True
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_request_body_bytes)
    app.add_middleware(SecurityHeadersMiddleware)
    from services.api.routers import metrics

    metrics.install(app)
    return app
