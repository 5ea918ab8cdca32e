"""``touchstone demo``: from nothing to a populated leaderboard on one machine.

What it does, in the order a real deployment would see it:

1. writes a small multi-hospital phantom test set with a public sample (``evaluation.phantoms``);
2. starts the embedded stack as subprocesses, logs under ``<data-dir>/logs``: the database is an
   SQLite file, the Celery broker a folder (``filesystem://``), ``touchstone worker`` runs the real
   Celery workers (container runs on the ``gpu`` queue without a GPU, scoring on ``cpu``) and
   ``touchstone serve`` the API and the leaderboard pages;
3. the organizer is created with the CLI (``touchstone users create``), then everything else goes
   through the HTTP API: two inventor teams and an analyst, the test set import and its limits,
   algorithm registration and the image uploads (``docker save`` tarballs of the example
   algorithms, one of which -- ``touchstone/example-garbage`` -- writes random bytes and fails
   validation with a reason a person can act on);
4. waits, showing every submission's state and shards; publishes the scored ones (which computes
   the statistics), prints the leaderboard, the pairwise tests and the rank stability;
5. serves the pages until Ctrl-C, or with ``--no-serve`` saves them as a static report and exits.

Runnable twice in a row: the data folder (default ``./touchstone-demo``) is reset on every start,
except ``images/`` where the ``docker save`` tarballs are cached by image id. The subprocesses are
stopped on exit, on Ctrl-C and on SIGTERM; ones left by a killed earlier run are stopped first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

console = Console()
err = Console(stderr=True)

MARKER = ".touchstone-demo"
TESTSET = "demo-phantoms"
FINISHED = {"scored", "published", "failed", "cancelled"}
#: variables that would point the embedded stack at another deployment
FOREIGN_ENV = ("TOUCHSTONE_DATABASE_URL", "TOUCHSTONE_BROKER_URL", "TOUCHSTONE_RESULT_BACKEND",
               "TOUCHSTONE_STORAGE_DIR", "TOUCHSTONE_API_URL", "TOUCHSTONE_TOKEN")


@dataclass(frozen=True)
class DemoAlgorithm:
    team: str
    inventor: str
    algorithm: str
    example: str  # examples/algorithms/<example>, built as touchstone/example-<example>:latest
    description: str
    expect_failure: bool = False

    @property
    def image(self) -> str:
        return f"touchstone/example-{self.example}:latest"


ALGORITHMS = (
    DemoAlgorithm("Anatomy Lab", "alice", "classical-hu-priors", "classical",
                  "HU windows, anatomical priors and connected components (no learning)"),
    DemoAlgorithm("Threshold Works", "bob", "threshold-baseline", "trivial",
                  "a soft-tissue threshold called liver, bright voxels called aorta"),
    DemoAlgorithm("Anatomy Lab", "alice", "random-bytes", "garbage",
                  "writes random bytes where NIfTI files belong: fails validation", expect_failure=True),
)
#: with --with-monai: the trained MONAI network (image: scripts/build-examples.sh --only monai-segresnet)
MONAI_ALGORITHM = DemoAlgorithm("Deep Lab", "carol", "monai-segresnet", "monai-segresnet",
                                "MONAI SegResNet trained on phantoms (examples/algorithms/monai-segresnet)")


class DemoError(Exception):
    """A step of the demo failed; the message says which and what to do."""


# --------------------------------------------------------------------------------------------------
# the data folder and the subprocesses
# --------------------------------------------------------------------------------------------------
def check_folder(root: Path) -> None:
    """Refuse a folder that is not a demo folder (nothing in it is touched)."""
    if root.exists() and not root.is_dir():
        raise DemoError(f"--data-dir {root} exists and is not a folder; choose another --data-dir")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).exists():
        raise DemoError(f"--data-dir {root} is not empty and was not made by `touchstone demo`; "
                        "choose an empty or new folder (nothing in it was changed)")


def prepare_folder(root: Path) -> None:
    """Reset a demo folder (keeping the image cache)."""
    check_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    stop_stale_processes(root)
    for child in root.iterdir():
        if child.name in ("images", MARKER):
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    (root / MARKER).write_text("made by `touchstone demo`; reset by its next run (images/ is kept)\n")
    for sub in ("data", "logs", "images"):
        (root / sub).mkdir(exist_ok=True)


def stop_stale_processes(root: Path) -> None:
    """Stop the subprocesses an earlier, killed run of the demo left behind (recorded in pids.json)."""
    record = root / "pids.json"
    if not record.exists():
        return
    try:
        pids = json.loads(record.read_text())
    except ValueError:
        return
    for pid in pids.values():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue  # gone (or not ours to read)
        if "services.cli.main" in cmdline and f"TOUCHSTONE_DATA_DIR={root / 'data'}" in environ:
            err.print(f"stopping process {pid} left by an earlier demo run")
            _stop_group(pid, timeout=20)


def _stop_group(pid: int, timeout: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Services:
    """The demo's subprocesses (each in its own process group, so stopping one stops its children)."""

    root: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{name}.log", "wb")
        process = subprocess.Popen([sys.executable, "-m", "services.cli.main", *args], env=self.env,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        self.processes[name] = process
        (self.root / "pids.json").write_text(json.dumps({k: p.pid for k, p in self.processes.items()}))
        return process

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise DemoError(f"the {name} process exited with code {process.returncode}:\n"
                                f"{self.log_tail(name)}\n(full log: {self.root / 'logs' / (name + '.log')})")

    def log_tail(self, name: str, lines: int = 25) -> str:
        path = self.root / "logs" / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM every group (the worker finishes or abandons its task), SIGKILL after ``timeout``."""
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _stop_group(process.pid, timeout=0)
                process.wait(timeout=10)
        self.processes.clear()
        (self.root / "pids.json").unlink(missing_ok=True)


def free_port(preferred: int) -> int:
    """``preferred`` when it is free (0: any free port)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", preferred))
            return sock.getsockname()[1]
        except OSError:
            pass
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def embedded_env(root: Path) -> dict[str, str]:
    """The subprocesses' environment: the embedded defaults under ``<root>/data``."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update({
        "TOUCHSTONE_DATA_DIR": str(root / "data"),
        # the demo imports its phantom test set through the API: manifests only from import roots
        "TOUCHSTONE_IMPORT_ROOTS": str(root / "testset"),
        "TOUCHSTONE_LOG_FORMAT": env.get("TOUCHSTONE_LOG_FORMAT", "keyvalue"),
        "TOUCHSTONE_WORKER_CONTAINER_CPUS": str(min(2, os.cpu_count() or 1)),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _use_in_process(env: dict[str, str]) -> None:
    """Point this process's settings at the demo deployment (for the leaderboard printing)."""
    from services.config import get_settings
    from services.db.session import dispose_engines

    for key in FOREIGN_ENV:
        os.environ.pop(key, None)
    os.environ["TOUCHSTONE_DATA_DIR"] = env["TOUCHSTONE_DATA_DIR"]
    get_settings.cache_clear()
    dispose_engines()


# --------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------
def check_docker(images: list[str]) -> None:
    """The Docker engine answers and the example images exist (scripts/build-examples.sh)."""
    try:
        import docker

        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means no engine
        raise DemoError(f"the Docker engine is not reachable ({exc}); start it (scripts/setup.sh does) "
                        "or run the demo with `bash scripts/demo.sh`") from None
    missing = []
    for image in images:
        try:
            client.images.get(image)
        except Exception:  # noqa: BLE001
            missing.append(image)
    if missing:
        raise DemoError(f"missing example image(s) {', '.join(missing)}; build them with "
                        "`bash scripts/build-examples.sh` (or run `bash scripts/demo.sh`; the MONAI model: "
                        "`bash scripts/build-examples.sh --only monai-segresnet`)")


def make_testset(root: Path, n_cases: int, hospitals: int, public: int) -> Path:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evaluation.phantoms import write_phantom_set

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(f"phantom CTs from {hospitals} hospitals", total=n_cases)
        manifest = write_phantom_set(root / "testset", n_cases, n_hospitals=hospitals, size="tiny", seed=7,
                                     public_sample=public, progress=lambda _case: progress.advance(task))
    return manifest


def run_cli(env: dict[str, str], *args: str) -> str:
    """Run a ``touchstone`` command to completion; its stdout (an error names the command)."""
    result = subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env, capture_output=True,
                            text=True, timeout=300)
    if result.returncode != 0:
        raise DemoError(f"`touchstone {' '.join(args)}` failed ({result.returncode}):\n{result.stderr or result.stdout}")
    return result.stdout


def wait_for_api(api: str, services: Services, timeout: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services.check_alive()
        try:
            if httpx.get(f"{api}/api/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise DemoError(f"the API did not answer at {api} within {timeout:.0f} s:\n{services.log_tail('api')}")


class Api:
    """A tiny HTTP client of the demo (one token per call)."""

    def __init__(self, base: str):
        import httpx

        self.base = base
        self.client = httpx.Client(base_url=f"{base}/api/v1", timeout=httpx.Timeout(60.0, read=None, write=None))

    def call(self, method: str, path: str, token: str | None = None, expect: tuple[int, ...] = (200, 201, 202),
             **kwargs) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = self.client.request(method, path, headers=headers, **kwargs)
        if response.status_code not in expect:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text[:500]
            raise DemoError(f"{method} {path} answered {response.status_code}: {detail}")
        return response.json() if response.content else None


def save_tarball(image: str, cache: Path) -> Path:
    """``docker save`` of ``image`` (what an inventor uploads), cached by image id."""
    import docker

    image_id = docker.from_env(timeout=60).images.get(image).id.split(":", 1)[-1][:16]
    name = image.split("/")[-1].split(":")[0]
    path = cache / f"{name}-{image_id}.tar"
    if path.exists():
        return path
    for old in cache.glob(f"{name}-*.tar"):
        old.unlink()
    partial = path.with_suffix(".partial")
    result = subprocess.run(["docker", "save", "-o", str(partial), image], capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise DemoError(f"`docker save {image}` failed: {result.stderr.strip()}")
    partial.replace(path)
    return path


def upload(api: Api, token: str, tarball: Path, algorithm: str) -> dict:
    """Stream the tarball to ``POST /submissions`` as ``touchstone submit`` does (progress bar)."""
    from services.cli.core import _stream_upload

    response = _stream_upload(api.client, f"{api.base}/api/v1/submissions", tarball,
                              {"algorithm": algorithm, "testset": TESTSET}, {"Authorization": f"Bearer {token}"})
    if response.status_code != 202:
        raise DemoError(f"the upload of {tarball.name} was refused ({response.status_code}): {response.text[:500]}")
    return response.json()


def _progress_table(rows: list[dict], started: float) -> Table:
    table = Table(title=f"submissions on {TESTSET} ({time.monotonic() - started:.0f} s)", title_justify="left")
    for column in ("id", "team", "algorithm", "state", "shards done", "note"):
        table.add_column(column, justify="right" if column in ("id", "shards done") else "left")
    colours = {"scored": "green", "published": "green", "failed": "red", "cancelled": "red"}
    for row in rows:
        shards = row.get("shards") or []
        done = sum(s["state"] == "succeeded" for s in shards)
        running = sum(s["state"] == "running" for s in shards)
        shard_text = f"{done}/{len(shards)}" + (f" ({running} running)" if running else "") if shards else "–"
        state = row["state"]
        note = (row.get("failure_reason") or "")[:70]
        table.add_row(str(row["id"]), row["team"], row["algorithm"], f"[{colours.get(state, 'yellow')}]{state}",
                      shard_text, note)
    return table


def wait_for_results(api: Api, organizer: str, ids: list[int], services: Services, timeout: float) -> list[dict]:
    """Poll the submissions (and their shards) until every one is finished, showing a live table."""
    started = time.monotonic()
    rows: list[dict] = []
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while True:
            services.check_alive()
            rows = []
            for sid in ids:
                row = api.call("GET", f"/submissions/{sid}", organizer)
                row["shards"] = api.call("GET", f"/submissions/{sid}/shards", organizer)
                rows.append(row)
            live.update(_progress_table(rows, started))
            if all(r["state"] in FINISHED for r in rows):
                return rows
            if time.monotonic() - started > timeout:
                raise DemoError(f"the submissions did not finish within {timeout:.0f} s; the worker's log:\n"
                                f"{services.log_tail('worker', 40)}")
            time.sleep(1.0)


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ci(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    low, high = entry.get("mean_ci_low"), entry.get("mean_ci_high")
    ci = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
    return f"{entry['mean']:.3f}{ci}"


def print_results(scope: str = "published") -> dict[str, Any]:
    """The leaderboard with significance and rank stability, from the stored statistics (the
    leaderboard service's queries, as ``touchstone leaderboard`` / ``touchstone stats`` and the
    pages read them), narrow enough for a terminal; returns what it printed."""
    from services.db.session import session_scope
    from services.leaderboard import queries

    with session_scope() as session:
        ts = queries.get_testset(session, TESTSET)
        dsc = queries.leaderboard(session, ts, organ="average", metric="dsc", method="mean", scope=scope)
        nsd = queries.leaderboard(session, ts, organ="average", metric="nsd", method="mean", scope=scope)
        sig = queries.significance(session, ts, organ="average", metric="dsc", scope=scope)
        stab = queries.stability(session, ts, organ="average", metric="dsc", method="mean", scope=scope)
        hospitals = queries.breakdown(session, ts, variable="hospital", organ="average", metric="dsc", scope=scope)
    nsd_by_id = {e["submission_id"]: e for e in nsd["entries"]}
    table = Table(title=f"Leaderboard {TESTSET} ({dsc['protocol_key']}): mean over organs, per-case means "
                        "with 95% bootstrap CIs", title_justify="left")
    for column, justify in (("#", "right"), ("algorithm", "left"), ("team", "left"), ("DSC", "right"),
                            ("NSD", "right"), ("rank 95% CI", "right"), ("P(best)", "right"),
                            ("failed", "right"), ("s/case", "right")):
        table.add_column(column, justify=justify)
    for e in dsc["entries"]:
        rank_ci = (f"{e['rank_ci_low']:.0f}–{e['rank_ci_high']:.0f}" if e.get("rank_ci_low") is not None else "–")
        spc = e.get("seconds_per_case")
        table.add_row(str(e["rank"]), e["label"], e["team"], _ci(e), _ci(nsd_by_id.get(e["submission_id"])), rank_ci,
                      f"{e['p_best']:.2f}" if e.get("p_best") is not None else "–",
                      f"{e.get('n_failed', 0)}/{e.get('n', 0)}", f"{spc:.2f}" if spc is not None else "–")
    console.print(table)

    if hospitals["rows"]:
        groups = sorted({r["group"] for r in hospitals["rows"]})
        by = {(r["submission_id"], r["group"]): r for r in hospitals["rows"]}
        per_hospital = Table(title="mean DSC per hospital (n cases)", title_justify="left")
        per_hospital.add_column("algorithm")
        for g in groups:
            per_hospital.add_column(g, justify="right")
        for e in dsc["entries"]:
            cells = []
            for g in groups:
                r = by.get((e["submission_id"], g))
                cells.append(f"{r['mean']:.3f} ({r['n']})" if r and r.get("mean") is not None else "–")
            per_hospital.add_row(e["label"], *cells)
        console.print(per_hospital)

    if sig["pairs"]:
        pairs = Table(title=f"paired one-sided Wilcoxon tests on per-case DSC, {sig['correction']}-adjusted "
                            f"(alpha {sig['alpha']})", title_justify="left")
        for column in ("a better than b?", "cases", "mean diff", "p (adjusted)", "significant"):
            pairs.add_column(column, justify="left" if column.startswith("a ") else "right")
        for p in sig["pairs"]:
            if p["mean_difference"] is not None and p["mean_difference"] < 0:
                continue  # the mirrored test of a pair already shown
            pairs.add_row(f"{p['a_label']} > {p['b_label']}", str(p["n_common"]), f"{p['mean_difference']:+.3f}",
                          f"{p['p_adjusted']:.4f}" if p["p_adjusted"] is not None else "–",
                          "[green]yes[/]" if p["significant"] else "no")
        console.print(pairs)
    tau = stab.get("kendall_tau") or {}
    if tau.get("tau_median") is not None:
        console.print(f"rank stability: {stab['n_resamples']} bootstrap resamples of the cases; Kendall's tau of the "
                      f"resampled rankings vs the full one: median {tau['tau_median']:.3f} "
                      f"[{_num(tau.get('tau_ci_low'))}, {_num(tau.get('tau_ci_high'))}]")
    return {"dsc": dsc, "nsd": nsd, "significance": sig, "stability": stab}


def write_static_report(api: Api, root: Path, submission_ids: list[int]) -> Path:
    """Save the served pages (leaderboard and each submission's page) with the stylesheet inlined."""
    import httpx

    out = root / "report"
    out.mkdir(exist_ok=True)
    css = httpx.get(f"{api.base}/static/style.css", timeout=30).text

    def fetch(path: str) -> str:
        response = httpx.get(f"{api.base}{path}", timeout=120)
        if response.status_code != 200:
            raise DemoError(f"GET {path} answered {response.status_code}")
        html = response.text.replace('<link rel="stylesheet" href="/static/style.css">', f"<style>\n{css}\n</style>")
        # links between the saved pages work offline; other views need the server
        html = re.sub(rf'href="/leaderboards/{TESTSET}/submissions/(\d+)[^"]*"', r'href="submission-\1.html"', html)
        return re.sub(rf'href="/leaderboards/{TESTSET}(\?[^"]*)?(#\w+)?"', 'href="index.html"', html)

    (out / "index.html").write_text(fetch(f"/leaderboards/{TESTSET}"))
    for sid in submission_ids:
        (out / f"submission-{sid}.html").write_text(fetch(f"/leaderboards/{TESTSET}/submissions/{sid}"))
    return out / "index.html"


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
def run_demo(root: Path, n_cases: int, port: int, serve: bool, hospitals: int = 3, public: int = 2,
             timeout: float = 900, min_group_size: int = 3, with_monai: bool = False) -> int:
    t0 = time.monotonic()
    algorithms = ALGORITHMS + ((MONAI_ALGORITHM,) if with_monai else ())
    root = root.resolve()
    if n_cases < public + 2:
        raise DemoError(f"--cases must be at least {public + 2} (the public sample is {public} case(s))")
    check_folder(root)
    check_docker([a.image for a in algorithms])
    prepare_folder(root)
    env = embedded_env(root)
    _use_in_process(env)
    console.rule("[bold]Touchstone demo")
    console.print(f"data folder {root} (SQLite database, filesystem broker, storage); logs in {root / 'logs'}")

    # `docker save` is disk-bound: it runs in the background while the CPU-bound steps go on
    from concurrent.futures import ThreadPoolExecutor

    saver = ThreadPoolExecutor(max_workers=2, thread_name_prefix="docker-save")
    tarballs = {a.image: saver.submit(save_tarball, a.image, root / "images") for a in algorithms}
    saver.shutdown(wait=False)
    manifest = make_testset(root, n_cases, hospitals, public)
    console.print(f"[green]✓[/] {n_cases} phantom CTs from {hospitals} hospitals, {public} in the public sample: {manifest}")

    run_cli(env, "db", "upgrade")
    organizer = run_cli(env, "users", "create", "olivia", "--role", "organizer").strip().splitlines()[-1]
    console.print("[green]✓[/] database migrated; organizer olivia created with `touchstone users create`")

    services = Services(root, env)
    api: Api | None = None
    port = free_port(port)
    api_url = f"http://127.0.0.1:{port}"
    try:
        services.start("worker", ["worker", "--queues", "gpu,cpu", "--concurrency", str(min(2, os.cpu_count() or 1))])
        services.start("api", ["serve", "--host", "127.0.0.1", "--port", str(port)])
        wait_for_api(api_url, services)
        console.print(f"[green]✓[/] API on {api_url}, Celery workers (gpu + cpu queues) running")
        api = Api(api_url)

        tokens = {"olivia (organizer)": organizer}
        people = {a.inventor: a.team for a in algorithms}
        for name, team in people.items():
            tokens[name] = api.call("POST", "/users", organizer, json={"name": name, "role": "inventor", "team": team})["token"]
        tokens["ana (analyst)"] = api.call("POST", "/users", organizer, json={"name": "ana", "role": "analyst"})["token"]
        console.print(f"[green]✓[/] inventors {', '.join(f'{n} ({t})' for n, t in people.items())} and analyst ana "
                      "created through the API")

        api.call("POST", "/testsets", organizer, json={
            "name": TESTSET, "manifest_path": str(manifest), "protocol": "touchstone",
            "description": f"{n_cases} synthetic abdominal CTs (tiny phantoms) from {hospitals} hospitals"})
        hidden = n_cases - public
        limits = {"gpus": 0, "time_per_case_s": 60.0, "memory_bytes": 2 * 1024**3, "shm_bytes": 256 * 1024**2,
                  "shard_size": max(2, -(-hidden // 3)), "quota_submissions": 5, "min_group_size": min_group_size}
        api.call("PATCH", f"/testsets/{TESTSET}", organizer, json=limits)
        console.print(f"[green]✓[/] test set {TESTSET} imported through the API (checksummed); limits: no GPU, "
                      f"{limits['time_per_case_s']:.0f} s per case, 2 GiB, {limits['shard_size']} cases per container run; "
                      f"breakdowns of fewer than {min_group_size} hidden cases suppressed for the public (phantom data: "
                      "a real test set's k is 10)")

        submissions: list[tuple[DemoAlgorithm, int]] = []
        for algo in algorithms:
            token = tokens[algo.inventor]
            api.call("POST", "/algorithms", token, json={"name": algo.algorithm, "description": algo.description})
            with console.status(f"waiting for `docker save {algo.image}`"):
                tarball = tarballs[algo.image].result()
            body = upload(api, token, tarball, algo.algorithm)
            submissions.append((algo, body["id"]))
            console.print(f"[green]✓[/] {algo.inventor} ({algo.team}) uploaded {algo.algorithm} "
                          f"({tarball.stat().st_size / 2**20:.0f} MiB `docker save` of {algo.image}): submission {body['id']}")
        (root / "tokens.json").write_text(json.dumps(tokens, indent=2))

        console.print("waiting for validation (public sample), inference (shards) and scoring...")
        rows = wait_for_results(api, organizer, [sid for _, sid in submissions], services, timeout)
        by_id = {r["id"]: r for r in rows}
        failures = 0
        for algo, sid in submissions:
            row = by_id[sid]
            if row["state"] == "failed":
                logs = api.call("GET", f"/submissions/{sid}/logs", tokens[algo.inventor])
                tail = "\n".join((logs.get("validation_log") or "").splitlines()[-8:])
                style = "yellow" if algo.expect_failure else "red"
                console.print(Panel(f"[bold]{row['failure_reason']}[/]\n\n[dim]{tail}[/]",
                                    title=f"submission {sid} ({algo.algorithm}) failed"
                                          + (" -- as expected" if algo.expect_failure else ""), border_style=style))
            if (row["state"] == "failed") != algo.expect_failure:
                failures += 1

        published = []
        with console.status("publishing the scored submissions and computing the statistics"):
            for _algo, sid in submissions:
                if by_id[sid]["state"] == "scored":
                    api.call("POST", f"/submissions/{sid}/publish", organizer)
                    published.append(sid)
        console.print(f"[green]✓[/] published {len(published)} submission(s); statistics computed "
                      "(bootstrap CIs, paired Wilcoxon tests with Holm correction, rank stability)")
        shown = print_results() if published else {}

        summary = {
            "api": api_url, "testset": TESTSET, "cases": n_cases, "public_sample": public,
            "submissions": [{"id": sid, "algorithm": a.algorithm, "team": a.team, "image": a.image,
                             "state": by_id[sid]["state"] if sid not in published else "published",
                             "failure_reason": by_id[sid]["failure_reason"], "expect_failure": a.expect_failure}
                            for a, sid in submissions],
            # what the public API serves (published scope), and what was printed
            "leaderboard": api.call("GET", f"/leaderboards/{TESTSET}"),
            "printed": shown,
            "seconds": round(time.monotonic() - t0, 1),
        }
        (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

        if failures:
            console.print(f"[red]{failures} submission(s) did not end as expected; see {root / 'logs'}[/]")
        if not serve:
            report = write_static_report(api, root, published)
            console.print(f"[green]✓[/] static report: file://{report}")
            console.print(f"demo finished in {time.monotonic() - t0:.0f} s")
            return 1 if failures else 0

        console.print(Panel(
            f"leaderboard  {api_url}/leaderboards/{TESTSET}\n"
            f"API docs     {api_url}/docs\n"
            f"metrics      {api_url}/metrics\n"
            f"tokens       {root / 'tokens.json'} (e.g. TOUCHSTONE_API_URL={api_url} "
            f"TOUCHSTONE_TOKEN=<alice's> touchstone status {submissions[0][1]})\n"
            f"ready after {time.monotonic() - t0:.0f} s; press Ctrl-C to stop", title="Touchstone is serving"))
        while True:
            services.check_alive()
            time.sleep(1.0)
    finally:
        if api is not None:
            api.client.close()
        stopping = time.monotonic()
        with console.status("stopping the API and the workers"):
            services.stop()
        console.print(f"stopped the API and the workers ({time.monotonic() - stopping:.0f} s)")


def register(app: typer.Typer) -> None:
    """Add ``touchstone demo`` to the `touchstone` app."""

    @app.command("demo")
    def demo(
        data_dir: Path = typer.Option(Path("touchstone-demo"), "--data-dir",
                                      help="demo folder; reset on every run except its image cache"),
        cases: int = typer.Option(24, "--cases", min=4, help="phantom CTs in the test set"),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="API port (a free one if taken; 0: any)"),
        no_serve: bool = typer.Option(False, "--no-serve", help="write a static HTML report and exit"),
        hospitals: int = typer.Option(3, "--hospitals", min=1, help="hospitals the phantoms come from"),
        timeout: float = typer.Option(900, "--timeout", min=30, help="seconds to wait for the submissions"),
        min_group_size: int = typer.Option(
            3, "--min-group-size", min=1,
            help="small-cell threshold k of the phantom test set (a real test set's default is 10)"),
        with_monai: bool = typer.Option(
            False, "--with-monai",
            help="also submit the trained MONAI SegResNet (build it: scripts/build-examples.sh --only monai-segresnet)"),
    ) -> None:
        """From nothing to a populated leaderboard: phantoms, the embedded stack, three submissions, statistics."""

        def terminate(_signum, _frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, terminate)
        try:
            code = run_demo(data_dir, cases, port, serve=not no_serve, hospitals=hospitals, timeout=timeout,
                            min_group_size=min_group_size, with_monai=with_monai)
        except DemoError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("stopped")
            raise typer.Exit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
        raise typer.Exit(code)
