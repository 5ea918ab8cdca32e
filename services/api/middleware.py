"""Pure ASGI middleware of the API: bounded request bodies, rejected NUL bytes in the URL, and the
security headers every response carries.

- :class:`BodyLimitMiddleware`: a request body larger than ``settings.max_request_body_bytes``
  (default 1 MiB) is answered 413 -- at once when ``Content-Length`` says so (nothing is read),
  or as soon as a chunked/unknown-length body passes the limit while it is received. It runs
  before authentication, so anonymous requests are bounded too. The image upload
  (``POST /api/v1/submissions``) is exempt: it streams to disk under its own ``max_upload_bytes``.
- NUL characters in the path or the query string (``%00``) are answered 422: they would reach the
  database (PostgreSQL refuses them in text) and fail there.
- :class:`SecurityHeadersMiddleware`: ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
  ``Referrer-Policy: no-referrer`` and a Content-Security-Policy with ``frame-ancestors 'none'`` on
  every response (the interactive docs get a CSP that lets them load Swagger UI from its CDN).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UPLOAD_PATH = "/api/v1/submissions"
DOCS_PATHS = ("/docs", "/redoc")


def _inline_script_hashes() -> list[str]:
    """CSP hashes of the static inline ``<script>`` blocks of the server-rendered pages
    (services/web/templates); a block with template expressions cannot be hashed and is skipped."""
    folder = Path(__file__).resolve().parents[1] / "web" / "templates"
    hashes = []
    for template in sorted(folder.glob("*.html")) if folder.is_dir() else []:
        for body in re.findall(r"<script>(.*?)</script>", template.read_text(encoding="utf-8"), re.S):
            if "{{" in body or "{%" in body:
                continue
            digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode()
            hashes.append(f"'sha256-{digest}'")
    return hashes


def content_security_policy() -> str:
    """The CSP of the API and the pages: own origin only; the pages' inline SVG plots carry
    ``<style>`` elements and attributes (matplotlib), hence ``'unsafe-inline'`` for styles only."""
    scripts = " ".join(["'self'", *_inline_script_hashes()])
    return (f"default-src 'self'; script-src {scripts}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


#: /docs (Swagger UI) and /redoc load their bundles from jsdelivr and start them with an inline script
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
            "font-src 'self' https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com "
            "https://cdn.jsdelivr.net; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'")


def security_headers(path: str = "", csp: str | None = None) -> dict[str, str]:
    """The headers every response gets (also used by the 500 handler, which runs outside middleware)."""
    policy = DOCS_CSP if path.startswith(DOCS_PATHS) else (csp or content_security_policy())
    return {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Content-Security-Policy": policy,
    }


def _relative_location(value: bytes) -> bytes:
    """A redirect to this service as a path (``/leaderboards``), never ``http://<Host header>/...``:
    Starlette's trailing-slash redirect builds an absolute URL from the request's Host header,
    which a client (or a cache in between) could point anywhere."""
    text = value.decode("latin-1")
    if text.startswith(("http://", "https://")):
        rest = text.split("://", 1)[1]
        path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        return path.encode("latin-1")
    return value


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.csp = content_security_policy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                 for k, v in security_headers(scope.get("path", ""), self.csp).items()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, _relative_location(value)) if name.lower() == b"location" else (name, value)
                           for name, value in message.get("headers", [])]
                present = {name.lower() for name, _ in headers}
                headers.extend((k, v) for k, v in extra if k not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestBodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes the limit; rendered 413 by the HTTPException handler
    (FastAPI re-raises HTTPExceptions met while reading a body)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, body_limit_message(limit))


def body_limit_message(limit: int) -> str:
    return (f"request body too large: the limit is {limit} bytes (TOUCHSTONE_MAX_REQUEST_BODY_BYTES); "
            "send a smaller body (image tarballs go to POST /api/v1/submissions, which has its own limit)")


async def _send_json(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


def _has_nul(scope: Scope) -> bool:
    raw_path = scope.get("raw_path") or b""
    query = scope.get("query_string") or b""
    return ("\x00" in scope.get("path", "") or b"\x00" in raw_path or b"%00" in raw_path.lower()
            or b"\x00" in query or b"%00" in query.lower())


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = int(max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _has_nul(scope):
            await _send_json(send, 422, "invalid request: the URL contains a NUL character (%00); remove it")
            return
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == UPLOAD_PATH:
            await self.app(scope, receive, send)  # streamed to disk under max_upload_bytes (intake)
            return
        limit = self.limit
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, "invalid Content-Length header; send the body's size in bytes")
                    return
                if declared > limit:
                    await _send_json(send, 413, body_limit_message(limit))
                    return
        received = 0
        too_large = False
        started = False

        async def bounded_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                raise RequestBodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise RequestBodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except RequestBodyTooLarge:
            if started:
                raise
            await _send_json(send, 413, body_limit_message(limit))
