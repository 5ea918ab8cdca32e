"""Fixtures of the service tests: a migrated database on SQLite or on a fresh PostgreSQL database,
the API app on it, users of every role, a small test set, and docker-save-like tarballs."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from services import queue
from services.api.app import create_app
from services.config import Settings
from services.db import migrate
from services.db.accounts import create_user
from services.db.session import create_db_engine
from services.db.testsets import import_testset

REPO = Path(__file__).resolve().parents[3]


# --- databases -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_fresh_url(new_postgres_database):
    """A PostgreSQL database created for this test run (dropped afterwards)."""
    with new_postgres_database("ts_services") as url:
        yield url


@pytest.fixture(scope="session")
def migrated_pg(pg_fresh_url):
    migrate.upgrade("head", pg_fresh_url)
    return pg_fresh_url


def _empty_all_tables(url: str) -> None:
    from services.db.models import Base

    engine = create_db_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
        if conn.dialect.name == "postgresql":
            existing = set(sa.inspect(conn).get_table_names())
            names = ", ".join(f'"{t}"' for t in existing if t != "alembic_version")
            conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        else:
            for table in tables:
                conn.execute(sa.text(f'DELETE FROM "{table}"'))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """A migrated, empty database: a fresh SQLite file, or the run's PostgreSQL database emptied."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db' / 'touchstone.db'}"
        migrate.upgrade("head", url)
        return url
    url = request.getfixturevalue("migrated_pg")
    _empty_all_tables(url)
    return url


@pytest.fixture
def settings(tmp_path, database_url) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        max_upload_bytes=1024 * 1024,
        default_quota_submissions=3,
        import_roots=[tmp_path / "testset"],  # where manifest_csv lies (POST /testsets is confined to these)
        allowed_registries=["registry.example.org"],  # image_ref submissions name this (nothing is pulled here)
    )


@pytest.fixture
def sent_tasks(monkeypatch):
    """Replaces the Celery producer: records (name, args, queue) of every task sent."""
    sent: list[tuple[str, list, str]] = []
    monkeypatch.setattr(queue, "send_task", lambda name, args, queue: sent.append((name, list(args), queue)))
    return sent


@pytest.fixture
def app(settings, sent_tasks):
    return create_app(settings)


@pytest.fixture
def client(app):
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


# --- content ---------------------------------------------------------------------------------------
def build_image_tar(
    images: int = 1, layer_bytes: int = 1024, extra_members: list[tuple[str, bytes]] | None = None, tag: str = "x"
) -> bytes:
    """Bytes of a minimal `docker save`-like tarball with ``images`` images (unique by ``tag``)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        manifest = []

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        for i in range(images):
            config = f"config{i}.json"
            layer = f"layer{i}/layer.tar"
            add(config, json.dumps({"architecture": "amd64", "tag": tag, "i": i}).encode())
            add(layer, (tag.encode() * layer_bytes)[:layer_bytes])
            manifest.append({"Config": config, "RepoTags": [f"algo{i}:{tag}"], "Layers": [layer]})
        for name, data in extra_members or []:
            add(name, data)
        add("manifest.json", json.dumps(manifest).encode())
    return buffer.getvalue()


@pytest.fixture
def image_tar():
    return build_image_tar


@pytest.fixture
def manifest_csv(tmp_path) -> Path:
    """A 4-case manifest (2 hospitals, 1 public-sample case) with tiny placeholder files."""
    root = tmp_path / "testset"
    rows = ["case_id,image,labels,hospital,age,sex,race,manufacturer,scanner,contrast_phase,diagnosis,public_sample,slice_mm"]
    for i, hospital in enumerate(["A", "A", "B", "B"]):
        case = root / f"case{i}"
        (case / "segmentations").mkdir(parents=True)
        (case / "ct.nii.gz").write_bytes(f"ct{i}".encode())
        (case / "segmentations" / "liver.nii.gz").write_bytes(f"liver{i}".encode())
        rows.append(
            f'case{i},case{i}/ct.nii.gz,case{i}/segmentations,{hospital},{50 + i},{"F" if i % 2 else "M"},,GE,Revolution,'
            f'portal,healthy,{"true" if i == 0 else "false"},{i + 1}'
        )
    path = root / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def world(settings, manifest_csv):
    """Users of every role (two inventor teams), a test set and an algorithm per team.

    Returns a dict of bearer headers and ids.
    """
    from sqlalchemy.orm import Session

    from services.db.models import Algorithm, Team

    engine = create_db_engine(str(settings.database_url), poolclass=sa.pool.NullPool)
    tokens = {}
    with Session(engine) as session:
        for name, role, team in [
            ("org", "organizer", None),
            ("inv_a", "inventor", "team-a"),
            ("inv_a2", "inventor", "team-a"),
            ("inv_b", "inventor", "team-b"),
            ("ana", "analyst", None),
        ]:
            _, tokens[name] = create_user(session, name, role, team)
        testset = import_testset(session, "ts1", manifest_csv, settings=settings)
        testset.quota_submissions = 3
        for team_name in ("team-a", "team-b"):
            team = session.scalar(sa.select(Team).where(Team.name == team_name))
            session.add(Algorithm(team_id=team.id, name=f"algo-{team_name[-1]}"))
        session.commit()
        testset_id = testset.id
    engine.dispose()
    headers = {name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()}
    return {"headers": headers, "tokens": tokens, "testset_id": testset_id, "settings": settings}


def score_two_organs(session, submission_id: int, cases, base: float) -> None:
    """Scores of liver and spleen on every case (DSC ``base - case.id / 100``, NSD ``base``), then
    the leaderboard statistics stored by the real entry point, as ``finalize`` does after scoring."""
    from services.db.models import Score
    from services.leaderboard import on_submission_scored

    for case in cases:
        for organ in ("liver", "spleen"):
            session.add(Score(submission_id=submission_id, case_id=case.id, organ=organ, protocol_key="touchstone@1",
                              dsc=base - case.id * 0.01, nsd=base, status="ok"))
    session.flush()
    on_submission_scored(session, submission_id)


def multipart(fields: dict[str, str], image: bytes | None = None) -> dict:
    files: dict = {k: (None, v) for k, v in fields.items()}
    if image is not None:
        files["image"] = ("image.tar", image, "application/x-tar")
    return {"files": files}


@pytest.fixture
def form():
    return multipart


# --- a real server ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(settings):
    """The API in a real uvicorn process on the test's database; yields (base_url, Popen)."""
    port = _free_port()
    env = {
        **os.environ,
        "TOUCHSTONE_DATA_DIR": str(settings.data_dir),
        "TOUCHSTONE_DATABASE_URL": str(settings.database_url),
        "TOUCHSTONE_MAX_UPLOAD_BYTES": str(settings.max_upload_bytes),
        "TOUCHSTONE_LOG_LEVEL": "WARNING",
        "TOUCHSTONE_IMPORT_ROOTS": ",".join(str(root) for root in settings.import_roots),
        "TOUCHSTONE_ALLOWED_REGISTRIES": json.dumps(settings.allowed_registries),
        "TOUCHSTONE_MAX_REQUEST_BODY_BYTES": str(settings.max_request_body_bytes),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.api.app:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/api/v1/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("the API server did not start within 60 s")
    yield base, process
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
