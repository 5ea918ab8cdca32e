"""Service CLI: ``touchstone db``, ``serve``, ``users``, ``testsets``, ``submit``, ``status``.

``db``, ``users`` and ``testsets`` work on the database directly (run them on the server);
``submit`` and ``status`` talk to the API (``--api``/``TOUCHSTONE_API_URL``, ``--token``/``TOUCHSTONE_TOKEN``);
with ``--format json`` they print one JSON document on stdout for scripts: the API's answer, or
``{"error": {"message": ..., "http_status": ..., "detail": ...}}`` with exit status 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
users_app = typer.Typer(help="Users and their API tokens.", no_args_is_help=True)
testsets_app = typer.Typer(help="Test sets.", no_args_is_help=True)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


# --- db ------------------------------------------------------------------------------------------
@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="target revision")) -> None:
    """Migrate the database (TOUCHSTONE_DATABASE_URL) up to REVISION."""
    from services.config import get_settings
    from services.db import migrate

    migrate.upgrade(revision)
    console.print(f"database at revision {migrate.current_revision()} ({_safe_url(get_settings().database_url)})")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument("-1", help="target revision ('base' empties the database)")) -> None:
    """Migrate the database down to REVISION."""
    from services.db import migrate

    migrate.downgrade(revision)
    console.print(f"database at revision {migrate.current_revision() or 'base'}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's revision and the newest one."""
    from services.db import migrate

    console.print(f"current {migrate.current_revision() or 'base'}, head {migrate.head_revision()}")


def _safe_url(url: str | None) -> str:
    from sqlalchemy.engine import make_url

    return make_url(str(url)).render_as_string(hide_password=True)


# --- serve -----------------------------------------------------------------------------------------
def serve(
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    workers: int = typer.Option(1, help="uvicorn worker processes"),
) -> None:
    """Run the API (OpenAPI docs at /docs); with TOUCHSTONE_METRICS_PORT also /metrics, unauthenticated,
    on that internal port (for Prometheus; keep it off the reverse proxy)."""
    import threading

    import uvicorn

    from services.config import get_settings

    metrics_port = get_settings().metrics_port
    if metrics_port:
        config = uvicorn.Config("services.api.app:create_metrics_app", factory=True, host=host, port=metrics_port,
                                log_level="warning")
        threading.Thread(target=uvicorn.Server(config).run, name="metrics", daemon=True).start()
    uvicorn.run("services.api.app:create_app", factory=True, host=host, port=port, workers=workers)


# --- users -------------------------------------------------------------------------------------------
@users_app.command("create")
def users_create(
    name: str,
    role: str = typer.Option(..., "--role", help="organizer | inventor | analyst"),
    team: Optional[str] = typer.Option(None, "--team", help="team name (created if new); inventors need one"),
) -> None:
    """Create a user and print its API token (shown this once only)."""
    from services.db.accounts import AccountError, create_user
    from services.db.enums import Role
    from services.db.session import session_scope

    try:
        role_value = Role(role)
    except ValueError:
        _fail(f"unknown role {role!r}; use organizer, inventor or analyst")
    try:
        with session_scope() as session:
            user, token = create_user(session, name, role_value, team)
            user_id = user.id
    except AccountError as exc:
        _fail(str(exc))
    console.print(f"created user {name} (id {user_id}, {role_value.value}{', team ' + team if team else ''})")
    console.print("token (shown once, store it now):")
    print(token)


# --- testsets -----------------------------------------------------------------------------------------
@testsets_app.command("import")
def testsets_import(
    name: str,
    manifest: Path = typer.Option(..., "--manifest", help="manifest CSV (case_id,image,labels,hospital,...)"),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="protocol name or name@version"),
    description: Optional[str] = typer.Option(None, "--description"),
) -> None:
    """Import a test set from a manifest (files are checksummed, with progress)."""
    from rich.progress import Progress

    from services.db.session import session_scope
    from services.db.testsets import ManifestError, import_testset

    try:
        with session_scope() as session, Progress(console=err, transient=True) as progress:
            task = progress.add_task("checksumming cases", total=None)
            testset = import_testset(
                session,
                name,
                manifest,
                protocol=protocol,
                description=description,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
            summary = (testset.id, testset.protocol_key, len(testset.cases), sum(c.public_sample for c in testset.cases))
    except ManifestError as exc:
        _fail(str(exc))
    console.print(
        f"imported test set {name} (id {summary[0]}, protocol {summary[1]}): {summary[2]} cases, "
        f"{summary[3]} in the public sample"
    )


@testsets_app.command("update")
def testsets_update(
    name: str,
    missing_policy: Optional[str] = typer.Option(None, "--missing-policy", help="worst | common"),
    stats_preset: Optional[str] = typer.Option(None, "--stats-preset",
                                               help="touchstone-2024 | challenger | default (clears options)"),
    subgroups: Optional[str] = typer.Option(None, "--subgroups", help="comma-separated case metadata columns "
                                            "(typed or extra), e.g. kvp,study_type; '' = the default breakdowns"),
    min_group_size: Optional[int] = typer.Option(None, "--min-group-size", help="too_small / small-cell threshold"),
    zero_method: Optional[str] = typer.Option(None, "--zero-method", help="wilcox | pratt | zsplit"),
    continuity: Optional[bool] = typer.Option(None, "--continuity/--no-continuity",
                                              help="Wilcoxon continuity correction"),
    test_method: Optional[str] = typer.Option(None, "--test-method", help="asymptotic | exact | auto"),
    correction: Optional[str] = typer.Option(None, "--correction",
                                             help="pairwise tests: holm | bonferroni | fdr_bh | none | ..."),
    test_correction: Optional[str] = typer.Option(None, "--test-correction",
                                                  help="test-then-rank: holm | bonferroni | fdr_bh | none | ..."),
    family: Optional[str] = typer.Option(None, "--family", help="ordered pairs in the correction: tested | all"),
    ci_method: Optional[str] = typer.Option(None, "--ci-method", help="percentile | bca"),
    prediction_retention: Optional[str] = typer.Option(
        None, "--prediction-retention", help="how long predictions stay for re-scoring: all | none | N days ('30d')"),
) -> None:
    """Change how a test set's statistics are computed (missing-case policy, test options, subgroups)
    and recompute them (scores are untouched); or how long its predictions are kept."""
    from services.db.models import TestSet
    from services.db.session import session_scope
    from services.db.testsets import StatisticsSettingsError, update_statistics_settings
    from services.leaderboard import options_for_testset

    import sqlalchemy as sa

    options = {k: v for k, v in (("zero_method", zero_method), ("continuity", continuity),
                                 ("test_method", test_method), ("correction", correction),
                                 ("test_correction", test_correction), ("family", family),
                                 ("ci_method", ci_method)) if v is not None}
    variables = None if subgroups is None else [v for v in subgroups.split(",") if v.strip()]
    try:
        with session_scope() as session:
            testset = session.scalar(sa.select(TestSet).where(TestSet.name == name))
            if testset is None:
                _fail(f"no test set named {name!r}")
            changes = update_statistics_settings(
                session, testset, missing_policy=missing_policy, stats_preset=stats_preset,
                stats_options=options or None, subgroup_variables=variables, min_group_size=min_group_size)
            footer = options_for_testset(testset).footer()
            if prediction_retention is not None:
                from services.rescoring import describe_retention, set_prediction_retention

                days = set_prediction_retention(session, testset, prediction_retention)
                console.print(f"test set {name}: {describe_retention(days)}", markup=False, highlight=False)
                if not changes:
                    return
    except (StatisticsSettingsError, ValueError) as exc:  # services.rescoring.RescoringError is a ValueError
        _fail(str(exc))
    if not changes:
        _fail("nothing to change: give --missing-policy, --stats-preset, --subgroups, --min-group-size, "
              "--prediction-retention or an option")
    console.print(f"updated test set {name}: {', '.join(f'{k}={v}' for k, v in changes.items())}; statistics recomputed")
    console.print(footer, markup=False, highlight=False)


# --- submit / status (API clients) -----------------------------------------------------------------
OUTPUT_FORMATS = ("text", "json")


def _output_format(value: str) -> str:
    if value not in OUTPUT_FORMATS:
        raise typer.BadParameter(f"unknown format {value!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    return value


def _format_option(help_text: str):
    return typer.Option("text", "--format", callback=_output_format, help=help_text)


def _client_fail(fmt: str, message: str, http_status: int | None = None, detail=None) -> None:
    """An API client's error: a red line on stderr, or with ``--format json`` the machine-readable
    ``{"error": {"message", "http_status", "detail"}}`` on stdout (``detail``: the API's own,
    as it sent it); exit status 1 either way."""
    if fmt == "json":
        print(json.dumps({"error": {"message": message, "http_status": http_status, "detail": detail}}, indent=2))
        raise typer.Exit(1)
    _fail(message)


def _api(api: str | None) -> str:
    from services.config import get_settings

    return (api or get_settings().api_url).rstrip("/")


def _token(token: str | None, fmt: str = "text") -> str:
    token = token or os.environ.get("TOUCHSTONE_TOKEN")
    if not token:
        _client_fail(fmt, "give --token or set TOUCHSTONE_TOKEN")
    return token  # type: ignore[return-value]


def _error_detail(response):
    """The API's ``detail`` (a sentence, or a structure as sent), else the start of the body."""
    try:
        return response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text[:500]


def _refused(fmt: str, what: str, response) -> None:
    detail = _error_detail(response)
    _client_fail(fmt, f"{what}({response.status_code}): {detail}", response.status_code, detail)


def _call_api(fmt: str, base: str, send, expected: int, refused: str) -> dict | None:
    """``send()`` the request; the API's JSON answer, for the text format to show; with ``--format
    json`` it is printed as it came and None returned. An unreachable API, or any status but
    ``expected`` (:func:`_refused`), fails."""
    import httpx

    try:
        response = send()
    except httpx.HTTPError as exc:
        _client_fail(fmt, f"could not reach the API at {base}: {exc}")
    if response.status_code != expected:
        _refused(fmt, refused, response)
    body = response.json()
    if fmt == "json":
        print(json.dumps(body, indent=2))
        return None
    return body


def submit(
    image: str = typer.Argument(..., help="a `docker save` tarball (IMAGE.tar) or an image reference"),
    algorithm: str = typer.Option(..., "--algorithm", help="your team's algorithm name"),
    testset: str = typer.Option(..., "--testset", help="test set name"),
    api: Optional[str] = typer.Option(None, "--api", help="API base URL (default TOUCHSTONE_API_URL)"),
    token: Optional[str] = typer.Option(None, "--token", help="API token (default TOUCHSTONE_TOKEN)"),
    fmt: str = _format_option("text | json (the API's answer, or a JSON error, on stdout)"),
) -> None:
    """Submit an image; a tarball is streamed (never read into memory) with a progress bar."""
    import httpx

    base, bearer = _api(api), _token(token, fmt)
    headers = {"Authorization": f"Bearer {bearer}"}
    params = {"algorithm": algorithm, "testset": testset}
    path = Path(image)

    def send():
        with httpx.Client(timeout=httpx.Timeout(60.0, read=None, write=None)) as client:
            if path.is_file():
                return _stream_upload(client, f"{base}/api/v1/submissions", path, params, headers)
            return client.post(f"{base}/api/v1/submissions", params=params, headers=headers,
                               files={"image_ref": (None, image)})

    body = _call_api(fmt, base, send, 202, "submission refused ")
    if body is None:
        return
    console.print(f"submission {body['id']} received (state {body['state']}); follow it with: touchstone status {body['id']}")


def _stream_upload(client, url: str, path: Path, params: dict, headers: dict):
    """POST ``path`` as multipart without loading it: the body is generated chunk by chunk."""
    import uuid

    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    boundary = uuid.uuid4().hex
    fields = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in params.items()
    )
    head = fields + (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
        "Content-Type: application/x-tar\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = path.stat().st_size

    def body():
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), console=err, transient=True) as progress:
            task = progress.add_task(f"uploading {path.name}", total=size)
            yield head
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    progress.advance(task, len(block))
                    yield block
            yield tail

    request_headers = {
        **headers,
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + size + len(tail)),
    }
    return client.post(url, params=params, headers=request_headers, content=body())


def status(
    submission_id: int = typer.Argument(..., help="submission id"),
    api: Optional[str] = typer.Option(None, "--api"),
    token: Optional[str] = typer.Option(None, "--token"),
    fmt: str = _format_option("text | json (the API's answer, or a JSON error, on stdout)"),
    as_json: bool = typer.Option(False, "--json", hidden=True, help="the same as --format json"),
) -> None:
    """Show a submission's state, timestamps and failure reason."""
    import httpx

    fmt = "json" if as_json else fmt
    base, bearer = _api(api), _token(token, fmt)
    body = _call_api(fmt, base, lambda: httpx.get(f"{base}/api/v1/submissions/{submission_id}",
                                                  headers={"Authorization": f"Bearer {bearer}"}), 200, "")
    if body is None:
        return
    console.print(f"submission {body['id']}: {body['algorithm']} ({body['team']}) on {body['testset']} -- [bold]{body['state']}[/bold]")
    for state in ("received", "validating", "queued", "running", "evaluating", "scored", "published", "failed", "cancelled"):
        if body.get(f"{state}_at"):
            console.print(f"  {state:<11} {body[f'{state}_at']}")
    if body.get("failure_reason"):
        console.print(f"  reason: {body['failure_reason']}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `touchstone` app."""
    app.add_typer(db_app, name="db")
    app.add_typer(users_app, name="users")
    app.add_typer(testsets_app, name="testsets")
    app.command("serve")(serve)
    app.command("submit")(submit)
    app.command("status")(status)
