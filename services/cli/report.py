"""``touchstone report TESTSET --out report.html [--pdf]``: the self-contained benchmark report
(:mod:`services.report`) of the database of the settings, read through the functions the API uses.
``--scope all`` (unpublished results, no small-cell suppression) is the organizers' view, as for
``touchstone leaderboard``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

err = Console(stderr=True, soft_wrap=True)  # paths and messages unbroken, whatever the terminal width


def report_command(
    testset: str = typer.Argument(..., help="test set name"),
    out: Path = typer.Option(..., "--out", help="the HTML file to write (with --pdf also the PDF beside it, .pdf)"),
    pdf: bool = typer.Option(False, "--pdf", help="also print the report to PDF with headless Chromium"),
    scope: str = typer.Option("published", help="published | all (organizers: unpublished results, no suppression)"),
    organ: list[str] = typer.Option([], "--organ", help="sections of these organs only (repeat; 'average' too); "
                                    "default: the average and every organ"),
    metric: list[str] = typer.Option([], "--metric", help="sections of these metrics only (repeat); default: all"),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="a protocol version of the test set, "
                                           "NAME@VERSION (default: its current one)"),
) -> None:
    """Write the benchmark report: rankings with all methods, box plots, ranking heatmaps, blob plots,
    significance maps, ranking robustness, per-hospital and per-subgroup results, efficiency."""
    from services import report
    from services.db.session import session_scope
    from services.leaderboard import queries

    if out.exists() and out.is_dir():
        err.print(f"[red]error:[/red] --out {out} is a folder; name the HTML file to write, e.g. {out}/report.html")
        raise typer.Exit(1)
    if not out.parent.exists():
        err.print(f"[red]error:[/red] the folder {out.parent} does not exist; create it or choose another --out")
        raise typer.Exit(1)

    def progress(done: int, total: int, what: str) -> None:
        err.print(f"[{done}/{total}] {what}")

    try:
        with session_scope() as session:
            ts = queries.get_testset(session, testset, protocol)
            html = report.build_report(session, ts, scope=scope, organs=organ or None, metrics=metric or None,
                                       progress=progress)
    except (queries.LeaderboardNotFound, queries.LeaderboardQueryError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    out.write_text(html, encoding="utf-8")
    err.print(f"wrote {out} ({len(html.encode()) / 1e6:.1f} MB)")
    if pdf:
        target = out.with_suffix(".pdf")
        try:
            report.write_pdf(html, target)
        except report.ReportError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
        err.print(f"wrote {target}")


def register(app: typer.Typer) -> None:
    """Add ``touchstone report`` to the `touchstone` app."""
    app.command("report")(report_command)
