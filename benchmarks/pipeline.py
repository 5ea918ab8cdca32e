"""The execution pipeline end to end: N tiny phantom cases through upload → scored, with the
overhead per case and the peak memory of every process.

    .venv/bin/python benchmarks/pipeline.py --cases 200  [--stack embedded|postgres] [--workdir DIR]
    .venv/bin/python benchmarks/pipeline.py --cases 5903 --stack postgres

Stacks:

- ``embedded`` (default): SQLite in the work folder and the ``filesystem://`` broker (no broker
  process);
- ``postgres``: a fresh PostgreSQL database on the server of ``TOUCHSTONE_BENCH_POSTGRES_URL`` or
  ``TOUCHSTONE_TEST_POSTGRES_URL`` (``source scripts/setup.sh`` exports the latter; created here
  and dropped afterwards unless ``--keep-db``) and a ``redis-server`` of the benchmark's own on a
  free port (``appendonly yes``, as docs/operations.md asks for production), so its memory is
  this run's alone.

A test set of ``N`` hidden tiny phantoms (64³, +1 public-sample case) is imported: ``--distinct``
(201) phantoms are written once per work folder, further cases name their files under their own
case ids (the case count is the point, not the pixels); the real API runs as its own uvicorn
process and the trivial example image (``touchstone/example-trivial``, a threshold segmenter) is
uploaded to it as a ``docker save`` tarball over HTTP (``POST /api/v1/submissions``, an
inventor's token); real Celery workers started as ``touchstone worker`` starts them (one
``gpu``-queue worker, one ``cpu``-queue worker with ``--cpu-concurrency`` processes and no beat)
take it through validation, shards of ``--shard-size`` cases, scoring, finalize and the
statistics. The benchmark polls
``GET /api/v1/submissions/{id}`` through the API (as a client would) and prints a progress line
every ``--progress-s`` seconds.

Measured:

- ``wall``: from the API's 202 answer (the upload is stored and validation enqueued) to the
  submission being ``scored`` (seconds);
- ``container``: the container run time of the public-sample run and of every shard (the runtime's
  ``duration_s``, stored as ``Shard.run_seconds``);
- ``scoring``: Σ per-case scoring time (``CaseRun.scoring_seconds``);
- ``finalize``: from the last score row seen to ``scored``: the completion check, the state change
  and ``services.leaderboard.on_submission_scored`` (the statistics), polled every 0.5 s;
- peak RSS (psutil, every 0.5 s, benchmarks/process_memory.py) of the API process, of each
  worker (its main process and its pool processes) and of the broker (``redis-server``); with the
  total RSS of each at 10 %, 50 % and 100 % of the run, to show whether it grows.

``overhead_ms_per_case = (wall − container − scoring − finalize) / N``. Scoring runs on the cpu
worker while later shards run, so part of it overlaps the containers and subtracting all of it
flatters the figure (it goes negative when scoring, not the containers, is the slower stream);
``overhead_without_scoring_ms_per_case = (wall − container − finalize) / N`` is the upper bound and
``overhead_critical_path_ms_per_case = (wall − max(container, scoring) − finalize) / N`` what is
left when the two streams overlap perfectly. Last line: ``overhead_ms_per_case=<float> cases=<int> overhead_critical_path_ms_per_case=<float> wall_s=<float>
finalize_s=<float> peak_rss_mib_api=<float> peak_rss_mib_gpu_worker=<float>
peak_rss_mib_cpu_worker=<float> peak_rss_mib_broker=<float>`` (the broker's figure is 0 for the
filesystem broker, which has no process).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_db import fresh_postgres_database  # noqa: E402
from benchmarks.process_memory import MemorySampler, mib  # noqa: E402

IMAGE = "touchstone/example-trivial:latest"
FINISHED = ("scored", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_set_manifest(work: Path, cases: int, distinct: int) -> Path:
    """The manifest of ``cases`` hidden + 1 public-sample tiny phantoms. ``distinct`` of them
    are written (``evaluation.phantoms.write_phantom_set``, seed 11, once per work folder); the
    other rows name the files of phantom ``i mod distinct`` under their own case ids (hidden),
    so a 5,903-case test set costs 201 phantoms' writing time: the case count is what is measured."""
    import csv

    from evaluation.phantoms import write_phantom_set

    distinct = max(1, min(distinct, cases + 1))
    source = work / f"phantoms-{distinct}"
    if not (source / "manifest.csv").exists():
        started = time.perf_counter()
        print(f"writing {distinct} tiny phantoms to {source} ...", flush=True)
        write_phantom_set(source, distinct, public_sample=1, size="tiny", seed=11)
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    if cases + 1 == distinct:
        return source / "manifest.csv"
    with open(source / "manifest.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows = reader.fieldnames, list(reader)
    manifest = source / f"manifest-{cases + 1}.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        for i in range(cases + 1):
            row = dict(rows[i % distinct])
            if i >= distinct:
                row["case_id"], row["public_sample"] = f"{row['case_id']}_r{i:05d}", "false"
            writer.writerow(row)
    return manifest


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """A persistent redis-server of our own (its memory is this run's alone)."""
    import redis

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                                "--appendonly", "yes", "--save", ""],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            redis.Redis(port=port, socket_timeout=1).ping()
            return process, f"redis://127.0.0.1:{port}/0"
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)
    raise SystemExit("redis-server did not start")


def start_api(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.api.app:create_app", "--factory", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env={**os.environ, **env}, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/api/v1/health", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"the API did not start; see {log}")


def stop(process: subprocess.Popen, timeout: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200, help="hidden cases (default 200)")
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--stack", choices=("embedded", "postgres"), default="embedded",
                        help="embedded: SQLite + filesystem://; postgres: PostgreSQL + a Redis of its own")
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (phantoms are reused; default: temporary)")
    parser.add_argument("--cpu-concurrency", type=int, default=1, help="processes of the cpu-queue worker")
    parser.add_argument("--distinct", type=int, default=201,
                        help="phantoms written; further cases reuse their files under their own ids (default 201)")
    parser.add_argument("--progress-s", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--keep-db", action="store_true", help="postgres: keep the database (its URL is printed)")
    args = parser.parse_args()
    if args.cases < 1:
        parser.error("--cases must be at least 1")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="touchstone-bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / f"run-{uuid.uuid4().hex[:6]}"
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True)
    services_started: list[subprocess.Popen] = []
    drop_database = None
    redis_process = None
    if args.stack == "postgres":
        database, drop_database = fresh_postgres_database("ts_bench_pipeline", keep=args.keep_db)
        redis_process, broker = start_redis(run_dir / "redis")
        services_started.append(redis_process)
    else:
        database, broker = f"sqlite:///{data_dir / 'touchstone.db'}", "filesystem://"
    env = {"TOUCHSTONE_DATA_DIR": str(data_dir), "TOUCHSTONE_DATABASE_URL": database,
           "TOUCHSTONE_BROKER_URL": broker, "TOUCHSTONE_WORKER_STARTUP_S": "30", "TOUCHSTONE_LOG_LEVEL": "WARNING"}
    os.environ.update(env)
    try:
        run(args, work, run_dir, data_dir, database, broker, env, services_started, redis_process)
    finally:
        for process in reversed(services_started):
            stop(process)
        if drop_database is not None:
            drop_database()


def run(args, work: Path, run_dir: Path, data_dir: Path, database: str, broker: str, env: dict[str, str],
        services_started: list[subprocess.Popen], redis_process: subprocess.Popen | None) -> None:
    import docker
    import httpx
    import sqlalchemy as sa

    from evaluation.labels import ORGANS
    from services.cli.worker import celery_commands
    from services.db import migrate
    from services.db.accounts import create_user
    from services.db.models import Algorithm, Case, CaseRun, Score, Shard, Submission
    from services.db.session import session_scope
    from services.db.testsets import import_testset

    client = docker.from_env(timeout=600)
    subprocess.run(["bash", str(ROOT / "scripts/build-examples.sh"), "--only", "trivial"], check=True,
                   stdout=subprocess.DEVNULL)
    manifest = test_set_manifest(work, args.cases, args.distinct)
    tarball = work / "trivial.tar"
    image_id = client.images.get(IMAGE).id
    saved_id = work / "trivial.id"  # the image the tarball holds: saved again when it was rebuilt
    if not tarball.exists() or not saved_id.exists() or saved_id.read_text() != image_id:
        with open(tarball, "wb") as handle:
            for chunk in client.images.get(IMAGE).save(named=True):
                handle.write(chunk)
        saved_id.write_text(image_id)

    migrate.upgrade("head", database)
    started_import = time.perf_counter()
    with session_scope() as session:
        testset = import_testset(session, "bench", manifest, protocol="touchstone")
        testset.shard_size, testset.gpus, testset.quota_submissions = args.shard_size, 0, 1000
        testset.time_per_case_s, testset.memory_bytes = 30.0, 2 << 30
        inventor, inventor_token = create_user(session, "bench-inventor", "inventor", "bench-team")
        session.flush()
        session.add(Algorithm(team_id=inventor.team_id, name="trivial"))
    import_s = time.perf_counter() - started_import
    print(f"imported the test set ({args.cases + 1} cases) in {import_s:.1f} s", flush=True)

    api, base = start_api(env, run_dir / "api.log")
    services_started.append(api)
    workers: dict[str, subprocess.Popen] = {}
    for command in celery_commands(["gpu", "cpu"], [], concurrency=args.cpu_concurrency, beat=False,
                                   loglevel="WARNING", data_dir=data_dir):
        log = open(run_dir / f"worker-{command.name}.log", "wb")
        workers[command.name] = subprocess.Popen(command.argv, cwd=ROOT, env={**os.environ, **command.env},
                                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        services_started.append(workers[command.name])
    roots = {"api": api.pid, "gpu worker": workers["gpu"].pid, "cpu worker": workers["cpu"].pid}
    if redis_process is not None:
        roots["broker (redis-server)"] = redis_process.pid
    time.sleep(3)  # let the workers connect (not counted)

    headers = {"Authorization": f"Bearer {inventor_token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=600) as http, \
            MemorySampler(roots, interval_s=0.5) as sampler:
        started_upload = time.perf_counter()
        with open(tarball, "rb") as handle:
            answer = http.post("/api/v1/submissions", data={"algorithm": "trivial", "testset": "bench"},
                               files={"image": ("trivial.tar", handle, "application/x-tar")})
        answer.raise_for_status()
        submission_id = answer.json()["id"]
        started = time.perf_counter()
        upload_s = started - started_upload
        print(f"uploaded {tarball.stat().st_size / 1e6:.0f} MB over HTTP in {upload_s:.1f} s; submission {submission_id}",
              flush=True)
        hidden_score_rows = (sa.select(sa.func.count(Score.id)).join(Case, Case.id == Score.case_id)
                             .where(Score.submission_id == submission_id, Case.public_sample.is_(False)))
        last_state, last_progress, failed_polls = None, started, []
        n_scored, last_score_at = 0, started
        while True:
            answer = http.get(f"/api/v1/submissions/{submission_id}")
            now = time.perf_counter()
            if answer.status_code != 200:  # a client retries; the benchmark counts and reports them
                failed_polls.append(f"{now - started:.1f} s: {answer.status_code} {answer.text[:200]}")
                print(f"{now - started:8.1f} s  GET /submissions/{submission_id} answered {failed_polls[-1]}", flush=True)
                time.sleep(0.5)
                continue
            state = answer.json()["state"]
            with session_scope() as session:
                scores = session.scalar(hidden_score_rows)
            if scores // len(ORGANS) != n_scored:
                n_scored, last_score_at = scores // len(ORGANS), now
            if state != last_state:
                print(f"{now - started:8.1f} s  {state}", flush=True)
                last_state = state
            if now - last_progress >= args.progress_s:
                with session_scope() as session:
                    n_runs = session.scalar(sa.select(sa.func.count(CaseRun.id)).where(CaseRun.submission_id == submission_id))
                rss = ", ".join(f"{name} {mib(tree.totals[-1][1]) if tree.totals else 0:.0f}"
                                for name, tree in sampler.trees.items())
                print(f"{now - started:8.1f} s  {state}: {n_runs}/{args.cases} cases run, {n_scored} scored; "
                      f"RSS MiB {rss}; load {os.getloadavg()[0]:.1f}", flush=True)
                last_progress = now
            if state in FINISHED:
                break
            time.sleep(0.5)
        wall = time.perf_counter() - started
        finalize_s = time.perf_counter() - last_score_at

    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        if state != "scored":
            raise SystemExit(f"the submission ended {state}: {sub.failure_reason}")
        shard_seconds = sum(session.scalars(sa.select(Shard.run_seconds).where(Shard.submission_id == sub.id)))
        workers_seen = set(session.scalars(sa.select(Shard.worker_hostname).where(Shard.submission_id == sub.id)))
        scoring = sum(session.scalars(sa.select(CaseRun.scoring_seconds).where(CaseRun.submission_id == sub.id)))
        n_runs = session.scalar(sa.select(sa.func.count(CaseRun.id)).where(CaseRun.submission_id == sub.id))
        n_score_rows = session.scalar(hidden_score_rows)
        found = re.search(r"exit code 0, ([0-9.]+) s", sub.validation_log or "")
        validation_container = float(found.group(1)) if found else 0.0

    assert n_runs == args.cases, f"{n_runs} case runs for {args.cases} cases"
    assert n_score_rows == args.cases * len(ORGANS), f"{n_score_rows} score rows for {args.cases} cases"
    container = shard_seconds + validation_container
    n = args.cases
    print(f"stack {args.stack}: database {database.split(':', 1)[0]}, broker {broker.split(':', 1)[0]}; "
          f"{n} cases in shards of {args.shard_size} ({len(workers_seen)} gpu worker); cpu concurrency "
          f"{args.cpu_concurrency}; {os.cpu_count()} CPU cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"upload (HTTP, not in wall):              {upload_s:.1f} s")
    print(f"wall (202 -> scored):                     {wall:.1f} s")
    print(f"container compute (validation + shards):  {container:.1f} s  (validation {validation_container:.1f} s)")
    print(f"scoring (sum over cases):                 {scoring:.1f} s  ({1000 * scoring / n:.1f} ms per case)")
    print(f"finalize (last score -> scored, incl. statistics): {finalize_s:.1f} s")
    print(f"API polls not answered 200: {len(failed_polls)}" + "".join(f"\n  {line}" for line in failed_polls[:10]))
    peaks = {}
    for name, tree in sampler.trees.items():
        peaks[name] = tree.peak_rss
        per_process = ", ".join(f"{mib(rss):.0f}" for _, rss in sorted(tree.peak_process_rss.items()))
        print(f"peak RSS {name:<22} {mib(tree.peak_rss):7.1f} MiB per process ({per_process}); total "
              f"{mib(tree.peak_total_rss):.0f} MiB; total at 10/50/100 % of the run: "
              f"{mib(tree.total_at(0.1)):.0f} / {mib(tree.total_at(0.5)):.0f} / {mib(tree.total_at(1.0)):.0f} MiB")
    critical = 1000 * (wall - max(container, scoring) - finalize_s) / n
    print(f"overhead_without_scoring_ms_per_case={1000 * (wall - container - finalize_s) / n:.1f}")
    print(f"overhead_critical_path_ms_per_case={critical:.1f} (wall - max(container, scoring) - finalize)")
    print(f"overhead_ms_per_case={1000 * (wall - container - scoring - finalize_s) / n:.1f} cases={n} "
          f"overhead_critical_path_ms_per_case={critical:.1f} "
          f"wall_s={wall:.1f} finalize_s={finalize_s:.1f} "
          f"peak_rss_mib_api={mib(peaks['api']):.1f} peak_rss_mib_gpu_worker={mib(peaks['gpu worker']):.1f} "
          f"peak_rss_mib_cpu_worker={mib(peaks['cpu worker']):.1f} "
          f"peak_rss_mib_broker={mib(peaks.get('broker (redis-server)', 0)):.1f}")


if __name__ == "__main__":
    main()
