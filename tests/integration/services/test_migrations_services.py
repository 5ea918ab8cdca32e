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
