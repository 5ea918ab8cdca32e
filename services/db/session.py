"""Engine and session factory from the settings.

SQLite: WAL journal (readers do not block the writer), foreign keys enforced, a busy timeout so
concurrent writers wait instead of failing. PostgreSQL: a pre-pinged connection pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import threading

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from services.config import Settings, get_settings

SQLITE_BUSY_TIMEOUT_S = 30


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_db_engine(url: str, **kwargs) -> Engine:
    """An engine for ``url`` with the per-dialect settings above."""
    if url.startswith("sqlite"):
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
    return sa.create_engine(url, **kwargs)


_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _engine_for(url: str) -> Engine:
    with _ENGINES_LOCK:
        engine = _ENGINES.get(url)
        if engine is None:
            engine = _ENGINES[url] = create_db_engine(url)
        return engine


def get_engine(settings: Settings | None = None) -> Engine:
    """The process-wide engine for the settings' database (one per URL)."""
    settings = settings or get_settings()
    if settings.is_sqlite:
        settings.ensure_dirs()
    return _engine_for(str(settings.database_url))


def get_sessionmaker(settings: Settings | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(settings), expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error (for the worker and the CLI)."""
    session = get_sessionmaker(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Close every pooled connection and forget the engines (tests, forked workers)."""
    with _ENGINES_LOCK:
        for engine in _ENGINES.values():
            engine.dispose()
        _ENGINES.clear()


def request_session(request) -> Iterator[Session]:
    """A session from the app's ``state.sessionmaker`` for one request, closed afterwards: the
    FastAPI dependency of the API routers (``services.api.deps.get_db``) and the pages."""
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        session.close()
