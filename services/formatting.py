"""Text of a number for tables and pages: the CLI's tables, the HTML report and the leaderboard pages."""

from __future__ import annotations

from typing import Any


def format_value(value: Any, digits: int = 4) -> str:
    """``–`` for a missing value, a float with ``digits`` decimals, anything else as ``str``."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
