"""Fixtures shared by the whole suite: access to the real components (Docker engine, PostgreSQL,
Redis, the local base image, chromium).

Nothing that CI can run may be skipped silently: scripts/test.sh sets TOUCHSTONE_REQUIRE_ALL=1, and
then a missing component *fails* the tests that need it instead of skipping them. A developer running
bare `pytest` without the servers gets skips that name the missing component.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest


def require(component: str, why: str) -> None:
    """Fail (under TOUCHSTONE_REQUIRE_ALL=1) or skip, naming the missing component and the fix."""
    message = f"{component} is not available ({why}); run the suite through scripts/test.sh, which starts it"
    if os.environ.get("TOUCHSTONE_REQUIRE_ALL") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def docker_client():
    """A docker SDK client talking to the real local engine."""
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no engine"
        require("the Docker engine", str(exc))
    return client


@pytest.fixture(scope="session")
def base_image(docker_client) -> str:
    """Name of the local base image (scripts/build-base-image.sh) the example algorithms build FROM."""
    name = os.environ.get("TOUCHSTONE_BASE_IMAGE", "touchstone/base:bookworm")
    try:
        docker_client.images.get(name)
    except Exception as exc:  # noqa: BLE001
        require(f"the base image {name}", f"{exc}; build it with scripts/build-base-image.sh")
    return name


def _server_url(component: str, variable: str, probe: Callable[[str], object]) -> str:
    """The URL in environment variable ``variable`` of a server that ``probe(url)`` reaches; else
    :func:`require` fails or skips, naming ``component``."""
    url = os.environ.get(variable)
    if not url:
        require(component, f"{variable} is not set")
    try:
        probe(url)
    except Exception as exc:  # noqa: BLE001
        require(component, str(exc))
    return url


def _ping_postgres(url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
    engine.dispose()


def _ping_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url, socket_timeout=2).ping()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """SQLAlchemy URL of a real PostgreSQL database reserved for tests."""
    return _server_url("PostgreSQL", "TOUCHSTONE_TEST_POSTGRES_URL", _ping_postgres)


@pytest.fixture(scope="session")
def new_postgres_database(postgres_url) -> Callable[[str], contextlib.AbstractContextManager[str]]:
    """``with new_postgres_database("prefix") as url:`` a fresh database of its own on the test
    server (isolated from other tests and from concurrent runs), dropped afterwards."""

    @contextlib.contextmanager
    def fresh(prefix: str) -> Iterator[str]:
        import sqlalchemy as sa

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield sa.engine.make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
        finally:
            from services.db.session import dispose_engines

            dispose_engines()
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

    return fresh


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a real Redis server reserved for tests."""
    return _server_url("Redis", "TOUCHSTONE_TEST_REDIS_URL", _ping_redis)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Path of Debian's headless chromium."""
    path = shutil.which("chromium")
    if not path:
        require("chromium", "Debian package `chromium` is not installed")
    try:
        subprocess.run([path, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as exc:  # noqa: BLE001
        require("chromium", str(exc))
    return path


#: headless chromium without a sandbox, GPU, network chatter or first-run pages
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def run_chromium(chromium_path: str, tmp_path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Headless chromium with ``args`` (``--dump-dom URL``, ``--screenshot=...``) and a profile of
    its own under ``tmp_path``; its output captured."""
    from pathlib import Path

    profile = Path(tmp_path) / "profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run([chromium_path, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory):
    """A SQLite file migrated to head once per session; each test starts from a copy of it."""
    from services.db import migrate

    path = tmp_path_factory.mktemp("migrated") / "touchstone.db"
    migrate.upgrade("head", f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_session(tmp_path):
    """A session on a fresh SQLite database migrated to head (objects stay usable after commit)."""
    from sqlalchemy.orm import Session

    from services.db import migrate
    from services.db.session import create_db_engine

    url = f"sqlite:///{tmp_path / 'unit.db'}"
    migrate.upgrade("head", url)
    engine = create_db_engine(url)
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


@contextlib.contextmanager
def served_app(database_url: str, data_dir, log_path=None, start_s: float = 180) -> Iterator[str]:
    """``with served_app(url, data_dir) as base:`` the API and pages in a real uvicorn process on
    that database and data folder (a free local port; up to ``start_s`` to answer /api/v1/health:
    the machine may be busy); its output to ``log_path`` when given. Stopped afterwards."""
    import socket
    import sys
    import time
    from pathlib import Path

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TOUCHSTONE_DATABASE_URL": str(database_url), "TOUCHSTONE_DATA_DIR": str(data_dir)}
    log = open(log_path, "wb") if log_path else None
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.api.app:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=Path(__file__).resolve().parents[1], env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_s
    try:
        while True:
            try:
                if httpx.get(f"{base}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                output = Path(log_path).read_text()[-2000:] if log_path else ""
                pytest.fail(f"uvicorn did not start within {start_s:.0f} s: {output}")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        if log:
            log.close()
