"""CLI commands of the evaluation package: `touchstone evaluate`, `touchstone phantoms`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `touchstone` app."""
