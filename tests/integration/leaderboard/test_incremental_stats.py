"""Incremental leaderboard statistics equal the full recomputation exactly, on SQLite and PostgreSQL.

Sequence: four submissions scored and published one by one (each ``on_submission_scored`` tests only
the new submission's pairs), one unpublished, then republished (no pair re-tested: every one is in
the cache). After the unpublish and after the republish, every stored statistic -- p-values,
adjusted p-values, ranks, rank intervals, P(best), aggregates and their intervals -- is compared
with what ``recompute_all(full=True)`` (``touchstone stats recompute``) writes: equal, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.enums import SubmissionState
from services.db.leaderboard_models import PairwiseFamily, RankingEntry, RankStability, StatsRun
from services.db.models import Aggregate, Algorithm, Case, PairwiseCache, Score, Submission, Team, TestSet
from services.leaderboard import StatsOptions, on_submission_scored, recompute_all
from tests.integration.leaderboard.conftest import use_database

ORGANS3 = ("spleen", "liver")
N_CASES = 24
K = 4
OPTIONS = StatsOptions(n_resamples=60, group_resamples=20)


def build(session: Session, missing_policy: str) -> tuple[int, list[int]]:
    """A test set of 24 cases (2 hospitals) and four submissions still ``evaluating`` with scores of
    2 organs: rounded (ties, zero differences), some failures, some cells missing (not the first)."""
    testset = TestSet(name="inc", protocol_name="touchstone", protocol_version="1", protocol_key="touchstone@1",
                      protocol_json={}, manifest_sha256="0" * 64, root_path="/data/inc", time_per_case_s=60,
                      memory_bytes=2**30, gpus=0, shm_bytes=2**28, pids_limit=64, shard_size=10,
                      quota_submissions=3, quota_period_days=7, missing_policy=missing_policy, min_group_size=1)
    session.add(testset)
    session.flush()
    cases = [Case(testset_id=testset.id, case_id=f"case{i:03d}", hospital=f"h{i % 2}", age=30 + i, sex="MF"[i % 2],
                  image_path=f"/data/inc/{i}.nii.gz", labels_path=f"/data/inc/{i}", public_sample=False, extra={})
             for i in range(N_CASES)]
    session.add_all(cases)
    session.flush()
    rng = np.random.default_rng(7)
    ids = []
    for k in range(K):
        team = Team(name=f"team{k}")
        session.add(team)
        session.flush()
        algorithm = Algorithm(team_id=team.id, name=f"algo{k}")
        session.add(algorithm)
        session.flush()
        sub = Submission(algorithm_id=algorithm.id, testset_id=testset.id, team_id=team.id,
                         state=SubmissionState.evaluating, image_sha256=f"{k:064x}", image_digest=f"sha256:{k:064x}")
        session.add(sub)
        session.flush()
        ids.append(sub.id)
        rows = []
        for case in cases:
            for organ in ORGANS3:
                if k > 0 and rng.random() < 0.08:
                    continue  # not scored: missing
                failed = rng.random() < 0.04
                dsc = 0.0 if failed else float(np.clip(rng.normal(0.75 + 0.03 * k, 0.1), 0, 1).round(2))
                rows.append({"submission_id": sub.id, "case_id": case.id, "organ": organ,
                             "protocol_key": "touchstone@1", "dsc": dsc,
                             "nsd": 0.0 if failed else float(np.clip(dsc + rng.normal(0, 0.05), 0, 1).round(2)),
                             "status": "invalid_prediction" if failed else "ok"})
        session.execute(sa.insert(Score), rows)
    session.commit()
    return testset.id, ids


def snapshot(session: Session, testset_id: int, submission_ids: list[int]) -> dict[str, list[tuple]]:
    out = {}
    for model in (StatsRun, RankingEntry, PairwiseFamily, RankStability, Aggregate):
        columns = [c for c in model.__table__.columns if c.name not in ("id", "computed_at")]
        where = (model.submission_id.in_(submission_ids) if model is Aggregate else model.testset_id == testset_id)
        rows = session.execute(sa.select(*columns).where(where)).all()
        out[model.__tablename__] = sorted((tuple(repr(v) if isinstance(v, (dict, list)) else v for v in r)
                                           for r in rows), key=repr)
    return out


def set_state(session: Session, submission_id: int, state: SubmissionState):
    session.get(Submission, submission_id).state = state
    session.flush()
    report = on_submission_scored(session, submission_id, OPTIONS)
    session.commit()
    return report


def assert_equal_to_full(session: Session, testset_id: int, ids: list[int], worst: bool) -> None:
    incremental = snapshot(session, testset_id, ids)
    assert incremental["pairwise_families"] and incremental["rank_stability"] and incremental["aggregates"]
    report = recompute_all(session, session.get(TestSet, testset_id), OPTIONS, full=True)
    session.commit()
    # every pair of the members tested once (the published scope then reuses them within the run;
    # under common, test-then-rank's pairs on each scope's common cases come on top)
    every_pair = 2 * (len(ORGANS3) + 1) * K * (K - 1) // 2
    assert report.pairs_tested == every_pair if worst else report.pairs_tested > every_pair
    full = snapshot(session, testset_id, ids)
    for table in full:
        assert incremental[table] == full[table], table


def run_sequence(session: Session, missing_policy: str) -> None:
    testset_id, ids = build(session, missing_policy)
    n_matrices = 2 * (len(ORGANS3) + 1)  # organs and the average, dsc and nsd
    worst = missing_policy == "worst"
    for k, sid in enumerate(ids):
        report = set_state(session, sid, SubmissionState.published)
        # only the new submission's pairs are tested (under common, test-then-rank's case axis --
        # the cases every submission has -- may change and with it every pair on it)
        if worst:
            assert (report.pairs_tested, report.pairs_reused) == (n_matrices * k, n_matrices * k * (k - 1) // 2)
        else:
            assert report.pairs_tested >= n_matrices * k
    unpublished = ids[2]
    report = set_state(session, unpublished, SubmissionState.scored)
    assert report.pairs_tested == 0 or not worst
    assert_equal_to_full(session, testset_id, ids, worst)
    report = set_state(session, unpublished, SubmissionState.published)
    assert report.pairs_reused >= n_matrices * K * (K - 1) // 2
    assert report.pairs_tested == 0 or not worst
    assert_equal_to_full(session, testset_id, ids, worst)
    # the cache holds exactly one row per pair, organ and metric (under ``worst``: one case axis)
    if missing_policy == "worst":
        assert session.scalar(sa.select(sa.func.count()).select_from(PairwiseCache)) == n_matrices * K * (K - 1) // 2


@pytest.mark.slow
@pytest.mark.parametrize("missing_policy", ["worst", "common"])
def test_incremental_equals_full_sqlite(sqlite_session, missing_policy, monkeypatch, tmp_path):
    run_sequence(sqlite_session, missing_policy)
    if missing_policy != "worst":
        return
    # `touchstone stats recompute` is that full recomputation (with the production options):
    # an incremental update after it writes the same rows
    from typer.testing import CliRunner

    from services.cli.main import app as cli
    from services.db.session import dispose_engines

    testset_id = sqlite_session.scalar(sa.select(TestSet.id))
    ids = list(sqlite_session.scalars(sa.select(Submission.id).order_by(Submission.id)))
    use_database(monkeypatch, sqlite_session.bind.url.render_as_string(hide_password=False), tmp_path)
    try:
        result = CliRunner().invoke(cli, ["stats", "recompute", "inc"], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "recomputed inc (touchstone@1)" in result.output and "pair tests" in result.output
        unknown = CliRunner().invoke(cli, ["stats", "recompute", "nope"], terminal_width=200)
        assert unknown.exit_code == 1 and "nope" in unknown.output
        shown = CliRunner().invoke(cli, ["stats", "inc", "--organ", "liver", "--format", "json", "--scope", "all"])
        assert shown.exit_code == 0 and '"pairs"' in shown.output
    finally:
        dispose_engines()
    sqlite_session.expire_all()
    full = snapshot(sqlite_session, testset_id, ids)
    assert {r[-1] for r in full["rank_stability"]} == {1000}  # n_resamples of the production options
    report = on_submission_scored(sqlite_session, ids[1])
    sqlite_session.commit()
    assert report.pairs_tested == 0
    assert snapshot(sqlite_session, testset_id, ids) == full


@pytest.mark.slow
@pytest.mark.postgres
def test_incremental_equals_full_postgres(new_postgres_database):
    from services.db import migrate
    from services.db.session import create_db_engine

    with new_postgres_database("incremental") as url:
        migrate.upgrade("head", url)
        engine = create_db_engine(url)
        try:
            with Session(engine, expire_on_commit=False) as session:
                run_sequence(session, "worst")
        finally:
            engine.dispose()
