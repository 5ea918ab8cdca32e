"""Every error leaves the API as JSON ``{"detail": ...}`` with a message a person can act on.

- ``HTTPException`` -> its status and detail;
- request validation -> 422 naming each bad field (``body.name: field required``);
- a database integrity error (a race lost on a unique key) -> 409;
- :class:`ApiError` subclasses raised by services -> their status;
- :class:`services.submissions.SubmissionError` (the submission domain layer) -> its ``status``
  hint (404 not found, 409 conflict, 413 storage cap, 422 invalid image, 429 quota, 500 statistics);
- anything else -> logged with a reference id, answered 500 with that id and no traceback.

:data:`ERROR_RESPONSES` documents these bodies (:class:`ErrorOut`) in the OpenAPI document for every
route, so that clients (and the schemathesis test) can rely on the shape of every answer.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("touchstone.api")


class ErrorOut(BaseModel):
    """Every error answer: one sentence saying what is wrong and what to do."""

    detail: str


def _error(description: str) -> dict:
    return {"model": ErrorOut, "description": description}


#: the error answers of any route (added to every route of the API, see services/api/app.py)
ERROR_RESPONSES: dict[int | str, dict] = {
    400: _error("Malformed request (a header or body that cannot be parsed)"),
    401: _error("No token, or an unknown or revoked token"),
    403: _error("The token's role may not do this"),
    404: _error("No such resource visible to the caller"),
    409: _error("Conflicts with a stored record"),
    413: _error("Request body too large"),
    422: _error("Invalid input (the message names each bad field)"),
    429: _error("Quota or rate limit reached"),
    503: _error("The database is busy or unavailable"),
}


class ApiError(Exception):
    status_code = 400

    def __init__(self, detail: str, status_code: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    from services.submissions import SubmissionError

    @app.exception_handler(SubmissionError)
    async def submission_error(_request: Request, exc: SubmissionError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(IntegrityError)
    async def integrity_error(_request: Request, exc: IntegrityError) -> JSONResponse:
        log.info("integrity error: %s", exc.orig)
        return JSONResponse(
            {"detail": "this conflicts with a stored record (a name or key that must be unique); reload and retry"},
            status_code=409,
        )

    @app.exception_handler(OperationalError)
    async def operational_error(_request: Request, exc: OperationalError) -> JSONResponse:
        reference = uuid.uuid4().hex[:12]
        log.error("database unavailable [%s]: %s", reference, exc)
        return JSONResponse(
            {"detail": f"the database is busy or unavailable; retry in a moment (reference {reference})"},
            status_code=503,
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette runs this handler outside every middleware: the security headers are added here
        from services.api.middleware import security_headers

        reference = uuid.uuid4().hex[:12]
        log.exception("unhandled error [%s] on %s %s", reference, request.method, request.url.path)
        return JSONResponse(
            {"detail": f"internal error; tell the organizers the reference {reference}"}, status_code=500,
            headers=security_headers(request.url.path),
        )
