"""Leaderboard statistics after one more submission, on PostgreSQL: incremental update vs full recomputation.

1. **Fill** a fresh PostgreSQL database (created here, dropped at the end; ``synchronous_commit=off``):
   one test set of ``--cases`` (default 5,903) hidden cases, ``--submissions`` K (default 100)
   published submissions and one more, the (K+1)-th, still being evaluated; their
   (K+1) x cases x 9 organs (``evaluation.labels.ORGANS``) synthetic DSC/NSD scores go in by binary
   ``COPY`` built with numpy (the helpers of ``benchmarks/api.py``).
2. **Full recomputation** (timed, ``full_seconds``): the (K+1)-th becomes ``scored`` and
   ``on_submission_scored(..., full=True)`` runs -- its aggregates, then both scopes with every
   score re-read and every one of the K(K+1)/2 pairs per organ x metric re-tested, as every scoring
   cost before (this also fills the pairwise cache and the packed scores).
3. **Back to the state before the (K+1)-th was scored**: its rows of the pairwise cache and its
   packed scores are deleted (the K published submissions' statistics, pairs and packed scores
   stay, as the updates before it would have left them).
4. **Incremental update** (timed, ``update_seconds``): ``on_submission_scored`` as ``finalize``
   runs it -- its aggregates, its packed scores, the K new pairs per organ x metric tested, every
   other pair from the cache, Holm, rankings, P(best) and the bootstrap recomputed; the published
   scope, whose members and inputs did not change, is left as it is. The rows it leaves are
   compared with the full recomputation's: they must be identical.

Statistics with the production options (``DEFAULT_OPTIONS``: 1,000 bootstrap resamples).

Usage::

    source scripts/setup.sh   # PostgreSQL; exports TOUCHSTONE_TEST_POSTGRES_URL
    .venv/bin/python benchmarks/leaderboard_update.py [--submissions 100 --cases 5903]

(URL from TOUCHSTONE_BENCH_POSTGRES_URL or TOUCHSTONE_TEST_POSTGRES_URL.) Prints each stage with its
time and the load average; the last line is
``update_seconds=<float> full_seconds=<float> submissions=<K> cases=<N>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluation.labels import ORGANS  # noqa: E402
from services.db import migrate  # noqa: E402
from services.db.enums import SubmissionState  # noqa: E402
from services.db.leaderboard_models import PairwiseFamily, RankingEntry, RankStability, StatsRun  # noqa: E402
from services.db.models import Algorithm, Case, PackedScores, PairwiseCache, Submission, Team, TestSet  # noqa: E402
from services.leaderboard import DEFAULT_OPTIONS, on_submission_scored  # noqa: E402

_spec = importlib.util.spec_from_file_location("benchmark_api", REPO / "benchmarks" / "api.py")
_api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_api)  # the binary-COPY helpers (one copy of them)

PROTOCOL_KEY = "touchstone@1"
TESTSET = "bench-update"


def fill(url: str, n_submissions: int, n_cases: int) -> list[int]:
    """The test set, its cases, K published submissions and one ``evaluating``; every score by binary
    COPY. Returns the K + 1 submission ids (the last is the new one)."""
    engine = sa.create_engine(url)
    with Session(engine) as s:
        testset = TestSet(
            name=TESTSET, protocol_name="touchstone", protocol_version="1", protocol_key=PROTOCOL_KEY,
            protocol_json={}, manifest_sha256="0" * 64, root_path="/data/bench", time_per_case_s=600,
            memory_bytes=2**35, gpus=1, shm_bytes=2**31, pids_limit=512, shard_size=50, quota_submissions=3,
            quota_period_days=7,
        )
        s.add(testset)
        s.flush()
        s.execute(sa.insert(Case), [
            {"testset_id": testset.id, "case_id": f"BDMAP_{i:08d}", "hospital": f"hospital-{i % 17:02d}",
             "age": 20 + (i * 7) % 70, "sex": "MF"[i % 2], "image_path": f"/data/bench/{i}/ct.nii.gz",
             "labels_path": f"/data/bench/{i}", "public_sample": False, "extra": {}}
            for i in range(n_cases)
        ])
        case_pks = np.asarray(list(s.scalars(
            sa.select(Case.id).where(Case.testset_id == testset.id).order_by(Case.id))), dtype=np.int64)
        teams = [Team(name=f"team-{k:03d}") for k in range(n_submissions + 1)]
        s.add_all(teams)
        s.flush()
        algorithms = [Algorithm(team_id=t.id, name=f"algo-{k:03d}") for k, t in enumerate(teams)]
        s.add_all(algorithms)
        s.flush()
        submissions = [
            Submission(algorithm_id=a.id, testset_id=testset.id, team_id=t.id,
                       state=SubmissionState.published if k < n_submissions else SubmissionState.evaluating,
                       image_sha256=f"{k:064x}", image_digest=f"sha256:{k:064x}")
            for k, (a, t) in enumerate(zip(algorithms, teams))
        ]
        s.add_all(submissions)
        s.commit()
        submission_ids = [sub.id for sub in submissions]
    engine.dispose()

    raw_url = sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    with psycopg.connect(raw_url) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        types = _api.column_types(conn, "scores")
        recreate = _api.drop_indexes(conn, "scores")
        with conn.cursor() as cur:
            with cur.copy("COPY scores (submission_id, case_id, organ, protocol_key, dsc, nsd, status) "
                          "FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(_api.COPY_HEADER)
                for k, sid in enumerate(submission_ids):
                    skill = 0.70 + 0.2 * rng.random()
                    for organ in ORGANS:
                        # rounded to 4 digits: ties and zero differences occur as in real score tables
                        dsc = np.clip(rng.normal(skill, 0.1, n_cases), 0, 1).round(4)
                        nsd = np.clip(dsc + rng.normal(0, 0.05, n_cases), 0, 1).round(4)
                        copy.write(_api.binary_rows(types, {
                            "submission_id": sid, "case_id": case_pks, "organ": organ, "protocol_key": PROTOCOL_KEY,
                            "dsc": dsc, "nsd": nsd, "status": "ok"}, n_cases))
                    if (k + 1) % 25 == 0 or k == n_submissions:
                        print(f"  scores: {k + 1}/{n_submissions + 1} submissions "
                              f"({time.perf_counter() - started:.0f} s)", flush=True)
                copy.write(_api.COPY_TRAILER)
        for ddl in recreate:
            conn.execute(ddl)
        conn.commit()
    with psycopg.connect(raw_url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return submission_ids


def stored(session: Session, testset_id: int) -> dict[str, list[tuple]]:
    """Every comparative row of the test set (without ids and timestamps), sorted: what must be equal."""
    out = {}
    for model in (StatsRun, RankingEntry, PairwiseFamily, RankStability):
        columns = [c for c in model.__table__.columns if c.name not in ("id", "computed_at")]
        rows = session.execute(sa.select(*columns).where(model.testset_id == testset_id)).all()
        out[model.__tablename__] = sorted((tuple(_plain(v) for v in r) for r in rows), key=repr)
    return out


def _plain(value):
    if isinstance(value, dict):
        return repr(sorted((k, _plain(v)) for k, v in value.items()))
    if isinstance(value, list):
        return repr([_plain(v) for v in value])
    return value


def timed(label: str, fn):
    print(f"{label} ...", flush=True)
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    print(f"{label}: {seconds:.2f} s  {result}", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=100, help="published submissions before the new one")
    parser.add_argument("--cases", type=int, default=5903)
    parser.add_argument("--keep", action="store_true", help="keep the database (its URL is printed)")
    args = parser.parse_args()
    base_url = os.environ.get("TOUCHSTONE_BENCH_POSTGRES_URL") or os.environ.get("TOUCHSTONE_TEST_POSTGRES_URL")
    if not base_url:
        sys.exit("set TOUCHSTONE_BENCH_POSTGRES_URL (or TOUCHSTONE_TEST_POSTGRES_URL); `source scripts/setup.sh` "
                 "exports the latter")
    name = f"ts_update_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        conn.execute(sa.text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
    url = sa.engine.make_url(base_url).set(database=name).render_as_string(hide_password=False)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    k, n = args.submissions, args.cases
    try:
        migrate.upgrade("head", url)
        print(f"filling {name}: {k} + 1 submissions x {n} cases x {len(ORGANS)} organs", flush=True)
        t0 = time.perf_counter()
        submission_ids = fill(url, k, n)
        print(f"fill: {time.perf_counter() - t0:.1f} s", flush=True)
        new = submission_ids[-1]
        engine = sa.create_engine(url)

        with Session(engine) as s:
            s.get(Submission, new).state = SubmissionState.scored
            s.commit()

        def update(full: bool):
            def run():
                with Session(engine) as s:
                    report = on_submission_scored(s, new, DEFAULT_OPTIONS, full=full)
                    s.commit()
                    return report
            return run

        full_s = timed(f"full recomputation: submission {k + 1} scored, every pair re-tested", update(True))
        with Session(engine) as s:
            testset_id = s.scalar(sa.select(TestSet.id).where(TestSet.name == TESTSET))
            full = stored(s, testset_id)
            # back to the state before the (K+1)-th was scored: the statistics of the K published
            # submissions (the published scope, as the full recomputation wrote it) and their
            # pairs in the cache, none of the new submission's pairs and no packed scores of it
            s.execute(sa.delete(PairwiseCache).where(sa.or_(PairwiseCache.submission_a_id == new,
                                                            PairwiseCache.submission_b_id == new)))
            s.execute(sa.delete(PackedScores).where(PackedScores.submission_id == new))
            s.commit()
        update_s = timed(f"incremental update: submission {k + 1} scored", update(False))
        with Session(engine) as s:
            incremental = stored(s, testset_id)
        for table in full:
            same = incremental[table] == full[table]
            print(f"  {table}: {len(full[table])} rows, incremental == full: {same}")
            if not same:
                sys.exit(f"the incremental update and the full recomputation differ in {table}")
        engine.dispose()
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"speed-up: {full_s / update_s:.1f}x (full / incremental, same run, same machine)")
        if args.keep:
            print(f"kept database: {url}")
        print(f"update_seconds={update_s:.2f} full_seconds={full_s:.2f} submissions={k} cases={n}")
    finally:
        if not args.keep:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
