"""API latency at Touchstone scale on PostgreSQL: the leaderboard and the per-submission endpoints.

1. **Fill** a fresh PostgreSQL database (created and dropped here, ``synchronous_commit=off``):
   one test set of 5,903 cases (17 hospitals, age, sex), 100 published submissions of 100 teams,
   their 100 x 5,903 x 9 = 5.3 M scores and 590 k case runs (wall seconds) plus shards (peak
   memory) -- the rows a scored submission has. Scores and case runs go in with binary ``COPY``
   built by numpy (no per-row Python); the table's indexes and foreign keys are dropped before the
   load and re-created after it (one sort per index instead of 5.3 M index insertions).
2. **Statistics** through the service's own code (``services.leaderboard``):

   a. every submission's aggregates (``store_submission_aggregates``: overall + per hospital /
      age decade / sex, organ x metric, bootstrap CIs) with ``--aggregate-resamples`` (default 100)
      bootstrap resamples: 540 rows per submission, ~5 s each here even at 100 resamples (per-row
      overhead dominates), ~8.5 min for 99 -- the production setting would be slower still; the
      read path reads the same rows either way (same count, same columns);
   b. ``on_submission_scored`` for the last submission with the production options
      (``DEFAULT_OPTIONS``: 1,000 resamples) -- exactly what ``finalize`` runs when the 100th
      submission is scored: its aggregates, then rankings (4 methods), all 9,900 pairwise Wilcoxon
      tests and bootstrap rank stability of 20 organ x metric matrices in both scopes. Timed.
3. **Latency**: the API in a real uvicorn process; p50/p99 over HTTP (keep-alive, sequential) of

   - ``GET /api/v1/leaderboards/bench`` (the leaderboard the pages and the CLI read; anonymous),
     also per organ and with an organizer's token (``scope=all``);
   - per submission: ``GET /api/v1/leaderboards/bench/submissions/{id}`` (aggregates + ranks),
     ``.../submissions/{id}/cases?limit=1000`` (analyst), ``GET /api/v1/results/submissions/{id}/scores?limit=1000``
     (organizer), ``GET /api/v1/submissions/{id}`` (organizer).

Usage::

    source scripts/setup.sh   # PostgreSQL; exports TOUCHSTONE_TEST_POSTGRES_URL
    .venv/bin/python benchmarks/api.py [--submissions 100 --cases 5903 --requests 500]

(URL from TOUCHSTONE_BENCH_POSTGRES_URL or TOUCHSTONE_TEST_POSTGRES_URL.) Prints each stage's time
and the load average; the last line is ``leaderboard_p99_ms=<float>`` (anonymous
``/leaderboards/bench``); goal < 50 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_db import add_bench_submissions, add_bench_testset, fresh_postgres_database  # noqa: E402
from evaluation.labels import ORGANS  # noqa: E402
from services.db import migrate  # noqa: E402
from services.db.accounts import create_user  # noqa: E402
from services.db.enums import ShardState, SubmissionState  # noqa: E402
from services.db.models import Shard, Submission, TestSet  # noqa: E402
from services.leaderboard import DEFAULT_OPTIONS, StatsOptions, on_submission_scored  # noqa: E402
from services.leaderboard.compute import load_cases, store_submission_aggregates  # noqa: E402

PROTOCOL_KEY = "touchstone@1"
TESTSET = "bench"
N_HOSPITALS = 17
PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- binary COPY ------------------------------------------------------------------------------------
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + np.array([0, 0], dtype=">i4").tobytes()
COPY_TRAILER = np.array([-1], dtype=">i2").tobytes()
PG_BINARY = {"integer": ">i4", "bigint": ">i8", "double precision": ">f8", "timestamp with time zone": ">i8"}


def column_types(conn: psycopg.Connection, table: str) -> dict[str, str]:
    rows = conn.execute(
        "select a.attname, format_type(a.atttypid, a.atttypmod) from pg_attribute a "
        "where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped", (table,)
    ).fetchall()
    return {name: ("text" if kind.startswith(("character varying", "text")) else kind) for name, kind in rows}


def binary_rows(types: dict[str, str], columns: dict[str, object], n: int) -> bytes:
    """``n`` rows of binary COPY data (no header): each column a numpy array of length n or a
    scalar (the same value in every row; ``str`` for text). One structured array, no Python loop."""
    fields: list[tuple[str, str]] = [("nfields", ">i2")]
    values: dict[str, object] = {"nfields": len(columns)}
    for name, value in columns.items():
        kind = types[name]
        fields.append((f"len_{name}", ">i4"))
        if kind == "text":
            data = str(value).encode()
            fields.append((name, f"S{len(data)}"))
            values[f"len_{name}"], values[name] = len(data), data
        else:
            dtype = PG_BINARY[kind]
            fields.append((name, dtype))
            values[f"len_{name}"], values[name] = np.dtype(dtype).itemsize, value
    out = np.zeros(n, dtype=fields)
    for name, value in values.items():
        out[name] = value
    return out.tobytes()


def _pg_timestamp(moment: dt.datetime) -> int:
    return int((moment - PG_EPOCH).total_seconds() * 1_000_000)


def drop_indexes(conn: psycopg.Connection, table: str) -> list[str]:
    """Drop the table's secondary indexes, unique and foreign-key constraints; returns the DDL that
    re-creates them."""
    recreate = []
    for name, definition in conn.execute(
        "select conname, pg_get_constraintdef(oid) from pg_constraint where conrelid = %s::regclass "
        "and contype in ('u', 'f')", (table,)
    ).fetchall():
        conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        recreate.append(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
    for name, definition in conn.execute(
        "select indexname, indexdef from pg_indexes where tablename = %s and indexname not in "
        "(select conname from pg_constraint where conrelid = %s::regclass)", (table, table)
    ).fetchall():
        conn.execute(f'DROP INDEX "{name}"')
        recreate.append(definition)
    return recreate


# --- fill ---------------------------------------------------------------------------------------------
def fill(url: str, n_submissions: int, n_cases: int) -> tuple[dict[str, str], list[int]]:
    """Users, the test set, cases, submissions, shards; scores and case runs by binary COPY.
    Returns (role -> token, submission ids)."""
    engine = sa.create_engine(url)
    with Session(engine) as s:
        tokens = {role: create_user(s, f"bench-{role}", role, "bench-team" if role == "inventor" else None)[1]
                  for role in ("organizer", "analyst", "inventor")}
        testset, case_pks = add_bench_testset(s, TESTSET, PROTOCOL_KEY, n_cases, n_hospitals=N_HOSPITALS, n_public=5)
        submission_ids = add_bench_submissions(s, testset, [SubmissionState.published] * n_submissions)
        shard_size = 50
        s.execute(sa.insert(Shard), [
            {"submission_id": sid, "index": j, "case_ids": [], "state": ShardState.succeeded, "attempts": 1,
             "run_seconds": 60.0, "exit_code": 0, "peak_memory_bytes": 2**33 + 2**20 * ((k * 31 + j) % 997),
             "gpu_memory_peak_bytes": 2**34 + 2**20 * ((k * 17 + j) % 991)}
            for k, sid in enumerate(submission_ids) for j in range(-(-n_cases // shard_size))
        ])
        s.commit()
    engine.dispose()

    raw_url = sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    rng = np.random.default_rng(0)
    now = _pg_timestamp(dt.datetime.now(dt.timezone.utc))
    started = time.perf_counter()
    with psycopg.connect(raw_url) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        score_types, run_types = column_types(conn, "scores"), column_types(conn, "case_runs")
        recreate = drop_indexes(conn, "scores") + drop_indexes(conn, "case_runs")
        with conn.cursor() as cur:
            with cur.copy("COPY scores (submission_id, case_id, organ, protocol_key, dsc, nsd, hd95, assd, status) "
                          "FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(COPY_HEADER)
                for k, sid in enumerate(submission_ids):
                    skill = 0.70 + 0.2 * k / max(n_submissions - 1, 1)
                    for organ in ORGANS:
                        dsc = np.clip(rng.normal(skill, 0.1, n_cases), 0, 1).round(6)
                        nsd = np.clip(dsc + rng.normal(0, 0.05, n_cases), 0, 1).round(6)
                        hd95 = rng.gamma(2.0, 3.0, n_cases).round(4)
                        copy.write(binary_rows(score_types, {
                            "submission_id": sid, "case_id": case_pks, "organ": organ, "protocol_key": PROTOCOL_KEY,
                            "dsc": dsc, "nsd": nsd, "hd95": hd95, "assd": hd95 / 4, "status": "ok"}, n_cases))
                    if (k + 1) % 20 == 0:
                        print(f"  scores: {k + 1}/{n_submissions} submissions ({time.perf_counter() - started:.0f} s)",
                              flush=True)
                copy.write(COPY_TRAILER)
            with cur.copy("COPY case_runs (submission_id, case_id, wall_seconds, status, scoring_seconds, created_at) "
                          "FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(COPY_HEADER)
                for sid in submission_ids:
                    copy.write(binary_rows(run_types, {
                        "submission_id": sid, "case_id": case_pks, "wall_seconds": rng.gamma(4.0, 5.0, n_cases),
                        "status": "ok", "scoring_seconds": rng.gamma(2.0, 1.0, n_cases), "created_at": now},
                        n_cases))
                copy.write(COPY_TRAILER)
        loaded = time.perf_counter()
        print(f"  COPY done ({loaded - started:.0f} s); re-creating {len(recreate)} indexes and constraints", flush=True)
        for ddl in recreate:
            conn.execute(ddl)
        conn.commit()
        print(f"  indexes ({time.perf_counter() - loaded:.0f} s)", flush=True)
    with psycopg.connect(raw_url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return tokens, submission_ids


# --- statistics ---------------------------------------------------------------------------------------
def compute_statistics(url: str, submission_ids: list[int], aggregate_resamples: int) -> tuple[float, float]:
    """(seconds for the aggregates of all but the last submission, seconds of ``on_submission_scored``
    of the last one with the production options)."""
    engine = sa.create_engine(url)
    options = StatsOptions(n_resamples=aggregate_resamples, group_resamples=aggregate_resamples)
    started = time.perf_counter()
    with Session(engine) as s:
        testset = s.scalar(sa.select(TestSet).where(TestSet.name == TESTSET))
        cases = load_cases(s, testset.id)
        for k, sid in enumerate(submission_ids[:-1]):
            store_submission_aggregates(s, s.get(Submission, sid), testset, cases, options)
            if (k + 1) % 20 == 0:
                s.commit()
                print(f"  aggregates: {k + 1}/{len(submission_ids) - 1} ({time.perf_counter() - started:.0f} s)",
                      flush=True)
        s.commit()
    aggregates_s = time.perf_counter() - started
    started = time.perf_counter()
    with Session(engine) as s:
        report = on_submission_scored(s, submission_ids[-1], DEFAULT_OPTIONS)
        s.commit()
    scored_s = time.perf_counter() - started
    print(f"  on_submission_scored({submission_ids[-1]}): {report}", flush=True)
    engine.dispose()
    return aggregates_s, scored_s


# --- latency ------------------------------------------------------------------------------------------
def latency(client: httpx.Client, path: str, n: int, headers: dict | None = None) -> tuple[float, float]:
    for _ in range(5):  # warm-up (and the cache, where there is one)
        client.get(path, headers=headers).raise_for_status()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = client.get(path, headers=headers)
        samples.append((time.perf_counter() - t0) * 1000)
        response.raise_for_status()
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def start_server(url: str, name: str) -> tuple[subprocess.Popen, str]:
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
    return server, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=100)
    parser.add_argument("--cases", type=int, default=5903)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--aggregate-resamples", type=int, default=100,
                        help="bootstrap resamples of the aggregates of all but the last submission")
    parser.add_argument("--keep", action="store_true", help="keep the database (its URL is printed)")
    args = parser.parse_args()
    url, drop_database = fresh_postgres_database("ts_bench", keep=args.keep, synchronous_commit=False)
    name = sa.engine.make_url(url).database
    server = None
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    try:
        migrate.upgrade("head", url)
        t0 = time.perf_counter()
        print(f"filling {name}: {args.submissions} submissions x {args.cases} cases x {len(ORGANS)} organs", flush=True)
        tokens, submission_ids = fill(url, args.submissions, args.cases)
        t1 = time.perf_counter()
        aggregates_s, scored_s = compute_statistics(url, submission_ids, args.aggregate_resamples)
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            counts = {t: conn.scalar(sa.text(f"select count(*) from {t}"))
                      for t in ("scores", "case_runs", "aggregates", "ranking_entries", "pairwise_families",
                                "rank_stability")}
        engine.dispose()
        print(f"fill: {t1 - t0:.1f} s ({counts['scores']} scores, {counts['case_runs']} case runs)")
        print(f"aggregates of {len(submission_ids) - 1} submissions ({args.aggregate_resamples} resamples): "
              f"{aggregates_s:.1f} s; on_submission_scored of the last (production options): {scored_s:.1f} s")
        print("stored: " + ", ".join(f"{k}={v}" for k, v in counts.items()))

        server, base = start_server(url, name)
        org = {"Authorization": f"Bearer {tokens['organizer']}"}
        ana = {"Authorization": f"Bearer {tokens['analyst']}"}
        sub = submission_ids[len(submission_ids) // 2]
        n = args.requests
        with httpx.Client(base_url=base, timeout=60) as client:
            board = client.get(f"/api/v1/leaderboards/{TESTSET}").json()
            assert len(board["entries"]) == args.submissions, "every published submission is on the board"
            assert all(e["mean"] is not None and e["rank_median"] is not None for e in board["entries"])
            results = {
                "leaderboard (anonymous)": latency(client, f"/api/v1/leaderboards/{TESTSET}", n),
                "leaderboard organ=liver rank-mean": latency(
                    client, f"/api/v1/leaderboards/{TESTSET}?organ=liver&method=rank-mean", n),
                "leaderboard scope=all (organizer)": latency(client, f"/api/v1/leaderboards/{TESTSET}?scope=all", n, org),
                "submission results": latency(client, f"/api/v1/leaderboards/{TESTSET}/submissions/{sub}", n),
                "submission cases 1000 (analyst)": latency(
                    client, f"/api/v1/leaderboards/{TESTSET}/submissions/{sub}/cases?limit=1000", max(n // 5, 20), ana),
                "submission scores 1000 (organizer)": latency(
                    client, f"/api/v1/results/submissions/{sub}/scores?limit=1000", max(n // 5, 20), org),
                "submission (organizer)": latency(client, f"/api/v1/submissions/{sub}", n, org),
            }
        for label, (p50, p99) in results.items():
            print(f"{label:<36} p50={p50:8.2f} ms  p99={p99:8.2f} ms")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"leaderboard_p99_ms={results['leaderboard (anonymous)'][1]:.2f}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        drop_database()


if __name__ == "__main__":
    main()
