"""Organizer commands of prediction storage and re-scoring (services/rescoring.py):

* ``touchstone storage report [--testset NAME]`` -- per test set its retention and, per scored or
  published submission, the bytes of its tarball and kept predictions and whether the predictions
  are kept, deleted or reclaimable now;
* ``touchstone storage reclaim [--testset NAME] [--dry-run] [--wait]`` -- delete the predictions
  the retention no longer covers (a cpu worker does it: ``touchstone.reclaim_predictions``);
* ``touchstone rescore TESTSET --protocol P [--submissions 3,5] [--wait]`` -- score the kept
  predictions under another protocol version (a cpu worker, no container);
* ``touchstone rescore-jobs TESTSET [--job ID]`` -- the jobs and their progress.

They read the database of the settings (``TOUCHSTONE_DATABASE_URL``) directly, like
``touchstone testsets``; the work goes to the workers through the broker.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)
storage_app = typer.Typer(help="Stored predictions: report and reclaim space under each test set's retention.",
                          no_args_is_help=True)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(1)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@contextlib.contextmanager
def _rescoring_session() -> Iterator[Any]:
    """A database session (committed on success); a :class:`services.rescoring.RescoringError`
    raised in it ends the command with its message."""
    from services import rescoring
    from services.db.session import session_scope

    try:
        with session_scope() as session:
            yield session
    except rescoring.RescoringError as exc:
        _fail(str(exc))


def _testset(session: Any, name: str) -> Any:
    """The test set of that name; else the command ends."""
    import sqlalchemy as sa

    from services.db.models import TestSet

    ts = session.scalar(sa.select(TestSet).where(TestSet.name == name))
    if ts is None:
        _fail(f"no test set named {name!r}")
    return ts


def _print_json(payload: Any) -> None:
    console.print_json(json.dumps(payload, default=str))


@storage_app.command("report")
def storage_report(
    testset: Optional[str] = typer.Option(None, "--testset", help="one test set (default: all)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """What the predictions of every scored submission take, and what the retention lets go."""
    from services import rescoring

    with _rescoring_session() as session:
        report = rescoring.storage_report(session, testset_name=testset)
    if as_json:
        _print_json(report)
        return
    for ts in report:
        table = Table(title=f"{ts['testset']}: {ts['retention']} -- predictions {_mib(ts['prediction_bytes'])}, "
                            f"reclaimable now {_mib(ts['reclaimable_bytes'])}, tarballs {_mib(ts['tarball_bytes'])}")
        for column in ("submission", "state", "scored at (UTC)", "tarball", "predictions", "status"):
            table.add_column(column)
        for row in ts["submissions"]:
            scored = row["scored_at"].strftime("%Y-%m-%d %H:%M") if row["scored_at"] else "-"
            table.add_row(str(row["submission_id"]), row["state"], scored, _mib(row["tarball_bytes"]),
                          _mib(row["prediction_bytes"]), row["predictions"])
        console.print(table)
    console.print("Sizes as the worker recorded them (Submission.storage_bytes: tarball + kept predictions); "
                  "run folders: <storage>/runs/submission-<id>/ (docs/operations.md).", markup=False, highlight=False)


@storage_app.command("reclaim")
def storage_reclaim(
    testset: Optional[str] = typer.Option(None, "--testset", help="one test set (default: all)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be deleted"),
    wait: bool = typer.Option(False, "--wait", help="wait until a worker deleted them"),
    timeout: float = typer.Option(300.0, "--timeout", help="seconds --wait waits"),
) -> None:
    """Delete the predictions each test set's retention no longer covers (never those a
    re-scoring job still reads). The worker deletes them; the report says what is left."""
    import sqlalchemy as sa

    from services import rescoring
    from services.db.models import Submission, TestSet
    from services.db.session import session_scope

    with session_scope() as session:
        testset_id = None
        if testset is not None:
            testset_id = session.scalar(sa.select(TestSet.id).where(TestSet.name == testset))
            if testset_id is None:
                _fail(f"no test set named {testset!r}")
        ids = rescoring.reclaimable_submissions(session, testset_id=testset_id)
        rows = {r["submission_id"]: r for ts in rescoring.storage_report(session, testset_name=testset)
                for r in ts["submissions"]}
    total = sum(rows[i]["prediction_bytes"] for i in ids if i in rows)
    verb = "would delete" if dry_run else "deleting"
    console.print(f"{verb} the predictions of {len(ids)} submission(s) ({_mib(total)}): "
                  f"{', '.join(map(str, ids)) or 'none'}", markup=False, highlight=False)
    if dry_run or not ids:
        return
    rescoring.enqueue_reclaim(ids)
    if not wait:
        console.print("sent to the cpu workers (touchstone.reclaim_predictions); `touchstone storage report` shows "
                      "the result", markup=False, highlight=False)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            left = session.scalar(sa.select(sa.func.count(Submission.id)).where(
                Submission.id.in_(ids), Submission.predictions_deleted_at.is_(None))) or 0
        if not left:
            console.print(f"deleted the predictions of {len(ids)} submission(s)", markup=False, highlight=False)
            return
        time.sleep(0.5)
    _fail(f"{left} submission(s) still hold predictions after {timeout:g} s: is a cpu worker running?")


def _print_job(status: dict[str, Any]) -> None:
    console.print(
        f"job {status['job_id']} under {status['protocol_key']}: {status['state']}; "
        f"{status['n_cases_done']}/{status['n_cases_total']} case(s), {status['n_scores_written']} score row(s); "
        f"submissions {', '.join(map(str, status['submission_ids'])) or 'none'}", markup=False, highlight=False)
    for item in status["unavailable"]:
        console.print(f"  not re-scored: submission {item['submission_id']}: {item['reason']}", markup=False,
                      highlight=False)
    if status["error"]:
        console.print(f"  error: {status['error']}", markup=False, highlight=False)


def rescore_command(
    testset: str = typer.Argument(..., help="test set name"),
    protocol: str = typer.Option(..., "--protocol", help="NAME@VERSION of a preset, or a protocol file (.yaml/.json)"),
    submissions: Optional[str] = typer.Option(None, "--submissions",
                                              help="comma-separated submission ids (default: every scored or "
                                                   "published one)"),
    wait: bool = typer.Option(False, "--wait", help="show the progress until the job ends"),
    timeout: float = typer.Option(3600.0, "--timeout", help="seconds --wait waits"),
    as_json: bool = typer.Option(False, "--json", help="print the job as JSON"),
) -> None:
    """Score the kept predictions of a test set's submissions under another protocol version, on
    the cpu workers, without running any container; the scores of the current version stay."""
    from services import rescoring
    from services.db.models import RescoreJob
    from services.db.session import session_scope

    try:
        ids = [int(s) for s in submissions.split(",") if s.strip()] if submissions else None
    except ValueError:
        _fail(f"--submissions takes comma-separated ids, got {submissions!r}")
    with _rescoring_session() as session:
        job = rescoring.start_rescore(session, _testset(session, testset), protocol, submission_ids=ids)
        session.commit()
        status = rescoring.job_status(job)
        rescoring.enqueue_rescore(job)
    if not wait:
        _print_json(status) if as_json else _print_job(status)
        return
    deadline = time.monotonic() + timeout
    from rich.progress import Progress

    with Progress(console=err, transient=True) as progress:
        task = progress.add_task(f"re-scoring under {status['protocol_key']}", total=max(status["n_cases_total"], 1))
        while time.monotonic() < deadline:
            with session_scope() as session:
                status = rescoring.job_status(session.get(RescoreJob, status["job_id"]))
            progress.update(task, completed=status["n_cases_done"])
            if status["state"] in ("done", "failed"):
                break
            time.sleep(0.5)
    _print_json(status) if as_json else _print_job(status)
    if status["state"] != "done":
        raise typer.Exit(1)


def rescore_jobs_command(
    testset: str = typer.Argument(..., help="test set name"),
    job: Optional[int] = typer.Option(None, "--job", help="one job id"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """The re-scoring jobs of a test set and their progress."""
    from services import rescoring

    with _rescoring_session() as session:
        ts = _testset(session, testset)
        jobs = [rescoring.get_job(session, ts, job)] if job is not None else rescoring.list_jobs(session, ts)
        statuses = [rescoring.job_status(j) for j in jobs]
    if as_json:
        _print_json(statuses)
        return
    for status in statuses:
        _print_job(status)
    if not statuses:
        console.print(f"no re-scoring job on {testset}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `touchstone` app."""
    app.add_typer(storage_app, name="storage")
    app.command("rescore")(rescore_command)
    app.command("rescore-jobs")(rescore_jobs_command)
