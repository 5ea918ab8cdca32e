"""More than one container worker, measured: the same run with one and with three ``gpu``-queue
workers (PostgreSQL + Redis), shards counted per worker, peak PostgreSQL connections.

    source scripts/setup.sh   # PostgreSQL (TOUCHSTONE_TEST_POSTGRES_URL), redis-server, Docker
    .venv/bin/python benchmarks/multi_worker.py [--cases 24] [--shard-size 2] [--workers 3]

One fresh PostgreSQL database and a redis-server of the benchmark's own (benchmarks/pipeline.py's
helpers), two test sets of the same ``--cases`` hidden tiny phantoms (+1 public-sample case), one
``cpu``-queue worker (concurrency 2) and ``gpu``-queue workers started as separate ``touchstone
worker --queues gpu --name node-<i>`` processes would start them (distinct Celery node names).
The algorithm is the pipeline tests' slowed trivial segmenter
(tests/integration/pipeline/slow_algorithm: 2 s of sleep per hidden case, little CPU), so a shard
costs what a GPU-bound shard costs its node -- time on that node, not on the shared CPUs. (A
CPU-bound algorithm on a 2-core machine cannot go faster with more workers on the same machine;
on real nodes every worker has its own GPU.)

1. ``node-1`` alone: the image is uploaded (a ``docker save`` tarball, stored as the API stores
   it) and submitted to the first test set;
2. ``node-2`` and ``node-3`` join: the same image (by the digest the team uploaded) is submitted to
   the second test set.

``wall`` is from the submission becoming ``queued`` (validation done, shards enqueued) to
``scored``, so the one-off image load of the first run is not counted. Printed: both walls, the
container time of the shards, shards per worker (``Shard.worker_hostname`` is ``host:pid`` of the
pool process that ran it, mapped to its node by the process tree), and ``speedup = wall(1) /
wall(N)``. Last line: ``speedup=<float> wall_1_s=<float> wall_<N>_s=<float>
shards_per_worker=<a>/<b>/<c> cases=<int>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pipeline import fresh_postgres_database, start_redis, stop  # noqa: E402

SLOW_IMAGE = "touchstone/test-slow-algorithm:latest"


def node_of(pid: int, workers: dict[str, subprocess.Popen]) -> str:
    import psutil

    for node, process in workers.items():
        try:
            if pid == process.pid or pid in {c.pid for c in psutil.Process(process.pid).children(recursive=True)}:
                return node
        except psutil.NoSuchProcess:
            continue
    return f"unknown pid {pid}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=24, help="hidden cases per test set (default 24)")
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3, help="gpu-queue workers of the second run (default 3)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.shard_size < 2:
        parser.error("--shard-size must be at least 2 (the slowed algorithm sleeps only in runs of several cases)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="touchstone-bench-multi-"))
    run_dir = work / f"run-{uuid.uuid4().hex[:6]}"
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True)
    started_processes: list[subprocess.Popen] = []
    database, drop = fresh_postgres_database(keep=False)
    try:
        redis_process, broker = start_redis(run_dir / "redis")
        started_processes.append(redis_process)
        env = {"TOUCHSTONE_DATA_DIR": str(data_dir), "TOUCHSTONE_DATABASE_URL": database,
               "TOUCHSTONE_BROKER_URL": broker, "TOUCHSTONE_WORKER_STARTUP_S": "10",
               "TOUCHSTONE_WORKER_CONTAINER_CPUS": "1", "TOUCHSTONE_LOG_LEVEL": "WARNING"}
        os.environ.update(env)
        run(args, work, run_dir, data_dir, database, started_processes)
    finally:
        for process in reversed(started_processes):
            stop(process)
        drop()


def run(args, work: Path, run_dir: Path, data_dir: Path, database: str,
        started_processes: list[subprocess.Popen]) -> None:
    import docker
    import sqlalchemy as sa

    from evaluation.phantoms import write_phantom_set
    from services import queue, submissions
    from services.api import intake
    from services.cli.worker import celery_commands
    from services.db import migrate
    from services.db.accounts import create_user
    from services.db.enums import ShardState
    from services.db.models import Algorithm, Shard, Submission, User
    from services.db.session import session_scope
    from services.db.testsets import import_testset
    from services.storage import Storage

    client = docker.from_env(timeout=600)
    base_image = os.environ.get("TOUCHSTONE_BASE_IMAGE", "touchstone/base:bookworm")
    client.images.build(path=str(ROOT / "tests/integration/pipeline/slow_algorithm"), tag=SLOW_IMAGE,
                        buildargs={"BASE_IMAGE": base_image}, rm=True)
    image_id = client.images.get(SLOW_IMAGE).id
    tarball = work / "slow.tar"
    saved_id = work / "slow.id"
    if not tarball.exists() or not saved_id.exists() or saved_id.read_text() != image_id:
        print(f"docker save {SLOW_IMAGE} ...", flush=True)
        with open(tarball, "wb") as handle:
            for chunk in client.images.get(SLOW_IMAGE).save(named=True):
                handle.write(chunk)
        saved_id.write_text(image_id)
    manifest = work / f"phantoms-{args.cases + 1}" / "manifest.csv"
    if not manifest.exists():
        write_phantom_set(manifest.parent, args.cases + 1, public_sample=1, size="tiny", seed=12)

    migrate.upgrade("head", database)
    testsets = ("one-worker", f"{args.workers}-workers")
    with session_scope() as session:
        for name in testsets:
            testset = import_testset(session, name, manifest, protocol="touchstone")
            testset.shard_size, testset.gpus, testset.quota_submissions = args.shard_size, 0, 1000
            testset.time_per_case_s, testset.memory_bytes = 30.0, 1 << 30
        inventor, _ = create_user(session, "bench-inventor", "inventor", "bench-team")
        session.flush()
        session.add(Algorithm(team_id=inventor.team_id, name="slow"))

    gpu: dict[str, subprocess.Popen] = {}

    def start(queues: list[str], name: str) -> subprocess.Popen:
        [command] = celery_commands(queues, [], concurrency=2, beat=False, loglevel="WARNING",
                                    data_dir=data_dir, name=name)
        process = subprocess.Popen(command.argv, cwd=ROOT, env={**os.environ, **command.env},
                                   stdout=open(run_dir / f"worker-{name}.log", "wb"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        started_processes.append(process)
        return process

    def submit(testset_name: str, **image) -> int:
        with session_scope() as session:
            user = session.scalar(sa.select(User).where(User.name == "bench-inventor"))
            algorithm = session.scalar(sa.select(Algorithm).where(Algorithm.team_id == user.team_id))
            submission = submissions.record(session, user, algorithm, intake.find_testset(session, testset_name),
                                            **image)
            submission_id = submission.id
        queue.enqueue_validation(submission_id)
        return submission_id

    peak_connections = {"n": 0}

    def wait(submission_id: int, label: str) -> float:
        queued_at, state, last = None, None, None
        while state not in ("scored", "failed", "cancelled"):
            with session_scope() as session:
                connections = session.scalar(sa.text(
                    "select count(*) from pg_stat_activity where datname = current_database()"))
                peak_connections["n"] = max(peak_connections["n"], connections)
                state = session.scalar(sa.select(Submission.state).where(Submission.id == submission_id)).value
                done = session.scalar(sa.select(sa.func.count(Shard.id)).where(
                    Shard.submission_id == submission_id, Shard.state == ShardState.succeeded))
                total = session.scalar(sa.select(sa.func.count(Shard.id)).where(Shard.submission_id == submission_id))
            if queued_at is None and state not in ("received", "validating"):
                queued_at = time.perf_counter()
            if (state, done) != last:
                print(f"  {label}: {state}, {done}/{total} shards succeeded", flush=True)
                last = (state, done)
            time.sleep(0.1)
        if state != "scored":
            raise SystemExit(f"submission {submission_id} ended {state}; logs in {run_dir}")
        return time.perf_counter() - queued_at

    def shards_of(submission_id: int) -> tuple[dict[str, int], float]:
        with session_scope() as session:
            rows = session.execute(sa.select(Shard.worker_hostname, Shard.run_seconds).where(
                Shard.submission_id == submission_id)).all()
        counts = {node: 0 for node in gpu}
        for owner, _ in rows:
            node = node_of(int(owner.rsplit(":", 1)[1]), gpu)
            counts[node] = counts.get(node, 0) + 1
        return counts, sum(seconds or 0.0 for _, seconds in rows)

    start(["cpu"], "cpu")
    gpu["node-1"] = start(["gpu"], "node-1")
    time.sleep(3)  # let the workers connect (not counted)
    storage = Storage.from_settings()
    relative = f"uploads/bench/{uuid.uuid4().hex}.tar"
    with open(tarball, "rb") as handle:
        size, sha256 = storage.save_stream(iter(lambda: handle.read(1 << 22), b""), relative)
    intake.check_docker_save_tar(storage.path(relative))
    print(f"{args.cases} hidden cases in shards of {args.shard_size}; {os.cpu_count()} CPU cores, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    first = submit(testsets[0], image_path=relative, image_sha256=sha256, image_size=size, image_ref=None)
    wall_1 = wait(first, "1 worker")
    counts_1, container_1 = shards_of(first)
    for i in range(2, args.workers + 1):
        gpu[f"node-{i}"] = start(["gpu"], f"node-{i}")
    time.sleep(3)
    with session_scope() as session:
        digest = session.scalar(sa.select(Submission.image_digest).where(Submission.id == first))
    second = submit(testsets[1], image_path=None, image_sha256=None, image_size=None, image_ref=digest)
    wall_n = wait(second, f"{args.workers} workers")
    counts_n, container_n = shards_of(second)
    per_worker = "/".join(str(counts_n.get(f"node-{i}", 0)) for i in range(1, args.workers + 1))
    print(f"1 worker:  wall {wall_1:.1f} s (queued -> scored), shard containers {container_1:.1f} s, "
          f"shards per worker {counts_1}")
    print(f"{args.workers} workers: wall {wall_n:.1f} s (queued -> scored), shard containers {container_n:.1f} s, "
          f"shards per worker {counts_n}")
    print(f"peak PostgreSQL connections to the database: {peak_connections['n']} ({args.workers} gpu workers, "
          f"1 cpu worker of concurrency 2, this benchmark's pool)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"speedup={wall_1 / wall_n:.2f} wall_1_s={wall_1:.1f} wall_{args.workers}_s={wall_n:.1f} "
          f"shards_per_worker={per_worker} cases={args.cases}")


if __name__ == "__main__":
    main()
