"""API latency at Touchstone scale on PostgreSQL.

Fills a fresh PostgreSQL database with one test set of 5,903 cases and 100 published submissions x
5,903 cases x 9 organs of scores (5.3 M rows, loaded with COPY), computes each submission's aggregates
once (services.db.aggregates, as the service does after scoring), starts the API in a real uvicorn
process and measures, over HTTP, p50/p99 latency of:

- the public leaderboard (``GET /api/v1/results/leaderboard?testset=...``), served from the
  aggregates table;
- per-submission endpoints: the submission, its aggregates, a 1,000-row page of its per-case scores.

Usage: ``.venv/bin/python benchmarks/api.py [--submissions 100 --cases 5903 --requests 300]``
(PostgreSQL URL from TOUCHSTONE_BENCH_POSTGRES_URL or TOUCHSTONE_TEST_POSTGRES_URL; the benchmark
database is created and dropped). The last line is ``leaderboard_p99_ms=<float>``; goal < 50 ms.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluation.labels import ORGANS  # noqa: E402
from services.db import migrate  # noqa: E402
from services.db.accounts import create_user  # noqa: E402
from services.db.aggregates import compute_basic_aggregates  # noqa: E402
from services.db.enums import SubmissionState  # noqa: E402
from services.db.models import Algorithm, Case, Submission, Team, TestSet  # noqa: E402

PROTOCOL_KEY = "touchstone@1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(url: str, n_submissions: int, n_cases: int) -> tuple[str, list[int]]:
    """Create users, the test set, cases, submissions and scores; returns (organizer token, ids)."""
    engine = sa.create_engine(url)
    with Session(engine) as s:
        _, token = create_user(s, "bench-organizer", "organizer")
        testset = TestSet(
            name="bench", protocol_name="touchstone", protocol_version="1", protocol_key=PROTOCOL_KEY,
            protocol_json={}, manifest_sha256="0" * 64, root_path="/data/bench", time_per_case_s=600,
            memory_bytes=2**35, gpus=1, shm_bytes=2**31, pids_limit=512, shard_size=50, quota_submissions=3,
            quota_period_days=7,
        )
        s.add(testset)
        s.flush()
        hospitals = [f"hospital-{i}" for i in range(17)]
        s.execute(sa.insert(Case), [
            {"testset_id": testset.id, "case_id": f"case_{i:05d}", "hospital": hospitals[i % 17], "age": 20 + i % 70,
             "sex": "MF"[i % 2], "image_path": f"/data/bench/{i}/ct.nii.gz", "labels_path": f"/data/bench/{i}",
             "public_sample": i < 5, "extra": {}}
            for i in range(n_cases)
        ])
        case_ids = list(s.scalars(sa.select(Case.id).where(Case.testset_id == testset.id).order_by(Case.id)))
        submission_ids = []
        for k in range(n_submissions):
            team = Team(name=f"team-{k}")
            s.add(team)
            s.flush()
            algorithm = Algorithm(team_id=team.id, name=f"algo-{k}")
            s.add(algorithm)
            s.flush()
            sub = Submission(algorithm_id=algorithm.id, testset_id=testset.id, team_id=team.id,
                             state=SubmissionState.published, image_sha256=f"{k:064x}")
            s.add(sub)
            s.flush()
            submission_ids.append(sub.id)
        s.commit()
    engine.dispose()

    raw_url = sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    rng = np.random.default_rng(0)
    cases = np.asarray(case_ids)
    started = time.perf_counter()
    with psycopg.connect(raw_url) as conn, conn.cursor() as cur:
        with cur.copy("COPY scores (submission_id, case_id, organ, protocol_key, dsc, nsd, hd95, assd, status) FROM STDIN") as copy:
            for k, sub_id in enumerate(submission_ids):
                skill = 0.70 + 0.2 * k / max(n_submissions - 1, 1)
                buffer = io.StringIO()
                for organ in ORGANS:
                    dsc = np.clip(rng.normal(skill, 0.1, len(cases)), 0, 1)
                    nsd = np.clip(dsc + rng.normal(0, 0.05, len(cases)), 0, 1)
                    hd95 = rng.gamma(2.0, 3.0, len(cases))
                    assd = hd95 / 4
                    for c, d, n, h, a in zip(cases, dsc, nsd, hd95, assd):
                        buffer.write(f"{sub_id}\t{c}\t{organ}\t{PROTOCOL_KEY}\t{d:.6f}\t{n:.6f}\t{h:.4f}\t{a:.4f}\tok\n")
                copy.write(buffer.getvalue())
                if (k + 1) % 10 == 0:
                    print(f"  scores: {k + 1}/{n_submissions} submissions copied ({time.perf_counter() - started:.0f} s)",
                          flush=True)
        conn.commit()
        cur.execute("ANALYZE")
    return token, submission_ids


def compute_aggregates(url: str, submission_ids: list[int]) -> None:
    engine = sa.create_engine(url)
    started = time.perf_counter()
    for k, sub_id in enumerate(submission_ids):
        with Session(engine) as s:
            compute_basic_aggregates(s, sub_id)
            s.commit()
        if (k + 1) % 20 == 0:
            print(f"  aggregates: {k + 1}/{len(submission_ids)} ({time.perf_counter() - started:.0f} s)", flush=True)
    engine.dispose()


def latency(client: httpx.Client, path: str, n: int, headers: dict | None = None) -> tuple[float, float]:
    for _ in range(5):  # warm-up
        client.get(path, headers=headers).raise_for_status()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = client.get(path, headers=headers)
        samples.append((time.perf_counter() - t0) * 1000)
        response.raise_for_status()
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=100)
    parser.add_argument("--cases", type=int, default=5903)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    base_url = os.environ.get("TOUCHSTONE_BENCH_POSTGRES_URL") or os.environ.get("TOUCHSTONE_TEST_POSTGRES_URL")
    if not base_url:
        sys.exit("set TOUCHSTONE_BENCH_POSTGRES_URL (or TOUCHSTONE_TEST_POSTGRES_URL); scripts/setup.sh exports the latter")
    name = f"ts_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(base_url).set(database=name).render_as_string(hide_password=False)
    server = None
    try:
        migrate.upgrade("head", url)
        t0 = time.perf_counter()
        print(f"filling {name}: {args.submissions} submissions x {args.cases} cases x {len(ORGANS)} organs", flush=True)
        token, submission_ids = fill(url, args.submissions, args.cases)
        t1 = time.perf_counter()
        compute_aggregates(url, submission_ids)
        t2 = time.perf_counter()
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            n_scores = conn.scalar(sa.text("select count(*) from scores"))
            n_aggregates = conn.scalar(sa.text("select count(*) from aggregates"))
        engine.dispose()
        print(f"scores={n_scores} loaded in {t1 - t0:.1f} s; aggregates={n_aggregates} computed in {t2 - t1:.1f} s")

        port = _free_port()
        env = {**os.environ, "TOUCHSTONE_DATABASE_URL": url, "TOUCHSTONE_DATA_DIR": f"/tmp/{name}",
               "TOUCHSTONE_LOG_LEVEL": "WARNING"}
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "services.api.app:create_app", "--factory", "--port", str(port),
             "--log-level", "warning", "--no-access-log"], cwd=REPO, env=env)
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        headers = {"Authorization": f"Bearer {token}"}
        sub = submission_ids[len(submission_ids) // 2]
        with httpx.Client(base_url=base, timeout=30) as client:
            board = client.get("/api/v1/results/leaderboard", params={"testset": "bench"}).json()
            assert len(board["entries"]) == args.submissions, "every published submission is on the board"
            results = {
                "leaderboard": latency(client, "/api/v1/results/leaderboard?testset=bench", args.requests),
                "submission": latency(client, f"/api/v1/submissions/{sub}", args.requests, headers),
                "submission_aggregates": latency(client, f"/api/v1/results/submissions/{sub}/aggregates", args.requests),
                "submission_scores_page": latency(
                    client, f"/api/v1/results/submissions/{sub}/scores?limit=1000", max(args.requests // 3, 20), headers),
            }
        for label, (p50, p99) in results.items():
            print(f"{label:<24} p50={p50:8.2f} ms  p99={p99:8.2f} ms")
        print(f"leaderboard_p99_ms={results['leaderboard'][1]:.2f}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
