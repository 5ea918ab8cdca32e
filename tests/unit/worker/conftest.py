"""Fixtures of the worker's unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tasks_env(tmp_path, monkeypatch):
    """A data folder with a migrated SQLite database that the tasks' settings point at, and the
    tasks' ``apply_async`` recorded instead of sent: yields ``{"data": folder, "sent": [(task, args)]}``.
    One registry is configured (``registry.example.org``) for image references."""
    from services.config import get_settings
    from services.db import migrate
    from services.db.session import dispose_engines
    from worker import tasks

    data = tmp_path / "data"
    (data / "storage").mkdir(parents=True)
    url = f"sqlite:///{data / 'touchstone.db'}"
    monkeypatch.setenv("TOUCHSTONE_DATA_DIR", str(data))
    monkeypatch.setenv("TOUCHSTONE_DATABASE_URL", url)
    monkeypatch.setenv("TOUCHSTONE_ALLOWED_REGISTRIES", '["registry.example.org"]')
    get_settings.cache_clear()
    dispose_engines()
    migrate.upgrade("head", url)
    sent: list[tuple[str, list]] = []
    for task in (tasks.validate, tasks.validate_run, tasks.infer_shard, tasks.finalize, tasks.score):
        monkeypatch.setattr(task, "apply_async", lambda args=None, _n=task.name, **kw: sent.append((_n, args)))
    yield {"data": data, "sent": sent}
    tasks.set_runtime(None)
    get_settings.cache_clear()
    dispose_engines()
