"""Observability: structured logs for every process, and the Prometheus metrics the API serves.

Logs
----
:func:`configure_logging` is the one place logging is set up (the API in ``create_app``, the
Celery workers through the ``setup_logging`` signal, the demo). Every record -- Touchstone's own
``logging.getLogger("touchstone...")`` calls, uvicorn's, Celery's -- goes through structlog's
``ProcessorFormatter`` and comes out as one line with a UTC timestamp, the level, the logger, the
service (``api``, ``worker``, ...) and the event:

- ``TOUCHSTONE_LOG_FORMAT=keyvalue`` (default): ``timestamp=... level=info service=api event=...``
- ``TOUCHSTONE_LOG_FORMAT=json``: one JSON object per line (what a log shipper wants; the compose
  stack sets it)
- ``TOUCHSTONE_LOG_FORMAT=console``: structlog's coloured developer output

Metrics
-------
:class:`TouchstoneCollector` reads the database (and the broker) *at scrape time*, so the numbers
are true for the whole deployment whichever process serves ``/metrics``, and nothing has to be
counted in memory by the workers. Families (all gauges unless noted):

==================================  =========================================================
``touchstone_submissions``          submissions by ``state`` (every state, zeros included)
``touchstone_shards``               shards by ``state``
``touchstone_running_containers``   shards in state ``running`` (one container each)
``touchstone_case_runs_total``      counter: cases ever run (CaseRun rows); use ``rate()``
``touchstone_cases_per_minute``     CaseRuns recorded in the last ``window`` minutes / window
``touchstone_failed_submissions``   failed submissions by ``reason``: the stored ``failure_code``
                                    (:class:`services.db.enums.FailureCode`; ``unknown`` if none)
``touchstone_failed_shards``        failed shards by ``reason`` (their stored ``failure_code``)
``touchstone_queue_depth``          messages waiting per ``queue`` (Redis ``LLEN`` over kombu's
                                    priority lists; the filesystem broker: its message files)
``touchstone_queue_unacked``        Redis only: messages taken by a worker but not yet acknowledged
``touchstone_scrape_errors``        parts of this scrape that could not be read, by ``part``
``touchstone_team_storage_bytes``   bytes a ``team``'s submissions hold (SUM of
                                    ``submissions.storage_bytes``); organizers' scrapes and the
                                    internal metrics port only (it names teams)
==================================  =========================================================

A part that cannot be read (the broker is down) is left out of that scrape and counted in
``touchstone_scrape_errors``; the endpoint itself still answers 200.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

LOG_FORMATS = ("keyvalue", "json", "console")
#: the Celery queues (worker/app.py declares the same names; services never imports worker)
QUEUES = ("gpu", "cpu")
#: minutes over which cases_per_minute is averaged
RATE_WINDOW_MIN = 5.0

# --------------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------------
_configured: tuple[str, str, str] | None = None


def _renderer(fmt: str):
    import structlog

    if fmt == "json":
        return structlog.processors.JSONRenderer(sort_keys=False)
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    return structlog.processors.KeyValueRenderer(
        key_order=["timestamp", "level", "service", "logger", "event"], drop_missing=True
    )


def configure_logging(service: str, level: str | int | None = None, fmt: str | None = None,
                      stream=None) -> None:
    """Route every logger of this process through structlog, one line per record.

    ``service`` names the process kind in every line; ``level`` defaults to
    ``TOUCHSTONE_LOG_LEVEL`` (INFO); ``fmt`` to ``TOUCHSTONE_LOG_FORMAT`` (keyvalue). Idempotent:
    calling it again with the same arguments changes nothing. uvicorn's and Celery's own handlers
    are removed so their records take the same path.
    """
    global _configured
    import structlog

    level = level or os.environ.get("TOUCHSTONE_LOG_LEVEL", "INFO")
    fmt = (fmt or os.environ.get("TOUCHSTONE_LOG_FORMAT", "keyvalue")).lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; TOUCHSTONE_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
    level_name = logging.getLevelName(level) if isinstance(level, int) else str(level).upper()
    key = (service, level_name, fmt)
    if _configured == key and stream is None:
        return

    def add_service(_logger, _method, event_dict):
        event_dict.setdefault("service", service)
        return event_dict

    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_service,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _renderer(fmt),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name("touchstone")
    root = logging.getLogger()
    for old in list(root.handlers):  # ours from an earlier call; foreign ones (pytest's) stay
        if old.get_name() == "touchstone":
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_name)
    # uvicorn (dictConfig) and celery install handlers of their own: send them through ours
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.worker"):
        lg = logging.getLogger(name)
        for old in list(lg.handlers):
            lg.removeHandler(old)
        lg.propagate = True
    _configured = key if stream is None else None


def get_logger(name: str = "touchstone", **bound):
    """A structlog logger (``log.info("event", key=value)``) rendered by :func:`configure_logging`."""
    import structlog

    return structlog.get_logger(name, **bound)


# --------------------------------------------------------------------------------------------------
# queue depth
# --------------------------------------------------------------------------------------------------
#: kombu's Redis transport keeps a queue's messages in ``<queue>`` and, for priorities 3, 6, 9, in
#: ``<queue>\x06\x16<priority>`` (kombu.transport.redis: PRIORITY_STEPS, Channel.sep)
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
REDIS_PRIORITY_SEP = "\x06\x16"


def redis_queue_depths(url: str, queues: Iterable[str] = QUEUES) -> tuple[dict[str, int], int]:
    """(messages waiting per queue, messages delivered but unacknowledged) of a Redis broker."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        depths = {}
        for queue in queues:
            keys = [queue if p == 0 else f"{queue}{REDIS_PRIORITY_SEP}{p}" for p in REDIS_PRIORITY_STEPS]
            with client.pipeline() as pipe:
                for key in keys:
                    pipe.llen(key)
                depths[queue] = int(sum(pipe.execute()))
        unacked = int(client.hlen("unacked"))
    finally:
        client.close()
    return depths, unacked


def filesystem_queue_depths(messages_dir: Path, queues: Iterable[str] = QUEUES) -> dict[str, int]:
    """Messages waiting per queue of kombu's filesystem transport: one file
    ``<ms>_<uuid>.<queue>.msg`` per message in the shared folder (a worker removes it on taking it)."""
    depths = {q: 0 for q in queues}
    if not messages_dir.is_dir():
        return depths
    with os.scandir(messages_dir) as entries:
        for entry in entries:
            name = entry.name
            if not name.endswith(".msg"):
                continue
            queue = name.partition(".")[2][: -len(".msg")]
            if queue in depths:
                depths[queue] += 1
    return depths


# --------------------------------------------------------------------------------------------------
# the collector
# --------------------------------------------------------------------------------------------------
class TouchstoneCollector:
    """A prometheus_client custom collector: every ``collect()`` reads the database and the broker."""

    def __init__(self, sessionmaker: Callable, settings, *, window_min: float = RATE_WINDOW_MIN,
                 now: Callable[[], dt.datetime] | None = None, team_metrics: bool = True):
        self.sessionmaker = sessionmaker
        self.team_metrics = team_metrics
        self.settings = settings
        self.window_min = window_min
        self._now = now or (lambda: dt.datetime.now(dt.timezone.utc))
        self._log = logging.getLogger("touchstone.metrics")

    def describe(self):  # registering must not run a scrape
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        errors = GaugeMetricFamily("touchstone_scrape_errors", "Parts of this scrape that could not be read.",
                                   labels=["part"])
        try:
            yield from self._database_metrics(GaugeMetricFamily, CounterMetricFamily)
            errors.add_metric(["database"], 0)
        except Exception as exc:  # noqa: BLE001 - a scrape must answer; the error is counted and logged
            self._log.warning("metrics: database not readable: %s", exc)
            errors.add_metric(["database"], 1)
        try:
            yield from self._queue_metrics(GaugeMetricFamily)
            errors.add_metric(["broker"], 0)
        except Exception as exc:  # noqa: BLE001
            self._log.warning("metrics: broker not readable: %s", exc)
            errors.add_metric(["broker"], 1)
        yield errors

    # -- database ----------------------------------------------------------------------------------
    def _database_metrics(self, Gauge, Counter):
        import sqlalchemy as sa

        from services.db.enums import ShardState, SubmissionState
        from services.db.models import CaseRun, Shard, Submission, Team

        with self.sessionmaker() as session:
            team_storage = []
            if self.team_metrics:
                from services.db.accounts import team_storage_bytes

                names = dict(session.execute(sa.select(Team.id, Team.name)).all())
                team_storage = sorted((names[tid], total) for tid, total in team_storage_bytes(session).items())
            by_state = dict(session.execute(
                sa.select(Submission.state, sa.func.count()).group_by(Submission.state)).all())
            shard_states = dict(session.execute(
                sa.select(Shard.state, sa.func.count()).group_by(Shard.state)).all())
            total_runs = session.scalar(sa.select(sa.func.count(CaseRun.id))) or 0
            since = self._now() - dt.timedelta(minutes=self.window_min)
            recent_runs = session.scalar(
                sa.select(sa.func.count(CaseRun.id)).where(CaseRun.created_at >= since)) or 0
            failed_subs = dict(session.execute(
                sa.select(Submission.failure_code, sa.func.count()).where(Submission.state == SubmissionState.failed)
                .group_by(Submission.failure_code)).all())
            failed_shards = dict(session.execute(
                sa.select(Shard.failure_code, sa.func.count()).where(Shard.state == ShardState.failed)
                .group_by(Shard.failure_code)).all())

        submissions = Gauge("touchstone_submissions", "Submissions by state.", labels=["state"])
        for state in SubmissionState:
            submissions.add_metric([state.value], by_state.get(state, 0))
        yield submissions
        shards = Gauge("touchstone_shards", "Shards (container runs over a slice of a test set) by state.",
                       labels=["state"])
        for state in ShardState:
            shards.add_metric([state.value], shard_states.get(state, 0))
        yield shards
        yield Gauge("touchstone_running_containers",
                    "Algorithm containers running now (shards in state running).",
                    value=shard_states.get(ShardState.running, 0))
        yield Counter("touchstone_case_runs", "Cases run by algorithm containers (CaseRun rows).", value=total_runs)
        yield Gauge("touchstone_cases_per_minute",
                    f"Cases run per minute, averaged over the last {self.window_min:g} minutes.",
                    value=recent_runs / self.window_min)
        for name, what, by_code in (("touchstone_failed_submissions", "Failed submissions", failed_subs),
                                    ("touchstone_failed_shards", "Failed shards", failed_shards)):
            family = Gauge(name, f"{what} by failure reason code.", labels=["reason"])
            counts: dict[str, int] = {}
            for code, n in by_code.items():  # the stored code: a bounded label, never free text
                label = code or "unknown"
                counts[label] = counts.get(label, 0) + n
            for code, count in sorted(counts.items()):
                family.add_metric([code], count)
            yield family
        if self.team_metrics:
            storage = Gauge("touchstone_team_storage_bytes",
                            "Bytes held by a team's submissions (image tarballs and outputs).", labels=["team"])
            for team, total in team_storage:
                storage.add_metric([team], int(total or 0))
            yield storage

    # -- broker ------------------------------------------------------------------------------------
    def _queue_metrics(self, Gauge):
        broker = str(self.settings.broker_url)
        depth = Gauge("touchstone_queue_depth", "Messages waiting in a Celery queue.", labels=["queue"])
        if broker.startswith(("redis://", "rediss://")):
            depths, unacked = redis_queue_depths(broker)
            for queue, n in depths.items():
                depth.add_metric([queue], n)
            yield depth
            yield Gauge("touchstone_queue_unacked",
                        "Messages delivered to a worker and not yet acknowledged (running tasks).", value=unacked)
        elif broker.startswith("filesystem://"):
            for queue, n in filesystem_queue_depths(Path(self.settings.broker_folder) / "messages").items():
                depth.add_metric([queue], n)
            yield depth
        # other brokers: no depth is exposed (not an error)


def make_registry(sessionmaker: Callable, settings, *, process_metrics: bool = True, team_metrics: bool = True):
    """A registry of its own (not prometheus_client's global one, so that several apps in one
    process -- the tests -- do not collide) with the Touchstone collector and process metrics.
    ``team_metrics=False``: without the families that name teams (the public scrape)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(TouchstoneCollector(sessionmaker, settings, team_metrics=team_metrics))
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry
