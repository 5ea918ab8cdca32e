"""The Celery application of the workers (``celery -A worker.app worker``).

Two queues (docs/execution.md):

- ``gpu``: container runs -- the public-sample run of validation and every shard of inference.
  A worker consuming ``gpu`` runs one task at a time (``--concurrency 1``, prefetch 1), pinned to
  its GPU(s) by ``TOUCHSTONE_WORKER_GPUS``: one container per GPU at a time.
- ``cpu``: bookkeeping -- image checks of validation, scoring, finalize, the reaper.

Delivery guarantees: ``task_acks_late`` (a message is acknowledged only after its task returned)
and ``task_reject_on_worker_lost`` (a pool process that dies mid-task puts the message back), so
a crashed run is redelivered; every task is idempotent (a redelivered shard skips the cases that
already have scores; scores are inserted with the UNIQUE key ignoring conflicts). Brokers:

- Redis in production (``TOUCHSTONE_BROKER_URL=redis://...``): unacknowledged messages are kept by
  Redis and restored after ``visibility_timeout`` if the worker that held them vanished; Redis must
  persist (``appendonly yes``) for queued work to survive a Redis restart.
- ``filesystem://`` in the embedded default (folders under ``data_dir/broker``): a message file is
  removed when a worker takes it, so a worker killed with SIGKILL loses its message; the
  ``touchstone.reap`` task (run every ``reap_interval_s`` by the embedded beat of
  ``touchstone worker``) re-enqueues shards whose heartbeat went stale. See docs/execution.md.

Results are not stored (``task_ignore_result``): the database is the record of everything.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from celery.signals import setup_logging, worker_process_init
from kombu import Queue
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.config import get_settings

GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"

#: the modules whose tasks a worker registers (``touchstone.<task>``; routes in :func:`make_app`)
TASK_MODULES = ["worker.validation", "worker.inference", "worker.scoring", "worker.finalize", "worker.reaper",
                "worker.rescoring"]


class WorkerSettings(BaseSettings):
    """Knobs of the execution layer (``TOUCHSTONE_WORKER_<FIELD>``); the service's settings say
    where the database, broker and storage are."""

    model_config = SettingsConfigDict(env_prefix="TOUCHSTONE_WORKER_", env_file=None, extra="ignore")
    # the fields are declarations of the same shape (a comment, a name, a default and its bounds):
    # `duplicates` pairs runs of them; each is its own setting

    #: the container runtime, a dotted path ``module:attribute`` to a
    #: :class:`worker.runtime.base.ContainerRuntime` class (or a callable without arguments returning
    #: one); made once per process by :func:`worker.runs.get_runtime`
    runtime: str = "worker.runtime.docker:DockerRuntime"
    #: GPU device ids this worker process may use ("0,1"); empty: no GPU (CPU-only runs)
    gpus: str = ""
    #: seconds of start-up allowance per container run on top of time_per_case_s x cases
    startup_s: float = Field(60.0, ge=0)
    #: CPUs per container run (CPU quota)
    container_cpus: float = Field(2.0, gt=0)
    #: largest uncompressed image accepted
    max_image_bytes: int = Field(40 * 2**30, gt=0)
    #: a running shard writes its heartbeat this often (seconds)
    heartbeat_s: float = Field(10.0, gt=0)
    #: a running shard whose heartbeat is older than this is presumed dead (seconds)
    stale_after_s: float = Field(120.0, gt=0)
    #: how often the embedded beat runs touchstone.reap (seconds)
    reap_interval_s: float = Field(60.0, gt=0)
    #: attempts of a shard before the submission fails
    max_attempts: int = Field(3, ge=1)
    #: cases per scoring task
    score_batch_size: int = Field(10, ge=1)
    #: Redis: seconds before an unacknowledged message is handed out again. Must exceed the
    #: longest shard run (a shorter one redelivers running shards; the duplicate then waits).
    visibility_timeout_s: float = Field(12 * 3600.0, gt=0)
    #: filesystem broker: seconds between polls of the message folder
    polling_interval_s: float = Field(0.1, gt=0)
    #: how often a running container's submission state is checked for cancellation (seconds)
    cancel_poll_s: float = Field(1.0, gt=0)
    #: output limits of every run, at any depth of /output: bytes, files and folders, folder levels
    output_bytes: int = Field(2 * 2**30, gt=0)
    output_files: int = Field(20_000, gt=0)
    output_depth: int = Field(6, gt=0)
    #: at the time limit: SIGTERM, then SIGKILL this many seconds later (whatever the container does)
    stop_grace_s: float = Field(2.0, ge=0)
    #: the container engine failed (restart, socket gone): retry the validation run after this many
    #: seconds, doubling up to 8x, at most ``engine_max_retries`` times before it fails (not
    #: counting against the team's quota)
    engine_retry_s: float = Field(10.0, gt=0)
    engine_max_retries: int = Field(30, ge=0)
    #: a validation nobody has claimed (its message lost, e.g. on the filesystem broker) for this
    #: long is sent again by the reaper (seconds)
    validation_requeue_s: float = Field(3600.0, gt=0)

    @property
    def gpu_ids(self) -> tuple[str, ...]:
        return tuple(g.strip() for g in self.gpus.split(",") if g.strip())


@lru_cache(maxsize=1)
def worker_settings() -> WorkerSettings:
    """The process-wide worker settings (read once from the environment)."""
    return WorkerSettings()


def make_app() -> Celery:
    settings = get_settings()
    wsettings = worker_settings()
    broker = str(settings.broker_url)
    # the task modules, one per step, in the order a submission passes them (docs/execution.md)
    app = Celery("touchstone", broker=broker, include=TASK_MODULES)
    transport_options = dict(settings.broker_transport_options())
    if broker.startswith("filesystem://"):
        transport_options["polling_interval"] = wsettings.polling_interval_s
    elif broker.startswith(("redis://", "rediss://")):
        transport_options["visibility_timeout"] = wsettings.visibility_timeout_s
    app.conf.update(
        broker_transport_options=transport_options,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_queues=(Queue(GPU_QUEUE), Queue(CPU_QUEUE)),
        task_default_queue=CPU_QUEUE,
        task_routes={
            "touchstone.validate_run": {"queue": GPU_QUEUE},
            "touchstone.infer_shard": {"queue": GPU_QUEUE},
            "touchstone.*": {"queue": CPU_QUEUE},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # the broker may go away (a Redis restart): keep reconnecting, and retry publishing
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 120, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0},
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        beat_schedule={
            "touchstone-reap": {"task": "touchstone.reap", "schedule": wsettings.reap_interval_s, "options": {"queue": CPU_QUEUE}},
            # the test sets' prediction retention (worker/rescoring.py): a cheap query when nothing is due
            "touchstone-reclaim-predictions": {"task": "touchstone.reclaim_predictions",
                                               "schedule": wsettings.reap_interval_s, "options": {"queue": CPU_QUEUE}},
        },
    )
    return app


app = make_app()


@worker_process_init.connect
def _fresh_connections(**_kwargs) -> None:
    """A forked pool process must not share the parent's database connections."""
    from services.db.session import dispose_engines

    dispose_engines()


@setup_logging.connect
def _structured_logs(loglevel=None, **_kwargs) -> None:
    """Celery's and the tasks' records go through the one structured-log setup (services/observability.py)."""
    from services.observability import configure_logging

    configure_logging("worker", loglevel or get_settings().log_level)
