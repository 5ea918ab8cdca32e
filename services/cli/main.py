"""The `touchstone` console script.

One Typer app; each area of the project registers its own commands from its own module, so the
modules stay independent (``evaluation`` never imports ``services``; ``services`` never imports
``worker`` -- ``touchstone worker`` starts Celery on the worker app by its module path).
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="touchstone",
    help="Touchstone: third-party benchmarking of 3D abdominal CT organ segmentation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# Each module exposes ``register(app: typer.Typer) -> None``.
_COMMAND_MODULES = (
    "evaluation.cli",  # evaluate, phantoms
    "services.cli.core",  # db, serve, users, testsets, submit, status
    "services.cli.worker",  # worker
    "services.cli.results",  # leaderboard, stats, export, results import-touchstone
    "services.cli.report",  # report
    "services.cli.demo",  # demo
    "services.cli.storage",  # storage report|reclaim, rescore, rescore-jobs
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
