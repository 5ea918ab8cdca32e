"""What the PostgreSQL benchmarks share: a database of their own and a synthetic test set.

``benchmarks/api.py``, ``leaderboard_update.py`` and ``pipeline.py`` each create a fresh database on
the server that ``scripts/setup.sh`` starts (``TOUCHSTONE_BENCH_POSTGRES_URL``, else
``TOUCHSTONE_TEST_POSTGRES_URL``) and drop it at the end; the first two fill it with the same
synthetic 5,903-case test set.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.models import Case, TestSet


def fresh_postgres_database(prefix: str, *, keep: bool = False,
                            synchronous_commit: bool = True) -> tuple[str, Callable[[], None]]:
    """A new database ``<prefix>_<random>``; returns (url, drop). ``drop`` keeps it (and prints
    its URL) when ``keep``. ``synchronous_commit=False``: the database commits without waiting
    for the WAL flush (bulk fills; a crash loses only this throw-away database)."""
    base_url = os.environ.get("TOUCHSTONE_BENCH_POSTGRES_URL") or os.environ.get("TOUCHSTONE_TEST_POSTGRES_URL")
    if not base_url:
        sys.exit("set TOUCHSTONE_BENCH_POSTGRES_URL (or TOUCHSTONE_TEST_POSTGRES_URL; `source scripts/setup.sh` "
                 "exports it)")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        if not synchronous_commit:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
    url = sa.engine.make_url(base_url).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        if keep:
            print(f"kept database: {url}")
        else:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def add_bench_testset(session: Session, name: str, protocol_key: str, n_cases: int, *, n_hospitals: int,
                      n_public: int = 0) -> tuple[TestSet, np.ndarray]:
    """A test set of ``n_cases`` cases (ids ``BDMAP_<8 digits>``; hospital ``i mod n_hospitals``,
    ages 20-89, sexes alternating; the first ``n_public`` public samples) with no files behind
    them; returns it and its case pks in case order."""
    protocol_name, _, version = protocol_key.partition("@")
    testset = TestSet(
        name=name, protocol_name=protocol_name, protocol_version=version, protocol_key=protocol_key,
        protocol_json={}, manifest_sha256="0" * 64, root_path="/data/bench", time_per_case_s=600,
        memory_bytes=2**35, gpus=1, shm_bytes=2**31, pids_limit=512, shard_size=50, quota_submissions=3,
        quota_period_days=7,
    )
    session.add(testset)
    session.flush()
    session.execute(sa.insert(Case), [
        {"testset_id": testset.id, "case_id": f"BDMAP_{i:08d}", "hospital": f"hospital-{i % n_hospitals:02d}",
         "age": 20 + (i * 7) % 70, "sex": "MF"[i % 2], "image_path": f"/data/bench/{i}/ct.nii.gz",
         "labels_path": f"/data/bench/{i}", "public_sample": i < n_public, "extra": {}}
        for i in range(n_cases)
    ])
    case_pks = np.asarray(list(session.scalars(
        sa.select(Case.id).where(Case.testset_id == testset.id).order_by(Case.id))), dtype=np.int64)
    return testset, case_pks


def add_bench_submissions(session: Session, testset: TestSet, states: list) -> list[int]:
    """One team, algorithm and submission per entry of ``states`` (a ``SubmissionState`` each),
    image digests ``sha256:<k as 64 hex digits>``; returns the submission ids in order."""
    from services.db.models import Algorithm, Submission, Team

    teams = [Team(name=f"team-{k:03d}") for k in range(len(states))]
    session.add_all(teams)
    session.flush()
    algorithms = [Algorithm(team_id=t.id, name=f"algo-{k:03d}") for k, t in enumerate(teams)]
    session.add_all(algorithms)
    session.flush()
    submissions = [Submission(algorithm_id=a.id, testset_id=testset.id, team_id=t.id, state=state,
                              image_sha256=f"{k:064x}", image_digest=f"sha256:{k:064x}")
                   for k, (a, t, state) in enumerate(zip(algorithms, teams, states))]
    session.add_all(submissions)
    session.flush()
    return [sub.id for sub in submissions]
