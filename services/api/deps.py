"""Dependencies: the database session, the caller (Bearer token) and role checks.

401: no token, or a token that is unknown/revoked. 403: a valid token whose role may not do this.
404 (in routers): a resource that exists but is not visible to the caller is reported as missing,
so that other teams' submissions do not even reveal their existence.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

from fastapi import Depends, Request
import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.api.errors import ApiError
from services.config import Settings
from services.db.accounts import lookup_token
from services.db.base import utcnow
from services.db.enums import Role
from services.db.models import User
from services.db.session import request_session

#: last_used_at is written at most this often per token (keeps reads write-free)
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
BEARER_HINT = {"WWW-Authenticate": "Bearer"}


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    yield from request_session(request)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            "malformed Authorization header; send 'Authorization: Bearer <token>'", 401, headers=BEARER_HINT
        )
    return token.strip()


def optional_user(request: Request, db: Session = Depends(get_db)) -> User | None:
    """The caller, or None without a token. A bad token is still a 401 (never silently anonymous)."""
    plain = _bearer(request)
    if plain is None:
        return None
    token = lookup_token(db, plain)
    if token is None or not token.user.is_active:
        raise ApiError("invalid or revoked token; ask an organizer for a new one", 401, headers=BEARER_HINT)
    now = utcnow()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        token.last_used_at = now
        try:
            db.commit()  # a short write of its own, never mixed into the request's transaction
        except sa.exc.OperationalError:
            # bookkeeping only: a database busy with a long write (SQLite's one write lock held by
            # a statistics step) must not fail the request itself; the next request stamps it
            db.rollback()
    return token.user


def current_user(user: User | None = Depends(optional_user)) -> User:
    if user is None:
        raise ApiError("authentication required; send 'Authorization: Bearer <token>'", 401, headers=BEARER_HINT)
    return user


def require_role(*roles: Role) -> Callable[..., User]:
    """Dependency factory: the caller must have one of ``roles`` (403 otherwise)."""
    allowed = {Role(r) for r in roles}

    def dependency(user: User = Depends(current_user)) -> User:
        if user.role not in allowed:
            names = " or ".join(sorted(r.value for r in allowed))
            raise ApiError(f"this needs the {names} role; you are {user.role.value}", 403)
        return user

    return dependency


require_organizer = require_role(Role.organizer)
