"""The same storage, queries and streamed exports on a real PostgreSQL (a database of its own)."""

from __future__ import annotations

import csv
import io

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg_database(new_postgres_database):
    """A fresh database next to the test database, dropped afterwards."""
    with new_postgres_database("touchstone_lb") as url:
        yield url


def test_recompute_and_streamed_export_on_postgres(pg_database, tmp_path, request):
    build_world = request.getfixturevalue("world_builder")
    world = build_world(pg_database, tmp_path)
    from sqlalchemy.orm import Session

    from services import exports
    from services.db.models import Score, TestSet
    from services.db.session import create_db_engine
    from services.leaderboard import queries

    engine = create_db_engine(pg_database)
    with Session(engine) as session:
        ts = session.scalar(sa.select(TestSet).where(TestSet.name == world.testset))
        board = queries.leaderboard(session, ts, organ="spleen", scope="all")
        assert [e["label"] for e in board["entries"]][0] == "AlphaSeg"
        assert {e["submission_id"] for e in board["entries"]} == set(world.baseline_ids) | {world.alpha_id}
        published = queries.leaderboard(session, ts, organ="spleen")
        assert world.alpha_id not in {e["submission_id"] for e in published["entries"]}
        body = b"".join(exports.stream_csv(session, ts, "case", scope="all", chunk=500)).decode()
        rows = list(csv.DictReader(io.StringIO(body)))
        assert len(rows) == session.scalar(sa.select(sa.func.count(Score.id)))
    engine.dispose()
