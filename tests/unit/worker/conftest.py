"""Fixtures of the worker's unit tests."""

from __future__ import annotations

import pytest

#: the runtimes installed by ``tasks_env["use_runtime"]``; ``WorkerSettings.runtime`` points at
#: :func:`installed_runtime` during a test, so the tasks get theirs through the setting
_installed: list = []


def installed_runtime():
    """The runtime the running test installed (the factory ``WorkerSettings.runtime`` names)."""
    if not _installed:
        raise AssertionError("this test runs a task without a runtime: call tasks_env['use_runtime'](...) first")
    return _installed[-1]


@pytest.fixture
def tasks_env(tmp_path, monkeypatch):
    """A data folder with a migrated SQLite database that the tasks' settings point at, the tasks'
    ``apply_async`` recorded instead of sent, and the container runtime chosen through
    ``WorkerSettings.runtime``: yields ``{"data": folder, "sent": [(task, args)], "use_runtime": f}``
    where ``f(runtime)`` makes ``runtime`` the one every task gets. One registry is configured
    (``registry.example.org``) for image references."""
    from services.config import get_settings
    from services.db import migrate
    from services.db.session import dispose_engines
    from worker import finalize, inference, reaper, runs, scoring, validation
    from worker.app import worker_settings

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
    for task in (validation.validate, validation.validate_run, inference.infer_shard, finalize.finalize,
                 scoring.score, reaper.reap):
        monkeypatch.setattr(task, "apply_async", lambda args=None, _n=task.name, **kw: sent.append((_n, args)))
    monkeypatch.setattr(worker_settings(), "runtime", f"{__name__}:installed_runtime")
    runs.runtime_from.cache_clear()

    def use_runtime(runtime):
        _installed.append(runtime)
        runs.runtime_from.cache_clear()
        return runtime

    yield {"data": data, "sent": sent, "use_runtime": use_runtime}
    _installed.clear()
    runs.runtime_from.cache_clear()
    get_settings.cache_clear()
    dispose_engines()
