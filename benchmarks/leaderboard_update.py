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
   stay, as the updates before it would have left them), then ``VACUUM ANALYZE`` and a
   ``CHECKPOINT`` (the database as it stands between two scorings, not autovacuum of the full
   recomputation's writes running during the timed update).
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
import gc
import os
import sys
import time
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
from services.db.models import PackedScores, PairwiseCache, Submission, TestSet  # noqa: E402
from services.leaderboard import DEFAULT_OPTIONS, on_submission_scored  # noqa: E402

from benchmarks import api as _api  # noqa: E402  (the binary-COPY helpers, one copy of them)
from benchmarks import bench_db as _bench  # noqa: E402

PROTOCOL_KEY = "touchstone@1"
TESTSET = "bench-update"


def fill(url: str, n_submissions: int, n_cases: int) -> list[int]:
    """The test set, its cases, K published submissions and one ``evaluating``; every score by binary
    COPY. Returns the K + 1 submission ids (the last is the new one)."""
    engine = sa.create_engine(url)
    with Session(engine) as s:
        testset, case_pks = _bench.add_bench_testset(s, TESTSET, PROTOCOL_KEY, n_cases, n_hospitals=17)
        submission_ids = _bench.add_bench_submissions(
            s, testset, [SubmissionState.published] * n_submissions + [SubmissionState.evaluating])
        s.commit()
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


def settle(url: str) -> None:
    """Let the database settle after the full recomputation's 100,000s of row writes and deletes,
    as it has between two real scorings: ``VACUUM ANALYZE`` and a ``CHECKPOINT`` now, rather than
    autovacuum and the checkpointer competing with the timed update for the two cores."""
    raw_url = sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(raw_url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    gc.collect()


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
    parser.add_argument("--repeat", type=int, default=0,
                        help="time the incremental update this many more times (state restored before each); "
                             "update_seconds stays the first run's")
    args = parser.parse_args()
    url, drop_database = _bench.fresh_postgres_database("ts_update", keep=args.keep, synchronous_commit=False)
    name = sa.engine.make_url(url).database
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

        def before_the_new_one() -> None:
            # back to the state before the (K+1)-th was scored: the statistics of the K published
            # submissions (the published scope, as the full recomputation wrote it) and their
            # pairs in the cache, none of the new submission's pairs and no packed scores of it
            with Session(engine) as s:
                s.execute(sa.delete(PairwiseCache).where(sa.or_(PairwiseCache.submission_a_id == new,
                                                                PairwiseCache.submission_b_id == new)))
                s.execute(sa.delete(PackedScores).where(PackedScores.submission_id == new))
                s.commit()
            settle(url)

        before_the_new_one()
        update_s = timed(f"incremental update: submission {k + 1} scored", update(False))
        repeats = []
        for r in range(args.repeat):
            before_the_new_one()
            repeats.append(timed(f"incremental update, repeat {r + 1}/{args.repeat}", update(False)))
        if repeats:
            every = [update_s, *repeats]
            print(f"incremental update over {len(every)} runs: min {min(every):.2f} s, median "
                  f"{float(np.median(every)):.2f} s, max {max(every):.2f} s")
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
        print(f"update_seconds={update_s:.2f} full_seconds={full_s:.2f} submissions={k} cases={n}")
    finally:
        drop_database()


if __name__ == "__main__":
    main()
