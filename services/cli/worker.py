"""``touchstone worker``: start the Celery workers of this machine.

Celery is started by module path (``python -m celery -A worker.app worker``), so ``services`` never
imports ``worker``. One container at a time per GPU: every GPU gets its own worker process on the
``gpu`` queue with ``--concurrency 1`` and ``TOUCHSTONE_WORKER_GPUS=<id>`` (the runs of that
process get that device through the RunSpec's device ids); without GPUs one ``gpu``-queue worker
runs one container at a time on the CPU. The ``cpu`` queue (validation bookkeeping, scoring,
finalize, the reaper) gets one worker with ``--concurrency N`` and, unless ``--no-beat``, the
embedded beat that runs ``touchstone.reap`` periodically.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

CELERY_APP = "worker.app"
QUEUES = ("gpu", "cpu")


@dataclass
class WorkerCommand:
    """One Celery worker process to start: its argv and the environment variables it adds."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def celery_commands(queues: list[str], gpus: list[str], concurrency: int, beat: bool = True,
                    loglevel: str = "INFO", data_dir: Path | None = None, name: str = "") -> list[WorkerCommand]:
    """The worker processes ``touchstone worker`` starts (also used by the tests). Celery node
    names are ``<queue tag>@<host>``, or ``<name>-<queue tag>@<host>`` with ``name`` (several
    ``touchstone worker`` processes on one machine each need their own)."""
    prefix = f"{name}-" if name else ""
    unknown = [q for q in queues if q not in QUEUES]
    if unknown or not queues:
        raise ValueError(f"unknown queue(s) {unknown or queues}; choose from {', '.join(QUEUES)}")
    base = [sys.executable, "-m", "celery", "-A", CELERY_APP, "worker", f"--loglevel={loglevel}",
            "--without-gossip", "--without-mingle", "--prefetch-multiplier=1"]
    commands: list[WorkerCommand] = []
    if "gpu" in queues:
        for gpu in gpus or [""]:
            tag = f"gpu{gpu}" if gpu else "gpu"
            commands.append(WorkerCommand(
                name=tag,
                argv=base + ["-Q", "gpu", "--concurrency=1", "-n", f"{prefix}{tag}@%h"],
                env={"TOUCHSTONE_WORKER_GPUS": gpu, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
            ))
    if "cpu" in queues:
        argv = base + ["-Q", "cpu", f"--concurrency={concurrency}", "-n", f"{prefix}cpu@%h"]
        if beat:
            schedule = Path(data_dir or ".") / "celerybeat-schedule"
            argv += ["--beat", f"--schedule={schedule}"]
        commands.append(WorkerCommand(name="cpu", argv=argv))
    return commands


def _run(commands: list[WorkerCommand]) -> int:
    """Start every process, forward SIGINT/SIGTERM to them, stop all when one exits."""
    processes: list[subprocess.Popen] = []
    for command in commands:
        env = {**os.environ, **command.env}
        processes.append(subprocess.Popen(command.argv, env=env))
        typer.echo(f"started {command.name} worker (pid {processes[-1].pid}): {' '.join(command.argv[2:])}")

    def forward(signum, _frame) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    code = 0
    while processes:
        for process in list(processes):
            status = process.poll()
            if status is not None:
                processes.remove(process)
                code = code or status
                forward(signal.SIGTERM, None)  # one gone: take the others down with it
        time.sleep(0.5)
    return code


def register(app: typer.Typer) -> None:
    """Add ``touchstone worker`` to the `touchstone` app."""

    @app.command("worker")
    def worker(
        queues: str = typer.Option("gpu,cpu", "--queues", "-Q", help="comma-separated queues: gpu, cpu"),
        gpus: str = typer.Option("", "--gpus", help="GPU ids, one container at a time on each (e.g. 0,1)"),
        concurrency: int = typer.Option(0, "--concurrency", "-c", min=0,
                                        help="processes of the cpu queue (0: one per core)"),
        beat: bool = typer.Option(True, "--beat/--no-beat", help="run the periodic reaper with the cpu worker"),
        loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
        name: str = typer.Option("", "--name", help="node name prefix, distinct per `touchstone worker` on one "
                                                    "machine (Celery node <name>-gpu@host)"),
    ) -> None:
        """Start Celery workers for the gpu (container runs) and cpu (scoring, bookkeeping) queues."""
        from services.config import get_settings

        settings = get_settings()
        settings.ensure_dirs()
        settings.broker_transport_options()  # the filesystem broker's folders
        try:
            commands = celery_commands(
                [q.strip() for q in queues.split(",") if q.strip()],
                [g.strip() for g in gpus.split(",") if g.strip()],
                concurrency or (os.cpu_count() or 1), beat, loglevel.upper(), Path(settings.data_dir), name,
            )
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        raise typer.Exit(_run(commands))
