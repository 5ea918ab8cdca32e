"""Results commands: ``touchstone leaderboard``, ``stats``, ``export`` and ``results import-touchstone``.

They read (and, for the import, write) the database of the settings (``TOUCHSTONE_DATABASE_URL``)
directly, through the same functions the API uses, so ``--format json`` prints exactly what the
corresponding API endpoint returns. ``--scope all`` (unpublished results) is the organizers' view;
any other scope applies small-cell suppression as the API does (``services.leaderboard.suppression``:
no statistic of a group, or of a whole test set, with fewer than ``min_group_size`` hidden cases).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from services.formatting import format_value

console = Console()
err = Console(stderr=True)
results_app = typer.Typer(help="Imported and stored results.", no_args_is_help=True)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def _emit(rows: list[dict[str, Any]], columns: list[str], fmt: str, title: str, payload: Any) -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buffer.getvalue())
    elif fmt == "table":
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column, justify="left" if column in ("algorithm", "label", "team", "a", "b") else "right")
        for row in rows:
            table.add_row(*(format_value(row.get(c)) for c in columns))
        console.print(table)
    else:
        _fail(f"unknown format {fmt!r}; choose one of table, csv, json")


def _suppression_note(payload: dict[str, Any], fmt: str, scope: str) -> None:
    """Say (on stderr, table format only: csv/json stay the API's bytes) why numbers are missing."""
    if fmt == "table" and payload.get("suppressed") and scope != "all":
        err.print(f"[yellow]note:[/yellow] fewer than {payload.get('min_group_size')} hidden cases in this test set: "
                  "statistics suppressed (small-cell rule; organizers: --scope all)")


def _with_testset(testset: str, fn, protocol: str | None = None):
    from services.db.session import session_scope
    from services.leaderboard import queries

    try:
        with session_scope() as session:
            return fn(session, queries.get_testset(session, testset, protocol))
    except (queries.LeaderboardNotFound, queries.LeaderboardQueryError) as exc:
        _fail(str(exc))


LEADERBOARD_COLUMNS = ["rank", "label", "team", "value", "mean", "mean_ci_low", "mean_ci_high", "median", "std", "n",
                       "n_scored", "n_failed", "incomplete", "rank_median", "rank_ci_low", "rank_ci_high", "seconds_per_case",
                       "gpu_memory_peak_bytes"]


# leaderboard_command and stats_command spell out their shared options (testset, organ, metric, format,
# scope, protocol) deliberately: typer reads each command's options from its own signature, and their
# help texts differ.

def leaderboard_command(
    testset: str = typer.Argument(..., help="test set name"),
    organ: str = typer.Option("average", help="an organ name or 'average'"),
    metric: str = typer.Option("dsc", help="dsc or nsd"),
    method: str = typer.Option("mean", help="mean | median | rank-mean | test"),
    format: str = typer.Option("table", "--format", help="table | csv | json"),
    scope: str = typer.Option("published", help="published | all (organizers: unpublished results too)"),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="a protocol version of the test set, NAME@VERSION "
                                           "(default: its current one)"),
) -> None:
    """The ranked leaderboard of a test set (what the leaderboard page shows)."""
    from services.leaderboard import queries

    board = _with_testset(testset, lambda s, ts: queries.leaderboard(s, ts, organ=organ, metric=metric, method=method,
                                                                      scope=scope), protocol)
    title = (f"{board['testset']} · {organ} · {metric.upper()} · ranked by {method} ({board['protocol_key']}, {scope}); "
             f"{board.get('statistics') or 'missing cases: ' + str(board.get('missing_policy'))}")
    _suppression_note(board, format, scope)
    _emit(board["entries"], LEADERBOARD_COLUMNS, format, title, board)


def stats_command(
    testset: str = typer.Argument(..., help="test set name"),
    organ: str = typer.Option("average", help="an organ name or 'average'"),
    metric: str = typer.Option("dsc", help="dsc or nsd"),
    format: str = typer.Option("table", "--format", help="table | csv | json"),
    scope: str = typer.Option("published", help="published | all"),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="a protocol version of the test set, NAME@VERSION "
                                           "(default: its current one)"),
) -> None:
    """Pairwise one-sided Wilcoxon p-values (Holm-adjusted) and bootstrap rank stability."""
    from services.leaderboard import queries

    def both(session, ts):
        return {"significance": queries.significance(session, ts, organ=organ, metric=metric, scope=scope),
                "stability": queries.stability(session, ts, organ=organ, metric=metric, method="mean", scope=scope)}

    payload = _with_testset(testset, both, protocol)
    pairs = [{**p, "a": p["a_label"], "b": p["b_label"]} for p in payload["significance"]["pairs"]]
    pair_columns = ["a", "b", "n_common", "mean_difference", "statistic", "p_value", "p_adjusted", "significant"]
    stab_columns = ["full_rank", "label", "median_rank", "rank_ci_low", "rank_ci_high", "mean_rank", "p_best"]
    if format == "json":
        _emit([], [], "json", "", payload)
        return
    if format == "csv":
        rows = [{"table": "pairwise", **p} for p in pairs] + [
            {"table": "stability", **e} for e in payload["stability"]["entries"]]
        _emit(rows, ["table", *pair_columns, *stab_columns[:1], *stab_columns[2:], "label"], "csv", "", payload)
        return
    sig = payload["significance"]
    _suppression_note(sig, format, scope)
    _emit(pairs, pair_columns, format,
          f"{testset} · {organ} · {metric.upper()}: one-sided paired Wilcoxon 'a better than b', "
          f"{sig['correction']}-adjusted (alpha {sig['alpha']}); protocol {sig['protocol_key']}; "
          f"{sig.get('statistics') or 'missing cases: ' + str(sig.get('missing_policy'))}", payload)
    tau = payload["stability"]["kendall_tau"] or {}
    _emit(payload["stability"]["entries"], stab_columns, format,
          f"rank stability over {payload['stability']['n_resamples']} bootstrap samples; Kendall's tau median "
          f"{format_value(tau.get('tau_median'), 3)} [{format_value(tau.get('tau_ci_low'), 3)}, {format_value(tau.get('tau_ci_high'), 3)}]",
          payload)


class _StatsGroup(TyperGroup):
    """``touchstone stats TESTSET ...`` shows the statistics (``stats show``); ``touchstone stats
    recompute TESTSET`` recomputes them: a first word that names no subcommand means ``show``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["show", *args]
        return super().parse_args(ctx, args)


stats_app = typer.Typer(cls=_StatsGroup, no_args_is_help=True,
                        help="Pairwise tests and rank stability of a test set (`stats TESTSET`), or recompute them.")


def stats_recompute_command(
    testset: str = typer.Argument(..., help="test set name"),
) -> None:
    """Recompute every statistic of a test set from its scores: every pair re-tested (the pairwise
    cache ignored and refilled), every submission's aggregates, both scopes, every protocol version.
    What the incremental updates after each scoring and publication must equal."""
    import time

    from services.leaderboard import recompute_all

    started = time.perf_counter()

    def run(session, ts):
        with console.status(f"recomputing the statistics of {ts.name} (every pair re-tested)..."):
            return recompute_all(session, ts, full=True)

    report = _with_testset(testset, run)
    console.print(
        f"recomputed {report.testset} ({report.protocol_key}) in {time.perf_counter() - started:.1f} s: "
        f"{report.aggregates} aggregate rows, {report.pairs_tested} pair tests (organ x metric), "
        f"{report.pairwise} pairwise rows, {report.rankings} ranking rows, {report.stability} stability rows; "
        f"submissions per scope: {', '.join(f'{k}={v}' for k, v in report.submissions.items())}"
    )


stats_app.command("show")(stats_command)
stats_app.command("recompute")(stats_recompute_command)


def export_command(
    testset: str = typer.Argument(..., help="test set name"),
    level: str = typer.Option("case", help="case | hospital | subgroup | lesion (per-lesion rows)"),
    format: str = typer.Option("csv", "--format", help="csv | parquet"),
    out: Path = typer.Option(..., "--out", help="output file"),
    scope: str = typer.Option("published", help="published | all"),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="a protocol version of the test set, NAME@VERSION "
                                           "(default: its current one)"),
) -> None:
    """Export results (streamed from the database, never loaded whole)."""
    from services import exports

    try:
        exports.check(level, format, scope)
    except exports.ExportError as exc:
        _fail(str(exc))
    tmp = out.with_name(out.name + ".partial")

    def run(session, ts):
        with open(tmp, "wb") as handle:
            with console.status(f"exporting {ts.name} ({level}, {format})..."):
                return exports.write(session, ts, level, format, handle, scope)

    try:
        size = _with_testset(testset, run, protocol)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    err.print(f"wrote {out} ({size} bytes)")


@results_app.command("import-touchstone")
def import_touchstone_command(
    directory: Path = typer.Argument(..., help="folder with one folder per model (dsc.csv, nsd.csv)"),
    testset: str = typer.Option(..., "--testset", help="test set name (created when it does not exist)"),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="metadata file (any delimiter; Touchstone's "
                                            "metaTotalSeg.csv recognised): case id + hospital/age/sex/... columns"),
    metadata_map: list[str] = typer.Option([], "--metadata-map", help="SOURCE=FIELD: metadata column SOURCE is "
                                           "FIELD (case_id, hospital, age, sex, ...); repeatable"),
    team: str = typer.Option("Touchstone (published)", help="team the imported algorithms belong to"),
) -> None:
    """Import published Touchstone results as published baseline submissions, then recompute."""
    from rich.progress import Progress

    from services.db.session import session_scope
    from services.importers import TouchstoneFormatError, import_touchstone

    try:
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("reading and importing", total=None)

            def step(name: str, done: int, total: int) -> None:
                progress.update(task, total=total, completed=done, description=f"imported {name}")

            with session_scope() as session:
                mapping = dict(m.split("=", 1) for m in metadata_map if "=" in m)
                if len(mapping) != len(metadata_map):
                    raise TouchstoneFormatError("--metadata-map takes SOURCE=FIELD, e.g. --metadata-map site=hospital")
                report = import_touchstone(session, directory, testset, metadata=metadata, team_name=team,
                                           progress=step, metadata_map=mapping)
                progress.update(task, description="statistics recomputed")
    except TouchstoneFormatError as exc:
        _fail(f"{exc} (nothing was imported)")
    created = " (new test set)" if report.created_testset else ""
    console.print(
        f"imported {len(report.models)} model(s) into {report.testset}{created}: {', '.join(report.models)}; "
        f"{report.scores} scores, {report.cases_created} case(s) created; statistics recomputed"
    )
    for line in [*report.metadata, *report.metadata_skipped[:5]]:
        console.print(line, markup=False, highlight=False)
    if report.repeated:
        console.print(f"  {len(report.repeated)} repeated case row(s) in the result files; the first value is kept:",
                      markup=False, highlight=False)
        for line in report.repeated[:5]:
            console.print(f"    {line}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `touchstone` app."""
    app.command("leaderboard")(leaderboard_command)
    app.add_typer(stats_app, name="stats")
    app.command("export")(export_command)
    app.add_typer(results_app, name="results")
