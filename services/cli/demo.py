"""CLI commands (see services/cli/main.py)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `touchstone` app."""
