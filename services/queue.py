"""The one seam between the service and the workers: work is sent to Celery by task *name*, so
``services`` never imports ``worker`` (the worker registers ``touchstone.validate`` and friends).

Tests replace :func:`send_task` (or :func:`enqueue_validation`) with a fake.
"""

from __future__ import annotations

import threading
from typing import Any

from services.config import get_settings

VALIDATE_TASK = "touchstone.validate"
CPU_QUEUE = "cpu"

_client = None
_client_lock = threading.Lock()


def celery_client():
    """A Celery app used only as a producer (lazily created, one per process)."""
    global _client
    with _client_lock:
        if _client is None:
            import celery

            settings = get_settings()
            app = celery.Celery("touchstone-api", broker=settings.broker_url, backend=settings.result_backend)
            app.conf.broker_transport_options = settings.broker_transport_options()
            app.conf.task_serializer = "json"
            _client = app
        return _client


def reset_client() -> None:
    """Forget the client (after the settings changed)."""
    global _client
    with _client_lock:
        _client = None


def send_task(name: str, args: list[Any], queue: str) -> Any:
    return celery_client().send_task(name, args=args, queue=queue)


def enqueue_validation(submission_id: int) -> Any:
    """Ask a CPU worker to validate the submission's image (then it enqueues inference itself)."""
    return send_task(VALIDATE_TASK, args=[submission_id], queue=CPU_QUEUE)
