"""Settings (derived defaults, environment) and the queue seam (task name, queue, no worker import)."""

from __future__ import annotations

import sys
from pathlib import Path

from services import queue
from services.config import Settings, get_settings


def test_defaults_live_under_the_data_dir(tmp_path):
    s = Settings(data_dir=tmp_path / "d")
    assert s.database_url == f"sqlite:///{tmp_path / 'd' / 'touchstone.db'}"
    assert s.result_backend == f"db+sqlite:///{tmp_path / 'd' / 'celery-results.db'}"
    assert s.storage_dir == tmp_path / "d" / "storage"
    assert s.broker_url == "filesystem://"
    options = s.broker_transport_options()
    assert options["data_folder_in"] == options["data_folder_out"]
    assert Path(options["data_folder_in"]).is_dir()


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("TOUCHSTONE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TOUCHSTONE_DATABASE_URL", "postgresql+psycopg://u:p@db/touchstone")
    monkeypatch.setenv("TOUCHSTONE_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("TOUCHSTONE_MAX_UPLOAD_BYTES", "1234")
    get_settings.cache_clear()
    try:
        s = get_settings()
        assert s.database_url.startswith("postgresql") and s.broker_url.startswith("redis")
        assert s.max_upload_bytes == 1234 and s.storage_dir == tmp_path / "storage"
        assert s.broker_transport_options() == {}
        assert get_settings() is s  # cached
    finally:
        get_settings.cache_clear()


def test_enqueue_validation_sends_the_task_by_name(monkeypatch):
    calls = []

    class FakeCelery:
        def send_task(self, name, args, queue):
            calls.append((name, args, queue))
            return "async-result"

    monkeypatch.setattr(queue, "celery_client", lambda: FakeCelery())
    assert queue.enqueue_validation(42) == "async-result"
    assert calls == [("touchstone.validate", [42], "cpu")]


def test_services_never_import_worker():
    """The API and the service CLI load without importing the worker package (one-way dependencies)."""
    import subprocess

    code = "import sys, services.api.app, services.cli.core, services.queue; print(sorted(m for m in sys.modules if m.split('.')[0] == 'worker'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3]).stdout.strip()
    assert out == "[]"
