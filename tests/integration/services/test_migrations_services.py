"""Every Alembic revision goes up and down on SQLite and on a fresh PostgreSQL database, and the
migrated schema matches the SQLAlchemy models exactly (no model change without a migration)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from services.db import migrate
from services.db.models import Base


def _revisions() -> list[str]:
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    chain = [r.revision for r in script.walk_revisions()]  # head first
    assert len(script.get_heads()) == 1, "migrations must form one linear chain (one head)"
    return list(reversed(chain))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrate.db'}"
        return
    # a database of its own: the API tests' database is already at head
    import uuid

    base = request.getfixturevalue("postgres_url")
    name = f"ts_migrations_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    names = set(sa.inspect(engine).get_table_names())
    engine.dispose()
    return names


def _same_float(change) -> bool:
    """FLOAT and DOUBLE are one type on both databases (PostgreSQL float8, SQLite REAL)."""
    if isinstance(change, list) and len(change) == 1 and change[0][0] == "modify_type":
        old, new = change[0][-2], change[0][-1]
        return isinstance(old, sa.Float) and isinstance(new, sa.Float)
    return False


def test_each_revision_up_and_down(empty_url):
    revisions = _revisions()
    assert revisions[0] == "0001_initial"
    for revision in revisions:
        migrate.upgrade(revision, empty_url)
        assert migrate.current_revision(empty_url) == revision
    engine = sa.create_engine(empty_url)
    with engine.connect() as conn:
        diff = [d for d in compare_metadata(MigrationContext.configure(conn), Base.metadata) if not _same_float(d)]
    engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"
    assert set(Base.metadata.tables) <= _tables(empty_url)
    for revision in reversed(revisions[:-1]):
        migrate.downgrade(revision, empty_url)
        assert migrate.current_revision(empty_url) == revision
    migrate.downgrade("base", empty_url)
    assert _tables(empty_url) <= {"alembic_version"}
    migrate.upgrade("head", empty_url)  # and up again from nothing
    assert migrate.current_revision(empty_url) == revisions[-1]
    migrate.downgrade("base", empty_url)


def _insert_required(conn, table: str, row: dict) -> None:
    """Insert ``row`` into ``table`` as the schema stands at this revision, with a placeholder for
    every other NOT NULL column without a default (a row only the foreign keys need)."""
    import datetime as dt

    reflected = sa.Table(table, sa.MetaData(), autoload_with=conn)
    values = dict(row)
    for column in reflected.columns:
        if column.name in values or column.nullable or column.server_default is not None or column.primary_key:
            continue
        python_type = column.type.python_type
        values[column.name] = {int: 1, bool: False, float: 1.0, dt.datetime: dt.datetime(2026, 1, 1),
                               dict: {}, list: []}.get(python_type, f"{table}-{column.name}-{row.get('id')}")
    conn.execute(reflected.insert().values(**values))


def test_pairwise_tests_become_families_and_back(empty_url):
    """0011 packs the stored pairwise rows into one family per (test set, protocol, scope, organ,
    metric) in the order they were written; the downgrade unpacks them: nothing is lost either way."""
    from services.leaderboard.pairwise import unpack_family

    migrate.upgrade("0010_lesion_scores", empty_url)
    engine = sa.create_engine(empty_url)
    pairs = [(1, 2, 30, 12.5, 0.01, 0.04, True, 0.1), (2, 1, 30, 3.0, 0.99, 1.0, False, -0.1),
             (1, 3, 28, None, None, None, False, None)]
    with engine.begin() as conn:
        for table, row in (("testsets", {"id": 1}), ("teams", {"id": 1}), ("algorithms", {"id": 1, "team_id": 1}),
                           *(("submissions", {"id": i, "algorithm_id": 1, "testset_id": 1, "team_id": 1,
                                              "state": "published"}) for i in (1, 2, 3))):
            _insert_required(conn, table, row)
        for scope in ("published", "all"):
            for a, b, n, v, p, q, significant, d in pairs:
                conn.execute(sa.text(
                    "insert into pairwise_tests (testset_id, protocol_key, scope, organ, metric, submission_a_id, "
                    "submission_b_id, n_common, statistic, p_value, p_adjusted, significant, mean_difference, method) "
                    "values (1, 'touchstone@1', :scope, 'liver', 'dsc', :a, :b, :n, :v, :p, :q, :s, :d, 'wilcoxon')"),
                    {"scope": scope, "a": a, "b": b, "n": n, "v": v, "p": p, "q": q, "s": significant, "d": d})
    migrate.upgrade("0011_pairwise_families", empty_url)
    with engine.connect() as conn:
        families = conn.execute(sa.text("select scope, method, n_pairs, data from pairwise_families order by scope")).all()
    assert [(f.scope, f.method, f.n_pairs) for f in families] == [("all", "wilcoxon", 3), ("published", "wilcoxon", 3)]
    expected = [dict(zip(("a", "b", "n_common", "statistic", "p_value", "p_adjusted", "significant",
                          "mean_difference"), row)) for row in pairs]
    assert all(unpack_family(bytes(f.data)) == expected for f in families)
    migrate.downgrade("0010_lesion_scores", empty_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "select submission_a_id, submission_b_id, n_common, statistic, p_value, p_adjusted, significant, "
            "mean_difference from pairwise_tests where scope = 'all' order by id")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [tuple(p) for p in pairs]
