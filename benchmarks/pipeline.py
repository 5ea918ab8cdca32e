"""Orchestration overhead of the execution pipeline: N tiny phantom cases through upload → scored.

    python benchmarks/pipeline.py --cases 200 [--broker filesystem://|redis://...] [--database URL]

A test set of ``N`` hidden tiny phantoms (+1 public-sample case) is imported; the trivial example
image (``touchstone/example-trivial``, a threshold segmenter) is uploaded as a ``docker save``
tarball through the functions the API calls, and real Celery workers (one ``gpu``-queue worker,
one ``cpu``-queue worker, as ``touchstone worker`` starts them) take it through validation, shards
of 50 cases, scoring and finalize. Measured:

- ``wall``: from the validation being enqueued (the upload is stored) to the submission being
  ``scored`` (seconds);
- ``container``: the container run time of the public-sample run and of every shard (the runtime's
  ``duration_s``, stored as ``Shard.run_seconds``);
- ``scoring``: Σ per-case scoring time (``CaseRun.scoring_seconds``).

``overhead_ms_per_case = (wall − container − scoring) / N`` (the issue's definition). Scoring runs
on the cpu worker while later shards run, so part of it overlaps the containers and subtracting
all of it flatters the figure; ``overhead_without_scoring_ms_per_case = (wall − container) / N``
is printed too as the upper bound. Last line: ``overhead_ms_per_case=<float> cases=<int>``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE = "touchstone/example-trivial:latest"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200, help="hidden cases (default 200)")
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--broker", default="filesystem://", help="Celery broker (default: the embedded filesystem://)")
    parser.add_argument("--database", default=None, help="database URL (default: SQLite in the work folder)")
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--cpu-concurrency", type=int, default=1, help="processes of the cpu-queue worker")
    args = parser.parse_args()
    if args.cases < 1:
        parser.error("--cases must be at least 1")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="touchstone-bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / "data"
    data_dir.mkdir(exist_ok=True)
    database = args.database or f"sqlite:///{data_dir / f'bench-{uuid.uuid4().hex[:6]}.db'}"
    env = {"TOUCHSTONE_DATA_DIR": str(data_dir), "TOUCHSTONE_DATABASE_URL": database,
           "TOUCHSTONE_BROKER_URL": args.broker, "TOUCHSTONE_WORKER_STARTUP_S": "30"}
    os.environ.update(env)

    import docker
    import sqlalchemy as sa

    from evaluation.phantoms import write_phantom_set
    from services import queue, submissions
    from services.api import intake
    from services.db import migrate
    from services.db.enums import Role
    from services.db.models import Algorithm, CaseRun, Shard, Submission, Team, User
    from services.db.session import get_sessionmaker, session_scope
    from services.db.testsets import import_testset
    from services.storage import Storage
    from services.cli.worker import celery_commands

    client = docker.from_env(timeout=600)
    subprocess.run(["bash", str(ROOT / "scripts/build-examples.sh"), "--only", "trivial"], check=True,
                   stdout=subprocess.DEVNULL)
    phantoms = work / f"phantoms-{args.cases + 1}"
    manifest = phantoms / "manifest.csv"
    if not manifest.exists():
        print(f"writing {args.cases + 1} tiny phantoms to {phantoms} ...", flush=True)
        write_phantom_set(phantoms, args.cases + 1, public_sample=1, size="tiny", seed=11)
    tarball = work / "trivial.tar"
    if not tarball.exists():
        with open(tarball, "wb") as handle:
            for chunk in client.images.get(IMAGE).save(named=True):
                handle.write(chunk)

    migrate.upgrade("head", database)
    with session_scope() as session:
        testset = import_testset(session, f"bench-{uuid.uuid4().hex[:6]}", manifest, protocol="touchstone")
        testset.shard_size, testset.gpus, testset.quota_submissions = args.shard_size, 0, 1000
        testset.time_per_case_s, testset.memory_bytes = 30.0, 2 << 30
        team = Team(name=f"bench-{uuid.uuid4().hex[:6]}")
        session.add(team)
        session.flush()
        user = User(name=f"bench-{team.id}-{uuid.uuid4().hex[:4]}", role=Role.inventor, team_id=team.id)
        algorithm = Algorithm(team_id=team.id, name="trivial")
        session.add_all([user, algorithm])
        testset_name = testset.name

    workers = []
    logs = []
    for command in celery_commands(["gpu", "cpu"], [], concurrency=args.cpu_concurrency, beat=False,
                                   loglevel="WARNING", data_dir=data_dir):
        log = open(work / f"worker-{command.name}.log", "wb")
        logs.append(log)
        workers.append(subprocess.Popen(command.argv, cwd=ROOT, env={**os.environ, **command.env},
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        time.sleep(3)  # let the workers connect (not counted)
        storage = Storage.from_settings()
        relative = f"uploads/bench/{uuid.uuid4().hex}.tar"
        started_upload = time.perf_counter()
        with open(tarball, "rb") as handle:
            size, sha256 = storage.save_stream(iter(lambda: handle.read(1 << 22), b""), relative)
        intake.check_docker_save_tar(storage.path(relative))
        with get_sessionmaker()() as session:
            user = session.scalar(sa.select(User).where(User.team_id == team.id))
            algorithm = session.scalar(sa.select(Algorithm).where(Algorithm.team_id == team.id))
            submission = submissions.record(session, user, algorithm, intake.find_testset(session, testset_name),
                                            image_path=relative, image_sha256=sha256, image_size=size, image_ref=None)
        upload_s = time.perf_counter() - started_upload
        started = time.perf_counter()
        queue.enqueue_validation(submission.id)
        last = None
        while True:
            with session_scope() as session:
                state = session.scalar(sa.select(Submission.state).where(Submission.id == submission.id)).value
            if state != last:
                print(f"{time.perf_counter() - started:8.2f} s  {state}", flush=True)
                last = state
            if state in ("scored", "failed", "cancelled"):
                break
            time.sleep(0.05)
        wall = time.perf_counter() - started
        with session_scope() as session:
            sub = session.get(Submission, submission.id)
            if state != "scored":
                raise SystemExit(f"the submission ended {state}: {sub.failure_reason}")
            shard_seconds = sum(session.scalars(sa.select(Shard.run_seconds).where(Shard.submission_id == sub.id)))
            scoring = sum(session.scalars(sa.select(CaseRun.scoring_seconds).where(CaseRun.submission_id == sub.id)))
            n_runs = session.scalar(sa.select(sa.func.count(CaseRun.id)).where(CaseRun.submission_id == sub.id))
            found = re.search(r"exit code 0, ([0-9.]+) s", sub.validation_log or "")
            validation_container = float(found.group(1)) if found else 0.0
    finally:
        for process in workers:
            process.send_signal(signal.SIGTERM)
        for process in workers:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for log in logs:
            log.close()

    assert n_runs == args.cases, f"{n_runs} case runs for {args.cases} cases"
    container = shard_seconds + validation_container
    n = args.cases
    print(f"broker {args.broker}, database {database.split(':', 1)[0]}, {n} cases in shards of {args.shard_size}")
    print(f"upload (stream + tar check, not in wall): {upload_s:.2f} s")
    print(f"wall (enqueue -> scored):               {wall:.2f} s")
    print(f"container compute (validation + shards): {container:.2f} s  (validation {validation_container:.2f} s)")
    print(f"scoring (sum over cases):                {scoring:.2f} s  ({1000 * scoring / n:.1f} ms per case)")
    print(f"overhead_without_scoring_ms_per_case={1000 * (wall - container) / n:.1f}")
    print(f"overhead_ms_per_case={1000 * (wall - container - scoring) / n:.1f} cases={n}")


if __name__ == "__main__":
    main()
